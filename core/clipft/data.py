"""What a data source returns, and the shared pieces every source uses.

Datasets yield ``(index, image_tensor, caption, label)``: ``caption`` is the
paired text ("" when there is none), ``label`` the class index (-1 when the data
has no classes). ``index`` lets the engine cache per-sample embeddings of frozen
towers. A sample whose image fails to decode yields ``None``; the collate
function drops it and counts it.
"""
from __future__ import annotations

import threading
from typing import Callable, Optional, Sequence

import attrs

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_TEMPLATES = ("a photo of a {}.",)


@attrs.define
class DataContext:
    """Handed to ``DataSourceSpec.build(options, ctx)``."""

    transform_train: Callable
    transform_val: Callable
    seed: int
    #: True when ``transform_train`` has no random augmentation
    deterministic_train: bool = True


@attrs.define
class DataBundle:
    train: object
    val: object
    #: class names in label order; None for caption data without labels
    classnames: Optional[list] = None
    #: prompt templates with one "{}" for the class name
    templates: Sequence[str] = DEFAULT_TEMPLATES
    #: True when captions are real per-image text (enables recall@k)
    has_captions: bool = False
    #: files found unreadable while indexing the data (path, reason)
    skipped: list = attrs.field(factory=list)
    description: str = ""

    @property
    def has_labels(self) -> bool:
        return bool(self.classnames)


def class_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    return [[t.format(c) for t in templates] for c in classnames]


def load_image(path) -> Optional[object]:
    """Decode an image to RGB, or return None when it cannot be decoded."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Exception:
        return None


def check_image(path) -> Optional[str]:
    """Cheap validity check used while indexing: returns the reason it is bad."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.verify()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


class DecodeFailures:
    """Counts samples dropped at batch time (thread-safe; per process)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.count = 0

    def add(self, n: int) -> None:
        if n:
            with self._lock:
                self.count += n


def make_collate(failures: DecodeFailures):
    import torch

    def collate(items):
        good = [x for x in items if x is not None]
        failures.add(len(items) - len(good))
        if not good:
            return None
        idx, imgs, caps, labels = zip(*good)
        return {
            "index": torch.tensor(idx, dtype=torch.long),
            "images": torch.stack(imgs),
            "captions": list(caps),
            "labels": torch.tensor(labels, dtype=torch.long),
        }

    return collate
