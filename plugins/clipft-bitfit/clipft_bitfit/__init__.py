"""Strategy ``bitfit``: BitFit (Ben Zaken, Ravfogel and Goldberg, ACL 2022).

Every weight matrix stays frozen and only the additive bias terms train, as the
paper does for BERT: the packed q/k/v ``attn.in_proj_bias`` (all of it: it *is*
the paper's three bias vectors side by side), ``out_proj``, the MLP's, and unless
``norms=false`` the norms' ``beta`` (their gains stay frozen). A bias is a
parameter whose own name is ``bias`` or ends in ``_bias``, in the chosen tower(s);
``logit_bias`` (SigLIP) is the loss's offset, in neither tower (``--strategy
logit-scale`` trains it). Weight decay is off for every bias.
"""
from __future__ import annotations

from typing import Literal

import attrs

from clipft import Selection, Strategy, StrategySpec, hookimpl


@attrs.frozen
class BitFitOptions:
    tower: Literal["both", "vision", "text"] = attrs.field(default="both", metadata={
        "help": "the tower(s) whose bias terms train"})
    norms: bool = attrs.field(default=True, metadata={"help": (
        "also train the additive bias (beta) of LayerNorm/BatchNorm layers, as the paper does; "
        "false: only the biases of linear, convolution and attention projections")})


def is_bias_name(name: str) -> bool:
    """A parameter whose own name (after the last dot) is ``bias`` or ends in ``_bias``."""
    leaf = name.rpartition(".")[2]
    return leaf == "bias" or leaf.endswith("_bias")


def _norm_biases(model) -> set:
    from torch import nn
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
    out = set()
    for mname, module in model.named_modules():
        if isinstance(module, norms) or type(module).__name__.endswith(("LayerNorm", "RMSNorm")):
            for pname, _ in module.named_parameters(recurse=False):
                out.add(f"{mname}.{pname}" if mname else pname)
    return out


def bias_names(model, tower: str, norms: bool = True) -> list:
    """Names of the bias terms BitFit trains in ``tower`` (vision, text or both)."""
    from clipft.anatomy import describe

    names = [n for t in describe(model).towers(tower) for n in t.names if is_bias_name(n)]
    if not norms:
        skip = _norm_biases(model)
        names = [n for n in names if n not in skip]
    return names


class BitFit(Strategy):
    def __init__(self, opts: BitFitOptions):
        self.opts = opts

    def apply(self, model, ctx):
        from clipft.anatomy import named_params
        from clipft.errors import ClipftUsageError

        names = bias_names(model, self.opts.tower, self.opts.norms)
        if not names:
            which = f"the {self.opts.tower} tower" if self.opts.tower != "both" else "either tower"
            raise ClipftUsageError(f"bitfit: {ctx.model_name if ctx else 'the model'} has no bias terms in "
                                   f"{which}{' outside its norms' if not self.opts.norms else ''}")
        return [Selection("bias", named_params(model, names), weight_decay=False)]


@hookimpl
def clipft_register_strategies(register):
    register(StrategySpec(
        name="bitfit",
        summary="BitFit: only the bias terms train (attention, MLP and LayerNorm biases) in the chosen towers.",
        options=BitFitOptions,
        build=BitFit,
        # the paper's range for BERT is 1e-4..1e-3; a bias-only model is small and moves slowly
        default_lr=1e-3,
    ))
