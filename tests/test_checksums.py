"""Checkpoints that detect damage: each file's SHA-256 is in state.json and is
checked where a checkpoint is loaded (--resume, export, eval, predict, load).
Damage that keeps a file's size (flipped bytes) falls back to the newest intact
checkpoint with a warning, or fails (exit 1) naming the file."""
from __future__ import annotations

import json
import shutil

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = ["run", "--model", "tiny-vit", "--data", "shapes:n=32,val_n=8", "--batch-size", "8", "--strategy", "full",
       "--lr", "1e-3", "--callback", "none"]


def flip(path, n=2000):
    """Invert ``n`` bytes in the middle of a file; its size stays."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, min(mid + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A 2-epoch run keeping both epoch checkpoints (checkpoint/ and checkpoint-step...)."""
    from click.testing import CliRunner

    from clipft.cli import cli
    d = tmp_path_factory.mktemp("ck") / "run"
    r = CliRunner().invoke(cli, [str(a) for a in RUN + ["--epochs", "2", "--keep-checkpoints", "2",
                                                         "--checkpoint-every", "epoch", "--out", d]])
    assert r.exit_code == 0, r.output
    return d


def copy_of(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def test_every_file_of_a_checkpoint_has_its_checksum(two_checkpoints):
    from clipft.engine.checkpoint import file_digest
    state = json.loads((two_checkpoints / "checkpoint" / "state.json").read_text())
    assert set(state["sha256"]) == set(state["files"]) and "model.safetensors" in state["sha256"]
    for name, digest in state["sha256"].items():
        assert file_digest(two_checkpoints / "checkpoint" / name) == digest


def test_flipped_bytes_fall_back_to_the_older_intact_checkpoint_with_a_warning(two_checkpoints, tmp_path, invoke):
    run = copy_of(two_checkpoints, tmp_path)
    flip(run / "checkpoint" / "model.safetensors")
    older = [p.name for p in run.iterdir() if p.name.startswith("checkpoint-step")]
    assert len(older) == 1
    r = invoke("export", run, tmp_path / "exp")
    assert r.exit_code == 0, r.output
    assert "model.safetensors does not match the checksum" in r.stderr and older[0] in r.stderr


@pytest.mark.parametrize("command", ["resume", "export", "eval"])
def test_no_intact_checkpoint_fails_with_exit_1_naming_the_file(two_checkpoints, tmp_path, invoke, command):
    run = copy_of(two_checkpoints, tmp_path)
    for folder in [p for p in run.iterdir() if p.name.startswith("checkpoint")]:
        flip(folder / "model.safetensors")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    args = {"resume": ["run", "--resume", run, "--epochs", "3"],
            "export": ["export", run, tmp_path / "exp"],
            "eval": ["eval", run, "--data", "shapes:n=32,val_n=8"]}[command]
    r = invoke(*args)
    assert r.exit_code == 1, r.output
    assert "no intact checkpoint" in r.stderr and "model.safetensors does not match" in r.stderr, r.stderr
    assert "Traceback" not in r.output
    assert not (tmp_path / "exp").exists()
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
