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
    consistent)."""

    enters = "hook"

    def __init__(self, visual, n_tokens: int, dropout: float, options: dict):
        super().__init__()
        width = visual.conv1.out_channels
        patch = visual.conv1.kernel_size
        # VPT's uniform init, scaled by the patch embedding's fan-in
        bound = math.sqrt(6.0 / float(3 * patch[0] * patch[1] + width))
        weight = visual.conv1.weight
        self.prompts = nn.Parameter(
            torch.empty(n_tokens, width, device=weight.device, dtype=torch.float32).uniform_(-bound, bound))
        self.dropout = nn.Dropout(dropout)
        self.prefix = 1 if getattr(visual, "class_embedding", None) is not None else 0
        self.options = dict(options)

    def extra_repr(self) -> str:
        return f"n_tokens={self.prompts.shape[0]}, after {self.prefix} prefix token(s)"

    def insert(self, module, args, kwargs):
        x = args[0]
        p = self.dropout(self.prompts).to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        k = self.prefix
        return (torch.cat([x[:, :k], p, x[:, k:]], dim=1), *args[1:]), kwargs

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
