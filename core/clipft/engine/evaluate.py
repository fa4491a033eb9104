"""Evaluation on the val split: zero-shot top-1, head top-1, caption recall@k."""
from __future__ import annotations

import torch


class Evaluator:
    """Metrics on the val split, from a features provider (cached or live)."""

    def __init__(self, model, head, features, autocast, has_classes: bool, has_captions: bool):
        self.model, self.head, self.features, self.autocast = model, head, features, autocast
        self.has_classes, self.has_captions = has_classes, has_captions

    @torch.no_grad()
    def __call__(self) -> dict:
        model, head = self.model, self.head
        was_training = model.training
        model.eval()
        if head is not None:
            head.eval()
        try:
            feats, labels, captions = self.features.val_image_features()
            metrics: dict[str, float] = {}
            if len(labels) == 0:
                return metrics
            if self.has_classes:
                cls = self.features.class_features()
                pred = (feats @ cls.t()).argmax(dim=-1)
                metrics["top1"] = float((pred == labels).float().mean())
            if head is not None:
                with self.autocast():
                    logits = head(feats)
                metrics["head_top1"] = float((logits.float().argmax(-1) == labels).float().mean())
            if self.has_captions:
                metrics.update(retrieval_metrics(feats, self.features.caption_features(captions), captions))
            return metrics
        finally:
            model.train(was_training)
            if head is not None:
                head.train(was_training)


def retrieval_metrics(img: torch.Tensor, txt_unique: torch.Tensor, captions: list[str],
                      ks=(1, 5)) -> dict:
    """Recall@k over the val set. Identical captions are encoded once, so an image
    counts as retrieved when its own caption string is in the top k (image→text);
    text→image counts any image whose caption is that string."""
    uniq = list(dict.fromkeys(captions))
    pos = {c: i for i, c in enumerate(uniq)}
    target = torch.tensor([pos[c] for c in captions])
    sim = img @ txt_unique.t()                       # [N_img, N_uniq]
    out = {}
    for k in ks:
        kk = min(k, sim.shape[1])
        i2t = (sim.topk(kk, dim=1).indices == target[:, None]).any(dim=1).float().mean()
        kk_t = min(k, sim.shape[0])
        top_imgs = sim.t().topk(kk_t, dim=1).indices  # [N_uniq, k]
        t2i = (target[top_imgs] == torch.arange(len(uniq))[:, None]).any(dim=1).float().mean()
        out[f"i2t_recall@{k}"] = float(i2t)
        out[f"t2i_recall@{k}"] = float(t2i)
        out[f"recall@{k}"] = float((i2t + t2i) / 2)
    return out
