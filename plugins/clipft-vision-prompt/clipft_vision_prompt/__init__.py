"""Strategy ``vision-prompt``: VPT-shallow (Jia et al., 2022) for ViT towers.

``n_tokens`` learnable tokens are inserted into the input of the vision
transformer's first block, right after the class token, and dropped again at
its output, so pooling, ``ln_post`` and the projection see exactly the tokens
they always see. The whole CLIP model stays frozen; only the prompt tokens
train. On a ResNet or timm vision tower there is no token sequence to extend,
and the strategy says so.
"""
from __future__ import annotations

import attrs

from clipft import Selection, Strategy, StrategySpec, hookimpl

#: attribute of ``model.visual`` that holds the prompts
ATTR = "clipft_vision_prompts"
PROMPT_FILE = "vision_prompts.safetensors"


def _positive(inst, attribute, value):
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, got {value}")


def _dropout(inst, attribute, value):
    if not 0.0 <= value < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {value}")


@attrs.frozen
class VisionPromptOptions:
    n_tokens: int = attrs.field(default=8, validator=_positive, metadata={"help": (
        "number of prompt tokens inserted after the class token")})
    dropout: float = attrs.field(default=0.0, validator=_dropout, metadata={"help": (
        "dropout on the prompt tokens (training only)")})


def _prompt_module():
    import math

    import torch
    from torch import nn

    from clipft import InsertedModule

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

    return VisionPrompts


class VisionPrompt(Strategy):
    def __init__(self, opts: VisionPromptOptions):
        self.opts = opts

    def apply(self, model, ctx):
        from clipft.anatomy import describe
        from clipft.errors import ClipftUsageError
        from clipft.options import options_to_dict

        tower = describe(model).tower("vision")
        visual = model.visual
        if tower.kind != "vit" or not hasattr(visual, "transformer"):
            raise ClipftUsageError(
                f"vision-prompt inserts prompt tokens into a vision transformer, but the "
                f"{tower.label} is a {tower.kind} tower with no token sequence; use a ViT model, "
                "or --strategy prompt (text side) for this one")
        if ATTR in visual._modules:
            raise ClipftUsageError("the vision tower already has prompt tokens; give --strategy vision-prompt once")
        VisionPrompts = _prompt_module()
        prompts = VisionPrompts(visual, self.opts.n_tokens, self.opts.dropout, options_to_dict(self.opts))
        visual.add_module(ATTR, prompts)
        prompts.__dict__["_handles"] = [
            visual.transformer.register_forward_pre_hook(prompts.insert, with_kwargs=True),
            visual.transformer.register_forward_hook(prompts.remove, with_kwargs=True),
        ]
        return [Selection("vision-prompt", [(f"visual.{ATTR}.prompts", prompts.prompts)],
                          weight_decay=False)]


@hookimpl
def clipft_register_strategies(register):
    register(StrategySpec(
        name="vision-prompt",
        summary="VPT-shallow: learnable tokens prepended to a ViT's patch tokens; CLIP stays frozen.",
        options=VisionPromptOptions,
        build=VisionPrompt,
        default_lr=1e-3,
    ))
