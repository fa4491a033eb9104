"""Early stopping (``--early-stop``), built only on the public callback
contract: it watches ``on_eval``, keeps its count in ``state_dict`` (so a
resumed run stops where the uninterrupted one would), ends the run with
``RunView.request_stop`` and reports in ``summary_section``. The engine knows
nothing of its logic; it only adds it to the run's callbacks."""
from __future__ import annotations

import math
from typing import Mapping, Optional

from clipft.callbacks import Callback, EvalView, RunView
from clipft.config import metric_mode, parse_early_stop
from clipft.errors import ClipftUsageError

#: the metric a run is judged by, first present wins: the head's accuracy,
#: zero-shot accuracy, caption retrieval
HEADLINE_METRICS = ("head_top1", "top1", "recall@1")


def headline_metric(metrics: Mapping) -> Optional[str]:
    return next((m for m in HEADLINE_METRICS if m in metrics), None)


def improved(value: float, best: Optional[float], mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta`` (None: nothing yet)."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


def metric_value(metrics: Mapping, metric: str, flag: str) -> float:
    """The value of ``metric`` in an evaluation, or a usage error listing the ones there are."""
    if metric not in metrics:
        have = ", ".join(sorted(metrics)) or "none (the run has no validation data)"
        raise ClipftUsageError(f"{flag}: the evaluation has no metric '{metric}'; it has: {have}")
    return float(metrics[metric])


class EarlyStopping(Callback):
    """Stops the run when the metric has not improved by more than
    ``min_delta`` for ``patience`` evaluations in a row (the evaluation before
    training counts as the first reference)."""

    def __init__(self, spec: str):
        opts = parse_early_stop(spec)
        self.patience, self.min_delta = opts["patience"], opts["min_delta"]
        self.metric, self.mode = opts["metric"], opts["mode"]
        self.best: Optional[float] = None
        self.best_step = self.best_epoch = 0
        self.bad = 0
        self.stopped = False
        self.run: Optional[RunView] = None

    def on_run_start(self, run: RunView) -> None:
        self.run = run

    def on_eval(self, ev: EvalView) -> None:
        if self.metric is None:
            self.metric = headline_metric(ev.metrics)
            if self.metric is None:
                raise ClipftUsageError("--early-stop: the evaluation has no headline metric "
                                       f"({', '.join(HEADLINE_METRICS)}); give one with :metric=NAME")
        if self.mode is None:
            self.mode = metric_mode(self.metric)
        value = metric_value(ev.metrics, self.metric, "--early-stop")
        if improved(value, self.best, self.mode, self.min_delta):
            self.best, self.best_step, self.best_epoch, self.bad = value, ev.step, ev.epoch, 0
            return
        self.bad += 1
        if self.bad >= self.patience and not self.stopped:
            self.stopped = True
            self.run.request_stop(
                f"{self.metric} did not improve by more than {self.min_delta} for {self.bad} evaluations",
                metric=self.metric, best=self.best, best_step=self.best_step, best_epoch=self.best_epoch)

    def state_dict(self) -> dict:
        return {"metric": self.metric, "mode": self.mode, "best": self.best, "best_step": self.best_step,
                "best_epoch": self.best_epoch, "bad": self.bad, "stopped": self.stopped}

    def load_state_dict(self, state: Mapping) -> None:
        for key in ("metric", "mode", "best", "best_step", "best_epoch", "bad", "stopped"):
            if key in state:
                setattr(self, key, state[key])

    def summary_section(self) -> dict:
        return {"metric": self.metric, "mode": self.mode, "patience": self.patience,
                "min_delta": self.min_delta, "best": self.best, "best_step": self.best_step,
                "best_epoch": self.best_epoch, "evaluations_without_improvement": self.bad,
                # also true when patience ran out at the run's last evaluation (no early stop then)
                "patience_exhausted": self.stopped}
