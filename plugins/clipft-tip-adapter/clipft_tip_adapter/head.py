"""Tip-Adapter's head module; imported by :func:`clipft_tip_adapter.build_tip_adapter`,
so that importing the plugin does not import torch."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import clipft
from clipft.errors import ClipftUsageError

from clipft_tip_adapter import ALPHA_GRID, BETA_GRID, TipAdapterOptions


class TipAdapterHead(clipft.FitsTrainFeatures, nn.Module):
    """Zero-shot logits plus the key-value cache's. Buffers ``clip_weights``
    ``[C, D]``, ``values`` ``[N, C]``, ``alpha``, ``beta``; parameter
    ``keys`` ``[N, D]`` (trainable with ``finetune``). Sized by the training
    split: built with ``N = 0`` and filled by :meth:`fit_train_features`
    (a run) or by loading a checkpoint or an export."""

    def __init__(self, clip_weights, opts: TipAdapterOptions):
        super().__init__()
        n_classes, dim = clip_weights.shape
        self.opts = opts
        self.register_buffer("clip_weights", clip_weights.detach().clone().float())
        self.keys = nn.Parameter(torch.zeros(0, dim, device=clip_weights.device),
                                 requires_grad=opts.finetune)
        self.register_buffer("values", torch.zeros(0, n_classes, device=clip_weights.device))
        self.register_buffer("alpha", torch.tensor(float(opts.alpha), device=clip_weights.device))
        self.register_buffer("beta", torch.tensor(float(opts.beta), device=clip_weights.device))
        self.scale = float(opts.scale)

    def zero_shot_logits(self, f):
        return self.scale * (f @ self.clip_weights.t().to(f.dtype))

    def cache_logits(self, f, beta=None):
        beta = self.beta if beta is None else beta
        affinity = f @ self.keys.t().to(f.dtype)                       # [B, N] cosines
        return torch.exp(-beta * (1.0 - affinity)) @ self.values.to(affinity.dtype)

    def forward(self, f):
        return self.zero_shot_logits(f) + self.alpha * self.cache_logits(f)

    def extra_repr(self) -> str:
        return (f"keys={tuple(self.keys.shape)}, classes={self.clip_weights.shape[0]}, "
                f"alpha={float(self.alpha):g}, beta={float(self.beta):g}, finetune={self.opts.finetune}")

    # -- clipft.FitsTrainFeatures ------------------------------------------------
    def fit_train_features(self, data) -> dict:
        n_classes = self.clip_weights.shape[0]
        labels = data.labels
        if len(labels) == 0 or bool((labels < 0).any()) or bool((labels >= n_classes).any()):
            raise ClipftUsageError(
                "head 'tip-adapter' caches the training images with their classes, so every training "
                f"image needs a class among the head's {n_classes}; this data has unlabelled images")
        device = self.clip_weights.device
        self.keys.data = data.features.detach().to(device, torch.float32).clone()
        self.values = F.one_hot(labels.to(device), n_classes).float()
        counts = torch.bincount(labels.cpu(), minlength=n_classes)
        record = {
            "cache": {"keys": int(self.keys.shape[0]), "dim": int(self.keys.shape[1]),
                      "classes": n_classes, "shots_min": int(counts.min()), "shots_max": int(counts.max())},
            "finetune": bool(self.opts.finetune),
            "alpha": float(self.alpha), "beta": float(self.beta),
        }
        if self.opts.tune:
            record["tuned"] = self._tune(*data.val_features())
            record["alpha"], record["beta"] = record["tuned"]["alpha"], record["tuned"]["beta"]
        return record

    def _tune(self, feats, labels) -> dict:
        """Grid search of (alpha, beta) for val top-1, as the paper does."""
        if len(labels) == 0 or bool((labels < 0).any()):
            raise ClipftUsageError("tip-adapter:tune=true searches alpha and beta on the val split, "
                                   "which needs a class for every val image")
        feats = feats.to(self.clip_weights.device, torch.float32)
        labels = labels.to(feats.device)
        zs = self.zero_shot_logits(feats)
        alphas = torch.tensor(ALPHA_GRID, device=feats.device)
        best = (-1.0, None, None)
        for beta in BETA_GRID:
            cache = self.cache_logits(feats, torch.tensor(beta, device=feats.device))
            logits = zs.unsqueeze(0) + alphas[:, None, None] * cache.unsqueeze(0)   # [A, Nv, C]
            acc = (logits.argmax(-1) == labels).float().mean(-1)                   # [A]
            i = int(acc.argmax())
            if float(acc[i]) > best[0]:   # first best in grid order: smallest beta, then alpha
                best = (float(acc[i]), ALPHA_GRID[i], beta)
        with torch.no_grad():
            at_options = float((self.forward(feats).argmax(-1) == labels).float().mean())
            self.alpha.fill_(best[1])
            self.beta.fill_(best[2])
        return {
            "on": "val",
            "alpha": best[1], "beta": best[2], "val_top1": best[0],
            "val_top1_with_options": at_options,
            "options": {"alpha": self.opts.alpha, "beta": self.opts.beta},
            "grid": {"alpha": list(ALPHA_GRID), "beta": list(BETA_GRID)},
            "note": ("alpha and beta were chosen on the val split that this run's eval.before and "
                     "eval.after head_top1 are measured on, so those are optimistic; measure on "
                     "held-out data (clipft eval RUN --data ...)"),
        }

    # -- a checkpoint or an export sized by another training split ------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        keys, values = state_dict.get(prefix + "keys"), state_dict.get(prefix + "values")
        if keys is not None and tuple(keys.shape) != tuple(self.keys.shape):
            # the same Parameter object, resized: an optimizer built already holds it
            self.keys.data = torch.empty(keys.shape, dtype=self.keys.dtype, device=self.keys.device)
        if values is not None and tuple(values.shape) != tuple(self.values.shape):
            self.values = torch.empty(values.shape, dtype=self.values.dtype, device=self.values.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
