"""Evaluation, one way for the run's own (before and after training) and for
``clipft eval``: image embeddings -> each classifier's scores ->
:func:`clipft.metrics.classification_metrics`, and caption embeddings ->
:func:`clipft.metrics.retrieval_metrics`.

Where the embeddings come from differs (the run's features provider, cached or
live; ``clipft eval``'s pass over a data split); what is computed from them does
not.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch

from clipft.encode import shared_class_text
from clipft.metrics import classification_metrics, retrieval_metrics
from clipft.protocols import use_eval_weights

#: what the run's evaluation reports of each classifier's metrics (summary.json's
#: eval.before/after); ``clipft eval`` reports them all
RUN_CLASSIFICATION_METRICS = ("top1",)
RUN_RECALL_KS = (1, 5)


def logit_scale(model) -> torch.Tensor:
    """exp(logit_scale), capped at 100 as CLIP trains it."""
    scale = getattr(model, "logit_scale", None)
    if scale is None:
        return torch.tensor(100.0)
    return scale.detach().float().exp().clamp(max=100.0)


class ZeroShot:
    """Cosine similarity to the class prompts ranks the classes; times the
    model's logit scale, it gives CLIP's logits (whose softmax are its
    probabilities)."""

    name, prefix = "zero-shot", ""

    def __init__(self, class_scores: Callable[[torch.Tensor], torch.Tensor], scale: Callable[[], torch.Tensor],
                 clip_logits: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        #: image features [N, D] -> cosine similarities [N, C]
        self.class_scores = class_scores
        # read when probabilities are asked for (a run's evaluation ranks only)
        self._scale = scale
        #: image features -> logits computed as open_clip does (scale * image @ text.T),
        #: when the class weights are fixed; else the scale times the scores
        self._clip_logits = clip_logits

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        return self.class_scores(feats)

    def logits(self, feats: torch.Tensor, scores: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``scores``: :meth:`scores` of ``feats``, when already computed."""
        if self._clip_logits is not None:
            return self._clip_logits(feats)
        scores = self.scores(feats) if scores is None else scores
        return self._scale().to(scores.device) * scores


class HeadScores:
    """The run's head; ``columns`` puts its outputs in the order of the data's
    classes (None: they are in that order)."""

    name, prefix = "head", "head_"

    def __init__(self, head, columns: Optional[torch.Tensor] = None, autocast=contextlib.nullcontext):
        self.head, self.columns, self.autocast = head, columns, autocast

    @staticmethod
    def columns_for(head_classes: Sequence[str], classnames: Sequence[str]) -> torch.Tensor:
        pos = {c: i for i, c in enumerate(head_classes)}
        return torch.tensor([pos[c] for c in classnames])

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.autocast():
            out = self.head(feats)
        out = out.float()
        return out if self.columns is None else out[:, self.columns.to(out.device)]

    def logits(self, feats: torch.Tensor, scores: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.scores(feats) if scores is None else scores


def evaluate_features(feats: torch.Tensor, labels: torch.Tensor, captions: list, classifiers: Sequence = (),
                      caption_features: Optional[Callable[[list], torch.Tensor]] = None,
                      ks: Sequence[int] = RUN_RECALL_KS, details: bool = True) -> tuple[dict, dict]:
    """Metrics of image embeddings ``feats`` (normalised, ``[N, D]``) with
    their ``labels`` and ``captions``: each classifier's
    :func:`~clipft.metrics.classification_metrics` under its prefix, then,
    given ``caption_features`` (distinct captions -> their features), caption
    recall@k. Returns the metrics and each classifier's details by name.
    ``details=False`` leaves out what takes more than the predictions: the
    probabilities (ECE, reliability) and the confusion counts."""
    metrics: dict = {}
    by_name: dict = {}
    for clf in classifiers:
        scores = clf.scores(feats)
        probs = clf.logits(feats, scores).softmax(dim=1) if details else None
        head, by_name[clf.name] = classification_metrics(scores, probs, labels, scores.shape[1], clf.prefix,
                                                         confusion=details)
        metrics.update(head)
    if caption_features is not None:
        metrics.update(retrieval_metrics(feats, caption_features(captions), captions, ks=ks))
    return metrics, by_name


class Evaluator:
    """The run's evaluation on the val split, from its features provider
    (cached or live): zero-shot top-1, head top-1, caption recall@1/5."""

    def __init__(self, model, head, features, autocast, has_classes: bool, has_captions: bool):
        self.model, self.head, self.features, self.autocast = model, head, features, autocast
        self.has_classes, self.has_captions = has_classes, has_captions
        #: {metric prefix: {"predicted": counts, "labels": counts}} of the latest
        #: evaluation, per class (what clipft.collapse checks)
        self.predictions: dict = {}

    @torch.no_grad()
    def __call__(self) -> dict:
        model, head = self.model, self.head
        was_training = model.training
        model.eval()
        if head is not None:
            head.eval()
        restore = use_eval_weights(model)   # an inserted module's evaluation weights (ema)
        # no weight changes in here: zero-shot top-1 and a text head share one class-prompt pass
        try:
            with shared_class_text():
                return self._metrics()
        finally:
            restore()
            model.train(was_training)
            if head is not None:
                head.train(was_training)

    def metric_names(self) -> list:
        """The metrics an evaluation reports (when the val split is not empty),
        known before any runs: what ``--keep-best``/``--early-stop`` are checked against."""
        prefixes = ([ZeroShot.prefix] if self.has_classes else []) + ([HeadScores.prefix] if self.head else [])
        names = [p + m for p in prefixes for m in RUN_CLASSIFICATION_METRICS]
        if self.has_captions:
            names += [f"{d}recall@{k}" for k in RUN_RECALL_KS for d in ("i2t_", "t2i_", "")]
        return names

    def classifiers(self) -> list:
        out = []
        if self.has_classes:
            out.append(ZeroShot(self.features.class_scores, lambda: logit_scale(self.model)))
        if self.head is not None:
            out.append(HeadScores(self.head, autocast=self.autocast))
        return out

    def _metrics(self) -> dict:
        feats, labels, captions = self.features.val_image_features()
        if len(labels) == 0:
            return {}
        classifiers = self.classifiers()
        metrics, details = evaluate_features(feats, labels, captions, classifiers,
                                             self.features.caption_features if self.has_captions else None,
                                             ks=RUN_RECALL_KS, details=False)
        self.predictions = {
            c.prefix: {"predicted": details[c.name]["predicted"],
                       "labels": torch.bincount(labels.cpu(), minlength=len(details[c.name]["predicted"])).tolist()}
            for c in classifiers}
        kept = {c.prefix + m for c in classifiers for m in RUN_CLASSIFICATION_METRICS}
        return {k: v for k, v in metrics.items() if k in kept or "recall@" in k or k.endswith("_queries")}
