"""The training loop: micro-batches, gradient accumulation, the optimizer step
and the logit-scale clamp. It logs nothing itself: it fires the events of
:mod:`clipft.callbacks` that callbacks (progress, ``metrics.jsonl``,
checkpoints, plugins) turn into output."""
from __future__ import annotations

import contextlib
import linecache
import math
import time
import traceback
from typing import Callable, Optional

import attrs
import torch

from clipft.callbacks import EpochView, EvalView, StepView
from clipft.encode import captured_class_text
from clipft.engine.compose import freeze_frozen_norm_stats
from clipft.errors import ClipftError
from clipft.record import ForwardRecord, caption_ids
from clipft.specs import NEED_CLASS_TEXT, NEED_HEAD, NEED_LABELS, NEED_TEXT

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the temperature so logits stay below 100


@attrs.define
class LoopState:
    """Where training is: what a checkpoint saves and a resume restores."""

    epoch: int = 0        # completed epochs
    step: int = 0         # optimizer steps
    samples: int = 0
    seconds: float = 0.0
    last_loss: float = float("nan")
    history: list = attrs.field(factory=list)
    #: within the current epoch: micro-batches done, and the sums behind its mean loss
    batch: int = 0
    epoch_loss: float = 0.0
    epoch_seen: int = 0
    epoch_seconds: float = 0.0
    #: optimizer steps skipped because their loss was not finite (--skip-nonfinite)
    skipped_nonfinite: int = 0
    #: processes the run trains on (a resume must use as many)
    world_size: int = 1
    #: what components fitted to the training split recorded (summary.json's ``fit``)
    fit: dict = attrs.field(factory=dict)
    #: a multi-stage run: the stage being trained (index), and one record per
    #: stage started so far (name, epochs, lr, what trained), for summary.json
    stage: int = 0
    stages: list = attrs.field(factory=list)
    #: optimizer step of the newest evaluation (-1: none yet), so the run's end
    #: knows whether its last evaluation saw the final weights
    last_eval_step: int = -1
    #: ``--keep-best``: the best evaluation so far (metric, value, step, epoch, batch)
    best: Optional[dict] = None
    #: set while the callbacks hear of a step after which an evaluation follows
    #: (the checkpoint of that step waits for it, so a resume does not skip it)
    eval_due: bool = attrs.field(default=False, repr=False)
    #: why a callback ended the run early (summary.json's ``stopped_early``), or None
    stopped_early: Optional[dict] = None
    #: callbacks' saved states (``{name: state_dict()}``) a resume restores
    callback_states: dict = attrs.field(factory=dict, repr=False)
    #: set by a resume: restores the RNG states at the point the checkpoint was
    #: taken (after the epoch's data iterator was created, for a mid-epoch one)
    restore_rng: Optional[Callable] = attrs.field(default=None, repr=False)

    def counters(self) -> dict:
        return {k: getattr(self, k) for k in ("epoch", "step", "samples", "seconds", "last_loss",
                                               "batch", "epoch_loss", "epoch_seen", "epoch_seconds",
                                               "skipped_nonfinite", "world_size", "fit", "stage", "stages",
                                               "last_eval_step", "best", "stopped_early")}


class EndTraining(Exception):
    """Raised by the loop after the optimizer step or evaluation after which a
    callback asked the run to end (``RunView.request_stop``): the run ends
    normally, its state consistent and checkpointable."""

    def __init__(self, state: "LoopState", reason: str):
        super().__init__(reason)
        self.state, self.reason = state, reason


class EvalSchedule:
    """``--eval-every``: whether an evaluation is due after an optimizer step
    within an epoch (every N steps, or N minutes after the last one)."""

    def __init__(self, every: tuple = ("epoch", 0)):
        self.kind, self.n = every
        self.t_last = time.monotonic()

    def due(self, step: int) -> bool:
        if self.kind == "steps":
            return step % self.n == 0
        if self.kind == "minutes":
            return time.monotonic() - self.t_last >= 60.0 * self.n
        return False

    def done(self) -> None:
        self.t_last = time.monotonic()


class StopTraining(Exception):
    """Raised by the loop after the optimizer step during which a stop was
    requested (SIGTERM, Ctrl-C); the state is consistent and checkpointable."""

    def __init__(self, state: "LoopState", reason: str):
        super().__init__(reason)
        self.state, self.reason = state, reason


def clip_gradients(params: list, max_norm: float) -> Optional[float]:
    """``torch.nn.utils.clip_grad_norm_``, bit for bit, minus one pass over
    every gradient when nothing needs clipping: torch always multiplies by the
    clip coefficient clamped to 1 (checking it would sync a GPU); on the CPU the
    check is free, and a multiply by exactly 1 changes nothing. Returns the
    pre-clip norm when it clipped."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    if any(type(g).__name__ == "DTensor" for g in grads):   # --parallel fsdp: shards of gradients
        return clip_sharded(grads, max_norm)
    if any(g.device.type != "cpu" for g in grads):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return None
    total = torch.nn.utils.get_total_norm(grads)
    if bool(max_norm / (total + 1e-6) < 1.0):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return float(total)
    return None


def clip_sharded(grads: list, max_norm: float) -> Optional[float]:
    """:func:`clip_gradients` over gradients some of which are FSDP shards: each
    shard's norm is completed over the ranks (a collective, every rank alike)
    before the norms are combined, as ``clip_grad_norm_`` would on whole tensors."""
    norms = []
    for g in grads:
        n = torch.linalg.vector_norm(g.detach(), 2.0, dtype=torch.float32)
        norms.append(n.full_tensor() if type(n).__name__ == "DTensor" else n)
    total = float(torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2.0))
    coef = max_norm / (total + 1e-6)
    if coef >= 1.0:
        return None
    for g in grads:
        g.mul_(coef)
    return total


#: the ForwardRecord fields that are None unless the loss declares the need
#: (``LossSpec.needs``) that fills them
FIELD_NEEDS = {"text_features": NEED_TEXT, "labels": NEED_LABELS, "logits": NEED_HEAD,
               "class_text_features": NEED_CLASS_TEXT}


def loss_total(out, name: str = "?"):
    """``(total, terms)`` of what loss ``name`` returned: a tensor, or a dict
    with the tensor under ``total`` and other terms to log."""
    if isinstance(out, dict):
        if "total" not in out:
            raise ClipftError(
                f"loss '{name}' returned a dict without a 'total' entry (its keys: "
                f"{', '.join(repr(k) for k in out) or 'none'}); put the value to minimise under 'total'")
        return out["total"], {k: float(v.detach() if hasattr(v, "detach") else v) for k, v in out.items() if k != "total"}
    return out, {}


def call_loss(loss, record: ForwardRecord, name: str = "?", needs=frozenset()) -> tuple:
    """``(total, terms)`` of ``loss(record)``. A loss that reads a record field
    it did not declare in ``LossSpec.needs`` finds None there and fails deep in
    its own code; that failure is reported naming the loss, the field and the need."""
    try:
        out = loss(record)
    except (AttributeError, TypeError) as exc:
        unset = [(f, n) for f, n in FIELD_NEEDS.items() if n not in needs and getattr(record, f) is None]
        if not unset or "NoneType" not in str(exc):
            raise
        read = _named_in_traceback(exc, unset)
        fields = " or ".join(f"ForwardRecord.{f}" for f, _ in read or unset)
        declare = " / ".join(repr(n) for _, n in read or unset)
        raise ClipftError(
            f"loss '{name}' failed ({type(exc).__name__}: {exc}): "
            + (f"it reads {fields}, which is None unless the loss declares it; add {declare} to its "
               if read else f"if it reads {fields} (None unless the loss declares it), add {declare} to its ")
            + "LossSpec(needs=...)") from exc
    return loss_total(out, name)


def _named_in_traceback(exc: BaseException, fields: list) -> list:
    """The ``(field, need)`` of ``fields`` named on the source lines of ``exc``'s traceback."""
    lines = " ".join(linecache.getline(frame.f_code.co_filename, line)
                     for frame, line in traceback.walk_tb(exc.__traceback__))
    return [f for f in fields if f[0] in lines]


def train_forward(features, head, batch, needs_text: bool, needs_class_text: bool = False, replay=None) -> tuple:
    """The forward of one training batch: ``(image_features, text_features,
    logits, class_text_features)`` from the features provider and the head
    (None for what is not computed; the class text is what the forward encoded
    anyway, or, when ``needs_class_text``, encoded here). One process calls it
    directly; with several, DDP calls it through
    :class:`~clipft.engine.distributed.TrainForward`, so the class text is one
    of the outputs DDP sees.

    ``replay`` (large-batch accumulation, :mod:`clipft.engine.accumulate`) runs
    each side through ``replay.side(name, compute)``, which records or replays
    its RNG state, or gives its first-pass value; the class text is then None
    (large-batch mode is not used when the loss needs it), and with
    ``replay.carry`` the result has a fifth entry, views of those parameters
    (so DDP sees them used)."""
    if replay is None:
        with captured_class_text() as cls:
            img, txt = features.train_features(batch, needs_text)
            logits = head(img) if head is not None else None
            if needs_class_text and not cls:
                features.train_class_features()
        return img, txt, logits, (cls[0] if cls else None)
    img = replay.side("image", lambda: features.image_features(batch))
    txt = replay.side("text", lambda: features.paired_text(batch, img)) if needs_text else None
    logits = replay.side("head", lambda: head(img)) if head is not None else None
    if replay.carry:
        return img, txt, logits, None, tuple(p.view_as(p) for p in replay.carry)
    return img, txt, logits, None


@attrs.define
class Trainer:
    """Everything one optimizer step needs, handed over when it is built."""

    model: torch.nn.Module
    head: Optional[torch.nn.Module]
    loss: object
    features: object          # a provider from clipft.engine.features
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object            # torch.amp.GradScaler for fp16, else None
    params: list              # the trainable parameters
    autocast: object          # () -> context manager
    device: torch.device
    needs_text: bool
    grad_accum: int = 1
    grad_clip: float = 0.0
    #: optimizer steps with a non-finite loss that may be skipped before the run stops
    skip_nonfinite: int = 0
    #: the training forward (``distributed.TrainForward``), wrapped in DDP when
    #: the run has several processes; None: call the features provider directly
    forward: Optional[torch.nn.Module] = None
    dist: object = None       # distributed.Dist; None: one process
    #: large-batch accumulation (``clipft.engine.accumulate.LargeBatch``): set
    #: when ``grad_accum`` > 1 under a batch-coupled loss, which the loop then
    #: computes over the whole group of micro-batches; None: plain accumulation
    large: object = None
    #: ``--parallel fsdp``: the model's sharding (``clipft.engine.fsdp.Sharding``);
    #: None under DDP or in one process
    sharding: object = None

    def outputs(self, batch, replay=None) -> tuple:
        """The training forward with grad, through DDP when it wraps it."""
        if self.forward is not None:
            return self.forward(batch, replay)
        return train_forward(self.features, self.head, batch, self.needs_text, self.needs_class_text, replay)

    @property
    def ddp(self) -> bool:
        return isinstance(self.forward, torch.nn.parallel.DistributedDataParallel)

    def sync(self, will_step: bool):
        """DDP reduces gradients only on the micro-batch that steps (``no_sync``
        on the others); nothing to do in one process. FSDP reduce-scatters on
        every micro-batch: gradients then accumulate sharded (skipping the sync
        would keep a whole unsharded gradient on every rank)."""
        if self.ddp and not will_step:
            return self.forward.no_sync()
        return contextlib.nullcontext()
    #: the model's inserted modules (clipft.InsertedModule), told of every optimizer step
    inserted: list = attrs.field(factory=list)
    #: the loaders' DecodeFailures: what an epoch that trained on nothing reports
    failures: object = None
    #: the loss's registered name and its ``LossSpec.needs``, for its errors
    loss_name: str = "?"
    loss_needs: frozenset = frozenset()

    def loss_of(self, record: ForwardRecord) -> tuple:
        """``(total, terms)`` of the loss on ``record``."""
        return call_loss(self.loss, record, self.loss_name, self.loss_needs)

    #: ``[(who, source)]``: the strategies and inserted modules whose
    #: ``loss_terms(record)`` add to every step's loss
    regularisers: list = attrs.field(factory=list)
    #: the loss needs ``class-text``: the forward encodes the class prompts if nothing else does
    needs_class_text: bool = False
    #: components told of every epoch's end (clipft.UpdatesPerEpoch: the head while it trains)
    epoch_updaters: list = attrs.field(factory=list)

    #: ``Strategy.frozen_image_features``: a features.FrozenImageFeatures filling
    #: ``ForwardRecord.frozen_image_features``; None: the field stays None
    frozen_image: object = None

    def after_step(self, step: int) -> None:
        """After optimizer step ``step`` (1-based): the inserted modules' hook."""
        for module in self.inserted:
            module.after_optimizer_step(step)

    def end_epoch(self, epoch: int, epochs: int) -> None:
        """After training epoch ``epoch`` (1-based) of ``epochs``, before its evaluation and
        checkpoint: the inserted modules' ``after_epoch``, then the updating heads' ``end_epoch``."""
        for module in self.inserted:
            module.after_epoch(epoch, epochs)
        if self.epoch_updaters:
            with torch.no_grad():
                for component in self.epoch_updaters:
                    component.end_epoch(epoch)

    def set_train_mode(self) -> None:
        self.model.train()
        freeze_frozen_norm_stats(self.model)
        if self.head is not None:
            self.head.train()
        if isinstance(self.loss, torch.nn.Module):
            self.loss.train()

    def record(self, batch) -> ForwardRecord:
        if self.forward is not None:
            img, txt, logits, cls = self.forward(batch)
        else:
            img, txt, logits, cls = train_forward(self.features, self.head, batch, self.needs_text,
                                                  self.needs_class_text)
        return self.record_from(batch, img, txt, logits, cls)

    def regularised(self, record: ForwardRecord, total, terms: dict) -> tuple:
        """``(total, terms)`` with the regularisers' ``loss_terms(record)``
        added: each term to the total, and its value to the logged terms as
        ``reg.<name>`` (same-named terms of several sources, the inserted
        layers of one adapter say, add up)."""
        reg: dict = {}
        for who, source in self.regularisers:
            for name, value in (source.loss_terms(record) or {}).items():
                if not isinstance(value, torch.Tensor) or value.numel() != 1:
                    got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ClipftError(f"{who}: loss_terms() returned {name!r} as {got}; "
                                      "each term must be a scalar tensor")
                key = f"reg.{name}"
                reg[key] = reg[key] + value.reshape(()) if key in reg else value.reshape(())
        if not reg:
            return total, terms
        for value in reg.values():
            total = total + value
        return total, {**terms, **{k: float(v.detach()) for k, v in reg.items()}}

    def record_from(self, batch, img, txt, logits, cls=None, gather: bool = True) -> ForwardRecord:
        labels = batch.labels.to(self.device)
        ls = getattr(self.model, "logit_scale", None)
        dist = self.dist
        return ForwardRecord(
            image_features=img, text_features=txt,
            logit_scale=ls.exp() if ls is not None else None,
            logit_bias=getattr(self.model, "logit_bias", None),
            logits=logits,
            labels=labels if batch.labelled else None,
            caption_ids=caption_ids(batch.captions).to(self.device),
            rank=dist.rank if dist else 0, world_size=dist.world if dist else 1,
            gather=dist.gather if gather and dist is not None and dist.enabled else None,
            class_text_features=cls,
            frozen_image_features=self.frozen_image(batch) if self.frozen_image is not None else None,
        )

    def reduce_unsynced_grads(self) -> None:
        """Average gradients that ``no_sync`` left local (an epoch whose last
        micro-batches failed to decode ends between two syncs)."""
        if not self.ddp:
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad /= self.dist.world

    def reduce_step(self, loss: float, samples: int) -> tuple[float, int]:
        """The step's loss averaged over the ranks and its samples summed (one
        collective); as given in one process."""
        if self.dist is None or not self.dist.enabled:
            return loss, samples
        t = torch.tensor([loss, float(samples)], dtype=torch.float64)
        if torch.distributed.get_backend() == "nccl":
            t = t.to(self.device)
        torch.distributed.all_reduce(t)
        return float(t[0]) / self.dist.world, int(round(float(t[1])))

    def stop_agreed(self, reason: Optional[str]) -> Optional[str]:
        """A stop request on any rank stops every rank after the same step."""
        if self.dist is None or not self.dist.enabled:
            return reason
        if self.dist.any(bool(reason)):
            return reason or "stop requested on another rank"
        return None

    def stops_agreed(self, signal: Optional[str], end: Optional[str]) -> tuple:
        """``(signal, end)`` as :meth:`stop_agreed` agrees each, in one collective:
        a signal (interrupt) and a callback's request to end the run normally."""
        if self.dist is None or not self.dist.enabled:
            return signal, end
        t = torch.tensor([int(bool(signal)), int(bool(end))], dtype=torch.int64)
        if torch.distributed.get_backend() == "nccl":
            t = t.to(self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return ((signal or "stop requested on another rank") if int(t[0]) else None,
                (end or "the run was asked to end on another rank") if int(t[1]) else None)

    def optimizer_step(self) -> Optional[float]:
        if self.sharding is not None:
            self.sharding.reduce_replicated()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = clip_gradients(self.params, self.grad_clip) if self.grad_clip > 0 else None
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        ls = getattr(self.model, "logit_scale", None)
        if isinstance(ls, torch.nn.Parameter) and ls.requires_grad:
            with torch.no_grad():
                ls.clamp_(0, MAX_LOGIT_SCALE)
        return norm


def _restore_rng(state: LoopState) -> None:
    if state.restore_rng is not None:
        state.restore_rng()
        state.restore_rng = None


def nothing_trained(epoch: int, failures) -> str:
    """The error of an epoch that yielded no usable sample: a run that trains on
    nothing has failed, whatever it would write."""
    why = failures.describe() if failures is not None and (failures.count or failures.parts) else (
        "the training data yielded no samples")
    return f"epoch {epoch} trained on no samples: {why}; check the data (nothing was saved from this epoch)"


def train(t: Trainer, epochs: int, state: LoopState, evaluate, events,
          stop_requested: Callable[[], Optional[str]] = lambda: None,
          total_epochs: Optional[int] = None,
          end_requested: Callable[[], Optional[str]] = lambda: None,
          schedule: Optional[EvalSchedule] = None) -> LoopState:
    """Train from ``state`` (an epoch boundary, or part-way into an epoch after a
    resume) to ``epochs``, evaluating before the first epoch and after each one.
    ``events.fire(name, ...)`` receives every event; ``stop_requested()``, checked
    after each optimizer step, ends training with :class:`StopTraining`.
    ``total_epochs`` (default ``epochs``) is the run's length the events report:
    a stage of a multi-stage run trains up to its own end, ``epochs``.
    ``schedule`` adds evaluations within epochs; ``end_requested()``, checked
    after each step and evaluation, ends training normally with
    :class:`EndTraining`."""
    total_epochs = epochs if total_epochs is None else total_epochs
    schedule = schedule or EvalSchedule()
    if state.epoch == 0 and not state.history:
        before = evaluate()
        state.history.append({"epoch": 0, "eval": before})
        state.last_eval_step = state.step
        events.fire("on_eval", EvalView(0, before, step=state.step))
        schedule.done()
    n_batches = t.features.n_train_batches()

    def skip_nonfinite(value: float, epoch: int, i: int) -> None:
        """Drop the optimizer step micro-batch ``i`` belongs to, or stop the run."""
        if state.skipped_nonfinite >= t.skip_nonfinite:
            skipped = (f" (after skipping {state.skipped_nonfinite} such steps)"
                       if state.skipped_nonfinite else "")
            raise ClipftError(
                f"loss became {value} at epoch {epoch + 1}, batch {i + 1}{skipped}; "
                "lower --lr, use --precision fp32, or --skip-nonfinite N to skip such steps "
                "(the last checkpoint is intact)")
        state.skipped_nonfinite += 1
        state.batch = i + 1
        t.optimizer.zero_grad(set_to_none=True)

    def account(epoch: int, i: int, value: float, seen: int, terms: dict, stepped: bool, norm, dt: float) -> bool:
        """Micro-batch ``i`` done: the counters, its event, and after a step an
        evaluation when due and the stop checks. True when it evaluated."""
        state.seconds += dt
        state.epoch_seconds += dt
        state.samples += seen
        state.last_loss = value
        state.epoch_loss += state.last_loss
        state.epoch_seen += 1
        state.batch = i + 1
        state.eval_due = stepped and i + 1 < n_batches and schedule.due(state.step)
        if stepped and i + 1 < n_batches and schedule.kind == "minutes":   # clocks differ between ranks
            state.eval_due = bool(t.stop_agreed("evaluate" if state.eval_due else None))
        events.fire("on_step_end", StepView(
            epoch=epoch + 1, batch=i + 1, n_batches=n_batches, step=state.step, stepped=stepped,
            loss=state.last_loss, terms=terms, lr=t.optimizer.param_groups[0]["lr"],
            samples=seen, seconds=dt, grad_norm=norm,
            epoch_loss=state.epoch_loss / state.epoch_seen))
        evaluated = state.eval_due
        if evaluated:
            _evaluate_within(t, state, evaluate, events, epoch, i + 1)
            schedule.done()
        if stepped and i + 1 < n_batches:
            _check_stops(t, state, stop_requested, end_requested)
        return evaluated

    def large_step(epoch: int, times: list, t_last: float) -> float:
        """The loss and backward of the group of micro-batches added to
        ``t.large`` (``times``: their first passes, the last ending at
        ``t_last``), the optimizer step, then each micro-batch's event, each
        with the group's loss (and the step's time on the last). Returns the
        clock the next micro-batch's time starts from."""
        group = t.large.step(t)
        last = group.micro[-1].batch.position
        if not group.finite:
            skip_nonfinite(group.value, epoch, last)
            return time.perf_counter()
        for m, seen, dt in zip(group.micro[:-1], group.seen, times):
            account(epoch, m.batch.position, group.value, seen, group.terms, False, None, dt)
        norm = t.optimizer_step()
        state.step += 1
        t.after_step(state.step)
        now = time.perf_counter()
        dt = (times[-1] if times else 0.0) + (now - t_last)
        evaluated = account(epoch, last, group.value, group.seen[-1], group.terms, True, norm, dt)
        return time.perf_counter() if evaluated else now

    for epoch in range(state.epoch, epochs):
        t.set_train_mode()
        skip = state.batch   # > 0 only when resuming inside this epoch
        if not skip:
            _restore_rng(state)
        events.fire("on_epoch_start", epoch + 1, total_epochs, n_batches)
        pending = 0  # micro-batches whose gradients are not applied yet (0 at a checkpoint)
        t_last = time.perf_counter()  # step time includes data loading
        t.optimizer.zero_grad(set_to_none=True)
        batches = t.features.train_epoch(epoch, skip)
        _restore_rng(state)
        yielded = 0
        times = []   # large-batch accumulation: the first pass of each micro-batch of the group
        for batch in batches:
            yielded += 1
            i = batch.position
            will_step = pending + 1 == t.grad_accum or i + 1 == n_batches
            if t.large is not None:
                # the loss waits for the group's last micro-batch (clipft.engine.accumulate)
                t.large.add(t, batch)
                pending += 1
                now = time.perf_counter()
                times.append(now - t_last)
                t_last = now
                if will_step:
                    t_last = large_step(epoch, times, t_last)
                    pending, times = 0, []
                continue
            with t.sync(will_step):
                with t.autocast():
                    record = t.record(batch)
                    total, terms = t.regularised(record, *t.loss_of(record))
                # the logged loss is every rank's mean, and every rank agrees on finiteness
                value, seen = t.reduce_step(float(total.detach()), len(batch))
                if math.isfinite(value):
                    scaled = total / t.grad_accum
                    (t.scaler.scale(scaled) if t.scaler is not None else scaled).backward()
            if not math.isfinite(value):
                skip_nonfinite(value, epoch, i)
                pending = 0
                continue
            pending += 1
            stepped = pending == t.grad_accum or i + 1 == n_batches
            norm = None
            if stepped:
                norm = t.optimizer_step()
                pending = 0
                state.step += 1
                t.after_step(state.step)
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            if account(epoch, i, value, seen, terms, stepped, norm, dt):
                t_last = time.perf_counter()   # the evaluation is no step's time
        if not yielded and not skip and n_batches:
            raise ClipftError(nothing_trained(epoch + 1, t.failures))
        if t.large is not None and len(t.large):   # the last batches were dropped as undecodable
            large_step(epoch, times, t_last)
            pending = 0
        if pending:  # the last batches were dropped as undecodable: apply what we have
            t.reduce_unsynced_grads()
            t.optimizer_step()
            state.step += 1
            t.after_step(state.step)
        t.end_epoch(epoch + 1, total_epochs)
        train_loss = state.epoch_loss / max(1, state.epoch_seen)
        t_eval = time.perf_counter()
        metrics = evaluate()
        seconds = state.epoch_seconds + (time.perf_counter() - t_eval)
        state.history.append({"epoch": epoch + 1, "train_loss": train_loss,
                              "epoch_seconds": seconds, "eval": metrics})
        state.epoch = epoch + 1
        state.batch, state.epoch_loss, state.epoch_seen, state.epoch_seconds = 0, 0.0, 0, 0.0
        state.last_eval_step = state.step
        events.fire("on_eval", EvalView(epoch + 1, metrics, train_loss, step=state.step))
        schedule.done()
        events.fire("on_epoch_end", EpochView(epoch + 1, total_epochs, train_loss, seconds, metrics, state.step))
        if epoch + 1 < total_epochs:
            _check_stops(t, state, stop_requested, end_requested)
    return state


def _check_stops(t: Trainer, state: LoopState, stop_requested, end_requested) -> None:
    """Interrupt (a signal: :class:`StopTraining`) or end normally (a callback's
    request: :class:`EndTraining`), every rank alike; a signal wins."""
    signal, end = t.stops_agreed(stop_requested(), end_requested())
    if signal:
        raise StopTraining(state, signal)
    if end:
        raise EndTraining(state, end)


def _evaluate_within(t: Trainer, state: LoopState, evaluate, events, epoch: int, batch: int) -> None:
    """An ``--eval-every`` evaluation after optimizer step ``state.step``, part-way into ``epoch``."""
    metrics = evaluate()
    t.set_train_mode()
    state.history.append({"epoch": epoch + 1, "batch": batch, "step": state.step, "eval": metrics})
    state.last_eval_step = state.step
    events.fire("on_eval", EvalView(epoch + 1, metrics, step=state.step, batch=batch))
    state.eval_due = False
