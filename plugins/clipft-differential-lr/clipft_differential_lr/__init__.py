"""Strategy ``differential-lr`` (seed Strategy 8): learning-rate multipliers for
parts of what other strategies selected. It is a *modifier*: it changes rates
only and never chooses what trains, so it needs a selecting strategy next to it
(``--strategy last-n --strategy differential-lr:visual=0.1,proj=10``).

The rules apply in order, a later one winning where two match: towers, parts,
then the ``rates`` patterns; ``layer_decay`` then composes with them
(docs/strategies.md). A rule that matches no selected parameter is a usage
error (usually a typo), not a silent no-op.
"""
from __future__ import annotations

import math
import re
from typing import Optional

import attrs

from clipft import StrategyModifier, StrategySpec, hookimpl

_NAMED = ("visual", "text", "proj", "logit")


def _positive(inst, attribute, value):
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{attribute.name} must be a positive number, got {value} "
                         "(to freeze parameters, leave them out of the selecting strategies)")


def _decay(inst, attribute, value):
    if value is not None and not (0 < value <= 1):
        raise ValueError(f"layer_decay must be in (0, 1], got {value}")


def parse_rates(items) -> tuple:
    """``["pattern:mult", ...]`` (or one comma-separated string) to
    ``((pattern, mult), ...)``; the multiplier follows the last ':'."""
    if isinstance(items, str):
        items = [s for s in items.split(",") if s.strip()]
    out = []
    for item in items:
        if isinstance(item, (tuple, list)) and len(item) == 2:
            pattern, mult = item
        else:
            pattern, sep, mult = str(item).strip().rpartition(":")
            if not sep or not pattern:
                raise ValueError(f"rate {item!r} must look like PATTERN:MULTIPLIER, e.g. 'resblocks\\.3:0.5'")
        try:
            mult = float(mult)
        except ValueError:
            raise ValueError(f"rate {item!r}: multiplier {mult!r} is not a number") from None
        if not (mult > 0 and math.isfinite(mult)):
            raise ValueError(f"rate {item!r}: the multiplier must be a positive number")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"rate {item!r}: invalid regular expression: {exc}") from None
        out.append((str(pattern), mult))
    return tuple(out)


@attrs.frozen
class DifferentialLrOptions:
    visual: Optional[float] = attrs.field(default=None, validator=_positive, metadata={
        "help": "lr multiplier for the image tower"})
    text: Optional[float] = attrs.field(default=None, validator=_positive, metadata={
        "help": "lr multiplier for the text tower"})
    proj: Optional[float] = attrs.field(default=None, validator=_positive, metadata={
        "help": "lr multiplier for both projections (overrides visual/text there)"})
    logit: Optional[float] = attrs.field(default=None, validator=_positive, metadata={
        "help": "lr multiplier for logit_scale (and logit_bias)"})
    rates: list[str] = attrs.field(factory=list, metadata={
        "help": "PATTERN:MULT items: regex searched in parameter names; later items win "
                "(rates=resblocks\\.3:0.5,ln_final:2)"})
    layer_decay: Optional[float] = attrs.field(default=None, validator=_decay, metadata={
        "help": "layer-wise lr decay per block from the top of each tower (e.g. 0.75)"})

    def __attrs_post_init__(self):
        parse_rates(self.rates)
        if all(getattr(self, k) is None for k in _NAMED) and not self.rates and self.layer_decay is None:
            raise ValueError("give at least one multiplier (visual, text, proj, logit, rates) "
                             "or layer_decay, e.g. differential-lr:visual=0.1,proj=10")


def _fmt(x: float) -> str:
    return f"{x:.4g}"


class DifferentialLr(StrategyModifier):
    """A modifier: ``modify(selections, model, ctx)`` splits each selection by
    multiplier and scales its ``lr_scale``."""

    def __init__(self, opts: DifferentialLrOptions):
        self.opts = opts
        self.rates = parse_rates(opts.rates)

    def multipliers(self, model, selected: list) -> dict:
        """``{name: multiplier}`` for the selected parameter names."""
        from clipft.anatomy import describe, layer_positions
        from clipft.errors import ClipftUsageError

        a = describe(model)
        chosen = set(selected)
        factor = {n: 1.0 for n in selected}
        towers = [t for t in (a.vision, a.text) if t is not None]
        named = {
            "visual": a.vision.names if a.vision else (),
            "text": a.text.names if a.text else (),
            "proj": tuple(n for t in towers for n in t.projection),
            "logit": a.logit,
        }
        rules = [(k, named[k], getattr(self.opts, k)) for k in _NAMED if getattr(self.opts, k) is not None]
        rules += [(f"rates pattern {p!r}", tuple(n for n in selected if re.search(p, n)), m)
                  for p, m in self.rates]
        for label, names, mult in rules:
            hit = [n for n in names if n in chosen]
            if not hit:
                raise ClipftUsageError(
                    f"differential-lr: {label} matches none of the parameters selected to train "
                    f"({len(selected)} selected, e.g. {', '.join(selected[:3])}); "
                    "check the name or add a strategy that selects those parameters")
            for n in hit:
                factor[n] = mult
        if self.opts.layer_decay is not None:
            d = self.opts.layer_decay
            for t in towers:
                for n, (pos, top) in layer_positions(t).items():
                    if n in factor:
                        factor[n] *= d ** (top - pos)
        return factor

    def modify(self, selections, model, ctx):
        factor = self.multipliers(model, [n for s in selections for n, _ in s.params])
        out = []
        for sel in selections:
            parts: dict = {}
            for n, p in sel.params:
                parts.setdefault(factor[n], []).append((n, p))
            for f in sorted(parts, reverse=True):
                out.append(attrs.evolve(
                    sel, group=sel.group if f == 1.0 else f"{sel.group}*{_fmt(f)}",
                    params=parts[f], lr_scale=sel.lr_scale * f))
        return out


@hookimpl
def clipft_register_strategies(register):
    register(StrategySpec(
        name="differential-lr",
        summary="Rescale learning rates of selected parts (visual=0.1,proj=10) and/or decay them per block.",
        options=DifferentialLrOptions,
        build=DifferentialLr,
        default_lr=None,  # it changes rates only; the selecting strategy recommends the base lr
    ))
