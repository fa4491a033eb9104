"""Callback ``csv``: ``RUN/steps.csv`` (one row per optimizer step) and
``RUN/evals.csv`` (one row per evaluation, epoch 0 being the one before
training).

Columns are fixed by the first row of each file (a loss's extra terms, the eval
metrics of this data); a key that appears later is left out and one that is
missing is written empty. Rows are flushed as they are written, so a killed run
leaves valid files. A resumed run drops the rows past the checkpoint it resumed
from (they are written again), like ``metrics.jsonl``.
"""
from __future__ import annotations

import csv
import json

import attrs

from clipft import Callback, CallbackSpec, hookimpl, run_file_option


@attrs.frozen
class CsvOptions:
    steps: str = attrs.field(default="steps.csv", validator=run_file_option,
                             metadata={"help": "file name of the step rows, in the run directory"})
    evals: str = attrs.field(default="evals.csv", validator=run_file_option,
                             metadata={"help": "file name of the evaluation rows, in the run directory"})


class _Table:
    def __init__(self, path, key):
        self.path, self.key, self.columns, self.file, self.writer = path, key, None, None, None

    def open(self, keep_until=None):
        """Append to an existing file, keeping the rows whose key is <= ``keep_until``."""
        rows = []
        if keep_until is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = reader.fieldnames
                rows = [r for r in reader if float(r[self.key]) <= keep_until]
        self.file = open(self.path, "w", newline="")
        if self.columns:
            self.writer = csv.DictWriter(self.file, fieldnames=self.columns, extrasaction="ignore")
            self.writer.writeheader()
            self.writer.writerows(rows)
            self.file.flush()

    def write(self, row: dict):
        if self.writer is None:
            self.columns = list(row)
            self.writer = csv.DictWriter(self.file, fieldnames=self.columns, extrasaction="ignore")
            self.writer.writeheader()
        self.writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in self.columns})
        self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


class CsvLog(Callback):
    def __init__(self, opts: CsvOptions):
        self.opts = opts
        self.steps = self.evals = None

    def on_run_start(self, run):
        self.steps = _Table(run.path(self.opts.steps), "step")
        self.evals = _Table(run.path(self.opts.evals), "epoch")
        resumed = run.resumed_from_epoch > 0 or self.steps.path.is_file()
        # a resume continues from its checkpoint; the rows past it come again
        self.steps.open(self._resumed_step(run) if resumed else None)
        self.evals.open(run.resumed_from_epoch if resumed else None)

    @staticmethod
    def _resumed_step(run):
        try:
            state = json.loads((run.out_dir / "checkpoint" / "state.json").read_text())
            return state["global_step"]
        except (OSError, ValueError, KeyError):
            return 0

    def on_step_end(self, s):
        if s.stepped:
            self.steps.write({"epoch": s.epoch, "step": s.step, "loss": s.loss, "lr": s.lr,
                              "samples_per_s": s.samples_per_s, "grad_norm": s.grad_norm, **s.terms})

    def on_eval(self, ev):
        self.evals.write({"epoch": ev.epoch, "train_loss": ev.train_loss, **ev.metrics})

    def on_run_end(self, summary):
        self.steps.close()
        self.evals.close()


@hookimpl
def clipft_register_callbacks(register):
    register(CallbackSpec(name="csv", summary="steps.csv and evals.csv in the run directory",
                          options=CsvOptions, build=CsvLog))
