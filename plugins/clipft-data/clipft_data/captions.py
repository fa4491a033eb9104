"""``captions``: image-caption pairs from CSV, TSV or JSONL.

The file is read by :func:`clipft.datafiles.read_pairs` (shared with
``clipft shards``): UTF-8, and a malformed row is an error naming the file and
line, not a sample captioned "None"; NUL characters are removed from captions,
and those rows and empty captions are warned about by line. Images that are
missing or undecodable are skipped and counted, as for every source.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import attrs

from clipft.data import DataBundle, check_image, resolve_templates
from clipft.datafiles import read_pairs
from clipft.errors import ClipftUsageError

from clipft_data.common import (
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


@attrs.frozen
class CaptionsOptions:
    file: str = attrs.field(metadata={"help": "CSV, TSV or JSONL file of image-caption pairs (UTF-8)"})
    image_column: str = attrs.field(default="image", metadata={
        "help": "column with the image path (relative paths resolve against the file's folder)"})
    caption_column: str = attrs.field(default="caption", metadata={"help": "column with the caption"})
    label_column: Optional[str] = attrs.field(default=None, metadata={
        "help": "optional class-name column; enables zero-shot top-1 and heads"})
    val_fraction: float = attrs.field(default=0.2, validator=fraction, metadata={
        "help": "share of pairs held out for validation"})
    templates: tuple = templates_field()
    shots: Optional[int] = shots_field("pairs (needs label_column)")
    shots_seed: int = shots_seed_field()
    shots_min: bool = shots_min_field("pairs")

    def __attrs_post_init__(self):
        # few-shot is K pairs per class: without classes there is nothing to count
        if self.shots is not None and not self.label_column:
            raise ValueError(
                f"shots={self.shots} samples K pairs per class, so it needs class labels: "
                "set label_column to the column that holds the class name")


def build_captions(opts: CaptionsOptions, ctx) -> DataBundle:
    path = Path(opts.file).expanduser()
    warnings: list = []
    pairs = read_pairs(path, opts.image_column, opts.caption_column, opts.label_column, "captions", warnings)
    classnames = sorted({label for _, _, label in pairs}) if opts.label_column else None
    label_of = {c: i for i, c in enumerate(classnames or [])}
    items, skipped = [], []
    for img, caption, label in pairs:
        reason = "file not found" if not img.is_file() else check_image(img)
        if reason:
            skipped.append((str(img), reason))
            continue
        items.append((str(img), caption, label_of[label] if opts.label_column else -1))
    if not items:
        raise ClipftUsageError(f"captions: none of the {len(pairs)} images in {path} could be read")
    train, val = split_items(items, opts.val_fraction, ctx.seed, by_label=False)
    if opts.shots is not None:   # after the val split, so val is the same with and without shots
        train, shot_warnings = sample_shots(train, classnames, opts.shots, opts.shots_seed, opts.shots_min,
                                       relative_key(path.parent), "captions", unit="pair")
        warnings += shot_warnings
    return DataBundle(
        train=FileDataset(train, ctx.transform_train),
        val=FileDataset(val, ctx.transform_val),
        classnames=classnames, templates=resolve_templates(opts.templates), has_captions=True,
        skipped=skipped, description=f"captions {path}" + (f" ({opts.shots}-shot)" if opts.shots else ""),
        split=split_record(opts, train) if opts.shots is not None else None, warnings=warnings)
