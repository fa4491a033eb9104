"""Resolving the components of a run and assembling the model around them.

:func:`resolve` turns a config into component specs with validated options
(nothing heavy is built). :func:`assemble` puts a loaded open_clip model,
the strategies and the head together; ``prepare`` (training), ``load_run``
(a run directory) and ``load_export`` (an export) all build through it, so a
model is rebuilt exactly as it was trained.
"""
from __future__ import annotations

import random
from typing import Optional

import attrs
import numpy as np
import torch

from clipft.context import BuildContext
from clipft.engine.checkpoint import changed_keys
from clipft.engine.compose import apply_strategies, check_strategy
from clipft.errors import ClipftError, ClipftUsageError
from clipft.options import ComponentRef, build_options
from clipft.options import parse_ref
from clipft.specs import NEED_HEAD
from clipft.specs import Stage


@attrs.define
class ResolvedStage:
    """One stage of a multi-stage run, resolved: its strategies as ``(spec,
    options)`` and the epochs it covers, ``[start, end)`` of the run's epochs."""

    name: str
    strategies: list
    start: int
    end: int
    lr: Optional[float] = None
    head: bool = True

    @property
    def epochs(self) -> int:
        return self.end - self.start


@attrs.define
class Resolved:
    """Component specs and validated options, before anything heavy is built:
    each entry is ``(spec, options)``."""

    data: tuple
    strategies: list
    loss: tuple
    head: Optional[tuple]
    #: ``[(spec, options, required)]``: the selected callbacks and the default ones
    callbacks: list = attrs.field(factory=list)
    #: a multi-stage run's stages (``[[stages]]`` in the config, or a staged
    #: strategy's); empty for an ordinary run
    stages: list = attrs.field(factory=list)
    #: the staged strategy the stages came from (its name), or None
    staged_by: Optional[str] = None

    def stage_strategies(self, stage: int = 0) -> tuple[list, list]:
        """``(strategies, before)`` for stage ``stage``: the ``(spec, options)``
        whose selections train, and those of each earlier stage, which are
        applied first, in order, so the model has what they inserted. An
        ordinary run: its strategies, nothing before."""
        if not self.stages:
            return self.strategies, []
        return self.stages[stage].strategies, [s.strategies for s in self.stages[:stage]]

    def saved_stage(self, state: dict) -> int:
        """The stage a checkpoint's ``state`` was written in (0: an ordinary run)."""
        if not self.stages:
            return 0
        return min(int((state.get("loop") or {}).get("stage", 0)), len(self.stages) - 1)


def default_loss(config) -> ComponentRef:
    # a head is there to be trained: CE through it (CoOp's loss for the text
    # head); without one, CLIP's own contrastive objective
    if config.loss is not None:
        return config.loss
    return ComponentRef("cross-entropy" if config.head is not None else "contrastive")


def resolve(config, registry) -> Resolved:
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
    res = Resolved(
        data=one("data", config.data),
        strategies=strategies,
        loss=one("loss", default_loss(config)),
        head=one("head", config.head) if config.head is not None else None,
    )
    res.callbacks = resolve_callbacks(config.callbacks, registry)
    res.stages, res.staged_by = resolve_stages(config, res.strategies, one)
    needs = res.loss[0].needs
    if NEED_HEAD in needs and res.head is None:
        raise ClipftUsageError(
            f"loss '{res.loss[0].name}' needs a classification head; add --head linear "
            "(or --head zero-shot)")
    return res


def resolve_stages(config, strategies, one) -> tuple:
    """``(stages, staged_by)``: the run's stages, from ``config.stages`` or from a
    staged strategy (:meth:`clipft.Strategy.stages`), each resolved with the
    epochs it covers; ``([], None)`` for an ordinary run."""

    staged = []
    for spec, opts in strategies:
        got = _own_stages(spec, opts)
        if got is not None:
            staged.append((spec.name, list(got)))
    if not staged and not config.stages:
        return [], None
    if config.stages and strategies:
        raise ClipftUsageError(
            "a run with [[stages]] takes its strategies from its stages; leave the top-level "
            f"strategies out (found {', '.join(s.name for s, _ in strategies)})")
    if staged and len(strategies) > 1:
        name = staged[0][0]
        others = [s.name for s, _ in strategies if s.name != name]
        raise ClipftUsageError(
            f"strategy '{name}' defines the stages of the run and is given alone; put "
            f"{', '.join(repr(o) for o in others)} in its options or write the stages out ([[stages]])")
    by, stages = (staged[0] if staged else (None, list(config.stages)))
    if not stages or not all(isinstance(s, Stage) for s in stages):
        raise ClipftError(f"strategy '{by}' returned no list of clipft.specs.Stage from stages()")
    open_ended = [s.name for s in stages if s.epochs is None]
    if open_ended and (len(open_ended) > 1 or stages[-1].epochs is not None):
        raise ClipftUsageError(f"stage '{open_ended[0]}' has no epochs; only the last stage may leave "
                               "them out (it then takes the rest of --epochs)")
    fixed = sum(s.epochs for s in stages if s.epochs is not None)
    where = f"strategy '{by}'" if by else "the stages"
    if open_ended and fixed >= config.epochs:
        raise ClipftUsageError(
            f"{where} take{'s' if by else ''} {fixed} epoch(s) before stage '{stages[-1].name}', which gets "
            f"the rest of --epochs {config.epochs}: nothing is left; pass --epochs N with N > {fixed}")
    if not open_ended and fixed != config.epochs:
        raise ClipftUsageError(
            f"the stages add up to {fixed} epochs but --epochs is {config.epochs}; set epochs = {fixed} "
            "or leave the last stage's epochs out (it then takes the rest)")
    out, start = [], 0
    for st in stages:
        end = start + st.epochs if st.epochs is not None else config.epochs
        refs = [parse_ref(s) for s in st.strategies]
        if any(r.name == "none" for r in refs):
            refs = [r for r in refs if r.name != "none"]
        resolved = [one("strategy", r) for r in refs]
        for spec, opts in resolved:
            if _own_stages(spec, opts) is not None:
                raise ClipftUsageError(f"stage '{st.name}': strategy '{spec.name}' defines stages itself; "
                                       "stages do not nest")
        out.append(ResolvedStage(st.name, resolved, start, end, st.lr, st.head))
        start = end
    return out, by


def _own_stages(spec, opts):
    """The stages a strategy defines (:meth:`clipft.Strategy.stages`), or None."""
    return check_strategy(spec.name, spec.build(opts)).stages()


_TRUE, _FALSE = (True, "true", "1", "yes", "on"), (False, "false", "0", "no", "off")


def resolve_callbacks(refs, registry) -> list:
    """The installed callbacks that are on by default (unless ``none`` is
    selected), then the explicitly selected ones in their order, so that a
    selected callback sees what the defaults did (``mlflow`` logs the
    ``curves.png`` that ``plots`` writes at the run's end). Every callback
    takes the option ``required``, which the engine handles; the rest go to its
    options class."""
    explicit = [r for r in refs if r.name != "none"]
    if any(r.name == "none" and r.options for r in refs):
        raise ClipftUsageError("callback 'none' takes no options")
    names = [r.name for r in explicit]
    if len(set(names)) != len(names):
        raise ClipftUsageError(f"callback '{max(names, key=names.count)}' is given twice; give it once")
    out = []
    if not any(r.name == "none" for r in refs):
        for name in registry.names("callback"):
            spec = registry.get("callback", name)
            if spec.default and name not in names:
                out.append((spec, build_options("callback", spec, {}), False))
    for ref in explicit:
        options = dict(ref.options)
        raw = options.pop("required", False)
        raw = raw.lower() if isinstance(raw, str) else raw
        if raw not in _TRUE + _FALSE:
            raise ClipftUsageError(f"callback '{ref.name}': required must be true or false, got {raw!r}")
        spec = registry.get("callback", ref.name)
        out.append((spec, build_options("callback", spec, options), raw in _TRUE))
    return out


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


def build_strategies(specs_and_options) -> list:
    """``[(name, Strategy)]`` from ``[(spec, options)]``, each checked against
    the protocol."""
    return [(spec.name, check_strategy(spec.name, spec.build(opts))) for spec, opts in specs_and_options]


@attrs.define
class Assembly:
    """A model with its strategies applied and its head built."""

    model: torch.nn.Module
    ctx: BuildContext
    strategies: list          # [(name, Strategy)]
    selections: list
    head: Optional[torch.nn.Module]
    #: state-dict key -> shape of the plain open_clip model, before any strategy
    base_shapes: dict
    #: a later stage of a multi-stage run: the state-dict keys the earlier stages
    #: trained (their checkpoints saved them), which every checkpoint keeps saving
    earlier_keys: frozenset = frozenset()
    #: the strategies of the earlier stages, ``[(name, Strategy)]``
    earlier: list = attrs.field(factory=list)


def assemble(model, *, model_name: str, tokenizer, device, strategies, head=None,
             classnames=None, templates=("a photo of a {}.",), seed: int = 0,
             loss=None, before=()) -> Assembly:
    """Apply ``strategies`` (``[(spec, options)]``) to ``model`` and build
    ``head`` (``(spec, options)`` or None). ``loss`` is the run's ``(spec,
    options)``, or None when the model is rebuilt for inference. ``before``
    (a later stage of a multi-stage run): the strategies of each earlier stage,
    applied first, in order, so that the model has what they inserted; the last
    application (``strategies``) decides what trains."""

    base_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ctx = BuildContext(model=model, model_name=model_name, tokenizer=tokenizer, device=device,
                       classnames=classnames, templates=tuple(templates), seed=seed,
                       loss=loss[0].name if loss else None,
                       loss_needs=frozenset(loss[0].needs) if loss else frozenset(),
                       head=head[0].name if head else None)
    earlier_keys: set = set()
    earlier: list = []
    for k, specs in enumerate([*before, strategies]):
        built = build_strategies(specs)
        selections = apply_strategies(model, built, ctx)
        if k < len(before):   # an earlier stage: what it trained stays in every checkpoint
            earlier_keys |= changed_keys(model, base_shapes)
            earlier += built
    model.to(device)
    head_module = None
    if head is not None:
        head_spec, head_opts = head
        head_module = head_spec.build(head_opts, ctx)
        head_module.to(device)
        if classnames:
            check_head_width(head_module, head_spec.name, len(classnames))
    return Assembly(model=model, ctx=ctx, strategies=built, selections=selections,
                    head=head_module, base_shapes=base_shapes, earlier_keys=frozenset(earlier_keys),
                    earlier=earlier)


def check_head_width(head: torch.nn.Module, name: str, n_classes: int) -> None:
    """A head's logits have one column per class: checked on its first forward
    (training, evaluation or fitting, whichever comes first), so a head of the
    wrong width fails by name rather than deep in the loss or the metrics. The
    check is a forward hook that removes itself once it has passed."""

    def check(module, args, out):
        width = out.shape[-1] if isinstance(out, torch.Tensor) and out.ndim == 2 else None
        if width != n_classes:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            rows = args[0].shape[0] if args and isinstance(args[0], torch.Tensor) else "N"
            raise ClipftError(
                f"head '{name}' returned logits of shape {got} for {rows} image features; expected "
                f"({rows}, {n_classes}): one column for each of the {n_classes} classes in the ctx.classnames "
                "its build received")
        handle.remove()

    handle = head.register_forward_hook(check)


def live_towers(assembly: Assembly) -> set:
    """Towers some strategy (of this stage or an earlier one) keeps out of the
    frozen-tower cache."""
    out: set = set()
    for _, strategy in assembly.earlier + assembly.strategies:
        out |= set(strategy.live_towers(assembly.model, assembly.ctx))
        if strategy.frozen_image_features:   # its frozen features are computed from pixels
            out.add("image")
    return out
