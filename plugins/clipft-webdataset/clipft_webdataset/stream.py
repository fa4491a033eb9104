"""The ``webdataset`` source: shards resolved and counted, and the stream that
reads them.

**Readers.** Every DataLoader worker of every rank is one reader, ``slot =
rank * num_workers + worker`` of ``world_size * max(1, num_workers)``. Without
``resampled``, the train shards are shuffled with the epoch's seed (the same
on every rank) and reader ``slot`` takes shards ``slot, slot + readers, ...``:
each shard, and so each sample, is read exactly once per epoch. Fewer shards
than readers is a usage error: a reader with nothing to read leaves its rank
short of batches, which hangs distributed training (webdataset #188). With
``resampled`` each reader draws shards with replacement from a generator
seeded by the epoch's seed and its slot, and stops after its share of
``samples_per_epoch``. The val split is read in url order, split by worker
only: every rank reads all of it.

**Samples.** A reader's samples pass through a shuffle buffer
(``shuffle_buffer``, seeded by the epoch's seed and the slot; train only),
then are decoded: the first present key of ``image_key``, the ``caption_key``
text (a class prompt when there is none), the ``label_key`` class index. The
dataset yields ``(index, image_tensor, caption, label)`` with ``index`` a
running number unique in the epoch (``n * readers + slot``); a sample whose
image (or label) cannot be decoded yields a :func:`clipft.data.failed_sample`
marker whose index is a hash of its shard and key, so the engine counts it once
however often it is read, and names it by shard and key.
A shard that cannot be read is skipped and reported (its name, why, and the
samples it lost); an epoch in which nothing could be read stops the run.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import random
import re
import tarfile
from pathlib import Path
from typing import Optional

import torch

from clipft.data import DataBundle, failed_sample, reason_of, resolve_templates, unreadable_part
from clipft.errors import ClipftUsageError

MANIFEST = "shards.json"
CLASSNAMES = "classnames.txt"
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")   # webdataset's key.suffix rule


# -- readers -----------------------------------------------------------------------
def reader_info() -> tuple[int, int, int, int]:
    """``(rank, world_size, worker, num_workers)`` of the calling process:
    torch.distributed's rank when it is initialized (else 0 of 1), and the
    DataLoader worker (0 of 1 in the main process)."""
    import torch.distributed as dist
    rank, world = 0, 1
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank, world, worker, workers


def check_readers(n_shards: int, world_size: int, num_workers: int, resampled: bool = False) -> None:
    """A usage error when ``n_shards`` train shards cannot give every reader
    (``world_size`` ranks × ``num_workers`` DataLoader workers) one shard."""
    readers = world_size * max(1, num_workers)
    if resampled or n_shards >= readers:
        return
    raise ClipftUsageError(
        f"webdataset: {n_shards} train shard(s) for {world_size} rank(s) × {max(1, num_workers)} DataLoader "
        f"worker(s) = {readers} readers; a reader without a shard leaves its rank short of batches, which "
        "hangs distributed training (webdataset #188). Write at least that many shards (clipft shards "
        "--shard-size N, smaller), lower --num-workers, or pass resampled=true with samples_per_epoch")


def shards_for(urls: list, rank: int, world_size: int, worker: int, num_workers: int,
               seed: Optional[int] = None) -> list:
    """The shards reader ``(rank, worker)`` reads in one epoch, in order, without
    resampling: ``urls`` shuffled by ``seed`` (None: as given), then every
    ``world_size * num_workers``-th one from the reader's slot. Over all readers
    each shard comes exactly once."""
    num_workers = max(1, num_workers)
    check_readers(len(urls), world_size, num_workers)
    if not (0 <= rank < world_size and 0 <= worker < num_workers):
        raise ValueError(f"reader (rank {rank}, worker {worker}) outside {world_size} × {num_workers}")
    order = list(urls)
    if seed is not None:
        random.Random(seed).shuffle(order)
    readers = world_size * num_workers
    return order[rank * num_workers + worker::readers]


def share(n: int, part: int, parts: int) -> int:
    """Part ``part`` of ``n`` split evenly into ``parts`` (the first ``n % parts`` take one more)."""
    return n // parts + (1 if part < n % parts else 0)


def _mix(*parts) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")


# -- shards on disk ------------------------------------------------------------------
def _local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def count_samples(path) -> int:
    """Samples in a local tar shard, counted as webdataset groups its members
    (consecutive files sharing the name before the first dot), from the headers only."""
    n, last = 0, None
    try:
        with tarfile.open(path, "r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                name = info.name
                if "/" not in name and name.startswith("__") and name.endswith("__"):
                    continue
                m = _KEY.match(name)
                if m is None:
                    continue
                if m.group(1) != last:
                    n, last = n + 1, m.group(1)
    except (OSError, tarfile.TarError) as exc:
        raise ClipftUsageError(f"webdataset: cannot read shard {path}: {exc}") from None
    return n


def _manifest(folder: Path) -> Optional[dict]:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        counts = {s["name"]: int(s["samples"]) for s in doc["shards"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ClipftUsageError(f"webdataset: {path} is not a clipft shards manifest: {exc}") from None
    return {**doc, "counts": counts}


def resolve_urls(value: str, option: str) -> tuple[list, Optional[dict], Optional[Path]]:
    """The shard urls an option names, the manifest beside them (or None) and
    the folder they are in (None for remote urls)."""
    from webdataset.shardlists import expand_urls

    value = value.strip()
    path = Path(value).expanduser()
    if _local(value) and path.is_dir():
        manifest = _manifest(path)
        if manifest is not None:
            urls = [str(path / s["name"]) for s in manifest["shards"]]
        else:
            urls = sorted(str(p) for p in path.glob("*.tar"))
        if not urls:
            raise ClipftUsageError(f"webdataset: {option}={value}: the folder has no {MANIFEST} and no .tar "
                                   "shards; write them with `clipft shards`")
        return urls, manifest, path
    urls = [str(Path(u).expanduser()) if _local(u) else u for u in expand_urls(value)]
    if not urls:
        raise ClipftUsageError(f"webdataset: {option}={value} names no shards")
    missing = [u for u in urls if _local(u) and not Path(u).is_file()]
    if missing:
        raise ClipftUsageError(
            f"webdataset: {option}={value}: {len(missing)} of {len(urls)} shard(s) not found, "
            f"e.g. {missing[0]}")
    folder = Path(urls[0]).parent if _local(urls[0]) else None
    return urls, (_manifest(folder) if folder is not None else None), folder


def _counts(urls: list, manifest: Optional[dict]) -> Optional[list]:
    """Samples per shard: the manifest's, else counted; None when a remote shard
    has no count."""
    known = (manifest or {}).get("counts", {})
    out = []
    for u in urls:
        name = Path(u).name
        if name in known and _local(u):
            out.append(known[name])
        elif _local(u):
            out.append(count_samples(u))
        else:
            return None
    return out


# -- the stream ----------------------------------------------------------------------
_UNREADABLE = "__clipft_unreadable__"


def _reason(exn: BaseException) -> str:
    # webdataset appends the stream and url to the exception's args; the first is the message
    text = str(exn.args[0]) if exn.args else str(exn)
    return f"{type(exn).__name__}: {text.split(' @ ')[0]}"


def read_shards(urls, counts: Optional[dict] = None):
    """The samples of ``urls``, one shard after another; a shard that cannot be
    read (all of it, or from some point on) is followed by a record naming it,
    why, and how many of its samples were lost (when its count is known)."""
    from webdataset.tariterators import tarfile_samples

    for url in urls:
        errors: list = []
        read = 0
        for sample in tarfile_samples([{"url": url}], handler=lambda exn: errors.append(exn) or True):
            read += 1
            yield sample
        if errors:
            known = (counts or {}).get(url)
            yield {_UNREADABLE: url, "reason": _reason(errors[0]),
                   "lost": max(0, known - read) if known is not None else None}


class ShardStream(torch.utils.data.IterableDataset):
    """One split of WebDataset shards; see the module docstring. ``train``
    shuffles (shards per epoch, samples in a buffer) and splits by rank;
    ``set_epoch(seed)`` sets the epoch's seed (the engine calls it before each
    train pass). ``counts`` (url -> samples) says what an unreadable shard lost."""

    def __init__(self, urls, transform, *, image_keys, caption_key, label_key, classnames, templates,
                 train: bool, shuffle_buffer: int = 0, resampled: bool = False, length: int = 0,
                 seed: int = 0, counts: Optional[dict] = None):
        self.urls, self.transform = list(urls), transform
        self.image_keys, self.caption_key, self.label_key = tuple(image_keys), caption_key, label_key
        self.classnames, self.templates = list(classnames or []), tuple(templates)
        self.train, self.shuffle_buffer, self.resampled = train, shuffle_buffer, resampled
        self.length, self.seed, self.counts = length, seed, dict(counts or {})

    def set_epoch(self, seed: int) -> None:
        self.seed = int(seed)

    def _readers(self):
        rank, world, worker, workers = reader_info()
        if not self.train:   # val: every rank reads all of it
            rank, world = 0, 1
        return rank, world, worker, workers

    def _shards(self, rank, world, worker, workers):
        if not self.train:   # in url order; a val worker left without a shard is harmless
            return self.urls[worker::workers]
        if not self.resampled:
            return shards_for(self.urls, rank, world, worker, workers, self.seed)
        rng = random.Random(_mix("shards", self.seed, rank, worker))
        return (rng.choice(self.urls) for _ in itertools.count())

    def __iter__(self):
        from webdataset.filters import shuffle

        rank, world, worker, workers = self._readers()
        slot, readers = rank * workers + worker, world * workers
        samples = read_shards(self._shards(rank, world, worker, workers), self.counts)
        if self.train and self.shuffle_buffer > 1:
            rng = random.Random(_mix("samples", self.seed, rank, worker))
            samples = shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(samples)
        if self.resampled:
            samples = itertools.islice(samples, share(share(self.length, rank, world), worker, workers))
        for n, sample in enumerate(samples):
            yield self.decode(sample, n * readers + slot)

    def decode(self, sample: dict, index: int):
        """``(index, image_tensor, caption, label)``, or a marker that names the
        sample (shard and key) and why it failed, or the unreadable shard."""
        from PIL import Image

        if _UNREADABLE in sample:
            return unreadable_part(sample[_UNREADABLE], sample["reason"], sample["lost"])

        def failed(reason: str):
            key = sample.get("__key__")
            return failed_sample(_mix("sample", sample.get("__url__"), key) >> 8,
                                 f"{sample.get('__url__')} sample {key}", reason)

        data = next((sample[k] for k in self.image_keys if k in sample), None)
        if data is None:
            return failed(f"no image under {';'.join(self.image_keys)}")
        label = -1
        if self.label_key:
            try:
                label = int(sample[self.label_key].decode("utf-8").strip())
            except (KeyError, ValueError, UnicodeDecodeError, AttributeError):
                return failed(f"no integer class index under '{self.label_key}'")
            if not 0 <= label < len(self.classnames):
                return failed(f"class index {label} is not one of the {len(self.classnames)} classes")
        caption = ""
        if self.caption_key and self.caption_key in sample:
            caption = sample[self.caption_key].decode("utf-8", errors="replace").strip()
        if not caption and label >= 0:
            caption = self.templates[index % len(self.templates)].format(self.classnames[label])
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                image = im.convert("RGB")
            return index, self.transform(image), caption, label
        except Exception as exc:
            return failed(reason_of(exc))


# -- the source ----------------------------------------------------------------------
def _classnames(opts, manifest_folder: Optional[Path]) -> list:
    if opts.classnames:
        return list(opts.classnames)
    path = manifest_folder / CLASSNAMES if manifest_folder is not None else None
    if path is None or not path.is_file():
        raise ClipftUsageError(
            f"webdataset: label_key={opts.label_key} needs class names: classnames=a,b,c, "
            f"classnames=@FILE, or a {CLASSNAMES} beside the shards (clipft shards writes one)")
    from clipft.data import read_text_utf8
    names = [line.strip() for line in read_text_utf8(path, "classnames file").splitlines() if line.strip()]
    if not names:
        raise ClipftUsageError(f"webdataset: {path} has no class names")
    return names


def _label_key(opts, manifest: Optional[dict]) -> Optional[str]:
    key = (opts.label_key or "").strip()
    if key.lower() in ("", "none"):
        return None
    if key == "auto":
        return ((manifest or {}).get("keys") or {}).get("label")
    return key


def build_webdataset(opts, ctx) -> DataBundle:
    import torch.distributed as dist

    urls, manifest, folder = resolve_urls(opts.urls, "urls")
    warnings_: list = []
    if opts.val_urls:
        train_urls = urls
        val_urls, val_manifest, _ = resolve_urls(opts.val_urls, "val_urls")
        train_counts, val_counts = _counts(train_urls, manifest), _counts(val_urls, val_manifest)
    else:
        if len(urls) <= opts.val_shards:
            raise ClipftUsageError(
                f"webdataset: urls names {len(urls)} shard(s); holding out the last val_shards="
                f"{opts.val_shards} for validation leaves none to train on. Pass val_urls, or write "
                "more shards (clipft shards --shard-size N, smaller)")
        train_urls, val_urls = urls[:-opts.val_shards], urls[-opts.val_shards:]
        counts = _counts(urls, manifest)
        train_counts = counts[:-opts.val_shards] if counts is not None else None
        val_counts = counts[-opts.val_shards:] if counts is not None else None
        held = [s for s in (manifest or {}).get("shards", []) if s.get("name") in
                {Path(u).name for u in val_urls}]
        total = (manifest or {}).get("classes")
        in_order = manifest is not None and manifest.get("shuffle_seed") is None
        if (in_order and total and held and all("classes" in s for s in held)
                and max(s["classes"] for s in held) < min(total, sum(s["samples"] for s in held))):
            warnings_.append(
                f"webdataset: the held-out val shard(s) hold at most {max(s['classes'] for s in held)} of "
                f"{total} classes (the samples are in class order); write the shards with "
                "`clipft shards --shuffle-seed 0`, or pass val_urls")
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world > 1 and not opts.resampled:
        # ranks must run the same number of steps; shards of unequal sizes give
        # them unequal samples, and a rank that runs out first hangs the others
        raise ClipftUsageError(
            f"webdataset: with {world} processes pass resampled=true and samples_per_epoch=N, so "
            "every rank reads the same number of samples (what webdataset's maintainers recommend for "
            "distributed training)")
    check_readers(len(train_urls), world, ctx.num_workers, opts.resampled)

    if opts.samples_per_epoch is not None:
        train_length = opts.samples_per_epoch
    elif train_counts is not None:
        train_length = sum(train_counts)
    else:
        raise ClipftUsageError("webdataset: the train shards are remote and have no shards.json, so they "
                               "cannot be counted; pass samples_per_epoch")
    label_key = _label_key(opts, manifest)
    classnames = _classnames(opts, folder) if label_key else None
    caption_key = (opts.caption_key or "").strip() or None
    if caption_key and caption_key.lower() == "none":
        caption_key = None
    # shards of an image folder carry class prompts, not captions: no recall@k
    prompts = (manifest or {}).get("captions") == "class-prompts"
    has_captions = bool(caption_key) and not prompts
    templates = resolve_templates(opts.templates)
    common = dict(image_keys=[k.strip().lower() for k in opts.image_key.split(";") if k.strip()],
                  caption_key=caption_key, label_key=label_key, classnames=classnames, templates=templates)
    train = ShardStream(train_urls, ctx.transform_train, train=True, shuffle_buffer=opts.shuffle_buffer,
                        resampled=opts.resampled, length=train_length, seed=ctx.seed,
                        counts=dict(zip(train_urls, train_counts or ())), **common)
    val = ShardStream(val_urls, ctx.transform_val, train=False, counts=dict(zip(val_urls, val_counts or ())),
                      **common)
    how = "resampled" if opts.resampled else f"{len(train_urls)} shard(s)"
    return DataBundle(
        train=train, val=val, classnames=classnames, templates=templates, has_captions=has_captions,
        description=f"webdataset {opts.urls} (train: {how}, {train_length} samples an epoch; "
                    f"val: {len(val_urls)} shard(s))",
        warnings=warnings_, train_length=train_length,
        val_length=sum(val_counts) if val_counts is not None else None)
