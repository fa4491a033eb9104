"""The callback plugins: TensorBoard event files that TensorBoard itself reads
back, CSV rows that match metrics.jsonl, and curves.png (on by default)."""
from __future__ import annotations

import csv
import json
import struct

import pytest

from clipft.api import RunConfig, make_registry, run

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS, EPOCHS = 8, 2   # 32 samples, batch 8, 2 epochs


def conf(**kw):
    base = dict(model="tiny-vit", data="shapes:n=32,val_n=8", epochs=EPOCHS, batch_size=8, lr=1e-3,
                strategies=["full"], log_every=1)
    return RunConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def registry():
    import clipft_csv
    import clipft_plots
    import clipft_tensorboard
    # entry_points=False: only these three callback plugins plus the built-ins
    # the run needs, as in-process plugins (whether or not they are installed)
    import clipft_data
    import clipft_full
    import clipft_losses
    return make_registry(plugins=[clipft_csv, clipft_plots, clipft_tensorboard, clipft_data,
                                  clipft_full, clipft_losses], entry_points=False)


@pytest.fixture(scope="module")
def done(registry, tmp_path_factory):
    out = tmp_path_factory.mktemp("cb") / "run"
    summary = run(conf(callbacks=["tensorboard", "csv"]), registry=registry, out=out)
    return out, summary


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_read_back_by_tensorboard(done):
    pytest.importorskip("tensorboard", reason="clipft-tensorboard depends on tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, summary = done
    files = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/samples_per_s", "eval/top1", "eval/recall@1",
            "eval/train_loss"} <= tags
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, STEPS + 1))
    rows = [r for r in metrics(out) if r["type"] == "step"]
    assert [pytest.approx(r["loss"]) for r in rows] == [e.value for e in loss]
    assert [e.step for e in acc.Scalars("eval/top1")] == list(range(EPOCHS + 1))
    assert [e.step for e in acc.Scalars("eval/train_loss")] == [1, 2]
    assert "config" in acc.Tags()["tensors"] or "config/text_summary" in acc.Tags()["tensors"]


def test_csv_rows_match_metrics_jsonl(done):
    out, _ = done
    with open(out / "steps.csv", newline="") as f:
        steps = list(csv.DictReader(f))
    with open(out / "evals.csv", newline="") as f:
        evals = list(csv.DictReader(f))
    jsteps = [r for r in metrics(out) if r["type"] == "step"]
    jevals = [r for r in metrics(out) if r["type"] == "eval"]
    assert [int(r["step"]) for r in steps] == [r["step"] for r in jsteps] == list(range(1, STEPS + 1))
    assert [float(r["loss"]) for r in steps] == [pytest.approx(r["loss"]) for r in jsteps]
    assert [int(r["epoch"]) for r in evals] == [0, 1, 2]
    for row, j in zip(evals, jevals):
        assert float(row["top1"]) == pytest.approx(j["top1"])
    assert evals[0]["train_loss"] == "" and float(evals[1]["train_loss"]) == pytest.approx(jevals[1]["train_loss"])


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_curves_png_is_on_by_default_with_the_expected_size(done):
    from clipft_plots import DPI, figure_size, panel_groups

    out, summary = done
    evals = [k for k in summary["eval"]["after"]]
    panels = 2 + len(panel_groups(evals))
    assert panels == 2 + 3            # top1, recall@1 (i2t, t2i, mean), recall@5
    w, h = figure_size(panels)
    assert png_size(out / "curves.png") == (int(w * DPI), int(h * DPI)) == (1200, 600)


def test_callback_none_turns_plots_off(registry, tmp_path):
    run(conf(epochs=1, callbacks=["none"]), registry=registry, out=tmp_path / "r")
    assert not (tmp_path / "r" / "curves.png").exists()
    assert not (tmp_path / "r" / "steps.csv").exists()


def test_csv_after_resume_has_no_duplicate_rows(registry, tmp_path, monkeypatch):
    from clipft.engine.loop import Trainer

    real, calls = Trainer.optimizer_step, []

    def die_at_7(self):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(self)

    c = conf(callbacks=["csv"], checkpoint_every="2")
    monkeypatch.setattr(Trainer, "optimizer_step", die_at_7)
    with pytest.raises(KeyboardInterrupt):
        run(c, registry=registry, out=tmp_path / "r")
    monkeypatch.undo()
    run(resume=tmp_path / "r", registry=registry)
    with open(tmp_path / "r" / "steps.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, STEPS + 1))
    with open(tmp_path / "r" / "evals.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1, 2]
