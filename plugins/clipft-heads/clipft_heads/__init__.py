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


@attrs.frozen
class TextOptions:
    scale: Optional[float] = attrs.field(default=None, metadata={"help": (
        "fixed logit scale; default: the model's live exp(logit_scale), so that "
        "--strategy logit-scale trains it")})


def _text_head(model, tokenizer, classnames, templates, device, scale):
    import torch
    from torch import nn

    from clipft.encode import class_scores, class_text_features

    class TextHead(nn.Module):
        """Logits against the *live* text encoder: every call encodes the class
        prompts through the current model (and its class-prompt encoder, when a
        strategy such as ``prompt`` installed one; a conditional one, such as
        ``cocoop``'s, prompts each image anew), so gradients reach the text
        side. The model is referenced, not owned: the head has no parameters of
        its own and its state dict is empty."""

        def __init__(self):
            super().__init__()
            self.__dict__["_clip"] = model  # not a submodule: not in parameters()/state_dict()
            self.classnames = list(classnames)
            self.templates = tuple(templates)
            self.fixed_scale = scale

        def class_features(self) -> torch.Tensor:
            return class_text_features(self._clip, tokenizer, self.classnames, self.templates, device)

        def forward(self, image_features):
            s = self.fixed_scale if self.fixed_scale is not None else self._clip.logit_scale.exp()
            if self.conditional:
                return s * class_scores(self._clip, tokenizer, self.classnames, self.templates, device,
                                        image_features)
            cls = self.class_features().to(image_features.dtype)
            return s * image_features @ cls.t()

        @property
        def conditional(self) -> bool:
            from clipft.protocols import conditional_class_text
            return conditional_class_text(self._clip)

        def extra_repr(self) -> str:
            return f"classes={len(self.classnames)}, scale={self.fixed_scale or 'model'}"

    return TextHead()


def build_text(opts: TextOptions, ctx):
    return _text_head(ctx.model, ctx.tokenizer, ctx.classnames, ctx.templates, ctx.device, opts.scale)


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
        options=ZeroShotOptions, build=build_zero_shot, needs_classes=True,
        zero_shot_init=True))
    register(HeadSpec(
        name="text",
        summary="Classifies against the live text encoder over class prompts (no weights of its "
                "own); what prompt tuning and text-side adapters train through.",
        options=TextOptions, build=build_text, needs_classes=True))
