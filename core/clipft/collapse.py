"""Collapse detection: a built-in callback (the public callback contract, as
:mod:`clipft.early_stop`) that warns when a run has stopped learning, which
a mean over seeds hides (docs/usage.md#learning-rate-warmup-and-collapse has the
measurements behind the thresholds):

- ``loss_flat``: once ``CHECK_SHARE`` of the run's optimizer steps are done,
  the mean loss of the last ``WINDOW`` micro-batches has not fallen by
  ``MIN_DROP`` (relative) below the mean of the first ``FIRST`` ones, and no
  val top-1 has risen ``MIN_GAIN`` above its value before training (a strongly
  regularised run, KgCoOp at λ=8 say, can learn while its noisy loss stays put);
- ``constant_prediction``: an evaluation from then on puts at least
  ``CONSTANT_SHARE`` of the val predictions of a classifier in one class,
  while the val labels have at least two classes and no class holds more than
  ``LABEL_SHARE_MAX`` of them.

Runs shorter than ``MIN_STEPS`` optimizer steps are not judged. It never
changes training: the first finding is warned about once on stderr, and all
of them are in ``summary.json`` under ``callbacks.collapse``.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Optional

from clipft.callbacks import Callback, EvalView, RunView, StepView

#: runs of fewer optimizer steps are not judged: their loss has had no time to move
MIN_STEPS = 50
#: the share of the run's optimizer steps after which it is judged
CHECK_SHARE = 0.75
#: micro-batches averaged for the starting loss (under warmup, near the initial weights)
FIRST = 5
#: micro-batches averaged for the current loss
WINDOW = 10
#: the relative fall below the starting loss under which the loss counts as flat
MIN_DROP = 0.02
#: a rise of a val top-1 over its value before training that shows the run learns
MIN_GAIN = 0.01
#: a share of val predictions in one class that counts as a constant prediction ...
CONSTANT_SHARE = 0.95
#: ... unless the val labels themselves are this concentrated in one class
LABEL_SHARE_MAX = 0.5
#: fewer val samples say too little about the predictions
MIN_VAL = 20


def constant_prediction(predicted, labels) -> Optional[tuple]:
    """``(class index, share)`` when the predictions (counts per class) sit in
    one class while the labels (counts per class) are spread; else None."""
    n = sum(predicted)
    if n < MIN_VAL or sum(1 for c in labels if c) < 2 or max(labels) > LABEL_SHARE_MAX * sum(labels):
        return None
    top = max(range(len(predicted)), key=lambda i: predicted[i])
    share = predicted[top] / n
    return (top, share) if share >= CONSTANT_SHARE else None


class CollapseWatch(Callback):
    """``predictions()``: ``{metric prefix: {"predicted": counts, "labels":
    counts}}`` of the latest evaluation (the engine's evaluator keeps them);
    ``warn(message)``: the progress output's warning."""

    def __init__(self, predictions: Callable[[], Mapping] = dict, warn: Callable[[str], None] = lambda m: None):
        self.predictions, self.warn = predictions, warn
        self.first: list = []
        self.recent: list = []
        self.judged = False
        self.signals: list = []
        self.total = 0
        self.classnames: tuple = ()
        #: the val top-1 metrics before training and at the latest evaluation
        self.top1_start: dict = {}
        self.top1_latest: dict = {}

    @property
    def check_at(self) -> int:
        return max(1, math.ceil(CHECK_SHARE * self.total))

    @property
    def enough(self) -> bool:
        return self.total >= MIN_STEPS

    def on_run_start(self, run: RunView) -> None:
        self.total, self.classnames = run.total_steps, tuple(run.classnames)

    def _found(self, kind: str, reason: str, step: int, epoch: int, **details) -> None:
        if not self.signals:
            self.warn(f"the run may have collapsed: {reason} (step {step}); summary.json records it "
                      "under callbacks.collapse. A lower --lr or a longer --warmup-steps usually helps")
        self.signals.append({"kind": kind, "reason": reason, "step": step, "epoch": epoch, **details})

    def on_step_end(self, s: StepView) -> None:
        if not math.isfinite(s.loss):
            return
        if len(self.first) < FIRST:
            self.first.append(s.loss)
        self.recent = (self.recent + [s.loss])[-WINDOW:]
        if self.judged or not s.stepped or s.step < self.check_at or not self.enough:
            return
        self.judged = True
        start, now = sum(self.first) / len(self.first), sum(self.recent) / len(self.recent)
        if abs(start) < 1e-3:    # a loss at zero from the start cannot fall
            return
        drop = (start - now) / abs(start)
        gain = max((self.top1_latest[k] - v for k, v in self.top1_start.items() if k in self.top1_latest),
                   default=0.0)
        if drop < MIN_DROP and gain < MIN_GAIN:
            self._found("loss_flat", f"the loss has not fallen after {s.step} of {self.total} steps "
                        f"(first {len(self.first)} batches {start:.4f}, last {len(self.recent)} {now:.4f}: "
                        f"{100 * drop:+.1f}%, under {100 * MIN_DROP:.0f}%)", s.step, s.epoch,
                        start_loss=start, loss=now, drop=drop)

    def on_eval(self, ev: EvalView) -> None:
        top1 = {k: float(v) for k, v in ev.metrics.items()
                if k.endswith("top1") and isinstance(v, (int, float)) and math.isfinite(v)}
        if ev.epoch == 0 and not self.top1_start:
            self.top1_start = top1
        self.top1_latest = top1
        if not self.enough or ev.step < self.check_at:
            return
        seen = {(x["kind"], x.get("metric")) for x in self.signals}
        for prefix, counts in (self.predictions() or {}).items():
            metric = f"{prefix}top1"
            hit = constant_prediction(counts["predicted"], counts["labels"])
            if hit is None or ("constant_prediction", metric) in seen:
                continue
            cls, share = hit
            name = self.classnames[cls] if cls < len(self.classnames) else str(cls)
            self._found("constant_prediction", f"{100 * share:.0f}% of the val predictions behind {metric} "
                        f"are class '{name}'", ev.step, ev.epoch, metric=metric, share=share, predicted_class=name)

    def state_dict(self) -> dict:
        return {"first": self.first, "recent": self.recent, "judged": self.judged, "signals": self.signals,
                "top1_start": self.top1_start, "top1_latest": self.top1_latest}

    def load_state_dict(self, state: Mapping) -> None:
        for key in ("first", "recent", "judged", "signals", "top1_start", "top1_latest"):
            if key in state:
                setattr(self, key, state[key])

    def summary_section(self) -> dict:
        return {"detected": bool(self.signals), "judged": self.enough, "signals": self.signals,
                "min_steps": MIN_STEPS, "check_at_step": self.check_at if self.enough else None}
