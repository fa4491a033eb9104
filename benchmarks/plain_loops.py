"""The baselines clipft is measured against: plain training loops written the
way the seed guide's Step 9 writes them (``model.encode_image`` every step,
then loss, ``zero_grad``, ``backward``, ``step``), with nothing cached and
nothing skipped.

Each baseline is an object whose ``step()`` runs one iteration of its loop
(fetching the batch included, as clipft's own step time does) and returns its
wall time, so a benchmark can interleave it step by step with clipft's loop
(see ``common.PairedClock``): both then see the same machine load.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common import now


def seed_contrastive_loss(image_features, text_features, logit_scale):
    """The seed's Step 8 loss: symmetric cross-entropy over the similarity matrix."""
    logits = logit_scale * image_features @ text_features.t()
    target = torch.arange(len(logits))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def epochs_of_batches(model, dataset, batch_size: int):
    """Batches epoch after epoch (a shuffled DataLoader per epoch, as Step 3);
    the model is put in train mode at each epoch start, as Step 9."""
    epoch = 0
    while True:
        model.train()
        g = torch.Generator().manual_seed(epoch)
        yield from torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=g,
                                               num_workers=0)
        epoch += 1


class SeedFullFinetune:
    """Strategy 1 (everything trains), Step 7 optimizer, Step 8 loss, Step 9 loop."""

    def __init__(self, model, tokenizer, dataset, batch_size: int, lr: float = 1e-5,
                 weight_decay: float = 0.01, autocast_dtype=None):
        for p in model.parameters():
            p.requires_grad = True
        self.model, self.tokenizer = model, tokenizer
        self.autocast_dtype = autocast_dtype
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                           lr=lr, weight_decay=weight_decay)
        self.batches = epochs_of_batches(model, dataset, batch_size)

    def step(self) -> float:
        t = now()
        model, optimizer = self.model, self.optimizer
        _, images, captions, _ = next(self.batches)
        with torch.autocast("cpu", dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            image_features = model.encode_image(images)
            text_features = model.encode_text(self.tokenizer(list(captions)))
            image_features = image_features / image_features.norm(dim=-1, keepdim=True)
            text_features = text_features / text_features.norm(dim=-1, keepdim=True)
            loss = seed_contrastive_loss(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()
        return now() - t


class SeedLinearProbe:
    """"Freeze + Classifier": the encoder is frozen, a linear classifier trains;
    the Step 9 loop re-encodes every image in every epoch."""

    def __init__(self, model, dataset, num_classes: int, embed_dim: int, batch_size: int, lr: float = 1e-3):
        for p in model.parameters():
            p.requires_grad = False
        self.model = model
        self.classifier = nn.Linear(embed_dim, num_classes)
        self.optimizer = torch.optim.AdamW(self.classifier.parameters(), lr=lr, weight_decay=0.01)
        self.batches = epochs_of_batches(model, dataset, batch_size)

    def step(self) -> float:
        t = now()
        _, images, _, labels = next(self.batches)
        image_features = self.model.encode_image(images)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        logits = self.classifier(image_features)
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        loss.item()
        return now() - t


class PlainPromptLearner(nn.Module):
    """CoOp written plainly: a learned context replaces the token embeddings of
    "a photo of a" in every class prompt; the text tower runs on the spliced
    embeddings (as CLIP.encode_text does) and pools at the end-of-text token."""

    def __init__(self, model, tokenizer, classnames, init: str = "a photo of a"):
        super().__init__()
        n_ctx = int((tokenizer([init])[0] > 0).sum()) - 2          # minus start/end tokens
        self.tokens = tokenizer([f"{init} {c}." for c in classnames])
        with torch.no_grad():
            emb = model.token_embedding(self.tokens)
        self.register_buffer("prefix", emb[:, :1].clone())
        self.register_buffer("suffix", emb[:, 1 + n_ctx:].clone())
        self.ctx = nn.Parameter(emb[0, 1:1 + n_ctx].clone())

    def forward(self, model):
        n = len(self.tokens)
        x = torch.cat([self.prefix, self.ctx.expand(n, -1, -1), self.suffix], dim=1)
        x = x + model.positional_embedding
        x = model.transformer(x, attn_mask=model.attn_mask)
        x = model.ln_final(x)
        x = x[torch.arange(n), self.tokens.argmax(dim=-1)] @ model.text_projection
        return F.normalize(x, dim=-1)


class PlainPromptTuning:
    """Prompt tuning that recomputes the (frozen) image features every step."""

    def __init__(self, model, tokenizer, dataset, classnames, batch_size: int, lr: float = 2e-3):
        for p in model.parameters():
            p.requires_grad = False
        self.model = model
        self.learner = PlainPromptLearner(model, tokenizer, classnames)
        self.optimizer = torch.optim.AdamW([self.learner.ctx], lr=lr, weight_decay=0.01)
        self.batches = epochs_of_batches(model, dataset, batch_size)

    def step(self) -> float:
        t = now()
        _, images, _, labels = next(self.batches)
        image_features = self.model.encode_image(images)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        logits = self.model.logit_scale.exp() * image_features @ self.learner(self.model).t()
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        loss.item()
        return now() - t
