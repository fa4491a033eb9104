"""The one table of component kinds.

Every place that lists kinds (the registry's hooks and spec checks, what a
plugin record ``provides``, ``clipft describe KIND``, the CLI flags and the TOML
keys) reads :data:`KINDS`. Adding a kind is one :class:`Kind` entry here, plus
its hookspec in :mod:`clipft.hookspecs` and its spec class in :mod:`clipft.specs`.

This module imports only attrs and the (torch-free) spec classes, so it is cheap.
"""
from __future__ import annotations

import difflib
from typing import Optional

import attrs

from clipft.errors import ClipftUsageError
from clipft.specs import CallbackSpec, DataSourceSpec, HeadSpec, LossSpec, StrategySpec


@attrs.frozen
class Kind:
    """One component kind and every name it goes by."""

    #: the kind's name: ``registry.get(name, ...)``, ``provides`` keys, ``describe``
    name: str
    #: plural, accepted by ``clipft describe`` and used in messages
    plural: str
    #: the registration hookspec a plugin implements (must exist in clipft.hookspecs)
    hook: str
    #: the frozen spec class ``register(...)`` accepts for this hook
    spec: type
    #: the ``clipft run`` / ``plan`` / ``sweep`` command-line flag (clipft.cli generates it)
    flag: str
    #: the TOML key: a table ``[key]``, or an array of tables ``[[key]]`` if repeatable
    toml_key: str
    #: the RunConfig attribute holding the component reference(s)
    config_field: str
    #: True: the flag may repeat and the TOML key is an array of tables
    repeatable: bool = False
    #: True: ``none`` (the TOML value or the flag's) means no component of this kind
    can_be_none: bool = False
    #: further names ``clipft describe`` accepts
    aliases: tuple = ()
    #: the flag's help text
    help: str = ""

    @property
    def names(self) -> tuple:
        """Every name this kind answers to, its own first."""
        return (self.name, self.plural, *self.aliases)


KINDS: tuple = (
    Kind(name="strategy", plural="strategies", hook="clipft_register_strategies",
         spec=StrategySpec, flag="--strategy", toml_key="strategy",
         help="Strategy NAME[:k=v,...]; repeat to compose.",
         config_field="strategies", repeatable=True),
    Kind(name="loss", plural="losses", hook="clipft_register_losses",
         spec=LossSpec, flag="--loss", toml_key="loss", config_field="loss",
         help="Loss NAME[:k=v,...] (contrastive, cross-entropy, ...)."),
    Kind(name="head", plural="heads", hook="clipft_register_heads",
         spec=HeadSpec, flag="--head", toml_key="head", config_field="head",
         help="Head NAME[:k=v,...] (linear, zero-shot, ...) or 'none'.",
         can_be_none=True),
    Kind(name="data", plural="data-sources", hook="clipft_register_data_sources",
         spec=DataSourceSpec, flag="--data", toml_key="data", config_field="data",
         help="Data source, e.g. imagefolder:root=PATH or shapes:n=512.",
         aliases=("data-source", "datasource", "datasources")),
    # `--callback none` turns off the callbacks that are on by default
    Kind(name="callback", plural="callbacks", hook="clipft_register_callbacks",
         spec=CallbackSpec, flag="--callback", toml_key="callback", config_field="callbacks",
         help="Callback NAME[:k=v,...] (repeatable); 'none' turns off the default ones.",
         repeatable=True),
)

def kind_names() -> tuple:
    """The kinds' own names, in table order: ``("strategy", "loss", ...)``."""
    return tuple(k.name for k in KINDS)


def aliases() -> dict:
    """Every accepted spelling (lower case) -> the kind's name."""
    return {n.lower(): k.name for k in KINDS for n in k.names}


def by_name() -> dict:
    return {k.name: k for k in KINDS}


def human_list(sep: str = ", ", last: str = " or ") -> str:
    """``strategy, loss, head or data``: for help texts and messages."""
    names = kind_names()
    return names[0] if len(names) == 1 else sep.join(names[:-1]) + last + names[-1]


def find(name: str) -> Optional[Kind]:
    """The kind a name or alias means (case-insensitive), or None."""
    hit = aliases().get(name.lower())
    return by_name()[hit] if hit else None


def lookup(name: str) -> Kind:
    """Like :func:`find`, but an unknown name is a usage error that lists the kinds."""
    k = find(name)
    if k is not None:
        return k
    guess = difflib.get_close_matches(name.lower(), list(aliases()), n=1)
    hint = f" (did you mean '{aliases()[guess[0]]}'?)" if guess else ""
    raise ClipftUsageError(f"unknown kind '{name}'{hint}; use one of {', '.join(kind_names())}")
