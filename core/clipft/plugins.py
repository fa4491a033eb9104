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
import json
import os
import re
import signal
import sys
import threading
import traceback
from pathlib import Path
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

    Load order (entry-point name) says nothing of which side is the newcomer
    (``clipft_myfull`` sorts before ``full``); install time does: a plugin that
    clashes was almost always installed after the working set, built-ins included.
    Ties and unknown times (in-process plugins) fall back to load order."""
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


#: The built-in plugins (``plugins/<distribution>/`` in the repository) and what
#: each provides, so that the core installed alone can say which distribution a
#: missing component comes with. tests/test_install.py holds it to the plugins'
#: own registrations and to the folders under plugins/.
BUILTIN_PLUGINS: dict = {
    "clipft-bitfit": {"strategy": ("bitfit",)},
    "clipft-clip-adapter": {"strategy": ("clip-adapter",)},
    "clipft-cocoop": {"strategy": ("cocoop",)},
    "clipft-csv": {"callback": ("csv",)},
    "clipft-data": {"data": ("imagefolder", "captions", "shapes")},
    "clipft-differential-lr": {"strategy": ("differential-lr",)},
    "clipft-ema": {"strategy": ("ema",)},
    "clipft-freeze-text": {"strategy": ("freeze-text",)},
    "clipft-freeze-vision": {"strategy": ("freeze-vision",)},
    "clipft-full": {"strategy": ("full",)},
    "clipft-heads": {"head": ("linear", "zero-shot", "text")},
    "clipft-hf": {"data": ("hf",)},
    "clipft-last-n": {"strategy": ("last-n",)},
    "clipft-logit-scale": {"strategy": ("logit-scale",)},
    "clipft-lora": {"strategy": ("lora",)},
    "clipft-losses": {"loss": ("contrastive", "siglip", "cross-entropy")},
    "clipft-lp-ft": {"strategy": ("lp-ft",)},
    "clipft-maple": {"strategy": ("maple",)},
    "clipft-mlflow": {"callback": ("mlflow",)},
    "clipft-plots": {"callback": ("plots",)},
    "clipft-projections": {"strategy": ("projections",)},
    "clipft-probes": {"head": ("taskres", "clap")},
    "clipft-prompt": {"strategy": ("prompt",)},
    "clipft-promptsrc": {"strategy": ("promptsrc",)},
    "clipft-reproject": {"strategy": ("reproject",)},
    "clipft-tensorboard": {"callback": ("tensorboard",)},
    "clipft-tip-adapter": {"head": ("tip-adapter",)},
    "clipft-vision-prompt": {"strategy": ("vision-prompt",)},
    "clipft-webdataset": {"data": ("webdataset",)},
}


def builtin_distribution(kind: str, name: str) -> Optional[str]:
    """The built-in plugin distribution that provides ``kind`` ``name``, if one does."""
    return next((d for d, p in BUILTIN_PLUGINS.items() if name in p.get(kind, ())), None)


INSTALL_ALL = ("The core and every built-in plugin, from a clone: pip install . ./plugins/* "
               "(docs/usage.md, Installing).")


def install_hint(distribution: str) -> str:
    return f"pip install {distribution} (or pip install ./plugins/{distribution} from a clone)"


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


# -- the provides cache ----------------------------------------------------------
# What each installed entry point provided when it was last imported, keyed by
# its distribution, version, install time and target, so that a command can
# import only the distributions it needs (Registry.load(only=...)) and `clipft
# runs` can show options against their defaults without importing any plugin.
# A plugin that changes without a reinstall (an editable one) is still found:
# a name the cache does not place loads every pending distribution.
CACHE_ENV = "CLIPFT_CACHE_DIR"
CACHE_FORMAT = 1


def cache_path() -> Path:
    """``$CLIPFT_CACHE_DIR/plugins.json``, else ``$XDG_CACHE_HOME/clipft/`` or ``~/.cache/clipft/``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "clipft")
    return Path(root) / "plugins.json"


def _fingerprint(ep) -> str:
    dist = ep.dist
    where = _installed_at(dist) if dist is not None else None
    return "|".join(map(str, (dist.name if dist else "?", dist.version if dist else "?", where, ep.name, ep.value)))


def _pairs(provides: dict) -> set:
    return {(k, n) for k, names in provides.items() for n in names}


def _read_cache() -> Optional[dict]:
    try:
        doc = json.loads(cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    ok = isinstance(doc, dict) and doc.get("format") == CACHE_FORMAT and isinstance(doc.get("entries"), dict)
    return doc["entries"] if ok else None


def _jsonable_default(value):
    """A default as TOML/JSON would hold it (tuples as lists), or a marker that
    it cannot be compared (such an option is always shown)."""
    if isinstance(value, (list, tuple)):
        items = [_jsonable_default(v) for v in value]
        return _UNCOMPARABLE if _UNCOMPARABLE in items else items
    return value if value is None or isinstance(value, (str, int, float, bool)) else _UNCOMPARABLE


_UNCOMPARABLE = "<clipft: not comparable>"


def _write_cache(records: list, eps: list, components: dict) -> None:
    """Record what every entry point of a full load provided; best effort (a
    read-only home is no error: the next command loads everything again)."""
    from clipft import atomic
    from clipft.options import describe_options
    by_name = {r.name: r for r in records if not r.distribution.startswith("<in-process")}
    entries = {}
    for ep in eps:
        rec = by_name.get(ep.name)
        if rec is None or rec.status == "disabled":
            continue
        provides = {k: list(v) for k, v in rec.provides.items() if v}
        defaults, default_callbacks = {}, []
        for kind, names in provides.items():
            for name in names:
                hit = components[kind].get(name)
                if hit is None or hit[1] is not rec:
                    continue
                spec = hit[0]
                if kind == "callback" and getattr(spec, "default", False):
                    default_callbacks.append(name)
                try:
                    rows = describe_options(spec)
                except Exception:  # noqa: BLE001 - an options class we cannot read: no defaults
                    continue
                defaults.setdefault(kind, {})[name] = {
                    r["name"]: d for r in rows if not r["required"]
                    and (d := _jsonable_default(r["default"])) != _UNCOMPARABLE}
        entries[_fingerprint(ep)] = {"status": rec.status, "error": rec.error, "provides": provides,
                                     "default_callbacks": default_callbacks, "defaults": defaults}
    if _read_cache() == entries:
        return
    try:
        path = cache_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(path, {"format": CACHE_FORMAT, "entries": entries})
    except OSError:
        pass


class _ImportJournal:
    """``importing-PID``: the fingerprint of the entry point this process is
    importing, removed when the import is over however it ended. A plugin that
    ends the process at import (``os._exit``, a segfault) leaves it behind with a
    dead pid, and the next command skips that plugin as failed
    (:func:`_killed_importers`) instead of dying the same way."""

    def __init__(self):
        self.path = cache_path().parent / f"importing-{os.getpid()}"

    @contextlib.contextmanager
    def importing(self, ep):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(_fingerprint(ep), encoding="utf-8")
            written = True
        except OSError:
            written = False
        try:
            yield
        finally:
            if written:
                with contextlib.suppress(OSError):
                    self.path.unlink()


def _killed_importers() -> dict:
    """Fingerprint -> journal file, for imports that ended their process (see
    :class:`_ImportJournal`); removing the file retries the plugin."""
    from clipft.atomic import pid_alive
    out = {}
    for f in cache_path().parent.glob("importing-*"):
        pid = f.name.rpartition("-")[2]
        if pid.isdigit() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError, UnicodeDecodeError):
                out[f.read_text(encoding="utf-8").strip()] = f
    return out


def cached_defaults(kind: str, name: str) -> Optional[dict]:
    """The option defaults of ``kind`` ``name`` as the provides cache recorded
    them (one provider only), or None: for showing a run's options without
    importing any plugin (``clipft runs``)."""
    entries = _read_cache() or {}
    found = [e["defaults"][kind][name] for e in entries.values()
             if isinstance(e, dict) and name in (e.get("defaults") or {}).get(kind, {})]
    return found[0] if len(found) == 1 else None


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

    Whatever plugin code raises fails that plugin only, except a SIGINT really
    delivered while the plugins load: the user wants the command to stop. This
    wraps the SIGINT handler to note delivery; signals reach only the main thread,
    so elsewhere (or when SIGINT is ignored or default) it is the plugin's own."""

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
    """One message per ``@hookimpl`` of ``obj`` that matches no hookspec (per
    plugin, unlike pluggy's ``check_pending()``, so one bad plugin fails alone;
    ``optionalhook=True`` opts out)."""
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
        #: entry points the provides cache says this command need not import (yet)
        self._pending: list = []
        #: entry points the provides cache recorded as failed (retried on a miss)
        self._failed_before: list = []

    # -- loading -----------------------------------------------------------
    def load(self, only: Optional[Iterable[tuple]] = None) -> "Registry":
        """Load the plugins. With ``only`` (the ``(kind, name)`` pairs the command
        will look up) and a provides cache that knows every installed entry point
        as it is now, only the distributions providing those names (or a default
        callback) are imported; the others load when a lookup needs them. Else
        all load."""
        if self._loaded:
            return self
        self._loaded = True
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        eps = (sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
               if self._use_entry_points else [])
        killers = _killed_importers()
        cached = _read_cache() if only is not None else None
        blocked = {ep.name for ep in eps if ep.name in self._disabled
                   or (ep.dist is not None and ep.dist.name in self._disabled)}
        lazy = cached is not None and all(_fingerprint(ep) in cached for ep in eps if ep.name not in blocked)
        wanted = set(only or ())
        todo = []
        for ep in eps:
            dist = ep.dist.name if ep.dist is not None else "?"
            rec = PluginRecord(name=ep.name, distribution=dist,
                               version=ep.dist.version if ep.dist is not None else "?",
                               disable_as=dist if ep.dist is not None else ep.name,
                               installed_at=_installed_at(ep.dist))
            self.records.append(rec)
            if ep.name in blocked:
                rec.status = "disabled"
                continue
            if _fingerprint(ep) in killers:   # it ended the last process that imported it
                rec.status, rec.error = "failed", (
                    "ended the process that imported it (os._exit or a fatal signal at import); "
                    f"skipped until it is reinstalled or {killers[_fingerprint(ep)]} is removed")
                continue
            entry = cached.get(_fingerprint(ep)) if lazy else None
            if entry is None:
                todo.append((ep, rec))
                continue
            rec.provides = {k: list(entry["provides"].get(k, ())) for k in kinds.kind_names()}
            if entry["status"] == "failed":   # known to fail as installed: tried again only on a miss
                rec.status, rec.error = "failed", entry["error"]
                self._failed_before.append((ep, rec))
            elif wanted & _pairs(rec.provides) or entry.get("default_callbacks"):
                todo.append((ep, rec))
            else:
                self._pending.append((ep, rec))
        self._import(todo, extras=True)
        if not lazy:
            _write_cache(self.records, eps, self.components)
        return self

    def _import(self, todo: list, extras: bool = False) -> None:
        """Import and register ``(entry point, record)`` pairs (and, once, the
        in-process plugins); whatever a plugin does wrong fails it alone."""
        pm, loaded = self._pm, []
        with _InterruptWatch() as watch, contextlib.redirect_stdout(sys.stderr):
            # stdout is the command's result (--json: one document): whatever a
            # plugin prints while it loads goes to stderr
            journal = _ImportJournal()
            for ep, rec in todo:
                rec.provides = {k: [] for k in kinds.kind_names()}
                try:
                    with journal.importing(ep):
                        obj = ep.load()
                    _register(pm, obj, name=f"{rec.distribution}:{ep.name}")
                except BaseException as exc:  # a broken plugin must not break the rest
                    if watch.is_host_interrupt(exc):
                        raise
                    rec.status, rec.error = "failed", _error_text(exc)
                    continue
                loaded.append((obj, rec))
            for i, obj in enumerate(self._extra if extras else ()):
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
                loaded.append((obj, rec))
            for obj, rec in loaded:
                self._collect(pm, obj, rec, watch)
        order = {id(r): i for i, r in enumerate(self.records)}
        for rec in self.records:
            rec.conflicts = []
        for (kind, name), owners in self._conflicts.items():
            owners[:] = _newest_last(owners, order)
            for rec in owners:
                rec.conflicts.append({"kind": kind, "name": name, "with": [
                    r.distribution for r in owners if r is not rec]})

    def _load_pending(self, needs=lambda rec: True) -> None:
        """Import the not-yet-loaded distributions whose cached record ``needs``."""
        todo = [(ep, rec) for ep, rec in self._pending if needs(rec)]
        if todo:
            self._pending = [x for x in self._pending if x not in todo]
            self._import(todo)

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
        kind = kinds.lookup(kind).name
        self._load_pending(lambda rec: bool(rec.provides[kind]))
        return sorted(self.components[kind])

    def conflicts(self) -> dict:
        """``(kind, name)`` -> the records that all register it, oldest install first."""
        self.load()
        self._load_pending()
        return {key: list(owners) for key, owners in self._conflicts.items()}

    def _ensure(self, kind: str, name: str) -> None:
        """Every distribution that provides ``kind`` ``name`` is loaded (all of
        them when the name is unknown to what is loaded and cached)."""
        self._load_pending(lambda rec: name in rec.provides[kind])
        if name not in self.components[kind]:
            self._load_pending()
        if name not in self.components[kind] and self._failed_before:
            # a plugin that failed when the cache was written may work now (its
            # missing dependency installed since): try those before "unknown"
            retry, self._failed_before = self._failed_before, []
            for _, rec in retry:
                rec.status, rec.error = "active", None
            self._import(retry)

    def _resolve(self, kind: str, name: str) -> str:
        """The kind's own name, with every provider of ``name`` loaded and no conflict on it."""
        self.load()
        kind = kinds.lookup(kind).name
        self._ensure(kind, name)
        owners = self._conflicts.get((kind, name))
        if owners:
            raise PluginConflictError(conflict_message(kind, name, owners))
        return kind

    def get(self, kind: str, name: str):
        kind = self._resolve(kind, name)
        hit = self.components[kind].get(name)
        if hit is None:
            raise ClipftUsageError(self._unknown_message(kind, name))
        return hit[0]

    def _unknown_message(self, kind: str, name: str) -> str:
        names = self.names(kind)
        builtin = builtin_distribution(kind, name)
        if builtin and not any(_normal(r.distribution) == builtin for r in self.records):
            return self._missing_builtin(kind, name, names, builtin) + self._failed_others([])
        msg = f"unknown {kind} '{name}'"
        guess = difflib.get_close_matches(name, names, n=1)
        if guess:
            msg += f" (did you mean '{guess[0]}'?)"
        msg += f". Available: {', '.join(names) or '(none installed)'}."
        # A plugin named after the component is installed: say what became of it
        # rather than suggest installing it again.
        named = [r for r in self.records
                 if _names_plugin(name, r) or _normal(r.distribution) == builtin]
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
        elif kind == "data" and Path(name).expanduser().exists():
            # a folder or file in the working directory, named without ./
            msg += (f" '{name}' is a {'folder' if Path(name).expanduser().is_dir() else 'file'} here: "
                    f"write --data ./{name} to read it.")
        else:
            msg += (f" Install a plugin that provides it (e.g. `pip install clipft-{name}`) "
                    "and check `clipft plugins`.")
            if not names:
                msg += " " + INSTALL_ALL
        return msg + self._failed_others(failed)

    def _failed_others(self, told: list) -> str:
        others = [r for r in self.records if r.status == "failed" and r not in told]
        return (" Plugins that failed to load: " + ", ".join(
            f"{r.distribution} ({r.error})" for r in others) + ".") if others else ""

    def _missing_builtin(self, kind: str, name: str, names: list, builtin: str) -> str:
        """A built-in component whose distribution is not installed (the core
        alone, or installed without that plugin): what to install."""
        one = install_hint(builtin)
        if not self.records:
            return (f"no clipft plugins are installed ({kind} '{name}' comes with {builtin}). "
                    f"{INSTALL_ALL} This one alone: {one}.")
        if not names:
            plural = kinds.lookup(kind).plural.replace("-", " ")
            return f"no {plural} are installed ({kind} '{name}' comes with {builtin}): {one}."
        return f"{kind} '{name}' is not installed: {one}. Available: {', '.join(names)}."

    def distribution_of(self, kind: str, name: str) -> str:
        return self.components[self._resolve(kind, name)][name][1].distribution
