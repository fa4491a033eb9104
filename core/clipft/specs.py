"""Frozen spec objects that plugins hand to the ``register`` callbacks.

Each spec names a component, summarises it, points at an attrs ``options`` class
(whose fields carry type, default, validator and help in ``metadata["help"]``)
and a ``build`` factory. The core validates user options against ``options``
before it calls ``build``.

Which spec class goes with which kind (and hook) is in the table in
:mod:`clipft.kinds`, which imports this module (never the other way round).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import attrs

# Needs a loss can declare; the core checks them before training starts.
NEED_TEXT = "text"      # paired text for every image (captions or class prompts)
NEED_LABELS = "labels"  # integer class labels
NEED_HEAD = "head"      # a classification head producing logits
NEED_CLASS_TEXT = "class-text"  # the step's class-prompt embeddings (ForwardRecord.class_text_features)


@attrs.frozen
class NoOptions:
    """Options class for components that take none."""


@attrs.frozen
class StrategySpec:
    name: str
    summary: str
    build: Callable[[Any], Any]
    options: type = NoOptions
    #: Learning rate used when the user gives none (first strategy wins).
    default_lr: Optional[float] = None
    #: The same for a randomly initialised model (``--pretrained none``); None:
    #: the engine's random-init default, or ``default_lr`` when that is higher
    #: (``default_lr`` is meant for pretrained weights, which need small steps).
    default_lr_scratch: Optional[float] = None


@attrs.frozen
class LossSpec:
    name: str
    summary: str
    build: Callable[[Any], Any]
    options: type = NoOptions
    needs: frozenset = attrs.field(default=frozenset(), converter=frozenset)
    #: True when a sample's loss depends on the other samples of its batch
    #: (contrastive, SigLIP): a short last batch gives a value not comparable
    #: with a full one, so such runs drop it by default (``--drop-last``).
    #: False: a per-sample loss averaged over the batch (cross-entropy).
    batch_coupled: bool = False


@attrs.frozen
class HeadSpec:
    name: str
    summary: str
    build: Callable[[Any, Any], Any]
    options: type = NoOptions
    #: True when the head needs class names/prompts (zero-shot, text heads).
    needs_classes: bool = False
    #: True when the head starts from weights derived from the model itself
    #: (class-prompt embeddings), so rebuilding it on the zero-shot model gives
    #: its zero-shot endpoint: WiSE-FT can interpolate it. A randomly
    #: initialised head (``linear``) cannot be interpolated.
    zero_shot_init: bool = False
    #: whether the head's forward encodes text through the live model (the
    #: ``text`` head: gradients reach the text side). False: it never touches
    #: the text tower after it is built (``linear``; ``zero-shot`` encodes its
    #: class prompts once, at build time). None (unknown) is taken as "may",
    #: so the engine never calls a run's trained text side unused because of it.
    encodes_text: Optional[bool] = None
    #: Learning rate used when the user gives none and no strategy of the run
    #: declares one (a head-only run); None: the engine's head-only default.
    default_lr: Optional[float] = None


@attrs.frozen
class DataSourceSpec:
    name: str
    summary: str
    build: Callable[[Any, Any], Any]
    options: type = NoOptions


@attrs.frozen
class CallbackSpec:
    name: str
    summary: str
    #: ``build(options)`` returns a :class:`clipft.callbacks.Callback`
    build: Callable[[Any], Any]
    options: type = NoOptions
    #: on in every run while the plugin is installed (``--callback none`` turns
    #: the defaults off); otherwise only when selected with ``--callback NAME``
    default: bool = False


@attrs.define
class Selection:
    """A group of parameters a strategy wants trained.

    ``weight_decay`` None means "decide per tensor" (no decay on biases, norms,
    embeddings-like 1-d tensors and logit_scale), True/False forces it.
    """

    group: str
    params: list  # list of (qualified_name, nn.Parameter)
    lr_scale: float = 1.0
    weight_decay: Optional[bool] = None
    #: name of the strategy that produced the selection (filled by the core)
    source: str = ""


def _stage_strategies(value) -> tuple:
    if isinstance(value, (str, dict)):
        value = [value]
    out = []
    for v in value or ():
        if isinstance(v, dict):           # a TOML table {name = "...", k = v}
            opts = ",".join(f"{k}={','.join(map(str, x)) if isinstance(x, (list, tuple)) else x}"
                            for k, x in v.items() if k != "name")
            v = f"{v['name']}:{opts}" if opts else str(v["name"])
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"a stage's strategies are references such as 'last-n:n=2', got {v!r}")
        out.append(v.strip())
    return tuple(out)


def _stage_epochs(inst, attribute, value):
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"stage '{inst.name}': epochs must be a positive integer (or left out on the "
                         f"last stage: the rest of --epochs), got {value!r}")


def _stage_lr(inst, attribute, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
        raise ValueError(f"stage '{inst.name}': lr must be a number >= 0, got {value!r}")


@attrs.frozen
class Stage:
    """One stage of a multi-stage run (``[[stages]]`` in a config file, or what a
    staged strategy's :meth:`clipft.Strategy.stages` returns).

    Each stage trains with its own strategies (``strategies``: references as on
    the command line; empty: only the head trains), its own optimizer groups,
    optimizer, schedule and frozen-tower cache plan. A stage's strategies are
    applied on top of the model the previous stages left, so the weights they
    trained carry over, and the head (built once) carries over too.
    """

    name: str
    #: epochs of this stage; None (the last stage only): the rest of ``--epochs``
    epochs: Optional[int] = attrs.field(default=None, validator=_stage_epochs)
    #: strategy references (``"last-n:n=2"``) applied in this stage; () trains only the head
    strategies: tuple = attrs.field(default=(), converter=_stage_strategies)
    #: this stage's base learning rate; None: ``--lr``, else its strategies' default_lr, else the head's (1e-3)
    lr: Optional[float] = attrs.field(default=None, validator=_stage_lr)
    #: whether the head (when the run has one) trains in this stage
    head: bool = True

    def to_table(self) -> dict:
        d = {"name": self.name, "strategies": list(self.strategies), "head": self.head}
        if self.epochs is not None:
            d["epochs"] = self.epochs
        if self.lr is not None:
            d["lr"] = float(self.lr)
        return d
