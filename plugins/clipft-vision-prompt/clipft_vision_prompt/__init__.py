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

#: attribute of ``model.visual`` that holds the prompts
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
        blocks = visual.transformer.resblocks
        if self.opts.depth > len(blocks):
            raise ClipftUsageError(f"vision-prompt: depth={self.opts.depth}, but the vision transformer has "
                                   f"{len(blocks)} blocks")
        prompts = VisionPrompts(visual, self.opts.n_tokens, self.opts.dropout, options_to_dict(self.opts),
                                self.opts.depth)
        visual.add_module(ATTR, prompts)
        prompts.__dict__["_handles"] = [
            visual.transformer.register_forward_pre_hook(prompts.insert, with_kwargs=True),
            visual.transformer.register_forward_hook(prompts.remove, with_kwargs=True),
        ] + [blocks[j].register_forward_pre_hook(prompts.replacer(j), with_kwargs=True)
             for j in range(1, self.opts.depth)]
        params = [(f"visual.{ATTR}.prompts", prompts.prompts)]
        if self.opts.depth > 1:
            params.append((f"visual.{ATTR}.deep", prompts.deep))
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
