"""Plugin discovery and the component registry.

Plugins are found through the ``clipft`` entry-point group and loaded only when a
command needs them. Built-in plugins are ordinary distributions under
``plugins/`` and go through exactly the same path as third-party ones.

The core calls every hookimpl itself (rather than ``pm.hook.x()``) so that it
knows which distribution registered which component, can report a plugin whose
hook raises as ``failed`` without losing the others, and can name both sides of
a duplicate registration.

Containment: whatever a plugin does wrong (fails to import, exits or raises
``KeyboardInterrupt`` there, implements a hook that does not exist, raises in a
hook, registers the wrong spec type) fails that plugin only. A name registered
by two distributions is recorded as a conflict on both records; it fails only a
lookup of that name, so ``clipft plugins`` still shows what is installed.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib.metadata as md
import os
import re
import signal
import sys
import threading
import traceback
from typing import Iterable, Optional

import attrs
import pluggy

from clipft import hookspecs, kinds
from clipft.errors import ClipftUsageError, PluginConflictError

ENTRY_POINT_GROUP = "clipft"
DISABLE_ENV = "CLIPFT_DISABLE_PLUGINS"


@attrs.define
class PluginRecord:
    """One loaded (or failed, or disabled) plugin and what it provides."""

    name: str           # entry-point name, or the name given in-process
    distribution: str
    version: str
    status: str = "active"  # active | failed | disabled
    error: Optional[str] = None
    provides: dict = attrs.field(factory=lambda: {k: [] for k in kinds.kind_names()})
    #: names this plugin provides that another distribution provides too:
    #: ``{"kind", "name", "with": [other distributions]}``; looking one up fails
    conflicts: list = attrs.field(factory=list)
    #: the ``--disable-plugin`` value that blocks exactly this plugin's distribution
    disable_as: str = attrs.field(default="", repr=False)
    #: when its distribution was installed (dist-info mtime); None if unknown
    installed_at: Optional[float] = attrs.field(default=None, repr=False)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "status": self.status,
            "error": self.error,
            "provides": {k: v for k, v in self.provides.items() if v},
            "conflicts": [dict(c) for c in self.conflicts],
        }


def _installed_at(dist) -> Optional[float]:
    """The mtime of a distribution's metadata directory: when pip installed it.

    ``importlib.metadata`` has no public accessor for that directory, so this
    reads ``PathDistribution._path`` and gives up quietly elsewhere.
    """
    path = getattr(dist, "_path", None)
    try:
        return os.stat(path).st_mtime if path is not None else None
    except (OSError, TypeError):
        return None


def _newest_last(owners: list["PluginRecord"], order: dict) -> list["PluginRecord"]:
    """Owners of one name, the one installed first first.

    Which side of a conflict is the newcomer? Sorting by entry-point name (the
    load order) says nothing about it: ``clipft_myfull`` sorts before ``full``,
    so "disable the second" would disable the built-in. The core has no list of
    built-ins either (they are ordinary distributions). What does tell is install
    time: a plugin that clashes was almost always installed after the working
    set, built-ins included. So the newest install is the one to disable; ties and
    unknown times (in-process plugins, which the embedding code adds on top of
    the installed ones) fall back to load order. Both remedies are shown anyway.
    """
    inf = float("inf")
    return sorted(owners, key=lambda r: (r.installed_at if r.installed_at is not None else inf,
                                         order[id(r)]))


def _normal(name: str) -> str:
    """PEP 503-style: ``clipft_My.Plugin`` and ``clipft-my-plugin`` compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _names_plugin(component: str, rec: "PluginRecord") -> bool:
    """Is ``rec`` the plugin a user would install for ``component``?
    (entry-point or distribution name ``X``, ``clipft-X`` or ``clipft_X``)"""
    want = _normal(component)
    for have in (_normal(rec.name), _normal(rec.distribution)):
        if want in (have, have.removeprefix("clipft-")):
            return True
    return False


def _disable_flags(recs) -> str:
    return " ".join(f"--disable-plugin {r.disable_as}" for r in recs)


def conflict_message(kind: str, name: str, owners: list["PluginRecord"]) -> str:
    """Names every distribution registering ``kind`` ``name`` and how to pick one.

    ``owners`` is ordered oldest install first (see :func:`_newest_last`)."""
    both = "two" if len(owners) == 2 else str(len(owners))
    who = " and ".join(f"'{r.distribution}' ({r.name})" for r in owners)
    keep, newer = owners[0], owners[1:]
    msg = (f"{kind} '{name}' is registered by {both} distributions: {who}. Uninstall one, "
           f"or disable the newer install with {_disable_flags(newer)} "
           f"(or {DISABLE_ENV}={','.join(r.disable_as for r in newer)})")
    for other in newer:
        rest = [r for r in owners if r is not other]
        msg += f"; to keep '{other.distribution}' instead: {_disable_flags(rest)}"
    return msg + "."


def disabled_from_env() -> set[str]:
    raw = os.environ.get(DISABLE_ENV, "")
    return {x.strip() for x in raw.split(",") if x.strip()}


def _short_error(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    text = str(exc)
    return f"{type(exc).__name__}{': ' + text if text else ''}{where}"


class _InterruptWatch:
    """Tells a real Ctrl-C apart from a KeyboardInterrupt that plugin code raises.

    Plugin code (its import, its hooks) is contained: any exception it raises,
    ``SystemExit`` and ``KeyboardInterrupt`` included, fails that plugin only. The
    one exception is a SIGINT really delivered to this process while the plugins
    load: the user wants the command to stop, so it propagates. While active this
    wraps the SIGINT handler to note delivery. Signals reach only the main thread,
    so elsewhere (or when SIGINT is ignored or default) any KeyboardInterrupt is the
    plugin's own.
    """

    def __init__(self):
        self.delivered = False
        self._previous = None

    def __enter__(self) -> "_InterruptWatch":
        if threading.current_thread() is not threading.main_thread():
            return self
        previous = signal.getsignal(signal.SIGINT)
        if not callable(previous):
            return self

        def note_and_forward(signum, frame):
            self.delivered = True
            previous(signum, frame)

        signal.signal(signal.SIGINT, note_and_forward)
        self._previous = previous
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def is_host_interrupt(self, exc: BaseException) -> bool:
        return isinstance(exc, KeyboardInterrupt) and self.delivered


class UnknownHookError(Exception):
    """A plugin marks a function ``@hookimpl`` whose name is no clipft hookspec."""


def _where(fn) -> str:
    code = getattr(fn, "__code__", None)
    return f" ({code.co_filename}:{code.co_firstlineno})" if code is not None else ""


def _unknown_hooks(pm: pluggy.PluginManager, obj: object) -> list[str]:
    """One message per ``@hookimpl`` of ``obj`` that matches no hookspec.

    pluggy's ``check_pending()`` finds these for the whole manager at once; asking
    per plugin lets one bad plugin fail alone. ``@hookimpl(optionalhook=True)``
    opts out, as it does for ``check_pending()``.
    """
    known = sorted(name for name in vars(pm.hook) if not name.startswith("_")
                   and getattr(pm.hook, name).has_spec())
    problems = []
    for caller in pm.get_hookcallers(obj) or []:
        if caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            if impl.plugin is not obj or impl.optionalhook:
                continue
            guess = difflib.get_close_matches(caller.name, known, n=1)
            hint = (f"did you mean '{guess[0]}'?" if guess
                    else f"clipft hooks are {', '.join(known)}")
            problems.append(f"'{caller.name}' is not a clipft hook ({hint}){_where(impl.function)}")
    return problems


def _register(pm: pluggy.PluginManager, obj: object, name: str) -> None:
    """Register ``obj``, or raise (with ``obj`` left unregistered) when pluggy
    rejects it or it implements a hook that does not exist (a misspelt hook
    would otherwise register nothing, silently)."""
    pm.register(obj, name=name)
    problems = _unknown_hooks(pm, obj)
    if problems:
        pm.unregister(obj)
        raise UnknownHookError("; ".join(problems))


def _error_text(exc: BaseException) -> str:
    # our own message already says where; a traceback frame in this file would not help
    return str(exc) if isinstance(exc, UnknownHookError) else _short_error(exc)


class Registry:
    """Loads plugins and indexes their components by kind and name."""

    def __init__(
        self,
        plugins: Iterable[object] = (),
        disabled: Iterable[str] = (),
        entry_points: bool = True,
    ):
        self._extra = list(plugins)
        self._disabled = set(disabled) | disabled_from_env()
        self._use_entry_points = entry_points
        self._loaded = False
        self.records: list[PluginRecord] = []
        self.components: dict[str, dict[str, tuple[object, PluginRecord]]] = {
            k: {} for k in kinds.kind_names()}
        #: (kind, name) -> every record registering it, oldest install first
        self._conflicts: dict[tuple[str, str], list[PluginRecord]] = {}

    # -- loading -----------------------------------------------------------
    def load(self) -> "Registry":
        if self._loaded:
            return self
        self._loaded = True
        # stdout is the command's result (--json: one document): whatever a
        # plugin prints while it loads goes to stderr
        with _InterruptWatch() as watch, contextlib.redirect_stdout(sys.stderr):
            self._load(watch)
        return self

    def _load(self, watch: _InterruptWatch) -> None:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        pending: list[tuple[object, PluginRecord]] = []

        if self._use_entry_points:
            for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
                dist = ep.dist.name if ep.dist is not None else "?"
                version = ep.dist.version if ep.dist is not None else "?"
                rec = PluginRecord(name=ep.name, distribution=dist, version=version,
                                   disable_as=dist if ep.dist is not None else ep.name,
                                   installed_at=_installed_at(ep.dist))
                self.records.append(rec)
                if ep.name in self._disabled or dist in self._disabled:
                    rec.status = "disabled"
                    continue
                try:
                    obj = ep.load()
                    _register(pm, obj, name=f"{dist}:{ep.name}")
                except BaseException as exc:  # a broken plugin must not break the rest
                    if watch.is_host_interrupt(exc):
                        raise
                    rec.status, rec.error = "failed", _error_text(exc)
                    continue
                pending.append((obj, rec))

        for i, obj in enumerate(self._extra):
            name = getattr(obj, "__name__", None) or type(obj).__name__
            rec = PluginRecord(name=name, distribution=f"<in-process:{name}>", version="-",
                               disable_as=name)
            self.records.append(rec)
            if name in self._disabled:
                rec.status = "disabled"
                continue
            try:
                _register(pm, obj, name=f"in-process:{i}:{name}")
            except BaseException as exc:
                if watch.is_host_interrupt(exc):
                    raise
                rec.status, rec.error = "failed", _error_text(exc)
                continue
            pending.append((obj, rec))

        for obj, rec in pending:
            self._collect(pm, obj, rec, watch)

        order = {id(r): i for i, r in enumerate(self.records)}
        for (kind, name), owners in self._conflicts.items():
            owners[:] = _newest_last(owners, order)
            for rec in owners:
                rec.conflicts.append({"kind": kind, "name": name, "with": [
                    r.distribution for r in owners if r is not rec]})

    def _collect(self, pm: pluggy.PluginManager, obj: object, rec: PluginRecord,
                 watch: _InterruptWatch) -> None:
        staged: list[tuple[str, object]] = []
        for kind in kinds.KINDS:
            for impl in getattr(pm.hook, kind.hook).get_hookimpls():
                if impl.plugin is not obj:
                    continue

                def register(spec, _kind=kind):
                    if not isinstance(spec, _kind.spec):
                        raise TypeError(f"{_kind.hook} expects {_kind.spec.__name__} objects, "
                                        f"got {type(spec).__name__}")
                    staged.append((_kind.name, spec))

                try:
                    impl.function(register=register)
                except BaseException as exc:
                    if watch.is_host_interrupt(exc):
                        raise
                    rec.status, rec.error = "failed", _short_error(exc)
                    return
        # Only a plugin whose hooks all succeeded contributes components.
        for kind, spec in staged:
            existing = self.components[kind].get(spec.name)
            if existing is not None and existing[1] is not rec:
                # Not fatal here: listing plugins (and every run that does not use
                # this name) keeps working; looking the name up fails, naming both.
                owners = self._conflicts.setdefault((kind, spec.name), [existing[1]])
                if rec not in owners:
                    owners.append(rec)
            else:
                self.components[kind][spec.name] = (spec, rec)
            if spec.name not in rec.provides[kind]:
                rec.provides[kind].append(spec.name)

    # -- lookup ------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        self.load()
        return sorted(self.components[kinds.lookup(kind).name])

    def conflicts(self) -> dict:
        """``(kind, name)`` -> the records that all register it, oldest install first."""
        self.load()
        return {key: list(owners) for key, owners in self._conflicts.items()}

    def _check_unambiguous(self, kind: str, name: str) -> None:
        owners = self._conflicts.get((kind, name))
        if owners:
            raise PluginConflictError(conflict_message(kind, name, owners))

    def get(self, kind: str, name: str):
        self.load()
        kind = kinds.lookup(kind).name
        self._check_unambiguous(kind, name)
        hit = self.components[kind].get(name)
        if hit is None:
            raise ClipftUsageError(self._unknown_message(kind, name))
        return hit[0]

    def _unknown_message(self, kind: str, name: str) -> str:
        names = self.names(kind)
        msg = f"unknown {kind} '{name}'"
        guess = difflib.get_close_matches(name, names, n=1)
        if guess:
            msg += f" (did you mean '{guess[0]}'?)"
        msg += f". Available: {', '.join(names) or '(none installed)'}."
        # A plugin named after the component is installed: say what became of it
        # rather than suggest installing it again.
        named = [r for r in self.records if _names_plugin(name, r)]
        failed = [r for r in named if r.status == "failed"]
        disabled = [r for r in named if r.status == "disabled"]
        active = [r for r in named if r.status == "active"]
        if failed:
            msg += " The plugin that should provide it failed to load: " + "; ".join(
                f"{r.distribution} ({r.name}): {r.error}" for r in failed) + \
                ". Fix or reinstall it; see `clipft plugins`."
        elif disabled:
            msg += " The plugin that should provide it is disabled: " + ", ".join(
                f"{r.distribution} ({r.name})" for r in disabled) + \
                f" (by --disable-plugin or {DISABLE_ENV})."
        elif active:
            msg += " " + "; ".join(
                f"{r.distribution} is installed and provides " + (", ".join(
                    f"{k} '{n}'" for k, v in r.provides.items() for n in v) or "nothing")
                for r in active) + "."
        else:
            msg += (f" Install a plugin that provides it (e.g. `pip install clipft-{name}`) "
                    "and check `clipft plugins`.")
        others = [r for r in self.records if r.status == "failed" and r not in failed]
        if others:
            msg += " Plugins that failed to load: " + ", ".join(
                f"{r.distribution} ({r.error})" for r in others) + "."
        return msg

    def distribution_of(self, kind: str, name: str) -> str:
        self.load()
        kind = kinds.lookup(kind).name
        self._check_unambiguous(kind, name)
        return self.components[kind][name][1].distribution
