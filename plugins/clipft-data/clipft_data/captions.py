"""``captions``: image-caption pairs from CSV, TSV or JSONL.

The file is read by :func:`clipft.datafiles.read_pairs` (shared with
``clipft shards``): UTF-8, and a malformed row is an error naming the file and
line, not a sample captioned "None"; NUL characters are removed from captions,
and those rows and empty captions are warned about by line. Images that are
missing or undecodable are skipped and counted, as for every source.

The val split is, in order of precedence of what is given: a second file
(``val_file``), a column that names each pair's split (``split_column``), or a
seeded random share of the pairs (``val_fraction``, 0.2 by default). One of
them at a time: two is a usage error, as is a val split that comes out empty.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import attrs

from clipft.data import DataBundle, check_image, resolve_templates
from clipft.datafiles import read_column, read_pairs
from clipft.errors import ClipftUsageError

from clipft_data.common import (
    classes_field,
    merge_split_record,
    restrict_classes,
    FileDataset,
    fraction,
    relative_key,
    sample_shots,
    shots_field,
    shots_min_field,
    shots_seed_field,
    split_items,
    split_record,
    templates_field,
)


DEFAULT_VAL_FRACTION = 0.2
#: what ``split_column`` may say (case and surrounding spaces aside)
SPLIT_VALUES = ("train", "val")


@attrs.frozen
class CaptionsOptions:
    file: str = attrs.field(metadata={"help": "CSV, TSV or JSONL file of image-caption pairs (UTF-8)"})
    image_column: str = attrs.field(default="image", metadata={
        "help": "column with the image path (relative paths resolve against the file's folder)"})
    caption_column: str = attrs.field(default="caption", metadata={"help": "column with the caption"})
    label_column: Optional[str] = attrs.field(default=None, metadata={
        "help": "optional class-name column; enables zero-shot top-1 and heads"})
    val_fraction: Optional[float] = attrs.field(default=None, validator=attrs.validators.optional(fraction),
                                                metadata={"help": (
        f"share of pairs held out at random (seeded) for validation; {DEFAULT_VAL_FRACTION:g} when neither "
        "val_file nor split_column is given")})
    val_file: Optional[str] = attrs.field(default=None, metadata={"help": (
        "a second file of pairs, with the same columns, that is the val split; `file` then trains whole")})
    split_column: Optional[str] = attrs.field(default=None, metadata={"help": (
        f"column whose value ({' or '.join(SPLIT_VALUES)}) puts each pair in its split, in place of val_fraction")})
    templates: tuple = templates_field()
    shots: Optional[int] = shots_field("pairs (needs label_column)")
    shots_seed: int = shots_seed_field()
    shots_min: bool = shots_min_field("pairs")
    classes: str = classes_field()

    def __attrs_post_init__(self):
        given = [f"{k}={v}" for k, v in (("val_file", self.val_file), ("split_column", self.split_column),
                                          ("val_fraction", self.val_fraction)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} each choose the val split; give one of them")
        # few-shot is K pairs per class: without classes there is nothing to count
        if self.shots is not None and not self.label_column:
            raise ValueError(
                f"shots={self.shots} samples K pairs per class, so it needs class labels: "
                "set label_column to the column that holds the class name")
        if self.classes != "all" and not self.label_column:
            raise ValueError(f"classes={self.classes} keeps half of the classes, so it needs class labels: "
                             "set label_column to the column that holds the class name")


def _items(pairs, label_of, skipped) -> list:
    """``(path, caption, label)`` of the readable pairs; the others go to ``skipped``."""
    items = []
    for img, caption, label in pairs:
        reason = "file not found" if not img.is_file() else check_image(img)
        if reason:
            skipped.append((str(img), reason))
            continue
        items.append((str(img), caption, label_of[label] if label is not None else -1))
    return items


def _split_values(path: Path, column: str) -> list:
    """Each row's split (``train``/``val``); any other value is a usage error
    that names it and its line."""
    out = []
    for line, value in read_column(path, column, "captions"):
        v = value.strip().lower()
        if v not in SPLIT_VALUES:
            raise ClipftUsageError(
                f"captions: {path}:{line}: split_column '{column}' is {value!r}; each row's must be "
                f"{' or '.join(SPLIT_VALUES)}")
        out.append(v)
    return out


def build_captions(opts: CaptionsOptions, ctx) -> DataBundle:
    path = Path(opts.file).expanduser()
    warnings: list = []
    pairs = read_pairs(path, opts.image_column, opts.caption_column, opts.label_column, "captions", warnings)
    val_path = Path(opts.val_file).expanduser() if opts.val_file else None
    val_pairs = (read_pairs(val_path, opts.image_column, opts.caption_column, opts.label_column, "captions",
                            warnings) if val_path else [])
    # the classes of both splits, as a random split of one file would have them
    classnames = sorted({label for _, _, label in pairs + val_pairs}) if opts.label_column else None
    label_of = {c: i for i, c in enumerate(classnames or [])}
    skipped: list = []
    split = None
    if val_path is not None:
        train, val = _items(pairs, label_of, skipped), _items(val_pairs, label_of, skipped)
        split = {"by": "val_file", "val_file": str(val_path)}
        empty = f"none of the {len(val_pairs)} images in val_file {val_path} could be read"
    elif opts.split_column:
        says = _split_values(path, opts.split_column)
        train = _items([p for p, s in zip(pairs, says) if s == "train"], label_of, skipped)
        val = _items([p for p, s in zip(pairs, says) if s == "val"], label_of, skipped)
        split = {"by": "split_column", "split_column": opts.split_column}
        n_val = says.count("val")
        empty = (f"split_column '{opts.split_column}' puts no pair in val" if not n_val else
                 f"none of the {n_val} images split_column '{opts.split_column}' puts in val could be read")
    else:
        items = _items(pairs, label_of, skipped)
        fraction = DEFAULT_VAL_FRACTION if opts.val_fraction is None else opts.val_fraction
        train, val = split_items(items, fraction, ctx.seed, by_label=False) if items else ([], [])
        empty = None
    all_classes = classnames
    if opts.classes != "all":   # after the val split, so a class's val pairs are the same in either half
        classnames, (train, val) = restrict_classes(classnames, opts.classes, train, val)
    if not train:
        raise ClipftUsageError(f"captions: none of the {len(pairs)} images in {path} could be read"
                               if not opts.split_column else
                               f"captions: the train split is empty: split_column '{opts.split_column}' puts "
                               f"{says.count('train')} pair(s) in train and none of them could be read")
    if empty is not None and not val:
        raise ClipftUsageError(f"captions: the val split is empty: {empty}")
    if opts.shots is not None:   # after the val split, so val is the same with and without shots
        train, shot_warnings = sample_shots(train, classnames, opts.shots, opts.shots_seed, opts.shots_min,
                                       relative_key(path.parent), "captions", unit="pair")
        warnings += shot_warnings
    record = split_record(opts, train) if opts.shots is not None else {}
    if split is not None:
        record["val_split"] = split
    how = (f", val {val_path}" if val_path else f", split by column '{opts.split_column}'" if opts.split_column
           else "")
    return DataBundle(
        train=FileDataset(train, ctx.transform_train),
        val=FileDataset(val, ctx.transform_val),
        classnames=classnames, templates=resolve_templates(opts.templates), has_captions=True,
        skipped=skipped, description=f"captions {path}{how}" + (f" ({opts.shots}-shot)" if opts.shots else "")
        + (f" ({opts.classes} classes)" if opts.classes != "all" else ""),
        split=merge_split_record(record or None, all_classes, opts.classes), warnings=warnings)
