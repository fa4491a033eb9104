"""BitFit as a clipft strategy: only bias terms train (Ben Zaken et al., 2021).

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
        name="bitfit",
        summary="Train only the bias terms (BitFit).",
        options=BitFitOptions,
        build=BitFit,
        default_lr=1e-3,
    ))
