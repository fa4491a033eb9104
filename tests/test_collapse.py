"""Collapse detection (clipft.collapse): a run whose loss does not fall, or
that predicts one class, is flagged on stderr and in summary.json; a healthy
run and a run too short to judge are not; the sweep table names the seed."""
from __future__ import annotations

import io
import json
import math

import pytest

from clipft import collapse
from clipft.api import RunConfig, run
from clipft.callbacks import EvalView, RunView, StepView
from clipft.collapse import CollapseWatch, constant_prediction

pytestmark = pytest.mark.usefixtures("one_thread")

# just enough optimizer steps to be judged; projections train on cached tower features (fast)
RUN = dict(model="tiny-vit", data=f"shapes:n={8 * collapse.MIN_STEPS},val_n=48,size=32", batch_size=8, strategies=["projections"],
           loss="contrastive", epochs=1, callbacks=["none"])


def _feed(watch, losses, total, stepped=True):
    watch.on_run_start(RunView(out_dir=".", config={}, total_steps=total, classnames=("a", "b", "c")))
    for i, loss in enumerate(losses, 1):
        watch.on_step_end(StepView(epoch=1, batch=i, n_batches=total, step=i, stepped=stepped,
                                   loss=loss, terms={}))
    return watch.summary_section()


def test_a_flat_loss_is_flagged_once_and_a_falling_one_is_not():
    warned = []
    total = collapse.MIN_STEPS * 2
    flat = _feed(CollapseWatch(warn=warned.append), [4.0 + 0.01 * (i % 3) for i in range(total)], total)
    assert flat["detected"] and [s["kind"] for s in flat["signals"]] == ["loss_flat"]
    assert flat["signals"][0]["step"] == flat["check_at_step"] == math.ceil(collapse.CHECK_SHARE * total)
    assert len(warned) == 1 and "collapsed" in warned[0]
    falling = _feed(CollapseWatch(), [4.0 * (1 - 0.5 * i / total) for i in range(total)], total)
    assert falling["judged"] and not falling["detected"]
    # a rising loss has not fallen either
    assert _feed(CollapseWatch(), [1.0 + i / total for i in range(total)], total)["detected"]


def test_a_flat_loss_is_not_flagged_while_val_top1_rises():
    """A strongly regularised run (KgCoOp at lambda=8 measured so) can learn while
    its noisy loss stays put: a val top-1 above its value before training clears it."""
    total = collapse.MIN_STEPS * 2
    flat = [0.7 + 0.01 * (i % 3) for i in range(total)]

    def judged(before, after):
        watch = CollapseWatch()
        watch.on_run_start(RunView(out_dir=".", config={}, total_steps=total, classnames=("a", "b")))
        watch.on_eval(EvalView(0, {"top1": before, "head_top1": before}, step=0))
        for i, loss in enumerate(flat, 1):
            if i == total // 2:
                watch.on_eval(EvalView(1, {"top1": after, "head_top1": before}, train_loss=0.7, step=i))
            watch.on_step_end(StepView(epoch=1, batch=i, n_batches=total, step=i, stepped=True, loss=loss, terms={}))
        return watch.summary_section()["detected"]

    assert not judged(0.776, 0.776 + collapse.MIN_GAIN)
    assert judged(0.776, 0.776 + collapse.MIN_GAIN / 2)
    assert judged(0.5, 0.4)


def test_a_short_run_is_not_judged():
    short = collapse.MIN_STEPS - 1
    s = _feed(CollapseWatch(), [4.0] * short, short)
    assert not s["judged"] and not s["detected"] and s["check_at_step"] is None


def test_constant_prediction_needs_spread_labels():
    assert constant_prediction([48, 1, 1], [17, 17, 16]) == (0, 0.96)
    assert constant_prediction([40, 5, 5], [17, 17, 16]) is None          # 80%: not constant
    assert constant_prediction([48, 1, 1], [48, 1, 1]) is None            # the labels are that imbalanced
    assert constant_prediction([10, 0], [5, 5]) is None                   # too few val samples
    assert constant_prediction([50, 0], [50, 0]) is None                  # one class in the labels


def test_a_constant_prediction_is_flagged_per_classifier_from_the_check_on():
    preds = {"": {"predicted": [0, 50, 0], "labels": [17, 17, 16]},
             "head_": {"predicted": [20, 15, 15], "labels": [17, 17, 16]}}
    watch = CollapseWatch(predictions=lambda: preds)
    total = collapse.MIN_STEPS * 2
    _feed(watch, [4.0 * (1 - 0.5 * i / total) for i in range(total)], total)
    watch.on_eval(EvalView(epoch=0, metrics={}, step=0))           # before training: not judged
    watch.on_eval(EvalView(epoch=1, metrics={}, step=total))
    watch.on_eval(EvalView(epoch=2, metrics={}, step=total))       # the same finding is kept once
    sigs = watch.summary_section()["signals"]
    assert [(s["kind"], s["metric"], s["predicted_class"]) for s in sigs] == [("constant_prediction", "top1", "b")]
    # a resumed run continues with what was found
    again = CollapseWatch()
    again.load_state_dict(json.loads(json.dumps(watch.state_dict())))
    assert again.signals == sigs and again.judged


def test_a_run_at_a_huge_lr_is_flagged_and_a_healthy_one_is_not(tmp_path, registry):
    from clipft.progress import RichReporter
    from rich.console import Console
    err = io.StringIO()
    bad = run(RunConfig(**RUN, lr=5.0), registry=registry, out=tmp_path / "bad",
              progress=RichReporter(Console(file=err, width=200)))
    sec = bad["callbacks"]["collapse"]
    assert sec["judged"] and sec["detected"] and sec["signals"][0]["kind"] == "loss_flat"
    assert err.getvalue().count("may have collapsed") == 1
    good = run(RunConfig(**RUN, lr=1e-2), registry=registry, out=tmp_path / "good")
    assert good["callbacks"]["collapse"]["judged"] and not good["callbacks"]["collapse"]["detected"]
    assert good["train"]["final_loss"] < 0.8 * sec["signals"][0]["start_loss"]


def test_the_sweep_table_and_json_flag_a_collapsed_seed(tmp_path):
    from clipft.commands.sweep import _member_entry, _ok_row, render_sweep
    from clipft.options import parse_ref
    from rich.console import Console

    def summary(signals):
        return {"eval": {"before": {"top1": 0.1}, "after": {"top1": 0.1 if signals else 0.5}},
                "params": {"trainable": 10, "trainable_fraction": 0.1},
                "train": {"seconds": 1.0, "peak_rss_mb": 1.0},
                "callbacks": {"collapse": {"detected": bool(signals), "signals": signals}}}
    flat = [{"kind": "loss_flat", "reason": "the loss has not fallen", "step": 33, "epoch": 2}]
    rows = [_ok_row({"seed": s, "run_dir": str(tmp_path / f"seed{s}")}, summary(sig), tmp_path)
            for s, sig in ((0, []), (1, flat))]
    entry = _member_entry([parse_ref("full")], "full", rows)
    assert entry["collapsed"] == [1] and rows[0]["collapse"] is None and rows[1]["collapse"] == flat
    doc = {"seeds": [0, 1], "model": "tiny-vit", "data": {"name": "shapes"}, "epochs": 3,
           "control_data": None, "members": [entry]}
    out = io.StringIO()
    render_sweep(doc, Console(file=out, width=250))
    text = out.getvalue()
    assert "collapsed: seed 1" in text and "full seed 1: the loss has not fallen" in text
