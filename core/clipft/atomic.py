"""Files and folders that appear whole or not at all.

Content is written under a temporary name beside its target, made durable
(fsync), and renamed over the target; a crash leaves the old target or the new
one, never a mix. Every temporary is hidden and named after its target, the
process and the machine: ``.NAME.tmp-PID-HOST-TOKEN``. It is created
exclusively, so nothing that already exists is ever reused, truncated or
removed, and a failure (a signal's KeyboardInterrupt included) removes only
what the failing call created. What a killed process left behind is found by
its name and removed by :func:`remove_stale` once that process is gone.

Standard library only: commands without torch use it too.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import IO, Collection, Iterator, Optional

#: the machine a temporary belongs to: a cache folder on shared storage is seen
#: by processes of several machines, and a pid only means something on its own one
_HOST = hashlib.blake2b(socket.gethostname().encode(), digest_size=3).hexdigest()
_TEMP = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>\d+)-(?P<host>[0-9a-f]{6})-[0-9a-f]{8}")


def temp_name(name: str, pid: Optional[int] = None) -> str:
    """A fresh temporary name for the target ``name`` (a name only: nothing is created)."""
    return f".{name}.tmp-{os.getpid() if pid is None else pid}-{_HOST}-{secrets.token_hex(4)}"


def is_temp(name: str) -> bool:
    """Whether ``name`` is a temporary of this module."""
    return _TEMP.fullmatch(name) is not None


# -- durability ---------------------------------------------------------------------------
def fsync_file(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path) -> None:
    """Make a rename in ``path`` durable. Best effort: some systems (Windows) and
    file systems cannot open or fsync a directory, and the rename stands anyway."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- files --------------------------------------------------------------------------------
def _create_temp_file(target: Path) -> tuple[int, Path]:
    while True:
        tmp = target.with_name(temp_name(target.name))
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _commit_file(tmp: Path, target: Path) -> None:
    os.replace(tmp, target)
    fsync_dir(target.parent)


@contextlib.contextmanager
def writing_path(path) -> Iterator[Path]:
    """A temporary path (an empty file) for writers that want a file name
    (safetensors, ``savefig``); when the block ends without an error, the file
    written there is fsynced and becomes ``path``. Any error removes it."""
    target = Path(path)
    tmp = None
    try:
        fd, tmp = _create_temp_file(target)
        os.close(fd)
        yield tmp
        fsync_file(tmp)
        _commit_file(tmp, target)
    except BaseException:
        if tmp is not None:
            _unlink_quietly(tmp)
        raise


@contextlib.contextmanager
def writing(path, mode: str = "w", **open_kw) -> Iterator[IO]:
    """An open file (``mode`` "w" or "wb", ``open_kw`` as for :func:`open`) that
    becomes ``path`` when the block ends without an error; any error removes it."""
    if mode not in ("w", "wb"):
        raise ValueError(f"writing() opens a new file for writing: mode 'w' or 'wb', not {mode!r}")
    target = Path(path)
    tmp = None
    try:
        fd, tmp = _create_temp_file(target)
        try:
            f = os.fdopen(fd, mode, **open_kw)
        except BaseException:
            os.close(fd)
            raise
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _commit_file(tmp, target)
    except BaseException:
        if tmp is not None:
            _unlink_quietly(tmp)
        raise


def write_bytes(path, data: bytes) -> None:
    with writing(path, "wb") as f:
        f.write(data)


def write_text(path, text: str, encoding: str = "utf-8", newline: Optional[str] = None) -> None:
    with writing(path, "w", encoding=encoding, newline=newline) as f:
        f.write(text)


def write_json(path, obj, **dumps_kw) -> None:
    write_text(path, json.dumps(obj, **dumps_kw))


# -- folders ------------------------------------------------------------------------------
def make_temp_dir(target) -> Path:
    """A new, empty temporary folder beside ``target`` (its parents created),
    for a caller that builds ``target`` over time and renames it into place
    itself; removing it on failure is the caller's part (:func:`building_dir`
    does both)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = target.with_name(temp_name(target.name))
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_dir(root)


@contextlib.contextmanager
def building_dir(target) -> Iterator[Path]:
    """A new temporary folder to build ``target`` in; when the block ends without
    an error its files are fsynced and it is renamed to ``target`` (which must
    not be a non-empty folder by then). Any error removes the temporary folder,
    and only that."""
    target = Path(target)
    tmp = None
    try:
        tmp = make_temp_dir(target)
        yield tmp
        _fsync_tree(tmp)
        os.replace(tmp, target)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(target.parent)


# -- leftovers ----------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine runs (True where that cannot be told)."""
    if pid == os.getpid() or pid <= 0 or os.name == "nt":   # Windows' os.kill(pid, 0) would end the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:   # EPERM: it runs, as another user
        pass
    return True


def remove_stale(folder, names: Optional[Collection[str]] = None) -> list:
    """Remove the temporaries in ``folder`` (of the targets ``names``, or of any
    target) that a process of this machine left when it died; returns their paths.
    Those of running processes, and of other machines, are kept."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TEMP.fullmatch(p.name)
        if m is None or (names is not None and m["name"] not in names):
            continue
        if m["host"] != _HOST or pid_alive(int(m["pid"])):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            _unlink_quietly(p)
        removed.append(p)
    return removed
