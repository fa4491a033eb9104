"""Strategy ``last-n`` (seed Strategy 5): the last ``n`` depth units of a tower
train, together with what follows them (the final norm, poolers) and, by
default, the tower's projection. What a depth unit is depends on the tower
(:mod:`clipft.anatomy`: a block, a ResNet stage, a timm parameter group).
"""
from typing import Literal

import attrs

from clipft import Selection, Strategy, StrategySpec, hookimpl


def _at_least_one(inst, attribute, value):
    if value < 1:
        raise ValueError(f"n must be at least 1, got {value} (to train only the projections, "
                         "use --strategy projections)")


@attrs.frozen
class LastNOptions:
    n: int = attrs.field(default=2, validator=_at_least_one, metadata={
        "help": "how many of the tower's last blocks train (ResNet: stages; timm: parameter groups)"})
    tower: Literal["vision", "text", "both"] = attrs.field(default="both", metadata={
        "help": "which tower: vision, text or both"})
    projection: bool = attrs.field(default=True, metadata={
        "help": "also train the tower's projection into the embedding space"})


class LastN(Strategy):
    def __init__(self, opts: LastNOptions):
        self.opts = opts

    def apply(self, model, ctx):
        from clipft.anatomy import describe, named_params
        towers = describe(model).towers(self.opts.tower)
        picked = [(t, t.last_blocks(self.opts.n)) for t in towers]  # all depth checks first
        sels = []
        for tower, blocks in picked:
            sels.append(Selection(f"{tower.side}.last{self.opts.n}",
                                  named_params(model, blocks + tower.final)))
            if self.opts.projection and tower.projection:
                sels.append(Selection(f"{tower.side}.proj", named_params(model, tower.projection)))
        return sels


@hookimpl
def clipft_register_strategies(register):
    register(StrategySpec(
        name="last-n",
        summary="Train the last n blocks of the image and/or text tower, the final norm and the projection.",
        options=LastNOptions,
        build=LastN,
        # the top blocks of a pretrained tower: a few times full fine-tuning's 1e-5
        # (layer-wise decay schemes give the top blocks the highest rates)
        default_lr=5e-5,
    ))
