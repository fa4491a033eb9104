"""The signals that stop a command, SIGINT (Ctrl-C), SIGTERM and SIGHUP, and
the exit code of each: 128 + its number, as a shell reports it (130, 143, 129).

:class:`Handlers` installs a handler for the three while a block runs; the
first signal is the command's to act on, a second one exits at once (the way
out when the orderly stop hangs). :class:`Raising` turns the first one into
:class:`clipft.errors.Interrupted` where the program is, so that ``with``
blocks and ``finally`` clean up (``atomic.building_dir`` removes its temporary
folder) as they do for any error.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

from clipft.errors import Interrupted

STOP = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


def describe(signum: int) -> tuple[str, int]:
    """``(name, exit code)`` of a stop signal: ``("SIGTERM", 143)``."""
    return signal.Signals(signum).name, 128 + int(signum)


class Handlers:
    """Calls ``self.first(signum)`` on the first stop signal. Installed only
    in the main thread (Python runs handlers nowhere else)."""

    def __init__(self):
        self.received = None
        self._saved = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in STOP:
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()
        return False

    def _handle(self, signum, frame):
        if self.received is not None:   # the second one: stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        self.first(signum)

    def first(self, signum: int) -> None:
        pass


class Raising(Handlers):
    """The first signal raises ``Interrupted("<SIGNAL>: <message>")`` where the
    program is, except inside :meth:`held`, a step that must not stop half-way
    (the rename that replaces an earlier result): there it waits for the end of
    the step and is raised then, saying ``late`` (the step is done)."""

    def __init__(self, message: str, late: str = ""):
        super().__init__()
        self.message, self.late = message, late or message
        self._holding = self._raised = False

    def first(self, signum: int) -> None:
        if not self._holding:
            self._raise(self.message)

    def _raise(self, message: str):
        name, code = describe(self.received)
        self._raised = True
        raise Interrupted(f"{name}: {message}", code)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
        if self.received is not None and not self._raised:
            self._raise(self.late)
