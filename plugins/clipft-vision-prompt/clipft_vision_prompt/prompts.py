"""The module holding ``vision-prompt``'s tokens; imported by
:meth:`clipft_vision_prompt.VisionPrompt.apply`, so that importing the plugin
does not import torch."""
from __future__ import annotations

import math

import torch
from torch import nn

from clipft import InsertedModule

from clipft_vision_prompt import PROMPT_FILE


class VisionPrompts(InsertedModule, nn.Module):
    """Prompt tokens ``[n, width]`` spliced into ``visual.transformer``'s
    input by a forward pre-hook and removed from its output by a forward
    hook (both registered on the transformer, so every call of it is
    consistent). With ``depth`` J > 1 (VPT-deep), ``deep`` ``[J-1, n, width]``
    holds fresh tokens for blocks 1..J-1: a pre-hook on each of those blocks
    overwrites the prompt positions of its input (the previous block's outputs
    there are dropped)."""

    enters = "hook"

    def __init__(self, visual, n_tokens: int, dropout: float, options: dict, depth: int = 1):
        super().__init__()
        width = visual.conv1.out_channels
        patch = visual.conv1.kernel_size
        # VPT's uniform init, scaled by the patch embedding's fan-in
        bound = math.sqrt(6.0 / float(3 * patch[0] * patch[1] + width))
        weight = visual.conv1.weight
        self.prompts = nn.Parameter(
            torch.empty(n_tokens, width, device=weight.device, dtype=torch.float32).uniform_(-bound, bound))
        if depth > 1:   # drawn only then: depth 1 consumes the random stream as VPT-shallow always did
            self.deep = nn.Parameter(torch.empty(depth - 1, n_tokens, width, device=weight.device,
                                                 dtype=torch.float32).uniform_(-bound, bound))
        self.dropout = nn.Dropout(dropout)
        self.prefix = 1 if getattr(visual, "class_embedding", None) is not None else 0
        self.options = dict(options)

    @property
    def depth(self) -> int:
        deep = getattr(self, "deep", None)
        return 1 + (0 if deep is None else int(deep.shape[0]))

    def extra_repr(self) -> str:
        return f"n_tokens={self.prompts.shape[0]}, depth={self.depth}, after {self.prefix} prefix token(s)"

    def insert(self, module, args, kwargs):
        x = args[0]
        p = self.dropout(self.prompts).to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        k = self.prefix
        return (torch.cat([x[:, :k], p, x[:, k:]], dim=1), *args[1:]), kwargs

    def replacer(self, layer: int):
        """The pre-hook of block ``layer`` (>= 1): its prompt positions get ``deep[layer-1]``."""
        def replace(module, args, kwargs):
            x = args[0]
            k, n = self.prefix, self.prompts.shape[0]
            p = self.dropout(self.deep[layer - 1]).to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            return (torch.cat([x[:, :k], p, x[:, k + n:]], dim=1), *args[1:]), kwargs
        return replace

    def remove(self, module, args, kwargs, output):
        k, n = self.prefix, self.prompts.shape[0]
        return torch.cat([output[:, :k], output[:, k + n:]], dim=1)

    def uninstall(self) -> None:
        """Remove the hooks (before the module is detached, e.g. on export)."""
        for handle in self.__dict__.pop("_handles", []):
            handle.remove()

    def export_info(self) -> dict:
        return {"file": PROMPT_FILE, "kind": "vision-prompts", "strategy": "vision-prompt",
                "options": self.options, "n_tokens": int(self.prompts.shape[0])}
