"""Head ``tip-adapter``: Tip-Adapter (Zhang et al., 2022, arXiv:2207.09519).

A training-free classifier on top of frozen CLIP. Its cache holds the few-shot
training set as key-value pairs: keys ``K`` are the L2-normalised training
image embeddings ``[N, D]``, values ``V`` their one-hot labels ``[N, C]``. An
image embedding ``f`` gets the logits::

    logits = scale * f W^T  +  alpha * exp(-beta * (1 - f K^T)) V

``W`` is CLIP's zero-shot classifier (the class-prompt embeddings), ``scale``
is CLIP's logit scale of 100 (the paper's zero-shot logits are ``100 f W^T``;
``alpha`` and ``beta`` are calibrated against it), ``beta`` sharpens the
affinities and ``alpha`` weighs the cache against the zero-shot term.

The cache is filled before the first evaluation from the training split
(:class:`clipft.FitsTrainFeatures`): one pass, each image encoded once through
the frozen-tower cache. ``--epochs 0`` evaluates the training-free model;
``finetune=true`` is Tip-Adapter-F, whose keys train (cross-entropy through
the head) while the values and ``W`` stay fixed. ``tune=true`` searches alpha
and beta on the val split, as the paper does, and the summary says so.

Why a head and not a strategy: Tip-Adapter changes no embedding; it is a
classifier from image embeddings to class logits, which is what a clipft head is.
"""
from __future__ import annotations

import attrs

from clipft import HeadSpec, hookimpl
from clipft.options import non_negative, positive

#: the val-split search of ``tune=true``: beta (sharpness) and alpha (residual ratio)
BETA_GRID = tuple(round(0.5 * i, 2) for i in range(1, 25))                      # 0.5 .. 12
ALPHA_GRID = (0.0,) + tuple(round(0.05 * 10 ** (i / 8), 4) for i in range(25))   # 0, 0.05 .. 50


@attrs.frozen
class TipAdapterOptions:
    alpha: float = attrs.field(default=1.0, validator=non_negative, metadata={"help": (
        "residual ratio: weight of the cache's logits against the zero-shot ones (the paper's "
        "ImageNet value 1.0; 0 gives zero-shot CLIP exactly)")})
    beta: float = attrs.field(default=5.5, validator=non_negative, metadata={"help": (
        "sharpness of the key affinities, exp(-beta * (1 - cosine)) (the paper's ImageNet value 5.5)")})
    finetune: bool = attrs.field(default=False, metadata={"help": (
        "Tip-Adapter-F: train the cache keys (cross-entropy through the head); the values and the "
        "zero-shot classifier stay fixed")})
    tune: bool = attrs.field(default=False, metadata={"help": (
        "search alpha and beta on the val split before training, as the paper does (this makes the "
        "run's own val metrics optimistic; summary.json's fit.head says so)")})
    scale: float = attrs.field(default=100.0, validator=positive, metadata={"help": (
        "scale of the zero-shot logits (CLIP's 100, which alpha and beta are calibrated against)")})


def build_tip_adapter(opts: TipAdapterOptions, ctx):
    import torch

    from clipft_tip_adapter.head import TipAdapterHead

    model = ctx.model
    was = model.training
    model.eval()
    with torch.no_grad():
        # CLIP's zero-shot classifier: the class prompts (through a class-prompt
        # encoder when a strategy installed one), fixed at build time
        weights = ctx.class_text_features().float()
    model.train(was)
    return TipAdapterHead(weights, opts)


@hookimpl
def clipft_register_heads(register):
    register(HeadSpec(
        name="tip-adapter",
        summary="Tip-Adapter: zero-shot CLIP plus a key-value cache of the training features "
                "(training-free with --epochs 0; finetune=true trains the keys, Tip-Adapter-F).",
        options=TipAdapterOptions,
        build=build_tip_adapter,
        needs_classes=True,
        # its zero-shot weights are encoded once, at build time
        encodes_text=False,
    ))
