"""Large-batch accumulation: ``--grad-accum K`` under a batch-coupled loss
(``LossSpec.batch_coupled``: contrastive, SigLIP) computes the loss over the
K micro-batches together, so each sample has the whole group (K·B, times the
ranks) as negatives, in the manner of GradCache (Gao et al. 2021):

1. each micro-batch's forward without grad, its outputs kept (with the batch,
   and the RNG state before each part of the forward);
2. the loss over the concatenated outputs, taken as leaf tensors, and its
   gradient with respect to them (and to any trained parameter the loss reads
   directly: ``logit_scale``, ``logit_bias``, a loss's own parameters);
3. each micro-batch's forward again, with grad and the RNG replayed (dropout
   draws the same masks), and a backward from its slice of the output gradient.

The gradient is the large batch's; the cost is a second forward (about a
third more compute than plain accumulation) and the outputs of the group
(K·B embeddings) in memory. A side of the forward whose output does not
depend on a trained parameter (a frozen tower, served from the cache or not)
is not run again: its first-pass value enters the second pass as it is.

Per-sample losses (cross-entropy) keep plain accumulation, in the loop.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import attrs
import torch

from clipft.engine.features import Batch
from clipft.engine.loop import train_forward

if TYPE_CHECKING:
    from clipft.engine.loop import Trainer

#: the parts of the training forward, in the order they run (train_forward)
SIDES = ("image", "text", "head")


def rng_state() -> tuple:
    """The CPU and (when present) every CUDA generator's state."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.random.get_rng_state(), cuda


def set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.random.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class Replay:
    """Handed to :func:`~clipft.engine.loop.train_forward`: records the RNG state
    before each side of the first pass, restores it before the same side of the
    second; a side in ``given`` is not run, its first-pass value is used.
    ``carry``: trained parameters the loss read directly, returned through the
    forward (as views) so DDP sees them reached by the backward that syncs."""

    def __init__(self):
        self.states: dict = {}
        self.given: dict = {}
        self.carry: tuple = ()
        self.replaying = False

    def side(self, name: str, compute):
        if name in self.given:
            return self.given[name]
        if self.replaying:
            set_rng_state(self.states[name])
        else:
            self.states[name] = rng_state()
        return compute()


@attrs.define
class Micro:
    batch: Batch
    replay: Replay
    outputs: tuple            # (image, text, logits) of the first pass, None where not computed

    @property
    def rows(self) -> int:
        return self.outputs[0].shape[0]


@attrs.define
class Group:
    """What the step of a group of micro-batches gives the loop."""

    micro: list               # [Micro]
    value: float              # the large-batch loss (every rank's mean)
    terms: dict
    seen: list                # samples of each micro-batch, summed over the ranks

    @property
    def finite(self) -> bool:
        return math.isfinite(self.value)


def merged_batch(batches: list) -> Batch:
    """One :class:`Batch` holding the index, captions and labels of ``batches``
    (what the loss's record is built from; no inputs)."""
    return Batch(torch.cat([b.index for b in batches]), None, [c for b in batches for c in b.captions],
                 torch.cat([b.labels for b in batches]), position=batches[-1].position)


def _leaf(parts: list):
    if parts[0] is None:
        return None
    return torch.cat(parts).detach().requires_grad_(True)


class LargeBatch:
    """The micro-batches of the optimizer step being accumulated; see the
    module docstring. One per trainer (a stage's trainable set is fixed); the
    trainer is passed to each call (DDP wraps a copy of it)."""

    def __init__(self):
        self.micro: list = []
        #: sides whose output depends on no trained parameter, so needs no
        #: second pass (learned on the first micro-batch)
        self.frozen: Optional[frozenset] = None

    def __len__(self):
        return len(self.micro)

    def add(self, t: "Trainer", batch: Batch) -> None:
        """Step 1 for one micro-batch: its outputs, without grad (the very first
        with grad, dropped at once: which sides depend on a trained parameter)."""
        replay, learn = Replay(), self.frozen is None
        with torch.set_grad_enabled(learn), t.autocast():
            outputs = train_forward(t.features, t.head, batch, t.needs_text, replay=replay)
        if learn:
            self.frozen = frozenset(s for s, o in zip(SIDES, outputs) if o is not None and not o.requires_grad)
            outputs = [o.detach() if o is not None else None for o in outputs]
        self.micro.append(Micro(batch, replay, tuple(outputs)))

    def step(self, t: "Trainer") -> Group:
        """Steps 2 and 3 for the micro-batches added since the last step:
        gradients accumulated in the parameters (scaled when a grad scaler
        runs), unless the loss is not finite (then none are). The global RNG
        is left where step 1 left it, as plain accumulation leaves it."""
        micro, self.micro = self.micro, []
        after_first_pass = rng_state()
        leaves = [_leaf([m.outputs[k] for m in micro]) for k in range(3)]
        with t.autocast():
            record = t.record_from(merged_batch([m.batch for m in micro]), *leaves)
            total, terms = t.regularised(record, *t.loss_of(record))
        # the logged loss is every rank's mean, and every rank agrees on finiteness
        value, seen = _reduce(t, float(total.detach()), [len(m.batch) for m in micro])
        if not math.isfinite(value):
            return Group(micro, value, terms, seen)
        wrt = [x for x in leaves if x is not None]
        params = [p for p in t.params if p.requires_grad]
        scaled = t.scaler.scale(total) if t.scaler is not None else total
        # the large-batch loss is already the group's mean: no division by K
        grads = torch.autograd.grad(scaled, wrt + params, allow_unused=True)
        del record, total, scaled
        found = iter(grads[:len(wrt)])
        out_grads = [next(found) if x is not None else None for x in leaves]
        direct = [(p, g) for p, g in zip(params, grads[len(wrt):]) if g is not None]
        with running_stats_kept(t):
            self._second_pass(t, micro, out_grads, direct)
        set_rng_state(after_first_pass)
        return Group(micro, value, terms, seen)

    def _second_pass(self, t: "Trainer", micro: list, out_grads: list, direct: list) -> None:
        row = 0
        for j, m in enumerate(micro):
            last = j == len(micro) - 1
            rows = slice(row, row + m.rows)
            row += m.rows
            m.replay.replaying = True
            m.replay.given = {s: m.outputs[k] for k, s in enumerate(SIDES) if s in self.frozen}
            if last:
                m.replay.carry = tuple(p for p, _ in direct)
            # DDP reduces the gradients once, on the group's last backward
            with t.sync(last):
                with t.autocast():
                    outputs = t.outputs(m.batch, m.replay)
                roots, grads = [], []
                for k, o in enumerate(outputs[:3]):
                    if o is not None and o.requires_grad and out_grads[k] is not None:
                        roots.append(o)
                        grads.append(out_grads[k][rows])
                for view, (_, g) in zip(outputs[4] if len(outputs) > 4 else (), direct):
                    roots.append(view)
                    grads.append(g)
                if roots:
                    torch.autograd.backward(roots, grads)
            del outputs, roots, grads


class running_stats_kept:
    """BatchNorm layers in training mode update their running statistics in
    every forward: the first pass made this step's updates, so the second
    pass's are undone."""

    def __init__(self, t: "Trainer"):
        mods = [m for root in (t.model, t.head) if root is not None for m in root.modules()
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
        self.saved = [(b, b.clone()) for m in mods for b in m.buffers(recurse=False) if b is not None]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for b, v in self.saved:
                b.copy_(v)
        return False


def _reduce(t: "Trainer", value: float, counts: list) -> tuple[float, list]:
    """The loss averaged over the ranks and each micro-batch's samples summed
    (one collective); as given in one process."""
    if t.dist is None or not t.dist.enabled:
        return value, counts
    x = torch.tensor([value, *map(float, counts)], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        x = x.to(t.device)
    torch.distributed.all_reduce(x)
    return float(x[0]) / t.dist.world, [int(round(float(c))) for c in x[1:]]


def large_batch_applies(batch_coupled: bool, grad_accum: int, reads_class_text: bool = False) -> bool:
    """Whether a step's micro-batches share one loss: a batch-coupled loss under
    ``--grad-accum``, unless the loss needs the step's class text, which the
    second pass does not rebuild (such runs accumulate plainly; loss terms see
    ``class_text_features`` None in a large batch)."""
    return batch_coupled and grad_accum > 1 and not reads_class_text


def accumulation_record(batch_coupled: bool, grad_accum: int, batch_size: int, world: int = 1,
                        large: Optional[bool] = None) -> dict:
    """``summary.json``'s ``train.accumulation`` (and the plan's): how micro-batches
    combine, and the negatives each sample meets under a batch-coupled loss
    (None for a per-sample loss). ``large``: what the built trainer does (default:
    :func:`large_batch_applies` without class text)."""
    if large is None:
        large = large_batch_applies(batch_coupled, grad_accum)
    together = (grad_accum if large else 1) * batch_size * world
    return {"mode": "large-batch" if large else "plain", "micro_batches": grad_accum,
            "effective_batch": grad_accum * batch_size * world,
            "negatives": together - 1 if batch_coupled else None}


def accumulation_of(run) -> dict:
    """:func:`accumulation_record` of a prepared run (``clipft.engine.prepare``),
    from what its trainer does; the plan and the summary both report this."""
    world = run.dist.world if run.dist is not None else 1
    large = run.trainer.large is not None if run.trainer is not None else None
    return accumulation_record(bool(run.resolved.loss[0].batch_coupled), run.config.grad_accum,
                               run.config.batch_size, world, large)


def describe(record: dict) -> str:
    """One line for the start-up output and the plan."""
    k, eff = record["micro_batches"], record["effective_batch"]
    if record["mode"] == "large-batch":
        return (f"--grad-accum {k}: large-batch loss over {eff} samples ({record['negatives']} negatives "
                "each; a second forward per micro-batch)")
    if k > 1:
        neg = f", {record['negatives']} negatives each" if record["negatives"] is not None else ""
        return f"--grad-accum {k}: plain accumulation, {eff} samples per step{neg}"
    return ""
