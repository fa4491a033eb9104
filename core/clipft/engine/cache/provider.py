"""The cached features provider: the frozen part of each tower served from a
cache, around a live provider that knows nothing about caching. What is cached is
decided once, when the run is built (:func:`cached_features`).

**The rule: a cached run equals a live run bit for bit.** Same parameters
after training, same losses, same metrics; caching is a speed-up and never an
approximation. It holds because

- a cached value is computed by the same kernels, on the same batches, in the
  same mode and precision as the live run computes it: the train split's store
  is filled by the first epoch's own batches in train mode (or, when a
  component first fits itself to the train split, by an in-order pass in train
  mode), the val split's by a pass in eval mode like evaluation's; the live
  rest (the suffix of the image tower, the text-embedding adapter) then runs
  the same operations on the same values;
- every global RNG draw a live run makes (one per DataLoader pass) is made in
  the same order: a replayed epoch draws for its order when the live loader
  would, and a fill pass that a live run does not make runs under a forked RNG;
- anything whose output is random or batch-dependent in the frozen part keeps
  that part live, as a cache would freeze one draw of it: random train
  augmentation, and dropout, patch dropout, drop-path or BatchNorm in training
  mode.

**What it costs.** The first epoch is no faster than a live one (it decodes
and encodes its images, in training-size batches, and stores them), where a
separate pass in eval mode with large batches would be; the train and val
splits, and the text of each mode, are cached apart even where their values
would coincide; a tower with dropout or drop-path in its frozen part, or random
augmentation, gets no image cache at all; a resume part-way through the epoch
that fills the store runs that epoch live; and a run on several processes
caches nothing, as each rank replays another order.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import attrs
import torch

from clipft.data import is_iterable
from clipft.encode import embed_batches, note_class_text
from clipft.engine.cache.plan import CachePlan, stochastic_module, text_modules
from clipft.engine.cache.stats import CacheStats
from clipft.engine.cache.store import (
    STATUS_OK,
    IndexStore,
    StoreTooLarge,
    cache_key,
    dataset_fingerprint,
    prefix_state,
    tensor_digest,
    transform_repr,
)
from clipft.engine.compose import freeze_frozen_norm_stats
from clipft.engine.features import Batch, Encoders, LiveFeatures, _batch, _stored
from clipft.protocols import ENTERS_TEXT_EMBEDDING, installed


@attrs.frozen
class Where:
    """Where stores live, and what an on-disk one is keyed by besides the
    split's data and the frozen weights (another key is another store)."""

    directory: Optional[Path]     # None: in memory
    memory_budget: int            # the most bytes an in-memory store may take
    base: dict                    # model name, data source and options, precision, device type


@attrs.define(eq=False)
class SplitCache:
    """The image cache of one split. The store opens at first use (from disk
    when a matching one is there); a fill cut short forgets it."""

    name: str                     # "train" or "val"
    dataset: object
    train: bool                   # filled in train mode
    store: Optional[IndexStore] = None


def _in_train_mode(model, probe):
    """``probe()`` with ``model`` in the mode an epoch trains in; the modes of
    its modules are left as they were."""
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    freeze_frozen_norm_stats(model)
    try:
        return probe()
    finally:
        for m, training in modes:
            m.training = training


def cached_features(enc: Encoders, loaders, autocast, plan: CachePlan, where: Where,
                    augment: bool = False) -> "CachedFeatures":
    """The provider for a run whose ``plan`` caches something: every decision
    about what is cached is made here."""
    model = enc.model
    stats = CacheStats(plan, str(where.directory) if where.directory is not None else "memory")
    splits = {}
    if plan.cut is not None:
        noisy = _in_train_mode(model, lambda: stochastic_module(plan.cut.prefix_modules(model)))
        for name, dataset in (("train", loaders.bundle.train), ("val", loaders.bundle.val)):
            why = None
            if is_iterable(dataset):
                why = "streamed data: the image cache keys samples by a stable index, which a stream does not have"
            elif name == "train" and augment:
                why = "random train augmentation"
            elif name == "train" and noisy:
                # evaluation runs in eval mode, where nothing is random
                why = f"{noisy} is active in the frozen part"
            if why:
                stats.note(f"{name}_image", f"live ({why})")
            else:
                splits[name] = SplitCache(name, dataset, train=name == "train")
    if plan.text:
        modes = {False}
        noisy = _in_train_mode(model, lambda: stochastic_module(text_modules(model)))
        if noisy:
            stats.note("train_text", f"live ({noisy} is active in the text tower)")
        else:
            modes.add(True)
        enc = CachedText(enc, modes, plan.classes, stats)
    return CachedFeatures(LiveFeatures(enc, loaders, autocast), plan, where, splits, stats)


class CachedText:
    """The run's encoders, with caption and class-prompt embeddings kept in a
    table per model mode (the model's training flag picks it; a mode with no
    table runs live). A miss encodes exactly what the live path asked for, so
    the first values are the live ones. Anything else is the encoders' own."""

    def __init__(self, enc: Encoders, modes, classes: bool, stats: CacheStats):
        self._enc, self._stats, self._classes_cached = enc, stats, classes
        self._tables = {mode: {} for mode in modes}     # mode -> {caption: value}
        self._classes: dict = {}                        # mode -> class-prompt features
        # with a text-embedding adapter the tower's raw output is kept and the
        # adapter runs live; otherwise the finished feature itself
        self._raw = installed(enc.model, ENTERS_TEXT_EMBEDDING) is not None

    def __getattr__(self, name):
        if name.startswith("_"):     # not set yet (a copy being built): no recursion through _enc
            raise AttributeError(name)
        return getattr(self._enc, name)

    def texts(self, captions):
        table = self._tables.get(self._enc.model.training)
        if table is None:
            return self._enc.texts(captions)
        captions = list(captions)
        if all(c in table for c in captions):
            self._stats.count("text", hits=len(captions))
        else:
            with self._stats.building(), torch.no_grad():
                raw = self._enc.text_raw(captions)
                values = raw if self._raw else self._enc.text_finish(raw)
                for c, v in zip(captions, values):
                    new = c not in table
                    table.setdefault(c, v)
                    self._stats.count("text", misses=int(new), hits=int(not new))
        stacked = torch.stack([table[c] for c in captions])
        return self._enc.text_finish(stacked) if self._raw else stacked

    def class_features(self, image_features=None):
        mode = self._enc.model.training
        if image_features is not None or not self._classes_cached or mode not in self._tables:
            return self._enc.class_features(image_features)
        if mode in self._classes:
            self._stats.count("text", hits=len(self._classes[mode]))
        else:
            with self._stats.building(), torch.no_grad():
                self._classes[mode] = self._enc.class_features()
            self._stats.count("text", misses=len(self._classes[mode]))
        return note_class_text(self._classes[mode])


class CachedFeatures:
    """Serves the frozen part of the image tower from the split stores and
    everything else through ``live``; see the module docstring."""

    name = "cache"

    def __init__(self, live: LiveFeatures, plan: CachePlan, where: Where, splits: dict, stats: CacheStats):
        self.live, self.enc, self.plan, self.cut, self.where = live, live.enc, plan, plan.cut, where
        self.splits = splits          # {name: SplitCache} of the splits whose images are cached
        self.cache_stats = stats

    @property
    def stats(self) -> dict:
        return self.cache_stats.to_dict()

    # -- the provider's interface ------------------------------------------------
    def n_train_batches(self) -> int:
        return self.live.n_train_batches()

    def train_epoch(self, epoch: int, skip_batches: int = 0):
        split = self.splits.get("train")
        if split is None:
            return self.live.train_epoch(epoch, skip_batches)
        store = self._open(split)
        if store.complete:
            return self._replay(split, store, True, epoch, skip_batches)
        if skip_batches:
            # resumed part-way through the epoch that fills the store: its first
            # batches are gone, so this epoch runs live and the next one fills
            return self.live.train_epoch(epoch, skip_batches)
        return self._fill_while_training(split, epoch)

    def image_features(self, batch: Batch):
        if batch.at == "cache":
            return self.enc.image_finish(self.cut.suffix(self.enc.model, batch.inputs.to(self.enc.device)))
        return self.live.image_features(batch)

    def train_features(self, batch: Batch, need_text: bool):
        img = self.image_features(batch)
        return img, (self.paired_text(batch, img) if need_text else None)

    def paired_text(self, batch: Batch, image_features=None):
        return self.live.paired_text(batch, image_features)

    @torch.no_grad()
    def train_split_features(self):
        """As the live provider's, but through the train split's store: the
        pass fills it (each image encoded once, in train mode as an epoch
        fills it), the features are finished from the stored values in eval
        mode, and the epochs replay the store."""
        split = self.splits.get("train")
        if split is None:
            return self.live.train_split_features()
        model = self.enc.model
        store = _in_train_mode(model, lambda: self._filled(split, self.live.loaders.train_in_order))
        if store is None:
            return self.live.train_split_features()
        was = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                return self._replayed_features(split, store)[:2]
        finally:
            model.train(was)

    @torch.no_grad()
    def val_image_features(self):
        split = self.splits.get("val")
        store = None if split is None else self._filled(split, lambda: self.live.loaders.val(reuse=False))
        if store is None:
            return self.live.val_image_features()
        return self._replayed_features(split, store)

    def train_class_features(self):
        return self.live.train_class_features()

    def class_features(self):
        return self.live.class_features()

    def class_scores(self, image_features):
        return self.live.class_scores(image_features)

    def caption_features(self, captions):
        return self.live.caption_features(captions)

    # -- stores ------------------------------------------------------------------
    def _open(self, split: SplitCache) -> IndexStore:
        if split.store is None:
            split.store = self._open_or_new(split)
        return split.store

    def _open_or_new(self, split: SplitCache) -> IndexStore:
        n = len(split.dataset)
        if self.where.directory is None:
            return IndexStore(n, budget=self.where.memory_budget)
        with self.cache_stats.building():
            key_parts = self._key_parts(split)
            directory = self.where.directory / f"{split.name}-{cache_key(key_parts)}"
            found, damaged = IndexStore.open(directory, n, key_parts)
        if damaged:
            self.cache_stats.warn(damaged)
        if found is not None:
            self.cache_stats.held(found.nbytes, int((found.status == STATUS_OK).sum()))
            return found
        return IndexStore(n, directory, key_parts=key_parts)

    def _key_parts(self, split: SplitCache) -> dict:
        import open_clip
        return {
            **self.where.base, "what": "image", "cut": self.cut.describe(), "split": split.name,
            "mode": "train" if split.train else "eval",
            "weights": tensor_digest(prefix_state(self.enc.model, self.cut)),
            "dataset": dataset_fingerprint(split.dataset),
            "transform": transform_repr(getattr(split.dataset, "transform", None)),
            "torch": torch.__version__, "open_clip": open_clip.__version__,
        }

    def _go_live(self, split: SplitCache, why: str) -> None:
        del self.splits[split.name]
        self.cache_stats.note(f"{split.name}_image", f"live ({why})")

    # -- filling -----------------------------------------------------------------
    def _prefix(self, batch: dict, pad_to: int = 0) -> torch.Tensor:
        images = batch["images"]
        k = len(images)
        if k < pad_to:
            # computed at the full batch's shape, as the batches that will replay
            # these samples would compute them live (kernels round by shape)
            images = torch.cat([images, images[:1].expand(pad_to - k, *images.shape[1:])])
        with self.cache_stats.building(), torch.no_grad(), self.live.autocast():
            values = self.cut.prefix(self.enc.model, images.to(self.enc.device, non_blocking=True))[:k]
        self.cache_stats.count("image", misses=len(batch["index"]))
        return values

    @contextlib.contextmanager
    def _filling(self, split: SplitCache):
        """Fill ``split``'s store inside the block through the yielded
        ``put(batch)``, which stores the batch's frozen-part values and returns
        them, or None once the store has outgrown its memory budget: the store
        is then dropped and the split runs live from then on. A block that ends
        normally commits the store; any other way out discards it, and its next
        use starts a new one."""
        store = self._open(split)
        over = []

        def put(batch: dict, pad_to: int = 0):
            if over:
                return None
            values = self._prefix(batch, pad_to)
            try:
                store.put(batch["index"], values, batch["captions"], batch["labels"])
            except StoreTooLarge as exc:
                over.append(exc)
                store.discard()
                self._go_live(split, str(exc))
                return None
            return values

        try:
            yield put
            if not over:
                with self.cache_stats.building():
                    store.finish()
                self.cache_stats.held(store.nbytes)
        except BaseException:
            if not over:
                store.discard()
                split.store = None
            raise

    def _filled(self, split: SplitCache, batches) -> Optional[IndexStore]:
        """``split``'s store, completed first by one pass over ``batches()``
        when it is not; None when the split went live. The pass is one a live
        run does not make, so it must not shift the global RNG stream."""
        store = self._open(split)
        if not store.complete:
            with torch.random.fork_rng(devices=[]), self._filling(split) as put:
                for b in batches():
                    if put(b) is None:
                        break
        return store if self.splits.get(split.name) is split else None

    def _fill_while_training(self, split: SplitCache, epoch: int):
        """The live loader's batches, each with its frozen-part values computed
        (on the batch exactly as a live run computes them) and stored."""
        trained = self.live.loaders.n_train_batches()
        with self._filling(split) as put:
            # every sample is stored, those --drop-last leaves out of the epoch too
            for b in self.live.loaders.train(epoch, whole=True):
                dropped = b["position"] >= trained
                values = put(b, self.live.loaders.batch_size if dropped else 0)
                if not dropped:
                    yield _batch(b) if values is None else _batch(b, values, "cache")

    # -- replaying -----------------------------------------------------------------
    def _replay(self, split: SplitCache, store: IndexStore, train: bool, epoch: int = 0, skip_batches: int = 0):
        """Batches of one pass rebuilt from a store by index, in the live order."""
        # the order's iterator (and its RNG draw) is made now, as the live loader's is
        order = iter(self.live.loaders.order(store.n, train, epoch, skip_batches))
        return self._replayed(store, id(split.dataset), order, skip_batches)

    def _replayed(self, store: IndexStore, key, order, first: int):
        for position, items in enumerate(order, start=first):
            index = torch.tensor(items, dtype=torch.long)
            values, captions, labels, kept = store.gather(index)
            if len(kept) < len(items):
                self.live.loaders.failures.add(key, sorted(set(items) - set(kept.tolist())))
            if len(kept) == 0:
                continue
            self.cache_stats.count("image", hits=len(kept))
            yield Batch(kept, values, captions, labels, "cache", position)

    def _replayed_features(self, split: SplitCache, store: IndexStore):
        """``(features, labels, captions)`` of a split in index order, from its store."""
        return embed_batches(_stored(self._replay(split, store, False)), self.image_features, self.enc.device,
                             self.live.autocast)
