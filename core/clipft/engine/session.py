"""A training session: the run directory, resume, the observers of the loop,
and the summary.

``execute`` validates and builds everything (:func:`prepare`) before it touches
the run directory, then trains with three observers of the loop's events: the
progress reporter, the ``metrics.jsonl`` writer and the checkpointer.
"""
from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Optional

import attrs

from clipft import __version__
from clipft.config import RunConfig, dumps_toml
from clipft.engine import rundir
from clipft.engine.checkpoint import Checkpointer
from clipft.callbacks import Callback, CheckpointView, RunView
from clipft.engine.callbacks import CallbackHost
from clipft.engine.loop import LoopState, train
from clipft.engine.prepare import PreparedRun, prepare
from clipft.errors import ClipftUsageError
from clipft.options import ComponentRef, options_to_dict


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
    """``metrics.jsonl``: one row per logged optimizer step and per evaluation."""

    def __init__(self, path: Path, log_every: int):
        self.path, self.log_every = path, log_every

    def on_step_end(self, s) -> None:
        if s.stepped and (s.step % self.log_every == 0 or s.batch == s.n_batches):
            rundir.append_jsonl(self.path, {
                "type": "step", "epoch": s.epoch, "step": s.step, "loss": s.loss,
                "lr": s.lr, "samples_per_s": s.samples_per_s, **s.terms})

    def on_eval(self, ev) -> None:
        row = {"type": "eval", "epoch": ev.epoch}
        if ev.train_loss is not None:
            row["train_loss"] = ev.train_loss
        rundir.append_jsonl(self.path, {**row, **ev.metrics})


class EpochCheckpoints(Callback):
    """A checkpoint at the end of every epoch, announced with ``on_checkpoint``."""

    def __init__(self, checkpointer: Checkpointer, state: LoopState, host: CallbackHost):
        self.checkpointer, self.state, self.host = checkpointer, state, host

    def on_epoch_end(self, epoch) -> None:
        self.checkpointer.save(self.state.epoch, self.state.step, self.state.history)
        self.host.fire("on_checkpoint", CheckpointView(self.checkpointer.run_dir / "checkpoint",
                                                       self.state.epoch, self.state.step))


def run_view(run: PreparedRun, out_dir: Path, resumed_from_epoch: int = 0) -> RunView:
    total, trainable = run.param_counts
    res = run.resolved
    return RunView(
        out_dir=Path(out_dir), config=resolved_config(run).to_toml_dict(), model=run.config.model,
        pretrained=run.pretrained, device=str(run.device),
        strategies=tuple(s.name for s, _ in res.strategies), loss=res.loss[0].name,
        head=res.head[0].name if res.head else None, data=res.data[0].name,
        train_size=len(run.bundle.train), val_size=len(run.bundle.val),
        classnames=tuple(run.bundle.classnames or ()), params_total=total, params_trainable=trainable,
        lr=run.lr, epochs=run.config.epochs, total_steps=run.total_steps,
        resumed_from_epoch=resumed_from_epoch, warnings=tuple(run.warnings),
        skipped=tuple(str(p) for p, _ in run.bundle.skipped))


def build_summary(run: PreparedRun, state: LoopState, out_dir: Path, prior: Optional[dict] = None) -> dict:
    total, trainable = run.param_counts
    history = state.history
    seconds = state.seconds + (prior or {}).get("seconds", 0.0)
    samples = state.samples + (prior or {}).get("samples", 0)
    res = run.resolved
    summary = {
        "clipft_version": __version__,
        "run_dir": str(out_dir),
        "model": run.config.model,
        "pretrained": run.pretrained,
        "device": str(run.device),
        "precision": run.config.precision,
        "strategies": [{"name": s.name, **options_to_dict(o)} for s, o in res.strategies],
        "loss": {"name": res.loss[0].name, **options_to_dict(res.loss[1])},
        "head": ({"name": res.head[0].name, **options_to_dict(res.head[1])} if res.head else None),
        "data": {
            "name": res.data[0].name,
            "train_size": len(run.bundle.train),
            "val_size": len(run.bundle.val),
            "classes": len(run.bundle.classnames or []),
            "skipped_images": len(run.bundle.skipped) + run.loaders.failures.count,
            "skipped": [str(p) for p, _ in run.bundle.skipped[:20]],
        },
        "params": {
            "total": total,
            "trainable": trainable,
            "trainable_fraction": trainable / total if total else 0.0,
            "groups": [{"name": g.name, "tensors": len(g.params), "params": g.numel,
                        "lr": g.lr, "weight_decay": g.weight_decay} for g in run.groups],
        },
        "train": {
            "epochs": run.config.epochs,
            "steps": state.step,
            "samples": samples,
            "seconds": seconds,
            "samples_per_s": samples / seconds if seconds > 0 else 0.0,
            "peak_rss_mb": peak_rss_mb(),
            "final_loss": state.last_loss,
            "lr": run.lr,
        },
        "eval": {
            "before": history[0]["eval"] if history else {},
            "after": history[-1]["eval"] if history else {},
            "history": history,
        },
    }
    if run.features.stats:
        summary["cache"] = run.features.stats
    return summary


def resolved_config(run: PreparedRun) -> RunConfig:
    """The config with every default made explicit (options typed and complete,
    pretrained and lr resolved), so the run directory can repeat the run."""
    def ref(spec_opts):
        spec, opts = spec_opts
        return ComponentRef(spec.name, {k: list(v) if isinstance(v, tuple) else v
                                        for k, v in options_to_dict(opts).items() if v is not None})
    res = run.resolved
    return attrs.evolve(
        run.config, pretrained=run.pretrained, lr=run.lr, warmup_steps=run.warmup_steps,
        data=ref(res.data), loss=ref(res.loss), head=ref(res.head) if res.head else None,
        strategies=[ref(s) for s in res.strategies])


def config_for_dir(config: RunConfig, out_dir: Path) -> str:
    d = config.to_toml_dict()
    return f"# clipft {__version__} run config; repeat with: clipft run --config {out_dir / 'config.toml'}\n" + dumps_toml(d)


def checkpointer_for(run: PreparedRun, out_dir: Path) -> Checkpointer:
    t = run.trainer
    return Checkpointer(out_dir, run.model, run.head, run.assembly.base_shapes, t.optimizer,
                        t.scheduler, t.scaler, run.bundle.classnames, run.bundle.templates)


def callback_host(run: PreparedRun, out_dir: Path, state: LoopState, progress=None,
                  checkpoints: Optional[Checkpointer] = None, callbacks=(), warn=None) -> CallbackHost:
    """The run's observers: ``progress`` (a reporter from :mod:`clipft.progress`),
    ``metrics.jsonl`` and epoch checkpoints (required), then ``callbacks``
    (``[(name, Callback, required)]``, from plugins)."""
    from clipft.progress import Silent

    host = CallbackHost(warn=warn)
    host.add("progress", progress or Silent(), builtin=True)
    host.add("metrics", MetricsLog(Path(out_dir) / "metrics.jsonl", run.config.log_every), builtin=True)
    for name, cb, required in callbacks:
        host.add(name, cb, required)
    # last, so that on_checkpoint follows every callback's on_epoch_end
    host.add("checkpoint", EpochCheckpoints(checkpoints or checkpointer_for(run, out_dir), state, host),
             builtin=True)
    return host


def train_run(run: PreparedRun, out_dir: Path, progress=None, state: Optional[LoopState] = None,
              checkpoints: Optional[Checkpointer] = None, host: Optional[CallbackHost] = None) -> LoopState:
    """Train a prepared run into ``out_dir``, firing the callbacks' events."""
    state = state or LoopState()
    host = host or callback_host(run, out_dir, state, progress, checkpoints)
    return train(run.trainer, run.config.epochs, state, run.evaluate, host)


def execute(config: RunConfig, registry, progress, out_dir: Optional[Path] = None,
            overwrite: bool = False, resume: Optional[Path] = None) -> dict:
    """Run (or resume) a training run; returns the summary dict."""
    if resume is not None:
        out_dir = Path(resume)
    else:
        out_dir = Path(out_dir or config.out or rundir.default_run_dir(config.model, config.strategies))
        rundir.check_out_dir(out_dir, overwrite)
    run = prepare(config, registry)
    checkpoints = checkpointer_for(run, out_dir)
    state, prior = LoopState(), None
    if resume is not None:
        saved = checkpoints.restore()
        state = LoopState(epoch=saved["epoch"], step=saved["global_step"], history=saved["history"])
        old = json.loads((out_dir / "summary.json").read_text()) if (out_dir / "summary.json").exists() else {}
        prior = {"seconds": old.get("train", {}).get("seconds", 0.0),
                 "samples": old.get("train", {}).get("samples", 0)}
        if state.epoch >= config.epochs:
            raise ClipftUsageError(
                f"the run in {out_dir} already finished {state.epoch} epoch(s); "
                f"pass --epochs N with N > {state.epoch} to continue it")
    else:
        # everything is validated and built: only now touch the run directory
        rundir.start_run_dir(out_dir, overwrite)
    rundir.write_atomic(out_dir / "config.toml", config_for_dir(resolved_config(run), out_dir))
    host = callback_host(run, out_dir, state, progress, checkpoints, warn=getattr(progress, "warn", None))
    host.fire("on_run_start", run_view(run, out_dir, state.epoch))
    state = train_run(run, out_dir, state=state, host=host)
    summary = build_summary(run, state, out_dir, prior)
    if host.failures:
        summary["callbacks_failed"] = [{"name": n, "event": e, "error": err} for n, e, err in host.failures]
    rundir.write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))
    host.fire("on_run_end", summary)
    return summary
