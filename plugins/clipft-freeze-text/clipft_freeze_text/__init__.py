"""Strategy ``freeze-text`` (seed Strategy 3): the text tower, including its
projection, stays frozen; the image tower (with its projection) and the logit
scale train.

Everything outside the text tower trains, so parameters that belong to neither
tower (CoCa's text decoder) train too. The text tower's embeddings are then
fixed, which lets the engine cache them (class prompts, captions).
"""
import attrs

from clipft import StrategySpec, hookimpl
from clipft.strategy_kit import FreezeOneTower


@attrs.frozen
class FreezeTextOptions:
    logit_scale: bool = attrs.field(default=True, metadata={
        "help": "also train logit_scale (and logit_bias when the model has one)"})
    keep_projection: bool = attrs.field(default=False, metadata={
        "help": "keep training the text projection (text_projection) while the rest of "
                "the text tower stays frozen"})


@hookimpl
def clipft_register_strategies(register):
    register(StrategySpec(
        name="freeze-text",
        summary="Freeze the text tower; train the image tower, its projection and the logit scale.",
        options=FreezeTextOptions,
        build=lambda opts: FreezeOneTower("text", opts),
        # a whole pretrained tower trains: as small as full fine-tuning (peer recipes)
        default_lr=1e-5,
    ))
