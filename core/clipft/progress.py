"""Human output on rich consoles: a command's result (tables, reports) on
stdout, progress bars, logs and warnings on stderr."""
from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from clipft.callbacks import Callback


#: columns of a result written to a pipe or file: wide enough that no table or
#: line is squeezed or wrapped (tables still take only the width they need)
PIPE_WIDTH = 4096


def stderr_console() -> Console:
    # created per call so that redirected stderr (tests, pipes) is honoured
    return Console(file=sys.stderr, highlight=False)


def stdout_console() -> Console:
    """The console for a command's result. Rich sizes a console from whichever
    of stdin/stdout/stderr is a terminal (else 80 columns), so ``clipft runs >
    list.txt`` would wrap names at the terminal's width: off a terminal the
    result gets :data:`PIPE_WIDTH` columns instead."""
    out = sys.stdout
    tty = out.isatty() if hasattr(out, "isatty") else False
    return Console(file=out, highlight=False, width=None if tty else PIPE_WIDTH)


class Silent(Callback):
    """Reporter that prints nothing (the Python API's default). Reporters are
    callbacks (:mod:`clipft.callbacks`) that the session always installs."""

    def warn(self, message: str) -> None: ...


def is_count(metric: str) -> bool:
    """A metric that counts (``i2t_queries``) rather than scores: shown, not compared."""
    return metric.endswith("_queries")


def _fmt(v):
    return f"{v:.4f}" if isinstance(v, float) else str(v)


class RichReporter(Silent):
    """Progress, logs and warnings on ``console`` (stderr); the run's closing
    before/after table and summary line on ``result`` (the command passes
    stdout, unless stdout is reserved for ``--json``; default: ``console``)."""

    def __init__(self, console: Console | None = None, result: Console | None = None):
        self.console = console or stderr_console()
        self.result = result or self.console
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
        if "random init" in run.lr_reason:   # not the strategy's own default: say why
            self.console.print(f"lr {run.lr:g}: {run.lr_reason}; --lr sets another")
        if run.accumulation:
            self.console.print(run.accumulation, markup=False)
        for w in run.warnings:
            self.warn(w)
        if run.skipped:
            self.console.print(f"[yellow]skipped {len(run.skipped)} unreadable image(s)[/yellow], "
                               f"e.g. {run.skipped[0]}")

    def on_epoch_start(self, epoch, epochs, n_batches):
        self._progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("mean loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[sps]} samples/s"), TimeElapsedColumn(),
            console=self.console, transient=False)
        self._progress.start()
        self._task = self._progress.add_task("train", total=n_batches, loss="-", lr="-", sps="-")

    def on_step_end(self, s):
        # the epoch's running mean: the step's own loss jumps with its batch
        shown = s.epoch_loss if s.epoch_loss is not None else s.loss
        self._progress.update(self._task, advance=1, loss=f"{shown:.4f}", lr=f"{s.lr:.2e}",
                              sps=f"{s.samples_per_s:.0f}")
        if s.batch == s.n_batches:
            self._progress.stop()

    def on_eval(self, ev):
        epoch, metrics, train_loss = ev.epoch, ev.metrics, ev.train_loss
        if train_loss is None:  # the evaluation before training
            return
        if self._progress is not None:
            self._progress.stop()
        shown = " · ".join(f"{k} {_fmt(v)}" for k, v in metrics.items()
                           if ("@" not in k or k.startswith("recall")) and not is_count(k))
        self.console.print(f"  epoch {epoch}: train loss {train_loss:.4f} · {shown}")

    def on_run_end(self, summary):
        data = summary.get("data") or {}
        late, shards = data.get("failed_at_load") or {}, data.get("unreadable_shards") or []
        if late or shards:
            first = (shards or late.get("examples") or [None])[0]
            self.warn(", ".join(
                ([f"{late['count']} sample(s) failed to decode"] if late else [])
                + ([f"{len(shards)} shard(s) could not be read"] if shards else []))
                + " while training and were skipped"
                + (f", e.g. {first['name']} ({first['reason']})" if first else "")
                + "; summary.json lists them")
        before, after = summary["eval"]["before"], summary["eval"]["after"]
        t = Table(title="evaluation (val split)")
        t.add_column("metric")
        t.add_column("before", justify="right")
        t.add_column("after", justify="right")
        t.add_column("change", justify="right")
        for k in after:
            b, a = before.get(k), after[k]
            t.add_row(k, _fmt(b) if b is not None else "-", _fmt(a),
                      f"{a - b:+.4f}" if b is not None and not is_count(k) else "-")
        self.result.print(t)
        tr = summary["train"]
        extra = ""
        if "cache" in summary:
            c = summary["cache"]
            extra = f" · cache hits {c.get('hits', 0)} (built in {c.get('build_seconds', 0):.2f}s)"
        self.result.print(
            f"trained {tr['steps']} steps in {tr['seconds']:.1f}s · {tr['samples_per_s']:.1f} samples/s · "
            f"peak RSS {tr['peak_rss_mb']:.0f} MB{extra} · run dir {summary['run_dir']}")
        self._print_stop_and_best(summary)

    def _print_stop_and_best(self, summary: dict) -> None:
        stopped, best = summary.get("stopped_early"), summary.get("best")
        if stopped:
            self.result.print(f"stopped early after step {stopped['step']} (epoch {stopped['epoch']}): "
                              f"{stopped['reason']}; 'after' is the final weights (checkpoint/)")
        if best:
            self.result.print(f"best {best['metric']} {_fmt(best['value'])} at step {best['step']} "
                              f"(epoch {best['epoch']}) kept in checkpoint-best/ (export, eval, predict --best)")
