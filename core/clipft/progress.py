"""Human output: rich progress bars and tables, always on stderr."""
from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from clipft.callbacks import Callback


def stderr_console() -> Console:
    # created per call so that redirected stderr (tests, pipes) is honoured
    return Console(file=sys.stderr, highlight=False)


class Silent(Callback):
    """Reporter that prints nothing (the Python API's default). Reporters are
    callbacks (:mod:`clipft.callbacks`) that the session always installs."""

    def warn(self, message: str) -> None: ...


def _fmt(v):
    return f"{v:.4f}" if isinstance(v, float) else str(v)


class RichReporter(Silent):
    def __init__(self, console: Console | None = None):
        self.console = console or stderr_console()
        self._progress: Progress | None = None

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/yellow] {message}", soft_wrap=True)

    def on_run_start(self, run):
        strategies = "+".join(run.strategies) or "none (head only)"
        self.console.print(
            f"[bold]clipft[/bold] {run.model} ({run.pretrained}) on {run.device} · "
            f"strategy {strategies} · loss {run.loss} · head {run.head or '-'}")
        self.console.print(
            f"data {run.data}: {run.train_size} train / {run.val_size} val"
            + (f", {len(run.classnames)} classes" if run.classnames else "")
            + f" · trainable {run.params_trainable:,} of {run.params_total:,} params "
            f"({100 * run.params_trainable / max(1, run.params_total):.2f}%) · "
            f"lr {run.lr:g} · out {run.out_dir}")
        for w in run.warnings:
            self.warn(w)
        if run.skipped:
            self.console.print(f"[yellow]skipped {len(run.skipped)} unreadable image(s)[/yellow], "
                               f"e.g. {run.skipped[0]}")

    def on_epoch_start(self, epoch, epochs, n_batches):
        self._progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[sps]} samples/s"), TimeElapsedColumn(),
            console=self.console, transient=False)
        self._progress.start()
        self._task = self._progress.add_task("train", total=n_batches, loss="-", lr="-", sps="-")

    def on_step_end(self, s):
        self._progress.update(self._task, advance=1, loss=f"{s.loss:.4f}", lr=f"{s.lr:.2e}",
                              sps=f"{s.samples_per_s:.0f}")
        if s.batch == s.n_batches:
            self._progress.stop()

    def on_eval(self, ev):
        epoch, metrics, train_loss = ev.epoch, ev.metrics, ev.train_loss
        if train_loss is None:  # the evaluation before training
            return
        if self._progress is not None:
            self._progress.stop()
        shown = " · ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if "@" not in k or k.startswith("recall"))
        self.console.print(f"  epoch {epoch}: train loss {train_loss:.4f} · {shown}")

    def on_run_end(self, summary):
        before, after = summary["eval"]["before"], summary["eval"]["after"]
        t = Table(title="evaluation (val split)")
        t.add_column("metric")
        t.add_column("before", justify="right")
        t.add_column("after", justify="right")
        t.add_column("change", justify="right")
        for k in after:
            b, a = before.get(k), after[k]
            t.add_row(k, _fmt(b) if b is not None else "-", _fmt(a),
                      f"{a - b:+.4f}" if b is not None else "-")
        self.console.print(t)
        tr = summary["train"]
        extra = ""
        if "cache" in summary:
            c = summary["cache"]
            extra = f" · cache hits {c.get('hits', 0)} (built in {c.get('build_seconds', 0):.2f}s)"
        self.console.print(
            f"trained {tr['steps']} steps in {tr['seconds']:.1f}s · {tr['samples_per_s']:.1f} samples/s · "
            f"peak RSS {tr['peak_rss_mb']:.0f} MB{extra} · run dir {summary['run_dir']}")
