"""Callback ``plots`` (on by default while installed): at the end of a run,
``RUN/curves.png``, a grid of panels: train loss against optimizer steps (each
step's loss, and each epoch's mean loss at the epoch's last step), the
learning rate against steps, then one panel per eval metric against epochs
(epoch 0 is the evaluation before training; ``recall@k`` metrics of one k share
a panel). The figure is 4 inches per panel column at 100 dpi, three columns.
``--callback none`` turns it off.
"""
from __future__ import annotations

import math

import attrs

from clipft import Callback, CallbackSpec, hookimpl, run_file_option

COLUMNS = 3
PANEL_INCHES = (4.0, 3.0)
DPI = 100


@attrs.frozen
class PlotsOptions:
    file: str = attrs.field(default="curves.png", validator=run_file_option,
                            metadata={"help": "file name in the run directory"})


def panel_groups(metrics: list) -> list:
    """Eval metrics grouped into panels: ``i2t_recall@5``, ``t2i_recall@5`` and
    ``recall@5`` share one; every other metric gets its own. Counts of
    retrieval queries (``i2t_queries``) are the same every epoch: they get none."""
    groups: dict = {}
    for m in metrics:
        if m.endswith("_queries"):
            continue
        key = m.split("_", 1)[1] if m.startswith(("i2t_", "t2i_")) else m
        groups.setdefault(key, []).append(m)
    return list(groups.items())


def figure_size(n_panels: int) -> tuple:
    rows = math.ceil(n_panels / COLUMNS)
    return COLUMNS * PANEL_INCHES[0], rows * PANEL_INCHES[1]


class Plots(Callback):
    def __init__(self, opts: PlotsOptions):
        import matplotlib  # noqa: F401  (a missing dependency shows at build time)
        self.opts = opts
        self.steps, self.loss, self.lr = [], [], []
        #: epoch -> (its last optimizer step, its mean train loss)
        self.epoch_means: dict = {}
        self.evals: dict = {}
        self.file = None

    def on_run_start(self, run):
        import json
        self.file = run.path(self.opts.file)
        # a resumed run plots the whole run: earlier rows come from metrics.jsonl
        path = run.out_dir / "metrics.jsonl"
        if path.is_file():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                if row.get("type") == "step":
                    self._step(row["step"], row["loss"], row["lr"])
                elif row.get("type") == "eval":
                    self._eval(row["epoch"], {k: v for k, v in row.items()
                                              if k not in ("type", "epoch", "train_loss")})
                    if row.get("train_loss") is not None and self.steps:
                        self.epoch_means[row["epoch"]] = (self.steps[-1], row["train_loss"])

    def _step(self, step, loss, lr):
        self.steps.append(step)
        self.loss.append(loss)
        self.lr.append(lr)

    def _eval(self, epoch, metrics):
        for name, value in metrics.items():
            self.evals.setdefault(name, {})[epoch] = value

    def on_step_end(self, s):
        if s.stepped:
            self._step(s.step, s.loss, s.lr)

    def on_eval(self, ev):
        self._eval(ev.epoch, ev.metrics)

    def on_epoch_end(self, ev):
        self.epoch_means[ev.epoch] = (ev.step, ev.train_loss)

    def on_run_end(self, summary):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        groups = panel_groups(list(self.evals))
        n = 2 + len(groups)
        rows = math.ceil(n / COLUMNS)
        fig, axes = plt.subplots(rows, COLUMNS, figsize=figure_size(n), dpi=DPI, squeeze=False)
        flat = list(axes.flat)
        for ax, (title, ys, xlabel) in zip(flat, (("train loss", self.loss, "step"),
                                                   ("learning rate", self.lr, "step"))):
            ax.plot(self.steps, ys)
            ax.set_title(title)
            ax.set_xlabel(xlabel)
        if self.epoch_means:
            points = sorted(self.epoch_means.values())
            flat[0].plot([s for s, _ in points], [v for _, v in points], marker="o", label="epoch mean")
            flat[0].legend(fontsize="small")
        for ax, (title, names) in zip(flat[2:], groups):
            for name in names:
                points = sorted(self.evals[name].items())
                ax.plot([e for e, _ in points], [v for _, v in points], marker="o", label=name)
            ax.set_title(title)
            ax.set_xlabel("epoch")
            if len(names) > 1:
                ax.legend(fontsize="small")
        for ax in flat[n:]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(self.file, dpi=DPI)
        plt.close(fig)


@hookimpl
def clipft_register_callbacks(register):
    register(CallbackSpec(name="plots", summary="curves.png: loss and lr against steps, eval metrics against epochs",
                          options=PlotsOptions, build=Plots, default=True))
