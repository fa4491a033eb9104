"""The context object strategies and heads receive while a run is assembled."""
from __future__ import annotations

from typing import Optional

import attrs
import torch


@attrs.define
class BuildContext:
    model: torch.nn.Module
    model_name: str
    tokenizer: object
    device: torch.device
    config: object
    classnames: Optional[list] = None
    templates: tuple = ("a photo of a {}.",)
    seed: int = 0

    @property
    def embed_dim(self) -> int:
        return infer_embed_dim(self.model)

    def tokenize(self, texts):
        return self.tokenizer(list(texts)).to(self.device)

    def class_text_features(self, model: Optional[torch.nn.Module] = None) -> torch.Tensor:
        """Normalised class embeddings ``[C, D]``: mean over templates, as in
        CLIP's zero-shot classifier. Grad flows when called under grad."""
        from clipft.engine.forward import class_text_features
        return class_text_features(model or self.model, self.tokenizer, self.classnames,
                                   self.templates, self.device)


def infer_embed_dim(model: torch.nn.Module) -> int:
    """Output dimension of the shared embedding space (reads the live model, so it
    follows a replaced projection)."""
    visual = model.visual
    proj = getattr(visual, "proj", None)
    if isinstance(proj, torch.nn.Parameter):
        return int(proj.shape[1])
    if isinstance(proj, torch.nn.Linear):
        return int(proj.out_features)
    attnpool = getattr(visual, "attnpool", None)
    if attnpool is not None:
        return int(attnpool.c_proj.out_features)
    head = getattr(visual, "head", None)
    if head is not None and isinstance(getattr(head, "proj", None), torch.nn.Linear):
        return int(head.proj.out_features)
    # towers whose projection is a trunk classifier (timm configs without a
    # head projection): ask the model itself with one blank image
    size = getattr(visual, "image_size", 224)
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    p = next(model.parameters())
    was_training = model.training
    model.eval()  # no BatchNorm statistics update from the probe
    try:
        with torch.no_grad():
            out = model.encode_image(torch.zeros(1, 3, *size, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
    return int(out.shape[-1])
