"""Heads ``taskres`` and ``clap``: training-light probes that start from CLIP's
zero-shot classifier (the class-prompt embeddings) and learn on frozen image
features.

- ``taskres`` (Yu et al., CVPR 2023, "Task Residual for Tuning Vision-Language
  Models"): ``logits = s · f · norm(W0 + alpha·R)ᵀ``, ``W0`` frozen, the residual
  ``R`` (same shape, zero at the start) the only trained tensor.
- ``clap`` (Silva-Rodríguez et al., CVPR 2024, "A Closer Look at the Few-Shot
  Adaptation of Large Vision-Language Models"): a linear probe ``W`` initialised
  at ``W0``, ``logits = s · f · norm(W)ᵀ``, trained with cross-entropy plus the
  class-adaptive penalty ``mean_c lambda_c ‖w_c − w0_c‖²``; ``lambda_c`` starts
  at the zero-shot model's mean softmax probability of class ``c`` on the
  training images of class ``c`` (:class:`clipft.FitsTrainFeatures`) and stays
  there (``constraint=adaptive``) or follows the released code's
  augmented-Lagrangian update after every epoch (``constraint=alm``,
  :class:`clipft.UpdatesPerEpoch`).

``W0``'s rows point where the ``zero-shot`` head's do (the class prompts,
template-ensembled, at build time) and are as long as the text tower's raw
(unnormalised) template-mean embeddings: both papers build the base from the raw
text embeddings, and the residual's step size (TaskRes) and the penalty's
strength (CLAP) are calibrated against that length. ``s`` is the model's
``exp(logit_scale)``, capped at 100, as for ``zero-shot``.
"""
from __future__ import annotations

from typing import Optional

import attrs

from clipft import HeadSpec, hookimpl
from clipft.options import non_negative
#: TaskRes' Adam learning rate for 10 of the 11 few-shot datasets (2e-4 for ImageNet)
TASKRES_LR = 2e-3


def _positive_or_none(inst, attribute, value):
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value}")


@attrs.frozen
class TaskResOptions:
    alpha: float = attrs.field(default=0.5, validator=non_negative, metadata={"help": (
        "residual scale: the classifier is W0 + alpha * R (the paper's 0.5 for most datasets, "
        "1.0 for some; 0 is zero-shot CLIP)")})
    scale: Optional[float] = attrs.field(default=None, validator=_positive_or_none, metadata={"help": (
        "fixed logit scale; default: the model's exp(logit_scale), capped at 100")})


@attrs.frozen
class ClapOptions:
    constraint: str = attrs.field(default="adaptive", validator=attrs.validators.in_(
        ("adaptive", "alm", "balanced", "none")), metadata={"help": (
            "penalty multipliers: adaptive (CLAP: each class's zero-shot probability on its training "
            "images, fixed), alm (the same start, then an augmented-Lagrangian update at every "
            "epoch's end), balanced (1 for every class) or none (ZS-LP, the unconstrained probe)")})
    scale: Optional[float] = attrs.field(default=None, validator=_positive_or_none, metadata={"help": (
        "fixed logit scale; default: the model's exp(logit_scale), capped at 100")})


def logit_scale(model, fixed: Optional[float]) -> float:
    return fixed if fixed is not None else min(100.0, float(model.logit_scale.detach().exp()))


def zero_shot_base(ctx):
    """``W0`` ``[C, D]``: the zero-shot head's class directions, each as long as
    the raw template-mean text embedding of its class."""
    import torch

    from clipft import class_text_encoder
    from clipft.encode import text_embedding

    model = ctx.model
    was = model.training
    model.eval()
    with torch.no_grad():
        directions = ctx.class_text_features().float()
        encoder = class_text_encoder(model)
        if encoder is not None:
            raw = text_embedding(model, encoder(model, ctx.tokenizer, list(ctx.classnames), tuple(ctx.templates)))
        else:
            raw = torch.stack([
                text_embedding(model, model.encode_text(
                    ctx.tokenizer([t.format(c) for t in ctx.templates]).to(ctx.device))).float().mean(0)
                for c in ctx.classnames])
    model.train(was)
    return directions * raw.float().norm(dim=-1, keepdim=True).to(directions.device)


def build_taskres(opts: TaskResOptions, ctx):
    from clipft_probes.heads import TaskResHead
    return TaskResHead(zero_shot_base(ctx), opts.alpha, logit_scale(ctx.model, opts.scale))


def build_clap(opts: ClapOptions, ctx):
    from clipft_probes.heads import ClapHead
    return ClapHead(zero_shot_base(ctx), opts.constraint, logit_scale(ctx.model, opts.scale))


@hookimpl
def clipft_register_heads(register):
    register(HeadSpec(
        name="taskres",
        summary="TaskRes: the frozen zero-shot classifier plus alpha times a learned residual "
                "(zero at the start); train with --loss cross-entropy.",
        options=TaskResOptions, build=build_taskres, needs_classes=True,
        zero_shot_init=True, encodes_text=False, default_lr=TASKRES_LR))
    register(HeadSpec(
        name="clap",
        summary="CLAP: a zero-shot-initialised linear probe with a class-adaptive L2 penalty "
                "towards the zero-shot prototypes (no validation set); --loss cross-entropy.",
        options=ClapOptions, build=build_clap, needs_classes=True,
        zero_shot_init=True, encodes_text=False))
