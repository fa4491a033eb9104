"""Strategy ``freeze-vision`` (seed Strategy 2): the image tower stays frozen;
the text tower (with its projection) and the logit scale train.

Everything outside the image tower trains, so parameters that belong to
neither tower (CoCa's text decoder) train too. The image tower's embeddings are
then fixed, which lets the engine cache them.
"""
import attrs

from clipft import Selection, StrategySpec, hookimpl


@attrs.frozen
class FreezeVisionOptions:
    logit_scale: bool = attrs.field(default=True, metadata={
        "help": "also train logit_scale (and logit_bias when the model has one)"})
    keep_projection: bool = attrs.field(default=False, metadata={
        "help": "keep training the image projection (visual.proj, attnpool.c_proj, ...) while "
                "the rest of the image tower stays frozen"})


class FreezeVision:
    """Selects everything but the image tower; keeps the image tower frozen."""

    side = "vision"

    def __init__(self, opts: FreezeVisionOptions):
        self.opts = opts

    def apply(self, model, ctx):
        from clipft.anatomy import describe, named_params

        a = describe(model)
        frozen, trained = a.tower("vision"), a.tower("text")
        sels = [Selection("text", named_params(model, trained.names))]
        if self.opts.keep_projection:
            proj = frozen.require_projection(ctx.model_name)
            sels.append(Selection("vision.proj", named_params(model, proj)))
        if self.opts.logit_scale and a.logit:
            sels.append(Selection("logit", named_params(model, a.logit)))
        if a.other:
            sels.append(Selection("other", named_params(model, a.other)))
        return sels

    def keeps_frozen(self, model, ctx):
        from clipft.anatomy import describe

        tower = describe(model).tower("vision")
        keep = set(tower.projection) if self.opts.keep_projection else set()
        return [n for n in tower.names if n not in keep]


@hookimpl
def clipft_register_strategies(register):
    register(StrategySpec(
        name="freeze-vision",
        summary="Freeze the image tower; train the text tower, its projection and the logit scale.",
        options=FreezeVisionOptions,
        build=FreezeVision,
        # a whole pretrained tower trains: as small as full fine-tuning (peer recipes)
        default_lr=1e-5,
    ))
