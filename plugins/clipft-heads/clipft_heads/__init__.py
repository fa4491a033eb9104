"""Heads: ``linear`` (random init), ``zero-shot`` (text-embedding init) and
``text`` (the live text encoder over class prompts)."""
from typing import Optional

import attrs

from clipft import HeadSpec, hookimpl


@attrs.frozen
class LinearOptions:
    bias: bool = attrs.field(default=True, metadata={"help": "learn a per-class bias"})


@attrs.frozen
class ZeroShotOptions:
    scale: Optional[float] = attrs.field(default=None, metadata={"help": (
        "fixed logit scale; default: the model's exp(logit_scale), capped at 100")})
    bias: bool = attrs.field(default=True, metadata={"help": "learn a per-class bias (starts at 0)"})


@attrs.frozen
class TextOptions:
    scale: Optional[float] = attrs.field(default=None, metadata={"help": (
        "fixed logit scale; default: the model's live exp(logit_scale), so that "
        "--strategy logit-scale trains it")})


def build_text(opts: TextOptions, ctx):
    from clipft_heads.modules import TextHead
    return TextHead(ctx.model, ctx.tokenizer, ctx.classnames, ctx.templates, ctx.device, opts.scale)


def build_linear(opts: LinearOptions, ctx):
    from torch import nn
    return nn.Linear(ctx.embed_dim, len(ctx.classnames), bias=opts.bias)


def build_zero_shot(opts: ZeroShotOptions, ctx):
    import torch

    from clipft_heads.modules import ScaledLinear

    was = ctx.model.training
    ctx.model.eval()
    with torch.no_grad():
        weight = ctx.class_text_features().float()
    ctx.model.train(was)
    scale = opts.scale if opts.scale is not None else min(100.0, float(ctx.model.logit_scale.detach().exp()))
    return ScaledLinear(weight, opts.bias, scale)


@hookimpl
def clipft_register_heads(register):
    register(HeadSpec(
        name="linear",
        summary="Randomly initialised linear classifier on normalised image embeddings.",
        options=LinearOptions, build=build_linear, needs_classes=True, encodes_text=False))
    register(HeadSpec(
        name="zero-shot",
        summary="Classifier initialised from class-prompt text embeddings (WiSE-FT/FLYP); "
                "starts at zero-shot accuracy.",
        options=ZeroShotOptions, build=build_zero_shot, needs_classes=True,
        zero_shot_init=True, encodes_text=False))
    register(HeadSpec(
        name="text",
        summary="Classifies against the live text encoder over class prompts (no weights of its "
                "own); what prompt tuning and text-side adapters train through.",
        options=TextOptions, build=build_text, needs_classes=True, encodes_text=True))
