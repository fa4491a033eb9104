"""Strategy ``projections`` (seed Strategy 4): only the projections into the
shared embedding space train (where they live: :mod:`clipft.anatomy`), plus the
logit scale (an option, on by default).
"""
from typing import Literal

import attrs

from clipft import Selection, Strategy, StrategySpec, hookimpl


@attrs.frozen
class ProjectionsOptions:
    logit_scale: bool = attrs.field(default=True, metadata={
        "help": "also train logit_scale (and logit_bias when the model has one)"})
    tower: Literal["vision", "text", "both"] = attrs.field(default="both", metadata={
        "help": "whose projection trains: vision, text or both"})


class Projections(Strategy):
    def __init__(self, opts: ProjectionsOptions):
        self.opts = opts

    def apply(self, model, ctx):
        from clipft.anatomy import describe, named_params
        a = describe(model)
        sels = []
        for tower in a.towers(self.opts.tower):
            names = tower.require_projection(ctx.model_name)
            sels.append(Selection(f"{tower.side}.proj", named_params(model, names)))
        if self.opts.logit_scale and a.logit:
            sels.append(Selection("logit", named_params(model, a.logit)))
        return sels


@hookimpl
def clipft_register_strategies(register):
    register(StrategySpec(
        name="projections",
        summary="Train only the image and text projections (and the logit scale).",
        options=ProjectionsOptions,
        build=Projections,
        # a few pretrained linear maps: the rate the seed gives projections (Strategy 8)
        default_lr=1e-4,
        # over random towers they learn slowly: on digits from random init, 3 epochs
        # reached top-1 0.12 at 1e-4, 0.20-0.27 at 1e-3, 0.24-0.37 at 2e-3 (none collapsed)
        default_lr_scratch=2e-3,
    ))
