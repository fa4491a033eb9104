"""Data-parallel training on ``torch.distributed``, launched by ``torchrun``.

``torchrun --nproc-per-node N -m clipft run ...`` (or ``clipft run --nproc N``)
starts N processes with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous address in the environment; :func:`from_env` joins the process
group (NCCL on CUDA, each rank on ``cuda:LOCAL_RANK``; gloo on CPU). How a run
divides among the ranks (batches, gradients, rank 0's part) is in docs/scaling.md.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Optional

import attrs
import torch

from clipft.engine.loop import train_forward
from clipft.errors import ClipftError, ClipftUsageError

#: minutes a collective may wait when ``--collective-timeout`` is not given: rank 0
#: evaluating (or checkpointing) while the others wait is the longest legitimate
#: wait, and it is slower on CPUs
DEFAULT_TIMEOUT_MIN = {"cuda": 10.0, "cpu": 20.0}


@attrs.define
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    #: how long a collective may wait (minutes) before it fails
    timeout_min: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (a stop request, a failure)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_comm_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t)

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        if not self.enabled:
            return obj
        box = [obj if self.main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, tensor: torch.Tensor, with_grad: bool = True) -> tuple[torch.Tensor, int]:
        """The tensors of every rank concatenated along dim 0, in rank order,
        and the row where this rank's rows start. Ranks may hold different
        numbers of rows (a sample that failed to decode): each is padded to
        the largest for the collective and trimmed after.

        ``with_grad``: through ``torch.distributed.nn.all_gather``, whose backward
        sums each rank's gradient into the shard's owner. Without it, a plain
        all-gather with this rank's own tensor put back in its slot, so only the
        local rows carry gradient (open_clip's ``gather_with_grad=False``)."""
        if not self.enabled:
            return tensor, 0
        dev = tensor.device
        sizes = torch.zeros(self.world, dtype=torch.int64, device=dev)
        sizes[self.rank] = tensor.shape[0]
        torch.distributed.all_reduce(sizes)
        sizes = sizes.tolist()
        most = max(sizes)
        padded = tensor
        if tensor.shape[0] < most:
            pad = tensor.new_zeros((most - tensor.shape[0], *tensor.shape[1:]))
            padded = torch.cat([tensor, pad], dim=0)
        if with_grad:
            from torch.distributed import nn as dist_nn
            with quiet_deprecations():
                parts = list(dist_nn.all_gather(padded.contiguous()))
        else:
            parts = [torch.empty_like(padded) for _ in range(self.world)]
            torch.distributed.all_gather(parts, padded.detach().contiguous())
            parts[self.rank] = padded
        parts = [p[:n] for p, n in zip(parts, sizes)]
        return torch.cat(parts, dim=0), sum(sizes[:self.rank])


SINGLE = Dist()
_current: Dist = SINGLE


def current() -> Dist:
    return _current


def _comm_device() -> torch.device:
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launched() -> bool:
    """True when started by torchrun (or another launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def quiet_deprecations():
    """torch's FutureWarnings about its own distributed APIs (``all_gather``'s
    autograd form, DDP's ``broadcast_buffers``): nothing a clipft user can act on."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def timeout_minutes(choice: Optional[float], cuda: bool) -> float:
    return float(choice) if choice else DEFAULT_TIMEOUT_MIN["cuda" if cuda else "cpu"]


def from_env(device_choice: str = "auto", timeout_min: Optional[float] = None) -> Dist:
    """Join the process group torchrun describes in the environment (once);
    collectives fail after ``timeout_min`` minutes (:func:`timeout_minutes`)."""
    global _current
    if not launched():
        return SINGLE
    if torch.distributed.is_initialized():
        return _current
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_choice != "cpu" and torch.cuda.is_available()
    if device_choice == "cuda" and not torch.cuda.is_available():
        raise ClipftUsageError("--device cuda, but CUDA is not available on this machine")
    if cuda:
        torch.cuda.set_device(local)
    try:
        minutes = timeout_minutes(timeout_min, cuda)
        torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                                             timeout=datetime.timedelta(minutes=minutes))
    except Exception as exc:  # noqa: BLE001 - a rendezvous failure names what to check
        raise ClipftError(f"rank {rank}: could not join the process group of {world} processes "
                          f"({type(exc).__name__}: {exc}); check MASTER_ADDR/MASTER_PORT "
                          "(torchrun --rdzv-endpoint) and that every node started") from None
    _current = Dist(rank, world, local, timeout_min=minutes)
    return _current


def _timed_out(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(s in text for s in ("timed out", "timeout", "connection closed by peer", "connection reset"))


def _silent_ranks(dist: "Dist", wait_s: float) -> Optional[list]:
    """After a collective timed out: the ranks that do not say so within
    ``wait_s`` seconds, through the launcher's key-value store (which outlives
    the process group); None when the store cannot be reached."""
    import time
    try:
        from torch.distributed.distributed_c10d import _get_default_store
        store = _get_default_store()
        keys = {r: f"clipft/timed-out/{r}" for r in range(dist.world)}
        store.set(keys[dist.rank], "1")
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r, k in keys.items() if not store.check([k])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.5)
    except Exception:  # noqa: BLE001 - no store: the message cannot name the rank
        return None


@contextlib.contextmanager
def stalled_ranks_named(dist: "Dist"):
    """A collective that times out (a rank stopped, hung or died) becomes a
    runtime error naming the ranks that did not answer, instead of torch's
    transport message. Every live rank that timed out says so in the
    launcher's store; the ranks that do not, within a minute (or the timeout,
    if shorter), are the ones named."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - only a collective's timeout is translated
        if not dist.enabled or not _timed_out(exc):
            raise
        silent = _silent_ranks(dist, min(60.0, dist.timeout_min * 60))
        who = ("rank " + ", ".join(map(str, silent)) + " did not answer" if silent
               else "a rank did not answer")
        raise ClipftError(
            f"rank {dist.rank}: a collective waited more than {dist.timeout_min:g} minutes and {who} "
            "(stopped, hung or dead); the job stops rather than hang. Resume from the last checkpoint "
            "once every rank can run (--collective-timeout MIN sets the wait)") from None


def shutdown() -> None:
    global _current
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _current = SINGLE


def device_for(dist: Dist, choice: str) -> Optional[torch.device]:
    """Each rank's device: ``cuda:LOCAL_RANK`` under NCCL, else None (the usual choice)."""
    if dist.enabled and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", dist.local_rank)
    return None


def rank_share(n: int, batch: int, world: int, rank: int, drop_last: bool = False) -> tuple[list, int]:
    """Positions (into the epoch's permutation of ``n``) that ``rank`` trains on,
    in order, and the number dropped: global batch ``k`` is
    ``[k·B, (k+1)·B)`` with ``B = world·batch``, and rank ``r`` takes its
    ``r``-th contiguous share; the last global batch is split evenly, or, with
    ``drop_last``, left out whole when it is incomplete."""
    out = []
    global_b = world * batch
    full = n // global_b
    for k in range(full):
        start = k * global_b + rank * batch
        out.extend(range(start, start + batch))
    rest = n - full * global_b
    share = 0 if drop_last else rest // world
    start = full * global_b + rank * share
    out.extend(range(start, start + share))
    return out, rest - share * world


class TrainForward(torch.nn.Module):
    """The training forward as one module, so DDP sees it: ``forward(batch)``
    returns ``(image_features, text_features, logits, class_text_features)``
    from the trainer's features provider and head (None entries for what is
    not computed).

    Only the trained parameters are registered (``trained``): DDP reduces,
    and at start broadcasts, exactly those; the frozen model and head are
    referenced, not owned, so a frozen tower costs nothing, not even at start."""

    def __init__(self, model, head, features, needs_text: bool, params: list, needs_class_text: bool = False):
        super().__init__()
        self.trained = torch.nn.ParameterList(params)
        object.__setattr__(self, "_refs", (model, head, features, needs_text, needs_class_text))

    def forward(self, batch, replay=None):
        _, head, features, needs_text, needs_class_text = self._refs
        return train_forward(features, head, batch, needs_text, needs_class_text, replay)


@contextlib.contextmanager
def rng_kept():
    """Restores the CPU (and CUDA) RNG on exit, so a probe changes no draw."""
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def unused_trained_params(loss, params: list) -> list:
    """Trained parameters that ``loss`` does not reach, by walking its autograd
    graph (no backward)."""
    reached, stack, seen = set(), [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None:
            reached.add(id(var))
        stack.extend(f for f, _ in fn.next_functions)
    return [p for p in params if id(p) not in reached]


def on_main(evaluate, dist: Dist):
    """``evaluate`` on rank 0 alone; every rank gets its metrics (the others
    wait meanwhile), so every rank's history, and checkpoint, agree."""
    def run():
        metrics = evaluate() if dist.main else None
        return dist.broadcast(metrics)
    return run


def on_every(evaluate, dist: Dist):
    """``evaluate`` on every rank (``--parallel fsdp``: each forward gathers
    the shards of every rank), every rank taking rank 0's metrics, so their
    histories and checkpoints agree to the bit. The other ranks keep their RNG
    as it was (an evaluation's data loader draws a seed from it), so every
    rank draws what it draws under DDP, where rank 0 alone evaluates."""
    def run():
        if dist.main:
            return dist.broadcast(evaluate())
        with rng_kept():
            evaluate()
        return dist.broadcast(None)
    return run
