"""The heads' modules; imported by their ``build`` functions, so that importing
the plugin does not import torch."""
from __future__ import annotations

import torch
from torch import nn

from clipft.encode import class_scores, class_text_features


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


class TextHead(nn.Module):
    """Logits against the *live* text encoder: every call encodes the class
    prompts through the current model (and its class-prompt encoder, when a
    strategy such as ``prompt`` installed one; a conditional one, such as
    ``cocoop``'s, prompts each image anew), so gradients reach the text
    side. The model is referenced, not owned: the head has no parameters of
    its own and its state dict is empty."""

    def __init__(self, model, tokenizer, classnames, templates, device, scale):
        super().__init__()
        # plain attributes, never submodules: not in parameters()/state_dict()
        self.__dict__.update(_clip=model, _tokenizer=tokenizer, _device=device)
        self.classnames = list(classnames)
        self.templates = tuple(templates)
        self.fixed_scale = scale

    def class_features(self) -> torch.Tensor:
        return class_text_features(self._clip, self._tokenizer, self.classnames, self.templates, self._device)

    def forward(self, image_features):
        s = self.fixed_scale if self.fixed_scale is not None else self._clip.logit_scale.exp()
        if self.conditional:
            return s * class_scores(self._clip, self._tokenizer, self.classnames, self.templates,
                                    self._device, image_features)
        cls = self.class_features().to(image_features.dtype)
        return s * image_features @ cls.t()

    @property
    def conditional(self) -> bool:
        from clipft.protocols import conditional_class_text
        return conditional_class_text(self._clip)

    def extra_repr(self) -> str:
        return f"classes={len(self.classnames)}, scale={self.fixed_scale or 'model'}"
