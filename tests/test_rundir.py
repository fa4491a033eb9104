"""No command deletes a user's files: --overwrite replaces only a clipft run,
keeps it until the new run has a checkpoint, and a run that died before its
first checkpoint is simply rerun."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

RUN = ["run", "--model", "tiny-vit", "--data", "shapes:n=32,val_n=8", "--epochs", "1",
       "--batch-size", "8", "--strategy", "full", "--lr", "1e-3"]

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_overwrite_refuses_a_directory_that_is_not_a_clipft_run(invoke, tmp_path):
    x = tmp_path / "X"
    (x / "checkpoint").mkdir(parents=True)
    (x / "checkpoint" / "epoch_99_weights.pt").write_text("w")
    (x / "config.toml").write_text("a=1\n")
    before = snapshot(x)
    r = invoke(*RUN, "--overwrite", "--out", x)
    assert r.exit_code == 2
    assert "not a clipft run" in r.stderr and "checkpoint/" in r.stderr and "config.toml" in r.stderr
    assert "Traceback" not in r.stderr
    assert snapshot(x) == before


def test_overwrite_refuses_a_clipft_run_holding_foreign_files(invoke, tmp_path):
    x = tmp_path / "X"
    assert invoke(*RUN, "--out", x).exit_code == 0
    (x / "my_notes.txt").write_text("keep me")
    before = snapshot(x)
    r = invoke(*RUN, "--seed", "1", "--overwrite", "--out", x)
    assert r.exit_code == 2 and "my_notes.txt" in r.stderr
    assert snapshot(x) == before


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(invoke, tmp_path, monkeypatch):
    from clipft.engine.loop import Trainer

    x = tmp_path / "X"
    assert invoke(*RUN, "--out", x).exit_code == 0
    before = snapshot(x)
    real, calls = Trainer.optimizer_step, []

    def fail_at_step_2(self):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the new run dies at step 2")
        return real(self)

    monkeypatch.setattr(Trainer, "optimizer_step", fail_at_step_2)
    r = invoke(*RUN, "--seed", "1", "--overwrite", "--out", x)
    assert r.exit_code == 1 and "dies at step 2" in r.stderr
    assert snapshot(x) == before                           # the old run, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["X"]    # and no leftovers beside it
    monkeypatch.setattr(Trainer, "optimizer_step", real)
    r = invoke(*RUN, "--seed", "1", "--overwrite", "--out", x)
    assert r.exit_code == 0
    assert snapshot(x) != before and [p.name for p in tmp_path.iterdir()] == ["X"]
    assert json.loads((x / ".clipft-run").read_text())["format"] == "clipft-run"


def test_an_interrupted_overwrite_says_how_to_get_the_old_run_back(invoke, tmp_path):
    x, backup = tmp_path / "X", tmp_path / ".X.clipft-previous"
    assert invoke(*RUN, "--out", x).exit_code == 0
    # what a kill -9 of `--overwrite` before the new run's first checkpoint leaves
    x.rename(backup)
    x.mkdir()
    (x / "config.toml").write_text("# clipft\n")
    r = invoke(*RUN, "--out", x)
    assert r.exit_code == 2 and str(backup) in r.stderr and f"mv {backup} {x}" in r.stderr
    # --resume and eval say the same, rather than "nothing to resume" or "no checkpoint" alone
    for args in (["run", "--resume", x], ["eval", x, "--data", "shapes:n=32,val_n=8"]):
        r = invoke(*args)
        assert r.exit_code == 2 and str(backup) in r.stderr and f"mv {backup} {x}" in r.stderr, r.stderr
    assert (backup / "checkpoint" / "state.json").is_file()


def test_a_run_that_died_before_its_first_checkpoint_is_rerun_not_resumed(invoke, tmp_path, monkeypatch):
    from clipft.engine.loop import Trainer

    x = tmp_path / "X"

    def die(self):
        raise RuntimeError("pre-empted")

    monkeypatch.setattr(Trainer, "optimizer_step", die)
    assert invoke(*RUN, "--out", x).exit_code == 1
    monkeypatch.undo()
    assert (x / "config.toml").is_file() and not (x / "checkpoint").exists()
    # a kill during the first checkpoint leaves its temporary folder, without state.json
    partial = x / ".checkpoint.tmp-99999999-0-x"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"partial")
    r = invoke("run", "--resume", x)
    assert r.exit_code == 2 and "nothing to resume" in r.stderr and "without --resume" in r.stderr
    r = invoke(*RUN, "--out", x)                           # no --overwrite needed
    assert r.exit_code == 0, r.stderr
    assert (x / "checkpoint" / "state.json").is_file()


def test_resume_restores_counters_and_drops_rows_after_the_checkpoint(tmp_path, monkeypatch):
    """Epoch 2 dies in its last step, after the row of step 7 (its step checkpoint is at step 6):
    the resumed summary counts every sample once and metrics.jsonl has no
    duplicate rows."""
    from clipft.api import RunConfig, run
    from clipft.engine.loop import Trainer

    conf = RunConfig(model="tiny-vit", data="shapes:n=32,val_n=8", epochs=2, batch_size=8, lr=1e-3,
                     strategies=["full"], checkpoint_every="2", log_every=1)
    whole = run(conf, out=tmp_path / "whole")
    real, calls = Trainer.optimizer_step, []

    def die_at_8(self):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "optimizer_step", die_at_8)
    with pytest.raises(KeyboardInterrupt):
        run(conf, out=tmp_path / "cut")
    monkeypatch.undo()
    rows = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) > json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())["metrics_rows"]
    resumed = run(resume=tmp_path / "cut")
    assert resumed["train"]["samples"] == whole["train"]["samples"] == 64
    assert resumed["train"]["steps"] == whole["train"]["steps"] == 8

    def steps(d):
        return [(r["epoch"], r.get("step")) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
    assert steps(tmp_path / "cut") == steps(tmp_path / "whole")
    assert len(set(steps(tmp_path / "cut"))) == len(steps(tmp_path / "cut"))


# -- the marker lists what the run created, not what was there -----------------
def test_a_file_the_user_adds_while_the_run_trains_is_never_the_runs(tmp_path):
    """The user writes NOTES.md into the run while it trains (here: from an epoch
    callback); a plugin writes its file through RunView.path. The marker keeps
    the first out of the run's entries, so --overwrite refuses rather than
    deleting it, and counts the second as the run's."""
    from clipft import Callback, CallbackSpec, hookimpl
    from clipft.api import RunConfig, make_registry, run
    from clipft.engine.rundir import foreign_entries, read_marker

    class Writer(Callback):
        def on_run_start(self, view):
            self.view = view

        def on_epoch_end(self, epoch):
            (self.view.out_dir / "NOTES.md").write_text("my notes")    # the user, by hand
            self.view.path("extra/rows.csv").write_text("a,b\n")      # a plugin, the documented way

    class Plugin:
        @hookimpl
        def clipft_register_callbacks(self, register):
            register(CallbackSpec(name="writer", summary="writes", build=lambda o: Writer()))

    out = tmp_path / "r"
    cfg = RunConfig(model="tiny-vit", data="shapes:n=16,val_n=8", epochs=1, batch_size=8, strategies=["full"],
                    lr=1e-3, callbacks=["writer"])
    run(cfg, registry=make_registry(plugins=[Plugin()]), out=out)
    entries = read_marker(out)["entries"]
    assert "extra" in entries and "NOTES.md" not in entries
    assert foreign_entries(out) == ["NOTES.md"]


def test_a_finished_run_without_its_checkpoint_is_not_replaced_without_overwrite(invoke, tmp_path):
    import shutil
    x = tmp_path / "X"
    assert invoke(*RUN, "--out", x).exit_code == 0
    shutil.rmtree(x / "checkpoint")
    before = snapshot(x)
    r = invoke(*RUN, "--seed", "1", "--out", x)
    assert r.exit_code == 2 and "already holds a run" in r.stderr, r.stderr
    assert snapshot(x) == before


# -- one process per run directory ---------------------------------------------
HOLD = """
import sys, time
from pathlib import Path
from clipft.engine.rundir import RunLock
RunLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_process_on_a_run_directory_is_refused_and_kill_9_leaves_no_lock(invoke, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    x = tmp_path / "X"
    assert invoke(*RUN, "--out", x).exit_code == 0
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(x)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(x)
        for args in (["run", "--resume", x, "--epochs", "2"], [*RUN, "--seed", "1", "--overwrite", "--out", x],
                     ["export", x, tmp_path / "exp"]):
            r = invoke(*args)
            assert r.exit_code == 2, r.output
            assert f"in use by another clipft process (pid {holder.pid})" in r.stderr, r.stderr
            assert snapshot(x) == before
        assert not (tmp_path / "exp").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    # the kernel released the lock with the process: no stale lock to clear by hand
    r = invoke("run", "--resume", x, "--epochs", "2")
    assert r.exit_code == 0, r.output
