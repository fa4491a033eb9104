"""Callbacks: observers of a training run (the fifth component kind).

A callback plugin registers a :class:`clipft.specs.CallbackSpec` whose
``build(options)`` returns a :class:`Callback`. The engine calls its ``on_*``
methods with read-only views of the run; none of them can change training.
The progress bars and the ``metrics.jsonl`` writer are callbacks too.

Events, in order:

- ``on_run_start(RunView)``: once, after the run directory is set up (also on
  ``--resume``, with ``resumed_from_epoch`` > 0);
- ``on_epoch_start(epoch, epochs, n_batches)``;
- ``on_step_end(StepView)``: after every micro-batch (``stepped`` says whether it
  ended an optimizer step);
- ``on_eval(EvalView)``: after each evaluation, epoch 0 being the one before training;
- ``on_epoch_end(EpochView)``;
- ``on_checkpoint(CheckpointView)``: after a checkpoint was written;
- ``on_run_end(summary)``: with the dict written to ``summary.json``;
- ``on_run_abort(error)``: instead of ``on_run_end``, when the run ends with an
  error or an interrupt after ``on_run_start`` was fired (``error``: the
  exception it ends with; a :class:`clipft.errors.Interrupted` or a
  ``KeyboardInterrupt`` for a signal). A failure here is reported, never
  raised: the run's own error is the one that counts.

A callback can also end the run, add to the summary and keep state across
``--resume``:

- ``RunView.request_stop(reason)`` ends the run *normally* after the current
  optimizer step or evaluation: a checkpoint is written, ``summary.json``
  records ``stopped_early`` and the run exits 0 (unlike a signal, which
  interrupts it);
- ``Callback.summary_section()`` returns a dict stored in ``summary.json``
  under the callback's name (None: nothing);
- ``Callback.state_dict()`` / ``load_state_dict(state)``: what the callback
  needs to continue exactly after ``--resume``, saved in each checkpoint's
  ``state.json`` (so it must be JSON-serialisable: numbers, strings, bools,
  None, lists and dicts with string keys).

A callback that raises is reported once, with its name, and disabled for the
rest of the run; training goes on, unless the user selected it with
``required=true`` (``--callback NAME:required=true``), which makes its failure
stop the run (exit 1).
"""
from __future__ import annotations

from pathlib import Path, PurePath
from types import MappingProxyType
from typing import Mapping, Optional

import attrs

from clipft.errors import ClipftUsageError

#: files the engine itself writes in a run directory (checkpoint folders,
#: ``checkpoint*``, and hidden names such as the marker, the lock and
#: temporaries are the engine's too): a callback may not write over them
RUN_OWN_FILES = frozenset({"config.toml", "summary.json", "metrics.jsonl", "data_split.json"})


def run_relative(name) -> PurePath:
    """``name`` as a path inside a run directory, or a usage error saying why
    it is not one: empty, absolute, leaving it through ``..``, or one of the
    run's own files. (Symlinks are checked by :meth:`RunView.path`, where the
    directory exists.)"""
    text = str(name)
    p = PurePath(text)
    if not text.strip() or not p.parts:
        raise ClipftUsageError("is empty; give a file name inside the run directory")
    if p.is_absolute() or p.drive or text.startswith("~"):
        raise ClipftUsageError(f"'{text}' is an absolute path; give a file name inside the run directory")
    if ".." in p.parts:
        raise ClipftUsageError(f"'{text}' leaves the run directory ('..'); give a name inside it")
    first = p.parts[0]
    if first in RUN_OWN_FILES or first.startswith(("checkpoint", ".")):
        raise ClipftUsageError(f"'{text}' is one of the run's own files; choose another name")
    return p


def run_file_option(inst, attribute, value) -> None:
    """An attrs validator for a plugin option naming a file or folder the plugin
    writes in the run directory: ``attrs.field(default="steps.csv",
    validator=clipft.run_file_option)``. A name outside the run is refused when
    the options are read, before the run writes anything (exit 2)."""
    try:
        run_relative(value)
    except ClipftUsageError as exc:
        raise ValueError(f"'{attribute.name}' {exc}") from None


def _frozen_map(value) -> Mapping:
    return MappingProxyType(dict(value or {}))


@attrs.frozen
class RunView:
    out_dir: Path
    #: the fully resolved config, as written to config.toml (a TOML-shaped dict)
    config: Mapping = attrs.field(converter=_frozen_map)
    model: str = ""
    pretrained: str = ""
    device: str = ""
    strategies: tuple = ()
    loss: str = ""
    head: Optional[str] = None
    data: str = ""
    train_size: int = 0
    val_size: int = 0
    classnames: tuple = ()
    params_total: int = 0
    params_trainable: int = 0
    lr: float = 0.0
    #: where ``lr`` came from: "given (--lr)", "default of strategy 'full'",
    #: "default for random init (--pretrained none); ..."
    lr_reason: str = ""
    epochs: int = 0
    #: optimizer steps the whole run will take
    total_steps: int = 0
    #: epochs completed when the run was resumed (0 for a fresh run); after a
    #: mid-epoch checkpoint the resumed run continues inside epoch
    #: ``resumed_from_epoch + 1``, and ``resumed_from_step`` says where
    resumed_from_epoch: int = 0
    #: optimizer steps done when the run was resumed (0 for a fresh run)
    resumed_from_step: int = 0
    warnings: tuple = ()
    skipped: tuple = ()
    #: how ``--grad-accum`` combines micro-batches (large-batch or plain) and the
    #: negatives each sample meets; "" without accumulation
    accumulation: str = ""
    #: the top-level names :meth:`path` handed out: the run records them as its
    #: own (``--overwrite`` may replace them; a file the user adds it keeps)
    created: set = attrs.field(factory=set, eq=False, repr=False)
    #: the stop requested by a callback: ``{"reason": ..., **details}``, or None
    _stop: list = attrs.field(factory=list, eq=False, repr=False, alias="_stop")

    def request_stop(self, reason: str, **details) -> None:
        """End the run normally after the current optimizer step or evaluation
        (exit 0, a final checkpoint, ``summary.json`` with ``stopped_early``:
        ``reason``, the step and epoch, and ``details``, which must be
        JSON-serialisable). The first request wins; later ones are ignored."""
        if not self._stop:
            self._stop.append({"reason": str(reason), **details})

    @property
    def stop_requested(self) -> Optional[Mapping]:
        """The pending stop request (``reason`` and details), or None."""
        return MappingProxyType(self._stop[0]) if self._stop else None

    def path(self, name) -> Path:
        """Where a callback or plugin writes ``name`` (a file or folder name,
        maybe with sub-folders) in the run directory: the one way to get a
        writable path in the run. Refuses, with a usage error, a name that is
        absolute, climbs out with ``..``, is one of the run's own files, or
        reaches outside the run through a symlink; creates the parent folders."""
        full = self.out_dir / run_relative(name)
        root = Path(self.out_dir).resolve()
        if not full.resolve().is_relative_to(root):
            raise ClipftUsageError(f"'{name}' leads outside the run directory {self.out_dir} (a symlink); "
                                   "give a name inside it")
        full.parent.mkdir(parents=True, exist_ok=True)
        self.created.add(full.relative_to(self.out_dir).parts[0])
        return full


@attrs.frozen
class StepView:
    epoch: int            # 1-based
    batch: int            # 1-based, within the epoch
    n_batches: int
    step: int             # optimizer steps so far
    stepped: bool         # this micro-batch ended an optimizer step
    loss: float
    terms: Mapping = attrs.field(converter=_frozen_map)  # a loss's named terms, if any
    lr: float = 0.0       # first parameter group's learning rate
    samples: int = 0      # in this micro-batch
    seconds: float = 0.0  # wall time of the micro-batch, data loading included
    grad_norm: Optional[float] = None  # the pre-clip norm, when clipping applied
    #: the mean loss of the epoch's micro-batches so far, this one included
    #: (what a progress display shows: one batch's loss is noisy)
    epoch_loss: Optional[float] = None

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("inf")


@attrs.frozen
class EvalView:
    epoch: int            # 0: before training; a mid-epoch evaluation: the epoch in progress
    metrics: Mapping = attrs.field(converter=_frozen_map)
    train_loss: Optional[float] = None  # the epoch's mean train loss (None at epoch 0 and mid-epoch)
    step: int = 0         # optimizer steps done when it evaluated
    #: a mid-epoch evaluation (``--eval-every``): the micro-batches of ``epoch`` done; 0 at an epoch end
    batch: int = 0


@attrs.frozen
class EpochView:
    epoch: int
    epochs: int
    train_loss: float
    seconds: float
    metrics: Mapping = attrs.field(converter=_frozen_map)
    step: int = 0


@attrs.frozen
class CheckpointView:
    path: Path
    epoch: int
    step: int


class Callback:
    """Base class: override the events you need; the others do nothing."""

    def state_dict(self) -> dict:
        """What to save in each checkpoint (JSON-serialisable) so that
        :meth:`load_state_dict` continues exactly on ``--resume``; default: nothing."""
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what :meth:`state_dict` returned, before ``on_run_start``
        of a resumed run (not called for a fresh run, nor when it saved nothing)."""

    def summary_section(self) -> Optional[dict]:
        """A JSON-serialisable dict stored in ``summary.json`` under the
        callback's name, asked once when the run ends; None (default): nothing."""
        return None

    def on_run_start(self, run: RunView) -> None: ...
    def on_epoch_start(self, epoch: int, epochs: int, n_batches: int) -> None: ...
    def on_step_end(self, step: StepView) -> None: ...
    def on_eval(self, ev: EvalView) -> None: ...
    def on_epoch_end(self, epoch: EpochView) -> None: ...
    def on_checkpoint(self, checkpoint: CheckpointView) -> None: ...
    def on_run_end(self, summary: Mapping) -> None: ...
    def on_run_abort(self, error: BaseException) -> None: ...


EVENTS = ("on_run_start", "on_epoch_start", "on_step_end", "on_eval", "on_epoch_end",
          "on_checkpoint", "on_run_end", "on_run_abort")
