"""Early stopping, the best checkpoint and evaluations on a step schedule, and
the callback contract they are built on: request_stop, summary sections and
callback state across --resume."""
from __future__ import annotations

import json

import attrs
import pytest
import torch
from safetensors.torch import load_file

import clipft
from clipft.api import RunConfig, run
from conftest import read_summary

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = "shapes:n=32,val_n=8"
BASE = dict(model="tiny-vit", data=DATA, batch_size=16, strategies=["full"], lr=1e-3, callbacks=["none"])


@attrs.frozen
class StopperOptions:
    at_step: int = attrs.field(default=3, metadata={"help": "the optimizer step after which to stop"})
    note: str = attrs.field(default="", metadata={"help": "a label"})


class Stopper(clipft.Callback):
    """A third party's callback: ends the run at a step, counts the steps it
    saw (a state that must survive --resume) and reports in the summary."""

    def __init__(self, opts):
        self.at, self.seen, self.view = opts.at_step, 0, None

    def on_run_start(self, run):
        self.view = run

    def on_step_end(self, step):
        if step.stepped:
            self.seen += 1
            if step.step == self.at:
                self.view.request_stop(f"reached step {step.step}", where=step.step)

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]

    def summary_section(self):
        return {"seen": self.seen}


class Plugin:
    @clipft.hookimpl
    def clipft_register_callbacks(self, register):
        register(clipft.CallbackSpec(name="stopper", summary="test: stops", options=StopperOptions,
                                     build=Stopper))


PLUGINS = [Plugin()]


@pytest.fixture
def scores(monkeypatch):
    """Adds a metric ``score`` to every evaluation: ``SCORES[i]`` for the
    run's i-th evaluation (counted from its history, so a resumed run goes on
    with the same sequence), which makes plateaus certain on any CPU."""
    import clipft.engine.session as session
    from clipft.engine.evaluate import Evaluator
    seq: list = []
    real = session.train
    names = Evaluator.metric_names
    monkeypatch.setattr(Evaluator, "metric_names", lambda self: [*names(self), "score"])

    def train(t, epochs, state, evaluate, *a, **k):
        def scored():
            return {**evaluate(), "score": seq[len(state.history)]}
        return real(t, epochs, state, scored, *a, **k)
    monkeypatch.setattr(session, "train", train)
    return seq


def test_a_plateau_stops_the_run_normally(scores, tmp_path, registry):
    # evaluations: before training, then epochs 1..6; the best is epoch 1, patience 2
    scores[:] = [0.1, 0.5, 0.4, 0.45, 0.9, 0.9, 0.9]
    s = run(RunConfig(**BASE, epochs=6, early_stop="2:metric=score,min_delta=0.01"), registry=registry,
            out=tmp_path / "r")
    stop = s["stopped_early"]
    assert (stop["epoch"], stop["step"], stop["best"], stop["best_epoch"]) == (3, 6, 0.5, 1)
    assert "score did not improve" in stop["reason"]
    assert s["train"]["steps"] == 6 and len(s["eval"]["history"]) == 4
    assert s["callbacks"]["early_stop"]["evaluations_without_improvement"] == 2
    assert s["eval"]["after_weights"] == {"weights": "final", "step": 6, "epoch": 3}
    assert read_summary(tmp_path / "r") == json.loads(json.dumps(s))
    from clipft.commands.runs import run_row
    assert run_row(tmp_path / "r")["status"] == "complete"


def test_a_certain_plateau_exits_0_from_the_command_line(invoke, tmp_path):
    # no metric can improve by more than 10: the first evaluation after training stops the run
    r = invoke("run", "--model", "tiny-vit", "--data", DATA, "--epochs", "3", "--batch-size", "16",
               "--strategy", "full", "--callback", "none", "--early-stop", "1:min_delta=10", "--out", tmp_path / "r")
    assert r.exit_code == 0, r.output
    s = read_summary(tmp_path / "r")
    assert s["stopped_early"]["epoch"] == 1 and s["stopped_early"]["metric"] == "top1"
    assert "stopped early after step 2" in r.stdout


def test_early_stop_values_are_checked(invoke, tmp_path):
    for bad in ("0", "x", "2:mode=up", "2:min_delta=-1", "2:colour=red"):
        r = invoke("run", "--model", "tiny-vit", "--data", DATA, "--early-stop", bad, "--out", tmp_path / bad)
        assert r.exit_code == 2 and "early_stop" in r.stderr, (bad, r.output)
    r = invoke("run", "--model", "tiny-vit", "--data", DATA, "--eval-every", "0", "--out", tmp_path / "e")
    assert r.exit_code == 2 and "eval_every" in r.stderr
    # a metric the evaluation does not report: refused before the run directory is made
    for flag, value in (("--keep-best", "head_top1"), ("--early-stop", "2:metric=top5")):
        r = invoke("run", "--model", "tiny-vit", "--data", DATA, "--strategy", "full", flag, value,
                   "--out", tmp_path / "m")
        assert r.exit_code == 2 and "it reports: top1, " in r.stderr, r.output
        assert not (tmp_path / "m").exists()


def test_keep_best_keeps_the_best_checkpoint_and_export_best_differs(scores, tmp_path, invoke, registry):
    scores[:] = [0.1, 0.2, 0.9, 0.3, 0.4]
    out = tmp_path / "r"
    s = run(RunConfig(**BASE, epochs=4, keep_best="score"), registry=registry, out=out)
    assert (s["best"]["value"], s["best"]["epoch"], s["best"]["step"]) == (0.9, 2, 4)
    best_state = json.loads((out / "checkpoint-best" / "state.json").read_text())
    assert best_state["epoch"] == 2 and set(best_state["sha256"]) == set(best_state["files"])
    # resume and the commands' default continue from / read the final weights, not the best
    from clipft.engine.checkpoint import newest_complete
    assert newest_complete(out)[0].name == "checkpoint"
    best_w = load_file(str(out / "checkpoint-best" / "model.safetensors"))
    final_w = load_file(str(out / "checkpoint" / "model.safetensors"))
    assert any(not torch.equal(best_w[k], final_w[k]) for k in best_w)
    for args, folder in (((), "final"), (("--best",), "best")):
        r = invoke("export", out, tmp_path / f"x-{folder}", "--json", *args)
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["source_checkpoint"]["name"] == folder
    a = load_file(str(tmp_path / "x-final" / "open_clip_model.safetensors"))
    b = load_file(str(tmp_path / "x-best" / "open_clip_model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # a run without --keep-best: --best is a usage error naming the flag
    plain = tmp_path / "plain"
    run(RunConfig(**BASE, epochs=1), registry=registry, out=plain)
    r = invoke("export", plain, tmp_path / "x", "--best")
    assert r.exit_code == 2 and "--keep-best" in r.stderr
    r = invoke("eval", plain, "--data", DATA, "--best")
    assert r.exit_code == 2 and "--keep-best" in r.stderr
    r = invoke("eval", out, "--data", DATA, "--best", "--json")
    assert r.exit_code == 0, r.output


def test_a_callback_ends_the_run_normally_with_its_section(tmp_path, registry):
    s = run(RunConfig(**{**BASE, "callbacks": ["none", "stopper:at_step=3"]}, epochs=3),
            registry=registry, out=tmp_path / "r")
    assert s["train"]["steps"] == 3
    assert s["stopped_early"] == {"reason": "reached step 3", "step": 3, "epoch": 2, "batch": 1, "where": 3}
    # the final weights were evaluated (the stop came between evaluations)
    assert s["eval"]["history"][-1]["step"] == 3 and s["eval"]["after_weights"]["step"] == 3
    assert s["callbacks"]["stopper"] == {"seen": 3}
    state = json.loads((tmp_path / "r" / "checkpoint" / "state.json").read_text())
    assert state["global_step"] == 3 and state["callbacks"]["stopper"] == {"seen": 3}


def test_eval_every_adds_evaluations_within_epochs(tmp_path, registry):
    s = run(RunConfig(**BASE, epochs=2, eval_every="1"), registry=registry, out=tmp_path / "r")
    where = [(h["epoch"], h.get("step"), h.get("batch")) for h in s["eval"]["history"]]
    # 2 steps per epoch: one evaluation after step 1 of each epoch, one at each end
    assert where == [(0, None, None), (1, 1, 1), (1, None, None), (2, 3, 1), (2, None, None)]
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["type"] == "eval" for r in rows) == 5


def test_callback_state_survives_a_resume_exactly(scores, tmp_path, monkeypatch, registry):
    from clipft.engine.checkpoint import Checkpointer
    # best at epoch 1, then no improvement: the uninterrupted run stops after epoch 4 (patience 3)
    scores[:] = [0.1, 0.5, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]
    conf = RunConfig(**{**BASE, "callbacks": ["none", "stopper:at_step=100"]}, epochs=8,
                     early_stop="3:metric=score")
    whole = run(conf, registry=registry, out=tmp_path / "straight")
    assert whole["stopped_early"]["epoch"] == 4

    class Crash(Exception):
        pass
    real = Checkpointer.save

    def crash_at_epoch_3(self, loop, *a, **k):   # after two evaluations without improvement
        folder = real(self, loop, *a, **k)
        if loop["epoch"] == 3:
            raise Crash
        return folder
    monkeypatch.setattr(Checkpointer, "save", crash_at_epoch_3)
    with pytest.raises(Crash):
        run(conf, registry=registry, out=tmp_path / "crashed")
    monkeypatch.setattr(Checkpointer, "save", real)
    saved = json.loads((tmp_path / "crashed" / "checkpoint" / "state.json").read_text())
    assert saved["callbacks"]["early_stop"]["bad"] == 2
    resumed = run(resume=tmp_path / "crashed", registry=registry)
    assert resumed["stopped_early"] == whole["stopped_early"]
    assert resumed["train"]["steps"] == whole["train"]["steps"]
    assert resumed["callbacks"] == whole["callbacks"]   # the stopper counted every step once


def test_config_toml_keeps_callback_options_typed(tmp_path, registry):
    out = tmp_path / "r"
    run(RunConfig(**{**BASE, "callbacks": ["stopper:at_step=100,note=7,required=true"]}, epochs=1),
        registry=registry, out=out)
    text = (out / "config.toml").read_text()
    assert "at_step = 100\n" in text and 'note = "7"' in text and "required = true" in text
    from clipft.config import load_toml
    again = RunConfig.from_toml_dict(load_toml(out / "config.toml"))
    assert again.callbacks[0].options == {"at_step": 100, "note": "7", "required": True}



def test_a_resume_keeps_the_evaluations_of_the_schedule(tmp_path, monkeypatch, registry):
    """A checkpoint due at a step with an --eval-every evaluation is written
    after it: the run resumed from it neither skips nor repeats one."""
    import clipft.api as api
    from resume_check import crash_after_first_checkpoint_then_resume
    real = api.run
    monkeypatch.setattr(api, "run", lambda c=None, **k: real(c, registry=registry, **k))
    cfg = RunConfig(**BASE, epochs=2, eval_every="1", checkpoint_every="1")
    r = crash_after_first_checkpoint_then_resume(cfg, tmp_path, monkeypatch)
    saved = json.loads((r.crashed / "checkpoint" / "state.json").read_text())
    assert saved["global_step"] >= 1
    history = r.whole["eval"]["history"]
    assert [(h["epoch"], h.get("step")) for h in history] == [(0, None), (1, 1), (1, None), (2, 3), (2, None)]
    def untimed(h):
        return [{k: v for k, v in e.items() if k != "epoch_seconds"} for e in h]
    assert untimed(r.resumed["eval"]["history"]) == untimed(history)   # metrics, bit for bit


def test_a_run_that_stopped_early_is_not_resumed(tmp_path, registry):
    from clipft.errors import ClipftUsageError
    out = tmp_path / "r"
    run(RunConfig(**{**BASE, "callbacks": ["none", "stopper:at_step=2"]}, epochs=3), registry=registry, out=out)
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["loop"]["stopped_early"]["step"] == 2   # at an epoch end: the checkpoint was written again
    with pytest.raises(ClipftUsageError, match="stopped early after step 2"):
        run(resume=out, registry=registry)
