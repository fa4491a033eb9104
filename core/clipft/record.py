"""``ForwardRecord``: what a loss receives for one batch."""
from __future__ import annotations

from typing import Any, Callable, Optional

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
    - ``logits`` (need ``head``): the head's class logits;
    - ``class_text_features`` (need ``class-text``): the class-prompt
      embeddings ``[C, D]`` of the run's classes (normalised, in class-index
      order) as this step's forward computed them, with their gradient: filled
      when the forward encodes the class prompts (the ``text`` head; the paired
      text of labelled images under a class-prompt encoder) or the loss needs
      ``class-text`` (then the engine encodes them once per step if the forward
      did not). None otherwise, and without class names. With a conditional
      class-prompt encoder (CoCoOp) the forward's prompts are per image, so the
      field holds its unconditioned prompts, and only under the need.

    A new field for a new loss is one attribute here plus where the engine's
    loop fills it (``core/clipft/engine/loop.py``, ``Trainer.record``).
    """

    image_features: Any
    text_features: Optional[Any] = None
    logit_scale: Optional[Any] = None
    logit_bias: Optional[Any] = None
    logits: Optional[Any] = None
    labels: Optional[Any] = None
    #: equal ids mark identical caption strings (e.g. class prompts of the same
    #: class), so a loss can treat them as positives; ids are a stable hash of
    #: the string, so they compare across the ranks of a distributed run too
    caption_ids: Optional[Any] = None
    #: data parallelism (``torchrun``): this process's rank and the number of
    #: processes; 0 and 1 in a one-process run
    rank: int = 0
    world_size: int = 1
    #: ``gather(tensor, with_grad=True) -> (all_ranks, start)``: the tensor of
    #: every rank concatenated along dim 0 in rank order, and the row where this
    #: rank's own rows start. ``with_grad`` keeps the gradient through every
    #: shard (open_clip's ``gather_with_grad``); without it only this rank's
    #: rows carry gradient. In a one-process run it returns ``(tensor, 0)``.
    gather: Optional[Callable] = None
    #: see the class docstring (last, so positional construction keeps its order)
    class_text_features: Optional[Any] = None
    #: ``[B, D]`` (normalised, no gradient): each image's embedding by the model
    #: without its inserted modules (every ``layer``/``hook`` module bypassed, no
    #: image-embedding adapter), in eval mode: the frozen pretrained model's
    #: features. Filled only when a strategy of the stage sets
    #: ``Strategy.frozen_image_features``; served from a cache keyed by sample
    #: (filled by one in-order pass over the train split) when the train split
    #: is indexable and not randomly augmented, computed per step otherwise.
    frozen_image_features: Optional[Any] = None

    def gathered(self, tensor, with_grad: bool = True):
        """``gather`` when there is one, else ``(tensor, 0)``."""
        if self.gather is None or self.world_size == 1:
            return tensor, 0
        return self.gather(tensor, with_grad)


def caption_ids(captions):
    """A stable 63-bit id per caption string (blake2b), equal for equal strings
    on every process."""
    import hashlib

    import torch
    return torch.tensor([int.from_bytes(hashlib.blake2b(c.encode("utf-8"), digest_size=8).digest(), "little")
                         >> 1 for c in captions], dtype=torch.long)
