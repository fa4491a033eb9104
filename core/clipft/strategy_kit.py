"""Reusable pieces for strategy plugins (each plugin stays its own distribution;
what two of them share lives here instead of being copied)."""
from __future__ import annotations

from clipft.protocols import Strategy
from clipft.specs import Selection


class FreezeOneTower(Strategy):
    """Train everything except one tower (seed Strategies 2 and 3).

    Parameters outside both towers (CoCa's text decoder) train too. Options used:
    ``logit_scale`` (also train logit_scale / logit_bias) and ``keep_projection``
    (keep training the frozen tower's projection).
    """

    def __init__(self, frozen_side: str, opts):
        if frozen_side not in ("vision", "text"):
            raise ValueError(f"frozen_side must be vision or text, got {frozen_side!r}")
        self.side = frozen_side
        self.trained_side = "text" if frozen_side == "vision" else "vision"
        self.opts = opts

    def apply(self, model, ctx):
        from clipft.anatomy import describe, named_params

        a = describe(model)
        frozen, trained = a.tower(self.side), a.tower(self.trained_side)
        sels = [Selection(self.trained_side, named_params(model, trained.names))]
        if self.opts.keep_projection:
            proj = frozen.require_projection(ctx.model_name)
            sels.append(Selection(f"{self.side}.proj", named_params(model, proj)))
        if self.opts.logit_scale and a.logit:
            sels.append(Selection("logit", named_params(model, a.logit)))
        if a.other:
            sels.append(Selection("other", named_params(model, a.other)))
        return sels

    def keeps_frozen(self, model, ctx):
        from clipft.anatomy import describe

        tower = describe(model).tower(self.side)
        keep = set(tower.projection) if self.opts.keep_projection else set()
        return [n for n in tower.names if n not in keep]
