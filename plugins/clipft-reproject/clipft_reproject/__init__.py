"""Strategy ``reproject`` (seed Step 6): replace the image and text projections
by freshly initialised ones with a new output dimension ``dim``; the new
projections train (how each kind of projection is replaced:
:func:`clipft.anatomy.replace_projection`). The generator is seeded from the run
seed, so a resumed run rebuilds the same shapes before its checkpoint is loaded.

``reproject`` changes the model, so list it *before* strategies that select
projections (``--strategy reproject:dim=256 --strategy last-n``); the other
order is an error.
"""
from __future__ import annotations

from typing import Optional

import attrs

from clipft import Selection, Strategy, StrategySpec, hookimpl


def _dim(inst, attribute, value):
    if value is None:
        raise ValueError("reproject needs the new embedding dimension: reproject:dim=N (e.g. dim=256)")
    if value < 1:
        raise ValueError(f"dim must be a positive integer, got {value}")


def _std(inst, attribute, value):
    if value is not None and not value > 0:
        raise ValueError(f"std must be > 0, got {value}")


@attrs.frozen
class ReprojectOptions:
    dim: Optional[int] = attrs.field(default=None, validator=_dim, metadata={
        "help": "output dimension of the new projections (the new embedding size); required"})
    std: Optional[float] = attrs.field(default=None, validator=_std, metadata={
        "help": "init std of the new weights (default: input width ** -0.5, as open_clip)"})


class Reproject(Strategy):
    def __init__(self, opts: ReprojectOptions):
        self.opts = opts

    def apply(self, model, ctx):
        import torch

        from clipft.anatomy import describe, named_params, replace_projection
        towers = describe(model).towers("both")
        for t in towers:  # check both before changing either
            t.require_projection(ctx.model_name)
        gen = torch.Generator().manual_seed(int(ctx.seed) * 7919 + 17)
        for t in towers:
            replace_projection(model, t, self.opts.dim, std=self.opts.std, generator=gen)
        return [Selection(f"{t.side}.proj", named_params(model, t.projection))
                for t in describe(model).towers("both")]


@hookimpl
def clipft_register_strategies(register):
    register(StrategySpec(
        name="reproject",
        summary="Replace both projections with fresh ones of a new output dimension (dim=N); they train.",
        options=ReprojectOptions,
        build=Reproject,
        # new layers from scratch on frozen features: a linear-probe rate
        default_lr=1e-3,
    ))
