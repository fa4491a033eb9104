"""Reading the files that file-based data sources index: class folders
(``root/class_name/*.jpg``) and tables of image-caption pairs (CSV, TSV or
JSONL). Shared by the ``imagefolder`` and ``captions`` sources and by
``clipft shards``, so that all of them read the same data the same way and
name a bad file in the same words.

Tables are UTF-8 (a BOM is fine). A row that lacks a value the reader uses (a
CSV row with fewer fields than the header, a JSONL object without the key, a
null) is an error naming the file and line, not a sample captioned "None": a
malformed file is fixed once rather than trained on quietly. So is a CSV row
with more fields than the header (an unquoted comma in a caption would
otherwise cut it short). A NUL character in a caption is removed, and empty
captions are kept; both are reported by line as warnings.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Optional

from clipft.data import IMAGE_EXTENSIONS, read_text_utf8
from clipft.errors import ClipftUsageError

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl")


# -- class folders -------------------------------------------------------------------
def scan_class_folders(root: Path, what: str = "imagefolder") -> tuple[list, dict]:
    """The class folders of ``root`` (sorted, hidden ones left out) and each
    one's image files (sorted, searched recursively); errors name the folder."""
    root = Path(root)
    if not root.is_dir():
        raise ClipftUsageError(f"{what}: data folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ClipftUsageError(
            f"{what}: {root} has no class folders; expected {root}/<class_name>/<image files>")
    if len(classes) == 1:   # one class: every label the same, loss 0 and top-1 1.0 say nothing
        raise ClipftUsageError(
            f"{what}: {root} has one class folder ({classes[0]}); a classifier needs two or more: "
            f"point it at the folder that holds one sub-folder per class")
    files = {}
    for c in classes:
        try:
            c.encode("utf-8")
        except UnicodeEncodeError:   # bytes that are not UTF-8 (os.fsdecode's surrogates)
            raise ClipftUsageError(
                f"{what}: class folder {os.fsencode(c)!r} in {root} is not a valid UTF-8 name; the folder "
                f"name is the class name that prompts and the run directory record: rename it") from None
        imgs = sorted(p for p in (root / c).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not imgs:
            raise ClipftUsageError(
                f"{what}: class folder {root / c} has no images "
                f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
        files[c] = imgs
    return classes, files


#: folder names a split layout uses for its validation images, in order of preference
VAL_FOLDERS = ("val", "valid", "validation")


def split_folders(root: Path) -> tuple[Optional[Path], Optional[Path]]:
    """``(train, val)`` folders of a split layout (``root/train`` beside
    ``root/val``, ``valid`` or ``validation``), ``(train, None)`` for a train/
    alone, ``(None, None)`` for plain class folders. A class may not be called
    "train": a lone train/ among class folders is read as the split it names."""
    train = Path(root) / "train"
    if not train.is_dir():
        return None, None
    val = next((Path(root) / v for v in VAL_FOLDERS if (Path(root) / v).is_dir()), None)
    return train, val


# -- tables of pairs -----------------------------------------------------------------
def _read_jsonl(path: Path, text: str, what: str) -> tuple[list, list[str]]:
    rows = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ClipftUsageError(f"{what}: {path}:{n}: invalid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ClipftUsageError(
                f"{what}: {path}:{n}: expected a JSON object such as "
                f'{{"image": "a.jpg", "caption": "..."}}, got {type(obj).__name__} {line.strip()[:60]}')
        rows.append((n, obj))
    return rows, sorted({k for _, r in rows for k in r})


def _read_csv(path: Path, text: str, delimiter: str, what: str) -> tuple[list, list[str]]:
    # strict: an unterminated quote is an error, not a caption that swallows the
    # rest of the file (an open quote otherwise reads on to the end, silently)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows = []
    start = 1   # the line the row being read starts on
    try:
        for r in reader:
            extra = r.pop(None, None)
            if extra and any(str(x).strip() for x in extra):   # trailing empty fields are harmless
                sep = "tab" if delimiter == "\t" else f"'{delimiter}'"
                raise ClipftUsageError(
                    f"{what}: {path}:{reader.line_num}: the row has {len(reader.fieldnames) + len(extra)} "
                    f"fields, the header {len(reader.fieldnames)}; quote a field that holds a {sep}")
            rows.append((reader.line_num, r))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise ClipftUsageError(
            f"{what}: {path}:{start}: not valid CSV ({exc}); the row starting on line {start} "
            f"could not be read, nor the {max(len(text.splitlines()) - start, 0)} line(s) after it: "
            "check its quotes") from None
    return rows, list(reader.fieldnames or [])


def read_rows(path: Path, what: str = "captions") -> tuple[list, list[str]]:
    """``[(line, row)]`` of a CSV, TSV or JSONL file and its column names."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise ClipftUsageError(f"{what}: {path} must end in .csv, .tsv or .jsonl")
    text = read_text_utf8(path, "captions file")
    if suffix == ".jsonl":
        return _read_jsonl(path, text, what)
    return _read_csv(path, text, "\t" if suffix == ".tsv" else ",", what)


def _value(path: Path, line: int, row: dict, col: str, jsonl: bool, text: bool, what: str):
    """The value of ``col`` in a row, or a usage error naming the file and line."""
    where = f"{what}: {path}:{line}"
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


def read_pairs(path, image_column: str = "image", caption_column: str = "caption",
               label_column: Optional[str] = None,
               what: str = "captions", warnings: Optional[list] = None) -> list[tuple[Path, str, Optional[str]]]:
    """``(image_path, caption, label)`` for every row of a CSV, TSV or JSONL
    file, in file order; relative image paths resolve against the file's
    folder, and ``label`` is None without ``label_column``. A missing file or
    column, an empty file or a malformed row is a usage error prefixed with
    ``what`` (the reader's name). NUL characters are removed from captions
    (every reader does the same, so a run and its shards agree); rows with
    NULs or an empty caption are noted in ``warnings`` by line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ClipftUsageError(f"{what}: file not found: {path}")
    rows, cols = read_rows(path, what)
    needed = [image_column, caption_column] + ([label_column] if label_column else [])
    for col in needed:
        if col not in cols:
            raise ClipftUsageError(
                f"{what}: {path} has no column '{col}'. Columns: {', '.join(cols) or '(none)'}. "
                "Set image_column / caption_column / label_column.")
    if not rows:
        raise ClipftUsageError(f"{what}: {path} has no rows")
    jsonl = path.suffix.lower() == ".jsonl"
    pairs = []
    nul, empty = [], []
    for line, r in rows:
        image = Path(_value(path, line, r, image_column, jsonl, True, what))
        caption = _value(path, line, r, caption_column, jsonl, True, what)
        if "\0" in caption:
            nul.append(line)
            caption = caption.replace("\0", "")
        if not caption.strip():
            empty.append(line)
        pairs.append((image if image.is_absolute() else path.parent / image, caption,
                      _value(path, line, r, label_column, jsonl, False, what) if label_column else None))
    if warnings is not None:
        warnings.extend(caption_warnings(path, what, nul, empty))
    return pairs


def read_column(path, column: str, what: str = "captions") -> list[tuple[int, str]]:
    """``(line, value)`` of ``column`` for every row of a CSV, TSV or JSONL
    file, in the order :func:`read_pairs` gives its rows; a missing column or
    value is a usage error naming it (and the line)."""
    path = Path(path).expanduser()
    rows, cols = read_rows(path, what)
    if column not in cols:
        raise ClipftUsageError(f"{what}: {path} has no column '{column}'. Columns: {', '.join(cols) or '(none)'}.")
    jsonl = path.suffix.lower() == ".jsonl"
    return [(line, _value(path, line, r, column, jsonl, False, what)) for line, r in rows]


def _lines(lines: list) -> str:
    shown = ", ".join(str(n) for n in lines[:5])
    return f"line {shown}" if len(lines) == 1 else f"lines {shown}" + (", ..." if len(lines) > 5 else "")


def caption_warnings(path: Path, what: str, nul: list, empty: list) -> list:
    """The notes on captions read as they are not meant: NUL characters (an
    encoding slip, dropped from the caption) and empty captions (kept: the
    pair trains on an empty text, which is rarely meant)."""
    out = []
    if nul:
        out.append(f"{what}: {path}: {len(nul)} caption(s) held NUL characters, removed ({_lines(nul)})")
    if empty:
        out.append(f"{what}: {path}: {len(empty)} caption(s) are empty ({_lines(empty)}); "
                   "those images train against an empty text")
    return out
