"""Loss figures and ``--drop-last``: an epoch's short last batch is left out for
a loss that couples a batch's samples (contrastive, siglip) and kept for a
per-sample one (cross-entropy); the summary's ``final_loss`` is the last
epoch's mean loss, not the last batch's; a resume with drop-last is exact.
And ``--data PATH``: a bare folder or table file resolves to its source."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_summary
from resume_check import crash_after_first_checkpoint_then_resume

pytestmark = pytest.mark.usefixtures("one_thread")

# 67 samples at batch 16: four full batches and a last one of 3
DATA = "shapes:n=67,val_n=8"
COMMON = ["--model", "tiny-vit", "--pretrained", "none", "--data", DATA, "--batch-size", "16",
          "--strategy", "last-n:n=1", "--callback", "none"]


def _steps(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("type") == "step"], [r for r in rows if r.get("type") == "eval"]


def _run(invoke, out, *args):
    r = invoke("run", *COMMON, "--out", out, "--log-every", "1", *args)
    assert r.exit_code == 0, r.stderr
    return read_summary(out)


def test_contrastive_drops_the_short_last_batch_and_reports_epoch_means(invoke, tmp_path):
    s = _run(invoke, tmp_path / "c", "--epochs", "2")
    assert s["loss"]["name"] == "contrastive"
    assert s["train"]["steps"] == 8 and s["train"]["samples"] == 2 * 64
    assert s["train"]["drop_last"] is True and s["train"]["dropped_per_epoch"] == 3
    steps, evals = _steps(tmp_path / "c")
    last_epoch = [r["loss"] for r in steps if r["epoch"] == 2]
    assert len(last_epoch) == 4
    mean = sum(last_epoch) / len(last_epoch)
    assert s["train"]["final_loss"] == pytest.approx(mean, rel=1e-9)
    assert evals[-1]["train_loss"] == pytest.approx(mean, rel=1e-9)
    # the mean of the epoch, not its last step (which a 3-pair batch used to give)
    assert s["train"]["final_loss"] != last_epoch[-1]
    assert "drop_last = true" in (tmp_path / "c" / "config.toml").read_text()


def test_no_drop_last_keeps_the_short_batch(invoke, tmp_path):
    s = _run(invoke, tmp_path / "k", "--epochs", "1", "--no-drop-last")
    assert s["train"]["steps"] == 5 and s["train"]["samples"] == 67
    assert s["train"]["drop_last"] is False and s["train"]["dropped_per_epoch"] == 0
    steps, _ = _steps(tmp_path / "k")
    assert s["train"]["final_loss"] == pytest.approx(sum(r["loss"] for r in steps) / 5, rel=1e-9)


def test_cross_entropy_keeps_the_last_batch_unless_asked(invoke, tmp_path):
    ce = ["--epochs", "1", "--head", "linear", "--loss", "cross-entropy"]
    s = _run(invoke, tmp_path / "ce", *ce)
    assert s["train"]["steps"] == 5 and s["train"]["samples"] == 67 and s["train"]["drop_last"] is False
    s = _run(invoke, tmp_path / "ced", *ce, "--drop-last")
    assert s["train"]["steps"] == 4 and s["train"]["samples"] == 64 and s["train"]["dropped_per_epoch"] == 3


def test_a_split_smaller_than_a_batch_still_trains(invoke, tmp_path):
    r = invoke("run", *COMMON, "--data", "shapes:n=10,val_n=8", "--epochs", "1", "--out", tmp_path / "s")
    assert r.exit_code == 0, r.stderr
    s = read_summary(tmp_path / "s")
    assert s["train"]["steps"] == 1 and s["train"]["samples"] == 10 and s["train"]["drop_last"] is False
    assert "smaller than one batch" in " ".join(r.stderr.split())


def test_the_loss_declares_whether_it_is_batch_coupled(registry):
    reg = registry
    assert reg.get("loss", "contrastive").batch_coupled and reg.get("loss", "siglip").batch_coupled
    assert not reg.get("loss", "cross-entropy").batch_coupled


def test_plan_says_what_each_epoch_drops(invoke):
    r = invoke("plan", *COMMON)
    assert r.exit_code == 0, r.stderr
    assert "batches per epoch: 4 of 16; the last 3 sample(s) of each epoch are dropped" in r.stdout
    r = invoke("plan", *COMMON, "--no-drop-last", "--json")
    assert json.loads(r.stdout)["batches"] == {"batch_size": 16, "per_epoch": 5, "drop_last": False,
                                               "dropped_per_epoch": 0, "batch_coupled_loss": True}


def test_the_cache_replays_the_dropped_epoch_exactly(invoke, tmp_path):
    """The epoch that fills the frozen-tower cache stores the dropped samples
    too (they are in the next epoch's batches), so nothing reads as missing,
    computed at the full batch's shape, so the replay equals a live run."""
    cached = _run(invoke, tmp_path / "on", "--epochs", "2")
    live = _run(invoke, tmp_path / "off", "--epochs", "2", "--no-cache")
    assert cached["data"]["skipped_images"] == 0 and cached["train"]["samples"] == 128
    assert cached["train"]["final_loss"] == live["train"]["final_loss"]
    assert cached["eval"]["after"] == live["eval"]["after"]


@pytest.mark.numerics
def test_a_resume_inside_an_epoch_with_drop_last_is_exact(tmp_path, monkeypatch):
    from clipft.api import RunConfig
    conf = RunConfig(model="tiny-vit", pretrained="none", data=DATA, batch_size=16, lr=1e-3, epochs=2,
                     strategies=["last-n:n=1"], callbacks=["none"], checkpoint_every="2")
    r = crash_after_first_checkpoint_then_resume(conf, tmp_path, monkeypatch)
    a = load_file(str(r.straight / "checkpoint" / "model.safetensors"))
    b = load_file(str(r.crashed / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert r.resumed["train"]["steps"] == r.whole["train"]["steps"] == 8
    assert r.resumed["train"]["final_loss"] == r.whole["train"]["final_loss"]
    assert r.resumed["eval"]["after"] == r.whole["eval"]["after"]


# -- --data PATH ------------------------------------------------------------------------
def test_bare_paths_resolve_to_their_source(tmp_path):
    from clipft.options import parse_data_ref
    (tmp_path / "pets").mkdir()
    for name in ("pairs.csv", "pairs.tsv", "pairs.jsonl"):
        (tmp_path / name).write_text("")
    assert parse_data_ref(str(tmp_path / "pets")).to_table() == {"name": "imagefolder",
                                                                 "root": str(tmp_path / "pets")}
    for name in ("pairs.csv", "pairs.tsv", "pairs.jsonl"):
        ref = parse_data_ref(str(tmp_path / name))
        assert ref.to_table() == {"name": "captions", "file": str(tmp_path / name)}
    assert parse_data_ref("shapes:n=8").to_table() == {"name": "shapes", "n": "8"}


@pytest.mark.parametrize("name, expected", [
    ("x.parquet", "x.parquet; the captions source reads CSV, TSV, JSONL files"),
    ("missing", "no such directory or file; for a folder of class sub-folders write --data imagefolder:root="),
    ("missing.csv", "no such file"),
    ("notes.txt", "not a .csv/.tsv/.jsonl table"),
])
def test_paths_that_are_no_source_are_usage_errors(invoke, tmp_path, name, expected):
    (tmp_path / "x.parquet").write_text("")
    (tmp_path / "notes.txt").write_text("")
    r = invoke("plan", "--model", "tiny-vit", "--pretrained", "none", "--data", tmp_path / name)
    assert r.exit_code == 2 and expected in r.stderr and "pip install" not in r.stderr


def test_a_run_reads_a_bare_folder(invoke, tmp_path):
    from PIL import Image
    for cls, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (32, 32), colour).save(tmp_path / "imgs" / cls / f"{i}.png")
    r = invoke("run", "--model", "tiny-vit", "--pretrained", "none", "--data", tmp_path / "imgs",
               "--epochs", "0", "--head", "zero-shot", "--callback", "none", "--out", tmp_path / "run")
    assert r.exit_code == 0, r.stderr
    s = read_summary(tmp_path / "run")
    assert s["data"]["name"] == "imagefolder" and s["data"]["classes"] == 2


def test_a_folder_named_without_a_slash_gets_the_spelling(invoke, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()
    r = invoke("plan", "--model", "tiny-vit", "--pretrained", "none", "--data", "digits")
    assert r.exit_code == 2 and "write --data ./digits" in r.stderr and "pip install" not in r.stderr


def test_curves_mark_each_epochs_mean_loss(tmp_path):
    from clipft.callbacks import EpochView, StepView
    from clipft_plots import Plots, PlotsOptions
    p = Plots(PlotsOptions())
    for step, loss in ((1, 2.0), (2, 1.0), (3, 0.5)):
        p.on_step_end(StepView(epoch=1, batch=step, n_batches=3, step=step, stepped=True, loss=loss, terms={}))
    p.on_epoch_end(EpochView(1, 1, 3.5 / 3, 0.1, {}, step=3))
    assert p.epoch_means == {1: (3, pytest.approx(3.5 / 3))}


def test_ranks_leave_the_incomplete_global_batch_out_whole():
    from clipft.engine.distributed import rank_share
    # 35 samples, 2 ranks x 8: two full global batches, then 3 left
    kept = [rank_share(35, 8, 2, r) for r in range(2)]
    assert [len(s) for s, _ in kept] == [17, 17] and kept[0][1] == 1      # split evenly, one left out
    dropped = [rank_share(35, 8, 2, r, drop_last=True) for r in range(2)]
    assert [len(s) for s, _ in dropped] == [16, 16] and dropped[0][1] == 3
    assert sorted(dropped[0][0] + dropped[1][0]) == list(range(32))


def test_a_run_from_before_drop_last_resumes_with_its_short_batches(invoke, tmp_path):
    """config.toml without drop_last (written before the option existed) resumes
    as it trained: keeping each epoch's short last batch."""
    out = tmp_path / "old"
    r = invoke("run", "--model", "tiny-vit", "--data", "shapes:n=40,val_n=8", "--strategy", "full",
               "--batch-size", "16", "--epochs", "1", "--no-drop-last", "--callback", "none", "--out", out)
    assert r.exit_code == 0, r.output
    cfg = out / "config.toml"
    cfg.write_text("\n".join(ln for ln in cfg.read_text().splitlines() if not ln.startswith("drop_last")) + "\n")
    r = invoke("run", "--resume", out, "--epochs", "2", "--json")
    assert r.exit_code == 0, r.output
    import json
    summary = json.loads(r.stdout)
    assert summary["train"]["steps"] == 6      # 3 batches per epoch (16 + 16 + 8), not 2
