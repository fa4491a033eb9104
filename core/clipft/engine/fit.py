"""Fitting components to the training split before training
(:class:`clipft.protocols.FitsTrainFeatures`, e.g. Tip-Adapter's cache).

One pass over the train split through the run's features provider (so a frozen
image tower is encoded once, into the cache the epochs replay), then each
fitter's ``fit_train_features`` under no-grad. What they return goes to
``summary.json`` under ``fit``.
"""
from __future__ import annotations

import torch

from clipft.context import TrainFeatures
from clipft.errors import ClipftError
from clipft.protocols import FitsTrainFeatures, inserted_modules


def fitters(model, head) -> list:
    """``[(name, component)]``: the head (``"head"``) and the inserted modules
    (by qualified name) that fit themselves to the training features."""
    out = [(name, m) for name, m in inserted_modules(model) if isinstance(m, FitsTrainFeatures)]
    if isinstance(head, FitsTrainFeatures):
        out.append(("head", head))
    return out


def fit_to_train_split(model, head, features, classnames) -> dict:
    """Fit every fitter of ``model`` and ``head``; returns ``{name: record}``."""
    found = fitters(model, head)
    if not found:
        return {}
    feats, labels = features.train_split_features()
    if len(feats) == 0:
        raise ClipftError("no image of the train split could be decoded; nothing to fit to")

    def val():
        # as the evaluation computes them (it fills the val cache the same way)
        was = model.training
        model.eval()
        try:
            f, y, _ = features.val_image_features()
        finally:
            model.train(was)
        return f, y

    data = TrainFeatures(feats, labels, list(classnames) if classnames else None, val)
    records = {}
    with torch.no_grad():
        for name, component in found:
            record = component.fit_train_features(data)
            records[name] = dict(record) if record else {}
    return records
