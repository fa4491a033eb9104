"""Pieces shared by the file-based sources."""
from __future__ import annotations

import random

import attrs

from clipft.data import check_templates, load_image


def positive_int(inst, attribute, value):
    if value <= 0:
        raise ValueError(f"{attribute.name} must be > 0")


def fraction(inst, attribute, value):
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{attribute.name} must be in [0, 1)")


def templates_field():
    return attrs.field(
        default=("a photo of a {}.",),
        converter=tuple,
        validator=lambda i, a, v: _check_templates(v),
        metadata={"help": "prompt templates with one {} for the class name"})


def _check_templates(v):
    check_templates(v)


class FileDataset:
    """Items (path, caption, label) decoded lazily; undecodable files yield None."""

    def __init__(self, items, transform):
        self.items = list(items)
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, caption, label = self.items[i]
        img = load_image(path)
        if img is None:
            return None
        return i, self.transform(img), caption, label


def split_items(items, val_fraction: float, seed: int, by_label: bool):
    """Seeded split; stratified per label when there are labels."""
    rng = random.Random(seed)
    groups: dict = {}
    for it in items:
        groups.setdefault(it[2] if by_label else 0, []).append(it)
    train, val = [], []
    for key in sorted(groups):
        g = sorted(groups[key], key=lambda x: str(x[0]))
        rng.shuffle(g)
        n_val = int(round(val_fraction * len(g)))
        if val_fraction > 0 and len(g) > 1:
            n_val = min(max(n_val, 1), len(g) - 1)
        val.extend(g[:n_val])
        train.extend(g[n_val:])
    return train, val
