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
from clipft.options import at_least_one, unit_fraction

#: attribute of ``model.visual`` that holds the prompts
ATTR = "clipft_vision_prompts"
PROMPT_FILE = "vision_prompts.safetensors"


@attrs.frozen
class VisionPromptOptions:
    n_tokens: int = attrs.field(default=8, validator=at_least_one, metadata={"help": (
        "number of prompt tokens inserted after the class token")})
    dropout: float = attrs.field(default=0.0, validator=unit_fraction, metadata={"help": (
        "dropout on the prompt tokens (training only)")})


class VisionPrompt(Strategy):
    def __init__(self, opts: VisionPromptOptions):
        self.opts = opts

    def apply(self, model, ctx):
        from clipft.anatomy import describe
        from clipft.errors import ClipftUsageError
        from clipft.options import options_to_dict

        from clipft_vision_prompt.prompts import VisionPrompts

        tower = describe(model).tower("vision")
        visual = model.visual
        if tower.kind != "vit" or not hasattr(visual, "transformer"):
            raise ClipftUsageError(
                f"vision-prompt inserts prompt tokens into a vision transformer, but the "
                f"{tower.label} is a {tower.kind} tower with no token sequence; use a ViT model, "
                "or --strategy prompt (text side) for this one")
        if ATTR in visual._modules:
            raise ClipftUsageError("the vision tower already has prompt tokens; give --strategy vision-prompt once")
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
