"""What a data source returns, and the shared pieces every source uses.

Datasets yield ``(index, image_tensor, caption, label)``: ``caption`` is the
paired text ("" when there is none), ``label`` the class index (-1 when the data
has no classes). ``index`` lets the engine cache per-sample embeddings of frozen
towers. A sample whose image fails to decode yields ``None``; the collate
function drops it and counts it.

A split is either map-style (``__len__``, ``__getitem__``) or a
``torch.utils.data.IterableDataset`` (a stream, such as WebDataset shards),
whose length per epoch the bundle gives (``train_length``, ``val_length``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import attrs

from clipft.errors import ClipftUsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_TEMPLATES = ("a photo of a {}.",)


@attrs.define
class DataContext:
    """Handed to ``DataSourceSpec.build(options, ctx)``."""

    transform_train: Callable
    transform_val: Callable
    seed: int
    #: True when ``transform_train`` has no random augmentation
    deterministic_train: bool = True
    #: DataLoader worker processes per rank (0: the main process loads); an
    #: iterable source that splits its shards across workers checks it has enough
    num_workers: int = 0


@attrs.define
class DataBundle:
    train: object
    val: object
    #: class names in label order; None for caption data without labels
    classnames: Optional[list] = None
    #: prompt templates with one "{}" for the class name
    templates: Sequence[str] = DEFAULT_TEMPLATES
    #: True when captions are real per-image text (enables recall@k)
    has_captions: bool = False
    #: files found unreadable while indexing the data (path, reason)
    skipped: list = attrs.field(factory=list)
    description: str = ""
    #: how the training split was chosen, when it is a sample (few-shot):
    #: ``{"shots": K, "shots_seed": s, "train": [paths...]}``, and how the val
    #: split was, when the data named it (``{"val_split": {"by": "val_file", ...}}``);
    #: the engine writes it to ``RUN/data_split.json`` so the split can be audited,
    #: and ``shots`` and ``val_split`` to ``summary.json``'s ``data``
    split: Optional[dict] = None
    #: messages for the user, shown when the run starts (a class taken whole
    #: because it has fewer images than ``shots``)
    warnings: list = attrs.field(factory=list)
    #: samples one epoch of an iterable train split yields over all ranks
    #: (required for one: a stream has no ``len``); None for map-style splits
    train_length: Optional[int] = None
    #: samples in an iterable val split (None when unknown, or map-style)
    val_length: Optional[int] = None

    @property
    def has_labels(self) -> bool:
        return bool(self.classnames)

    def size(self, split: str) -> Optional[int]:
        """Samples in ``split`` ("train" or "val"): ``len()`` of a map-style
        split, ``train_length``/``val_length`` of an iterable one."""
        dataset = self.train if split == "train" else self.val
        if is_iterable(dataset):
            return self.train_length if split == "train" else self.val_length
        return len(dataset)


def is_iterable(dataset) -> bool:
    """True for a stream (``torch.utils.data.IterableDataset``): no ``len``, no
    indexing, no sampler; the engine iterates it once per epoch."""
    import torch
    return isinstance(dataset, torch.utils.data.IterableDataset)


def read_text_utf8(path, what: str = "file") -> str:
    """The text of ``path`` (UTF-8, a BOM dropped), or a usage error naming the
    file: unreadable, or not UTF-8 (with the line of the first bad byte)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ClipftUsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ClipftUsageError(
            f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
            "save it as UTF-8") from None


def check_templates(templates: Sequence[str]) -> None:
    """A ValueError unless every template has exactly one ``{}`` for the class
    name (``{{`` and ``}}`` are literal braces)."""
    import string
    if not templates:
        raise ValueError("give at least one template with one '{}' for the class name")
    for t in templates:
        if not isinstance(t, str):
            raise ValueError(f"template {t!r} is not a string")
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(t) if f is not None]
            ok = fields in ([""], ["0"]) and isinstance(t.format("x"), str)
        except (ValueError, IndexError, KeyError) as exc:
            raise ValueError(f"template {t!r} is not a valid format string ({exc}); write it with "
                             "one '{}' for the class name ('{{' and '}}' for literal braces)") from None
        if not ok:
            hint = ""
            if not fields:
                found = "no '{}' placeholder"
                # a bare word is most likely a misspelt set name, a comma a split template
                hint = (f" (or name a template set: {', '.join(TEMPLATE_SETS)}, or @FILE with one "
                        "template a line; on the command line a comma separates templates, so put "
                        "templates with commas in a TOML config or a file)")
            elif len(fields) > 1:
                found = f"{len(fields)} placeholders"
            else:
                found = f"the placeholder '{{{fields[0]}}}'"
            raise ValueError(
                f"template {t!r} has {found}; every template needs exactly one '{{}}' for the class "
                f"name{hint}")


#: what a class-folder source's ``classes=`` keeps (the base-to-novel protocol)
CLASS_SPLITS = ("all", "base", "novel")


def base_novel_split(classnames: Sequence[str]) -> tuple[list, list]:
    """CoOp/CoCoOp's base-to-novel rule (``subsample_classes``): the class names
    sorted (as the data spells them), the first half base and the rest novel;
    with an odd count base gets the extra one. Independent of listing order."""
    ordered = sorted(classnames)
    cut = (len(ordered) + 1) // 2
    return ordered[:cut], ordered[cut:]


def keep_classes(classnames: Sequence[str], which: str) -> list[int]:
    """Indices into ``classnames`` of the classes ``classes=which`` keeps, in
    ``classnames``' own order (so label order within a half is the data's)."""
    if which not in CLASS_SPLITS:
        raise ClipftUsageError(f"classes={which}: expected one of {', '.join(CLASS_SPLITS)}")
    if which == "all":
        return list(range(len(classnames)))
    base, novel = base_novel_split(classnames)
    kept = set(base if which == "base" else novel)
    return [i for i, name in enumerate(classnames) if name in kept]


def class_split_record(classnames: Sequence[str], which: str) -> dict:
    """What ``data_split.json`` (and ``summary.json``'s ``data``) say about a
    ``classes=base|novel`` source: the half and the class names it kept."""
    return {"classes": which, "class_names": [classnames[i] for i in keep_classes(classnames, which)],
            "rule": "class names sorted, first half base (odd: base gets the extra one)"}


#: named template sets for a ``templates`` option (``templates=openai-imagenet``)
TEMPLATE_SETS = ("simple", "openai-imagenet")


def _template_set(name: str) -> tuple:
    if name == "simple":
        return DEFAULT_TEMPLATES
    # open_clip's own copy of the 80 prompts of CLIP's ImageNet evaluation.
    # Imported here: importing open_clip loads torch, and listing plugins or
    # validating options must stay fast
    try:
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
    except ImportError as exc:
        raise ClipftUsageError(f"templates={name}: this open_clip has no zero_shot_metadata "
                               f"({exc}); list the templates instead") from None
    # stored as lambdas (f-strings); formatting one with "{}" gives the template
    return tuple(t("{}") if callable(t) else str(t) for t in OPENAI_IMAGENET_TEMPLATES)


def _template_file(ref: str) -> tuple:
    """``@FILE``: one template a non-empty line; a bad line is named."""
    if not ref[1:].strip():
        raise ClipftUsageError("templates=@FILE needs a file name after '@'")
    path = Path(ref[1:].strip()).expanduser()
    text = read_text_utf8(path, "templates file")
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            check_templates([line])
        except ValueError as exc:
            raise ClipftUsageError(f"templates file {path}:{n}: {exc}") from None
        out.append(line)
    if not out:
        raise ClipftUsageError(f"templates file {path} has no templates (one a line, each with one '{{}}')")
    return tuple(out)


def resolve_templates(value, keep_names: bool = False) -> tuple:
    """Prompt templates from what a user wrote for ``templates``: a string or a
    sequence of strings, each a template with one ``{}``, the name of a set in
    :data:`TEMPLATE_SETS` (``simple``: ``("a photo of a {}.",)``;
    ``openai-imagenet``: open_clip's 80 ImageNet templates) or ``@FILE`` (one
    template a non-empty line, UTF-8). Names and files expand in place.

    ``keep_names=True`` leaves set names as they are (files still expand): the
    form a run's ``config.toml`` keeps, short and still exact, while a file's
    content is recorded because the file may change or move. A bad template, an
    unknown word or an unreadable file is a :class:`ClipftUsageError`."""
    items = (value,) if isinstance(value, str) else tuple(value)
    out: list = []
    for item in items:
        if not isinstance(item, str):
            raise ClipftUsageError(f"template {item!r} is not a string")
        word = item.strip()   # a template itself is kept as written
        if word in TEMPLATE_SETS:
            out.extend((word,) if keep_names else _template_set(word))
        elif word.startswith("@"):
            out.extend(_template_file(word))
        else:
            try:
                check_templates([item])
            except ValueError as exc:
                raise ClipftUsageError(str(exc)) from None
            out.append(item)
    if not out:
        raise ClipftUsageError("give at least one template with one '{}' for the class name, "
                               f"a named set ({', '.join(TEMPLATE_SETS)}) or @FILE")
    return tuple(out)


def class_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    return [[t.format(c) for t in templates] for c in classnames]


def open_image(path):
    """Decode an image to RGB; what fails to decode raises (PIL's error, whose
    text is the reason a skipped file is reported with)."""
    from PIL import Image
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def load_image(path) -> Optional[object]:
    """Decode an image to RGB, or return None when it cannot be decoded."""
    try:
        return open_image(path)
    except Exception:
        return None


def check_image(path) -> Optional[str]:
    """Cheap validity check used while indexing: returns the reason it is bad."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.verify()
        return None
    except Exception as exc:
        return reason_of(exc)


def reason_of(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class _Failed:
    """Marker for a sample that could not be produced (picklable for workers);
    ``index`` is None when an iterable dataset yielded a bare None. ``name``
    and ``reason`` say which sample and why, when known. ``part`` marks a
    part of a stream that yielded no samples at all (an unreadable shard,
    ``samples`` of them lost when known): reported, but not a sample slot."""

    __slots__ = ("index", "name", "reason", "part", "samples")

    def __init__(self, index, name=None, reason=None, part=False, samples=None):
        self.index, self.name, self.reason = index, name, reason
        self.part, self.samples = part, samples


def failed_sample(index, name: str, reason: str) -> _Failed:
    """What a stream yields for a sample it cannot decode: ``index`` identifies
    it across epochs (counted once), ``name`` (shard and key, say) and
    ``reason`` are reported in ``summary.json`` and the run's warnings."""
    return _Failed(index, str(name), str(reason))


def unreadable_part(name: str, reason: str, samples: Optional[int] = None) -> _Failed:
    """What a stream yields for a part of its data that it cannot read (a
    shard), with the ``samples`` it would have held when known."""
    return _Failed(None, str(name), str(reason), part=True, samples=samples)


def _name_of(dataset, i) -> Optional[str]:
    describe = getattr(dataset, "sample_name", None)
    try:
        return str(describe(i)) if callable(describe) else None
    except Exception:
        return None


class GuardedDataset:
    """Wraps a source's dataset so that a sample that fails to decode (None) or
    raises while loading/transforming becomes a marker instead of a crash,
    named by the dataset's ``sample_name(i)`` when it has one."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            item = self.dataset[i]
        except Exception as exc:
            return _Failed(i, _name_of(self.dataset, i), reason_of(exc))
        return _Failed(i, _name_of(self.dataset, i), "could not be decoded") if item is None else item


def guard(dataset):
    """A dataset whose failed samples are markers for :func:`collate`:
    :class:`GuardedDataset` for a map-style one; for an iterable one, a stream
    that turns a yielded None (or ``(index, None, caption, label)``, which names
    the sample) into a marker, and passes the markers of :func:`failed_sample`
    and :func:`unreadable_part` through."""
    if not is_iterable(dataset):
        return GuardedDataset(dataset)
    from clipft.guarded_stream import GuardedStream
    return GuardedStream(dataset, _Failed)


#: failures kept by name for the summary (the count covers them all)
NAMED_FAILURES = 20


class DecodeFailures:
    """Distinct samples dropped at batch time, counted in the main process so
    DataLoader workers do not lose the count; a sample failing every epoch
    counts once. The first :data:`NAMED_FAILURES` named ones are kept with
    their reason, and unreadable parts of a stream (shards) by name."""

    def __init__(self):
        self._seen: set = set()
        self._unnamed = 0   # failures a stream reported without an index, each counted
        self.named: dict = {}   # (key, index) -> (name, reason)
        self.parts: dict = {}   # (key, name) -> (reason, samples or None)

    def add(self, key, indices, notes=()) -> None:
        for i in indices:
            if i is None:
                self._unnamed += 1
            else:
                self._seen.add((key, int(i)))
        for m in notes:
            if m.part:
                self.parts.setdefault((key, m.name), (m.reason, m.samples))
            elif m.name is not None and len(self.named) < NAMED_FAILURES:
                # a stream's failure without an index is each time a new one
                ident = ("unindexed", len(self.named)) if m.index is None else int(m.index)
                self.named.setdefault((key, ident), (m.name, m.reason))

    @property
    def count(self) -> int:
        return len(self._seen) + self._unnamed

    def examples(self) -> list:
        """``(name, reason)`` of the named failures, the first ones first."""
        return list(self.named.values())

    def describe(self) -> str:
        """The failures in one phrase, for an error or a warning."""
        parts = len(self.parts)
        lost = sum(s for _, s in self.parts.values() if s)
        said = [f"{parts} shard(s) could not be read" + (f" ({lost} samples)" if lost else "")] if parts else []
        if self.count or not parts:
            said.append(f"{self.count} sample(s) could not be decoded")
        text = " and ".join(said)
        first = next(iter(self.parts.items()), None)
        if first is not None:
            text += f", e.g. {first[0][1]} ({first[1][0]})"
        elif self.named:
            name, reason = next(iter(self.named.values()))
            text += f", e.g. {name} ({reason})"
        return text


def collate(items):
    import torch
    marks = [x for x in items if isinstance(x, _Failed)]
    failed = [x.index for x in marks if not x.part]
    notes = [x for x in marks if x.part or x.name is not None]
    good = [x for x in items if not isinstance(x, _Failed)]
    if not good:
        return {"failed": failed, "images": None, "notes": notes}
    idx, imgs, caps, labels = zip(*good)
    return {
        "index": torch.tensor(idx, dtype=torch.long),
        "images": torch.stack(imgs),
        "captions": list(caps),
        "labels": torch.tensor(labels, dtype=torch.long),
        "failed": failed,
        "notes": notes,
    }


def _slots(batch: dict) -> int:
    """Samples a collated batch stands for, the failed ones included."""
    return len(batch["failed"]) + (0 if batch["images"] is None else len(batch["index"]))


def _joined(parts: list) -> dict:
    import torch
    good = [p for p in parts if p["images"] is not None]
    out = {"failed": [i for p in parts for i in p["failed"]], "images": None,
           "notes": [n for p in parts for n in p.get("notes", ())]}
    if good:
        out.update(index=torch.cat([p["index"] for p in good]), images=torch.cat([p["images"] for p in good]),
                   captions=[c for p in good for c in p["captions"]],
                   labels=torch.cat([p["labels"] for p in good]))
    return out


def _split(batch: dict, n: int) -> tuple[dict, dict]:
    """The first ``n`` samples of a collated batch (failed ones first) and the rest."""
    failed = batch["failed"]
    k = min(n, len(failed))
    # the notes only name failures: they go with the head, reported at once
    head = {"failed": failed[:k], "images": None, "notes": batch.get("notes", [])}
    tail = {"failed": failed[k:], "images": None, "notes": []}
    good = n - k
    if batch["images"] is not None:
        for part, sl in ((head, slice(0, good)), (tail, slice(good, None))):
            if len(batch["index"][sl]):
                part.update(index=batch["index"][sl], images=batch["images"][sl],
                            captions=batch["captions"][sl], labels=batch["labels"][sl])
    return head, tail


def rebatch(batches, size: int):
    """Collated batches re-cut to ``size`` samples each (failed ones counted), the
    last one shorter: each DataLoader worker of a stream ends on its own short
    batch, and this keeps the count of an epoch at ``ceil(samples / size)``.
    Full batches pass through as they are."""
    pending, held = [], 0
    for b in batches:
        n = _slots(b)
        if n == size and not pending:
            yield b
            continue
        pending.append(b)
        held += n
        while held >= size:
            whole = _joined(pending)
            out, rest = _split(whole, size)
            yield out
            held -= size
            pending = [rest] if held else []
    if held or any(p.get("notes") for p in pending):   # a batch of notes only: still reported
        yield _joined(pending)


def _one_thread_each(it):
    """``it``'s items, each produced with torch's intra-op threads set to one
    (the caller's count back in between): a DataLoader without workers decodes
    in the main process as a worker would, where a worker runs on one thread.
    A sample's tensors (a 224x224 image is 150k values) are too small to gain
    from several threads, and with them every element-wise op of the transforms
    and of collate pays a thread-team hand-off, which stalls while the other
    cores are busy: on a shared 2-core machine 4 ms an image on one thread,
    30-80 ms on two (on an idle one, 1.3 ms either way). The bytes are the same
    (element-wise ops do not depend on the thread count), and the model's
    forward between two items keeps the caller's threads."""
    import torch

    while True:
        threads = torch.get_num_threads()
        if threads > 1:
            torch.set_num_threads(1)
        try:
            item = next(it)
        except StopIteration:
            return
        finally:
            if threads > 1:
                torch.set_num_threads(threads)
        yield item


class Batches:
    """Iterates a DataLoader, records dropped samples and yields only usable
    batches (so the training loop never sees an empty one).

    Over a stream (an iterable dataset) the worker batches are re-cut to the
    batch size (:func:`rebatch`), and ``skip`` batches are read and dropped
    first: a stream cannot seek, so a resume part-way into an epoch reads the
    epoch again up to where the checkpoint was taken."""

    def __init__(self, loader, failures: DecodeFailures, key, skip: int = 0, limit: int | None = None):
        self.loader, self.failures, self.key = loader, failures, key
        #: a stream's batches from position ``limit`` on are read (failures
        #: recorded) but not yielded: its short last batch under drop-last
        self.skip, self.limit = skip, limit

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        # the DataLoader's iterator (and its global RNG draw) is created here,
        # not at the first batch: a resume restores the RNG right after it
        it = iter(self.loader)
        if not getattr(self.loader, "num_workers", 0):
            it = _one_thread_each(it)
        if is_iterable(self.loader.dataset):
            return self._usable(rebatch(it, self.loader.batch_size), 0, self.skip)
        return self._usable(it, getattr(self.loader.sampler, "skip", 0) // max(1, self.loader.batch_size or 1))

    def _usable(self, it, first: int, drop: int = 0):
        for position, batch in enumerate(it, start=first):
            if batch["failed"] or batch.get("notes"):
                self.failures.add(self.key, batch["failed"], batch.get("notes", ()))
            if position < drop:   # read again on a resume, trained on already
                continue
            if self.limit is not None and position >= self.limit:
                continue
            if batch["images"] is not None:
                batch["position"] = position
                yield batch
