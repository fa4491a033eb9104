"""The guard for an iterable split (:func:`clipft.data.guard`). It subclasses
torch's IterableDataset, so it lives apart from :mod:`clipft.data`, which must
import without torch; defined at module level, it pickles by name into spawned
DataLoader workers."""
from __future__ import annotations

import torch


class GuardedStream(torch.utils.data.IterableDataset):
    """A stream whose failed samples become ``failed(index)`` markers for
    :func:`clipft.data.collate` (the marker class comes from clipft.data, which
    this module does not import: clipft.data imports it)."""

    def __init__(self, inner, failed):
        self.dataset, self.failed = inner, failed

    def __iter__(self):
        # a stream catches its own per-sample failures (it yields None): one that
        # raises cannot go on, so the exception ends the pass and is reported
        for item in self.dataset:
            if isinstance(item, self.failed):   # already a marker, named by the stream
                yield item
            elif item is None:
                yield self.failed(None)
            elif isinstance(item, tuple) and len(item) == 4 and item[1] is None:
                yield self.failed(item[0])   # (index, None, ...): the stream says which sample failed
            else:
                yield item
