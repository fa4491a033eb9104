"""``ForwardRecord``: what a loss receives for one batch."""
from __future__ import annotations

from typing import Any, Optional

import attrs


@attrs.define
class ForwardRecord:
    """Features are L2-normalised; ``logit_scale`` is already exponentiated (as
    open_clip's ``ClipLoss`` expects). A loss declares in ``LossSpec.needs``
    which optional fields it reads, and the engine checks before training that
    they will be there:

    - ``text_features`` (need ``text``): paired text of each image, its caption
      or, with labels and a class-prompt encoder, its class prompt;
    - ``labels`` (need ``labels``): class indices, None for unlabelled data;
    - ``logits`` (need ``head``): the head's class logits.

    A new field for a new loss is one attribute here plus where the engine's
    loop fills it (``core/clipft/engine/loop.py``, ``Trainer.record``).
    """

    image_features: Any
    text_features: Optional[Any] = None
    logit_scale: Optional[Any] = None
    logit_bias: Optional[Any] = None
    logits: Optional[Any] = None
    labels: Optional[Any] = None
    #: equal ids mark identical caption strings within the batch (e.g. class
    #: prompts of the same class), so a loss can treat them as positives
    caption_ids: Optional[Any] = None


def caption_ids(captions):
    import torch
    seen: dict[str, int] = {}
    return torch.tensor([seen.setdefault(c, len(seen)) for c in captions], dtype=torch.long)
