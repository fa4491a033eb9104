"""Where embeddings come from during training and evaluation.

``LiveFeatures`` computes everything from the model, every time.
``CachedFeatures`` serves the frozen part of each tower from a cache (see
:mod:`clipft.engine.cache` for what counts as frozen and where the image tower is
cut) and computes only the trainable rest live. :func:`select_features` picks one
for a prepared run. The training loop only talks to the provider:

- ``train_loader(run, epoch)``: the batches of one epoch. A cached image tower
  replays the epoch from the cache in the same order (same sampler and seed) and
  never decodes an image;
- ``train_batch(run, batch, need_text)``: image and (when needed) text features;
- ``val_image_features``, ``class_features``, ``caption_features``: evaluation.

Cached and live runs train the same parameters: the cache is filled with the
model in the mode it is used in (train mode for the train split, eval mode for
evaluation), under the run's precision, and every global RNG draw a live run
makes (one per DataLoader pass) is made in the same order, so dropout in the
trainable part sees the same random numbers.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from clipft.engine.cache import (
    STATUS_OK,
    ImageCut,
    class_prompts_frozen,
    IndexStore,
    StoreTooLarge,
    cache_key,
    dataset_fingerprint,
    memory_budget_bytes,
    plan_image_cut,
    prefix_state,
    stochastic_module,
    tensor_digest,
    text_modules,
    text_tower_frozen,
    transform_repr,
)
from clipft.engine.forward import encode_images
from clipft.engine.perf import encode_text_trimmed

try:  # a strategy's class-prompt encoder (prompt tuning), when the core has them
    from clipft.engine.forward import class_text_encoder
except ImportError:  # pragma: no cover - older core
    def class_text_encoder(model):
        return None

TEXT_CHUNK = 256


def encode_texts(run, tokens: torch.Tensor) -> torch.Tensor:
    """Normalised caption embeddings; with ``config.trim_text`` the tokens'
    padding is not run (exact up to float rounding, see
    :func:`clipft.engine.perf.text_trim_length`)."""
    if getattr(run.config, "trim_text", False):
        return F.normalize(encode_text_trimmed(run.model, tokens), dim=-1)
    return F.normalize(run.model.encode_text(tokens), dim=-1)


class LiveFeatures:
    """Computes every embedding from the model, every time."""

    name = "live"

    def __init__(self):
        self.stats: dict = {}

    def train_loader(self, run, epoch: int):
        return run.loader(run.bundle.train, train=True, epoch=epoch)

    def train_batch(self, run, batch, need_text: bool):
        images = batch["images"].to(run.device, non_blocking=True)
        img = encode_images(run.model, images)
        txt = None
        if need_text:
            txt = self.paired_text(run, batch)
        return img, txt

    def paired_text(self, run, batch) -> torch.Tensor:
        """Text features of a batch's paired text: its captions, or, when a
        strategy installed a class-prompt encoder and every image has a label,
        the encoded class prompt of each image's class."""
        if class_text_encoder(run.model) is not None and _labelled(batch):
            return self.train_class_features(run)[batch["labels"].to(run.device)]
        tokens = run.tokenizer(batch["captions"]).to(run.device, non_blocking=True)
        return encode_texts(run, tokens)

    def train_class_features(self, run) -> torch.Tensor:
        """Class-prompt features in training (with grad when the text side trains)."""
        return run.class_text_features()

    @torch.no_grad()
    def val_image_features(self, run):
        feats, labels, captions = [], [], []
        for batch in run.loader(run.bundle.val, train=False):
            if batch is None:
                continue
            with run.autocast():
                feats.append(encode_images(run.model, batch["images"].to(run.device)).float())
            labels.append(batch["labels"])
            captions.extend(batch["captions"])
        if not feats:
            return torch.empty(0), torch.empty(0, dtype=torch.long), []
        return torch.cat(feats), torch.cat(labels).to(run.device), captions

    @torch.no_grad()
    def class_features(self, run):
        with run.autocast():
            return run.class_text_features().float()

    @torch.no_grad()
    def caption_features(self, run, captions):
        uniq = list(dict.fromkeys(captions))
        out = []
        for i in range(0, len(uniq), TEXT_CHUNK):
            with run.autocast():
                out.append(encode_texts(run, run.tokenizer(uniq[i:i + TEXT_CHUNK]).to(run.device)).float())
        return torch.cat(out)


def _labelled(batch) -> bool:
    labels = batch.get("labels")
    return labels is not None and len(labels) > 0 and bool((labels >= 0).all())


class _Indices(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


class _Replay:
    """Batches of one pass, rebuilt from a store by index: a DataLoader over
    indices with the live loader's sampler, batch size and RNG draw, so the
    order and the random stream match a live pass exactly."""

    def __init__(self, provider, run, store: IndexStore, dataset, train: bool, epoch: int):
        self.provider, self.run, self.store, self.dataset = provider, run, store, dataset
        sampler = None
        if train:
            g = torch.Generator().manual_seed(run.sampler_seed(epoch))
            sampler = torch.utils.data.RandomSampler(range(store.n), generator=g)
        self.loader = torch.utils.data.DataLoader(
            _Indices(store.n), batch_size=run.config.batch_size, sampler=sampler, shuffle=False,
            num_workers=0, collate_fn=list)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        count, failures, key = self.provider.count, self.run.failures, id(self.dataset)
        for items in self.loader:
            index = torch.tensor(items, dtype=torch.long)
            values, captions, labels, kept = self.store.gather(index)
            if len(kept) < len(items):
                failures.add(key, sorted(set(items) - set(kept.tolist())))
            if len(kept) == 0:
                continue
            count("image", hits=len(kept))
            yield {"index": kept, "image_cache": values, "captions": captions, "labels": labels}


class _TrainEpoch:
    """The batches of one training epoch: replayed from the train store once
    it is complete; the first epoch runs the live loader and fills the store
    as it goes (so every step, the first epoch's included, costs what it would
    cost live, and the progress bar moves); live throughout when the split
    cannot be cached."""

    def __init__(self, provider, run, epoch: int):
        self.provider, self.run, self.epoch = provider, run, epoch

    def __len__(self):
        return math.ceil(len(self.run.bundle.train) / self.run.config.batch_size)

    def __iter__(self):
        provider, run = self.provider, self.run
        store = provider._store(run, "train")
        if store is None:
            return iter(run.loader(run.bundle.train, train=True, epoch=self.epoch))
        if store.complete:
            return iter(_Replay(provider, run, store, run.bundle.train, train=True, epoch=self.epoch))
        return provider._fill_while_training(run, store, self.epoch)


class CachedFeatures(LiveFeatures):
    """Serves frozen towers from a cache; see the module docstring."""

    name = "cache"

    def __init__(self, cut: Optional[ImageCut], image_reason: str, text: bool, text_reason: str,
                 directory: Optional[Path] = None, memory_budget: Optional[int] = None,
                 classes: Optional[bool] = None, classes_reason: str = ""):
        super().__init__()
        self.cut = cut
        self.text = text
        self.classes = text if classes is None else (classes and text)
        self.directory = Path(directory) if directory is not None else None
        self.memory_budget = memory_budget if memory_budget is not None else memory_budget_bytes()
        self._stores: dict = {}
        self._text_tables: dict = {True: {}, False: {}}   # model.training -> {caption: feature}
        self._text_train_ok: Optional[bool] = None
        self._classes: dict = {}
        self.stats = {
            "hits": 0, "misses": 0, "build_seconds": 0.0,
            "image_hits": 0, "image_misses": 0, "text_hits": 0, "text_misses": 0,
            "image": f"{cut.describe()} ({image_reason})" if cut is not None else f"off ({image_reason})",
            "text": f"on ({text_reason})" if text else f"off ({text_reason})",
            "class_prompts": "on" if self.classes else f"off ({classes_reason or text_reason})",
            "location": str(self.directory) if self.directory is not None else "memory",
            "bytes": 0, "loaded_from_disk": 0,
        }

    def count(self, tower: str, hits: int = 0, misses: int = 0) -> None:
        """Embeddings served from the cache (hits) and computed into it (misses)."""
        for key, n in (("hits", hits), ("misses", misses)):
            self.stats[key] += n
            self.stats[f"{tower}_{key}"] += n

    # -- image stores --------------------------------------------------------
    def _store(self, run, split: str) -> Optional[IndexStore]:
        """The split's store: complete (loaded from disk, or the val split after
        its fill pass), empty (the train split, filled by its first epoch), or
        None when the split runs live."""
        if split in self._stores:
            return self._stores[split]
        store, why = None, None
        if self.cut is None:
            why = None
        elif split == "train" and getattr(run.config, "augment", False):
            why = "random train augmentation"
        else:
            # the train split is filled in train mode: anything random there
            # (dropout, drop-path, BatchNorm updating) would be frozen by a cache
            noisy = stochastic_module(self.cut.prefix_modules(run.model))
            if noisy:
                why = f"{noisy} is active in the frozen part"
            else:
                store = self._open_or_new(run, split)
                if split == "val" and not store.complete:
                    store, why = self._fill_val(run, store)
        if why:
            self.stats[f"{split}_image"] = f"live ({why})"
        self._stores[split] = store
        return store

    def _key_parts(self, run, split: str, dataset) -> dict:
        import open_clip

        from clipft.options import options_to_dict
        spec, opts = run.resolved.data
        return {
            "what": "image", "cut": self.cut.describe(), "split": split,
            "mode": "train" if split == "train" else "eval",
            "model": run.config.model,
            "weights": tensor_digest(prefix_state(run.model, self.cut)),
            "data": {"source": spec.name, "options": options_to_dict(opts),
                     "dataset": dataset_fingerprint(dataset)},
            "transform": transform_repr(getattr(dataset, "transform", None)),
            "precision": run.config.precision, "device": run.device.type,
            "torch": torch.__version__, "open_clip": open_clip.__version__,
        }

    def _open_or_new(self, run, split: str) -> IndexStore:
        dataset = run.bundle.train if split == "train" else run.bundle.val
        if self.directory is None:
            return IndexStore(len(dataset), budget=self.memory_budget)
        t0 = time.perf_counter()
        key_parts = self._key_parts(run, split, dataset)
        directory = self.directory / f"{split}-{cache_key(key_parts)}"
        found = IndexStore.open(directory, len(dataset), key_parts)
        self.stats["build_seconds"] += time.perf_counter() - t0
        if found is not None:
            self.stats["loaded_from_disk"] += int((found.status == STATUS_OK).sum())
            self.stats["bytes"] += found.nbytes
            return found
        return IndexStore(len(dataset), directory, key_parts=key_parts)

    def _prefix(self, run, batch) -> torch.Tensor:
        t0 = time.perf_counter()
        with torch.no_grad(), run.autocast():
            values = self.cut.prefix(run.model, batch["images"].to(run.device, non_blocking=True))
        self.stats["build_seconds"] += time.perf_counter() - t0
        self.count("image", misses=len(batch["index"]))
        return values

    def _finish(self, store: IndexStore) -> None:
        t0 = time.perf_counter()
        store.finish()
        self.stats["bytes"] += store.nbytes
        self.stats["build_seconds"] += time.perf_counter() - t0

    def _fill_val(self, run, store: IndexStore):
        """One pass over the val split (evaluation needs all of it at once)."""
        try:
            # the fill pass must not shift the global RNG stream a live run sees
            with torch.random.fork_rng(devices=[]):
                for batch in run.loader(run.bundle.val, train=False, reuse=False):
                    store.put(batch["index"], self._prefix(run, batch), batch["captions"], batch["labels"])
            self._finish(store)
        except StoreTooLarge as exc:
            store.discard()
            return None, str(exc)
        except BaseException:
            store.discard()
            raise
        return store, None

    def _fill_while_training(self, run, store: IndexStore, epoch: int):
        """The live loader's batches, each with its frozen-part values computed
        (on the batch exactly as a live run computes them) and stored."""
        filling = True
        try:
            for batch in run.loader(run.bundle.train, train=True, epoch=epoch):
                if not filling:
                    yield batch
                    continue
                values = self._prefix(run, batch)
                try:
                    store.put(batch["index"], values, batch["captions"], batch["labels"])
                except StoreTooLarge as exc:
                    filling = False
                    store.discard()
                    self._stores["train"] = None
                    self.stats["train_image"] = f"live ({exc})"
                yield {**batch, "image_cache": values}
            if filling:
                self._finish(store)
        except BaseException:
            if filling and not store.complete:
                store.discard()
                self._stores.pop("train", None)
            raise

    def _image_from_cache(self, run, cached: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.cut.suffix(run.model, cached.to(run.device, non_blocking=True)), dim=-1)

    # -- text ----------------------------------------------------------------
    def _text_cacheable(self, run) -> bool:
        if not self.text:
            return False
        if not run.model.training:
            return True
        if self._text_train_ok is None:
            noisy = stochastic_module(text_modules(run.model))
            self._text_train_ok = noisy is None
            if noisy:
                self.stats["train_text"] = f"live ({noisy} is active in the text tower)"
        return self._text_train_ok

    def _cached_texts(self, run, captions: list, chunks: list) -> torch.Tensor:
        """Features of ``captions`` from the table of the model's current mode.
        On a miss, ``chunks`` (lists of strings) are encoded exactly as the live
        path would encode them, so the first values match a live run's."""
        table = self._text_tables[run.model.training]
        if any(c not in table for c in captions):
            t0 = time.perf_counter()
            with torch.no_grad():
                for chunk in chunks:
                    feats = encode_texts(run, run.tokenizer(chunk).to(run.device, non_blocking=True))
                    for c, f in zip(chunk, feats):
                        if c not in table:
                            table[c] = f
                            self.count("text", misses=1)
                        else:
                            self.count("text", hits=1)
            self.stats["build_seconds"] += time.perf_counter() - t0
        else:
            self.count("text", hits=len(captions))
        return torch.stack([table[c] for c in captions])

    def _cached_classes(self, run, compute) -> torch.Tensor:
        mode = run.model.training
        if mode in self._classes:
            self.count("text", hits=len(self._classes[mode]))
            return self._classes[mode]
        t0 = time.perf_counter()
        with torch.no_grad():
            feats = compute()
        self.stats["build_seconds"] += time.perf_counter() - t0
        self.count("text", misses=len(feats))
        self._classes[mode] = feats
        return feats

    # -- the provider interface --------------------------------------------
    def train_loader(self, run, epoch: int):
        if self.cut is None:
            return super().train_loader(run, epoch)
        return _TrainEpoch(self, run, epoch)

    def train_batch(self, run, batch, need_text: bool):
        if "image_cache" in batch:
            img = self._image_from_cache(run, batch["image_cache"])
        else:
            img = encode_images(run.model, batch["images"].to(run.device, non_blocking=True))
        txt = None
        if need_text:
            txt = self.paired_text(run, batch)
        return img, txt

    def paired_text(self, run, batch) -> torch.Tensor:
        if not self._text_cacheable(run) or (
                class_text_encoder(run.model) is not None and _labelled(batch)):
            return super().paired_text(run, batch)
        captions = list(batch["captions"])
        return self._cached_texts(run, captions, [captions])

    def train_class_features(self, run) -> torch.Tensor:
        if not (self.classes and self._text_cacheable(run)):
            return super().train_class_features(run)
        return self._cached_classes(run, run.class_text_features)

    @torch.no_grad()
    def val_image_features(self, run):
        store = self._store(run, "val")
        if store is None:
            return super().val_image_features(run)
        feats, labels, captions = [], [], []
        for batch in _Replay(self, run, store, run.bundle.val, train=False, epoch=0):
            with run.autocast():
                feats.append(self._image_from_cache(run, batch["image_cache"]).float())
            labels.append(batch["labels"])
            captions.extend(batch["captions"])
        if not feats:
            return torch.empty(0), torch.empty(0, dtype=torch.long), []
        return torch.cat(feats), torch.cat(labels).to(run.device), captions

    @torch.no_grad()
    def class_features(self, run):
        if not (self.classes and self._text_cacheable(run)):
            return super().class_features(run)
        return self._cached_classes(run, lambda: LiveFeatures.class_features(self, run))

    @torch.no_grad()
    def caption_features(self, run, captions):
        if not self._text_cacheable(run):
            return super().caption_features(run, captions)
        uniq = list(dict.fromkeys(captions))
        chunks = [uniq[i:i + TEXT_CHUNK] for i in range(0, len(uniq), TEXT_CHUNK)]
        with run.autocast():
            return self._cached_texts(run, uniq, chunks).float()


def select_features(run, strategies=()) -> LiveFeatures:
    """The features provider for a prepared run: cached where a tower (or an image
    prefix) is frozen and ``config.cache`` is on, live otherwise. A strategy
    object can keep a tower live with ``live_towers = {"image"}`` / ``{"text"}``
    (for example when it changes the tower in a way the checks cannot see)."""
    cfg = run.config
    if not getattr(cfg, "cache", True):
        return LiveFeatures()
    live: set = set()
    for _, strategy in strategies:
        live |= set(getattr(strategy, "live_towers", ()) or ())
    if "image" in live:
        cut, image_reason = None, "a strategy keeps the image tower live"
    else:
        cut, image_reason = plan_image_cut(run.model)
    if "text" in live:
        text, text_reason = False, "a strategy keeps the text tower live"
        classes, classes_reason = False, text_reason
    else:
        text, text_reason = text_tower_frozen(run.model)
        classes, classes_reason = class_prompts_frozen(run.model)
    if cut is None and not text:
        return LiveFeatures()
    directory = getattr(cfg, "cache_dir", None)
    return CachedFeatures(cut, image_reason, text, text_reason,
                          directory=Path(directory).expanduser() if directory else None,
                          classes=classes, classes_reason=classes_reason)
