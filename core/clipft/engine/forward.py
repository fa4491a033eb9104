"""The forward pass of one batch and the record a loss receives."""
from __future__ import annotations

from typing import Optional

import attrs
import torch
import torch.nn.functional as F


@attrs.define
class ForwardRecord:
    """What a loss sees. Features are L2-normalised; ``logit_scale`` is already
    exponentiated (as open_clip's ``ClipLoss`` expects)."""

    image_features: torch.Tensor
    text_features: Optional[torch.Tensor] = None
    logit_scale: Optional[torch.Tensor] = None
    logit_bias: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    #: equal ids mark identical caption strings within the batch (e.g. class
    #: prompts of the same class), so a loss can treat them as positives
    caption_ids: Optional[torch.Tensor] = None


def caption_ids(captions) -> torch.Tensor:
    seen: dict[str, int] = {}
    return torch.tensor([seen.setdefault(c, len(seen)) for c in captions], dtype=torch.long)


def logit_scale_of(model) -> torch.Tensor:
    return model.logit_scale.exp()


def logit_bias_of(model) -> Optional[torch.Tensor]:
    return getattr(model, "logit_bias", None)


def encode_images(model, images: torch.Tensor) -> torch.Tensor:
    return F.normalize(model.encode_image(images), dim=-1)


def encode_texts(model, tokens: torch.Tensor) -> torch.Tensor:
    return F.normalize(model.encode_text(tokens), dim=-1)


#: Attribute under which a strategy may install a class-prompt encoder on the
#: model (prompt tuning installs its learned context there). Being a submodule,
#: it is saved, checkpointed and exported with the model. When present, class
#: names are encoded through it instead of through the fixed templates: by
#: zero-shot evaluation, by the heads, and for the paired text of labelled
#: training images. It is called as ``encoder(model, tokenizer, classnames,
#: templates)`` and returns unnormalised class embeddings ``[C, D]``.
CLASS_TEXT_ENCODER = "clipft_class_text"


def class_text_encoder(model):
    """The class-prompt encoder a strategy installed on ``model``, or None. A
    text side with one is *not* frozen, even when every text tower weight is."""
    return getattr(model, CLASS_TEXT_ENCODER, None)


def class_text_features(model, tokenizer, classnames, templates, device, batch: int = 256) -> torch.Tensor:
    """Zero-shot classifier weights ``[C, D]``: per class, the normalised mean of
    the normalised template embeddings (CLIP's prompt ensembling), or the
    normalised output of the model's class-prompt encoder when it has one."""
    encoder = class_text_encoder(model)
    if encoder is not None:
        return F.normalize(encoder(model, tokenizer, list(classnames), tuple(templates)), dim=-1)
    texts = [t.format(c) for c in classnames for t in templates]
    feats = []
    for i in range(0, len(texts), batch):
        feats.append(encode_texts(model, tokenizer(texts[i:i + batch]).to(device)))
    feats = torch.cat(feats).view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(feats, dim=-1)
