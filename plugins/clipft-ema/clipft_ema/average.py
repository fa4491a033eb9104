"""The module holding ``ema``'s averages; imported by :meth:`clipft_ema.Ema.modify`,
so that importing the plugin does not import torch."""
from __future__ import annotations

import weakref

import torch
from torch import nn

from clipft import InsertedModule
from clipft.protocols import swap_in

from clipft_ema import ATTR, EmaOptions, buffer_name


class ExponentialMovingAverage(InsertedModule, nn.Module):
    """Buffers ``<param name with ':' for '.'>``: the average of each trained parameter."""

    enters = "none"          # no part in the forward pass
    folds_into_base = True   # export: the averaged (or live) weights stay, the module goes

    def __init__(self, model: nn.Module, names: list, opts: EmaOptions):
        super().__init__()
        self.opts = opts
        self.names = list(names)
        self._owner = weakref.ref(model)   # not a submodule: no cycle in the module tree
        self._params = None
        params = dict(model.named_parameters())
        for n in self.names:
            self.register_buffer(buffer_name(n), params[n].detach().clone())

    def _pairs(self):
        if self._params is None:
            params = dict(self._owner().named_parameters())
            self._params = [params[n] for n in self.names]
        return list(zip(self._params, (self._buffers[buffer_name(n)] for n in self.names)))

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        for param, avg in self._pairs():
            if step <= self.opts.start_step:
                avg.copy_(param)
            else:
                avg.lerp_(param.detach(), 1.0 - self.opts.decay)

    @torch.no_grad()
    def use_eval_weights(self):
        if not self.opts.use_for_eval:
            return None
        return swap_in(self._pairs())

    @torch.no_grad()
    def fold_into_base(self) -> None:
        """Leave the averaged weights (``use_for_eval``; else the live ones)
        in the model and detach the module."""
        owner = self._owner()
        if self.opts.use_for_eval:
            for param, avg in self._pairs():
                param.copy_(avg)
        if owner is not None and getattr(owner, ATTR, None) is self:
            delattr(owner, ATTR)
