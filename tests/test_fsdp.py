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
import textwrap
import time
import types
import uuid
from pathlib import Path

import pytest
import torch

from clipft.engine.checkpoint import is_sharded, read_state
from numerics import TINY_DEPTH, assert_close_rel
from test_distributed import COMMON, ENV, _pid_of_rank, steps, tensors, torchrun

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = "shapes:n=32,val_n=16"
FULL = [*COMMON, "--data", DATA, "--strategy", "full", "--loss", "contrastive", "--batch-size", "8",
        "--no-trim-text", "--grad-clip", "1"]
LORA = [*COMMON, "--data", DATA, "--epochs", "1", "--strategy", "lora", "--loss", "contrastive",
        "--no-trim-text", "--batch-size", "8"]
HEAD = [*COMMON, "--data", DATA, "--epochs", "1", "--strategy", "full", "--head", "linear",
        "--loss", "cross-entropy"]


def assert_same_training(a: Path, b: Path, batch: int):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert_close_rel(tb[k], ta[k], reduction=batch, depth=TINY_DEPTH, what=k)
    la, lb = steps(a), steps(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb] and la
    for x, y in zip(la, lb):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)


#: one torchrun launch runs every multi-process scenario below in turn (each
#: launch costs the imports and the rendezvous of two processes): the argument
#: lists in a JSON file; ``["resume-copy", SRC, DST, KEEP]`` copies a run
#: directory keeping only checkpoint KEEP (a crash after it); the other rank
#: waits for it.
SERIES = textwrap.dedent("""
    import json, os, shutil, sys, time
    from pathlib import Path
    from clipft.cli import cli
    from clipft.engine import distributed
    distributed.shutdown = lambda: None   # the process group serves every run
    for item in json.loads(Path(sys.argv[1]).read_text()):
        if item[0] == "resume-copy":
            src, dst, keep = Path(item[1]), Path(item[2]), item[3]
            done = dst.with_name(dst.name + ".copied")
            if os.environ["RANK"] == "0":
                shutil.copytree(src, dst)
                for p in dst.iterdir():
                    if p.name.startswith("checkpoint") and p.name != keep:
                        shutil.rmtree(p)
                (dst / "summary.json").unlink()
                done.touch()
            deadline = time.monotonic() + 60
            while not done.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            continue
        try:
            cli.main(args=item, prog_name="clipft", standalone_mode=False)
        except SystemExit as exc:
            if exc.code:
                raise
""")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Under FSDP on 2 ranks x 8, in one launch: ``full`` for 2 epochs (SGD
    with momentum, so the optimizer has a state to shard; --grad-clip 1 so the
    clip's norm is taken over shards; a checkpoint after every step, all
    kept); its resume from the checkpoint after step 1 (part-way into epoch
    1); LoRA under DDP and under FSDP; ``full`` through a linear head. In one
    process: ``full`` with the global batch of 16 (which DDP equals within the
    same tolerance, test_distributed.py), its checkpoints kept likewise, and
    the head run."""
    from click.testing import CliRunner

    from clipft.cli import cli
    root = tmp_path_factory.mktemp("fsdp")
    for args in (("run", *FULL, "--epochs", "2", "--batch-size", "16", "--checkpoint-every", "1",
                  "--keep-checkpoints", "9", "--out", root / "one"),
                 ("run", *HEAD, "--batch-size", "16", "--out", root / "head-one")):
        res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
        assert res.exit_code == 0, res.output
    series = [
        ["run", *FULL, "--epochs", "2", "--batch-size", "8", "--parallel", "fsdp", "--checkpoint-every", "1",
         "--keep-checkpoints", "9", "--out", root / "fsdp"],
        ["resume-copy", root / "fsdp", root / "resumed", "checkpoint-step00000001"],
        ["run", "--resume", root / "resumed"],
        *(["run", *LORA, "--parallel", mode, "--out", root / f"lora-{mode}"] for mode in ("ddp", "fsdp")),
        ["run", *HEAD, "--batch-size", "8", "--parallel", "fsdp", "--out", root / "head-two"],
    ]
    (root / "series.json").write_text(json.dumps([[str(a) for a in item] for item in series]))
    (root / "series.py").write_text(SERIES)
    r = torchrun(root / "series.json", script=root / "series.py", timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    return root


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_full_fine_tuning_under_fsdp_equals_one_process(runs):
    root = runs
    assert_same_training(root / "one", root / "fsdp", 16)
    d = summary(root / "fsdp")["distributed"]
    assert d["parallel"] == "fsdp" and d["world_size"] == 2
    # both towers train: each is sharded block by block; logit_scale stays whole
    assert d["fsdp"] == {"towers": {"text": "blocks", "vision": "blocks"}, "replicated_trained_tensors": 1}
    # the checkpoint is the one-process format: whole tensors, every trained key
    assert tensors(root / "fsdp").keys() == tensors(root / "one").keys()


def test_resume_of_an_fsdp_run_is_exact(runs):
    """The run resumed from its sharded checkpoint after step 1 (part-way into
    epoch 1) ends with the same weights, optimizer state and losses, bit for
    bit, as the uninterrupted run: each rank reads back its own shards."""
    root = runs
    assert is_sharded(read_state(root / "resumed" / "checkpoint-step00000001"))
    from safetensors.torch import load_file
    for name in ("model.safetensors", "optimizer.safetensors"):
        a = load_file(str(root / "fsdp" / "checkpoint" / name))
        b = load_file(str(root / "resumed" / "checkpoint" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    assert [x["loss"] for x in steps(root / "fsdp")] == [x["loss"] for x in steps(root / "resumed")]


def test_checkpoints_during_training_are_shards_and_the_last_is_whole(runs, invoke, tmp_path):
    """Every checkpoint before the end of training holds one
    torch.distributed.checkpoint file per rank and its metadata, listed with
    their sizes and checksums in state.json, and no model.safetensors; the
    last one is the one-process format. One process reads the shards whole
    (they equal the one-process run's checkpoint of the same step, within the
    tolerance of the test above), so eval works on a run whose newest
    checkpoint was taken during training, and export writes its full
    weights; a one-process resume of it is refused before anything is read
    or written."""
    import shutil

    from safetensors.torch import load_file

    from clipft.engine.checkpoint import SHARDS_DIR, _read_shards_whole, verify_checkpoint
    root = runs
    for step in (1, 2, 3):
        folder = root / "fsdp" / f"checkpoint-step{step:08d}"
        state = read_state(folder)
        assert is_sharded(state) and state["sharded"]["world_size"] == 2
        assert {f"{SHARDS_DIR}/{n}" for n in (".metadata", "__0_0.distcp", "__1_0.distcp")} <= set(state["files"])
        assert not (folder / "model.safetensors").exists() and not (folder / "optimizer.safetensors").exists()
        assert verify_checkpoint(folder, state) is None
    final = root / "fsdp" / "checkpoint"
    assert not is_sharded(read_state(final)) and not (final / SHARDS_DIR).exists()
    assert (final / "model.safetensors").is_file()

    one = load_file(str(root / "one" / "checkpoint-step00000001" / "model.safetensors"))
    whole = _read_shards_whole(root / "fsdp" / "checkpoint-step00000001" / SHARDS_DIR, one, "cpu")
    assert whole.keys() == one.keys()
    for k in one:
        assert_close_rel(whole[k], one[k], reduction=16, depth=TINY_DEPTH, what=k)

    crashed = tmp_path / "crashed"
    shutil.copytree(root / "fsdp", crashed)
    for p in crashed.iterdir():   # only the checkpoint after step 3 is left
        if p.name.startswith("checkpoint") and p.name != "checkpoint-step00000003":
            shutil.rmtree(p)
    (crashed / "summary.json").unlink()
    for run_dir in (root / "fsdp", crashed):
        res = invoke("eval", run_dir, "--json")
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["metrics"]["top1"] is not None
    res = invoke("export", crashed, tmp_path / "export")
    assert res.exit_code == 0, res.output
    exported = load_file(str(tmp_path / "export" / "open_clip_model.safetensors"))
    last = _read_shards_whole(crashed / "checkpoint-step00000003" / SHARDS_DIR, exported, "cpu")
    assert last and all(torch.equal(exported[k], v) for k, v in last.items())
    before = sorted(p.name for p in crashed.rglob("*"))
    res = invoke("run", "--resume", crashed)
    assert res.exit_code == 2 and "trained on 2 process(es) and this is 1" in res.stderr, res.output
    assert sorted(p.name for p in crashed.rglob("*")) == before


def test_lora_under_fsdp_equals_ddp(runs):
    """LoRA with its dropout on: every rank draws the masks it draws under DDP
    (where rank 0 alone evaluates, the other ranks evaluate with their RNG kept)."""
    root = runs
    assert summary(root / "lora-fsdp")["distributed"]["fsdp"]["towers"] == {"text": "blocks", "vision": "blocks"}
    assert_same_training(root / "lora-ddp", root / "lora-fsdp", 16)


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


def test_a_head_and_a_frozen_tower_under_fsdp_train_as_one_process(runs):
    """``full`` under cross-entropy through a linear head: the text tower nothing
    uses is left frozen and, being small, whole on every rank; the head stays
    whole with its gradients all-reduced; ``logit_scale``, which the loss never
    reaches, gets no gradient on any rank and is left alone (as under DDP)."""
    root = runs
    d = summary(root / "head-two")["distributed"]["fsdp"]
    assert d == {"towers": {"text": "whole", "vision": "blocks"}, "replicated_trained_tensors": 3}
    assert_same_training(root / "head-one", root / "head-two", 16)
    from safetensors.torch import load_file
    a, b = (load_file(str(root / n / "checkpoint" / "head.safetensors")) for n in ("head-one", "head-two"))
    for k in a:
        assert_close_rel(b[k], a[k], reduction=16, depth=TINY_DEPTH, what=k)
    assert torch.equal(tensors(root / "head-two")["logit_scale"], tensors(root / "head-one")["logit_scale"])


@pytest.fixture
def one_rank(tmp_path):
    """A process group of one (gloo), for FSDP's checkpoint code in-process."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _sharded_checkpointer(run_dir: Path, seed: int):
    from torch.distributed.fsdp import fully_shard

    from clipft.engine.checkpoint import Checkpointer
    from clipft.engine.fsdp import Sharding
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
    units = [fully_shard(model[0]), fully_shard(model)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return Checkpointer(run_dir, model, None, {}, opt, None, None, None, [], sharding=Sharding(units, [], 1),
                        epochs=2)


def _step(ck) -> dict:
    ck.model(torch.randn(3, 4)).square().sum().backward()
    ck.optimizer.step()
    ck.optimizer.zero_grad()
    n = len(ck.last_saved or ()) and ck.last_saved[0]
    return {"epoch": 0, "step": n + 1, "batch": n + 1, "world_size": 1}


def test_a_sharded_checkpoint_is_written_whole_or_not_at_all(one_rank, tmp_path, monkeypatch):
    """A failure after the shards are written (a full disk when rank 0 writes
    the rest) leaves the previous checkpoint current and intact and no
    temporary folder behind; what a later save writes reads back, model and
    optimizer, into a model built afresh."""
    from clipft.engine.checkpoint import CURRENT, TMP_PREFIX, Checkpointer, verify_checkpoint
    from clipft.errors import ClipftError
    ck = _sharded_checkpointer(tmp_path, 0)
    ck.save(_step(ck), [])
    first = read_state(tmp_path / CURRENT)
    assert is_sharded(first) and "shards/.metadata" in first["files"]

    def full_disk(self, folder, *a, **k):
        assert (folder / "shards" / ".metadata").is_file()   # the shards are in, the rest fails
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(Checkpointer, "_write", full_disk)
        with pytest.raises(ClipftError, match="previous checkpoint is intact"):
            ck.save(_step(ck), [])
    assert read_state(tmp_path / CURRENT)["global_step"] == 1
    assert verify_checkpoint(tmp_path / CURRENT, first) is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]

    loop = _step(ck)
    ck.save(loop, [])
    back = _sharded_checkpointer(tmp_path, 1)
    back.restore(tmp_path / CURRENT)
    for a, b in zip(ck.model.parameters(), back.model.parameters()):
        assert torch.equal(a.full_tensor(), b.full_tensor())
        sa, sb = ck.optimizer.state[a]["momentum_buffer"], back.optimizer.state[b]["momentum_buffer"]
        assert torch.equal(sa.full_tensor(), sb.full_tensor())
