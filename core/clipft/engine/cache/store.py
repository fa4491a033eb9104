"""Where cached values are kept: per-sample stores by dataset index, in memory
or, with a cache directory, in memory-mapped files keyed by a fingerprint of
the frozen weights, the data, the transform, precision and library versions.

An on-disk store is written under a temporary name and renamed into place when
complete, so a crash never leaves a half-built cache that looks valid; its
values carry a checksum that is verified when the store is opened again (a
store that fails it is rebuilt, with a warning in the cache stats).

On disk, rows move with positioned reads and writes, never through a memory
map: every page of a mapped file that a process touches counts in its resident
memory, and an epoch touches them all, so a mapped cache grows RSS as fast as
an in-memory one (measured: +70 MB from 1k to 16k images either way). With
``pread``/``pwrite`` only the batch being replayed is resident; the OS page
cache still keeps a warm file fast, and it gives the pages back under pressure.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import weakref
from pathlib import Path
from typing import Optional

import torch

from clipft import atomic
from clipft.models import physical_memory_bytes

FORMAT = 2
STATUS_MISSING, STATUS_OK, STATUS_FAILED = 0, 1, 2


# -- fingerprints (on-disk keys) ----------------------------------------------
def tensor_digest(named_tensors) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, t in named_tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def prefix_state(model, cut: ImageCut):
    """(name, tensor) of every parameter and buffer the cached prefix reads."""
    ids = {}
    for m in cut.prefix_modules(model):
        if isinstance(m, torch.nn.Module):
            for t in list(m.parameters()) + list(m.buffers()):
                ids[id(t)] = t
        elif torch.is_tensor(m):
            ids[id(m)] = m
    named = [(n, t) for n, t in list(model.named_parameters()) + list(model.named_buffers())
             if id(t) in ids]
    return sorted(named, key=lambda x: x[0])


_ADDR = re.compile(r" at 0x[0-9a-fA-F]+")


def transform_repr(transform) -> str:
    return _ADDR.sub("", repr(transform))


def dataset_fingerprint(dataset) -> str:
    """A digest of what a dataset would yield: its attributes (not the transform),
    and size and mtime of every file it names."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(dataset).__qualname__.encode())
    state = {k: v for k, v in sorted(vars(dataset).items()) if k != "transform"} \
        if hasattr(dataset, "__dict__") else {}

    def visit(v):
        if isinstance(v, str) and len(v) < 4096 and os.path.isfile(v):
            st = os.stat(v)
            h.update(f"{v}|{st.st_size}|{st.st_mtime_ns};".encode())
        elif isinstance(v, (list, tuple)):
            h.update(b"[")
            for x in v:
                visit(x)
            h.update(b"]")
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                h.update(f"{k}=".encode())
                visit(v[k])
        else:
            h.update(_ADDR.sub("", repr(v)).encode() + b";")

    visit(state)
    h.update(f"len={len(dataset)}".encode())
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """blake2b of a file's bytes, read in chunks (stores can be large)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


# -- stores --------------------------------------------------------------------
def memory_budget_bytes(fraction: float = 0.25) -> int:
    """Default cap on an in-memory store: a quarter of physical memory."""
    return int(physical_memory_bytes() * fraction) or 4 << 30


class StoreTooLarge(Exception):
    pass


class DiskRows:
    """``n`` rows of one shape and dtype in a file, at fixed offsets."""

    def __init__(self, path: Path, n: int, shape: tuple, dtype: torch.dtype, create: bool = False):
        self.path, self.n, self.shape, self.dtype = Path(path), n, tuple(shape), dtype
        self.row_bytes = int(torch.Size(self.shape).numel()) * dtype.itemsize
        self.fd = os.open(self.path, (os.O_RDWR | os.O_CREAT | os.O_TRUNC) if create else os.O_RDONLY, 0o644)
        # the descriptor closes with the object, however it goes
        self._close = weakref.finalize(self, os.close, self.fd)
        if create:
            os.ftruncate(self.fd, n * self.row_bytes)

    @property
    def nbytes(self) -> int:
        return self.n * self.row_bytes

    def close(self) -> None:
        self._close()

    def _runs(self, index: list):
        """(position in index, first row, count) for each run of consecutive rows,
        so that an in-order batch is one system call."""
        start = 0
        for j in range(1, len(index) + 1):
            if j == len(index) or index[j] != index[j - 1] + 1:
                yield start, index[start], j - start
                start = j

    def _bytes(self, t: torch.Tensor):
        return t.view(torch.uint8).reshape(t.shape[0], self.row_bytes).numpy()

    def write(self, index: torch.Tensor, rows: torch.Tensor) -> None:
        # a row of another shape or dtype would overwrite its neighbours' bytes
        if tuple(rows.shape[1:]) != self.shape or rows.dtype != self.dtype or len(rows) != len(index):
            raise ValueError(f"{self.path.name}: rows {tuple(rows.shape)} {rows.dtype} for {len(index)} "
                             f"indices do not fit rows of {self.shape} {self.dtype}")
        if len(index) == 0:
            return
        raw = self._bytes(rows.contiguous())
        for pos, first, count in self._runs(index.tolist()):
            view = memoryview(raw[pos:pos + count]).cast("B")
            offset, done = first * self.row_bytes, 0
            while done < len(view):       # pwrite may write less than asked
                done += os.pwrite(self.fd, view[done:], offset + done)

    def read(self, index: torch.Tensor) -> torch.Tensor:
        out = torch.empty((len(index), *self.shape), dtype=self.dtype)
        if len(index) == 0:
            return out
        raw = self._bytes(out)
        for pos, first, count in self._runs(index.tolist()):
            view = memoryview(raw[pos:pos + count]).cast("B")
            offset, done = first * self.row_bytes, 0
            while done < len(view):
                got = os.preadv(self.fd, [view[done:]], offset + done)
                if got == 0:
                    raise OSError(f"{self.path} ends before row {first + count - 1}; "
                                  "delete the cache directory to rebuild it")
                done += got
        return out


class IndexStore:
    """Per-sample values of one split, by dataset index, with each sample's
    caption and label (so a cached epoch never touches the images); in memory,
    or with ``directory`` in a file (:class:`DiskRows`)."""

    def __init__(self, n: int, directory: Optional[Path] = None, budget: Optional[int] = None,
                 key_parts: Optional[dict] = None):
        self.n = n
        self.directory = Path(directory) if directory is not None else None
        self.budget = budget
        self.key_parts = key_parts or {}
        #: a tensor in memory; DiskRows with a directory
        self.values = None
        self.status = torch.zeros(n, dtype=torch.uint8)
        self.captions: list = [None] * n
        self.labels = torch.full((n,), -1, dtype=torch.long)
        self.loaded = False
        self._tmp: Optional[Path] = None

    # building
    def _allocate(self, row: torch.Tensor):
        shape, dtype = tuple(row.shape[1:]), row.dtype
        numel = self.n * int(torch.Size(shape).numel())
        nbytes = numel * row.element_size()
        if self.directory is None:
            if self.budget is not None and nbytes > self.budget:
                raise StoreTooLarge(
                    f"{nbytes / 2**20:.0f} MB needed > {self.budget / 2**20:.0f} MB in-memory limit; "
                    "pass --cache-dir to keep it on disk")
            self.values = torch.empty((self.n, *shape), dtype=dtype)
            return
        # what a killed build of this store left; a build still running elsewhere keeps its own
        atomic.remove_stale(self.directory.parent, {self.directory.name})
        self._tmp = atomic.make_temp_dir(self.directory)
        self.values = DiskRows(self._tmp / "values.bin", self.n, shape, dtype, create=True)

    def put(self, index: torch.Tensor, values: torch.Tensor, captions, labels) -> None:
        values = values.detach()
        if self.values is None:
            self._allocate(values)
        idx = index.cpu()
        if isinstance(self.values, DiskRows):
            self.values.write(idx, values.to("cpu", self.values.dtype))
        else:
            self.values[idx] = values.to("cpu", self.values.dtype)
        self.status[idx] = STATUS_OK
        self.labels[idx] = labels.cpu()
        for i, c in zip(idx.tolist(), captions):
            self.captions[i] = c

    @property
    def complete(self) -> bool:
        return self.values is not None and bool((self.status != STATUS_MISSING).all())

    @property
    def nbytes(self) -> int:
        if self.values is None:
            return 0
        if isinstance(self.values, DiskRows):
            return self.values.nbytes
        return self.values.numel() * self.values.element_size()

    def finish(self) -> None:
        """Samples never seen (undecodable ones the loader dropped) count as failed;
        an on-disk store is committed with a checksum of its values."""
        self.status[self.status == STATUS_MISSING] = STATUS_FAILED
        if self.directory is None or self._tmp is None:
            return
        values_path = self._tmp / "values.bin"
        self.values.close()
        meta = {"format": FORMAT, "key": self.key_parts, "n": self.n,
                "shape": list(self.values.shape), "dtype": str(self.values.dtype).replace("torch.", ""),
                "captions": self.captions, "labels": self.labels.tolist(),
                "checksum": file_digest(values_path)}
        (self._tmp / "status.bin").write_bytes(self.status.numpy().tobytes())
        (self._tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(self._tmp, self.directory)
        except OSError:  # another process committed the same key first
            shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp = None
        self._load_values()

    def discard(self) -> None:
        if isinstance(self.values, DiskRows):
            self.values.close()
        self.values = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    # reading
    @classmethod
    def open(cls, directory: Path, n: int, key_parts: dict) -> tuple[Optional["IndexStore"], Optional[str]]:
        """``(store, None)`` for a complete on-disk store with this key;
        ``(None, None)`` when there is none; ``(None, why)`` when one is there
        but damaged (it is removed, so that it gets rebuilt)."""
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            return None, None
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return cls._damaged(directory, "unreadable meta.json")
        if meta.get("format") != FORMAT or meta.get("n") != n or meta.get("key") != json.loads(
                json.dumps(key_parts, default=str)):
            return None, None
        values_path = directory / "values.bin"
        numel = n * int(torch.Size(tuple(meta["shape"])).numel())
        expected = numel * getattr(torch, meta["dtype"]).itemsize
        if not values_path.is_file() or values_path.stat().st_size != expected:
            return cls._damaged(directory, "values.bin is missing or truncated")
        if file_digest(values_path) != meta.get("checksum"):
            return cls._damaged(directory, "values.bin does not match its checksum")
        status = (directory / "status.bin").read_bytes() if (directory / "status.bin").is_file() else b""
        if len(status) != n:
            return cls._damaged(directory, "status.bin is missing or truncated")
        store = cls(n, directory, key_parts=key_parts)
        store.status = torch.frombuffer(bytearray(status), dtype=torch.uint8)
        store.captions = meta["captions"]
        store.labels = torch.tensor(meta["labels"], dtype=torch.long)
        store._load_values(meta)
        store.loaded = True
        return store, None

    @staticmethod
    def _damaged(directory: Path, why: str):
        shutil.rmtree(directory, ignore_errors=True)
        return None, f"cache {directory.name} was damaged ({why}); rebuilt it"

    def _load_values(self, meta: Optional[dict] = None) -> None:
        meta = meta or json.loads((self.directory / "meta.json").read_text())
        self.values = DiskRows(self.directory / "values.bin", self.n, tuple(meta["shape"]),
                               getattr(torch, meta["dtype"]))

    def gather(self, index: torch.Tensor):
        """(values, captions, labels, index) of the decodable samples among ``index``."""
        ok = self.status[index] == STATUS_OK
        idx = index[ok]
        rows = self.values.read(idx) if isinstance(self.values, DiskRows) else self.values[idx]
        return rows, [self.captions[i] for i in idx.tolist()], self.labels[idx], idx
