"""Counters of what the cache served and what building it cost (the
``cache`` block of ``summary.json``)."""
from __future__ import annotations

import contextlib
import time


class CacheStats:
    """Hits (served from the cache) and misses (computed into it) per tower,
    seconds spent building, bytes held, and a line per part saying what was
    cached or why not."""

    def __init__(self, plan, location: str):
        cut = plan.cut
        self._d = {
            "hits": 0, "misses": 0, "build_seconds": 0.0,
            "image_hits": 0, "image_misses": 0, "text_hits": 0, "text_misses": 0,
            "image": f"{cut.describe()} ({plan.image_reason})" if cut is not None else f"off ({plan.image_reason})",
            "text": f"on ({plan.text_reason})" if plan.text else f"off ({plan.text_reason})",
            "class_prompts": "on" if plan.classes else f"off ({plan.classes_reason})",
            "location": location,
            "bytes": 0, "loaded_from_disk": 0,
        }

    def count(self, tower: str, hits: int = 0, misses: int = 0) -> None:
        for key, n in (("hits", hits), ("misses", misses)):
            self._d[key] += n
            self._d[f"{tower}_{key}"] += n

    @contextlib.contextmanager
    def building(self):
        """Time spent computing or loading cached values."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._d["build_seconds"] += time.perf_counter() - t0

    def held(self, nbytes: int, from_disk: int = 0) -> None:
        self._d["bytes"] += nbytes
        self._d["loaded_from_disk"] += from_disk

    def note(self, key: str, text: str) -> None:
        """A per-split line, e.g. ``train_image: live (random train augmentation)``."""
        self._d[key] = text

    def warn(self, text: str) -> None:
        self._d.setdefault("warnings", []).append(text)

    def __getitem__(self, key):
        return self._d[key]

    def get(self, key, default=None):
        return self._d.get(key, default)

    def to_dict(self) -> dict:
        return dict(self._d)
