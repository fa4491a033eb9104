"""The ``hf`` source: Hugging Face data found, its columns read, and the
map-style splits (``streaming=true``: :mod:`clipft_hf.stream`).

**Where the data comes from.** ``path`` is tried as a local path first: a
``save_to_disk`` folder (a Dataset, or a DatasetDict whose splits ``split`` and
``val_split`` name), a ``.parquet``/``.arrow`` file or a glob of them (one
split, named ``split``), a folder of them (``datasets`` assigns splits from the
file names: ``train*.parquet``, ``validation/``...), or a folder of images
(``datasets``' ``imagefolder`` builder: class folders, optionally under
``train/``/``validation/``). Only a name that is none of these (``name`` or
``org/name``) goes to the Hub, and not when ``HF_HUB_OFFLINE`` or
``HF_DATASETS_OFFLINE`` is set or the Hub's host does not answer: that is a
usage error at once, saying how to point at local files, never minutes of
retries.

**Rows.** Every row is one sample, named ``SPLIT[ROW]`` (its row in that split)
in ``data_split.json`` and in the reasons of undecodable images. An image is
decoded when its sample is loaded; one that fails (a corrupt PNG, a missing
file, a null) is dropped by the engine's guard and reported by that name with
the decoder's reason (``summary.json``'s ``data.failed_at_load``), as for every
source. Labels and captions are read up front: a null label or caption, or a
label outside the classes, is a usage error naming the row.
"""
from __future__ import annotations

import glob
import io
import os
import socket
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import attrs

from clipft.data import DataBundle, open_image, resolve_templates
from clipft.errors import ClipftUsageError
from clipft_data.common import merge_split_record, restrict_classes, sample_shots, split_items, split_record

#: file suffixes and the ``datasets`` builder that reads them
BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
_TEXT = ("string", "large_string")
_BYTES = ("binary", "large_binary")
_TRUE = ("1", "ON", "YES", "TRUE")


def datasets_module():
    try:
        import datasets
    except ImportError as exc:
        raise ClipftUsageError(f"hf: the Hugging Face datasets library is not installed ({exc}); "
                               "pip install clipft-hf (or pip install datasets)") from None
    return datasets


# -- finding the data --------------------------------------------------------------------
@attrs.frozen
class Found:
    """The splits a path or name gave (name -> Dataset, or IterableDataset when
    streamed), where relative image paths resolve, and what it was."""

    splits: dict
    base: Optional[Path]
    where: str
    #: a save_to_disk Dataset: one split without a name of its own
    single: bool = False
    #: split -> the .parquet/.arrow files it was read from (a stream counts their rows)
    files: dict = attrs.field(factory=dict)


def offline() -> bool:
    return any(os.environ.get(v, "").strip().upper() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_unreachable(timeout: float = 3.0) -> Optional[str]:
    """Why the Hub cannot be reached (None when its host answers): one TCP
    connection, so that a machine without network fails in seconds rather than
    after huggingface_hub's retries. Behind a proxy the check is left to it."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    if not url.hostname:   # not a URL this check understands: datasets will say
        return None
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as exc:
        return f"{url.hostname}:{port} does not answer ({exc})"
    return None


def _looks_local(value: str) -> bool:
    """A name no Hub dataset has: an absolute or relative path, several
    folders deep, a data file's suffix, a glob."""
    return (value.startswith(("/", ".", "~")) or value.count("/") > 1 or os.sep in value.replace("/", "")
            or Path(value).suffix.lower() in BUILDERS or any(c in value for c in "*?["))


def _folder_builder(path: Path) -> Optional[str]:
    """``parquet`` or ``arrow`` for a folder of those files, ``imagefolder`` for
    one of images (whose ``metadata.parquet`` is the image folder's own table)."""
    from clipft.data import IMAGE_EXTENSIONS

    suffixes = {p.suffix.lower() for p in path.rglob("*") if p.is_file() and p.stem != "metadata"}
    for suffix, builder in BUILDERS.items():
        if suffix in suffixes:
            return builder
    return "imagefolder" if suffixes & set(IMAGE_EXTENSIONS) else None


def split_files(folder: Path, D) -> dict:
    """The data files of each split of ``folder``, by ``datasets``' own naming
    rules (``train*.parquet``, ``validation/``, ...; everything is ``train``
    when no name says otherwise), only those of the folder's data kind."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    suffix = next(s for s, b in BUILDERS.items() if b == _folder_builder(folder))
    try:
        found = DataFilesDict.from_patterns(get_data_patterns(str(folder)), base_path=str(folder))
    except Exception as exc:
        raise ClipftUsageError(f"hf: cannot tell the splits of {folder}: {type(exc).__name__}: {exc}") from None
    files = {str(k): [f for f in v if str(f).lower().endswith(suffix)] for k, v in found.items()}
    return {k: v for k, v in files.items() if v}


def _load(D, what: str, *args, **kwargs):
    try:
        return D.load_dataset(*args, **kwargs)
    except ClipftUsageError:
        raise
    except Exception as exc:   # a corrupt file or a bad layout: the reader's words, no traceback
        raise ClipftUsageError(f"hf: cannot read {what}: {type(exc).__name__}: {exc}") from None


def find(opts, D, streaming: bool) -> Found:
    value = opts.path.strip()
    path = Path(value).expanduser()
    common = dict(cache_dir=opts.cache_dir, streaming=streaming)
    if any(c in value for c in "*?["):
        files = sorted(glob.glob(str(path), recursive=True))
        kinds = {BUILDERS.get(Path(f).suffix.lower()) for f in files}
        if not files or len(kinds) != 1 or None in kinds:
            raise ClipftUsageError(f"hf: path={value} matches {len(files)} file(s); it must match .parquet "
                                   "files or .arrow files (one kind)")
        files = {opts.split: files}
        loaded = _load(D, value, kinds.pop(), data_files=files, **common)
        return Found(dict(loaded), Path(files[opts.split][0]).parent, f"{len(files[opts.split])} file(s) {value}",
                     files=files)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            try:
                loaded = D.load_from_disk(str(path))
            except Exception as exc:
                raise ClipftUsageError(f"hf: cannot read the save_to_disk folder {path}: "
                                       f"{type(exc).__name__}: {exc}") from None
            if isinstance(loaded, D.Dataset):
                return Found({opts.split: loaded}, path, f"save_to_disk folder {path}", single=True)
            return Found(dict(loaded), path, f"save_to_disk folder {path}")
        builder = _folder_builder(path)
        if builder is None:
            raise ClipftUsageError(
                f"hf: {path} holds no save_to_disk dataset (dataset_dict.json or state.json), no .parquet or "
                ".arrow files and no images")
        if builder == "imagefolder":
            loaded = _load(D, str(path), builder, data_dir=str(path), **common)
            return Found(dict(loaded), path, f"{builder} folder {path}")
        files = split_files(path, D)
        loaded = _load(D, str(path), builder, data_files=files, **common)
        return Found(dict(loaded), path, f"{builder} folder {path}", files=files)
    if path.is_file():
        builder = BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ClipftUsageError(f"hf: {path} is not a .parquet or .arrow file (for CSV, TSV or JSONL "
                                   "image-caption tables use --data captions:file=...)")
        files = {opts.split: [str(path)]}
        loaded = _load(D, str(path), builder, data_files=files, **common)
        return Found(dict(loaded), path.parent, f"{builder} file {path}", files=files)
    if _looks_local(value):
        raise ClipftUsageError(f"hf: path={value}: no such file or folder")
    return _from_hub(opts, D, value, streaming)


def _from_hub(opts, D, name: str, streaming: bool) -> Found:
    local = ("point path= at local data instead: a save_to_disk folder, .parquet/.arrow files (or a glob or "
             "folder of them) or an image folder; on a machine with network, "
             "datasets.load_dataset(NAME).save_to_disk(DIR) makes one")
    if offline():
        raise ClipftUsageError(f"hf: path={name} is no local file or folder, and the Hub is off "
                               f"(HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set); {local}")
    why = hub_unreachable()
    if why is not None:
        raise ClipftUsageError(f"hf: path={name} is no local file or folder, and the Hub cannot be reached: "
                               f"{why}; {local}")
    loaded = _load(D, f"the Hub dataset {name}", name, opts.config, cache_dir=opts.cache_dir, streaming=streaming)
    return Found(dict(loaded), None, f"Hub dataset {name}" + (f" ({opts.config})" if opts.config else ""))


def pick(found: Found, name: str, option: str):
    if name in found.splits:
        return found.splits[name]
    if found.single:
        raise ClipftUsageError(
            f"hf: {option}={name}: {found.where} holds a single Dataset, not a DatasetDict, so it has no "
            "splits to choose; drop val_split (val_fraction then holds a share out; streaming=true needs a "
            "DatasetDict with a validation split)")
    raise ClipftUsageError(f"hf: {option}={name}: {found.where} has no split '{name}'. "
                           f"Splits: {', '.join(found.splits) or '(none)'}")


# -- columns -----------------------------------------------------------------------------
@attrs.frozen
class Columns:
    image: str
    label: Optional[str]
    caption: Optional[str]


def _dtype(feature) -> Optional[str]:
    return getattr(feature, "dtype", None)


def columns(opts, features, split: str, D) -> Columns:
    """The image, label and caption columns of ``features``, checked: a named
    column that is missing lists the ones there are."""
    if not features:
        raise ClipftUsageError(f"hf: split '{split}' does not declare its columns (features); "
                               "save it with save_to_disk or to_parquet first")
    have = list(features)

    def named(col: str, option: str) -> str:
        if col not in features:
            raise ClipftUsageError(f"hf: {option}={col}: split '{split}' has no column '{col}'. "
                                   f"Columns: {', '.join(have)}. Set image=, label=, caption= to the right ones")
        return col

    image = named(opts.image, "image")
    label = ("label" if "label" in features else None) if opts.label == "auto" else (
        named(opts.label, "label") if opts.label else None)
    caption = next((c for c in ("caption", "text") if c in features), None) if opts.caption == "auto" else (
        named(opts.caption, "caption") if opts.caption else None)
    if label is None and caption is None:
        raise ClipftUsageError(f"hf: split '{split}' has neither a class column nor a caption column "
                               f"(columns: {', '.join(have)}); set label=COLUMN or caption=COLUMN")
    if opts.shots is not None and label is None:
        raise ClipftUsageError(f"hf: shots={opts.shots} needs classes, and split '{split}' has no 'label' "
                               f"column (columns: {', '.join(have)}); set label=COLUMN")
    f = features[image]
    if not (isinstance(f, D.Image) or _dtype(f) in _TEXT + _BYTES
            or (isinstance(f, dict) and ({"bytes", "path"} & set(f)))):
        raise ClipftUsageError(f"hf: image column '{image}' holds {f}, not images (an Image feature, bytes "
                               "or file paths)")
    if label is not None:
        f = features[label]
        if not (isinstance(f, D.ClassLabel) or _dtype(f) in _TEXT or str(_dtype(f)).startswith(("int", "uint"))):
            raise ClipftUsageError(f"hf: label column '{label}' holds {f}; expected a ClassLabel, integers "
                                   "or class names")
    if caption is not None and _dtype(features[caption]) not in _TEXT:
        raise ClipftUsageError(f"hf: caption column '{caption}' holds {features[caption]}, not text")
    return Columns(image, label, caption)


@attrs.frozen
class Labels:
    """Class names in label order and how a row's label value becomes an index."""

    names: list
    column: str
    #: str label values -> index (None: the values are indices already)
    index_of: Optional[dict] = None

    def index(self, value, where: str) -> int:
        if value is None:
            raise ClipftUsageError(f"hf: {where}: label '{self.column}' is null")
        if self.index_of is not None:
            if value not in self.index_of:
                known = list(self.index_of)
                raise ClipftUsageError(f"hf: {where}: label '{value}' is not one of the classes "
                                       f"({', '.join(known[:10])}{', ...' if len(known) > 10 else ''})")
            return self.index_of[value]
        if not 0 <= int(value) < len(self.names):
            extra = " (-1: the row is unlabelled)" if int(value) == -1 else ""
            raise ClipftUsageError(f"hf: {where}: label {value} is outside the {len(self.names)} classes{extra}")
        return int(value)


def labels_of(opts, feature, column: str, D, values=()) -> Labels:
    """Class names from the ClassLabel, ``classes``, or a str column's sorted
    ``values``; an int column without a ClassLabel needs ``classes``."""
    given = list(opts.classes) if opts.classes else None
    if isinstance(feature, D.ClassLabel):
        if given and len(given) != feature.num_classes:
            raise ClipftUsageError(f"hf: classes= names {len(given)} classes, the ClassLabel '{column}' "
                                   f"{feature.num_classes} ({', '.join(feature.names[:10])})")
        return Labels(given or list(feature.names), column)
    if _dtype(feature) in _TEXT:
        names = given or sorted({v for v in values if v is not None})
        if not names:
            raise ClipftUsageError(f"hf: label column '{column}' holds class names: pass classes=a,b,c "
                                   "(or @FILE) in label order")
        return Labels(names, column, {n: i for i, n in enumerate(names)})
    if not given:
        raise ClipftUsageError(
            f"hf: label column '{column}' holds integers ({feature}) without class names (it is not a "
            "ClassLabel); pass classes=a,b,c (or classes=@FILE, one name a line) in label order")
    return Labels(given, column)


def same_classes(train_ds, val_ds, column: Optional[str], opts, D) -> None:
    """A usage error when the two splits' ClassLabels name different classes."""
    if column is None:
        return
    a, b = train_ds.features[column], val_ds.features[column]
    if isinstance(a, D.ClassLabel) and isinstance(b, D.ClassLabel) and a.names != b.names:
        raise ClipftUsageError(f"hf: the label '{column}' of split '{opts.split}' has the classes "
                               f"{a.names[:10]}, of split '{opts.val_split}' {b.names[:10]}; they must agree")


def display_names(opts, names: list) -> list:
    return [n.replace("_", " ") if opts.underscores_to_spaces else n for n in names]


# -- images ------------------------------------------------------------------------------
def raw_images(ds, column: str, D):
    """``ds`` with just the image column, an Image feature left undecoded
    (``{"bytes", "path"}``): this source decodes, so a bad image fails the way
    every source's does."""
    ds = ds.select_columns([column])
    if isinstance(ds.features[column], D.Image):
        ds = ds.cast_column(column, D.Image(decode=False))
    return ds


def open_value(value, base: Optional[Path]):
    """An RGB PIL image from a row's image value: a PIL image, ``{"bytes",
    "path"}``, bytes, or a path (relative to ``base``); raises the decoder's
    error, or ValueError for a null."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if value is None:
        raise ValueError("the row has no image (null)")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return open_image(io.BytesIO(bytes(value)))
    p = Path(str(value)).expanduser()
    return open_image(p if p.is_absolute() or base is None else base / p)


class RowDataset:
    """Samples ``(name, caption, label, row)`` of one ``datasets.Dataset``
    (``table``: its image column, undecoded), decoded on access; a failing
    image raises, and the engine reports it by :meth:`sample_name`."""

    def __init__(self, table, column: str, items: list, base: Optional[Path], transform):
        self.table, self.column, self.items = table, column, list(items)
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.items)

    def sample_name(self, i) -> str:
        return self.items[i][0]

    def __getitem__(self, i):
        name, caption, label, row = self.items[i]
        image = open_value(self.table[row][self.column], self.base)
        return i, self.transform(image), caption, label


# -- the map-style source ----------------------------------------------------------------
def _column(ds, col: Optional[str]) -> Optional[list]:
    return None if col is None else list(ds[col])


def _rows(ds, split: str, cols: Columns, labels: Optional[Labels], notes: dict) -> list:
    """``(name, caption, label, row)`` of every row; captions checked (a null is
    an error, NULs removed and empty ones counted in ``notes``)."""
    caps, values = _column(ds, cols.caption), _column(ds, cols.label)
    items = []
    for row in range(len(ds)):
        name = f"{split}[{row}]"
        label = labels.index(values[row], f"split '{split}' row {row}") if labels else -1
        caption = None
        if caps is not None:
            caption = caps[row]
            if caption is None:
                raise ClipftUsageError(f"hf: split '{split}' row {row}: caption '{cols.caption}' is null")
            if "\0" in caption:
                notes["nul"] += 1
                caption = caption.replace("\0", "")
            if not caption.strip():
                notes["empty"] += 1
        items.append((name, caption, label, row))
    return items


def _caption_warnings(where: str, notes: dict) -> list:
    out = []
    if notes["nul"]:
        out.append(f"hf: {where}: {notes['nul']} caption(s) held NUL characters, removed")
    if notes["empty"]:
        out.append(f"hf: {where}: {notes['empty']} caption(s) are empty; those images train against an empty text")
    return out


def build_hf(opts, ctx) -> DataBundle:
    D = datasets_module()
    found = find(opts, D, opts.streaming)
    if opts.streaming:
        from clipft_hf.stream import build_stream
        return build_stream(opts, ctx, found, D)
    train_ds = pick(found, opts.split, "split")
    val_ds = pick(found, opts.val_split, "val_split") if opts.val_split else None
    cols = columns(opts, train_ds.features, opts.split, D)
    if val_ds is not None:   # the same columns, by the names the train split resolved to
        columns(attrs.evolve(opts, image=cols.image, label=cols.label, caption=cols.caption),
                val_ds.features, opts.val_split, D)
        same_classes(train_ds, val_ds, cols.label, opts, D)
    warnings: list = []
    if val_ds is None and not opts.val_split:
        held = [s for s in found.splits if s in ("validation", "valid", "val") and s != opts.split]
        if held:
            warnings.append(f"hf: {found.where} has a '{held[0]}' split, not used: val_fraction="
                            f"{opts.val_fraction:g} of '{opts.split}' is held out instead; "
                            f"pass val_split={held[0]}")
    labels = None
    if cols.label is not None:
        feature = train_ds.features[cols.label]
        seen = []   # a column of class names without classes=: its values are the classes
        if _dtype(feature) in _TEXT and not opts.classes:
            seen = _column(train_ds, cols.label) + (_column(val_ds, cols.label) if val_ds is not None else [])
        labels = labels_of(opts, feature, cols.label, D, seen)
    notes = {"nul": 0, "empty": 0}
    train = _rows(train_ds, opts.split, cols, labels, notes)
    if val_ds is not None:
        val = _rows(val_ds, opts.val_split, cols, labels, notes)
    else:
        train, val = split_items(train, opts.val_fraction, ctx.seed, by_label=labels is not None)
    warnings += _caption_warnings(found.where, notes)
    if not train:
        raise ClipftUsageError(f"hf: split '{opts.split}' of {found.where} has no rows to train on")
    data_names = list(labels.names) if labels else None
    if opts.class_half != "all":   # after the val split, so a class's val rows are the same in either half
        data_names, (train, val) = restrict_classes(data_names, opts.class_half, train, val)
        if not train:
            raise ClipftUsageError(f"hf: class_half={opts.class_half} of {found.where} has no rows to train on")
    names = display_names(opts, data_names) if labels else None
    if opts.shots is not None:   # after the val split, so val is the same with and without shots
        train, shot_warnings = sample_shots(train, data_names, opts.shots, opts.shots_seed, opts.shots_min,
                                            lambda it: it[0], "hf", unit="row")
        warnings += shot_warnings
    templates = resolve_templates(opts.templates)
    if cols.caption is None:   # labelled rows are captioned with class prompts, templates in turn
        train = [(n, templates[i % len(templates)].format(names[y]), y, r) for i, (n, _, y, r) in enumerate(train)]
        val = [(n, templates[i % len(templates)].format(names[y]), y, r) for i, (n, _, y, r) in enumerate(val)]
    images = raw_images(train_ds, cols.image, D)
    val_images = raw_images(val_ds, cols.image, D) if val_ds is not None else images
    return DataBundle(
        train=RowDataset(images, cols.image, train, found.base, ctx.transform_train),
        val=RowDataset(val_images, cols.image, val, found.base, ctx.transform_val),
        classnames=names, templates=templates, has_captions=cols.caption is not None,
        description=f"hf {found.where}" + (f" ({opts.shots}-shot)" if opts.shots else "")
        + (f" ({opts.class_half} classes)" if opts.class_half != "all" else ""),
        split=merge_split_record(split_record(opts, train) if opts.shots is not None else None,
                                 list(labels.names) if labels else [], opts.class_half), warnings=warnings)
