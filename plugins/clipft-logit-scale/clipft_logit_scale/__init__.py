"""Strategy ``logit-scale`` (seed Strategy 9): only ``logit_scale`` trains,
and ``logit_bias`` too when the model has one (SigLIP)."""
import attrs

from clipft import Selection, Strategy, StrategySpec, hookimpl


@attrs.frozen
class LogitScaleOptions:
    pass


class LogitScale(Strategy):
    def apply(self, model, ctx):
        from clipft.anatomy import describe, named_params
        from clipft.errors import ClipftUsageError

        logit = describe(model).logit
        if not logit:
            raise ClipftUsageError(f"{ctx.model_name} has no logit_scale parameter to train")
        return [Selection("logit", named_params(model, logit))]


@hookimpl
def clipft_register_strategies(register):
    register(StrategySpec(
        name="logit-scale",
        summary="Train only the logit scale (temperature), and logit_bias when present.",
        options=LogitScaleOptions,
        build=lambda opts: LogitScale(),
        # one scalar in log space: a head-sized rate moves it within a few hundred steps
        default_lr=1e-3,
    ))
