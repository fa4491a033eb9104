"""Strategy ``full``: every parameter of the model trains (seed Strategy 1)."""
import attrs

from clipft import Selection, Strategy, StrategySpec, hookimpl


@attrs.frozen
class FullOptions:
    pass


class Full(Strategy):
    def apply(self, model, ctx):
        return [Selection("full", list(model.named_parameters()))]


@hookimpl
def clipft_register_strategies(register):
    register(StrategySpec(
        name="full",
        summary="Train everything: both towers, projections and logit scale.",
        options=FullOptions,
        build=lambda opts: Full(),
        # small lr with warmup: large rates collapse pretrained CLIP (peer recipes)
        default_lr=1e-5,
    ))
