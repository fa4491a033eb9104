"""An example third-party plugin: a minimal BitFit-style strategy, ``bitfit-example``
(only bias terms train). It is a template to copy, not the method itself: the
real BitFit (Ben Zaken et al., 2022) is the built-in ``bitfit`` strategy
(``plugins/clipft-bitfit``), which this example must not clash with, so its
distribution, import package and strategy carry ``-example``.

This file is the whole plugin: an attrs options class, a clipft.Strategy subclass with
``apply(model, ctx) -> [Selection]``, and a hookimpl that registers its spec.
"""
from typing import Literal

import attrs

from clipft import Selection, Strategy, StrategySpec, hookimpl


@attrs.frozen
class BitFitOptions:
    tower: Literal["vision", "text", "both"] = attrs.field(
        default="both", metadata={"help": "which tower's biases train"})


def _in_tower(name: str, tower: str) -> bool:
    is_vision = name.startswith("visual.")
    return tower == "both" or (tower == "vision") == is_vision


class BitFit(Strategy):
    def __init__(self, opts: BitFitOptions):
        self.opts = opts

    def apply(self, model, ctx):
        biases = [(n, p) for n, p in model.named_parameters()
                  if n.endswith("bias") and _in_tower(n, self.opts.tower)]
        return [Selection("bias", biases, weight_decay=False)]


@hookimpl
def clipft_register_strategies(register):
    register(StrategySpec(
        name="bitfit-example",
        summary="Example plugin: train only the bias terms (see strategy bitfit for the real one).",
        options=BitFitOptions,
        build=BitFit,
        default_lr=1e-3,
    ))
