"""Pieces shared by the file-based sources."""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

import attrs

from clipft.data import CLASS_SPLITS, TEMPLATE_SETS, class_split_record, keep_classes, open_image, resolve_templates
from clipft.errors import ClipftUsageError


def positive_int(inst, attribute, value):
    if value <= 0:
        raise ValueError(f"{attribute.name} must be > 0")


def fraction(inst, attribute, value):
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{attribute.name} must be in [0, 1)")


def templates_field():
    return attrs.field(
        default=("a photo of a {}.",),
        converter=_templates_option,
        metadata={"help": "prompt templates with one {} for the class name, a named set "
                          f"({', '.join(TEMPLATE_SETS)}) or @FILE (one template a line)"})


def _templates_option(value) -> tuple:
    """The option keeps set names (config.toml stays short) and expands @FILE
    (the run directory must not depend on a file that may change); the source
    resolves the names when it builds."""
    try:
        return resolve_templates(value, keep_names=True)
    except ClipftUsageError as exc:   # a ValueError is reported with the option and source
        raise ValueError(str(exc)) from None


def classnames_option(value):
    """Converter of a class-names option: a list of names, or ``@FILE`` (one
    name a non-empty line), kept expanded in config.toml so a run repeats
    without the file (``webdataset``'s ``classnames``, ``hf``'s ``classes``)."""
    if value is None:
        return None
    items = (value,) if isinstance(value, str) else tuple(value)
    if len(items) == 1 and str(items[0]).strip().startswith("@"):
        from clipft.data import read_text_utf8
        path = Path(str(items[0]).strip()[1:]).expanduser()
        try:
            text = read_text_utf8(path, "classnames file")
        except ClipftUsageError as exc:
            raise ValueError(str(exc)) from None
        items = tuple(line.strip() for line in text.splitlines() if line.strip())
    names = tuple(str(x).strip() for x in items)
    if not names or any(not n for n in names):
        raise ValueError("give at least one class name and no empty ones")
    return names


# -- base-to-novel -------------------------------------------------------------------

def _class_split(inst, attribute, value):
    if value not in CLASS_SPLITS:
        raise ValueError(f"{attribute.name} must be one of {', '.join(CLASS_SPLITS)}, got {value!r}")


def classes_field():
    # the metadata flag is how `clipft eval --base-to-novel` finds the option, whatever its name
    return attrs.field(default="all", validator=_class_split, metadata={
        "class_split": True,
        "help": "all, or base / novel: the class names sorted, the first half base (odd: base gets the "
                "extra one), the rest novel (the base-to-novel protocol)"})


def restrict_classes(classnames: list, which: str, *splits: list) -> tuple[list, list]:
    """The classes ``classes=which`` keeps and each split's items (tuples with
    the label third: ``(path, caption, label, ...)``) of those classes,
    relabelled ``0..k-1`` in the kept order."""
    kept = keep_classes(classnames, which)
    new = {old: i for i, old in enumerate(kept)}
    return [classnames[i] for i in kept], [[(*it[:2], new[it[2]], *it[3:]) for it in s if it[2] in new]
                                           for s in splits]


def merge_split_record(record, classnames: list, which: str):
    """``DataBundle.split`` with the class half added (None stays None for ``all``)."""
    if which == "all":
        return record
    return {**(record or {}), **class_split_record(classnames, which)}


# -- few-shot ------------------------------------------------------------------------

def _shots(inst, attribute, value):
    if value is not None and value <= 0:
        raise ValueError(f"shots must be > 0 (or none for all training images), got {value}")


def shots_field(unit: str = "images"):
    return attrs.field(default=None, validator=_shots, metadata={
        "help": f"few-shot: K training {unit} per class, sampled from the train split (val is untouched)"})


def shots_seed_field():
    return attrs.field(default=0, metadata={
        "help": "seed of the few-shot sample (not the run's --seed)"})


def shots_min_field(unit: str = "images"):
    return attrs.field(default=True, metadata={
        "help": f"a class with fewer than `shots` training {unit} is an error; false: take it whole, with a warning"})


def _rank(shots_seed: int, cls: str, key: str) -> str:
    # each file's place in the sample order is its own hash, not a position in a
    # shuffled list: the sample does not depend on listing order, on where the
    # data folder lives, or (beyond the files it excludes) on the val split
    return hashlib.blake2b(f"{shots_seed}:{cls}:{key}".encode(), digest_size=16).hexdigest()


def sample_shots(train: list, classes: list, shots: int, shots_seed: int, shots_min: bool,
                 key, source: str, unit: str = "image") -> tuple[list, list]:
    """``shots`` items per class of ``train`` (``(path, caption, label)``), in
    class order and then by ``key(item)`` (a stable name: the path relative to
    the data). ``classes[label]`` names a class as the data spells it; ``unit``
    is what an item is, for messages. Returns the items and the warnings for
    classes taken whole."""
    by_label: dict = {label: [] for label in range(len(classes))}
    for it in train:
        by_label[it[2]].append(it)
    chosen, warnings = [], []
    for label, cls in enumerate(classes):
        group = sorted(by_label[label], key=lambda it: (key(it), str(it[1])))
        if len(group) < shots:
            if shots_min:
                raise ClipftUsageError(
                    f"{source}: shots={shots}, but class '{cls}' has only {len(group)} training "
                    f"{unit}(s); lower shots, or pass shots_min=false to take such a class whole")
            warnings.append(f"{source}: class '{cls}' has {len(group)} training {unit}(s), fewer than "
                            f"shots={shots}; all of them are used (shots_min=false)")
            chosen.extend(group)
            continue
        ranked = sorted(range(len(group)), key=lambda i: (_rank(shots_seed, cls, key(group[i])), i))
        chosen.extend(group[i] for i in sorted(ranked[:shots]))
    return chosen, warnings


def relative_key(base: Path):
    """``key`` for :func:`sample_shots`: an item's path relative to ``base``
    (POSIX form), or the path itself when it lies outside."""
    base = Path(base)

    def key(item) -> str:
        p = Path(item[0])
        try:
            return p.relative_to(base).as_posix()
        except ValueError:
            return p.as_posix()
    return key


def split_record(opts, train: list) -> dict:
    """``DataBundle.split`` for a few-shot sample: what ``data_split.json`` holds."""
    return {"shots": opts.shots, "shots_seed": opts.shots_seed, "shots_min": opts.shots_min,
            "train": [str(it[0]) for it in train]}


class FileDataset:
    """Items (path, caption, label) decoded lazily. A file that passed the
    header check while indexing but fails to decode (a truncated JPEG) raises:
    the engine's guard drops it and reports it by ``sample_name`` (its path)
    and the decoder's reason."""

    def __init__(self, items, transform):
        self.items = list(items)
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def sample_name(self, i) -> str:
        return str(self.items[i][0])

    def __getitem__(self, i):
        path, caption, label = self.items[i]
        return i, self.transform(open_image(path)), caption, label


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
