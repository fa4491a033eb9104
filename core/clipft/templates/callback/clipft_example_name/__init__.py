"""clipft callback `example-name`: logs every optimizer step (step, loss, learning rate)
and writes them, with the final evaluation, to ``RUN_DIR/example-name.json`` at the end.

A callback observes the run through read-only views (clipft.callbacks): it
cannot change training. Select it with ``--callback example-name`` (or
``[[callback]]`` in TOML); ``CallbackSpec(default=True)`` would turn it on in
every run instead.
"""
import json

import attrs

from clipft import Callback, CallbackSpec, hookimpl

NAME = "example-name"


def _positive(instance, attribute, value):
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, got {value}")


@attrs.frozen
class ExampleNameOptions:
    every: int = attrs.field(default=1, validator=_positive, metadata={
        "help": "log every N-th optimizer step"})


class ExampleName(Callback):
    def __init__(self, opts: ExampleNameOptions):
        self.every = opts.every
        self.out_dir = None
        self.rows = []

    def on_run_start(self, run):
        self.out_dir = run.out_dir

    def on_step_end(self, step):
        if step.stepped and step.step % self.every == 0:
            self.rows.append({"step": step.step, "epoch": step.epoch, "loss": step.loss, "lr": step.lr})

    def on_run_end(self, summary):
        doc = {"steps": self.rows, "eval_after": dict(summary["eval"]["after"])}
        (self.out_dir / f"{NAME}.json").write_text(json.dumps(doc, indent=2))


@hookimpl
def clipft_register_callbacks(register):
    register(CallbackSpec(
        name=NAME,
        summary="Log every optimizer step's loss and lr to RUN_DIR/example-name.json.",
        options=ExampleNameOptions,
        build=ExampleName,
    ))
