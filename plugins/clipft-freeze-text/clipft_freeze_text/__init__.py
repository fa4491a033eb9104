"""Strategy ``freeze-text`` (seed Strategy 3): the text tower, including its
projection, stays frozen; the image tower (with its projection) and the logit
scale train.

Everything outside the text tower trains, so parameters that belong to neither
tower (CoCa's text decoder) train too. The text tower's embeddings are then
fixed, which lets the engine cache them (class prompts, captions).
"""
import attrs

from clipft import Selection, StrategySpec, hookimpl


@attrs.frozen
class FreezeTextOptions:
    logit_scale: bool = attrs.field(default=True, metadata={
        "help": "also train logit_scale (and logit_bias when the model has one)"})
    keep_projection: bool = attrs.field(default=False, metadata={
        "help": "keep training the text projection (text_projection) while the rest of "
                "the text tower stays frozen"})


class FreezeText:
    """Selects everything but the text tower; keeps the text tower frozen."""

    side = "text"

    def __init__(self, opts: FreezeTextOptions):
        self.opts = opts

    def apply(self, model, ctx):
        from clipft.anatomy import describe, named_params

        a = describe(model)
        frozen, trained = a.tower("text"), a.tower("vision")
        sels = [Selection("vision", named_params(model, trained.names))]
        if self.opts.keep_projection:
            proj = frozen.require_projection(ctx.model_name)
            sels.append(Selection("text.proj", named_params(model, proj)))
        if self.opts.logit_scale and a.logit:
            sels.append(Selection("logit", named_params(model, a.logit)))
        if a.other:
            sels.append(Selection("other", named_params(model, a.other)))
        return sels

    def keeps_frozen(self, model, ctx):
        from clipft.anatomy import describe

        tower = describe(model).tower("text")
        keep = set(tower.projection) if self.opts.keep_projection else set()
        return [n for n in tower.names if n not in keep]


@hookimpl
def clipft_register_strategies(register):
    register(StrategySpec(
        name="freeze-text",
        summary="Freeze the text tower; train the image tower, its projection and the logit scale.",
        options=FreezeTextOptions,
        build=FreezeText,
        # a whole pretrained tower trains: as small as full fine-tuning (peer recipes)
        default_lr=1e-5,
    ))
