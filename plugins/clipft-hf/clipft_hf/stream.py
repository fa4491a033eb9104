"""``streaming=true``: the splits read as ``datasets.IterableDataset`` streams,
for data larger than memory.

**Readers.** A stream is split into shards: its files (parquet or arrow; one
file is one shard) or, for a ``save_to_disk`` folder, contiguous blocks of rows
(``Dataset.to_iterable_dataset(num_shards=...)``). As in the webdataset source,
every DataLoader worker of every rank is one reader, ``slot = rank *
num_workers + worker`` of ``world_size * max(1, num_workers)``: the train
shards are shuffled with the epoch's seed (the same order on every rank) and
reader ``slot`` takes shards ``slot, slot + readers, ...``. Under
torch.distributed there must be a shard for every reader (a usage error
otherwise); in one process a worker without a shard reads nothing and the
others read everything. The val shards are read in order, split by worker
only: every rank reads all of them.

**Equal ranks.** Ranks must run the same number of steps (one that runs out
first hangs the others), and shards differ in size; so with several ranks each
one yields exactly ``train_length // world`` rows an epoch, reading its shards
again from the start if they hold fewer (and stopping early if more). With one
process every row is read exactly once an epoch.

**Order.** The train stream is shuffled each epoch: shard order and a buffer of
``shuffle_buffer`` rows in each reader, seeded by the epoch's seed
(``set_epoch``). This source shuffles itself: ``IterableDataset.shuffle`` in
datasets 5 waits seconds at the end of every pass over parquet files, and
reports fewer shards than the files (datasets #8669), which would leave
readers without data. (``IterableDataset.shard``, used here, needs datasets
3.1.) Rows yield
``(index, image, caption, label)`` with ``index`` a running number; a row whose
image fails to decode, or whose label is no class, a
:func:`clipft.data.failed_sample` named ``SPLIT shard S row R``, the same every
epoch (counted once).
"""
from __future__ import annotations

import hashlib
import random
from typing import Optional

import attrs
import torch

from clipft.data import DataBundle, failed_sample, reason_of, resolve_templates
from clipft.errors import ClipftUsageError

from clipft_hf.source import columns, display_names, labels_of, open_value, pick, same_classes


def reader_info() -> tuple[int, int, int, int]:
    """``(rank, world_size, worker, num_workers)`` of the calling process (the
    same rule as the webdataset source's readers)."""
    import torch.distributed as dist
    rank, world = 0, 1
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank, world, worker, workers


def _share(n: int, part: int, parts: int) -> int:
    return n // parts + (1 if part < n % parts else 0)


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=4).digest(), "big")


def count_rows(files: list) -> int:
    """Rows in .parquet files (from their footers) and .arrow files (record
    batch headers, memory-mapped)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 0
    for f in files:
        f = str(f)
        if f.lower().endswith(".parquet"):
            n += pq.ParquetFile(f).metadata.num_rows
            continue
        with pa.memory_map(f) as src:
            try:
                n += sum(b.num_rows for b in pa.ipc.open_stream(src))
            except pa.ArrowInvalid:
                src.seek(0)
                reader = pa.ipc.open_file(src)
                n += sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    return n


class HfStream(torch.utils.data.IterableDataset):
    """One split of a ``datasets.IterableDataset`` (``source``: the image,
    label and caption columns, images undecoded); see the module docstring."""

    def __init__(self, source, transform, *, split: str, image: str, caption: Optional[str], labels,
                 names, templates, train: bool, shuffle_buffer: int = 0, length: Optional[int] = None,
                 exact: bool = False, seed: int = 0, base=None):
        self.source, self.transform, self.split = source, transform, split
        self.image, self.caption, self.labels = image, caption, labels
        self.names, self.templates = names, tuple(templates)
        self.train, self.shuffle_buffer, self.length, self.seed, self.base = (
            train, shuffle_buffer, length, seed, base)
        #: yield exactly ``length`` rows an epoch (over all ranks), whatever the shards hold
        self.exact = exact

    def set_epoch(self, seed: int) -> None:
        self.seed = int(seed)

    def _shards(self, slot: int, readers: int) -> list:
        """The shards this reader reads this epoch: train shards shuffled by the
        epoch's seed (the same order on every rank), every ``readers``-th from
        ``slot``; val shards in order, split by worker."""
        order = list(range(self.source.num_shards))
        if self.train:
            random.Random(self.seed).shuffle(order)
        return order[slot::readers]

    def _read(self, shards: list):
        """``(name, row)`` of the rows of ``shards``; the name (shard and row in
        it) is the same every epoch, so a bad row is counted once."""
        # ds.iter() rather than iter(ds): inside a DataLoader worker iter(ds)
        # would split the shard over the workers again
        n = self.source.num_shards
        for i in shards:
            k = 0
            for batch in self.source.shard(num_shards=n, index=i).iter(batch_size=64):
                cols = list(batch)
                for j in range(len(batch[cols[0]])):
                    yield f"{self.split} shard {i} row {k}", {c: batch[c][j] for c in cols}
                    k += 1

    def __iter__(self):
        rank, world, worker, workers = reader_info()
        if not self.train:   # val: every rank reads all of it
            rank, world = 0, 1
        slot, readers = rank * workers + worker, world * workers
        shards = self._shards(slot, readers)
        if self.train and (self.exact or world > 1):
            # in one process the workers past the shards read nothing: the others take their share
            active = workers if world > 1 else min(workers, self.source.num_shards)
            quota = _share(self.length // world, worker, active) if worker < active else 0
            rows = _exactly(lambda: self._read(shards), quota)
        else:
            rows = self._read(shards)
        if self.train and self.shuffle_buffer > 1:
            rows = _shuffled(rows, self.shuffle_buffer, random.Random(_seed("rows", self.seed, slot)))
        for n, (name, row) in enumerate(rows):
            yield self.decode(row, n * readers + slot, name)

    def decode(self, row: dict, index: int, name: str):
        label = -1
        if self.labels is not None:
            try:
                label = self.labels.index(row.get(self.labels.column), name)
            except ClipftUsageError as exc:   # one bad row of a stream is skipped, named
                return failed_sample(_seed("row", name), name, str(exc).removeprefix("hf: "))
        caption = ""
        if self.caption is not None:
            caption = (row.get(self.caption) or "").replace("\0", "")
        if not caption and label >= 0:
            caption = self.templates[index % len(self.templates)].format(self.names[label])
        try:
            return index, self.transform(open_value(row.get(self.image), self.base)), caption, label
        except Exception as exc:
            return failed_sample(_seed("row", name), name, reason_of(exc))


def _exactly(read, quota: int):
    """``quota`` rows of ``read()``, read again from the start while it holds fewer."""
    n = 0
    while n < quota:
        got = 0
        for row in read():
            yield row
            n, got = n + 1, got + 1
            if n >= quota:
                return
        if not got:   # nothing to read: a short epoch rather than an endless loop
            return


def _shuffled(rows, size: int, rng):
    """``rows`` through a shuffle buffer of ``size`` rows."""
    buf: list = []
    for row in rows:
        if len(buf) < size:
            buf.append(row)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = row
    rng.shuffle(buf)
    yield from buf


def _as_stream(ds, D, shards: int, keep: list):
    """``ds`` as a stream of the ``keep`` columns, images undecoded."""
    if isinstance(ds, D.Dataset):   # a save_to_disk split: rows in contiguous blocks
        ds = ds.to_iterable_dataset(num_shards=max(1, min(len(ds), shards)))
    ds = ds.select_columns(keep)
    if isinstance(ds.features[keep[0]], D.Image):
        ds = ds.cast_column(keep[0], D.Image(decode=False))
    return ds


def _length(found, split: str, ds) -> Optional[int]:
    if split in found.files:
        return count_rows(found.files[split])
    if hasattr(ds, "__len__"):
        return len(ds)
    info = getattr(ds, "info", None)
    splits = getattr(info, "splits", None) or {}
    known = splits.get(split)
    return getattr(known, "num_examples", None) or None


def build_stream(opts, ctx, found, D) -> DataBundle:
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    readers = world * max(1, ctx.num_workers)
    train_ds, val_ds = pick(found, opts.split, "split"), pick(found, opts.val_split, "val_split")
    cols = columns(opts, train_ds.features, opts.split, D)
    columns(attrs.evolve(opts, image=cols.image, label=cols.label, caption=cols.caption),
            val_ds.features, opts.val_split, D)
    same_classes(train_ds, val_ds, cols.label, opts, D)
    labels = None
    if cols.label is not None:
        feature = train_ds.features[cols.label]
        if not isinstance(feature, D.ClassLabel) and not opts.classes:
            raise ClipftUsageError(f"hf: streaming=true: label column '{cols.label}' is no ClassLabel, and a "
                                   "stream cannot be scanned for its classes; pass classes=a,b,c (or @FILE)")
        labels = labels_of(opts, feature, cols.label, D)
    length = opts.samples_per_epoch or _length(found, opts.split, train_ds)
    if not length:
        raise ClipftUsageError(f"hf: streaming=true: the rows of split '{opts.split}' of {found.where} are not "
                               "known ahead; pass samples_per_epoch=N")
    val_length = _length(found, opts.val_split, val_ds)
    keep = [c for c in (cols.image, cols.label, cols.caption) if c]
    train_s, val_s = (_as_stream(d, D, max(readers, 16), keep) for d in (train_ds, val_ds))
    if world > 1 and train_s.num_shards < readers:   # one process: idle workers are harmless
        raise ClipftUsageError(
            f"hf: streaming=true: split '{opts.split}' has {train_s.num_shards} shard(s) (files) for {world} "
            f"rank(s) × {max(1, ctx.num_workers)} DataLoader worker(s); a rank or worker without a shard leaves "
            "its rank short of batches, which hangs distributed training. Write more files, or lower "
            "--num-workers")
    names = display_names(opts, labels.names) if labels else None
    templates = resolve_templates(opts.templates)
    common = dict(image=cols.image, caption=cols.caption, labels=labels, names=names, templates=templates,
                  base=found.base)
    train = HfStream(train_s, ctx.transform_train, split=opts.split, train=True,
                     shuffle_buffer=opts.shuffle_buffer, length=length, exact=opts.samples_per_epoch is not None,
                     seed=ctx.seed, **common)
    val = HfStream(val_s, ctx.transform_val, split=opts.val_split, train=False, **common)
    return DataBundle(
        train=train, val=val, classnames=names, templates=templates, has_captions=cols.caption is not None,
        description=f"hf {found.where} (streamed: {train_s.num_shards} shard(s), {length} rows an epoch)",
        train_length=length, val_length=val_length)
