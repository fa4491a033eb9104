"""Composing strategies into the trainable set and optimizer parameter groups,
by the rules in docs/strategies.md: selectors in order (first claim wins), then
modifiers, which may only rescale or regroup; contradictions are errors; a
selected text side that nothing in the training forward uses is left frozen
and reported (:func:`unused_trained`).
"""
from __future__ import annotations

from typing import Optional

import attrs
import torch

from clipft.anatomy import describe
from clipft.errors import ClipftError, ClipftUsageError
from clipft.protocols import ENTERS_CLASS_TEXT, ENTERS_TEXT_EMBEDDING, MODIFIER, SELECTOR, SLOTS, Strategy
from clipft.specs import NEED_HEAD, NEED_TEXT, Selection

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


def _count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 100_000 else f"{n:,}"


@attrs.frozen
class UnusedTrained:
    """Selected parameters that nothing in the training forward uses."""

    tower: str
    #: their qualified names, in model order
    names: tuple
    params: int
    #: why nothing uses them, and what to do about it (for messages)
    why: str
    fix: str

    def message(self) -> str:
        return (f"the {self.tower} tower ({_count(self.params)} parameters) is selected to train, but nothing "
                f"in training uses it ({self.why}); it is left frozen and out of the trainable count. {self.fix}")

    def record(self) -> dict:
        """What ``summary.json`` and ``clipft plan`` keep of it."""
        return {"tower": self.tower, "params": self.params, "tensors": len(self.names), "why": self.why}


def text_side(model: torch.nn.Module) -> tuple:
    """Names of the parameters that only ever act on text: the text tower
    (with what strategies inserted inside it) and the modules in the class-text
    and text-embedding slots."""
    anatomy = describe(model)
    slots = tuple(f"{SLOTS[s]}." for s in (ENTERS_CLASS_TEXT, ENTERS_TEXT_EMBEDDING))
    tower = set(anatomy.text.names if anatomy.text is not None else ())
    return tuple(n for n, _ in model.named_parameters() if n in tower or n.startswith(slots))


def unused_trained(model: torch.nn.Module, loss_spec, head_spec=None, strategies=(),
                   staged: bool = False) -> Optional[UnusedTrained]:
    """The trained text side when the training forward never encodes text: the
    loss needs no paired text (:data:`~clipft.specs.NEED_TEXT`, which is also
    what sends labelled batches through a class-prompt encoder), and no head
    that encodes text (:attr:`~clipft.specs.HeadSpec.encodes_text`, unknown
    counting as yes) reaches the loss. Decided from the specs alone, before
    anything runs, so ``clipft plan`` and ``clipft run`` agree; it names the
    tensors DDP's first-batch probe would find unused on the text side.
    Evaluation encodes text too, but without gradients: that is not training.
    The image tower runs in every training forward, so it is never unused.
    ``strategies`` (names) and ``staged`` (a stage of a multi-stage run) shape the fix."""
    needs = loss_spec.needs
    if NEED_TEXT in needs:
        return None
    head_encodes = head_spec is not None and head_spec.encodes_text is not False
    if head_encodes and NEED_HEAD in needs:
        return None
    params = dict(model.named_parameters())
    names = tuple(n for n in text_side(model) if params[n].requires_grad)
    if not names:
        return None
    head = (f"head '{head_spec.name}' does not encode text" if head_spec is not None and not head_encodes
            else f"loss '{loss_spec.name}' does not use head '{head_spec.name}'" if head_spec is not None
            else "there is no head")
    if "full" in strategies:
        fix = f"To say so, {'have the stage train' if staged else 'use --strategy'} freeze-text in place of full"
    else:
        fix = "To say so, leave it out of the strategies (tower=vision where a strategy takes it)"
    fix += "; to train it, use a loss that needs text (--loss contrastive) or --head text"
    return UnusedTrained(tower="text", names=names, params=sum(params[n].numel() for n in names),
                         why=f"loss '{loss_spec.name}' needs no text and {head}", fix=fix)


def drop_unused(model: torch.nn.Module, selections: list, unused: Optional[UnusedTrained]) -> list:
    """``selections`` without the ``unused`` parameters, which are frozen: no
    gradient, no optimizer state, no weight decay, not in the trainable count."""
    if unused is None:
        return selections
    params = dict(model.named_parameters())
    drop = {id(params[n]) for n in unused.names}
    for n in unused.names:
        params[n].requires_grad_(False)
    out = []
    for sel in selections:
        keep = [(n, p) for n, p in sel.params if id(p) not in drop]
        if keep:
            out.append(attrs.evolve(sel, params=keep))
    return out
