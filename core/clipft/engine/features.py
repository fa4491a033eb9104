"""Where embeddings come from during training and evaluation.

The loop and the evaluator talk to a provider only:

- ``train_epoch(epoch)``: the :class:`Batch` es of one epoch;
- ``train_features(batch, need_text)``: image and (when needed) text features;
- ``val_image_features()``, ``class_features()``, ``class_scores(image_features)``,
  ``caption_features(captions)``.

:class:`LiveFeatures` computes everything from the model, every time.
:class:`CachedFeatures` serves the frozen part of each tower from a cache
(:mod:`clipft.engine.cache` decides what and where) and computes only the
trainable rest live. A cached image tower replays each epoch from the cache in
the live order (same sampler and seed) and never decodes an image; the first
epoch runs the live loader and fills the store as it goes.

Cached and live runs train the same parameters: the cache is filled with the
model in the mode it is used in (train mode for the train split, eval mode for
evaluation), under the run's precision, and every global RNG draw a live run
makes (one per DataLoader pass) is made in the same order, so dropout in the
trainable part sees the same random numbers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import attrs
import torch
import torch.nn.functional as F

from clipft.data import is_iterable
from clipft.encode import (
    class_scores,
    class_text_features,
    embed_batches,
    embed_unique_texts,
    encode_text_trimmed,
    image_embedding,
    text_chunks,
    text_embedding,
)
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
from clipft.protocols import ENTERS_TEXT_EMBEDDING, class_text_encoder, conditional_class_text, installed


@attrs.define
class Batch:
    """One training batch. ``inputs`` is what the provider's image path starts
    from: pixels (``at == "pixels"``) or a cached prefix value (``at == "cache"``)."""

    index: torch.Tensor
    inputs: torch.Tensor
    captions: list
    labels: torch.Tensor
    at: str = "pixels"
    #: which batch of the epoch this is (0-based; batches dropped as undecodable count)
    position: int = 0

    def __len__(self):
        return len(self.index)

    @property
    def labelled(self) -> bool:
        return len(self.labels) > 0 and bool((self.labels >= 0).all())


def _batch(d: dict, inputs=None, at: str = "pixels") -> Batch:
    return Batch(d["index"], d["images"] if inputs is None else inputs, d["captions"], d["labels"], at,
                 d.get("position", 0))


class Encoders:
    """The model's encoders as the run uses them (device, text trimming, the
    installed adapters), without normalisation choices spread over callers."""

    def __init__(self, model, tokenizer, device, classnames, templates, trim_text: bool = False):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.classnames, self.templates = classnames, tuple(templates)
        self.trim_text = trim_text

    def image_raw(self, pixels):
        return self.model.encode_image(pixels.to(self.device, non_blocking=True))

    def image_finish(self, raw):
        return F.normalize(image_embedding(self.model, raw), dim=-1)

    def images(self, pixels):
        return self.image_finish(self.image_raw(pixels))

    def text_raw(self, captions):
        tokens = self.tokenizer(list(captions)).to(self.device, non_blocking=True)
        if self.trim_text:
            return encode_text_trimmed(self.model, tokens)
        return self.model.encode_text(tokens)

    def text_finish(self, raw):
        return F.normalize(text_embedding(self.model, raw), dim=-1)

    def texts(self, captions):
        return self.text_finish(self.text_raw(captions))

    def class_features(self, image_features=None):
        """``[C, D]``; ``[B, C, D]`` for ``image_features`` with a conditional encoder."""
        return class_text_features(self.model, self.tokenizer, self.classnames, self.templates, self.device,
                                   image_features=image_features)

    def class_scores(self, image_features):
        return class_scores(self.model, self.tokenizer, self.classnames, self.templates, self.device,
                            image_features)


class LiveFeatures:
    """Computes every embedding from the model, every time."""

    name = "live"

    def __init__(self, encoders: Encoders, loaders, autocast):
        self.enc, self.loaders, self.autocast = encoders, loaders, autocast

    @property
    def stats(self) -> dict:
        return {}

    def n_train_batches(self) -> int:
        return self.loaders.n_train_batches()

    def train_epoch(self, epoch: int, skip_batches: int = 0):
        """The batches of ``epoch``, from batch ``skip_batches`` on (a resume)."""
        return (_batch(b) for b in self.loaders.train(epoch, skip_batches))

    def image_features(self, batch: Batch):
        return self.enc.images(batch.inputs)

    def train_features(self, batch: Batch, need_text: bool):
        img = self.image_features(batch)
        return img, (self.paired_text(batch, img) if need_text else None)

    def paired_text(self, batch: Batch, image_features=None):
        """Text features of a batch's paired text: its captions, or, when a
        strategy installed a class-prompt encoder and every image has a label,
        the encoded class prompt of each image's class (with a conditional
        encoder, that prompt conditioned on the image itself)."""
        if class_text_encoder(self.enc.model) is not None and batch.labelled:
            labels = batch.labels.to(self.enc.device)
            if conditional_class_text(self.enc.model) and image_features is not None:
                per_image = self.enc.class_features(image_features)          # [B, C, D]
                return per_image[torch.arange(len(labels), device=labels.device), labels]
            return self.train_class_features()[labels]
        return self.caption_batch(batch.captions)

    def caption_batch(self, captions):
        return self.enc.texts(captions)

    def train_class_features(self):
        """Class-prompt features in training (with grad when the text side trains)."""
        return self.enc.class_features()

    @torch.no_grad()
    def train_split_features(self):
        """``(features, labels)`` of the whole train split in index order, as
        evaluation computes embeddings (eval mode), for components fitted to
        the training features. Draws nothing from the global RNG stream."""
        model = self.enc.model
        was = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                return embed_batches(_pixels(self.loaders.train_in_order()), self.enc.images, self.enc.device,
                                     self.autocast)[:2]
        finally:
            model.train(was)

    @torch.no_grad()
    def val_image_features(self):
        return embed_batches(_pixels(self.loaders.val()), self.enc.images, self.enc.device, self.autocast)

    @torch.no_grad()
    def class_features(self):
        with self.autocast():
            return self.enc.class_features().float()

    @torch.no_grad()
    def class_scores(self, image_features):
        """``[B, C]`` cosine similarities of the images to the class prompts
        (each image's own prompts with a conditional class-prompt encoder)."""
        if not conditional_class_text(self.enc.model):
            return image_features @ self.class_features().t()
        with self.autocast():
            return self.enc.class_scores(image_features).float()

    @torch.no_grad()
    def caption_features(self, captions):
        return embed_unique_texts(captions, self.enc.texts, self.autocast)


def _pixels(batches):
    """A loader's batches as :func:`~clipft.encode.embed_batches` takes them."""
    return ((b["images"], b["labels"], b["captions"]) for b in batches)


def _stored(batches):
    """Batches replayed from a store, embedded through ``image_features``."""
    return ((b, b.labels, b.captions) for b in batches)


@attrs.define
class StoreKeys:
    """What an on-disk store is keyed by, besides the split's own data and the
    frozen weights (a different key is a different store, never a stale one)."""

    directory: Optional[Path]
    memory_budget: int
    base: dict  # model name, data source and options, precision, device type


class CachedFeatures(LiveFeatures):
    """Serves frozen towers from a cache; see the module docstring."""

    name = "cache"

    def __init__(self, encoders: Encoders, loaders, autocast, plan: CachePlan, keys: StoreKeys,
                 augment: bool = False):
        super().__init__(encoders, loaders, autocast)
        self.plan, self.cut, self.keys, self.augment = plan, plan.cut, keys, augment
        self.cache_stats = CacheStats(plan, str(keys.directory) if keys.directory is not None else "memory")
        self._stores: dict = {}
        # with a text-embedding adapter the tower's raw output is cached and the
        # adapter runs live; otherwise the finished feature itself
        self._text_raw = installed(encoders.model, ENTERS_TEXT_EMBEDDING) is not None
        self._text_tables: dict = {True: {}, False: {}}   # model.training -> {caption: value}
        self._text_train_ok: Optional[bool] = None
        self._classes: dict = {}

    @property
    def stats(self) -> dict:
        return self.cache_stats.to_dict()

    # -- image stores --------------------------------------------------------
    def _store(self, split: str) -> Optional[IndexStore]:
        """The split's store: complete (loaded from disk, or the val split after
        its fill pass), empty (the train split, filled by its first epoch), or
        None when the split runs live."""
        if split in self._stores:
            return self._stores[split]
        store, why = None, None
        if self.cut is None:
            pass
        elif is_iterable(self._dataset(split)):
            why = "streamed data: the image cache keys samples by a stable index, which a stream does not have"
        elif split == "train" and self.augment:
            why = "random train augmentation"
        else:
            # the train split is filled in train mode: anything random there
            # (dropout, drop-path, BatchNorm updating) would be frozen by a cache
            noisy = stochastic_module(self.cut.prefix_modules(self.enc.model))
            if noisy:
                why = f"{noisy} is active in the frozen part"
            else:
                store = self._open_or_new(split)
                if split == "val" and not store.complete:
                    store, why = self._fill_val(store)
        if why:
            self.cache_stats.note(f"{split}_image", f"live ({why})")
        self._stores[split] = store
        return store

    def _dataset(self, split: str):
        return self.loaders.bundle.train if split == "train" else self.loaders.bundle.val

    def _key_parts(self, split: str, dataset) -> dict:
        import open_clip
        return {
            **self.keys.base, "what": "image", "cut": self.cut.describe(), "split": split,
            "mode": "train" if split == "train" else "eval",
            "weights": tensor_digest(prefix_state(self.enc.model, self.cut)),
            "dataset": dataset_fingerprint(dataset),
            "transform": transform_repr(getattr(dataset, "transform", None)),
            "torch": torch.__version__, "open_clip": open_clip.__version__,
        }

    def _open_or_new(self, split: str) -> IndexStore:
        dataset = self._dataset(split)
        if self.keys.directory is None:
            return IndexStore(len(dataset), budget=self.keys.memory_budget)
        with self.cache_stats.building():
            key_parts = self._key_parts(split, dataset)
            directory = self.keys.directory / f"{split}-{cache_key(key_parts)}"
            found, damaged = IndexStore.open(directory, len(dataset), key_parts)
        if damaged:
            self.cache_stats.warn(damaged)
        if found is not None:
            self.cache_stats.held(found.nbytes, int((found.status == STATUS_OK).sum()))
            return found
        return IndexStore(len(dataset), directory, key_parts=key_parts)

    def _prefix(self, batch: dict) -> torch.Tensor:
        with self.cache_stats.building(), torch.no_grad(), self.autocast():
            values = self.cut.prefix(self.enc.model, batch["images"].to(self.enc.device, non_blocking=True))
        self.cache_stats.count("image", misses=len(batch["index"]))
        return values

    def _finish(self, store: IndexStore) -> None:
        with self.cache_stats.building():
            store.finish()
        self.cache_stats.held(store.nbytes)

    def _fill_val(self, store: IndexStore):
        """One pass over the val split (evaluation needs all of it at once)."""
        try:
            # the fill pass must not shift the global RNG stream a live run sees
            with torch.random.fork_rng(devices=[]):
                for b in self.loaders.val(reuse=False):
                    store.put(b["index"], self._prefix(b), b["captions"], b["labels"])
            self._finish(store)
        except StoreTooLarge as exc:
            store.discard()
            return None, str(exc)
        except BaseException:
            store.discard()
            raise
        return store, None

    def _replay(self, store: IndexStore, split: str, train: bool, epoch: int, skip_batches: int = 0):
        """Batches of one pass rebuilt from a store by index, in the live order."""
        # the order's iterator (and its RNG draw) is created now, not at the first batch
        return self._replayed(store, id(self._dataset(split)),
                              iter(self.loaders.order(store.n, train, epoch, skip_batches)), skip_batches)

    def _replayed(self, store, key, order, first: int):
        for position, items in enumerate(order, start=first):
            index = torch.tensor(items, dtype=torch.long)
            values, captions, labels, kept = store.gather(index)
            if len(kept) < len(items):
                self.loaders.failures.add(key, sorted(set(items) - set(kept.tolist())))
            if len(kept) == 0:
                continue
            self.cache_stats.count("image", hits=len(kept))
            yield Batch(kept, values, captions, labels, "cache", position)

    def _fill_while_training(self, store: IndexStore, epoch: int):
        """The live loader's batches, each with its frozen-part values computed
        (on the batch exactly as a live run computes them) and stored."""
        filling = True
        try:
            for b in self.loaders.train(epoch):
                if not filling:
                    yield _batch(b)
                    continue
                values = self._prefix(b)
                try:
                    store.put(b["index"], values, b["captions"], b["labels"])
                except StoreTooLarge as exc:
                    filling = False
                    store.discard()
                    self._stores["train"] = None
                    self.cache_stats.note("train_image", f"live ({exc})")
                    yield _batch(b)
                    continue
                yield _batch(b, values, "cache")
            if filling:
                self._finish(store)
        except BaseException:
            if filling and not store.complete:
                store.discard()
                self._stores.pop("train", None)
            raise

    @torch.no_grad()
    def train_split_features(self):
        """As the live provider's, but through the train split's store: the
        pass fills it (each image encoded once, in train mode as an epoch
        fills it), the features are finished from the stored values in eval
        mode, and the epochs replay the store."""
        if self.cut is None:
            return super().train_split_features()
        from clipft.engine.compose import freeze_frozen_norm_stats

        model = self.enc.model
        was = model.training
        model.train()
        freeze_frozen_norm_stats(model)   # the mode an epoch runs (and fills the store) in
        try:
            store = self._store("train")
            if store is None:
                return super().train_split_features()
            if not store.complete:
                store = self._fill_in_order(store)
                if store is None:
                    return super().train_split_features()
            model.eval()
            with torch.random.fork_rng(devices=[]):
                return embed_batches(_stored(self._replay(store, "train", False, 0)), self.image_features,
                                     self.enc.device, self.autocast)[:2]
        finally:
            model.train(was)

    def _fill_in_order(self, store: IndexStore) -> Optional[IndexStore]:
        try:
            with torch.random.fork_rng(devices=[]):
                for b in self.loaders.train_in_order():
                    store.put(b["index"], self._prefix(b), b["captions"], b["labels"])
            self._finish(store)
        except StoreTooLarge as exc:
            store.discard()
            self._stores["train"] = None
            self.cache_stats.note("train_image", f"live ({exc})")
            return None
        except BaseException:
            store.discard()
            self._stores.pop("train", None)
            raise
        return store

    def train_epoch(self, epoch: int, skip_batches: int = 0):
        if self.cut is None:
            return super().train_epoch(epoch, skip_batches)
        store = self._store("train")
        if store is None:
            return super().train_epoch(epoch, skip_batches)
        if store.complete:
            return self._replay(store, "train", True, epoch, skip_batches)
        if skip_batches:
            # resumed part-way through the epoch that fills the store: its first
            # batches are gone, so this epoch runs live and the next one fills
            return super().train_epoch(epoch, skip_batches)
        return self._fill_while_training(store, epoch)

    def image_features(self, batch: Batch):
        if batch.at == "cache":
            return self.enc.image_finish(self.cut.suffix(self.enc.model, batch.inputs.to(self.enc.device)))
        return super().image_features(batch)

    # -- text ----------------------------------------------------------------
    def _text_cacheable(self) -> bool:
        if not self.plan.text:
            return False
        if not self.enc.model.training:
            return True
        if self._text_train_ok is None:
            noisy = stochastic_module(text_modules(self.enc.model))
            self._text_train_ok = noisy is None
            if noisy:
                self.cache_stats.note("train_text", f"live ({noisy} is active in the text tower)")
        return self._text_train_ok

    def _cached_texts(self, captions: list, chunks: list) -> torch.Tensor:
        """Features of ``captions`` from the table of the model's current mode.
        On a miss, ``chunks`` (lists of strings) are encoded exactly as the live
        path would encode them, so the first values match a live run's."""
        table = self._text_tables[self.enc.model.training]
        if any(c not in table for c in captions):
            with self.cache_stats.building(), torch.no_grad():
                for chunk in chunks:
                    raw = self.enc.text_raw(chunk)
                    values = raw if self._text_raw else self.enc.text_finish(raw)
                    for c, v in zip(chunk, values):
                        if c not in table:
                            table[c] = v
                            self.cache_stats.count("text", misses=1)
                        else:
                            self.cache_stats.count("text", hits=1)
        else:
            self.cache_stats.count("text", hits=len(captions))
        stacked = torch.stack([table[c] for c in captions])
        return self.enc.text_finish(stacked) if self._text_raw else stacked

    def _cached_classes(self, compute) -> torch.Tensor:
        mode = self.enc.model.training
        if mode in self._classes:
            self.cache_stats.count("text", hits=len(self._classes[mode]))
            return self._classes[mode]
        with self.cache_stats.building(), torch.no_grad():
            feats = compute()
        self.cache_stats.count("text", misses=len(feats))
        self._classes[mode] = feats
        return feats

    def caption_batch(self, captions):
        if not self._text_cacheable():
            return super().caption_batch(captions)
        captions = list(captions)
        return self._cached_texts(captions, [captions])

    def train_class_features(self):
        if not (self.plan.classes and self._text_cacheable()):
            return super().train_class_features()
        return self._cached_classes(self.enc.class_features)

    @torch.no_grad()
    def val_image_features(self):
        store = self._store("val")
        if store is None:
            return super().val_image_features()
        return embed_batches(_stored(self._replay(store, "val", False, 0)), self.image_features, self.enc.device,
                             self.autocast)

    @torch.no_grad()
    def class_features(self):
        if not (self.plan.classes and self._text_cacheable()):
            return super().class_features()
        return self._cached_classes(lambda: LiveFeatures.class_features(self))

    @torch.no_grad()
    def caption_features(self, captions):
        if not self._text_cacheable():
            return super().caption_features(captions)
        uniq = list(dict.fromkeys(captions))
        with self.autocast():
            return self._cached_texts(uniq, text_chunks(uniq)).float()
