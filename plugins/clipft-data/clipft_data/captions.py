"""``captions``: image-caption pairs from CSV, TSV or JSONL.

Files are UTF-8 (a BOM is fine). A row that lacks a value the source uses (a
CSV row with fewer fields than the header, a JSONL object without the key, a
null) is an error naming the file and line, not a sample captioned "None":
a malformed file is fixed once rather than trained on quietly. So is a CSV row
with more fields than the header (an unquoted comma in a caption would
otherwise cut it short). Images that are missing or undecodable are skipped
and counted, as for every source.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Optional

import attrs

from clipft.data import DataBundle, check_image, read_text_utf8, resolve_templates
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


def _read_jsonl(path: Path, text: str) -> tuple[list, list[str]]:
    rows = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ClipftUsageError(f"captions: {path}:{n}: invalid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ClipftUsageError(
                f"captions: {path}:{n}: expected a JSON object such as "
                f'{{"image": "a.jpg", "caption": "..."}}, got {type(obj).__name__} {line.strip()[:60]}')
        rows.append((n, obj))
    return rows, sorted({k for _, r in rows for k in r})


def _read_csv(path: Path, text: str, delimiter: str) -> tuple[list, list[str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows = []
    try:
        for r in reader:
            extra = r.pop(None, None)
            if extra and any(str(x).strip() for x in extra):   # trailing empty fields are harmless
                sep = "tab" if delimiter == "\t" else f"'{delimiter}'"
                raise ClipftUsageError(
                    f"captions: {path}:{reader.line_num}: the row has {len(reader.fieldnames) + len(extra)} "
                    f"fields, the header {len(reader.fieldnames)}; quote a field that holds a {sep}")
            rows.append((reader.line_num, r))
    except csv.Error as exc:
        raise ClipftUsageError(f"captions: {path}:{reader.line_num}: not valid CSV: {exc}") from None
    return rows, list(reader.fieldnames or [])


def _read_rows(path: Path) -> tuple[list, list[str]]:
    """``[(line, row)]`` and the column names."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl"):
        raise ClipftUsageError(f"captions: {path} must end in .csv, .tsv or .jsonl")
    text = read_text_utf8(path, "captions file")
    if suffix == ".jsonl":
        return _read_jsonl(path, text)
    return _read_csv(path, text, "\t" if suffix == ".tsv" else ",")


def _value(path: Path, line: int, row: dict, col: str, jsonl: bool, text: bool):
    """The value of ``col`` in a row, or a usage error naming the file and line."""
    where = f"captions: {path}:{line}"
    if col not in row or row[col] is None:
        if not jsonl:
            raise ClipftUsageError(
                f"{where}: the row has fewer fields than the header, so it has no '{col}'")
        raise ClipftUsageError(f"{where}: " + (f"'{col}' is null" if col in row else f"no '{col}' key"))
    v = row[col]
    if not isinstance(v, str) and (text or not isinstance(v, (int, float)) or isinstance(v, bool)):
        expected = "a string" if text else "a string or a number"
        raise ClipftUsageError(f"{where}: '{col}' must be {expected}, got {json.dumps(v)[:60]}")
    return str(v)


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
    jsonl = path.suffix.lower() == ".jsonl"
    pairs = []
    for line, r in rows:
        pairs.append((_value(path, line, r, opts.image_column, jsonl, True),
                      _value(path, line, r, opts.caption_column, jsonl, True),
                      _value(path, line, r, opts.label_column, jsonl, False) if opts.label_column else None))
    classnames = sorted({label for _, _, label in pairs}) if opts.label_column else None
    label_of = {c: i for i, c in enumerate(classnames or [])}
    items, skipped = [], []
    for image, caption, label in pairs:
        img = Path(image)
        img = img if img.is_absolute() else path.parent / img
        reason = "file not found" if not img.is_file() else check_image(img)
        if reason:
            skipped.append((str(img), reason))
            continue
        items.append((str(img), caption, label_of[label] if opts.label_column else -1))
    if not items:
        raise ClipftUsageError(f"captions: none of the {len(rows)} images in {path} could be read")
    train, val = split_items(items, opts.val_fraction, ctx.seed, by_label=False)
    warnings: list = []
    if opts.shots is not None:   # after the val split, so val is the same with and without shots
        train, warnings = sample_shots(train, classnames, opts.shots, opts.shots_seed, opts.shots_min,
                                       relative_key(path.parent), "captions", unit="pair")
    return DataBundle(
        train=FileDataset(train, ctx.transform_train),
        val=FileDataset(val, ctx.transform_val),
        classnames=classnames, templates=resolve_templates(opts.templates), has_captions=True,
        skipped=skipped, description=f"captions {path}" + (f" ({opts.shots}-shot)" if opts.shots else ""),
        split=split_record(opts, train) if opts.shots is not None else None, warnings=warnings)
