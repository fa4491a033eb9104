"""Losing nothing: a run killed (SIGKILL, SIGTERM) part-way through an epoch,
or at a bad moment of a checkpoint write, resumes and ends bit-identical to the
same run left alone. The killed runs are tiny-vit subprocesses; the runs left
alone and the resumes run in this process. Everything runs on one thread, so
"bit-identical" compares the same kernels on the same machine."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
STEPS_PER_EPOCH = 4                       # 32 samples, batch 8
BASE = ["run", "--model", "tiny-vit", "--data", "shapes:n=32,val_n=8", "--epochs", "2",
        "--batch-size", "8", "--lr", "1e-3", "--checkpoint-every", "2", "--keep-checkpoints", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def clipft(*args, kill_step=None, sig="SIGKILL", timeout=120):
    if kill_step is None:
        cmd = [sys.executable, "-m", "clipft.cli", *args]
    else:
        cmd = [sys.executable, str(HERE / "fault_driver.py"), str(kill_step), sig, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)


def final_state(run_dir: Path) -> dict:
    """Trained tensors and optimizer state (moments, step counts) of the newest checkpoint."""
    ck = run_dir / "checkpoint"
    tensors = {f"model.{k}": v for k, v in load_file(str(ck / "model.safetensors")).items()}
    tensors.update({k: v for k, v in load_file(str(ck / "optimizer.safetensors")).items()
                    if k.startswith("optim.")})
    state = json.loads((ck / "state.json").read_text())
    return {"tensors": tensors, "optimizer": state["optimizer"], "scheduler": state["scheduler"],
            "loop": {k: v for k, v in state["loop"].items() if k not in ("seconds", "epoch_seconds")}}


def metrics(run_dir: Path) -> list:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]


def assert_same_run(a: Path, b: Path) -> None:
    sa, sb = final_state(a), final_state(b)
    assert sa["tensors"].keys() == sb["tensors"].keys() and sa["tensors"]
    for k in sa["tensors"]:
        assert torch.equal(sa["tensors"][k], sb["tensors"][k]), k
    assert sa["optimizer"] == sb["optimizer"] and sa["scheduler"] == sb["scheduler"]
    assert sa["loop"] == sb["loop"]
    assert metrics(a) == metrics(b)                     # no duplicated or missing rows
    ja, jb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert ja["train"]["samples"] == jb["train"]["samples"] == 2 * 32
    assert ja["train"]["steps"] == jb["train"]["steps"] == 2 * STEPS_PER_EPOCH
    def history(j):
        return [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in j["eval"]["history"]]
    assert history(ja) == history(jb) and len(history(ja)) == 3


def in_process(*args):
    from click.testing import CliRunner

    from clipft.cli import cli
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def straight(tmp_path_factory, one_thread):
    """The uninterrupted runs, one per strategy."""
    root = tmp_path_factory.mktemp("straight")
    for name, strategy in STRATEGIES.items():
        in_process(*BASE, "--strategy", strategy, "--out", root / name)
    return {name: root / name for name in STRATEGIES}


STRATEGIES = {"full": "full", "last-n-cached": "last-n:n=1", "lora": "lora"}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_sigkill_mid_epoch_after_a_step_checkpoint_resumes_bit_identical(straight, tmp_path, name):
    out = tmp_path / name
    # step 3 of epoch 1: the step checkpoint at step 2 is on disk, step 3 is lost
    r = clipft(*BASE, "--strategy", STRATEGIES[name], "--out", out, kill_step=3)
    assert r.returncode == -signal.SIGKILL
    saved = json.loads((out / "checkpoint" / "state.json").read_text())
    assert (saved["epoch"], saved["global_step"], saved["loop"]["batch"]) == (0, 2, 2)
    lost = 3 - saved["global_step"]
    assert lost <= 2                                    # at most --checkpoint-every steps
    in_process("run", "--resume", out)
    assert_same_run(straight[name], out)


def test_sigkill_at_the_start_of_the_second_epoch(straight, tmp_path):
    out = tmp_path / "e2"
    r = clipft(*BASE, "--strategy", "full", "--out", out, kill_step=STEPS_PER_EPOCH + 1)
    assert r.returncode == -signal.SIGKILL
    saved = json.loads((out / "checkpoint" / "state.json").read_text())
    assert (saved["epoch"], saved["loop"]["batch"]) == (1, 0)
    # the epoch-1 checkpoint and the step-2 one before it (--keep-checkpoints 2)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint", "checkpoint-step00000002"]
    in_process("run", "--resume", out)
    assert_same_run(straight["full"], out)


def test_sigterm_checkpoints_says_how_to_resume_and_exits_143(straight, tmp_path):
    out = tmp_path / "term"
    r = clipft(*BASE, "--strategy", "lora", "--out", out, kill_step=3, sig="SIGTERM")
    assert r.returncode == 143, r.stderr
    assert "SIGTERM" in r.stderr and f"clipft run --resume {out}" in r.stderr
    assert "Traceback" not in r.stderr
    saved = json.loads((out / "checkpoint" / "state.json").read_text())
    assert (saved["global_step"], saved["loop"]["batch"]) == (3, 3)   # nothing lost
    assert not (out / "summary.json").exists()
    in_process("run", "--resume", out)
    assert_same_run(straight["lora"], out)


def test_sigint_exits_130(tmp_path):
    out = tmp_path / "int"
    r = clipft(*BASE, "--strategy", "full", "--out", out, kill_step=1, sig="SIGINT")
    assert r.returncode == 130, r.stderr
    assert json.loads((out / "checkpoint" / "state.json").read_text())["global_step"] == 1


# -- in-process: a crash inside the checkpoint swap, a full disk ---------------------
def _api_run(out, **kw):
    from clipft.api import RunConfig, run
    conf = dict(model="tiny-vit", data="shapes:n=32,val_n=8", epochs=2, batch_size=8, lr=1e-3,
                strategies=["full"], checkpoint_every="2")
    conf.update(kw)
    return run(RunConfig(**conf), out=out)


def test_crash_between_the_two_renames_of_the_swap_resumes(tmp_path, monkeypatch, one_thread):
    import clipft.engine.checkpoint as ck

    whole = tmp_path / "whole"
    _api_run(whole)
    real_replace, calls = os.replace, []

    class Crash(Exception):
        pass

    def replace(src, dst):
        if Path(dst).name == "checkpoint" and Path(dst).parent.name == "crash":
            calls.append(src)
            # the third checkpoint (step 6): the old one is already moved aside; die
            if len(calls) == 3:
                raise Crash
        return real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", replace)
    with pytest.raises(Crash):
        _api_run(tmp_path / "crash")
    monkeypatch.setattr(ck.os, "replace", real_replace)
    crash = tmp_path / "crash"
    assert not (crash / "checkpoint").exists()          # between the renames
    from clipft.api import run
    run(resume=crash)
    assert_same_run(whole, crash)


@pytest.mark.parametrize("kind", ["os", "safetensors"])
def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, one_thread, kind):
    """Python's OSError, or safetensors' own error type for the same full disk
    (it is not an OSError): a clear error, the partial folder removed."""
    import errno

    from safetensors import SafetensorError

    import clipft.engine.checkpoint as ck
    from clipft.errors import ClipftError

    real_save, calls = ck.save_file, []

    def save_file(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 4:                  # the second checkpoint's second file
            with open(path, "wb") as f:
                f.write(b"partial")
            if kind == "safetensors":
                raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                      "message: \"No space left on device\" })")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *a, **k)

    monkeypatch.setattr(ck, "save_file", save_file)
    out = tmp_path / "full"
    with pytest.raises(ClipftError, match="No space left on device.*previous checkpoint is intact"):
        _api_run(out)
    assert [p.name for p in out.iterdir() if "checkpoint" in p.name] == ["checkpoint"]
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["global_step"] == 2 and ck.read_state(out / "checkpoint") is not None
