"""DataLoaders of a run's train and val splits.

Built once per split and reused across epochs, so worker processes persist
(``persistent_workers``). The train order of epoch ``e`` is the permutation a
``RandomSampler`` seeded with :meth:`Loaders.sampler_seed` gives; an epoch can
start part-way (``skip`` samples in, for a resume from a step checkpoint) and
still yield exactly the rest of that order. :meth:`Loaders.order` yields the
same order as index lists, which is how a cached epoch replays a live one
without touching the images.
"""
from __future__ import annotations

import torch

from clipft.data import Batches, DecodeFailures, GuardedDataset, collate


class _Indices(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


class EpochSampler(torch.utils.data.Sampler):
    """The permutation ``torch.randperm(n)`` under a seeded generator (what
    ``RandomSampler(generator=g)`` yields), from position ``skip`` on."""

    def __init__(self, n: int):
        self.n, self.seed, self.skip = n, 0, 0

    def set_epoch(self, seed: int, skip: int = 0) -> None:
        self.seed, self.skip = seed, skip

    def __len__(self):
        return max(0, self.n - self.skip)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        yield from torch.randperm(self.n, generator=g).tolist()[self.skip:]


class Loaders:
    def __init__(self, bundle, *, batch_size: int, seed: int, device, num_workers: int = 0,
                 persistent_workers: bool = True, failures: DecodeFailures | None = None):
        self.bundle = bundle
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.num_workers = num_workers
        self.persistent_workers = persistent_workers
        #: distinct samples dropped as undecodable, across all passes
        self.failures = failures if failures is not None else DecodeFailures()
        self._loaders: dict = {}

    def sampler_seed(self, epoch: int) -> int:
        """Seed of the train order in ``epoch`` (a cached epoch replays the same order)."""
        return self.seed * 100003 + epoch

    def n_batches(self, dataset) -> int:
        return -(-len(dataset) // self.batch_size)

    def _loader(self, dataset, train: bool, reuse: bool):
        key = (id(dataset), train)
        loader = self._loaders.get(key) if reuse else None
        if loader is None:
            sampler = EpochSampler(len(dataset)) if train else None
            loader = torch.utils.data.DataLoader(
                GuardedDataset(dataset), batch_size=self.batch_size, sampler=sampler,
                shuffle=False, num_workers=self.num_workers, collate_fn=collate,
                pin_memory=torch.device(self.device).type == "cuda",
                persistent_workers=self.num_workers > 0 and self.persistent_workers,
            )
            if reuse:
                self._loaders[key] = loader
        return loader

    def train(self, epoch: int, skip_batches: int = 0) -> Batches:
        """Decoded batches of the train split in ``epoch``'s order, from batch
        ``skip_batches`` on."""
        loader = self._loader(self.bundle.train, True, reuse=True)
        loader.sampler.set_epoch(self.sampler_seed(epoch), skip_batches * self.batch_size)
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
            sampler = EpochSampler(n)
            sampler.set_epoch(self.sampler_seed(epoch), skip_batches * self.batch_size)
        return torch.utils.data.DataLoader(_Indices(n), batch_size=self.batch_size, sampler=sampler,
                                           shuffle=False, num_workers=0, collate_fn=list)
