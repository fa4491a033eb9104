"""``--parallel fsdp``: the model sharded over the ranks with FSDP2 (``fully_shard``).

Each residual block of a tower that trains is its own FSDP unit (its
parameters are all-gathered just before it runs and freed after, its gradients
reduce-scattered as backward leaves it), then the rest of the model is one
unit at the root. A frozen tower is sharded the same way, without gradients,
when it is large (:data:`FROZEN_SHARD_MIN` parameters); a small one stays
whole on every rank, where it costs less than the all-gathers it would need.

What stays whole on every rank, a *replica* as under DDP: ``logit_scale`` and
``logit_bias`` (the loss reads them outside any forward), the head and a
loss's own parameters. Their gradients are averaged over the ranks before each
optimizer step (:meth:`Sharding.reduce_replicated`).

Checkpoints during training are sharded (each rank writes its shard with
torch.distributed.checkpoint, engine/checkpoint.py); the last one is in the
format of one process: every rank takes part in gathering the full tensors
(:meth:`Sharding.full`, a collective), rank 0 writes them; a resume from it
gives each rank its shard of what it reads (:meth:`Sharding.local`).
docs/scaling.md says when to use FSDP and what each checkpoint holds.
"""
from __future__ import annotations

from typing import Optional

import attrs
import torch

from clipft.errors import ClipftUsageError

#: a frozen tower with at least this many parameters is sharded (without
#: gradients); a smaller one is kept whole on every rank. 20M fp32 parameters
#: are 80 MB per rank, about what one all-gather of each of its blocks per
#: forward would move anyway.
FROZEN_SHARD_MIN = 20_000_000
#: parameters the loss reads outside any forward: kept whole on every rank
OUTSIDE_FORWARD = ("logit_scale", "logit_bias")
#: the model's methods the features provider calls instead of ``forward``
FORWARD_METHODS = ("encode_image", "encode_text")


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def tower_of(name: str) -> Optional[str]:
    """``vision``, ``text`` or None (the model's own scalars) for a parameter name."""
    if name in OUTSIDE_FORWARD:
        return None
    return "vision" if name.startswith("visual.") else "text"


def residual_blocks(model: torch.nn.Module) -> dict:
    """``{tower: [block, ...]}``: the members of every ``resblocks`` list (open_clip's towers)."""
    out: dict = {}
    for name, module in model.named_modules():
        if name.endswith("resblocks") and isinstance(module, torch.nn.ModuleList):
            out.setdefault(tower_of(name + "."), []).extend(module)
    return out


def mixed_precision(precision: str):
    """FSDP's policy for ``--precision``: bf16 parameters in forward and
    backward with gradients reduced in fp32; fp32: none."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def check_supported(precision: str) -> None:
    if precision == "fp16":
        # each rank holds a shard of the gradients, so the GradScaler's
        # inf check would see a part and ranks could disagree on skipping
        raise ClipftUsageError("--parallel fsdp does not run --precision fp16 (loss scaling over sharded "
                               "gradients is not built); use --precision bf16 or fp32")


@attrs.define
class Sharding:
    """What :func:`shard` did: the FSDP units and the trained parameters kept whole."""

    units: list
    #: trained parameters not managed by FSDP (their gradients are all-reduced here)
    replicated: list
    world: int
    #: ``{tower: "blocks"|"root"|"whole"}``: how each tower was placed, for the summary
    layout: dict = attrs.field(factory=dict)

    def reduce_replicated(self) -> None:
        """Average the replicated parameters' gradients over the ranks (every
        rank calls it, in the same order). A parameter no rank has a gradient
        for keeps none, so the optimizer leaves it alone, as under DDP (a
        ``logit_scale`` that a cross-entropy loss never reaches)."""
        if not self.replicated:
            return
        device = self.replicated[0].device
        has = torch.tensor([p.grad is not None for p in self.replicated], dtype=torch.int64,
                           device=device if device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(has, op=torch.distributed.ReduceOp.MAX)
        for p, any_grad in zip(self.replicated, has.tolist()):
            if not any_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad /= self.world

    @staticmethod
    def full(t: torch.Tensor) -> torch.Tensor:
        """The whole tensor on every rank (an all-gather: every rank calls it,
        in the same order); a plain tensor as it is."""
        return t.full_tensor() if is_sharded(t) else t

    @staticmethod
    def local(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``full`` placed as ``like`` is: this rank's shard of it (cut locally,
        no communication: every rank read the same file). The shard is a copy,
        so the whole tensor is freed once the caller drops it (a view would
        keep it alive inside the optimizer state)."""
        if not is_sharded(like):
            return full
        from torch.distributed.tensor import DTensor, distribute_tensor
        cut = distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
        return DTensor.from_local(cut.to_local().clone(), like.device_mesh, like.placements, run_check=False,
                                  shape=like.shape, stride=like.stride())


@attrs.frozen
class Placement:
    """Where :func:`shard` puts the model's parameters, decided before anything moves."""

    #: ``[block, ...]``: the modules that become FSDP units of their own (the root is the last unit)
    blocks: list
    #: parameters kept whole on every rank (small frozen towers, ``OUTSIDE_FORWARD``)
    whole: set
    #: ``{tower: "blocks"|"root"|"whole"}``
    layout: dict


def placement(model: torch.nn.Module) -> Placement:
    """The blocks of each tower that trains, and of each large frozen tower,
    as units; a small frozen tower and the loss's scalars whole."""
    towers: dict = {}
    for name, p in model.named_parameters():
        tower = tower_of(name)
        if tower is not None:
            t = towers.setdefault(tower, [0, False])
            t[0] += p.numel()
            t[1] = t[1] or p.requires_grad
    blocks = residual_blocks(model)
    units, layout = [], {}
    whole = {p for n, p in model.named_parameters() if n in OUTSIDE_FORWARD}
    for tower, (numel, trains) in sorted(towers.items()):
        if not trains and numel < FROZEN_SHARD_MIN:
            layout[tower] = "whole"
            whole.update(p for n, p in model.named_parameters() if tower_of(n) == tower)
            continue
        units.extend(blocks.get(tower, ()))
        layout[tower] = "blocks" if blocks.get(tower) else "root"
    return Placement(units, whole, layout)


def per_rank_bytes(model: torch.nn.Module, extra_trained: list, state_tensors: int, world: int,
                   precision: str) -> dict:
    """An estimate, computed (not measured), of what each of ``world`` ranks
    holds under FSDP: the shards of the weights, gradients and optimizer state
    (``state_tensors`` per trained element, as the parameters' dtype) plus
    what stays whole, and what is gathered whole at once, at the precision's
    parameter dtype: the root unit (embeddings, projections), which a tower's
    forward keeps gathered while its blocks run, and the largest block twice
    (FSDP gathers the next block while one runs). Activations are not included."""
    place = placement(model)
    block_ids = [{id(p) for p in b.parameters()} for b in place.blocks]
    in_blocks = set().union(*block_ids) if block_ids else set()
    whole_ids = {id(p) for p in place.whole}
    gathered_size = 2 if precision == "bf16" else None

    def size(p, sharded):
        n = p.numel() * p.element_size()
        return n / world if sharded else n

    weights = grads = 0.0
    root = 0
    for p in model.parameters():
        sharded = id(p) not in whole_ids
        weights += size(p, sharded)
        if p.requires_grad:
            grads += size(p, sharded)
        if sharded and id(p) not in in_blocks:
            root += p.numel() * (gathered_size or p.element_size())
    for p in extra_trained:
        weights += size(p, False)
        grads += size(p, False)
    units = [sum(p.numel() * (gathered_size or p.element_size()) for p in b.parameters()) for b in place.blocks]
    state = state_tensors * grads
    gathered = root + 2 * max(units, default=0)
    return {"world_size": world, "weight_bytes": int(weights), "gradient_bytes": int(grads),
            "optimizer_state_bytes": int(state), "gathered_bytes": int(gathered),
            "total_bytes": int(weights + grads + state + gathered), "towers": dict(place.layout)}


def shard(model: torch.nn.Module, precision: str, world: int, trained_extra=()) -> Sharding:
    """Shard ``model`` in place (its parameters become DTensors) as
    :func:`placement` says: the blocks, then the root.
    ``trained_extra``: trained parameters outside the model (head, loss)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    policy = mixed_precision(precision)
    place = placement(model)
    units = [fully_shard(block, mp_policy=policy) for block in place.blocks]
    layout = place.layout
    units.append(fully_shard(model, mp_policy=policy, ignored_params=set(place.whole)))
    for method in FORWARD_METHODS:
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    replicated = [p for p in model.parameters() if p.requires_grad and not is_sharded(p)]
    replicated += [p for p in trained_extra if p.requires_grad]
    return Sharding(units, replicated, world, layout)
