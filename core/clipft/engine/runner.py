"""Assembling a run (resolve → model → data → strategies → head → optimizer)
and training it."""
from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import time
from pathlib import Path
from typing import Optional

import attrs
import numpy as np
import torch

from clipft import __version__
from clipft.config import RunConfig, dumps_toml
from clipft.data import Batches, DataContext, DecodeFailures, GuardedDataset, collate
from clipft.engine import rundir
from clipft.engine.checkpoint import load_checkpoint, save_checkpoint
from clipft.engine.compose import apply_strategies, build_groups, freeze_frozen_norm_stats
from clipft.engine.context import BuildContext
from clipft.engine.evaluate import evaluate
from clipft.engine.features import LiveFeatures, select_features
from clipft.engine.forward import ForwardRecord, caption_ids, class_text_features, logit_bias_of, logit_scale_of
from clipft.engine.optim import default_warmup, make_optimizer, make_scheduler
from clipft.engine.perf import apply_speed_options, check_precision, grad_scaler
from clipft.errors import ClipftError, ClipftUsageError
from clipft.models import load_model
from clipft.options import ComponentRef, build_options, options_to_dict
from clipft.specs import NEED_HEAD, NEED_LABELS, NEED_TEXT

HEAD_ONLY_LR = 1e-3
MAX_LOGIT_SCALE = math.log(100.0)


@attrs.define
class Resolved:
    """Component specs and validated options, before anything heavy is built."""

    data: tuple
    strategies: list
    loss: tuple
    head: Optional[tuple]


def resolve(config: RunConfig, registry) -> Resolved:
    def one(kind, ref):
        spec = registry.get(kind, ref.name)
        return spec, build_options(kind, spec, ref.options)

    strategies = []
    for ref in config.strategies:
        if ref.name == "none":
            if ref.options:
                raise ClipftUsageError("strategy 'none' takes no options")
            continue
        strategies.append(one("strategy", ref))
    loss = config.loss
    if loss is None:
        # a head is there to be trained: CE through it (CoOp's loss for the text
        # head); without one, CLIP's own contrastive objective
        loss = ComponentRef("cross-entropy" if config.head is not None else "contrastive")
    res = Resolved(
        data=one("data", config.data),
        strategies=strategies,
        loss=one("loss", loss),
        head=one("head", config.head) if config.head is not None else None,
    )
    needs = res.loss[0].needs
    if NEED_HEAD in needs and res.head is None:
        raise ClipftUsageError(
            f"loss '{res.loss[0].name}' needs a classification head; add --head linear "
            "(or --head zero-shot)")
    return res


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ClipftUsageError("--device cuda requested but CUDA is not available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@attrs.define
class PreparedRun:
    config: RunConfig
    resolved: Resolved
    device: torch.device
    model: torch.nn.Module
    tokenizer: object
    pretrained: str
    bundle: object
    ctx: BuildContext
    selections: list
    head: Optional[torch.nn.Module]
    loss: object
    groups: list
    lr: float
    base_shapes: dict
    features: object = attrs.field(factory=LiveFeatures)
    optimizer: object = None
    scheduler: object = None
    scaler: object = None
    failures: DecodeFailures = attrs.field(factory=DecodeFailures)
    total_steps: int = 0
    #: things the user should know before training starts (printed by the reporter)
    warnings: list = attrs.field(factory=list)
    warmup_steps: int = 0
    #: what apply_speed_options did (grad checkpointing, compiled modules)
    speed: dict = attrs.field(factory=dict)
    _loaders: dict = attrs.field(factory=dict)

    # -- helpers used by the engine and by plugins -------------------------
    def autocast(self):
        p = self.config.precision
        if p == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16)

    def sampler_seed(self, epoch: int) -> int:
        """Seed of the train order in ``epoch`` (a cached epoch replays the same order)."""
        return self.config.seed * 100003 + epoch

    def loader(self, dataset, train: bool, epoch: int = 0, reuse: bool = True):
        """Batches of ``dataset``. The DataLoader is built once per dataset and
        reused across epochs, so worker processes persist (``persistent_workers``);
        the train sampler is reseeded every epoch, giving the order a fresh
        ``RandomSampler`` seeded with ``sampler_seed(epoch)`` gives."""
        key = (id(dataset), train)
        loader = self._loaders.get(key) if reuse else None
        if loader is None:
            sampler = None
            if train:
                sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator())
            workers = self.config.num_workers
            loader = torch.utils.data.DataLoader(
                GuardedDataset(dataset), batch_size=self.config.batch_size, sampler=sampler,
                shuffle=False, num_workers=workers, collate_fn=collate,
                pin_memory=self.device.type == "cuda",
                persistent_workers=workers > 0 and self.config.persistent_workers,
            )
            if reuse:
                self._loaders[key] = loader
        if train:
            loader.sampler.generator.manual_seed(self.sampler_seed(epoch))
        return Batches(loader, self.failures, id(dataset))

    def class_text_features(self) -> torch.Tensor:
        return class_text_features(self.model, self.tokenizer, self.bundle.classnames,
                                   self.bundle.templates, self.device)

    @property
    def param_counts(self) -> tuple[int, int]:
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        if self.head is not None:
            hp = sum(p.numel() for p in self.head.parameters())
            total += hp
            trainable += sum(p.numel() for p in self.head.parameters() if p.requires_grad)
        return total, trainable


def prepare(config: RunConfig, registry, build_optimizer: bool = True) -> PreparedRun:
    res = resolve(config, registry)
    device = pick_device(config.device)
    check_precision(device, config.precision)
    seed_everything(config.seed)
    loaded = load_model(config.model, config.pretrained, device=str(device))
    model = loaded.model
    base_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    deterministic = not getattr(config, "augment", False)
    dctx = DataContext(
        transform_train=loaded.preprocess_val if deterministic else loaded.preprocess_train,
        transform_val=loaded.preprocess_val, seed=config.seed, deterministic_train=deterministic)
    data_spec, data_opts = res.data
    bundle = data_spec.build(data_opts, dctx)
    if len(bundle.train) == 0:
        raise ClipftUsageError(f"data source '{data_spec.name}' produced no training samples")
    loss_spec = res.loss[0]
    if NEED_LABELS in loss_spec.needs and not bundle.has_labels:
        raise ClipftUsageError(
            f"loss '{loss_spec.name}' needs class labels, but data source '{data_spec.name}' has none")
    if NEED_TEXT in loss_spec.needs and not getattr(bundle, "paired_text", True):
        raise ClipftUsageError(
            f"loss '{loss_spec.name}' needs paired text, but data source '{data_spec.name}' has none")
    if res.head is not None and not bundle.has_labels:
        raise ClipftUsageError(
            f"head '{res.head[0].name}' needs class labels, but data source '{data_spec.name}' has none")

    ctx = BuildContext(model=model, model_name=config.model, tokenizer=loaded.tokenizer,
                       device=device, config=config, classnames=bundle.classnames,
                       templates=tuple(bundle.templates), seed=config.seed)
    strategies = [(spec.name, spec.build(opts)) for spec, opts in res.strategies]
    selections = apply_strategies(model, strategies, ctx)
    model.to(device)
    speed = apply_speed_options(model, config)

    head = None
    if res.head is not None:
        head_spec, head_opts = res.head
        head = head_spec.build(head_opts, ctx)
        head.to(device)
    loss = loss_spec.build(res.loss[1])

    default_lr = HEAD_ONLY_LR
    for spec, _ in res.strategies:
        if spec.default_lr is not None:
            default_lr = spec.default_lr
            break
    lr = config.resolved_lr(default_lr)
    warnings = []
    head_trains = head is not None and any(p.requires_grad for p in head.parameters())
    if head_trains and NEED_HEAD not in loss_spec.needs:
        msg = (f"loss '{loss_spec.name}' does not use the head, so head '{res.head[0].name}' "
               "would never train; use --loss cross-entropy to train it")
        if not any(sel.params for sel in selections):
            raise ClipftUsageError(f"nothing would train: {msg}")
        warnings.append(msg + " (it is only evaluated)")
        head.requires_grad_(False)
        head_trains = False
    groups = build_groups(selections, lr, config.weight_decay, head if head_trains else None)
    if not groups:
        raise ClipftUsageError(
            "nothing would train: no strategy selected parameters and there is no head. "
            "Add --strategy (see `clipft plugins`) or --head linear")

    run = PreparedRun(config=config, resolved=res, device=device, model=model,
                      tokenizer=loaded.tokenizer, pretrained=loaded.pretrained, bundle=bundle,
                      ctx=ctx, selections=selections, head=head, loss=loss, groups=groups, lr=lr,
                      base_shapes=base_shapes, speed=speed, warnings=warnings)
    run.features = select_features(run, strategies)
    if build_optimizer:
        batches = math.ceil(len(bundle.train) / config.batch_size)
        run.total_steps = config.epochs * math.ceil(batches / config.grad_accum)
        run.warmup_steps = (config.warmup_steps if config.warmup_steps is not None
                            else default_warmup(run.total_steps))
        run.optimizer = make_optimizer(groups, config)
        run.scheduler = make_scheduler(run.optimizer, run.total_steps, run.warmup_steps, config.schedule)
        run.scaler = grad_scaler(device, config.precision)
    return run


# -- training ---------------------------------------------------------------
def _peak_rss_mb() -> float:
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


def _loss_total(out):
    if isinstance(out, dict):
        if "total" not in out:
            raise ClipftError("a loss returned a dict without a 'total' entry")
        return out["total"], {k: float(v) for k, v in out.items() if k != "total"}
    return out, {}


def train_step_record(run: PreparedRun, batch) -> ForwardRecord:
    need_text = NEED_TEXT in run.resolved.loss[0].needs
    img, txt = run.features.train_batch(run, batch, need_text)
    labels = batch["labels"].to(run.device)
    logits = run.head(img) if run.head is not None else None
    return ForwardRecord(
        image_features=img, text_features=txt,
        logit_scale=logit_scale_of(run.model), logit_bias=logit_bias_of(run.model),
        logits=logits, labels=labels if bool((labels >= 0).all()) else None,
        caption_ids=caption_ids(batch["captions"]).to(run.device),
    )


def clip_gradients(params: list, max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_``, bit for bit, minus one pass over
    every gradient when nothing needs clipping: torch always multiplies by the
    clip coefficient clamped to 1 (checking it would sync a GPU); on the CPU the
    check is free, and a multiply by exactly 1 changes nothing."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    if any(g.device.type != "cpu" for g in grads):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    total = torch.nn.utils.get_total_norm(grads)
    if bool(max_norm / (total + 1e-6) < 1.0):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)


def _optimizer_step(run: PreparedRun, trainable: list) -> None:
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    if run.config.grad_clip > 0:
        clip_gradients(trainable, run.config.grad_clip)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    # CLIP clamps the temperature so that logits stay below 100
    ls = getattr(run.model, "logit_scale", None)
    if isinstance(ls, torch.nn.Parameter) and ls.requires_grad:
        with torch.no_grad():
            ls.clamp_(0, MAX_LOGIT_SCALE)


def set_train_mode(run: PreparedRun) -> None:
    run.model.train()
    freeze_frozen_norm_stats(run.model)
    if run.head is not None:
        run.head.train()


def train(run: PreparedRun, out_dir: Path, progress, start_epoch: int = 0,
          global_step: int = 0, history: Optional[list] = None) -> dict:
    """Train from ``start_epoch`` to ``config.epochs``; returns train stats."""
    cfg = run.config
    history = history if history is not None else []
    metrics_path = out_dir / "metrics.jsonl"
    if start_epoch == 0:
        before = evaluate(run)
        history.append({"epoch": 0, "eval": before})
        rundir.append_jsonl(metrics_path, {"type": "eval", "epoch": 0, **before})
    train_seconds, samples, last_loss = 0.0, 0, float("nan")
    trainable = [p for g in run.groups for _, p in g.params]
    for epoch in range(start_epoch, cfg.epochs):
        set_train_mode(run)
        loader = run.features.train_loader(run, epoch)
        n_batches = len(loader)
        task = progress.start_epoch(epoch + 1, cfg.epochs, n_batches)
        epoch_loss, epoch_batches = 0.0, 0
        t_epoch = time.perf_counter()
        run.optimizer.zero_grad(set_to_none=True)
        pending = 0  # micro-batches whose gradients are not yet applied
        t_last = time.perf_counter()  # step time includes data loading: honest wall time
        for i, batch in enumerate(loader):
            with run.autocast():
                rec = train_step_record(run, batch)
                total, terms = _loss_total(run.loss(rec))
            if not torch.isfinite(total):
                raise ClipftError(f"loss became {float(total)} at epoch {epoch + 1}, step {i + 1}; "
                                  "lower --lr or use --precision fp32")
            scaled = total / cfg.grad_accum
            (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
            pending += 1
            stepped = pending == cfg.grad_accum or i + 1 == n_batches
            if stepped:
                _optimizer_step(run, trainable)
                pending = 0
                global_step += 1
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            bs = len(batch["index"])
            train_seconds += dt
            samples += bs
            last_loss = float(total.detach())
            epoch_loss += last_loss
            epoch_batches += 1
            lr_now = run.optimizer.param_groups[0]["lr"]
            sps = bs / dt if dt > 0 else float("inf")
            progress.advance(task, loss=last_loss, lr=lr_now, sps=sps)
            if stepped and (global_step % cfg.log_every == 0 or i + 1 == n_batches):
                rundir.append_jsonl(metrics_path, {
                    "type": "step", "epoch": epoch + 1, "step": global_step, "loss": last_loss,
                    "lr": lr_now, "samples_per_s": sps, **terms})
        if pending:  # the last batches were dropped as undecodable: apply what we have
            _optimizer_step(run, trainable)
            global_step += 1
        progress.end_epoch(task)
        metrics = evaluate(run)
        entry = {"epoch": epoch + 1, "train_loss": epoch_loss / max(1, epoch_batches),
                 "epoch_seconds": time.perf_counter() - t_epoch, "eval": metrics}
        history.append(entry)
        rundir.append_jsonl(metrics_path, {"type": "eval", "epoch": epoch + 1,
                                           "train_loss": entry["train_loss"], **metrics})
        progress.epoch_metrics(epoch + 1, metrics, entry["train_loss"])
        save_checkpoint(out_dir, run, epoch + 1, global_step, history)
    return {"seconds": train_seconds, "samples": samples, "steps": global_step,
            "final_loss": last_loss, "history": history}


def build_summary(run: PreparedRun, stats: dict, out_dir: Path, prior: Optional[dict] = None) -> dict:
    total, trainable = run.param_counts
    history = stats["history"]
    seconds = stats["seconds"] + (prior or {}).get("seconds", 0.0)
    samples = stats["samples"] + (prior or {}).get("samples", 0)
    summary = {
        "clipft_version": __version__,
        "run_dir": str(out_dir),
        "model": run.config.model,
        "pretrained": run.pretrained,
        "device": str(run.device),
        "precision": run.config.precision,
        "strategies": [{"name": s.name, **options_to_dict(o)} for s, o in run.resolved.strategies],
        "loss": {"name": run.resolved.loss[0].name, **options_to_dict(run.resolved.loss[1])},
        "head": ({"name": run.resolved.head[0].name, **options_to_dict(run.resolved.head[1])}
                 if run.resolved.head else None),
        "data": {
            "name": run.resolved.data[0].name,
            "train_size": len(run.bundle.train),
            "val_size": len(run.bundle.val),
            "classes": len(run.bundle.classnames or []),
            "skipped_images": len(run.bundle.skipped) + run.failures.count,
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
            "steps": stats["steps"],
            "samples": samples,
            "seconds": seconds,
            "samples_per_s": samples / seconds if seconds > 0 else 0.0,
            "peak_rss_mb": _peak_rss_mb(),
            "final_loss": stats["final_loss"],
            "lr": run.lr,
        },
        "eval": {
            "before": history[0]["eval"] if history else {},
            "after": history[-1]["eval"] if history else {},
            "history": history,
        },
    }
    if run.features.stats:
        summary["cache"] = dict(run.features.stats)
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


def execute(config: RunConfig, registry, progress, out_dir: Optional[Path] = None,
            overwrite: bool = False, resume: Optional[Path] = None) -> dict:
    """Run (or resume) a training run; returns the summary dict."""
    if resume is not None:
        out_dir = Path(resume)
    else:
        out_dir = Path(out_dir or config.out or rundir.default_run_dir(config.model, config.strategies))
        rundir.check_out_dir(out_dir, overwrite)
    run = prepare(config, registry)
    prior = None
    start_epoch, global_step, history = 0, 0, []
    if resume is not None:
        state = load_checkpoint(out_dir, run)
        start_epoch, global_step, history = state["epoch"], state["global_step"], state["history"]
        old = json.loads((out_dir / "summary.json").read_text()) if (out_dir / "summary.json").exists() else {}
        prior = {"seconds": old.get("train", {}).get("seconds", 0.0),
                 "samples": old.get("train", {}).get("samples", 0)}
        if start_epoch >= config.epochs:
            raise ClipftUsageError(
                f"the run in {out_dir} already finished {start_epoch} epoch(s); "
                f"pass --epochs N with N > {start_epoch} to continue it")
        rundir.write_atomic(out_dir / "config.toml", config_for_dir(resolved_config(run), out_dir))
    else:
        # everything is validated and built: only now touch the run directory
        rundir.start_run_dir(out_dir, overwrite)
        rundir.write_atomic(out_dir / "config.toml", config_for_dir(resolved_config(run), out_dir))
    progress.announce(run, out_dir)
    stats = train(run, out_dir, progress, start_epoch, global_step, history)
    summary = build_summary(run, stats, out_dir, prior)
    rundir.write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))
    progress.final_table(summary)
    return summary
