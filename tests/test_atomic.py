"""clipft.atomic: a file or folder appears whole or not at all, a failure (a
signal's KeyboardInterrupt included) leaves the old one and no temporary, and
nothing that was there before is reused or removed, except the temporaries of
processes that are gone."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from clipft import atomic


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()            # reaped: the pid names no process now
    return p.pid


def names(folder) -> list:
    return sorted(p.name for p in folder.iterdir())


# -- files --------------------------------------------------------------------------------
def test_writers_leave_the_content_and_nothing_else(tmp_path):
    atomic.write_text(tmp_path / "a.txt", "héllo\n")
    atomic.write_bytes(tmp_path / "b.bin", b"\x00\x01")
    atomic.write_json(tmp_path / "c.json", {"x": [1, 2]}, indent=2)
    with atomic.writing(tmp_path / "d.csv", "w", newline="") as f:
        f.write("a,b\r\n")
    with atomic.writing_path(tmp_path / "e.bin") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".e.bin.tmp-") and atomic.is_temp(tmp.name)
        tmp.write_bytes(b"by path")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2]}
    assert (tmp_path / "d.csv").read_bytes() == b"a,b\r\n"
    assert (tmp_path / "e.bin").read_bytes() == b"by path"
    assert names(tmp_path) == ["a.txt", "b.bin", "c.json", "d.csv", "e.bin"]


def test_a_write_replaces_the_old_file(tmp_path):
    target = tmp_path / "f.json"
    target.write_text("old")
    atomic.write_text(target, "new")
    assert target.read_text() == "new" and names(tmp_path) == ["f.json"]


class Boom(Exception):
    pass


def interrupt_by_signal():
    # Python's own SIGINT handler: what Ctrl-C does in the middle of a write
    signal.raise_signal(signal.SIGINT)


@pytest.mark.parametrize("stop, raised", [
    (lambda: (_ for _ in ()).throw(Boom()), Boom),
    (lambda: (_ for _ in ()).throw(KeyboardInterrupt()), KeyboardInterrupt),
    (interrupt_by_signal, KeyboardInterrupt),
])
@pytest.mark.parametrize("how", ["writing", "writing_path"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, stop, raised, how):
    if stop is interrupt_by_signal and signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default handler here")
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(raised):
        if how == "writing":
            with atomic.writing(target) as f:
                f.write("half of the new")
                stop()
        else:
            with atomic.writing_path(target) as tmp:
                tmp.write_text("half of the new")
                stop()
    assert target.read_text() == "old" and names(tmp_path) == ["f.txt"]


def test_a_failed_rename_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def replace(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="No space"):
        atomic.write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old" and names(tmp_path) == ["f.txt"]


def test_temporary_names_differ_and_never_reuse_what_exists(tmp_path, monkeypatch):
    assert atomic.temp_name("x") != atomic.temp_name("x")
    a, b = atomic.make_temp_dir(tmp_path / "x"), atomic.make_temp_dir(tmp_path / "x")
    assert a != b and a.is_dir() and b.is_dir() and str(os.getpid()) in a.name
    # a name already taken (an earlier process of this pid, or anything else) is skipped, untouched
    tokens = iter(["00000000", "00000000", "00000001", "00000001", "00000002"])
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: next(tokens))
    taken = tmp_path / atomic.temp_name("f.txt")
    taken.write_text("someone's")
    atomic.write_text(tmp_path / "f.txt", "new")
    assert taken.read_text() == "someone's" and (tmp_path / "f.txt").read_text() == "new"
    taken_dir = tmp_path / atomic.temp_name("d")
    taken_dir.mkdir()
    (taken_dir / "keep").write_text("k")
    built = atomic.make_temp_dir(tmp_path / "d")
    assert built != taken_dir and (taken_dir / "keep").read_text() == "k"


# -- folders ------------------------------------------------------------------------------
def test_building_a_folder(tmp_path):
    with atomic.building_dir(tmp_path / "sub" / "out") as tmp:
        (tmp / "a").write_text("1")
        (tmp / "inner").mkdir()
        (tmp / "inner" / "b").write_text("2")
    out = tmp_path / "sub" / "out"
    assert (out / "a").read_text() == "1" and (out / "inner" / "b").read_text() == "2"
    assert names(tmp_path / "sub") == ["out"]


@pytest.mark.parametrize("raised", [Boom, KeyboardInterrupt])
def test_a_failed_build_removes_only_its_own_folder(tmp_path, raised):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("old")
    mine = tmp_path / ".out.tmp"                       # a user's folder, named like a temporary
    mine.mkdir()
    (mine / "keep").write_text("mine")
    with pytest.raises(raised):
        with atomic.building_dir(tmp_path / "out") as tmp:
            (tmp / "new").write_text("new")
            raise raised()
    assert names(tmp_path) == [".out.tmp", "out"]
    assert names(tmp_path / "out") == ["old"] and (mine / "keep").read_text() == "mine"


# -- leftovers ----------------------------------------------------------------------------
def test_stale_temporaries_of_dead_processes_go_live_ones_stay(tmp_path):
    dead, alive = dead_pid(), os.getppid()
    gone_file = tmp_path / atomic.temp_name("f.txt", pid=dead)
    gone_dir = tmp_path / atomic.temp_name("store", pid=dead)
    other_target = tmp_path / atomic.temp_name("other", pid=dead)
    live = tmp_path / atomic.temp_name("f.txt", pid=alive)
    mine = tmp_path / atomic.temp_name("f.txt")
    host = atomic.temp_name("f.txt", pid=dead).split("-")
    host[2] = "ffffff" if host[2] != "ffffff" else "000000"    # the same pid on another machine
    elsewhere = tmp_path / "-".join(host)
    users = [tmp_path / ".f.txt.tmp", tmp_path / f".f.txt.tmp-{dead}", tmp_path / "f.txt"]
    for p in (gone_file, other_target, live, mine, elsewhere, *users):
        p.write_text("x")
    gone_dir.mkdir()
    (gone_dir / "values.bin").write_bytes(b"v")

    assert sorted(atomic.remove_stale(tmp_path, {"f.txt", "store"})) == sorted([gone_file, gone_dir])
    assert not gone_file.exists() and not gone_dir.exists()
    assert all(p.exists() for p in (other_target, live, mine, elsewhere, *users))
    assert atomic.remove_stale(tmp_path) == [other_target]
    assert atomic.remove_stale(tmp_path / "missing") == []


def test_the_run_marker_does_not_list_a_killed_write(tmp_path):
    from clipft.engine.rundir import RunDirectory, read_marker
    run = tmp_path / "run"
    d = RunDirectory(run)
    d.start(overwrite=False)
    dead = dead_pid()
    stale = run / atomic.temp_name("metrics.jsonl", pid=dead)
    stale.write_text("half a row")
    checkpoint_tmp = run / atomic.temp_name("checkpoint", pid=dead)   # may be the newest checkpoint
    checkpoint_tmp.mkdir()
    d.record()
    assert not stale.exists() and checkpoint_tmp.is_dir()
    assert stale.name not in read_marker(run)["entries"]


def test_a_cache_build_clears_what_a_killed_build_left(tmp_path):
    import torch

    from clipft.engine.cache.store import IndexStore
    dead = dead_pid()
    stale = tmp_path / atomic.temp_name("train-abc", pid=dead)
    live = tmp_path / atomic.temp_name("train-abc", pid=os.getppid())
    for p in (stale, live):
        p.mkdir()
        (p / "values.bin").write_bytes(b"v")
    store = IndexStore(4, tmp_path / "train-abc", key_parts={})
    store.put(torch.arange(4), torch.ones(4, 2), ["c"] * 4, torch.zeros(4, dtype=torch.long))
    store.finish()
    assert names(tmp_path) == sorted([live.name, "train-abc"])


# -- export -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from click.testing import CliRunner

    from clipft.cli import cli
    out = tmp_path_factory.mktemp("atomic-export") / "run"
    r = CliRunner().invoke(cli, ["run", "--model", "tiny-vit", "--data", "shapes:n=16,val_n=8",
                                 "--strategy", "last-n:n=1", "--epochs", "1", "--batch-size", "8",
                                 "--callback", "none", "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out


def test_export_never_touches_a_folder_named_like_its_old_temporary(tiny_run, tmp_path, invoke, monkeypatch):
    import clipft.commands.export as export
    mine = tmp_path / ".out.tmp"              # the name export used to clear unconditionally
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    stale = tmp_path / atomic.temp_name("out", pid=dead_pid())
    stale.mkdir()

    r = invoke("export", tiny_run, tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "out" / export.MANIFEST).is_file()
    assert names(tmp_path) == [".out.tmp", "out"]             # the dead export's folder is gone
    assert (mine / "thesis.tex").read_text() == "mine"

    # a failed --overwrite keeps the old export and leaves no temporary
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(export, "_save", full)
    r = invoke("export", tiny_run, tmp_path / "out", "--overwrite")
    assert r.exit_code == 1 and "No space left" in r.stderr
    assert names(tmp_path) == [".out.tmp", "out"] and (mine / "thesis.tex").read_text() == "mine"
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
