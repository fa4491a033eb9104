"""Callback ``tensorboard``: event files under ``RUN/tensorboard/`` through
``torch.utils.tensorboard``.

Scalars: ``train/loss``, ``train/lr``, ``train/samples_per_s``, ``train/grad_norm``
(when clipping applied) and ``train/<term>`` for a loss's named terms, against
the optimizer step; ``eval/<metric>`` and ``eval/train_loss`` against the epoch
(0 is the evaluation before training). The resolved run config is logged as
text (``config``). Events are flushed at every checkpoint, so a killed run's
curves reach its last checkpoint. ``tensorboard --logdir RUN/tensorboard``.
"""
from __future__ import annotations

import attrs

from clipft import Callback, CallbackSpec, hookimpl, run_file_option
from clipft.options import at_least_one


@attrs.frozen
class TensorBoardOptions:
    every: int = attrs.field(default=1, validator=at_least_one, metadata={
        "help": "log the train scalars every N optimizer steps"})
    dir: str = attrs.field(default="tensorboard", validator=run_file_option,
                           metadata={"help": "folder in the run directory"})


class TensorBoard(Callback):
    def __init__(self, opts: TensorBoardOptions):
        # fail at build time (a clear message before training) when tensorboard is missing
        from torch.utils.tensorboard import SummaryWriter
        self._writer_class = SummaryWriter
        self.opts = opts
        self.writer = None

    def on_run_start(self, run):
        import json
        self.writer = self._writer_class(log_dir=str(run.path(self.opts.dir)))
        config = json.dumps(dict(run.config), indent=2, default=str)
        self.writer.add_text("config", "```\n" + config + "\n```", global_step=0)

    def on_step_end(self, s):
        if not s.stepped or s.step % self.opts.every:
            return
        w = self.writer
        w.add_scalar("train/loss", s.loss, s.step)
        w.add_scalar("train/lr", s.lr, s.step)
        w.add_scalar("train/samples_per_s", s.samples_per_s, s.step)
        if s.grad_norm is not None:
            w.add_scalar("train/grad_norm", s.grad_norm, s.step)
        for name, value in s.terms.items():
            w.add_scalar(f"train/{name}", value, s.step)

    def on_eval(self, ev):
        for name, value in ev.metrics.items():
            self.writer.add_scalar(f"eval/{name}", value, ev.epoch)
        if ev.train_loss is not None:
            self.writer.add_scalar("eval/train_loss", ev.train_loss, ev.epoch)

    def on_checkpoint(self, checkpoint):
        self.writer.flush()

    def on_run_end(self, summary):
        self.writer.close()


@hookimpl
def clipft_register_callbacks(register):
    register(CallbackSpec(name="tensorboard", summary="TensorBoard scalars and the run config under RUN/tensorboard/",
                          options=TensorBoardOptions, build=TensorBoard))
