"""DataLoaders of a run's train and val splits.

Built once per split and reused across epochs, so worker processes persist
(``persistent_workers``). The train order of epoch ``e`` is the permutation a
``RandomSampler`` seeded with :meth:`Loaders.sampler_seed` gives; an epoch can
start part-way (``skip`` samples in, for a resume from a step checkpoint) and
still yield exactly the rest of that order. :meth:`Loaders.order` yields the
same order as index lists, which is how a cached epoch replays a live one
without touching the images.

A split that is a stream has no sampler: it orders itself, gets each train
pass's seed through its ``set_epoch(seed)``, and its workers start afresh for
every pass so that they see it (the contract is in docs/plugins.md).
"""
from __future__ import annotations

import torch

from clipft.data import Batches, DecodeFailures, collate, guard, is_iterable
from clipft.engine.distributed import SINGLE, rank_share


class _Indices(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


class EpochSampler(torch.utils.data.Sampler):
    """The permutation ``torch.randperm(n)`` under a seeded generator (what
    ``RandomSampler(generator=g)`` yields), from position ``skip`` on. Under
    data parallelism, only this rank's share of it
    (:func:`clipft.engine.distributed.rank_share`)."""

    def __init__(self, n: int, share: list | None = None):
        self.n, self.seed, self.skip = n, 0, 0
        self.share = share
        self.whole = False

    def set_epoch(self, seed: int, skip: int = 0, whole: bool = False) -> None:
        """``whole``: the full permutation, past the share (the tail drop-last leaves out)."""
        self.seed, self.skip, self.whole = seed, skip, whole

    def __len__(self):
        return max(0, (self.n if self.share is None or self.whole else len(self.share)) - self.skip)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(self.n, generator=g).tolist()
        if self.share is not None and not self.whole:
            perm = [perm[i] for i in self.share]
        yield from perm[self.skip:]


def stream_rank_share(n: int) -> int:
    """This rank's part of ``n`` streamed samples: ``n // world`` on every rank
    (ranks must run the same number of steps), ``n`` without torch.distributed."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return n
    return n // dist.get_world_size()


class Loaders:
    def __init__(self, bundle, *, batch_size: int, seed: int, device, num_workers: int = 0,
                 persistent_workers: bool = True, failures: DecodeFailures | None = None, dist=None,
                 drop_last: bool = False):
        self.bundle = bundle
        self.dist = dist or SINGLE
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.num_workers = num_workers
        self.persistent_workers = persistent_workers
        #: distinct samples dropped as undecodable, across all passes
        self.failures = failures if failures is not None else DecodeFailures()
        self._loaders: dict = {}
        #: drop-last asked for on a train split smaller than one (global) batch:
        #: it would leave nothing to train on, so the one short batch trains
        self.drop_last_waived = False
        self._split_train(drop_last)
        if drop_last and self.n_train_batches() == 0 and self.dropped_per_epoch:
            self.drop_last_waived = True
            self._split_train(False)

    def _split_train(self, drop_last: bool) -> None:
        bundle, batch_size = self.bundle, self.batch_size
        #: each epoch's last incomplete (global) batch is left out of training
        self.drop_last = drop_last
        #: this rank's positions in each epoch's permutation (None: all of them)
        self.share = None
        #: train samples left out of every epoch, all ranks together
        self.dropped_per_epoch = 0
        if is_iterable(bundle.train):   # a stream shards itself by rank, and drops in Batches
            if drop_last:
                size, world = bundle.size("train") or 0, self.dist.world
                self.dropped_per_epoch = size - world * batch_size * (size // world // batch_size)
        elif self.dist.enabled or drop_last:
            self.share, self.dropped_per_epoch = rank_share(len(bundle.train), batch_size,
                                                            self.dist.world, self.dist.rank, drop_last)

    def sampler_seed(self, epoch: int) -> int:
        """Seed of the train order in ``epoch`` (a cached epoch replays the same order)."""
        return self.seed * 100003 + epoch

    def length(self, dataset) -> int:
        """Samples one pass over ``dataset`` yields on this rank (a streamed
        train split is shared by the ranks; each rank reads all of a val split)."""
        if not is_iterable(dataset):
            return len(dataset)
        if dataset is self.bundle.train:
            return stream_rank_share(self.bundle.size("train") or 0)
        return self.bundle.size("val") or 0

    def n_batches(self, dataset) -> int:
        return -(-self.length(dataset) // self.batch_size)

    def n_train_batches(self) -> int:
        """Batches of the train split per epoch on this rank."""
        if self.share is not None:
            return -(-len(self.share) // self.batch_size)
        if self.drop_last:   # a stream: its short last batch is dropped
            return self.length(self.bundle.train) // self.batch_size
        return self.n_batches(self.bundle.train)

    def _loader(self, dataset, train: bool, reuse: bool):
        key = (id(dataset), train)
        loader = self._loaders.get(key) if reuse else None
        if loader is None:
            stream = is_iterable(dataset)
            sampler = EpochSampler(len(dataset), self.share) if train and not stream else None
            loader = torch.utils.data.DataLoader(
                guard(dataset), batch_size=self.batch_size, sampler=sampler,
                shuffle=False, num_workers=self.num_workers, collate_fn=collate,
                pin_memory=torch.device(self.device).type == "cuda",  # copies are non_blocking
                persistent_workers=self.num_workers > 0 and self.persistent_workers and not stream,
            )
            if reuse:
                self._loaders[key] = loader
        return loader

    def train(self, epoch: int, skip_batches: int = 0, whole: bool = False) -> Batches:
        """Decoded batches of the train split in ``epoch``'s order, from batch
        ``skip_batches`` on. ``whole`` (one process): with the samples
        drop-last leaves out at the end, as batches from position
        :meth:`n_train_batches` on, for a pass that must see every sample
        (filling a cache) while training on the epoch's batches."""
        loader = self._loader(self.bundle.train, True, reuse=True)
        if is_iterable(self.bundle.train):
            set_epoch = getattr(self.bundle.train, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(self.sampler_seed(epoch))
            return Batches(loader, self.failures, id(self.bundle.train), skip=skip_batches,
                           limit=self.n_train_batches() if self.drop_last else None)
        loader.sampler.set_epoch(self.sampler_seed(epoch), skip_batches * self.batch_size,
                                 whole=whole and not self.dist.enabled)
        return Batches(loader, self.failures, id(self.bundle.train))

    def train_in_order(self) -> Batches:
        """The train split once, in index order and with its own (train)
        transform: the pass that fits components to the training features."""
        return Batches(self._loader(self.bundle.train, False, reuse=False), self.failures,
                       id(self.bundle.train))

    def val(self, reuse: bool = True) -> Batches:
        return Batches(self._loader(self.bundle.val, False, reuse), self.failures, id(self.bundle.val))

    def order(self, n: int, train: bool, epoch: int = 0, skip_batches: int = 0):
        """Index batches in the order :meth:`train` (or :meth:`val`) yields them;
        iterating it makes the same global RNG draw a DataLoader pass makes."""
        sampler = None
        if train:
            sampler = EpochSampler(n, self.share)
            sampler.set_epoch(self.sampler_seed(epoch), skip_batches * self.batch_size)
        return torch.utils.data.DataLoader(_Indices(n), batch_size=self.batch_size, sampler=sampler,
                                           shuffle=False, num_workers=0, collate_fn=list)
