"""Evaluation metrics on tensors: accuracy, per-class and balanced accuracy,
expected calibration error with its reliability bins, retrieval recall@k.

Pure functions of scores and labels, so that ``clipft eval``, the run's own
evaluation and a plugin's tests compute them one way.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

#: equal-width confidence bins for ECE, as in Guo et al. 2017 (and most reports)
ECE_BINS = 15


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Share of rows whose label is among the ``k`` highest scores; ``k`` is
    capped at the number of classes."""
    if len(labels) == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    hit = (scores.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return float(hit.float().mean())


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, n_classes: int) -> list:
    """``[(n_samples, accuracy)]`` per class; accuracy is None for a class with
    no samples (it is left out of the balanced accuracy, not counted as 0).

    Counted in one pass over the predictions however many classes there are
    (rows whose label is not a class, e.g. -1, are not counted). Each accuracy
    is the float32 quotient of two counts: what the float32 mean of the
    class's 0/1 hits gives."""
    known = (labels >= 0) & (labels < n_classes)
    n = torch.bincount(labels[known].long(), minlength=n_classes).cpu()
    hits = torch.bincount(labels[pred == labels].long(), minlength=n_classes).cpu()
    acc = (hits.float() / n.float()).tolist()
    return [(int(k), a if k else None) for k, a in zip(n.tolist(), acc)]


def balanced_accuracy(per_class: Sequence) -> float:
    """Mean of the per-class accuracies over the classes that have samples."""
    accs = [a for _, a in per_class if a is not None]
    return sum(accs) / len(accs) if accs else float("nan")


def calibration(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> tuple[float, list]:
    """Expected calibration error and its reliability table.

    Each prediction falls in the bin of its confidence (the top probability),
    bins are ``(lo, hi]`` with the first one closed at 0. ECE is
    ``sum_b |B_b|/N * |accuracy(B_b) - confidence(B_b)|``. The table has one
    row per bin: ``lo``, ``hi``, ``count``, mean ``confidence`` and
    ``accuracy`` (None for an empty bin)."""
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).float()
    n = len(labels)
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    # bucketize with right=False puts v in bin i where edges[i-1] < v <= edges[i]
    which = torch.bucketize(conf.double(), edges[1:-1], right=False)
    ece, table = 0.0, []
    for b in range(bins):
        mask = which == b
        count = int(mask.sum())
        row = {"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": count,
               "confidence": None, "accuracy": None}
        if count:
            c, a = float(conf[mask].double().mean()), float(correct[mask].double().mean())
            row["confidence"], row["accuracy"] = c, a
            ece += count / n * abs(a - c)
        table.append(row)
    return (ece if n else float("nan")), table


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``[true, predicted]`` counts (rows whose label is not a class, e.g. -1
    for an unlabelled sample, are not counted)."""
    known = (labels >= 0) & (labels < n_classes)
    if not bool(known.all()):
        pred, labels = pred[known], labels[known]
    flat = labels.long() * n_classes + pred.long()
    return torch.bincount(flat, minlength=n_classes * n_classes).view(n_classes, n_classes)


def classification_metrics(scores: torch.Tensor, probs: Optional[torch.Tensor], labels: torch.Tensor,
                           n_classes: int, prefix: str = "", confusion: bool = True) -> tuple[dict, dict]:
    """The headline numbers (``top1``, ``top5`` when there are more than five
    classes, ``balanced_accuracy``, ``ece``) under ``prefix``, and the details
    (``per_class``, ``reliability``, ``confusion``). Top-1, the per-class
    accuracies and the confusion counts all follow the first highest score of
    each row. Without ``probs`` (None) there is no ``ece`` nor ``reliability``;
    ``confusion=False`` leaves out the ``[C, C]`` counts (large with many classes)."""
    pred = scores.argmax(dim=1)
    pc = per_class_accuracy(pred, labels, n_classes)
    top1 = float((pred == labels).float().mean()) if len(labels) else float("nan")
    head = {f"{prefix}top1": top1}
    if n_classes > 5:
        head[f"{prefix}top5"] = topk_accuracy(scores, labels, 5)
    head[f"{prefix}balanced_accuracy"] = balanced_accuracy(pc)
    # how many predictions went to each class: a run collapsed onto one class shows here
    details = {"per_class": pc, "predicted": torch.bincount(pred, minlength=n_classes).tolist()}
    if probs is not None:
        head[f"{prefix}ece"], details["reliability"] = calibration(probs, labels)
    if confusion:
        details["confusion"] = confusion_matrix(pred, labels, n_classes)
    return head, details


def retrieval_metrics(img: torch.Tensor, txt_unique: torch.Tensor, captions: list[str],
                      ks=(1, 5)) -> dict:
    """Recall@k over a set of image-caption pairs. Identical captions are
    encoded once (``txt_unique`` follows their first appearance), so an image
    counts as retrieved when its own caption string is in the top k
    (image→text); text→image counts any image whose caption is that string.

    The directions have different query sets: one per image for image→text,
    one per *distinct* caption for text→image (``i2t_queries``,
    ``t2i_queries`` say how many). ``recall@k`` is the plain mean of the two
    directions' recalls, so with repeated captions it weighs each text query
    more than each image query; read the directions when that matters."""
    uniq = list(dict.fromkeys(captions))
    pos = {c: i for i, c in enumerate(uniq)}
    target = torch.tensor([pos[c] for c in captions], device=img.device)
    sim = img @ txt_unique.t()                       # [N_img, N_uniq]
    out = {}
    for k in ks:
        kk = min(k, sim.shape[1])
        i2t = (sim.topk(kk, dim=1).indices == target[:, None]).any(dim=1).float().mean()
        kk_t = min(k, sim.shape[0])
        top_imgs = sim.t().topk(kk_t, dim=1).indices  # [N_uniq, k]
        t2i = (target[top_imgs] == torch.arange(len(uniq), device=img.device)[:, None]).any(dim=1)
        t2i = t2i.float().mean()
        out[f"i2t_recall@{k}"] = float(i2t)
        out[f"t2i_recall@{k}"] = float(t2i)
        out[f"recall@{k}"] = float((i2t + t2i) / 2)
    out["i2t_queries"], out["t2i_queries"] = len(captions), len(uniq)
    return out
