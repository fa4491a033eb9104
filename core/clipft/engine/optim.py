"""Optimizers and learning-rate schedules (all state is checkpointable)."""
from __future__ import annotations

import math

import torch

from clipft.errors import ClipftUsageError

#: the keyword arguments that select each implementation of torch's AdamW / SGD
IMPL_FLAGS = {"fused": {"fused": True, "foreach": False},
              "foreach": {"fused": False, "foreach": True},
              "for-loop": {"fused": False, "foreach": False}}


def _fused_devices() -> set:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        return set(_get_fused_kernels_supported_devices())
    except Exception:  # an older/newer torch without the helper: what torch 2.4+ supports
        return {"cuda", "cpu"}


def resolve_impl(requested: str, params) -> str:
    """The implementation a run uses. ``auto`` is fused wherever torch has the
    fused kernel for every parameter's device and dtype: on the CPU one fused
    AdamW step over ViT-B-32 took 0.06-0.08 s against 0.36-0.45 s for the
    for-loop and foreach paths (docs/performance.md), about a tenth of a
    full-model step saved. The fused kernel rounds differently from the
    for-loop (a few ulps per step), so ``for-loop`` stays available as the
    reference."""
    params = list(params)
    sharded = [p for p in params if type(p.data).__name__ == "DTensor"]
    if sharded:
        # --parallel fsdp: torch has no fused kernel for DTensors, and one foreach
        # call cannot mix them with the plain tensors kept whole on every rank
        if requested == "fused":
            raise ClipftUsageError("--optimizer-impl fused does not run on FSDP's sharded parameters "
                                   "(--parallel fsdp); use --optimizer-impl foreach or for-loop")
        if requested == "auto":
            return "foreach" if len(sharded) == len(params) else "for-loop"
        return requested
    fusable = all(p.is_floating_point() and p.device.type in _fused_devices() for p in params)
    if requested == "auto":
        # torch's list of fused devices is generic (mps, xpu, ...): auto picks fused only
        # where AdamW's fused kernel is known to exist, so a first step() never fails
        if fusable and all(p.device.type in ("cpu", "cuda") for p in params):
            return "fused"
        return "foreach" if all(p.device.type == "cuda" for p in params) and params else "for-loop"
    if requested == "fused" and not fusable:
        kinds = sorted({f"{p.device.type}/{p.dtype}" for p in params})
        raise ClipftUsageError(f"--optimizer-impl fused: torch has no fused optimizer kernel for "
                               f"{', '.join(kinds)}; use --optimizer-impl foreach or for-loop")
    return requested


def make_optimizer(groups, config) -> tuple[torch.optim.Optimizer, str]:
    """``(optimizer, implementation)``: the implementation ``auto`` resolved
    to (:func:`resolve_impl`), which ``summary.json`` reports."""
    param_groups = [
        {"params": [p for _, p in g.params], "lr": g.lr, "weight_decay": g.weight_decay,
         "name": g.name}
        for g in groups
    ] or [{"params": [], "lr": 0.0, "weight_decay": 0.0, "name": "none"}]   # --epochs 0, nothing trains
    impl = resolve_impl(config.optimizer_impl,
                        [p for g in param_groups for p in g["params"]])
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(param_groups, lr=param_groups[0]["lr"], momentum=config.momentum,
                              **IMPL_FLAGS[impl])
    else:
        opt = torch.optim.AdamW(param_groups, lr=param_groups[0]["lr"], betas=(0.9, 0.98), eps=1e-6,
                                **IMPL_FLAGS[impl])
    return opt, impl


def kept_impl(optimizer: torch.optim.Optimizer, saved_groups: list) -> list:
    """The param groups of a checkpoint, with this run's implementation flags:
    torch's ``load_state_dict`` would otherwise bring back the ``fused`` /
    ``foreach`` flags of the run that wrote it (and place the state for that
    implementation), so a checkpoint from another implementation resumes on
    this one. The flags come from the optimizer's constructor arguments
    (``defaults``), which ``load_state_dict`` leaves as they were."""
    flags = {k: optimizer.defaults[k] for k in ("fused", "foreach") if k in optimizer.defaults}
    return [{**g, **flags} for g in saved_groups]


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of each group's base lr at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer, total_steps: int, warmup: int, kind: str):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, kind))


#: the share of a run's optimizer steps that warm up linearly by default. At 5%
#: (3 of 66 steps), full fine-tuning of tiny-vit from random init at lr 2e-3
#: reached top-1 0.10-0.25 on four seeds, two of them stuck at one class; at 10%
#: (7 steps) 0.43-0.59 (docs/usage.md#learning-rate-warmup-and-collapse)
WARMUP_SHARE = 0.10


def default_warmup(total_steps: int) -> int:
    return int(round(WARMUP_SHARE * total_steps))
