"""The guard for an iterable split (:func:`clipft.data.guard`). It subclasses
torch's IterableDataset, so it lives apart from :mod:`clipft.data`, which must
import without torch; defined at module level, it pickles by name into spawned
DataLoader workers."""
from __future__ import annotations

import torch

from clipft.data import _Failed


def _guarded_item(item):
    if item is None:
        return _Failed(None)
    if isinstance(item, tuple) and len(item) == 4 and item[1] is None:
        return _Failed(item[0])   # (index, None, ...): the stream says which sample failed
    return item


class GuardedStream(torch.utils.data.IterableDataset):
    """A stream whose failed samples are markers for :func:`clipft.data.collate`."""

    def __init__(self, inner):
        self.dataset = inner

    def __iter__(self):
        # a stream catches its own per-sample failures (it yields None): one that
        # raises cannot go on, so the exception ends the pass and is reported
        for item in self.dataset:
            yield _guarded_item(item)
