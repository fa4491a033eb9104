"""What :func:`clipft.load` returns: a trained model (a run or an export) for
inference in your own code, computing what ``clipft predict`` computes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from clipft.commands import inference
from clipft.data import load_image, resolve_templates
from clipft.encode import encode_images, encode_texts
from clipft.errors import ClipftUsageError

#: images per forward pass; ``clipft predict``'s default ``--batch-size``, so
#: that the same images give the same floats
BATCH_SIZE = 64


class LoadedModel:
    """A run's or an export's model in eval mode, its gradients off.

    Images are given as a list of PIL images or file paths (str or
    ``pathlib.Path``; one image alone is a list of one), or as a tensor batch
    ``[N, 3, H, W]`` already through :attr:`preprocess`. Results are float32
    tensors on :attr:`device` (where the model is; ``device="auto"`` picks CUDA
    when there is one), one row per image or text, in order.

    Attributes: ``model`` (the ``torch.nn.Module``: strategies applied, inserted
    modules in place), ``head`` (the run's head, or None), ``classes`` (the class
    names :meth:`classify` scores, in column order; None when the model has none),
    ``templates``, ``preprocess`` (PIL image -> tensor, the val transform),
    ``tokenizer`` (texts -> tokens), ``device``, ``path`` and ``kind``
    (``"run"`` or ``"export"``).
    """

    model: torch.nn.Module
    head: Optional[torch.nn.Module]
    classes: Optional[list]
    templates: Optional[tuple]
    preprocess: object
    tokenizer: object
    device: torch.device
    path: Path
    kind: str

    def __init__(self, source, path: Path):
        self._source = source
        self._classifiers: dict = {}
        self.path = Path(path)
        self.kind = source.kind
        self.model = source.model
        self.head = source.head
        self.classes = list(source.classnames) if source.classnames else None
        self.templates = tuple(source.templates) if source.templates else None
        self.preprocess = source.preprocess
        self.tokenizer = source.tokenizer
        self.device = source.device

    def __repr__(self) -> str:
        classes = f"{len(self.classes)} classes" if self.classes else "no classes"
        return f"<clipft.load {self.kind} {str(self.path)!r}: {classes}, on {self.device}>"

    # -- inputs -------------------------------------------------------------------------
    def _batches(self, images, batch_size: int):
        """Preprocessed ``[B, 3, H, W]`` batches on the model's device."""
        if batch_size < 1:
            raise ClipftUsageError(f"batch_size {batch_size}: must be >= 1")
        if isinstance(images, torch.Tensor):
            if images.dim() == 3:
                images = images.unsqueeze(0)
            if images.dim() != 4:
                raise ClipftUsageError(f"a tensor of images is a batch [N, 3, H, W] (through .preprocess); "
                                       f"got shape {list(images.shape)}")
            if len(images) == 0:
                raise ClipftUsageError("no images given")
            for start in range(0, len(images), batch_size):
                yield images[start:start + batch_size].to(self.device)
            return
        items = [images] if _is_one_image(images) else list(images)
        if not items:
            raise ClipftUsageError("no images given")
        for start in range(0, len(items), batch_size):
            yield torch.stack([self.preprocess(_pil(x)) for x in items[start:start + batch_size]]).to(self.device)

    # -- what it computes -----------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, images, batch_size: int = BATCH_SIZE) -> torch.Tensor:
        """Normalised image embeddings ``[N, D]`` (an adapter on the image
        embedding applied, as in training and evaluation)."""
        return torch.cat([encode_images(self.model, b).float() for b in self._batches(images, batch_size)])

    @torch.no_grad()
    def encode_text(self, texts, batch_size: int = BATCH_SIZE) -> torch.Tensor:
        """Normalised text embeddings ``[N, D]`` of a string or a list of strings."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ClipftUsageError("encode_text takes a string or a non-empty list of strings")
        trim = inference.trims_text(self._source)
        return torch.cat([encode_texts(self.model, self.tokenizer(texts[i:i + batch_size]).to(self.device),
                                       trim=trim).float()
                          for i in range(0, len(texts), batch_size)])

    @torch.no_grad()
    def classify(self, images, labels: Optional[Sequence[str]] = None,
                 templates: Optional[Sequence[str]] = None, batch_size: int = BATCH_SIZE) -> torch.Tensor:
        """Class probabilities ``[N, C]`` (rows sum to 1), columns in the order
        of :attr:`classes`: through the run's head when it has one, else
        zero-shot over its class prompts (the learned ones, if it learned
        any), as ``clipft predict`` scores them. ``labels=[...]``: zero-shot
        over these labels instead (columns in their order), with ``templates``
        (default: the model's own). Embeddings of the class prompts are
        computed once per set of labels and templates."""
        clf = self._classifier(labels, templates)
        return torch.cat([clf.logits(encode_images(self.model, b).float()).softmax(dim=1)
                          for b in self._batches(images, batch_size)])

    def _classifier(self, labels, templates):
        labels = list(labels) if labels is not None else None
        if labels is not None and (not labels or len(set(labels)) != len(labels) or not all(labels)):
            raise ClipftUsageError(f"labels {labels!r}: give distinct, non-empty class names")
        if labels is None and not self.classes:
            raise ClipftUsageError(f"{self._source.description} has no class names: pass labels=[...] "
                                   "to classify zero-shot")
        tmpl = resolve_templates(templates) if templates is not None else None
        key = (tuple(labels) if labels else None, tmpl)
        if key not in self._classifiers:
            self._classifiers[key] = inference.classifier_for_predict(self._source, labels, tmpl)[0]
        return self._classifiers[key]


def _is_one_image(x) -> bool:
    return isinstance(x, (str, os.PathLike)) or hasattr(x, "convert")   # a path, or a PIL image


def _pil(x):
    """An RGB PIL image, decoded as ``clipft predict`` decodes files."""
    if hasattr(x, "convert"):
        return x if x.mode == "RGB" else x.convert("RGB")
    if not isinstance(x, (str, os.PathLike)):
        raise ClipftUsageError(f"an image is a PIL image or a file path; got {type(x).__name__}")
    path = Path(x)
    if not path.is_file():
        raise ClipftUsageError(f"{path}: no such file")
    img = load_image(path)
    if img is None:
        raise ClipftUsageError(f"{path}: cannot decode the image")
    return img
