"""Delivering the loop's events to callbacks, each failure contained.

The built-in observers (progress, metrics.jsonl, checkpoints) are required: if
one fails, the run fails. A user callback that raises is reported once, with
its name, and disabled for the rest of the run, unless it was selected with
``required=true``.
"""
from __future__ import annotations

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
            if e.disabled:
                continue
            fn = getattr(e.callback, event, None)
            if fn is None:
                continue
            try:
                fn(*args)
            except ClipftError:
                raise
            except BaseException as exc:  # noqa: BLE001 - a plugin's callback must not stop training
                # the engine's own observers, and interrupts, are not contained
                if e.builtin or not isinstance(exc, Exception):
                    raise
                if e.required:
                    raise ClipftError(f"callback '{e.name}' failed in {event}: "
                                      f"{type(exc).__name__}: {exc}") from exc
                e.disabled = True
                self.failures.append((e.name, event, f"{type(exc).__name__}: {exc}"))
                self.warn(f"callback '{e.name}' failed in {event} ({type(exc).__name__}: {exc}); "
                          "it is disabled for the rest of the run (select it with required=true "
                          "to make its failure stop the run)")
