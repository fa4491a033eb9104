"""Gaussian prompt aggregation (GPA): the module keeping the aggregate
(imports torch)."""
from __future__ import annotations

import math
import weakref

import torch
from torch import nn

from clipft import InsertedModule
from clipft.protocols import swap_in

from clipft_promptsrc import GPA_ATTR, GPA_MEAN_FRACTION, GPA_STD_FRACTION


def gpa_parameters(epochs: int, mean=None, std=None) -> tuple[float, float]:
    """``(mean, std)`` in 1-based epochs: as given, else scaled from the paper's
    15 and 1 of 20 epochs to ``epochs``."""
    return (GPA_MEAN_FRACTION * epochs if mean is None else float(mean),
            GPA_STD_FRACTION * epochs if std is None else float(std))


def gaussian(epoch: int, mean: float, std: float) -> float:
    """The N(mean, std^2) density at ``epoch``."""
    return math.exp(-0.5 * ((epoch - mean) / std) ** 2) / (std * math.sqrt(2.0 * math.pi))


def gpa_weights(epochs: int, mean=None, std=None) -> list[float]:
    """Each epoch's weight in the final aggregate (1-based epochs 1..epochs), summing to 1."""
    mean, std = gpa_parameters(epochs, mean, std)
    g = [gaussian(e, mean, std) for e in range(1, epochs + 1)]
    total = sum(g)
    return [x / total for x in g]


def buffer_name(param_name: str) -> str:
    return param_name.replace(".", ":")


class GaussianPromptAggregate(InsertedModule, nn.Module):
    """Buffers ``<parameter name, ':' for '.'>``: the running Gaussian-weighted
    mean of each prompt parameter over the epochs so far, and ``weight_sum``
    (float64), the sum of the weights so far. After epoch ``e`` with weight
    ``g = N(e; mean, std^2)``: ``weight_sum += g``, ``avg += (g / weight_sum) *
    (param - avg)``, so after the last epoch ``avg = sum_e g_e param_e / sum_e g_e``
    (a running mean: the tiny weights far from the mean never underflow a sum).
    Evaluation uses the aggregate once an epoch has ended; before, the live
    prompts."""

    enters = "none"          # no part in the forward pass
    folds_into_base = True   # export: the aggregate stays in the prompts, the module goes

    def __init__(self, model: nn.Module, names: list, mean=None, std=None):
        super().__init__()
        self.names, self.mean, self.std = list(names), mean, std
        self._owner = weakref.ref(model)   # not a submodule: no cycle in the module tree
        self._params = None
        params = dict(model.named_parameters())
        for n in self.names:
            self.register_buffer(buffer_name(n), params[n].detach().clone())
        self.register_buffer("weight_sum", torch.zeros((), dtype=torch.float64))

    def extra_repr(self) -> str:
        return f"{len(self.names)} tensors, mean={self.mean or 'scaled'}, std={self.std or 'scaled'}"

    def _pairs(self):
        if self._params is None:
            params = dict(self._owner().named_parameters())
            self._params = [params[n] for n in self.names]
        return list(zip(self._params, (self._buffers[buffer_name(n)] for n in self.names)))

    @torch.no_grad()
    def after_epoch(self, epoch: int, epochs: int) -> None:
        mean, std = gpa_parameters(epochs, self.mean, self.std)
        g = gaussian(epoch, mean, std)
        total = float(self.weight_sum) + g
        if total <= 0.0:   # every weight so far underflowed: the latest prompts stand in
            ratio = 1.0
        else:
            ratio = g / total
        for param, avg in self._pairs():
            if ratio == 1.0:
                avg.copy_(param)
            else:
                avg.add_(param.detach() - avg, alpha=ratio)
        self.weight_sum.fill_(total)

    @property
    def aggregated(self) -> bool:
        return float(self.weight_sum) > 0.0

    @torch.no_grad()
    def use_eval_weights(self):
        if not self.aggregated:
            return None
        return swap_in(self._pairs())

    @torch.no_grad()
    def fold_into_base(self) -> None:
        """Leave the aggregate in the prompts and detach the module."""
        owner = self._owner()
        if self.aggregated:
            for param, avg in self._pairs():
                param.copy_(avg)
        if owner is not None and getattr(owner, GPA_ATTR, None) is self:
            delattr(owner, GPA_ATTR)
