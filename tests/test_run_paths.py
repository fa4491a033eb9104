"""Files a callback writes stay inside the run directory: a path option that
leaves it is a usage error before anything is written, and RunView.path is the
one way a plugin gets a writable path in the run."""
import hashlib
import os

import pytest

from clipft.callbacks import RunView
from clipft.errors import ClipftUsageError


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("option", [
    "csv:evals={victim}", "csv:steps=../victim.txt", "plots:file={victim}",
    "tensorboard:dir=../elsewhere", "csv:evals=config.toml", "csv:steps=summary.json",
    "plots:file=checkpoint/model.safetensors", "csv:evals=metrics.jsonl", "csv:evals=",
], ids=["abs", "dotdot", "plots-abs", "tb-dotdot", "config", "summary", "checkpoint", "metrics", "empty"])
def test_a_callback_path_outside_the_run_is_refused_before_anything_is_written(invoke, tmp_path, option):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    before = digest(victim)
    out = tmp_path / "run"
    res = invoke("run", "--model", "tiny-vit", "--data", "shapes:n=16,val_n=8", "--strategy", "full",
                 "--epochs", "1", "--batch-size", "8", "--callback", option.format(victim=victim),
                 "--out", out)
    assert res.exit_code == 2, res.output
    assert "run directory" in res.stderr or "run's own files" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert digest(victim) == before
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]


def test_run_path_refuses_a_symlink_that_points_out(tmp_path):
    run_dir, outside = tmp_path / "run", tmp_path / "outside"
    run_dir.mkdir()
    outside.mkdir()
    os.symlink(outside, run_dir / "logs")
    os.symlink(outside / "victim.csv", run_dir / "steps.csv")
    view = RunView(out_dir=run_dir, config={})
    for name in ("logs/steps.csv", "steps.csv"):
        with pytest.raises(ClipftUsageError, match="outside the run directory"):
            view.path(name)
    assert list(outside.iterdir()) == []


def test_run_path_gives_a_path_inside_and_makes_its_folders(tmp_path):
    view = RunView(out_dir=tmp_path, config={})
    p = view.path("plots/curves.png")
    assert p == tmp_path / "plots" / "curves.png" and p.parent.is_dir()
    with pytest.raises(ClipftUsageError, match="absolute"):
        view.path(str(tmp_path / "x"))
    with pytest.raises(ClipftUsageError, match=r"\.\."):
        view.path("a/../../x")
