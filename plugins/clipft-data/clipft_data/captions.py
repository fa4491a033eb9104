"""``captions``: image-caption pairs from CSV, TSV or JSONL."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

import attrs

from clipft.data import DataBundle, check_image
from clipft.errors import ClipftUsageError

from clipft_data.common import FileDataset, fraction, split_items, templates_field


@attrs.frozen
class CaptionsOptions:
    file: str = attrs.field(metadata={"help": "CSV, TSV or JSONL file of image-caption pairs"})
    image_column: str = attrs.field(default="image", metadata={
        "help": "column with the image path (relative paths resolve against the file's folder)"})
    caption_column: str = attrs.field(default="caption", metadata={"help": "column with the caption"})
    label_column: Optional[str] = attrs.field(default=None, metadata={
        "help": "optional class-name column; enables zero-shot top-1 and heads"})
    val_fraction: float = attrs.field(default=0.2, validator=fraction, metadata={
        "help": "share of pairs held out for validation"})
    templates: tuple = templates_field()


def _read_rows(path: Path) -> tuple[list[dict], list[str]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ClipftUsageError(f"captions: {path}:{n}: invalid JSON: {exc}") from None
        cols = sorted({k for r in rows for k in r})
        return rows, cols
    if suffix not in (".csv", ".tsv"):
        raise ClipftUsageError(f"captions: {path} must end in .csv, .tsv or .jsonl")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
        rows = list(reader)
        return rows, list(reader.fieldnames or [])


def build_captions(opts: CaptionsOptions, ctx) -> DataBundle:
    path = Path(opts.file).expanduser()
    if not path.is_file():
        raise ClipftUsageError(f"captions: file not found: {path}")
    rows, cols = _read_rows(path)
    needed = [opts.image_column, opts.caption_column] + ([opts.label_column] if opts.label_column else [])
    for col in needed:
        if col not in cols:
            raise ClipftUsageError(
                f"captions: {path} has no column '{col}'. Columns: {', '.join(cols) or '(none)'}. "
                "Set image_column / caption_column / label_column.")
    if not rows:
        raise ClipftUsageError(f"captions: {path} has no rows")
    classnames = sorted({str(r[opts.label_column]) for r in rows}) if opts.label_column else None
    label_of = {c: i for i, c in enumerate(classnames or [])}
    items, skipped = [], []
    for r in rows:
        img = Path(str(r[opts.image_column]))
        img = img if img.is_absolute() else path.parent / img
        reason = "file not found" if not img.is_file() else check_image(img)
        if reason:
            skipped.append((str(img), reason))
            continue
        label = label_of[str(r[opts.label_column])] if opts.label_column else -1
        items.append((str(img), str(r[opts.caption_column]), label))
    if not items:
        raise ClipftUsageError(f"captions: none of the {len(rows)} images in {path} could be read")
    train, val = split_items(items, opts.val_fraction, ctx.seed, by_label=False)
    return DataBundle(
        train=FileDataset(train, ctx.transform_train),
        val=FileDataset(val, ctx.transform_val),
        classnames=classnames, templates=opts.templates, has_captions=True, skipped=skipped,
        description=f"captions {path}")
