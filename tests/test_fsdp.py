"""``--parallel fsdp`` (FSDP2) on 2 CPU processes under gloo.

FSDP computes what DDP computes: the same forward on every rank (the shards
all-gathered into the same whole weights), the same gradients averaged over
the ranks (a reduce-scatter instead of an all-reduce), the same optimizer
update on each shard. What may differ is the order of float32 sums in the
reductions, so the result must equal DDP's within the tolerance of a batch's
gradient summed in another order through the tiny model's depth (as
test_distributed.py bounds DDP against one process). Text trimming is off on
both sides: under FSDP the text tower runs on all positions (docs/scaling.md),
which is itself a rounding-level difference. Every launch has a collective
timeout, so a broken run fails instead of hanging.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path

import pytest
import torch

from numerics import TINY_DEPTH, assert_close_rel
from test_distributed import COMMON, ENV, _pid_of_rank, steps, tensors, torchrun

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = "shapes:n=32,val_n=16"
FULL = [*COMMON, "--data", DATA, "--strategy", "full", "--loss", "contrastive", "--batch-size", "8",
        "--no-trim-text", "--grad-clip", "1"]


def assert_same_training(a: Path, b: Path, batch: int):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert_close_rel(tb[k], ta[k], reduction=batch, depth=TINY_DEPTH, what=k)
    la, lb = steps(a), steps(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb] and la
    for x, y in zip(la, lb):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """``full`` for 2 epochs on 2 ranks x 8 under FSDP (SGD with momentum, so
    the optimizer has a state to shard; --grad-clip 1 so the clip's norm is
    taken over shards; a checkpoint after every step, all kept), and in one
    process with the global batch of 16, which DDP equals within the same
    tolerance (test_distributed.py)."""
    from click.testing import CliRunner

    from clipft.cli import cli
    root = tmp_path_factory.mktemp("fsdp")
    res = CliRunner().invoke(cli, [str(a) for a in ("run", *FULL, "--epochs", "2", "--batch-size", "16",
                                                    "--out", root / "one")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    r = torchrun("run", *FULL, "--epochs", "2", "--batch-size", "8", "--parallel", "fsdp", "--checkpoint-every", "1",
                 "--keep-checkpoints", "9", "--out", root / "fsdp", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    return root, json.loads(r.stdout)


def test_full_fine_tuning_under_fsdp_equals_one_process(full):
    root, summary = full
    assert_same_training(root / "one", root / "fsdp", 16)
    d = summary["distributed"]
    assert d["parallel"] == "fsdp" and d["world_size"] == 2
    # both towers train: each is sharded block by block; logit_scale stays whole
    assert d["fsdp"] == {"towers": {"text": "blocks", "vision": "blocks"}, "replicated_trained_tensors": 1}
    # the checkpoint is the one-process format: whole tensors, every trained key
    assert tensors(root / "fsdp").keys() == tensors(root / "one").keys()


def test_resume_of_an_fsdp_run_is_exact(full):
    """The run resumed from its checkpoint after step 1 (part-way into epoch 1)
    ends with the same weights, optimizer state and losses, bit for bit, as
    the uninterrupted run: the sharded optimizer state is saved whole and cut
    into each rank's shard again."""
    import shutil
    root, _ = full
    copy = root / "resumed"
    shutil.copytree(root / "fsdp", copy)
    for p in copy.iterdir():   # the crash: nothing after step 1 was written
        if p.name.startswith("checkpoint") and p.name != "checkpoint-step00000001":
            shutil.rmtree(p)
    (copy / "summary.json").unlink()
    r = torchrun("run", "--resume", copy)
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors.torch import load_file
    for name in ("model.safetensors", "optimizer.safetensors"):
        a = load_file(str(root / "fsdp" / "checkpoint" / name))
        b = load_file(str(copy / "checkpoint" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    assert [x["loss"] for x in steps(root / "fsdp")] == [x["loss"] for x in steps(copy)]


def test_lora_under_fsdp_equals_ddp(tmp_path):
    """LoRA with its dropout on: every rank draws the masks it draws under DDP
    (where rank 0 alone evaluates, the other ranks evaluate with their RNG kept)."""
    args = [*COMMON, "--data", DATA, "--epochs", "1", "--strategy", "lora", "--loss", "contrastive",
            "--no-trim-text", "--batch-size", "8"]
    for mode in ("ddp", "fsdp"):
        r = torchrun("run", *args, "--parallel", mode, "--out", tmp_path / mode, "--json")
        assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["distributed"]["fsdp"]["towers"] == {"text": "blocks", "vision": "blocks"}
    assert_same_training(tmp_path / "ddp", tmp_path / "fsdp", 16)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the rank's process through /proc")
def test_a_killed_rank_ends_the_fsdp_job_with_a_message(tmp_path):
    """SIGKILL to rank 1 mid-training: the launcher stops rank 0 (whose next
    all-gather could never complete) and says which rank died. The run is
    given far longer than it needs (the collective timeout bounds it anyway)."""
    tag = uuid.uuid4().hex
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "clipft", "run", *COMMON[:-1], "0.15", "--data", "shapes:n=4096,val_n=16",
           "--epochs", "1", "--strategy", "full", "--batch-size", "8", "--nproc", "2", "--parallel", "fsdp",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, env={**ENV, "CLIPFT_TEST_TAG": tag}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(0.5)
        assert (out / "metrics.jsonl").exists(), "the run never started training"
        pid = _pid_of_rank(tag, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-2000:]
    assert "rank 1 of 2 exited" in err, err[-2000:]
    assert "Traceback" not in err


def test_fsdp_refuses_fp16_and_a_fused_optimizer():
    from clipft.engine import fsdp, optim
    from clipft.errors import ClipftUsageError
    with pytest.raises(ClipftUsageError, match="bf16"):
        fsdp.check_supported("fp16")
    fsdp.check_supported("bf16")

    class DTensor:   # resolve_impl tells FSDP's parameters by their data's class
        pass
    p = types.SimpleNamespace(data=DTensor())
    with pytest.raises(ClipftUsageError, match="fused"):
        optim.resolve_impl("fused", [p])
    assert optim.resolve_impl("auto", [p]) == "foreach"
    assert optim.resolve_impl("auto", [p, torch.nn.Parameter(torch.zeros(1))]) == "for-loop"


def test_one_process_runs_as_usual_with_a_warning(invoke, tmp_path):
    res = invoke("run", *COMMON, "--data", "shapes:n=8,val_n=4", "--epochs", "1", "--strategy", "last-n:n=1",
                 "--batch-size", "8", "--parallel", "fsdp", "--out", tmp_path / "run")
    assert res.exit_code == 0, res.output
    assert "--parallel fsdp with one process" in res.stderr


def test_a_streamed_checkpoint_file_is_the_safetensors_format(tmp_path):
    """FSDP writes a checkpoint file one gathered tensor at a time: safetensors
    reads it back bit for bit, for every dtype a checkpoint holds (an empty
    tensor, a scalar, RNG bytes, bf16); without a path nothing is written but
    every tensor is still made (the other ranks' part of the gathering)."""
    from safetensors.torch import load_file

    from clipft.engine.checkpoint import stream_safetensors
    ts = {"w": torch.randn(3, 5), "step": torch.tensor(2.0), "rng": torch.randint(0, 255, (7,), dtype=torch.uint8),
          "half": torch.randn(4).bfloat16(), "none": torch.zeros(0, 3), "n": torch.arange(3)}
    made = []

    def entries():
        return [(k, v, lambda k=k, v=v: made.append(k) or v) for k, v in ts.items()]
    stream_safetensors(tmp_path / "t.safetensors", entries())
    back = load_file(str(tmp_path / "t.safetensors"))
    assert back.keys() == ts.keys() and all(torch.equal(back[k], v) for k, v in ts.items())
    made.clear()
    stream_safetensors(None, entries())
    assert made == list(ts)


def test_a_head_and_a_frozen_tower_under_fsdp_train_as_one_process(invoke, tmp_path):
    """``full`` under cross-entropy through a linear head: the text tower nothing
    uses is left frozen and, being small, whole on every rank; the head stays
    whole with its gradients all-reduced; ``logit_scale``, which the loss never
    reaches, gets no gradient on any rank and is left alone (as under DDP)."""
    args = [*COMMON, "--data", DATA, "--epochs", "1", "--strategy", "full", "--head", "linear",
            "--loss", "cross-entropy"]
    res = invoke("run", *args, "--batch-size", "16", "--out", tmp_path / "one")
    assert res.exit_code == 0, res.output
    r = torchrun("run", *args, "--batch-size", "8", "--parallel", "fsdp", "--out", tmp_path / "two", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(r.stdout)["distributed"]["fsdp"]
    assert d == {"towers": {"text": "whole", "vision": "blocks"}, "replicated_trained_tensors": 3}
    assert_same_training(tmp_path / "one", tmp_path / "two", 16)
    from safetensors.torch import load_file
    a, b = (load_file(str(tmp_path / n / "checkpoint" / "head.safetensors")) for n in ("one", "two"))
    for k in a:
        assert_close_rel(b[k], a[k], reduction=16, depth=TINY_DEPTH, what=k)
    assert torch.equal(tensors(tmp_path / "two")["logit_scale"], tensors(tmp_path / "one")["logit_scale"])
