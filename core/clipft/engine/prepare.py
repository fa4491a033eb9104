"""Building everything a training run needs, in one pass:
resolve → model → data → strategies + head (:func:`assemble`) → loss →
optimizer groups → features provider → optimizer, schedule, trainer.

:class:`PreparedRun` is the result: a frozen record of built parts, made
once everything is built (the DDP wrapping too); what the build chose (the
optimizer implementation, the trained tensors DDP finds unused) is data in it
(:class:`Training`). Nothing it holds reaches back into it; each part got what
it needs when it was built.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Optional

import attrs
import torch

from clipft.data import DataContext
from clipft.engine.accumulate import LargeBatch, large_batch_applies
from clipft.engine.assemble import Assembly, Resolved, assemble, live_towers, pick_device, resolve, seed_everything
from clipft.engine.cache.plan import plan_cache
from clipft.engine.cache.provider import Where, cached_features
from clipft.engine.cache.store import memory_budget_bytes
from clipft.engine.compose import build_groups, drop_unused, unused_trained
from clipft.engine.evaluate import Evaluator
from clipft.engine.features import Encoders, FrozenImageFeatures, LiveFeatures
from clipft.engine.fit import fit_to_train_split, fitters
from clipft.engine.loaders import Loaders
from clipft.engine.loop import Trainer
from clipft.engine.optim import default_warmup, make_optimizer, make_scheduler
from clipft.engine.perf import (AUTOCAST_DTYPES, apply_speed_options, check_precision, effective_precision,
                                grad_scaler, set_tf32)
from clipft.engine import distributed, fsdp
from clipft.engine.features import _batch
from clipft.errors import ClipftError, ClipftUsageError
from clipft.models import load_model, random_init
from clipft.options import options_to_dict
from clipft.protocols import (AddsLossTerms, InsertedModule, Loss, Strategy, UpdatesPerEpoch, bypass_inserted,
                              inserted_modules)
from clipft.specs import NEED_CLASS_TEXT, NEED_HEAD, NEED_LABELS, NEED_TEXT

HEAD_ONLY_LR = 1e-3
#: the lr when the model starts from random weights and neither --lr nor the
#: strategy says otherwise: the strategies' defaults are for pretrained weights
#: (1e-5 for full) and leave a random model near chance; full fine-tuning of
#: tiny-vit on digits did best at 5e-4 with the contrastive loss and within a
#: few points of its best with cross-entropy, and collapsed at 2e-3
#: (docs/usage.md#learning-rate-warmup-and-collapse)
RANDOM_INIT_LR = 5e-4


def autocast_for(device: torch.device, precision: str):
    """A factory of autocast contexts for the run's precision (fp32: none)."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = AUTOCAST_DTYPES[precision]
    return lambda: torch.autocast(device.type, dtype=dtype)


@attrs.frozen
class Training:
    """What a run trains with, beside the model: built with the optimizer."""

    #: its training forward wrapped in DDP under torchrun
    trainer: Trainer
    #: optimizer steps of the run (of the stage, in a multi-stage run)
    total_steps: int
    warmup_steps: int
    #: the optimizer kernels ``--optimizer-impl`` resolved to
    optimizer_impl: str
    #: trained tensors the loss does not reach (DDP then finds unused parameters)
    unused_trained: int = 0


@attrs.frozen
class PreparedRun:
    config: object            # RunConfig
    resolved: Resolved
    device: torch.device
    assembly: Assembly
    tokenizer: object
    pretrained: str
    bundle: object            # DataBundle
    loss: object
    groups: list
    lr: float
    loaders: Loaders
    features: object          # LiveFeatures or CachedFeatures
    #: () -> metrics; under torchrun, rank 0 evaluates and every rank gets the metrics
    evaluate: object
    autocast: object
    #: None when built without an optimizer (``clipft plan``)
    training: Optional[Training] = None
    #: the precision the run trains at (``auto`` resolved for the device)
    precision: str = "fp32"
    dist: object = None       # distributed.Dist
    #: things the user should know before training starts (printed at start)
    warnings: list = attrs.field(factory=list)
    #: what apply_speed_options did (grad checkpointing, compiled modules)
    speed: dict = attrs.field(factory=dict)
    #: what components fitted to the training split recorded (clipft.engine.fit)
    fit: dict = attrs.field(factory=dict)
    #: where ``lr`` came from ("given (--lr)", "default of strategy 'full'", ...)
    lr_reason: str = ""
    #: a multi-stage run: the index of the stage this run was prepared for
    #: (``resolved.stages[stage]``); 0 for an ordinary run
    stage: int = 0
    #: the selected parameters nothing in training uses, left frozen
    #: (:class:`~clipft.engine.compose.UnusedTrained`), or None
    unused: object = None

    @property
    def stage_spec(self):
        """The :class:`ResolvedStage` this run trains, or None (an ordinary run)."""
        return self.resolved.stages[self.stage] if self.resolved.stages else None

    @property
    def epochs_end(self) -> int:
        """The epoch (of the whole run) at which this stage ends."""
        st = self.stage_spec
        return st.end if st is not None else self.config.epochs

    @property
    def model(self) -> torch.nn.Module:
        return self.assembly.model

    @property
    def head(self) -> Optional[torch.nn.Module]:
        return self.assembly.head

    @property
    def trainer(self) -> Optional[Trainer]:
        return self.training.trainer if self.training else None

    @property
    def optimizer(self):
        return self.trainer.optimizer if self.trainer else None

    @property
    def total_steps(self) -> int:
        return self.training.total_steps if self.training else 0

    @property
    def warmup_steps(self) -> int:
        return self.training.warmup_steps if self.training else 0

    @property
    def optimizer_impl(self) -> Optional[str]:
        return self.training.optimizer_impl if self.training else None

    @property
    def unused_trained(self) -> int:
        return self.training.unused_trained if self.training else 0

    @property
    def param_counts(self) -> tuple[int, int]:
        modules = [self.model] + ([self.head] if self.head is not None else [])
        if isinstance(self.loss, torch.nn.Module):   # a loss with parameters of its own
            modules.append(self.loss)
        params = [p for m in modules for p in m.parameters()]
        return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _check_data(bundle, res: Resolved) -> None:
    data_name, loss_spec = res.data[0].name, res.loss[0]
    if bundle.size("train") is None:
        raise ClipftError(
            f"data source '{data_name}' returned a stream (an IterableDataset) as its train split "
            "without DataBundle.train_length, the samples one epoch yields; the engine needs it "
            "for the number of batches and the schedule")
    if bundle.size("train") == 0:
        raise ClipftUsageError(f"data source '{data_name}' produced no training samples")
    if NEED_LABELS in loss_spec.needs and not bundle.has_labels:
        raise ClipftUsageError(
            f"loss '{loss_spec.name}' needs class labels, but data source '{data_name}' has none")
    if res.head is not None and not bundle.has_labels:
        raise ClipftUsageError(
            f"head '{res.head[0].name}' needs class labels, but data source '{data_name}' has none")
    if NEED_CLASS_TEXT in loss_spec.needs and not bundle.classnames:
        raise ClipftUsageError(
            f"loss '{loss_spec.name}' needs the class prompts' embeddings, but data source '{data_name}' "
            "has no class names")


def _default_lr(res: Resolved, config, strategies=None, stage=None, from_scratch: bool = False) -> tuple:
    """``(lr, why)``: a stage's own lr, else ``--lr``, else the first default
    of the strategies that train, else the head's (1e-3 when only a head
    without one trains); from random
    weights, the first ``default_lr_scratch``, else at least ``RANDOM_INIT_LR``."""
    if stage is not None and stage.lr is not None:
        return float(stage.lr), f"stage '{stage.name}' lr"
    if config.lr is not None:
        return config.lr, "given (--lr)"
    strategies = res.strategies if strategies is None else strategies
    first = next((spec for spec, _ in strategies if spec.default_lr is not None), None)
    head = res.head[0] if res.head else None
    if first is not None:
        lr, why = first.default_lr, f"default of strategy '{first.name}'"
    elif head is not None and head.default_lr is not None:
        lr, why = head.default_lr, f"default of head '{head.name}'"
    else:
        lr, why = HEAD_ONLY_LR, "head-only default"
    if not from_scratch:
        return lr, why
    scratch = next((spec for spec, _ in strategies if getattr(spec, "default_lr_scratch", None) is not None), None)
    if scratch is not None:
        return (scratch.default_lr_scratch,
                f"default of strategy '{scratch.name}' for random init (--pretrained none)")
    if lr >= RANDOM_INIT_LR:
        return lr, why
    return RANDOM_INIT_LR, (f"default for random init (--pretrained none); {why} is {lr:g}, "
                            "meant for pretrained weights")


def build_features(config, res: Resolved, assembly: Assembly, tokenizer, device, bundle, loaders, autocast,
                   precision: str = "fp32", distributed: bool = False):
    enc = Encoders(assembly.model, tokenizer, device, bundle.classnames, bundle.templates,
                   trim_text=bool(config.trim_text))
    if not config.cache or distributed:   # the cache replays one process's epoch order
        return LiveFeatures(enc, loaders, autocast)
    plan = plan_cache(assembly.model, live_towers(assembly))
    if not plan.anything:
        return LiveFeatures(enc, loaders, autocast)
    spec, opts = res.data
    where = Where(directory=Path(config.cache_dir).expanduser() if config.cache_dir else None,
                  memory_budget=memory_budget_bytes(), base={
                      "model": config.model, "data": {"source": spec.name, "options": options_to_dict(opts)},
                      "precision": precision, "device": device.type})
    return cached_features(enc, loaders, autocast, plan, where, augment=bool(config.augment))


def build_loss(spec, options, ctx, device):
    """The run's loss: built, set up on the assembled model (:class:`clipft.Loss`)
    and, when it is a module, moved to the device."""

    loss = spec.build(options)
    if isinstance(loss, Loss):
        loss.setup(ctx)
    if isinstance(loss, torch.nn.Module):
        loss.to(device)
    return loss


def prepare(config, registry, build_optimizer: bool = True, fit: Optional[bool] = None, stage: int = 0,
            resolved: Optional[Resolved] = None) -> PreparedRun:
    """Everything a training run needs. ``fit``: fit the components that fit
    themselves to the training split (:mod:`clipft.engine.fit`); default: when
    the optimizer is built. For a multi-stage run, for stage ``stage``: the
    strategies of the earlier stages are applied first (in order), then this
    stage's, which decide what trains; the groups, the optimizer and schedule
    (over this stage's epochs) and the cache plan are this stage's. The weights
    earlier stages trained are loaded by the caller (:mod:`clipft.engine.session`),
    from the checkpoint that ended them."""
    res = resolved if resolved is not None else resolve(config, registry)
    st = res.stages[stage] if res.stages else None
    where = f"stage '{st.name}': " if st is not None else ""
    dist = distributed.from_env(config.device, config.collective_timeout)
    device = distributed.device_for(dist, config.device) or pick_device(config.device)
    precision = effective_precision(device, config.precision)
    check_precision(device, precision)
    set_tf32(device, precision, config.tf32)
    seed_everything(config.seed)     # every rank builds the same model (DDP checks it too)
    loaded = load_model(config.model, config.pretrained, device=str(device))

    deterministic = not config.augment
    dctx = DataContext(
        transform_train=loaded.preprocess_val if deterministic else loaded.preprocess_train,
        transform_val=loaded.preprocess_val, seed=config.seed, deterministic_train=deterministic,
        num_workers=config.num_workers)
    bundle = res.data[0].build(res.data[1], dctx)
    _check_data(bundle, res)

    strategies, before = res.stage_strategies(stage)
    assembly = assemble(loaded.model, model_name=config.model, tokenizer=loaded.tokenizer,
                        device=device, strategies=strategies, head=res.head,
                        classnames=bundle.classnames, templates=bundle.templates, seed=config.seed,
                        loss=res.loss, before=before)
    speed = apply_speed_options(assembly.model, config)
    loss_spec = res.loss[0]
    loss = build_loss(loss_spec, res.loss[1], assembly.ctx, device)

    warnings = list(bundle.warnings)   # the data source's notes come first, as its data does
    head = assembly.head
    if head is not None and st is not None and not st.head:
        head.requires_grad_(False)          # this stage keeps the head as it is
    head_trains = head is not None and any(p.requires_grad for p in head.parameters())
    training = config.epochs > 0   # --epochs 0 evaluates the model as built: nothing need train
    if head_trains and NEED_HEAD not in loss_spec.needs:
        msg = (f"loss '{loss_spec.name}' does not use the head, so head '{res.head[0].name}' "
               "would never train; use --loss cross-entropy to train it")
        if not any(sel.params for sel in assembly.selections) and training:
            raise ClipftUsageError(f"{where}nothing would train: {msg}")
        warnings.append(msg + " (it is only evaluated)")
        head.requires_grad_(False)
        head_trains = False
    # one decision, from the specs, for plan and run alike (stage by stage)
    unused = unused_trained(assembly.model, loss_spec, res.head[0] if res.head else None,
                            [s.name for s, _ in strategies], staged=st is not None)
    selections = drop_unused(assembly.model, assembly.selections, unused)
    lr, lr_reason = _default_lr(res, config, strategies, st, random_init(config.model, loaded.pretrained))
    groups = build_groups(selections, lr, config.weight_decay, head if head_trains else None, loss)
    if unused is not None and training:
        if not groups:
            raise ClipftUsageError(f"{where}nothing would train: {unused.message()}")
        warnings.append(where + unused.message())
    if training and groups and all(g.lr == 0 for g in groups):
        warnings.append(f"{where}the learning rate is 0: training runs, but no weight will change")
    if not groups and training:
        if st is not None:
            raise ClipftUsageError(
                f"{where}nothing would train: the stage selects no parameters"
                f"{' and the run has no head' if head is None else ''}; "
                + ("add --head linear (or zero-shot)" if head is None else "give the stage a strategy"))
        what = (f"head '{res.head[0].name}' has nothing to train" if head is not None
                else "there is no head")
        raise ClipftUsageError(
            f"nothing would train: no strategy selected parameters and {what}. "
            "Add --strategy (see `clipft plugins`) or --head linear, or pass --epochs 0 to evaluate "
            "the model as built")

    autocast = autocast_for(device, precision)
    loaders = Loaders(bundle, batch_size=config.batch_size, seed=config.seed, device=device,
                      num_workers=config.num_workers, persistent_workers=config.persistent_workers, dist=dist,
                      drop_last=config.resolved_drop_last(loss_spec))
    if dist.enabled and config.cache:
        warnings.append(f"frozen-tower caching is off with {dist.world} processes (each rank would "
                        "replay another order); frozen towers run live")
    if loaders.drop_last_waived and training:
        warnings.append(f"the training split is smaller than one batch ({config.batch_size * dist.world}), so "
                        "its last incomplete batch is kept (--drop-last would leave nothing to train on)")
    if dist.enabled and loaders.dropped_per_epoch and not loaders.drop_last:
        warnings.append(f"{loaders.dropped_per_epoch} training sample(s) per epoch do not divide among "
                        f"{dist.world} ranks and are left out of each epoch")
    features = build_features(config, res, assembly, loaded.tokenizer, device, bundle, loaders, autocast,
                              precision, dist.enabled)
    evaluator = Evaluator(assembly.model, head, features, autocast,
                          has_classes=bool(bundle.classnames), has_captions=bundle.has_captions)
    if dist.enabled and fitters(assembly.model, head):
        # each rank sees its share of the train split, so their caches would differ
        names = ", ".join(n for n, _ in fitters(assembly.model, head))
        raise ClipftUsageError(f"{names} fits itself to the training features, which a run on "
                               f"{dist.world} processes splits among them; train it on one process")
    fitted = {}
    if build_optimizer if fit is None else fit:
        # components built from the training features (Tip-Adapter's cache); a
        # resume passes fit=False: the fitted tensors come back from the checkpoint
        fitted = fit_to_train_split(assembly.model, head, features, bundle.classnames)
    if config.parallel == "fsdp" and not dist.enabled and training:
        warnings.append("--parallel fsdp with one process: nothing to shard, the run trains as usual")
    training, sharding = None, None
    if build_optimizer and dist.enabled and config.parallel == "fsdp":
        groups, sharding = shard_model(assembly, groups, head, loss, precision, dist)
    if build_optimizer:
        training = build_training(config, st, groups, assembly, head, loss, features, loaders, autocast,
                             device, precision, dist, NEED_TEXT in loss_spec.needs,
                             NEED_CLASS_TEXT in loss_spec.needs and bool(bundle.classnames),
                             loss_spec.batch_coupled, sharding)
        if sharding is not None:   # a forward needs every rank's shards
            evaluator = distributed.on_every(evaluator, dist)
        elif dist.enabled:
            evaluator = distributed.on_main(evaluator, dist)
    return PreparedRun(config=config, resolved=res, device=device, assembly=assembly,
                       tokenizer=loaded.tokenizer, pretrained=loaded.pretrained, bundle=bundle,
                       loss=loss, groups=groups, lr=lr, lr_reason=lr_reason, loaders=loaders, features=features,
                       evaluate=evaluator, autocast=autocast, warnings=warnings, speed=speed,
                       precision=precision, dist=dist, stage=stage, fit=fitted, training=training,
                       unused=unused)


def build_training(config, st, groups, assembly, head, loss, features, loaders, autocast, device,
                   precision, dist, needs_text: bool, needs_class_text: bool = False,
                   batch_coupled: bool = False, sharding=None) -> Training:
    """The optimizer, schedule and trainer of a run (over stage ``st``'s epochs,
    or the run's), its training forward wrapped in DDP under torchrun; with
    ``--grad-accum`` > 1 under a batch-coupled loss, large-batch accumulation."""
    steps_per_epoch = math.ceil(loaders.n_train_batches() / config.grad_accum)
    total_steps = (st.epochs if st is not None else config.epochs) * steps_per_epoch
    warmup_steps = config.warmup_steps if config.warmup_steps is not None else default_warmup(total_steps)
    optimizer, impl = make_optimizer(groups, config)
    regs = regularisers(assembly)
    frozen = frozen_image_provider(config, assembly, features, loaders)
    if frozen is not None and sharding is not None:
        # its fill pass forwards the sharded model outside the trainer's lockstep (untested under FSDP)
        raise ClipftUsageError("a strategy that reads the frozen model's image features (promptsrc) "
                               "does not run under --parallel fsdp yet; use --parallel ddp")
    trainer = Trainer(
        model=assembly.model, head=head, loss=loss, features=features, optimizer=optimizer,
        scheduler=make_scheduler(optimizer, total_steps, warmup_steps, config.schedule),
        scaler=grad_scaler(device, precision),
        params=[p for g in groups for _, p in g.params], autocast=autocast, device=device,
        needs_text=needs_text, grad_accum=config.grad_accum,
        grad_clip=config.grad_clip, skip_nonfinite=config.skip_nonfinite, dist=dist,
        inserted=[m for _, m in inserted_modules(assembly.model)], failures=loaders.failures,
        loss_name=assembly.ctx.loss or "?", loss_needs=assembly.ctx.loss_needs,
        regularisers=regs, epoch_updaters=epoch_updaters(head), needs_class_text=needs_class_text,
        frozen_image=frozen,
        # the large-batch record has no pixels: a step computing frozen features per batch accumulates plainly
        large=LargeBatch() if large_batch_applies(batch_coupled, config.grad_accum,
                                                  needs_class_text or frozen is not None) else None,
        sharding=sharding)
    unused = 0
    if dist.enabled and sharding is None:
        forward, unused = wrap_ddp(trainer, loaders, head)
        trainer = attrs.evolve(trainer, forward=forward)
    return Training(trainer, total_steps, warmup_steps, impl, unused)


def frozen_image_provider(config, assembly: Assembly, features, loaders) -> Optional[FrozenImageFeatures]:
    """What fills ``ForwardRecord.frozen_image_features`` when a strategy of the
    stage asks (``Strategy.frozen_image_features``), else None. Every inserted
    ``layer``/``hook`` module must support ``bypass`` (a usage error now, not at
    the first step)."""
    from clipft.data import is_iterable

    if not any(s.frozen_image_features for _, s in assembly.strategies):
        return None
    bypass_inserted(assembly.model)()
    cache = not config.augment and not is_iterable(loaders.bundle.train)
    return FrozenImageFeatures(features.enc, loaders, cache)


def shard_model(assembly: Assembly, groups: list, head, loss, precision: str, dist) -> tuple:
    """``--parallel fsdp``: shard the model (:func:`clipft.engine.fsdp.shard`)
    and return ``(groups, sharding)``, the groups over the sharded parameters
    (FSDP replaces each parameter it shards). The replaced parameters' storage
    is released: what still refers to them (a strategy's selection) would
    otherwise keep a whole copy of the model on every rank."""
    fsdp.check_supported(precision)
    before = dict(assembly.model.named_parameters())
    in_model = {id(p) for p in before.values()}
    extra = [p for g in groups for _, p in g.params if id(p) not in in_model]   # the head's, the loss's
    sharding = fsdp.shard(assembly.model, precision, dist.world, trained_extra=extra)
    after = dict(assembly.model.named_parameters())
    renamed = {id(p): after.get(n, p) for n, p in before.items()}
    groups = [attrs.evolve(g, params=[(n, renamed.get(id(p), p)) for n, p in g.params]) for g in groups]
    assembly.selections = [attrs.evolve(sel, params=[(n, renamed.get(id(p), p)) for n, p in sel.params])
                           for sel in assembly.selections]
    for n, p in before.items():
        if after.get(n) is not p:
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    return groups, sharding


def regularisers(assembly: Assembly) -> list:
    """``[(who, source)]`` whose ``loss_terms`` add to the loss, among those
    that override the default: the strategies of the stage being trained (an
    earlier stage's penalty was about what that stage trained), then every
    inserted module of the model, then the head while it trains
    (:class:`clipft.protocols.AddsLossTerms`)."""
    out = [(f"strategy '{name}'", s) for name, s in assembly.strategies
           if type(s).loss_terms is not Strategy.loss_terms]
    out += [(f"inserted module '{name}' ({type(m).__name__})", m) for name, m in inserted_modules(assembly.model)
            if type(m).loss_terms is not InsertedModule.loss_terms]
    head = assembly.head
    if isinstance(head, AddsLossTerms) and any(p.requires_grad for p in head.parameters()):
        out.append((f"head ({type(head).__name__})", head))
    return out


def epoch_updaters(head) -> list:
    """The head, when it updates itself at every epoch's end
    (:class:`clipft.protocols.UpdatesPerEpoch`) and trains in this stage."""
    if isinstance(head, UpdatesPerEpoch) and any(p.requires_grad for p in head.parameters()):
        return [head]
    return []


def wrap_ddp(trainer: Trainer, loaders: Loaders, head) -> tuple[torch.nn.Module, int]:
    """``(forward, unused)``: the training forward in DistributedDataParallel,
    over the trained parameters only (:class:`~clipft.engine.distributed.TrainForward`);
    buffers are not broadcast (frozen, identical on every rank), and
    ``find_unused_parameters`` is on only when the first batch's graph leaves
    ``unused`` trained parameters out (a text tower that trains under a loss
    that never encodes text, say). The probe runs in eval mode with the RNG
    kept, so training draws exactly what it would have."""
    fwd = distributed.TrainForward(trainer.model, head, trainer.features, trainer.needs_text, trainer.params,
                                   trainer.needs_class_text)
    unused = []
    with distributed.rng_kept():
        first = next(iter(loaders.train(0)), None)
        if first is not None:
            modules = [m for m in (trainer.model, head) if m is not None]
            for m in modules:
                m.eval()
            batch = _batch(first)
            with trainer.autocast():
                img, txt, logits, cls = fwd(batch)
                record = trainer.record_from(batch, img, txt, logits, cls, gather=False)
                # the regularisers' terms count: a parameter only they reach is used
                loss = trainer.regularised(record, *trainer.loss_of(record))[0]
            unused = distributed.unused_trained_params(loss, trainer.params)
            del loss, img, txt, logits, cls, record
    dev = trainer.device
    with distributed.quiet_deprecations():
        ddp = torch.nn.parallel.DistributedDataParallel(
            fwd, device_ids=[dev.index] if dev.type == "cuda" else None, broadcast_buffers=False,
            find_unused_parameters=bool(unused))
    return ddp, len(unused)
