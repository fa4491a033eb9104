"""Strategy ``freeze-vision`` (seed Strategy 2): the image tower stays frozen;
the text tower (with its projection) and the logit scale train.

Everything outside the image tower trains, so parameters that belong to
neither tower (CoCa's text decoder) train too. The image tower's embeddings are
then fixed, which lets the engine cache them.
"""
import attrs

from clipft import StrategySpec, hookimpl
from clipft.strategy_kit import FreezeOneTower


@attrs.frozen
class FreezeVisionOptions:
    logit_scale: bool = attrs.field(default=True, metadata={
        "help": "also train logit_scale (and logit_bias when the model has one)"})
    keep_projection: bool = attrs.field(default=False, metadata={
        "help": "keep training the image projection (visual.proj, attnpool.c_proj, ...) while "
                "the rest of the image tower stays frozen"})


@hookimpl
def clipft_register_strategies(register):
    register(StrategySpec(
        name="freeze-vision",
        summary="Freeze the image tower; train the text tower, its projection and the logit scale.",
        options=FreezeVisionOptions,
        build=lambda opts: FreezeOneTower("vision", opts),
        # a whole pretrained tower trains: as small as full fine-tuning (peer recipes)
        default_lr=1e-5,
    ))
