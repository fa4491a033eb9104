"""Composing strategies into the trainable set and optimizer parameter groups,
by the rules in docs/strategies.md: selectors in order (first claim wins), then
modifiers, which may only rescale or regroup; contradictions are errors.
"""
from __future__ import annotations

import attrs
import torch

from clipft.errors import ClipftError, ClipftUsageError
from clipft.protocols import MODIFIER, SELECTOR, Strategy
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


def check_strategy(name: str, obj) -> Strategy:
    """A built strategy must be a :class:`clipft.Strategy` with a known role."""
    if not isinstance(obj, Strategy):
        raise ClipftError(
            f"strategy '{name}' built a {type(obj).__name__}, which is not a clipft.Strategy; "
            "its plugin must subclass clipft.Strategy (or clipft.StrategyModifier)")
    if obj.role not in (SELECTOR, MODIFIER):
        raise ClipftError(f"strategy '{name}' has role {obj.role!r}; use 'selector' or 'modifier'")
    return obj


def apply_strategies(model: torch.nn.Module, strategies, ctx) -> list[Selection]:
    """``strategies``: list of (name, built strategy object). Returns the final
    selections and sets ``requires_grad`` to exactly the union."""
    for name, strat in strategies:
        check_strategy(name, strat)
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, _ in strategies]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ClipftUsageError(f"strategy '{sorted(dupes)[0]}' is given twice; give it once with all its options")

    selections: list[Selection] = []
    for name, strat in strategies:
        if strat.role == SELECTOR:
            new = list(strat.apply(model, ctx) or [])
            present = {id(p) for p in model.parameters()}
            for sel in selections:
                gone = [n for n, p in sel.params if id(p) not in present]
                if gone:
                    raise ClipftUsageError(
                        f"strategy '{name}' replaced parameters that strategy '{sel.source}' had "
                        f"already selected ({gone[0]}); list '{name}' before '{sel.source}'")
            named = dict(model.named_parameters())
            for sel in new:
                sel.source = sel.source or name
                stray = [n for n, p in sel.params if id(p) not in present]
                if stray:
                    raise ClipftError(
                        f"strategy '{name}' selected parameters that are not part of the model ({stray[0]})")
                # the name is what checkpoints, groups and plans show: it must be the parameter's own
                misnamed = [(n, p) for n, p in sel.params if named.get(n) is not p]
                if misnamed:
                    bad, param = misnamed[0]
                    real = next(k for k, v in named.items() if v is param)
                    raise ClipftError(
                        f"strategy '{name}' selected a parameter under the wrong name "
                        f"({bad!r}; the model calls it {real!r})")
                selections.append(sel)
    for name, strat in strategies:
        if strat.role == MODIFIER:
            if not any(sel.params for sel in selections):
                selectors = [n for n, s in strategies if s.role == SELECTOR]
                by = (f"; '{selectors[0]}' selected nothing" if len(selectors) == 1 else
                      f"; {', '.join(repr(x) for x in selectors)} selected nothing" if selectors else "")
                raise ClipftUsageError(
                    f"strategy '{name}' only rescales or tracks what other strategies select, but nothing is selected "
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
        frozen = set(strat.keeps_frozen(model, ctx))
        if not frozen:
            continue
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
                 head: torch.nn.Module | None = None, loss=None) -> list[Group]:
    """Optimizer groups: each selection split into decay / no-decay parts; then
    the head's parameters (group ``head``) and a loss module's own trainable
    parameters (group ``loss``, see :class:`clipft.protocols.Loss`)."""
    if head is not None:
        hp = [(f"head.{n}", p) for n, p in head.named_parameters() if p.requires_grad]
        if hp:
            selections = selections + [Selection("head", hp, source="head")]
    lp = loss_parameters(loss)
    if lp:
        selections = selections + [Selection("loss", lp, source="loss")]
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


def loss_parameters(loss) -> list:
    """``[("loss.<name>", Parameter)]``: the trainable parameters of a loss that
    is an ``nn.Module`` (none for a plain callable)."""
    if not isinstance(loss, torch.nn.Module):
        return []
    return [(f"loss.{n}", p) for n, p in loss.named_parameters() if p.requires_grad]


def freeze_frozen_norm_stats(model: torch.nn.Module) -> None:
    """After ``model.train()``: BatchNorm layers whose parameters are frozen keep
    their running statistics (frozen ResNet stages must not drift)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            if not any(p.requires_grad for p in m.parameters(recurse=False)):
                m.eval()
