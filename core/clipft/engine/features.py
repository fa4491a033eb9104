"""Where embeddings come from during training and evaluation.

The plain provider computes everything live. A caching provider (frozen towers)
can replace it without the training loop changing.
"""
from __future__ import annotations

import torch

from clipft.engine.forward import class_text_features, encode_images, encode_texts


class LiveFeatures:
    """Computes every embedding from the model, every time."""

    name = "live"

    def __init__(self):
        self.stats: dict = {}

    def train_batch(self, run, batch, need_text: bool):
        images = batch["images"].to(run.device, non_blocking=True)
        img = encode_images(run.model, images)
        txt = None
        if need_text:
            tokens = run.tokenizer(batch["captions"]).to(run.device, non_blocking=True)
            txt = encode_texts(run.model, tokens)
        return img, txt

    @torch.no_grad()
    def val_image_features(self, run):
        feats, labels, captions = [], [], []
        for batch in run.loader(run.bundle.val, train=False):
            if batch is None:
                continue
            with run.autocast():
                feats.append(encode_images(run.model, batch["images"].to(run.device)).float())
            labels.append(batch["labels"])
            captions.extend(batch["captions"])
        if not feats:
            return torch.empty(0), torch.empty(0, dtype=torch.long), []
        return torch.cat(feats), torch.cat(labels).to(run.device), captions

    @torch.no_grad()
    def class_features(self, run):
        with run.autocast():
            return run.class_text_features().float()

    @torch.no_grad()
    def caption_features(self, run, captions):
        uniq = list(dict.fromkeys(captions))
        out = []
        for i in range(0, len(uniq), 256):
            with run.autocast():
                out.append(encode_texts(run.model, run.tokenizer(uniq[i:i + 256]).to(run.device)).float())
        return torch.cat(out)
