"""The run directory contract: config.toml, metrics.jsonl, summary.json,
checkpoint/ (and older checkpoints beside it), data_split.json for a few-shot
split, plus the ``.clipft-run`` marker.

No command deletes what is not clipft's: a directory counts as a clipft run when
it holds the marker (listing every entry the run created) or a clipft checkpoint,
and ``--overwrite`` replaces only such a run, keeping the old one in a hidden
sibling until the new one has a checkpoint (docs/usage.md says why).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from clipft import atomic
from clipft.engine.checkpoint import BEST, CURRENT, STEP_PREFIX, TMP_PREFIX, candidates, newest_complete
from clipft.errors import ClipftUsageError

MARKER = ".clipft-run"
MARKER_FORMAT = "clipft-run"
#: the file whose fcntl lock says a process is using the run (see RunLock)
LOCK = ".clipft-lock"
#: ``data_split.json``: the training files of a sampled (few-shot) split
RUN_FILES = ("config.toml", "data_split.json", "metrics.jsonl", "summary.json", CURRENT, BEST, MARKER, LOCK)


class RunLock:
    """One process per run directory: an exclusive, non-blocking ``fcntl``
    lock on ``DIR/.clipft-lock``, held by ``run``, ``--resume``, ``--overwrite``
    and ``export`` of the run (under torchrun, by rank 0). The kernel releases
    it when the process ends, however it ends, so a ``kill -9`` leaves no stale
    lock; the file stays (deleting it would let two processes lock two files).
    A second process gets a usage error naming the holder's pid."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / LOCK
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and self.path.parent.is_dir():
                return self   # a read-only run: no process can write it, so none need be kept out
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise ClipftUsageError(
                f"{self.path.parent} is in use by another clipft process (pid {holder}); wait for it to "
                "finish, or stop it first") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)   # closing the descriptor releases the lock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _is_run_entry(name: str) -> bool:
    # ".NAME.XXXX.tmp": what a write killed part-way left before clipft.atomic named its temporaries
    return name in RUN_FILES or name.startswith((STEP_PREFIX, TMP_PREFIX)) or atomic.is_temp(name) or \
        name.startswith(".") and name.endswith(".tmp")


def read_marker(path: Path) -> Optional[dict]:
    try:
        m = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return m if isinstance(m, dict) and m.get("format") == MARKER_FORMAT else None


def is_clipft_run(path: Path) -> bool:
    return read_marker(path) is not None or newest_complete(path)[0] is not None


def foreign_entries(path: Path) -> list[str]:
    """Entries of ``path`` that its clipft run did not create."""
    marker = read_marker(path) or {}
    ours = set(marker.get("entries", ()))
    return sorted(p.name for p in Path(path).iterdir() if p.name not in ours and not _is_run_entry(p.name))


def backup_of(path: Path) -> Path:
    return path.parent / f".{path.name}.clipft-previous"


def _listing(path: Path, limit: int = 8) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_out_dir(path: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that a run would clobber; explain what to do."""
    path = Path(path)
    backup = backup_of(path)
    if backup.exists() and newest_complete(path)[0] is None:
        raise ClipftUsageError(
            f"--out {path}: an earlier --overwrite of this directory was interrupted before the new "
            f"run's first checkpoint; the previous run is kept in {backup}. Restore it with "
            f"`rm -rf {path} && mv {backup} {path}`, or remove it with `rm -rf {backup}`")
    if path.exists() and not path.is_dir():
        raise ClipftUsageError(f"--out {path} exists and is not a directory")
    if not path.is_dir() or not any(path.iterdir()):
        return
    if not is_clipft_run(path):
        raise ClipftUsageError(
            f"--out {path} is not empty and is not a clipft run ({_listing(path)}); "
            "clipft will not write into it. Choose another directory")
    finished = (path / "summary.json").exists()
    if newest_complete(path)[0] is None and not finished and not foreign_entries(path):
        return   # a run that died before its first complete checkpoint: nothing to lose, reuse it
    if not overwrite:
        raise ClipftUsageError(
            f"--out {path} already holds a run; choose another directory, "
            "pass --overwrite to replace it, or --resume it")
    foreign = foreign_entries(path)
    if foreign:
        raise ClipftUsageError(
            f"--overwrite: {path} holds a clipft run but also files the run did not create "
            f"({', '.join(foreign[:8])}); move them out first, clipft will not delete them")


class RunDirectory:
    """Creating the run directory, the marker, and the --overwrite backup."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.backup: Optional[Path] = None
        #: top-level names the run's callbacks and plugins created through
        #: :meth:`clipft.callbacks.RunView.path` (the session shares this set with the view)
        self.created: set = set()
        self.lock = RunLock(self.path)
        self._ours: set = set()

    def start(self, overwrite: bool) -> None:
        """Only called once the run is fully built and validated."""
        check_out_dir(self.path, overwrite)
        if self.path.is_dir() and any(self.path.iterdir()):
            with RunLock(self.path):   # not while another process uses the old run
                if any(p.is_dir() for p in candidates(self.path)):   # a checkpointed run: keep it aside
                    self.backup = backup_of(self.path)
                    os.replace(self.path, self.backup)
                else:   # died before its first checkpoint: only clipft's own files are left
                    for p in self.path.iterdir():
                        if p.name != LOCK:
                            shutil.rmtree(p) if p.is_dir() else p.unlink()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self.abandon()
            raise ClipftUsageError(f"cannot write to {self.path}: {exc.strerror or exc}") from exc
        try:
            self.lock.acquire()
        except ClipftUsageError:
            self.abandon()
            raise
        self.record()

    def resume(self) -> None:
        """Continue the run already in the directory (``--resume``): lock it,
        and keep the entries its marker says it created."""
        self.lock.acquire()
        self._ours = set((read_marker(self.path) or {}).get("entries", ()))

    def record(self) -> None:
        """(Re)write the marker: the entries the run created. Not whatever is in
        the directory: a file the user adds while the run trains stays theirs,
        and ``--overwrite`` will not delete it."""
        # a killed write's file is no entry of the run; a checkpoint's temporary folder
        # may hold the newest complete checkpoint, and only the checkpointer removes it
        atomic.remove_stale(self.path, set(RUN_FILES) - {CURRENT})
        present = {p.name for p in self.path.iterdir()}
        ours = {n for n in present if _is_run_entry(n)} | (self.created & present) | (self._ours & present)
        atomic.write_text(self.path / MARKER, json.dumps(
            {"format": MARKER_FORMAT, "version": 1, "entries": sorted(ours | {MARKER})}))

    def committed(self) -> None:
        """The new run has a checkpoint: the replaced run can go."""
        self.record()
        if self.backup is not None:
            shutil.rmtree(self.backup, ignore_errors=True)
            self.backup = None
            atomic.fsync_dir(self.path.parent)

    def abandon(self) -> None:
        """The new run failed before its first checkpoint: put the old one back."""
        self.lock.release()
        if self.backup is None:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        os.replace(self.backup, self.path)
        self.backup = None


def default_run_dir(model: str, strategies) -> Path:
    tag = "+".join(s.name for s in strategies) or "probe"
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{model.replace('/', '_')}-{tag}"


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def truncate_lines(path: Path, keep: int) -> int:
    """Keep the first ``keep`` lines of ``path`` (rows written after a
    checkpoint are replayed by the resumed run); returns how many were dropped."""
    try:
        with open(path, "rb") as f:
            lines = f.readlines()
    except FileNotFoundError:
        return 0
    if len(lines) <= keep:
        return 0
    atomic.write_bytes(path, b"".join(lines[:keep]))
    return len(lines) - keep
