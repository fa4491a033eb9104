"""clipft strategy `example-name`: train only LayerNorm parameters (the affine weight and
bias of every LayerNorm) in one tower or both; everything else stays frozen.

The engine hands ``apply`` a fully frozen model and trains exactly the union of
the returned selections (see clipft.protocols.Strategy).
"""
from typing import Literal

import attrs

from clipft import ClipftUsageError, Selection, Strategy, StrategySpec, hookimpl

NAME = "example-name"


@attrs.frozen
class ExampleNameOptions:
    tower: Literal["vision", "text", "both"] = attrs.field(
        default="both", metadata={"help": "whose LayerNorms train: vision, text or both"})


def in_tower(module_name: str, tower: str) -> bool:
    """open_clip keeps the image tower under ``visual``; the rest is text."""
    is_vision = module_name == "visual" or module_name.startswith("visual.")
    return tower == "both" or (tower == "vision") == is_vision


class ExampleName(Strategy):
    def __init__(self, opts: ExampleNameOptions):
        self.opts = opts

    def apply(self, model, ctx):
        import torch

        params = [(f"{m_name}.{p_name}", p)
                  for m_name, module in model.named_modules()
                  if isinstance(module, torch.nn.LayerNorm) and in_tower(m_name, self.opts.tower)
                  for p_name, p in module.named_parameters(recurse=False)]
        if not params:
            raise ClipftUsageError(f"{ctx.model_name} has no LayerNorm in tower '{self.opts.tower}'")
        return [Selection("norms", params, weight_decay=False)]


@hookimpl
def clipft_register_strategies(register):
    register(StrategySpec(
        name=NAME,
        summary="Train only the LayerNorm parameters of one tower or both.",
        options=ExampleNameOptions,
        build=ExampleName,
        default_lr=1e-3,
    ))
