"""Composing strategies into the trainable set and optimizer parameter groups.

Rules (also in the README):
- The model starts fully frozen.
- Selector strategies (``apply``) run in command-line order; the trainable set is
  the union of their selections. A parameter claimed twice stays in the group of
  the first strategy that claimed it.
- Modifier strategies (``modify``) run afterwards, in order, and may only rescale
  or regroup what is already selected.
- Contradictions are errors: the same strategy twice, two strategies that each
  demand exclusive control, a modifier with nothing selected, a modifier that
  tries to add parameters, a strategy that selects what another one keeps frozen
  (``keeps_frozen(model, ctx)`` returns those parameter names), and a strategy
  that replaces parameters an earlier one already selected (list the replacing
  strategy, e.g. ``reproject``, first).
"""
from __future__ import annotations

import attrs
import torch

from clipft.errors import ClipftUsageError
from clipft.specs import Selection

NO_DECAY_MARKERS = ("bias", "logit_scale", "logit_bias", "ln_", ".ln", "bn", "norm",
                    "class_embedding", "positional_embedding")


def default_no_decay(name: str, p: torch.Tensor) -> bool:
    """Biases, norms, embeddings-like and 1-d tensors get no weight decay (CLIP recipe)."""
    return p.ndim < 2 or any(m in name for m in NO_DECAY_MARKERS)


@attrs.define
class Group:
    name: str
    params: list          # [(qualified name, Parameter)]
    lr: float
    weight_decay: float
    sources: tuple = ()

    @property
    def numel(self) -> int:
        return sum(p.numel() for _, p in self.params)


def apply_strategies(model: torch.nn.Module, strategies, ctx) -> list[Selection]:
    """``strategies``: list of (name, built strategy object). Returns the final
    selections and sets ``requires_grad`` to exactly the union."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, _ in strategies]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ClipftUsageError(f"strategy '{sorted(dupes)[0]}' is given twice; give it once with all its options")
    exclusive = [n for n, s in strategies if getattr(s, "exclusive", False)]
    if len(exclusive) > 1:
        raise ClipftUsageError(
            f"strategies '{exclusive[0]}' and '{exclusive[1]}' each demand exclusive control "
            "of what trains; choose one")

    selections: list[Selection] = []
    for name, strat in strategies:
        if hasattr(strat, "apply"):
            new = list(strat.apply(model, ctx) or [])
            present = {id(p) for p in model.parameters()}
            for sel in selections:
                gone = [n for n, p in sel.params if id(p) not in present]
                if gone:
                    raise ClipftUsageError(
                        f"strategy '{name}' replaced parameters that strategy '{sel.source}' had "
                        f"already selected ({gone[0]}); list '{name}' before '{sel.source}'")
            for sel in new:
                sel.source = sel.source or name
                stray = [n for n, p in sel.params if id(p) not in present]
                if stray:
                    raise ClipftUsageError(
                        f"strategy '{name}' selected parameters that are not part of the model ({stray[0]})")
                selections.append(sel)
    for name, strat in strategies:
        if hasattr(strat, "modify") and not hasattr(strat, "apply"):
            if not any(sel.params for sel in selections):
                selectors = [n for n, s in strategies if hasattr(s, "apply")]
                by = (f"; '{selectors[0]}' selected nothing" if len(selectors) == 1 else
                      f"; {', '.join(repr(x) for x in selectors)} selected nothing" if selectors else "")
                raise ClipftUsageError(
                    f"strategy '{name}' only rescales learning rates, but nothing is selected "
                    f"to train{by}; add a strategy that selects parameters (e.g. last-n, projections)")
            before = {id(p) for s in selections for _, p in s.params}
            selections = strat.modify(selections, model, ctx)
            after = {id(p) for s in selections for _, p in s.params}
            if not after <= before:
                raise ClipftUsageError(f"modifier strategy '{name}' tried to add parameters to the trainable set")

    # union with first-claim-wins, then freeze everything else (including any
    # parameters a strategy inserted but did not select)
    claimed: set[int] = set()
    final: list[Selection] = []
    for sel in selections:
        keep = [(n, p) for n, p in sel.params if id(p) not in claimed]
        claimed.update(id(p) for _, p in keep)
        if keep:
            final.append(attrs.evolve(sel, params=keep))
    for name, strat in strategies:
        keeps = getattr(strat, "keeps_frozen", None)
        if keeps is None:
            continue
        frozen = set(keeps(model, ctx))
        for sel in final:
            hit = [n for n, _ in sel.params if n in frozen] if sel.source != name else []
            if hit:
                more = f" and {len(hit) - 1} more" if len(hit) > 1 else ""
                raise ClipftUsageError(
                    f"strategies '{name}' and '{sel.source}' contradict each other: '{name}' keeps "
                    f"{hit[0]}{more} frozen, but '{sel.source}' trains {'them' if more else 'it'}. "
                    f"Drop one of them or change its options (`clipft describe strategy {name}`)")
    for p in model.parameters():
        p.requires_grad_(id(p) in claimed)
    return final


def build_groups(selections: list[Selection], base_lr: float, weight_decay: float,
                 head: torch.nn.Module | None = None) -> list[Group]:
    """Optimizer groups: each selection split into decay / no-decay parts."""
    if head is not None:
        hp = [(f"head.{n}", p) for n, p in head.named_parameters() if p.requires_grad]
        if hp:
            selections = selections + [Selection("head", hp, source="head")]
    merged: dict[tuple, Group] = {}
    for sel in selections:
        for name, p in sel.params:
            if sel.weight_decay is None:
                decay = not default_no_decay(name, p)
            else:
                decay = sel.weight_decay
            gname = sel.group if decay or weight_decay == 0 else f"{sel.group}/no_decay"
            key = (gname, sel.lr_scale)
            g = merged.get(key)
            if g is None:
                g = merged[key] = Group(gname, [], base_lr * sel.lr_scale,
                                        weight_decay if decay else 0.0, ())
            g.params.append((name, p))
            if sel.source not in g.sources:
                g.sources = g.sources + (sel.source,)
    return list(merged.values())


def freeze_frozen_norm_stats(model: torch.nn.Module) -> None:
    """After ``model.train()``: BatchNorm layers whose parameters are frozen keep
    their running statistics (frozen ResNet stages must not drift)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            if not any(p.requires_grad for p in m.parameters(recurse=False)):
                m.eval()
