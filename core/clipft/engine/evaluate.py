"""Evaluation on the val split: zero-shot top-1, head top-1, caption recall@k."""
from __future__ import annotations

import torch

from clipft.metrics import retrieval_metrics


class Evaluator:
    """Metrics on the val split, from a features provider (cached or live)."""

    def __init__(self, model, head, features, autocast, has_classes: bool, has_captions: bool):
        self.model, self.head, self.features, self.autocast = model, head, features, autocast
        self.has_classes, self.has_captions = has_classes, has_captions

    @torch.no_grad()
    def __call__(self) -> dict:
        from clipft.encode import shared_class_text
        from clipft.protocols import use_eval_weights

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

    def _metrics(self) -> dict:
        head = self.head
        feats, labels, captions = self.features.val_image_features()
        metrics: dict[str, float] = {}
        if len(labels) == 0:
            return metrics
        if self.has_classes:
            pred = self.features.class_scores(feats).argmax(dim=-1)
            metrics["top1"] = float((pred == labels).float().mean())
        if head is not None:
            with self.autocast():
                logits = head(feats)
            metrics["head_top1"] = float((logits.float().argmax(-1) == labels).float().mean())
        if self.has_captions:
            metrics.update(retrieval_metrics(feats, self.features.caption_features(captions), captions))
        return metrics
