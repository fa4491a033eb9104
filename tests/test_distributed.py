"""Data parallelism on torch.distributed (gloo, 2 CPU processes under torchrun).

A run on 2 ranks with ``--batch-size b`` sees the batches of a one-process run
with ``--batch-size 2b`` (engine/distributed.py ``rank_share``), so it must
train to the same parameters, up to the order of float32 sums: an all-reduce
adds two half-batch gradients where one process adds the whole batch in one
reduction. Every launch runs with a collective timeout, so a broken run fails
instead of hanging.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from numerics import TINY_DEPTH, assert_close_rel

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = "shapes:n=32,val_n=16"
# SGD without momentum tricks: the first step moves θ by exactly lr·grad
COMMON = ["--model", "tiny-vit", "--pretrained", "none", "--callback", "none", "--optimizer", "sgd",
          "--lr", "0.05", "--warmup-steps", "0", "--schedule", "constant", "--weight-decay", "0",
          "--grad-clip", "0", "--collective-timeout", "1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="120")


def torchrun(*args, script=None, timeout=150):
    target = ["-m", "clipft"] if script is None else [str(script)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           *target, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)


def one_process(invoke, *args):
    res = invoke(*args, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def tensors(run_dir: Path) -> dict:
    return load_file(str(run_dir / "checkpoint" / "model.safetensors"))


def steps(run_dir: Path) -> list:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r and "step" in r]


def assert_same_training(a: Path, b: Path, batch: int):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        # gradients of a batch of `batch` summed in another order, through the
        # tiny model's depth, then one SGD step per batch
        assert_close_rel(tb[k], ta[k], reduction=batch, depth=TINY_DEPTH, what=k)
    la, lb = steps(a), steps(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for x, y in zip(la, lb):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)


def test_cross_entropy_with_a_linear_head_matches_one_process(invoke, tmp_path):
    args = [*COMMON, "--data", DATA, "--epochs", "1", "--strategy", "last-n:n=1,tower=vision", "--head", "linear",
            "--loss", "cross-entropy"]
    one = one_process(invoke, "run", *args, "--batch-size", "16", "--out", tmp_path / "one")
    # `clipft run --nproc 2` launches torchrun itself
    r = subprocess.run([sys.executable, "-m", "clipft", "run", *args, "--batch-size", "8", "--nproc", "2",
                        "--out", tmp_path / "two", "--json"], capture_output=True, text=True, env=ENV, timeout=150)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads(r.stdout)          # exactly one document: rank 0's
    assert two["distributed"] == {"world_size": 2, "backend": "gloo", "batch_per_rank": 8, "global_batch": 16,
                                  "dropped_per_epoch": 0, "unused_trained_tensors": 0,
                                  "parallel": "ddp"}
    assert two["train"]["samples"] == one["train"]["samples"] == 32
    assert two["train"]["steps"] == one["train"]["steps"] == 2
    assert_same_training(tmp_path / "one", tmp_path / "two", 16)
    # rank 0 alone wrote the run directory: the files of a one-process run, each row once
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(steps(tmp_path / "two")) == len(steps(tmp_path / "one"))


@pytest.fixture(scope="module")
def contrastive(tmp_path_factory):
    """1 process with global batch 16 against 2 ranks × 8, 2 epochs, the
    default gathered loss (local_loss, gather_with_grad, duplicates=mask: the
    shapes captions repeat within a batch)."""
    from click.testing import CliRunner

    from clipft.cli import cli
    root = tmp_path_factory.mktemp("ddp")
    args = [*COMMON, "--data", DATA, "--epochs", "2", "--strategy", "full", "--loss", "contrastive"]
    res = CliRunner().invoke(cli, [str(a) for a in ("run", *args, "--batch-size", "16", "--out", root / "one")],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    r = torchrun("run", *args, "--batch-size", "8", "--out", root / "two")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("evaluation (val split)") == 1     # the result, from rank 0 alone
    return root, args


def test_gathered_contrastive_loss_matches_one_process(contrastive):
    root, _ = contrastive
    assert_same_training(root / "one", root / "two", 16)


def test_resume_of_a_two_process_run_equals_the_uninterrupted_one(contrastive, invoke):
    root, args = contrastive
    first = [a if a != "2" else "1" for a in args]     # --epochs 1
    r = torchrun("run", *first, "--batch-size", "8", "--out", root / "resumed")
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun("run", "--resume", root / "resumed", "--epochs", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    ta, tb = tensors(root / "two"), tensors(root / "resumed")
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert [r["loss"] for r in steps(root / "two")] == [r["loss"] for r in steps(root / "resumed")]
    # another world size is refused, naming the one to use
    res = invoke("run", "--resume", root / "resumed", "--epochs", "3")
    assert res.exit_code == 2 and "--nproc-per-node 2" in res.stderr


def test_without_gathered_gradients_the_update_is_one_over_world_size(invoke, tmp_path):
    """open_clip's ``local_loss=false, gather_with_grad=false``: every rank's
    loss is the global one, but only its own rows carry gradient, so after DDP
    averages, the gradient is the global one divided by the world size."""
    args = [*COMMON, "--data", "shapes:n=16,val_n=8", "--epochs", "1",
            "--strategy", "last-n:n=1"]
    one_process(invoke, "run", *args, "--loss", "contrastive", "--batch-size", "16", "--out", tmp_path / "one")
    r = torchrun("run", *args, "--loss", "contrastive:local_loss=false,gather_with_grad=false",
                 "--batch-size", "8", "--out", tmp_path / "two")
    assert r.returncode == 0, r.stderr[-3000:]
    # one step from the same start: θ0 is the same random init on both (seed 0)
    a, b = tensors(tmp_path / "one"), tensors(tmp_path / "two")
    init = _init_weights(args)
    num = sum(float(((b[k] - init[k]) * (a[k] - init[k])).sum()) for k in a)
    den = sum(float(((a[k] - init[k]) ** 2).sum()) for k in a)
    assert num / den == pytest.approx(0.5, rel=1e-3)


def _init_weights(args):
    from clipft.engine.assemble import seed_everything
    from clipft.models import load_model
    seed_everything(0)
    return load_model("tiny-vit", "none").model.state_dict()


CRASH = textwrap.dedent("""
    import os, sys
    from clipft.engine import loop
    if os.environ["RANK"] == "1":
        real = loop.Trainer.optimizer_step
        def crash(self):
            raise RuntimeError("simulated failure on rank 1")
        loop.Trainer.optimizer_step = crash
    from clipft.cli import main
    sys.argv = ["clipft"] + sys.argv[1:]
    main()
""")


def test_a_rank_that_fails_takes_the_job_down_with_its_error(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    r = torchrun("run", *COMMON, "--data", DATA, "--epochs", "1", "--strategy", "full", "--batch-size", "8",
                 "--out", tmp_path / "run", script=script, timeout=120)
    assert r.returncode != 0
    assert "simulated failure on rank 1" in r.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_trained_tower_the_loss_never_reaches_does_not_stall_ddp(tmp_path):
    """``full`` under cross-entropy through a head: ``logit_scale`` trains but the
    loss never reaches it, the case that raises DDP's "Expected to have
    finished reduction" unless unused parameters are looked for. The probe finds
    it (the text tower, which nothing uses either, is left frozen before DDP
    wraps anything), and 3 odd samples (35 over 2 ranks x 8) are dropped evenly."""
    r = torchrun("run", *COMMON, "--data", "shapes:n=35,val_n=8", "--epochs", "1", "--strategy", "full",
                 "--head", "linear", "--loss", "cross-entropy", "--batch-size", "8", "--out", tmp_path / "run",
                 "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)
    d = s["distributed"]
    assert d["unused_trained_tensors"] == 1 and d["dropped_per_epoch"] == 1
    assert s["params"]["unused_trainable"]["tower"] == "text"
    assert "left out of each epoch" in r.stderr


def _pid_of_rank(tag: str, rank: int):
    """The pid of the torchrun worker of ``rank`` whose environment carries ``tag``."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"CLIPFT_TEST_TAG={tag}".encode() in env and f"RANK={rank}".encode() in env \
                and b"TORCHELASTIC_RUN_ID" in b" ".join(env):
            return int(d.name)
    return None


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the rank's process through /proc")
def test_a_stopped_rank_fails_the_job_naming_it_instead_of_hanging(tmp_path):
    import signal
    import time
    import uuid
    tag = uuid.uuid4().hex
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "clipft", "run", *COMMON[:-1], "0.15", "--data", "shapes:n=4096,val_n=16",
           "--epochs", "1", "--strategy", "full", "--batch-size", "8", "--nproc", "2", "--out", str(out)]
    proc = subprocess.Popen(cmd, env={**ENV, "CLIPFT_TEST_TAG": tag}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    stopped = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(0.5)
        assert (out / "metrics.jsonl").exists(), "the run never started training"
        stopped = _pid_of_rank(tag, 1)
        assert stopped is not None
        os.kill(stopped, signal.SIGSTOP)
        _, err = proc.communicate(timeout=150)     # 0.15 min of waiting, then the job ends
    finally:
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-2000:]
    assert "did not answer" in err and "rank 1" in err, err[-2000:]
    assert "Traceback" not in err


def test_sigterm_to_the_nproc_launcher_exits_143_with_the_resume_line(tmp_path):
    """The launcher forwards the signal; the ranks checkpoint and stop; the
    launcher exits as a single process would (143), leaves no torchelastic
    folder in the temp dir and prints none of torch's FutureWarnings."""
    import signal
    import tempfile
    import time
    before = set(Path(tempfile.gettempdir()).glob("torchelastic_*"))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "clipft", "run", *COMMON, "--data", "shapes:n=4096,val_n=16", "--epochs", "1",
           "--strategy", "full", "--batch-size", "8", "--nproc", "2", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(0.5)
        assert (out / "metrics.jsonl").exists(), "the run never started training"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert f"resume with: clipft run --resume {out}" in err
    assert "FutureWarning" not in err and "SignalException" not in err and "Traceback" not in err
    assert set(Path(tempfile.gettempdir()).glob("torchelastic_*")) <= before
    r = subprocess.run([sys.executable, "-m", "clipft", "run", "--resume", str(out), "--nproc", "2"],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
