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

``--clip-benchmark`` writes clip_benchmark's ``wds/`` layout instead (what its
``build_wds_dataset`` reads): ``OUT/test/`` (and ``OUT/train/``) each hold
``0.tar, 1.tar, ...`` and ``nshards.txt``; ``OUT/classnames.txt`` and
``OUT/zeroshot_classification_templates.txt`` (``{c}`` for the class name) sit
at the top, or ``OUT/dataset_type.txt`` (``retrieval``) for captions without
labels. clipft's val split is clip_benchmark's ``test`` (its default
``--split``), train is ``train``. Each split folder is also a complete clipft
set (``shards.json``, ``classnames.txt``), so ``--data
webdataset:urls=OUT/train,val_urls=OUT/test`` trains on it.
"""
from __future__ import annotations

import io
import json
import os
import random
import re
import shlex
import shutil
import string
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

# clip_benchmark's wds/ layout (clip_benchmark.datasets.builder.build_wds_dataset):
# it expands SPLIT/{0..N-1}.tar from SPLIT/nshards.txt, reads the first of
# webp/png/jpg/jpeg and `cls`, and formats each template line with c=CLASS
CB_PATTERN = "{}.tar"
CB_NSHARDS = "nshards.txt"
CB_TEMPLATES = "zeroshot_classification_templates.txt"
CB_TYPE = "dataset_type.txt"
#: clipft's split -> clip_benchmark's split folder (its --split defaults to test)
CB_SPLITS = {"train": "train", "val": "test"}
_NUMBERED_TAR = re.compile(r"[0-9]+\.tar")


@attrs.define
class Sample:
    path: Path
    caption: str
    label: Optional[int]


def _is_ours(name: str) -> bool:
    return name in (MANIFEST, CLASSNAMES) or (name.startswith("shard-") and name.endswith(".tar"))


def _is_ours_cb_top(name: str) -> bool:
    return _is_ours(name) or name in (CB_TEMPLATES, CB_TYPE)


def _is_ours_cb_split(name: str) -> bool:
    return _is_ours(name) or name == CB_NSHARDS or bool(_NUMBERED_TAR.fullmatch(name))


def _leftover(p: Path) -> bool:
    """A temporary folder an interrupted ``clipft shards`` left behind (``.shards-XXXX.tmp``
    before clipft.atomic named them)."""
    return p.is_dir() and (p.name.startswith(f".{_WORK}.tmp-") and atomic.is_temp(p.name)
                           or p.name.startswith(".shards-") and p.name.endswith(".tmp"))


def _check_out(out: Path, source: Path, overwrite: bool, clip_benchmark: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ClipftUsageError(f"shards: OUT {out} is a file; give a folder (it is created when absent)")
    try:
        out.resolve().relative_to(source.resolve())
        inside = source.is_dir()
    except ValueError:
        inside = False
    if inside:
        raise ClipftUsageError(f"shards: OUT {out} is inside the image folder {source}; write it elsewhere")
    for split in CB_SPLITS.values() if clip_benchmark else ():
        if (out / split).exists() and not (out / split).is_dir():
            raise ClipftUsageError(f"shards: {out / split} is a file; clip_benchmark's layout needs that "
                                   "name for a split folder")
    if out.is_dir() and any(not _leftover(p) for p in out.iterdir()) and not overwrite:
        ours = (f"{CLASSNAMES}, {CB_TEMPLATES}, {CB_TYPE}, and in train/ and test/ the numbered .tar "
                f"shards, {CB_NSHARDS}, {MANIFEST} and {CLASSNAMES}" if clip_benchmark
                else f"shard-*.tar, {MANIFEST} and {CLASSNAMES}")
        raise ClipftUsageError(
            f"shards: {out} is not empty; pass --overwrite to replace the shards in it (only {ours} are removed)")


def _check_names(names: Sequence[str], where) -> None:
    bad = next((n for n in names if "\n" in n or "\r" in n or not n.strip()), None)
    if bad is not None:   # classnames.txt holds one name a line
        raise ClipftUsageError(f"shards: {where}: the class name {bad!r} is empty or spans lines")


def _class_samples(classes, files, names, templates: Sequence[str], skipped: list) -> list:
    samples = []
    for label, c in enumerate(classes):
        for p in files[c]:
            reason = check_image(p)
            if reason:
                skipped.append((str(p), reason))
                continue
            # templates rotate by sample, as the imagefolder source does
            samples.append(Sample(p, templates[len(samples) % len(templates)].format(names[label]), label))
    return samples


def _folder_samples(root: Path, templates: Sequence[str], skipped: list,
                    clip_benchmark: bool) -> tuple[dict, list]:
    """``({split: (folder, samples)}, class names)``: split ``""`` for a plain
    set, ``val`` (and ``train``) for clip_benchmark's layout."""
    from clipft.datafiles import scan_class_folders, split_folders
    train, val = split_folders(root)
    if val is not None and not clip_benchmark:
        raise ClipftUsageError(
            f"shards: {root} has train/ and {val.name}/ folders; write each as its own set: "
            f"clipft shards {train} OUT/train and clipft shards {val} OUT/val, then "
            "--data webdataset:urls=OUT/train,val_urls=OUT/val (or both at once in clip_benchmark's "
            "layout, OUT/train and OUT/test, with --clip-benchmark)")
    if clip_benchmark and train is not None and val is None:
        raise ClipftUsageError(
            f"shards: {root} has train/ but no val/ (or valid/, validation/); clip_benchmark evaluates "
            "the test split: add val/ (written as test/), or give a folder of class folders (written as test/)")
    if val is None:
        classes, files = scan_class_folders(root, "shards")
        names = [c.replace("_", " ") for c in classes]
        _check_names(names, root)
        samples = _class_samples(classes, files, names, templates, skipped)
        return {("val" if clip_benchmark else ""): (root, samples)}, names
    classes, train_files = scan_class_folders(train, "shards")
    val_classes, val_files = scan_class_folders(val, "shards")
    if val_classes != classes:   # one label numbering for both splits
        raise ClipftUsageError(f"shards: train/ and {val.name}/ of {root} have different classes: "
                               f"{sorted(set(classes) ^ set(val_classes))}")
    names = [c.replace("_", " ") for c in classes]
    _check_names(names, root)
    return {"train": (train, _class_samples(classes, train_files, names, templates, skipped)),
            "val": (val, _class_samples(classes, val_files, names, templates, skipped))}, names


def _table_samples(path: Path, image_column: str, caption_column: str, label_column: Optional[str],
                   skipped: list) -> tuple[list, Optional[list]]:
    from clipft.datafiles import read_pairs
    pairs = read_pairs(path, image_column, caption_column, label_column, "shards")
    names = sorted({label for _, _, label in pairs}) if label_column else None
    if names is not None:
        _check_names(names, f"{path}, column '{label_column}'")
    label_of = {c: i for i, c in enumerate(names or [])}
    samples = []
    for img, caption, label in pairs:
        reason = "file not found" if not img.is_file() else check_image(img)
        if reason:
            skipped.append((str(img), reason))
            continue
        samples.append(Sample(img, caption, label_of[label] if label_column else None))
    return samples, names


def clip_benchmark_template(template: str) -> str:
    """A clipft template (one ``{}``, ``{{``/``}}`` literal braces) as clip_benchmark
    formats it: ``template.format(c=classname)``, one template a line."""
    if "\n" in template or "\r" in template:
        raise ClipftUsageError(f"shards: the template {template!r} spans lines; {CB_TEMPLATES} holds one a line")
    out = []
    for literal, field, spec, conversion in string.Formatter().parse(template):
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if field is not None:
            out.append("{c" + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}")
    return "".join(out)


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


def _write_set(folder: Path, samples: list, classnames: Optional[list], pattern: str, *, source, captions,
               shuffle_seed, shard_size) -> dict:
    """Write one set's shards, its ``classnames.txt`` and ``shards.json`` into
    ``folder`` (a temporary one); returns the manifest."""
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(samples)
    shards, converted = [], 0
    for n, start in enumerate(range(0, len(samples), shard_size)):
        chunk = samples[start:start + shard_size]
        name = pattern.format(n)
        c, n_classes = _write_shard(folder / name, chunk, start)
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
        atomic.write_text(folder / CLASSNAMES, "".join(f"{c}\n" for c in classnames))
    atomic.write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _urls(folder: Path, manifest: dict) -> str:
    names = [s["name"] for s in manifest["shards"]]
    if len(names) == 1:
        return str(folder / names[0])
    if names[0].startswith("shard-"):
        return str(folder / ("shard-{000000..%06d}.tar" % (len(names) - 1)))
    return str(folder / ("{0..%d}.tar" % (len(names) - 1)))


def write_shards(source, out, shard_size: int = 1000, shuffle_seed: Optional[int] = None,
                 overwrite: bool = False, templates: Sequence[str] = DEFAULT_TEMPLATES,
                 image_column: str = "image", caption_column: str = "caption",
                 label_column: Optional[str] = None, clip_benchmark: bool = False) -> dict:
    """Write the shards of ``source`` (an image folder, or a CSV/TSV/JSONL file of
    pairs) into ``out``; returns the manifest (what ``shards.json`` holds, plus
    the skipped files and the brace pattern of the shards). With
    ``clip_benchmark`` the layout is clip_benchmark's (see the module's
    docstring) and the result names its splits (``splits``: clip_benchmark's
    split name -> that split's manifest)."""
    source, out = Path(source).expanduser(), Path(out).expanduser()
    if shard_size < 1:
        raise ClipftUsageError(f"shards: --shard-size must be >= 1, got {shard_size}")
    if not source.exists():
        raise ClipftUsageError(f"shards: {source} not found; give an image folder or a .csv/.tsv/.jsonl file")
    folder = source.is_dir()
    _check_out(out, source, overwrite, clip_benchmark)
    skipped: list = []
    if folder:
        if label_column is not None or (image_column, caption_column) != ("image", "caption"):
            raise ClipftUsageError("shards: --image-column, --caption-column and --label-column are for "
                                   "a table of pairs, not an image folder")
        parts, classnames = _folder_samples(source, templates, skipped, clip_benchmark)
        captions = "class-prompts"
    else:
        samples, classnames = _table_samples(source, image_column, caption_column, label_column, skipped)
        parts = {("val" if clip_benchmark else ""): (source, samples)}
        captions = "captions"
    for where, samples in parts.values():
        if not samples:
            raise ClipftUsageError(f"shards: none of the images of {where} could be read "
                                   f"({len(skipped)} unreadable)")
    cb_templates = ([clip_benchmark_template(t) for t in templates]
                    if clip_benchmark and classnames is not None else None)

    out.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale(out, {_WORK})
    tmp = atomic.make_temp_dir(out / _WORK)
    kept = dict(captions=captions, shuffle_seed=shuffle_seed, shard_size=shard_size)
    try:
        if not clip_benchmark:
            manifest = _write_set(tmp, parts[""][1], classnames, SHARD_PATTERN, source=source, **kept)
            _commit(tmp, out, [s["name"] for s in manifest["shards"]]
                    + ([CLASSNAMES] if classnames is not None else []))
        else:
            manifests = {}
            for split, (where, samples) in parts.items():
                name = CB_SPLITS[split]
                (tmp / name).mkdir()
                m = _write_set(tmp / name, samples, classnames, CB_PATTERN, source=where, **kept)
                atomic.write_text(tmp / name / CB_NSHARDS, f"{len(m['shards'])}\n")
                manifests[name] = m
            if classnames is not None:
                atomic.write_text(tmp / CLASSNAMES, "".join(f"{c}\n" for c in classnames))
                atomic.write_text(tmp / CB_TEMPLATES, "".join(f"{t}\n" for t in cb_templates))
            else:   # captions without labels: clip_benchmark's zero-shot retrieval reads `txt`
                atomic.write_text(tmp / CB_TYPE, "retrieval\n")
            _commit_clip_benchmark(tmp, out, manifests)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    skipped = [{"path": p, "reason": r} for p, r in skipped]
    if not clip_benchmark:
        return {**manifest, "out": str(out), "classnames": classnames, "urls": _urls(out, manifest),
                "skipped": skipped}
    doc = {
        "format": "clip_benchmark-wds", "out": str(out), "name": out.resolve().name,
        "splits": {k: {**m, "urls": _urls(out / k, m)} for k, m in manifests.items()},
        "samples": sum(m["samples"] for m in manifests.values()),
        "classes": len(classnames) if classnames is not None else None, "classnames": classnames,
        "templates": cb_templates, "dataset_type": "classification" if classnames is not None else "retrieval",
        "captions": captions, "skipped": skipped,
    }
    return {**doc, "command": clip_benchmark_command(doc)}


def clip_benchmark_command(doc: dict, export: str = "EXPORT") -> str:
    """The clip_benchmark line that evaluates an export on what
    :func:`write_shards` wrote with ``clip_benchmark=True``. ``local-dir:``
    (open_clip >= 3.0) takes the architecture from the export's
    open_clip_config.json, so clipft's own configs and a changed embed_dim load
    too; clip_benchmark's default ``--output`` puts the model name, slashes and
    all, in the file name, so the line names one."""
    task = "zeroshot_classification" if doc["dataset_type"] == "classification" else "zeroshot_retrieval"
    return (f"clip_benchmark eval --dataset {shlex.quote('wds/' + doc['name'])} --dataset_root "
            f"{shlex.quote(doc['out'])} --split test --task {task} --model local-dir:{export} "
            f"--output {shlex.quote(doc['name'] + '.json')}")


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


def _commit_clip_benchmark(tmp: Path, out: Path, manifests: dict) -> None:
    """As :func:`_commit`, for clip_benchmark's layout: every split loses its
    ``nshards.txt`` (which clip_benchmark needs) and ``shards.json`` (which clipft
    needs) first and gets them back last, after all the shards and the top
    files, so no split of a half-moved set reads as complete to either."""
    if (out / MANIFEST).is_file():   # a plain set at the top, replaced by this one
        (out / MANIFEST).unlink()
    for split in CB_SPLITS.values():
        for name in (CB_NSHARDS, MANIFEST):
            if (out / split / name).is_file():
                (out / split / name).unlink()
    top = sorted(p.name for p in tmp.iterdir() if p.is_file())
    for p in out.iterdir():
        if p.is_file() and _is_ours_cb_top(p.name) and p.name not in top:
            p.unlink()
    for split in CB_SPLITS.values():
        new = [] if split not in manifests else sorted(
            p.name for p in (tmp / split).iterdir() if p.name not in (CB_NSHARDS, MANIFEST))
        if (out / split).is_dir():
            for p in (out / split).iterdir():
                if p.is_file() and _is_ours_cb_split(p.name) and p.name not in new:
                    p.unlink()
            if split not in manifests and not any((out / split).iterdir()):
                (out / split).rmdir()   # a split the new set does not have
        if new:
            (out / split).mkdir(exist_ok=True)
            for name in new:
                os.replace(tmp / split / name, out / split / name)
    for name in top:
        os.replace(tmp / name, out / name)
    for split in manifests:
        for name in (CB_NSHARDS, MANIFEST):
            os.replace(tmp / split / name, out / split / name)
        atomic.fsync_dir(out / split)
    atomic.fsync_dir(out)
