"""``clipft shards SOURCE OUT``: WebDataset tar shards from an image folder or
a table of image-caption pairs.

Each sample is a group of tar members sharing a key (``000042.jpg``,
``000042.txt``, ``000042.cls``): the image as the source file's own bytes under
its extension (``jpg``, ``jpeg``, ``png``, ``webp``; other formats are
re-encoded as ``png``), ``txt`` the caption (for an image folder, a class
prompt), ``cls`` the class index as text. Keys are ``%06d`` numbers over the
whole set in a deterministic order: class folders and their files sorted (an
image folder) or the table's row order, shuffled by ``--shuffle-seed`` when
given. Samples fill ``shard-000000.tar``, ``shard-000001.tar``, ... with
``--shard-size`` each.

Beside the shards: ``classnames.txt`` (one class a line, in label order) when
there are classes, and ``shards.json``, the manifest a reader takes the epoch
length from without scanning the tars. Everything is written under temporary
names first and renamed into place at the end, ``shards.json`` last, so a
crash never leaves a set that looks complete. Uses only the standard library
(``tarfile``); the ``webdataset`` package reads the result.
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import tarfile
from pathlib import Path
from typing import Optional, Sequence

import attrs

from clipft import atomic
from clipft.data import DEFAULT_TEMPLATES, check_image
from clipft.errors import ClipftUsageError

MANIFEST = "shards.json"
CLASSNAMES = "classnames.txt"
SHARD_PATTERN = "shard-{:06d}.tar"
#: image formats stored as they are; anything else becomes a png
KEPT_FORMATS = {".jpg": "jpg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}
FORMAT_VERSION = 1
#: the target name of the temporary folder a set is written in (``OUT/.shards.tmp-PID-...``)
_WORK = "shards"


@attrs.define
class Sample:
    path: Path
    caption: str
    label: Optional[int]


def _is_ours(name: str) -> bool:
    return name in (MANIFEST, CLASSNAMES) or (name.startswith("shard-") and name.endswith(".tar"))


def _leftover(p: Path) -> bool:
    """A temporary folder an interrupted ``clipft shards`` left behind (``.shards-XXXX.tmp``
    before clipft.atomic named them)."""
    return p.is_dir() and (p.name.startswith(f".{_WORK}.tmp-") and atomic.is_temp(p.name)
                           or p.name.startswith(".shards-") and p.name.endswith(".tmp"))


def _check_out(out: Path, source: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ClipftUsageError(f"shards: OUT {out} is a file; give a folder (it is created when absent)")
    try:
        out.resolve().relative_to(source.resolve())
        inside = source.is_dir()
    except ValueError:
        inside = False
    if inside:
        raise ClipftUsageError(f"shards: OUT {out} is inside the image folder {source}; write it elsewhere")
    if out.is_dir() and any(not _leftover(p) for p in out.iterdir()) and not overwrite:
        raise ClipftUsageError(
            f"shards: {out} is not empty; pass --overwrite to replace the shards in it "
            f"(only shard-*.tar, {MANIFEST} and {CLASSNAMES} are removed)")


def _folder_samples(root: Path, templates: Sequence[str], skipped: list) -> tuple[list, list]:
    from clipft.datafiles import scan_class_folders
    if (root / "train").is_dir() and (root / "val").is_dir():
        raise ClipftUsageError(
            f"shards: {root} has train/ and val/ folders; write each as its own set: "
            f"clipft shards {root / 'train'} OUT/train and clipft shards {root / 'val'} OUT/val, then "
            "--data webdataset:urls=OUT/train,val_urls=OUT/val")
    classes, files = scan_class_folders(root, "shards")
    names = [c.replace("_", " ") for c in classes]
    samples = []
    for label, c in enumerate(classes):
        for p in files[c]:
            reason = check_image(p)
            if reason:
                skipped.append((str(p), reason))
                continue
            # templates rotate by sample, as the imagefolder source does
            samples.append(Sample(p, templates[len(samples) % len(templates)].format(names[label]), label))
    return samples, names


def _table_samples(path: Path, image_column: str, caption_column: str, label_column: Optional[str],
                   skipped: list) -> tuple[list, Optional[list]]:
    from clipft.datafiles import read_pairs
    pairs = read_pairs(path, image_column, caption_column, label_column, "shards")
    names = sorted({label for _, _, label in pairs}) if label_column else None
    bad = next((n for n in names or [] if "\n" in n or "\r" in n or not n.strip()), None)
    if bad is not None:   # classnames.txt holds one name a line
        raise ClipftUsageError(f"shards: {path}: the class name {bad!r} in '{label_column}' is empty or "
                               "spans lines")
    label_of = {c: i for i, c in enumerate(names or [])}
    samples = []
    for img, caption, label in pairs:
        reason = "file not found" if not img.is_file() else check_image(img)
        if reason:
            skipped.append((str(img), reason))
            continue
        samples.append(Sample(img, caption, label_of[label] if label_column else None))
    return samples, names


def _image_member(path: Path) -> tuple[str, bytes, bool]:
    """The tar extension and bytes of an image; True when it was re-encoded."""
    ext = KEPT_FORMATS.get(path.suffix.lower())
    if ext is not None:
        return ext, path.read_bytes(), False
    from PIL import Image
    buf = io.BytesIO()
    with Image.open(path) as im:
        im.convert("RGB").save(buf, format="PNG")
    return "png", buf.getvalue(), True


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444   # byte-identical on every write
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path: Path, samples: list, first_key: int) -> tuple[int, int]:
    """Write one shard; returns (images re-encoded, distinct labels)."""
    converted = 0
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for k, s in enumerate(samples, start=first_key):
            key = f"{k:06d}"
            ext, data, reencoded = _image_member(s.path)
            converted += reencoded
            _add(tar, f"{key}.{ext}", data)
            _add(tar, f"{key}.txt", s.caption.encode("utf-8"))
            if s.label is not None:
                _add(tar, f"{key}.cls", str(s.label).encode())
    atomic.fsync_file(path)
    return converted, len({s.label for s in samples if s.label is not None})


def write_shards(source, out, shard_size: int = 1000, shuffle_seed: Optional[int] = None,
                 overwrite: bool = False, templates: Sequence[str] = DEFAULT_TEMPLATES,
                 image_column: str = "image", caption_column: str = "caption",
                 label_column: Optional[str] = None) -> dict:
    """Write the shards of ``source`` (an image folder, or a CSV/TSV/JSONL file of
    pairs) into ``out``; returns the manifest (what ``shards.json`` holds, plus
    the skipped files and the brace pattern of the shards)."""
    source, out = Path(source).expanduser(), Path(out).expanduser()
    if shard_size < 1:
        raise ClipftUsageError(f"shards: --shard-size must be >= 1, got {shard_size}")
    if not source.exists():
        raise ClipftUsageError(f"shards: {source} not found; give an image folder or a .csv/.tsv/.jsonl file")
    folder = source.is_dir()
    _check_out(out, source, overwrite)
    skipped: list = []
    if folder:
        if label_column is not None or (image_column, caption_column) != ("image", "caption"):
            raise ClipftUsageError("shards: --image-column, --caption-column and --label-column are for "
                                   "a table of pairs, not an image folder")
        samples, classnames = _folder_samples(source, templates, skipped)
        captions = "class-prompts"
    else:
        samples, classnames = _table_samples(source, image_column, caption_column, label_column, skipped)
        captions = "captions"
    if not samples:
        raise ClipftUsageError(f"shards: none of the images of {source} could be read ({len(skipped)} unreadable)")
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(samples)

    out.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale(out, {_WORK})
    tmp = atomic.make_temp_dir(out / _WORK)
    try:
        shards, converted = [], 0
        for n, start in enumerate(range(0, len(samples), shard_size)):
            chunk = samples[start:start + shard_size]
            name = SHARD_PATTERN.format(n)
            c, n_classes = _write_shard(tmp / name, chunk, start)
            converted += c
            shards.append({"name": name, "samples": len(chunk),
                           **({"classes": n_classes} if classnames is not None else {})})
        manifest = {
            "format": "clipft-shards", "version": FORMAT_VERSION,
            "samples": len(samples), "shards": shards,
            "keys": {"image": sorted({KEPT_FORMATS.get(s.path.suffix.lower(), "png") for s in samples}),
                     "caption": "txt", **({"label": "cls"} if classnames is not None else {})},
            "captions": captions,
            "classes": len(classnames) if classnames is not None else None,
            "source": str(source), "shuffle_seed": shuffle_seed, "shard_size": shard_size,
            "reencoded_png": converted,
        }
        if classnames is not None:
            atomic.write_text(tmp / CLASSNAMES, "".join(f"{c}\n" for c in classnames))
        atomic.write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        _commit(tmp, out, [s["name"] for s in shards] + ([CLASSNAMES] if classnames is not None else []))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    last = len(shards) - 1
    return {**manifest, "out": str(out), "classnames": classnames,
            "urls": str(out / ("shard-{000000..%06d}.tar" % last if last else SHARD_PATTERN.format(0))),
            "skipped": [{"path": p, "reason": r} for p, r in skipped]}


def _commit(tmp: Path, out: Path, names: list) -> None:
    """Move the finished files from ``tmp`` into ``out``: the old manifest goes
    first (the set is incomplete from then on), then the old files that the new
    set does not replace, then the new files, and the new manifest last."""
    old_manifest = out / MANIFEST
    if old_manifest.exists():
        old_manifest.unlink()
    for p in out.iterdir():
        if p.is_file() and _is_ours(p.name) and p.name not in names:
            p.unlink()
    for name in names:
        os.replace(tmp / name, out / name)
    os.replace(tmp / MANIFEST, out / MANIFEST)
    atomic.fsync_dir(out)
