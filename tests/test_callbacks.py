"""Callbacks, the fifth kind: events with read-only views, selection with
--callback / [[callback]] / defaults / none, and a failing callback contained."""
from __future__ import annotations

import json

import attrs
import pytest

import clipft
from clipft.api import RunConfig, run
from clipft.errors import ClipftError

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = "shapes:n=32,val_n=8"
EVENTS: list = []


@attrs.frozen
class RecorderOptions:
    tag: str = attrs.field(default="r", metadata={"help": "label in the event log"})


class Recorder(clipft.Callback):
    def __init__(self, opts):
        self.tag = opts.tag

    def on_run_start(self, run):
        EVENTS.append((self.tag, "run_start", run.model, run.strategies, run.epochs))

    def on_epoch_start(self, epoch, epochs, n_batches):
        EVENTS.append((self.tag, "epoch_start", epoch, n_batches))

    def on_step_end(self, step):
        EVENTS.append((self.tag, "step", step.step, step.stepped, round(step.lr, 12) >= 0, step.loss > 0))
        with pytest.raises(TypeError):
            step.terms["x"] = 1                       # read-only

    def on_eval(self, ev):
        EVENTS.append((self.tag, "eval", ev.epoch, sorted(ev.metrics)))

    def on_epoch_end(self, epoch):
        EVENTS.append((self.tag, "epoch_end", epoch.epoch))

    def on_checkpoint(self, checkpoint):
        EVENTS.append((self.tag, "checkpoint", checkpoint.epoch, checkpoint.path.name,
                       (checkpoint.path / "state.json").is_file()))

    def on_run_end(self, summary):
        EVENTS.append((self.tag, "run_end", summary["train"]["steps"]))

    def on_run_abort(self, error):
        EVENTS.append((self.tag, "run_abort", type(error).__name__))
        raise RuntimeError("reported, never hiding the run's own error")


class Boom(clipft.Callback):
    def __init__(self, opts):
        self.calls = 0

    def on_step_end(self, step):
        self.calls += 1
        EVENTS.append(("boom", self.calls))
        raise ValueError("boom")


class Plugin:
    @clipft.hookimpl
    def clipft_register_callbacks(self, register):
        register(clipft.CallbackSpec(name="recorder", summary="test", options=RecorderOptions, build=Recorder))
        register(clipft.CallbackSpec(name="boom", summary="test: raises", build=Boom))
        register(clipft.CallbackSpec(name="always", summary="test: on by default", default=True,
                                     build=lambda o: Recorder(RecorderOptions(tag="default"))))


#: in-process plugins the conftest ``registry`` fixture adds to the installed ones
PLUGINS = [Plugin()]


def go(registry, out, **kw):
    EVENTS.clear()
    conf = dict(model="tiny-vit", data=DATA, epochs=1, batch_size=16, strategies=["full"], lr=1e-3)
    return run(RunConfig(**{**conf, **kw}), registry=registry, out=out)


def test_events_in_order_with_views(registry, tmp_path):
    go(registry, tmp_path / "r", callbacks=["recorder:tag=mine"])
    mine = [e[1:] for e in EVENTS if e[0] == "mine"]
    assert mine == [
        ("run_start", "tiny-vit", ("full",), 1),
        ("eval", 0, ["i2t_queries", "i2t_recall@1", "i2t_recall@5", "recall@1", "recall@5", "t2i_queries",
                     "t2i_recall@1", "t2i_recall@5", "top1"]),
        ("epoch_start", 1, 2),
        ("step", 1, True, True, True), ("step", 2, True, True, True),
        ("eval", 1, mine[1][2]),
        ("epoch_end", 1),
        ("checkpoint", 1, "checkpoint", True),
        ("run_end", 2),
    ]
    # the default-on callback ran too, before the selected one (which so sees
    # what the defaults did: mlflow logs the curves.png that plots writes)
    assert [e[1] for e in EVENTS if e[0] == "default"][0] == "run_start"
    assert [e[:2] for e in EVENTS if e[1] in ("run_start", "run_end")] == [
        ("default", "run_start"), ("mine", "run_start"), ("default", "run_end"), ("mine", "run_end")]


def test_none_turns_the_defaults_off_and_toml_selects(registry, tmp_path):
    go(registry, tmp_path / "r", callbacks=["none"])
    assert EVENTS == []
    cfg = RunConfig.from_toml_dict({"model": "tiny-vit", "data": {"name": "shapes", "n": 32, "val_n": 8},
                                    "callback": [{"name": "none"}, {"name": "recorder", "tag": "t"}]})
    assert [c.name for c in cfg.callbacks] == ["none", "recorder"]
    go(registry, tmp_path / "t", callbacks=cfg.callbacks)
    assert {e[0] for e in EVENTS} == {"t"}
    assert "callback" in (tmp_path / "t" / "config.toml").read_text()


def test_a_raising_callback_is_reported_once_and_disabled(registry, tmp_path, capsys):
    from clipft.progress import RichReporter
    s = run(RunConfig(model="tiny-vit", data=DATA, epochs=1, batch_size=8, strategies=["full"], lr=1e-3,
                      callbacks=["none", "boom", "recorder:tag=after"]),
            registry=registry, out=tmp_path / "r", progress=RichReporter())
    assert [e for e in EVENTS if e[0] == "boom"] == [("boom", 1)]           # called once, then off
    assert sum(1 for e in EVENTS if e[0] == "after" and e[1] == "step") == 4  # the others go on
    assert s["train"]["steps"] == 4
    assert s["callbacks_failed"] == [{"name": "boom", "event": "on_step_end", "error": "ValueError: boom"}]
    err = capsys.readouterr().err
    assert err.count("callback 'boom' failed") == 1


def test_a_required_callback_stops_the_run(registry, tmp_path):
    with pytest.raises(ClipftError, match="callback 'boom' failed in on_step_end: ValueError: boom"):
        go(registry, tmp_path / "r", callbacks=["boom:required=true", "recorder:tag=mine"])
    # the others hear why the run ended, instead of on_run_end
    assert [e[1:] for e in EVENTS if e[0] == "mine" and e[1].startswith("run_")] == [
        ("run_start", "tiny-vit", ("full",), 1), ("run_abort", "ClipftError")]
    assert json.loads((tmp_path / "r" / ".clipft-run").read_text())["format"] == "clipft-run"


def test_callback_options_are_checked(registry, tmp_path, invoke):
    from clipft.errors import ClipftUsageError
    with pytest.raises(ClipftUsageError, match="required must be true or false"):
        go(registry, tmp_path / "a", callbacks=["recorder:required=maybe"])
    with pytest.raises(ClipftUsageError, match="tag"):
        go(registry, tmp_path / "b", callbacks=["recorder:colour=red"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    r = invoke("run", "--model", "tiny-vit", "--data", DATA, "--callback", "nope", "--out", tmp_path / "c")
    assert r.exit_code == 2 and "unknown callback 'nope'" in r.stderr


def test_an_interrupt_reaches_on_run_abort(registry, tmp_path, monkeypatch):
    from clipft.engine.loop import Trainer

    def interrupted(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(Trainer, "optimizer_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        go(registry, tmp_path / "r", callbacks=["none", "recorder:tag=mine"])
    assert [e[1:] for e in EVENTS if e[1] in ("run_end", "run_abort")] == [("run_abort", "KeyboardInterrupt")]
