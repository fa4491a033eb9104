"""Delivering the loop's events to callbacks, each failure contained.

The built-in observers (progress, metrics.jsonl, checkpoints) are required: if
one fails, the run fails. A user callback that raises is reported once, with
its name, and disabled for the rest of the run, unless it was selected with
``required=true``.
"""
from __future__ import annotations

import json
from typing import Callable, Optional

import attrs

from clipft.callbacks import EVENTS
from clipft.errors import ClipftError


@attrs.define
class Entry:
    name: str
    callback: object
    required: bool = False
    builtin: bool = False   # the engine's own: its errors pass through unchanged
    disabled: bool = False


class CallbackHost:
    def __init__(self, entries=(), warn: Optional[Callable[[str], None]] = None):
        self.entries: list[Entry] = list(entries)
        self.warn = warn or (lambda msg: None)
        #: (name, event, error) of each callback disabled after it raised
        self.failures: list[tuple] = []

    def add(self, name: str, callback, required: bool = False, builtin: bool = False) -> None:
        self.entries.append(Entry(name, callback, required or builtin, builtin))

    def fire(self, event: str, *args) -> None:
        assert event in EVENTS, event
        for e in self.entries:
            self._call(e, event, *args)

    def _call(self, e: Entry, method: str, *args):
        """``e.callback.method(*args)``, a failure contained as :meth:`fire` says;
        None when it is disabled, lacks the method or failed."""
        if e.disabled:
            return None
        fn = getattr(e.callback, method, None)
        if fn is None:
            return None
        try:
            return fn(*args)
        except ClipftError:
            raise
        except BaseException as exc:  # noqa: BLE001 - a plugin's callback must not stop training
            # the engine's own observers, and interrupts, are not contained
            if e.builtin or not isinstance(exc, Exception):
                raise
            return self._failed(e, method, exc)

    def abort(self, error: BaseException) -> None:
        """``on_run_abort(error)`` to each callback still enabled: the run ends
        with ``error``. A callback failing here is reported and nothing more,
        so that ``error`` stays the one the run ends with."""
        for e in self.entries:
            fn = None if e.disabled else getattr(e.callback, "on_run_abort", None)
            if fn is None:
                continue
            try:
                fn(error)
            except Exception as exc:  # noqa: BLE001 - the run's own error is the one to raise
                self.warn(f"callback '{e.name}' failed in on_run_abort ({type(exc).__name__}: {exc})")

    def _failed(self, e: Entry, method: str, exc: Exception) -> None:
        if e.required:
            raise ClipftError(f"callback '{e.name}' failed in {method}: "
                              f"{type(exc).__name__}: {exc}") from exc
        e.disabled = True
        self.failures.append((e.name, method, f"{type(exc).__name__}: {exc}"))
        self.warn(f"callback '{e.name}' failed in {method} ({type(exc).__name__}: {exc}); "
                  "it is disabled for the rest of the run (select it with required=true "
                  "to make its failure stop the run)")

    def _jsonable(self, e: Entry, method: str, value):
        """``value`` if it is a dict JSON can write, else None (reported like a failure)."""
        if value is None:
            return None
        try:
            if not isinstance(value, dict):
                raise TypeError(f"returned a {type(value).__name__}, not a dict")
            json.dumps(value, allow_nan=True)
            return value
        except (TypeError, ValueError) as exc:
            return self._failed(e, method, TypeError(f"must return a JSON-serialisable dict: {exc}"))

    def states(self) -> dict:
        """``{name: state_dict()}`` of the plugins' callbacks that have a state."""
        out = {}
        for e in self.entries:
            if not e.builtin:
                st = self._jsonable(e, "state_dict", self._call(e, "state_dict"))
                if st:
                    out[e.name] = st
        return out

    def load_states(self, states: dict) -> None:
        """Give each callback the state a checkpoint saved for it (a resume)."""
        for e in self.entries:
            if not e.builtin and e.name in (states or {}):
                self._call(e, "load_state_dict", states[e.name])

    def sections(self) -> dict:
        """``{name: summary_section()}`` of the callbacks that add one to summary.json."""
        out = {}
        for e in self.entries:
            if not e.builtin:
                section = self._jsonable(e, "summary_section", self._call(e, "summary_section"))
                if section is not None:
                    out[e.name] = section
        return out

