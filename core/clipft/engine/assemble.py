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
from clipft.engine.compose import apply_strategies, check_strategy
from clipft.errors import ClipftUsageError
from clipft.options import ComponentRef, build_options
from clipft.specs import NEED_HEAD


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
    needs = res.loss[0].needs
    if NEED_HEAD in needs and res.head is None:
        raise ClipftUsageError(
            f"loss '{res.loss[0].name}' needs a classification head; add --head linear "
            "(or --head zero-shot)")
    return res


_TRUE, _FALSE = (True, "true", "1", "yes", "on"), (False, "false", "0", "no", "off")


def resolve_callbacks(refs, registry) -> list:
    """The explicitly selected callbacks, then the installed ones that are on
    by default (unless ``none`` is selected). Every callback takes the option
    ``required``, which the engine handles; the rest go to its options class."""
    explicit = [r for r in refs if r.name != "none"]
    if any(r.name == "none" and r.options for r in refs):
        raise ClipftUsageError("callback 'none' takes no options")
    names = [r.name for r in explicit]
    if len(set(names)) != len(names):
        raise ClipftUsageError(f"callback '{max(names, key=names.count)}' is given twice; give it once")
    out = []
    for ref in explicit:
        options = dict(ref.options)
        raw = options.pop("required", False)
        raw = raw.lower() if isinstance(raw, str) else raw
        if raw not in _TRUE + _FALSE:
            raise ClipftUsageError(f"callback '{ref.name}': required must be true or false, got {raw!r}")
        spec = registry.get("callback", ref.name)
        out.append((spec, build_options("callback", spec, options), raw in _TRUE))
    if not any(r.name == "none" for r in refs):
        for name in registry.names("callback"):
            spec = registry.get("callback", name)
            if spec.default and name not in names:
                out.append((spec, build_options("callback", spec, {}), False))
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


def assemble(model, *, model_name: str, tokenizer, device, strategies, head=None,
             classnames=None, templates=("a photo of a {}.",), seed: int = 0,
             loss=None) -> Assembly:
    """Apply ``strategies`` (``[(spec, options)]``) to ``model`` and build
    ``head`` (``(spec, options)`` or None). ``loss`` is the run's ``(spec,
    options)``, or None when the model is rebuilt for inference."""
    base_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ctx = BuildContext(model=model, model_name=model_name, tokenizer=tokenizer, device=device,
                       classnames=classnames, templates=tuple(templates), seed=seed,
                       loss=loss[0].name if loss else None,
                       loss_needs=frozenset(loss[0].needs) if loss else frozenset(),
                       head=head[0].name if head else None)
    built = build_strategies(strategies)
    selections = apply_strategies(model, built, ctx)
    model.to(device)
    head_module = None
    if head is not None:
        head_spec, head_opts = head
        head_module = head_spec.build(head_opts, ctx)
        head_module.to(device)
    return Assembly(model=model, ctx=ctx, strategies=built, selections=selections,
                    head=head_module, base_shapes=base_shapes)


def live_towers(assembly: Assembly) -> set:
    """Towers some strategy keeps out of the frozen-tower cache."""
    out: set = set()
    for _, strategy in assembly.strategies:
        out |= set(strategy.live_towers(assembly.model, assembly.ctx))
    return out
