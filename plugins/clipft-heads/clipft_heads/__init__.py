"""Heads: ``linear`` (random init) and ``zero-shot`` (text-embedding init)."""
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


def _modules():
    import torch
    from torch import nn

    class ScaledLinear(nn.Module):
        """``scale * x @ W.T + b``: a linear classifier on normalised features."""

        def __init__(self, weight, bias: bool, scale: float):
            super().__init__()
            self.weight = nn.Parameter(weight.clone())
            self.bias = nn.Parameter(torch.zeros(weight.shape[0])) if bias else None
            self.register_buffer("scale", torch.tensor(float(scale)))

        def forward(self, x):
            out = self.scale * (x @ self.weight.t().to(x.dtype))
            return out + self.bias.to(out.dtype) if self.bias is not None else out

    return torch, nn, ScaledLinear


def build_linear(opts: LinearOptions, ctx):
    torch, nn, _ = _modules()
    return nn.Linear(ctx.embed_dim, len(ctx.classnames), bias=opts.bias)


def build_zero_shot(opts: ZeroShotOptions, ctx):
    torch, nn, ScaledLinear = _modules()
    was = ctx.model.training
    ctx.model.eval()
    with torch.no_grad():
        weight = ctx.class_text_features().float()
    ctx.model.train(was)
    scale = opts.scale
    if scale is None:
        scale = min(100.0, float(ctx.model.logit_scale.detach().exp()))
    return ScaledLinear(weight, opts.bias, scale)


@hookimpl
def clipft_register_heads(register):
    register(HeadSpec(
        name="linear",
        summary="Randomly initialised linear classifier on normalised image embeddings.",
        options=LinearOptions, build=build_linear, needs_classes=True))
    register(HeadSpec(
        name="zero-shot",
        summary="Classifier initialised from class-prompt text embeddings (WiSE-FT/FLYP); "
                "starts at zero-shot accuracy.",
        options=ZeroShotOptions, build=build_zero_shot, needs_classes=True))
