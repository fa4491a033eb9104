"""Strategy ``vision-prompt``: VPT-shallow (Jia et al., 2022) for ViT towers.

``n_tokens`` learnable tokens are inserted into the input of the vision
transformer's first block, right after the class token, and dropped again at
its output, so pooling, ``ln_post`` and the projection see exactly the tokens
they always see. The whole CLIP model stays frozen; only the prompt tokens
train. On a ResNet or timm vision tower there is no token sequence to extend,
and the strategy says so.

``depth=J`` is VPT-deep: fresh learnable tokens at each of the first J blocks,
each replacing the previous block's outputs at the prompt positions (J=1, the
default, is VPT-shallow).
"""
from __future__ import annotations

import attrs

from clipft import Selection, Strategy, StrategySpec, hookimpl
from clipft.options import at_least_one, unit_fraction

#: attribute of ``model.visual`` that holds the prompts (``clipft.prompt_kit.VISION_PROMPTS_ATTR``)
ATTR = "clipft_vision_prompts"
PROMPT_FILE = "vision_prompts.safetensors"


@attrs.frozen
class VisionPromptOptions:
    n_tokens: int = attrs.field(default=8, validator=at_least_one, metadata={"help": (
        "number of prompt tokens inserted after the class token")})
    dropout: float = attrs.field(default=0.0, validator=unit_fraction, metadata={"help": (
        "dropout on the prompt tokens (training only)")})
    depth: int = attrs.field(default=1, validator=at_least_one, metadata={"help": (
        "VPT-deep: fresh prompt tokens at each of the first depth blocks, replacing the previous "
        "block's outputs at the prompt positions; 1: VPT-shallow (the first block's input only)")})


class VisionPrompt(Strategy):
    def __init__(self, opts: VisionPromptOptions):
        self.opts = opts

    def apply(self, model, ctx):
        from clipft.options import options_to_dict
        from clipft.prompt_kit import install_vision_prompts

        _, params = install_vision_prompts(model, "vision-prompt", self.opts.n_tokens, self.opts.depth,
                                           self.opts.dropout, options_to_dict(self.opts), export_file=PROMPT_FILE)
        return [Selection("vision-prompt", params, weight_decay=False)]


@hookimpl
def clipft_register_strategies(register):
    register(StrategySpec(
        name="vision-prompt",
        summary="VPT: learnable tokens prepended to a ViT's patch tokens (depth>1: VPT-deep); CLIP stays frozen.",
        options=VisionPromptOptions,
        build=VisionPrompt,
        default_lr=1e-3,
    ))
