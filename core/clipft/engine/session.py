"""A training session: the run directory, resume, signals, the callbacks of
the loop, and the summary.

``execute`` validates and builds everything (:func:`prepare`) before it touches
the run directory, then trains with the callbacks: the progress reporter, the
``metrics.jsonl`` writer, the plugins' callbacks and the checkpoints (at every
epoch end, every ``--checkpoint-every`` steps or minutes, and when a SIGTERM,
SIGHUP or Ctrl-C stops the run).
"""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Optional

import attrs
import torch

from clipft import atomic
from clipft.version import __version__
from clipft.callbacks import Callback, CheckpointView, EvalView, RunView
from clipft.config import RunConfig, dumps_toml, metric_mode, parse_early_stop, parse_every
from clipft.data import is_iterable
from clipft.engine import distributed, rundir, signals
from clipft.engine.accumulate import accumulation_of
from clipft.engine.accumulate import describe as describe_accumulation
from clipft.engine.assemble import resolve
from clipft.engine.callbacks import CallbackHost
from clipft.collapse import CollapseWatch
from clipft.early_stop import HEADLINE_METRICS, EarlyStopping, headline_metric, improved, metric_value
from clipft.engine.checkpoint import BEST, CURRENT, Checkpointer, checkpoint_to_load, inspect_checkpoint, read_state
from clipft.engine.loop import EndTraining, EvalSchedule, LoopState, StopTraining, train
from clipft.engine.prepare import PreparedRun, prepare
from clipft.engine.resume import resume_config
from clipft.errors import ClipftUsageError, RunInterrupted
from clipft.options import ComponentRef, options_to_dict
from clipft.progress import Silent


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM belongs to the
    current address space; ru_maxrss (the fallback) also keeps the parent's
    size at fork, so a run started from a large process would report that."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class MetricsLog(Callback):
    """``metrics.jsonl``: one row per logged optimizer step and per evaluation.
    ``rows`` is saved with each checkpoint, so a resume drops the rows written
    after it (the resumed run writes them again)."""

    def __init__(self, path: Path, log_every: int):
        self.path, self.log_every = path, log_every
        self.rows = rundir.count_lines(path)

    def _append(self, row: dict) -> None:
        rundir.append_jsonl(self.path, row)
        self.rows += 1

    def on_step_end(self, s) -> None:
        if s.stepped and (s.step % self.log_every == 0 or s.batch == s.n_batches):
            self._append({"type": "step", "epoch": s.epoch, "step": s.step, "loss": s.loss,
                          "lr": s.lr, "samples_per_s": s.samples_per_s, **s.terms})

    def on_eval(self, ev) -> None:
        row = {"type": "eval", "epoch": ev.epoch}
        if ev.batch:   # a mid-epoch evaluation (--eval-every)
            row.update(step=ev.step, batch=ev.batch)
        if ev.train_loss is not None:
            row["train_loss"] = ev.train_loss
        self._append({**row, **ev.metrics})


class Checkpoints(Callback):
    """Checkpoints at every epoch end and on the ``--checkpoint-every``
    schedule (optimizer steps or minutes of training), each announced with
    ``on_checkpoint``, each with the plugins' callback states. The first one
    commits an ``--overwrite`` (the replaced run is removed only then).
    With ``--keep-best METRIC``, an evaluation that improves on the best value
    so far writes ``checkpoint-best/`` too (``best`` records which)."""

    def __init__(self, checkpointer: Checkpointer, state: LoopState, host: CallbackHost,
                 metrics: Optional[MetricsLog], every: str = "epoch", directory=None, keep_best: Optional[str] = None,
                 agree=None):
        self.checkpointer, self.state, self.host, self.metrics = checkpointer, state, host, metrics
        #: ``--parallel fsdp``: every rank takes part in a checkpoint, so a
        #: decision from the clock is agreed (any rank's "due" makes it due)
        self.agree = agree or (lambda due: due)
        self.every = parse_every(every)
        self.directory = directory
        self._t_last = time.monotonic()
        self.keep_best = keep_best
        self._deferred = False   # a checkpoint due at a step whose evaluation follows

    def _due(self) -> bool:
        kind, n = self.every
        if kind == "steps":
            return self.state.step % n == 0
        if kind == "minutes":
            return self.agree(time.monotonic() - self._t_last >= 60.0 * n)
        return False

    def on_step_end(self, s) -> None:
        if s.stepped and s.batch < s.n_batches and self._due():
            if self.state.eval_due:   # saved after the evaluation, so a resume does not skip it
                self._deferred = True
            else:
                self.save()

    def on_eval(self, ev) -> None:
        if self.keep_best:
            value = metric_value(ev.metrics, self.keep_best, "--keep-best")
            best = self.state.best
            if improved(value, best["value"] if best else None, metric_mode(self.keep_best)):
                # in the loop state: every checkpoint saves it, a resume restores it
                self.state.best = {"metric": self.keep_best, "value": value, "step": ev.step,
                                   "epoch": ev.epoch, "batch": ev.batch,
                                   "path": BEST}   # in the run directory
                self.checkpointer.save_best(self.state.counters(), self.state.history, self._extra())
        if self._deferred:
            self._deferred = False
            self.save()

    def on_epoch_end(self, epoch) -> None:
        self.save()

    def _extra(self) -> dict:
        if self.metrics is None:   # a rank that only takes part in the gathering
            return {}
        return {"metrics_rows": self.metrics.rows, "callbacks": self.host.states()}

    def save(self) -> None:
        st = self.state
        if self.checkpointer.last_saved == (st.step, st.epoch, st.batch):
            return
        folder = self.checkpointer.save(st.counters(), st.history, self._extra())
        self._t_last = time.monotonic()
        if self.directory is not None:
            self.directory.committed()
        self.host.fire("on_checkpoint", CheckpointView(folder, st.epoch, st.step))

    def next_stage(self, checkpointer: Checkpointer) -> None:
        """The next stage of a multi-stage run saves its own parts (a new model,
        optimizer and schedule); the point already saved stays saved."""
        checkpointer.last_saved = self.checkpointer.last_saved
        self.checkpointer = checkpointer


class StopSignals(signals.Handlers):
    """SIGTERM, SIGINT (Ctrl-C) and SIGHUP ask training to stop after the
    current optimizer step (the session then checkpoints and exits 143 / 130 /
    129); a second signal exits at once."""

    def __call__(self):
        return signals.describe(self.received)[0] if self.received else None


def run_view(run: PreparedRun, out_dir: Path, resumed_from_epoch: int = 0, resumed_from_step: int = 0) -> RunView:
    total, trainable = run.param_counts
    res = run.resolved
    return RunView(
        out_dir=Path(out_dir), config=resolved_config(run).to_toml_dict(), model=run.config.model,
        pretrained=run.pretrained, device=str(run.device),
        strategies=tuple(s.name for s, _ in res.strategies), loss=res.loss[0].name,
        head=res.head[0].name if res.head else None, data=res.data[0].name,
        train_size=run.bundle.size("train") or 0, val_size=run.bundle.size("val") or 0,
        classnames=tuple(run.bundle.classnames or ()), params_total=total, params_trainable=trainable,
        lr=run.lr, lr_reason=run.lr_reason, epochs=run.config.epochs,
        # a stage's schedule covers its own epochs; the run's steps cover them all
        total_steps=(run.total_steps // max(1, run.stage_spec.epochs) * run.config.epochs
                     if run.stage_spec is not None else run.total_steps),
        resumed_from_epoch=resumed_from_epoch, resumed_from_step=resumed_from_step,
        warnings=tuple(run.warnings), accumulation=describe_accumulation(accumulation_of(run)),
        skipped=tuple(str(p) for p, _ in run.bundle.skipped))


def group_rows(run: PreparedRun) -> list:
    return [{"name": g.name, "tensors": len(g.params), "params": g.numel,
             "lr": g.lr, "weight_decay": g.weight_decay} for g in run.groups]


def stage_record(run: PreparedRun) -> dict:
    """What a stage of a multi-stage run trains, for ``summary.json``'s ``stages``."""
    st = run.stage_spec
    total, trainable = run.param_counts
    head = run.head is not None and any(p.requires_grad for p in run.head.parameters())
    return {"name": st.name, "epochs": st.epochs, "first_epoch": st.start + 1, "last_epoch": st.end,
            "strategies": [{"name": s.name, **options_to_dict(o)} for s, o in st.strategies],
            "head_trains": head, "lr": run.lr, "lr_reason": run.lr_reason, "steps": run.total_steps,
            "params": {"total": total, "trainable": trainable, "groups": group_rows(run),
                       "unused_trainable": unused_record(run)},
            "cache": run.features.stats or None}


def unused_record(run: PreparedRun):
    """What the strategies selected but nothing in training uses (left frozen), or None."""
    return run.unused.record() if run.unused is not None else None


def skipped_record(indexed: list, failures) -> dict:
    """summary.json's account of unreadable data: files found while indexing
    and samples that failed at batch time (a truncated JPEG passes the header
    check), each named with its reason, and unreadable shards of a stream."""
    named = [(str(p), r) for p, r in indexed] + failures.examples()
    out = {"skipped_images": len(indexed) + failures.count,
           "skipped": [n for n, _ in named[:20]],
           "skipped_reasons": [{"name": n, "reason": r} for n, r in named[:20]]}
    if failures.count:
        out["failed_at_load"] = {"count": failures.count,
                                 "examples": [{"name": n, "reason": r} for n, r in failures.examples()]}
    if failures.parts:
        out["unreadable_shards"] = [{"name": n, "reason": r, "samples": k}
                                    for (_, n), (r, k) in failures.parts.items()]
    return out


def final_loss(state: LoopState):
    """The last epoch's mean loss over its micro-batches (the one in progress
    when a run stopped part-way); None when nothing trained (``--epochs 0``).
    Not the last micro-batch's loss: under a batch-coupled loss a short last
    batch gives a value not comparable with the rest."""
    if not state.samples:
        return None
    if state.epoch_seen:
        return state.epoch_loss / state.epoch_seen
    losses = [h["train_loss"] for h in state.history if h.get("train_loss") is not None]
    return losses[-1] if losses else state.last_loss


def build_summary(run: PreparedRun, state: LoopState, out_dir: Path) -> dict:
    total, trainable = run.param_counts
    history = state.history
    seconds, samples = state.seconds, state.samples
    res = run.resolved
    summary = {
        "clipft_version": __version__,
        "run_dir": str(out_dir),
        "model": run.config.model,
        "pretrained": run.pretrained,
        "device": str(run.device),
        "precision": run.precision,
        "optimizer": {"name": run.config.optimizer, "impl": run.optimizer_impl},
        "strategies": [{"name": s.name, **options_to_dict(o)} for s, o in res.strategies],
        "loss": {"name": res.loss[0].name, **options_to_dict(res.loss[1])},
        "head": ({"name": res.head[0].name, **options_to_dict(res.head[1])} if res.head else None),
        "data": {
            "name": res.data[0].name,
            "train_size": run.bundle.size("train"),
            "val_size": run.bundle.size("val"),
            "classes": len(run.bundle.classnames or []),
            **skipped_record(run.bundle.skipped, run.loaders.failures),
        },
        "params": {
            "total": total,
            "trainable": trainable,
            "trainable_fraction": trainable / total if total else 0.0,
            "groups": group_rows(run),
            "unused_trainable": unused_record(run),
        },
        "train": {
            "epochs": run.config.epochs,
            "steps": state.step,
            "samples": samples,
            "seconds": seconds,
            "samples_per_s": samples / seconds if seconds > 0 else 0.0,
            "peak_rss_mb": peak_rss_mb(),
            "final_loss": final_loss(state),
            # each epoch's last incomplete batch left out (--drop-last), and how many samples that is
            "drop_last": run.loaders.drop_last,
            "dropped_per_epoch": run.loaders.dropped_per_epoch,
            "skipped_nonfinite_steps": state.skipped_nonfinite,
            "lr": run.lr,
            "lr_reason": run.lr_reason,
            # how --grad-accum combined micro-batches, and the negatives each sample met
            "accumulation": accumulation_of(run),
        },
        "eval": {
            "before": history[0]["eval"] if history else {},
            "after": history[-1]["eval"] if history else {},
            # "after" is always of the final weights (checkpoint/), never of checkpoint-best/
            "after_weights": {"weights": "final", "step": state.step, "epoch": state.epoch} if history else None,
            "history": history,
        },
    }
    if state.stopped_early is not None:
        summary["stopped_early"] = state.stopped_early
    if state.best is not None:
        summary["best"] = state.best
    split = run.bundle.split
    if isinstance(split, dict) and "shots" in split:   # a few-shot run says so (data_split.json has the files)
        summary["data"]["shots"] = split["shots"]
    if isinstance(split, dict) and "classes" in split:   # a base-to-novel half (classes=base|novel)
        summary["data"]["classes"] = split["classes"]
    if isinstance(split, dict) and "val_split" in split:   # a val split the data chose, not a random share
        summary["data"]["val_split"] = split["val_split"]
    if state.fit:   # components fitted to the training split (Tip-Adapter): what they chose
        summary["fit"] = state.fit
    if run.features.stats:
        summary["cache"] = run.features.stats
    dist = run.dist
    world = dist.world if dist is not None else 1
    summary["distributed"] = {
        "world_size": world,
        "backend": torch.distributed.get_backend() if world > 1 else None,
        "batch_per_rank": run.config.batch_size,
        "global_batch": run.config.batch_size * world,
        "dropped_per_epoch": run.loaders.dropped_per_epoch,
        #: trained tensors the loss does not reach (DDP then finds unused parameters)
        "unused_trained_tensors": run.unused_trained,
    }
    if world > 1:
        summary["distributed"]["parallel"] = run.config.parallel
        sharding = run.trainer.sharding if run.trainer is not None else None
        if sharding is not None:   # how each tower was placed, and what stayed whole on every rank
            summary["distributed"]["fsdp"] = {"towers": dict(sharding.layout),
                                              "replicated_trained_tensors": len(sharding.replicated)}
    if run.resolved.stages:   # a multi-stage run: params/cache above are the last stage's
        summary["stages"] = [dict(s) for s in state.stages]
        summary["staged_by"] = run.resolved.staged_by
    return summary


def resolved_config(run: PreparedRun) -> RunConfig:
    """The config with every default made explicit (options typed and complete,
    pretrained and lr resolved), so the run directory can repeat the run."""
    def ref(spec_opts):
        spec, opts = spec_opts
        return ComponentRef(spec.name, {k: list(v) if isinstance(v, tuple) else v
                                        for k, v in options_to_dict(opts).items() if v is not None})
    res = run.resolved
    # a multi-stage run resolves lr and warmup per stage: keep what was given
    lr = run.config.lr if res.stages else run.lr
    warmup = run.config.warmup_steps if res.stages else run.warmup_steps
    # drop_last made explicit: it sets the batches per epoch, so a repeat or a
    # resume must not depend on a loss's default changing
    return attrs.evolve(
        run.config, pretrained=run.pretrained, lr=lr, warmup_steps=warmup, drop_last=run.loaders.drop_last,
        data=ref(res.data), loss=ref(res.loss), head=ref(res.head) if res.head else None,
        strategies=[ref(s) for s in res.strategies], callbacks=typed_callbacks(run))


def typed_callbacks(run: PreparedRun) -> list:
    """The selected callbacks with the options given, as their options class
    typed them (``patience = 4``, not the command line's ``"4"``)."""
    built = {spec.name: (opts, required) for spec, opts, required in run.resolved.callbacks}
    out = []
    for r in run.config.callbacks:
        if r.name not in built:   # "none"
            out.append(r)
            continue
        opts, required = built[r.name]
        typed = options_to_dict(opts)
        values = {k: (list(typed[k]) if isinstance(typed[k], tuple) else typed[k])
                  for k in r.options if k in typed and typed[k] is not None}
        if "required" in r.options:
            values["required"] = required
        out.append(ComponentRef(r.name, values))
    return out


def write_split(run: PreparedRun, out_dir: Path) -> None:
    """``data_split.json``, when the data source sampled its training split
    (``DataBundle.split``): the files it chose, so the split can be audited;
    ``config.toml`` has what chooses them again."""
    if run.bundle.split is not None:
        atomic.write_text(out_dir / "data_split.json", json.dumps(run.bundle.split, indent=2) + "\n")


def config_for_dir(config: RunConfig, out_dir: Path) -> str:
    d = config.to_toml_dict()
    return f"# clipft {__version__} run config; repeat with: clipft run --config {out_dir / 'config.toml'}\n" + dumps_toml(d)


def checkpointer_for(run: PreparedRun, out_dir: Path) -> Checkpointer:
    t = run.trainer
    return Checkpointer(out_dir, run.model, run.head, run.assembly.base_shapes, t.optimizer,
                        t.scheduler, t.scaler, run.bundle.classnames, run.bundle.templates,
                        keep=run.config.keep_checkpoints, loss=run.loss, also=run.assembly.earlier_keys,
                        sharding=t.sharding, writes=run.dist is None or run.dist.main,
                        epochs=run.config.epochs)


def callback_host(run: PreparedRun, out_dir: Path, state: LoopState, progress=None,
                  checkpoints: Optional[Checkpointer] = None, callbacks=(), warn=None,
                  directory=None) -> tuple[CallbackHost, Checkpoints]:
    """The run's callbacks and, of them, the one that saves checkpoints:
    ``progress`` (a reporter from :mod:`clipft.progress`), ``metrics.jsonl``
    and the checkpoints (the engine's own), with ``callbacks`` (``[(name,
    Callback, required)]``, from plugins) before the checkpoints, so that
    ``on_checkpoint`` follows every ``on_epoch_end``."""

    host = CallbackHost(warn=warn)
    host.add("progress", progress or Silent(), builtin=True)
    metrics = MetricsLog(Path(out_dir) / "metrics.jsonl", run.config.log_every)
    host.add("metrics", metrics, builtin=True)
    for name, cb, required in callbacks:
        host.add(name, cb, required)
    sharded = run.trainer is not None and run.trainer.sharding is not None
    saver = Checkpoints(checkpoints or checkpointer_for(run, out_dir), state, host, metrics,
                        run.config.checkpoint_every, directory, run.config.keep_best,
                        agree=run.dist.any if sharded else None)
    host.add("checkpoint", saver, builtin=True)
    return host, saver


def train_run(run: PreparedRun, out_dir: Path, progress=None, state: Optional[LoopState] = None,
              checkpoints: Optional[Checkpointer] = None, host: Optional[CallbackHost] = None,
              stop=lambda: None, end=lambda: None) -> LoopState:
    """Train a prepared run into ``out_dir``, firing the callbacks' events;
    ``end()`` is a callback's request to end the run normally (or None)."""
    state = state or LoopState()
    host = host or callback_host(run, out_dir, state, progress, checkpoints)[0]
    return train(run.trainer, run.epochs_end, state, run.evaluate, host, stop,
                 total_epochs=run.config.epochs, end_requested=end,
                 schedule=EvalSchedule(parse_every(run.config.eval_every, "eval_every")))


def build_callbacks(run: PreparedRun, progress) -> list:
    """``[(name, Callback, required)]`` of the run's callback plugins,
    ``collapse`` (:mod:`clipft.collapse`) and ``early_stop`` (``--early-stop``),
    built-in callbacks like theirs. One the
    user selected must build; a default one that cannot (a missing optional
    dependency, say) is reported and left out."""
    # collapse detection watches every run; it only warns, so its failure must not stop one
    out = [("collapse", CollapseWatch(lambda: getattr(run.evaluate, "predictions", None),
                                      getattr(progress, "warn", lambda m: None)), False)]
    if run.config.early_stop:
        out.append(("early_stop", EarlyStopping(run.config.early_stop), True))
    for spec, options, required in run.resolved.callbacks:
        try:
            cb = spec.build(options)
            if not isinstance(cb, Callback):
                raise TypeError(f"built a {type(cb).__name__}, not a clipft.Callback")
        except ClipftUsageError:
            raise
        except Exception as exc:  # noqa: BLE001 - a plugin's failure, reported by name
            explicit = any(r.name == spec.name for r in run.config.callbacks)
            if explicit or required:
                raise ClipftUsageError(f"callback '{spec.name}' could not be built: "
                                       f"{type(exc).__name__}: {exc}") from exc
            getattr(progress, "warn", lambda m: None)(
                f"default callback '{spec.name}' left out: {type(exc).__name__}: {exc}")
            continue
        out.append((spec.name, cb, required))
    return out


def check_metrics(run: PreparedRun) -> None:
    """``--keep-best`` and ``--early-stop`` name metrics the run's evaluation
    reports: a usage error before the run directory is touched, not after an
    epoch."""
    names = getattr(run.evaluate, "metric_names", None)
    if names is None:
        return
    names = names()
    wanted = [("--keep-best", run.config.keep_best)]
    if run.config.early_stop:
        metric = parse_early_stop(run.config.early_stop)["metric"]
        if metric is None and headline_metric(dict.fromkeys(names)) is None:
            raise ClipftUsageError(f"--early-stop: the run's evaluation has no headline metric "
                                   f"({', '.join(HEADLINE_METRICS)}); give one with :metric=NAME")
        wanted.append(("--early-stop", metric))
    for flag, metric in wanted:
        if metric and metric not in names:
            raise ClipftUsageError(f"{flag}: the run's evaluation has no metric '{metric}'; it reports: "
                                   f"{', '.join(names) or 'nothing'}")


def _resume_folder(out_dir: Path, progress) -> tuple:
    """``(folder, state)`` of the checkpoint ``--resume`` continues from."""
    folder, state = checkpoint_to_load(out_dir, f"--resume {out_dir}", getattr(progress, "warn", None))
    backup = rundir.backup_of(out_dir)
    if folder is None and backup.exists():
        raise ClipftUsageError(
            f"--resume {out_dir}: nothing to resume; an --overwrite of this directory was interrupted before "
            f"the new run's first checkpoint, and the previous run is kept in {backup}. Restore it with "
            f"`rm -rf {out_dir} && mv {backup} {out_dir}` (then --resume it), or remove it with `rm -rf {backup}`")
    if folder is None and (out_dir / "checkpoint").is_dir():
        _, why = inspect_checkpoint(out_dir / "checkpoint")
        raise ClipftUsageError(f"--resume {out_dir}: no complete checkpoint to resume from: {why}")
    if folder is None:
        raise ClipftUsageError(
            f"--resume {out_dir}: nothing to resume, the run stopped before its first checkpoint; "
            f"run it again without --resume (the directory is reused as it is)")
    if folder.name != "checkpoint":
        getattr(progress, "warn", lambda m: None)(
            f"{out_dir}/checkpoint is missing or incomplete; resuming from {folder.name}, "
            "the newest complete checkpoint")
    return folder, state


def resume_stage(res, state: dict) -> tuple:
    """``(stage index, at_boundary)`` to resume a multi-stage run from a
    checkpoint's state: its own stage, or the next one when it ended the stage
    (then only its weights carry over: the next stage's optimizer, schedule and
    RNG start fresh, as they did when the run went on without stopping)."""
    if not res.stages:
        return 0, False
    loop = state.get("loop") or {}
    k = res.saved_stage(state)
    ended = int(loop.get("epoch", state.get("epoch", 0))) >= res.stages[k].end and not loop.get("batch")
    if ended and k + 1 < len(res.stages):
        return k + 1, True
    return k, False


def _refuse_world(out_dir: Path, trained_on: int, world: int) -> None:
    raise ClipftUsageError(
        f"--resume {out_dir}: the run trained on {trained_on} process(es) and this is "
        f"{world}; resume with the same number (torchrun --nproc-per-node {trained_on}, "
        "or clipft run --nproc): the data order and the global batch depend on it")


def _resume_state(run: PreparedRun, out_dir: Path, checkpoints: Checkpointer, progress,
                  folder: Optional[Path] = None, weights_only: bool = False, dist=None) -> LoopState:
    if folder is None:
        folder, _ = _resume_folder(out_dir, progress)
    world = dist.world if dist is not None else 1
    trained_on = int(((read_state(folder) or {}).get("loop") or {}).get("world_size", 1))
    if trained_on != world:   # before anything is read: a sharded checkpoint is cut for its world size
        _refuse_world(out_dir, trained_on, world)
    saved = checkpoints.restore_weights(folder) if weights_only else checkpoints.restore(folder)
    if weights_only:
        saved["restore_rng"] = None
    loop = saved.get("loop")
    if loop is None:   # written before step checkpoints: epoch boundaries, counters in summary.json
        old = json.loads((out_dir / "summary.json").read_text()) if (out_dir / "summary.json").exists() else {}
        loop = {"epoch": saved["epoch"], "step": saved["global_step"],
                "samples": old.get("train", {}).get("samples", 0),
                "seconds": old.get("train", {}).get("seconds", 0.0)}
    state = LoopState(**loop, history=saved["history"], restore_rng=saved["restore_rng"],
                      callback_states=dict(saved.get("callbacks") or {}))
    if state.world_size != world:
        _refuse_world(out_dir, state.world_size, world)
    state.stage = run.stage
    if state.stopped_early:
        st = state.stopped_early
        raise ClipftUsageError(
            f"the run in {out_dir} stopped early after step {st['step']} ({st['reason']}) and is complete; "
            "to train on, start a new run from its weights (clipft export, then --pretrained)")
    if state.epoch >= run.config.epochs:
        raise ClipftUsageError(
            f"the run in {out_dir} already finished {state.epoch} epoch(s); "
            f"pass --epochs N with N > {state.epoch} to continue it")
    if "metrics_rows" in saved and (dist is None or dist.main):
        rundir.truncate_lines(out_dir / "metrics.jsonl", saved["metrics_rows"])
    if state.batch and is_iterable(run.bundle.train):
        getattr(progress, "warn", lambda m: None)(
            f"resuming part-way into epoch {state.epoch + 1} of streamed data: its first {state.batch} "
            "batches are read again and dropped (a stream cannot seek); the same --num-workers "
            "gives the same batches")
    return state


def execute(config: Optional[RunConfig], registry, progress, out_dir: Optional[Path] = None,
            overwrite: bool = False, resume: Optional[Path] = None, given=None) -> dict:
    """Run (or resume) a training run; returns the summary dict.

    A resume trains with the run's own config, of which only some options may
    change (:func:`clipft.engine.resume.resume_config`): ``given`` names the
    options the caller set explicitly (the command line's flags; ``config``
    is then the saved config with them applied), or is None (``config`` is a
    whole config, compared with the saved one; None: the saved one).

    Under ``torchrun`` every rank trains; rank 0 alone writes the run directory,
    shows progress and fires the callbacks (the others are silent)."""
    if resume is not None:
        config = resume_config(Path(resume), config, registry, given, out_dir, overwrite)
    dist = distributed.from_env(config.device, config.collective_timeout)
    try:
        with distributed.stalled_ranks_named(dist):
            return _execute(config, registry, progress if dist.main else None, out_dir, overwrite, resume, dist)
    finally:
        distributed.shutdown()


def _execute(config, registry, progress, out_dir, overwrite, resume, dist) -> dict:
    directory: list = []   # the run's RunDirectory once there is one: its lock goes at the end
    try:
        return _execute_locked(config, registry, progress, out_dir, overwrite, resume, dist, directory)
    finally:
        for d in directory:
            d.lock.release()


def _execute_locked(config, registry, progress, out_dir, overwrite, resume, dist, held: list) -> dict:
    progress = progress or Silent()
    main = dist.main
    directory = None
    if resume is not None:
        out_dir = Path(resume)
        if main:   # before anything in the run is read or changed: one process per run
            directory = rundir.RunDirectory(out_dir)
            held.append(directory)
            directory.resume()
    else:
        # one name for every rank (a default name has the time in it)
        out_dir = dist.broadcast(Path(out_dir or config.out or rundir.default_run_dir(config.model,
                                                                                      config.strategies)))
        if main:
            rundir.check_out_dir(out_dir, overwrite)
    res = resolve(config, registry)
    if res.stages and dist.enabled:
        raise ClipftUsageError(f"a multi-stage run ({', '.join(s.name for s in res.stages)}) trains on one "
                               f"process; this is {dist.world} (stages under torchrun are not built yet)")
    stage, folder, at_boundary = 0, None, False
    if resume is not None:
        folder, saved_state = _resume_folder(out_dir, progress)
        stage, at_boundary = resume_stage(res, saved_state)
    run = prepare(config, registry, stage=stage, resolved=res, fit=resume is None)
    check_metrics(run)
    warn = getattr(progress, "warn", lambda m: None)
    failed = [r for r in getattr(registry, "records", ()) if r.status == "failed"]
    if failed:   # once per run, whether or not the run uses them
        warn("plugins that failed to load: " + "; ".join(f"{r.distribution} ({r.error})" for r in failed)
             + " (see `clipft plugins`)")
    callbacks = build_callbacks(run, progress) if main else []
    checkpoints = checkpointer_for(run, out_dir)
    if resume is not None:
        state = _resume_state(run, out_dir, checkpoints, progress, folder, weights_only=at_boundary, dist=dist)
    else:
        # everything is validated and built: only now touch the run directory
        state = LoopState(world_size=dist.world, fit=run.fit)
        if main:
            directory = rundir.RunDirectory(out_dir)
            held.append(directory)
            directory.start(overwrite)
    dist.barrier()     # the run directory exists before any rank trains
    started = None     # the callbacks once on_run_start was fired: they hear of a failure
    try:
        if main:
            atomic.write_text(out_dir / "config.toml", config_for_dir(resolved_config(run), out_dir))
            write_split(run, out_dir)
            host, saver = callback_host(run, out_dir, state, progress, checkpoints, callbacks,
                                        warn=getattr(progress, "warn", None), directory=directory)
        else:
            host, saver = CallbackHost(), None
            if run.trainer.sharding is not None:   # its shards are part of every checkpoint
                saver = Checkpoints(checkpoints, state, host, None, run.config.checkpoint_every,
                                    keep_best=run.config.keep_best, agree=dist.any)
                host.add("checkpoint", saver, builtin=True)
        view = run_view(run, out_dir, state.epoch, state.step)
        if directory is not None:   # what callbacks create through view.path is the run's own
            directory.created = view.created
        host.load_states(state.callback_states)
        started = host
        host.fire("on_run_start", view)

        def end():
            return view.stop_requested["reason"] if view.stop_requested else None

        with StopSignals() as stop:
            try:
                while True:
                    if run.resolved.stages:
                        _start_stage(run, state)
                    state = train_run(run, out_dir, state=state, host=host, stop=stop, end=end)
                    if run.resolved.stages:   # the stage's cache counters, now that it trained
                        state.stages[run.stage]["cache"] = run.features.stats or None
                    if not run.resolved.stages or run.stage + 1 >= len(run.resolved.stages):
                        break
                    run = _next_stage(run, config, registry, out_dir, saver)
            except StopTraining as stopped:
                _stop(saver, stopped, out_dir, signals.describe(stop.received) if stop.received else None)
            except EndTraining:
                _end(run, state, host, saver, dict(view.stop_requested or {}))
        if run.config.epochs == 0 and saver is not None:
            # no epoch ends, so no checkpoint was written: save the model as
            # evaluated, so that export, eval and predict work on the run
            saver.save()
    except BaseException as exc:
        if directory is not None:
            directory.abandon()   # a no-op once the new run has a checkpoint
        if started is not None:
            started.abort(exc)
        raise
    try:
        summary = build_summary(run, state, out_dir)
        sections = host.sections()
        if sections:
            summary["callbacks"] = sections
        if host.failures:
            summary["callbacks_failed"] = [{"name": n, "event": e, "error": err} for n, e, err in host.failures]
        if main:
            atomic.write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
        host.fire("on_run_end", summary)
    except BaseException as exc:
        host.abort(exc)
        raise
    if directory is not None:
        directory.record()   # last: callbacks write their files (curves.png) at the end
    dist.barrier()     # no rank leaves before rank 0 has written everything
    return summary


def _start_stage(run: PreparedRun, state: LoopState) -> None:
    """Record the stage ``run`` trains (once: a resume within it keeps the record)."""
    state.stage = run.stage
    record = stage_record(run)
    if len(state.stages) > run.stage:
        state.stages[run.stage] = {**record, **{k: v for k, v in state.stages[run.stage].items()
                                                if k == "cache"}}
    else:
        state.stages.append(record)


def _next_stage(run: PreparedRun, config, registry, out_dir: Path, saver: Checkpoints) -> PreparedRun:
    """End ``run``'s stage and prepare the next one: built afresh (seeded,
    strategies of the earlier stages re-applied, this stage's on top), with the
    weights of the checkpoint that ended the stage loaded, exactly as a
    ``--resume`` from that checkpoint does, so both continue identically."""

    nxt = prepare(config, registry, stage=run.stage + 1, resolved=run.resolved)
    checkpointer = checkpointer_for(nxt, out_dir)
    checkpointer.restore_weights(Path(out_dir) / CURRENT)
    saver.next_stage(checkpointer)
    return nxt


def _end(run: PreparedRun, state: LoopState, host: CallbackHost, saver: Optional[Checkpoints],
         request: dict) -> None:
    """A callback ended the run (``RunView.request_stop``): evaluate the final
    weights unless the last evaluation did, checkpoint, record why."""
    if state.last_eval_step != state.step:
        metrics = run.evaluate()
        entry = {"epoch": state.epoch + 1 if state.batch else state.epoch, "step": state.step, "eval": metrics}
        if state.batch:
            entry["batch"] = state.batch
        state.history.append(entry)
        state.last_eval_step = state.step
        host.fire("on_eval", EvalView(entry["epoch"], metrics, step=state.step, batch=state.batch))
    reason = request.pop("reason", "stop requested by a callback")
    state.stopped_early = {"reason": reason, "step": state.step,
                           "epoch": state.epoch + 1 if state.batch else state.epoch,
                           "batch": state.batch, **request}
    if saver is not None:
        # written again when the point was saved already: the checkpoint says the run ended
        saver.checkpointer.last_saved = None
        saver.save()


def _stop(saver: Optional[Checkpoints], stopped: StopTraining, out_dir: Path, received) -> None:
    """A stop request: checkpoint where the loop stopped (rank 0, which holds
    ``saver``), say how to resume, exit."""
    name, code = received or ("stopped", 143)
    if saver is not None:
        saver.save()
    st = stopped.state
    where = f"epoch {st.epoch + 1}, batch {st.batch}" if st.batch else f"the end of epoch {st.epoch}"
    raise RunInterrupted(
        f"{name}: stopped after optimizer step {st.step} ({where}) and saved a checkpoint; "
        f"resume with: clipft run --resume {out_dir}", code)
