"""Evaluation on the val split: zero-shot top-1, head top-1, caption recall@k."""
from __future__ import annotations

import torch

from clipft.engine.forward import class_text_features


@torch.no_grad()
def evaluate(run) -> dict:
    """``run`` is a :class:`clipft.engine.runner.PreparedRun`."""
    model, bundle = run.model, run.bundle
    was_training = model.training
    model.eval()
    if run.head is not None:
        run.head.eval()
    try:
        feats, labels, captions = run.features.val_image_features(run)
        metrics: dict[str, float] = {}
        if len(labels) == 0:
            return metrics
        if bundle.classnames:
            cls = run.features.class_features(run)
            pred = (feats @ cls.t()).argmax(dim=-1)
            metrics["top1"] = float((pred == labels).float().mean())
        if run.head is not None:
            with run.autocast():
                logits = run.head(feats)
            metrics["head_top1"] = float((logits.float().argmax(-1) == labels).float().mean())
        if bundle.has_captions:
            metrics.update(retrieval_metrics(feats, run.features.caption_features(run, captions), captions))
        return metrics
    finally:
        model.train(was_training)
        if run.head is not None:
            run.head.train(was_training)


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
