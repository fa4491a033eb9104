"""Where embeddings come from during training and evaluation.

The loop and the evaluator talk to a provider only:

- ``train_epoch(epoch)``: the :class:`Batch` es of one epoch;
- ``train_features(batch, need_text)``: image and (when needed) text features,
  which are ``image_features(batch)`` and ``paired_text(batch, image)`` (large-batch
  accumulation calls the two apart, to replay or skip each);
- ``val_image_features()``, ``class_features()``, ``class_scores(image_features)``,
  ``caption_features(captions)``.

:class:`LiveFeatures` computes everything from the model, every time, and
is all a run without a cache uses. The cached provider
(:mod:`clipft.engine.cache.provider`) wraps one: it hands it caching encoders
in place of :class:`Encoders` and serves cached image batches itself.
"""
from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

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
from clipft.errors import ClipftError
from clipft.protocols import bypass_inserted, class_text_encoder, conditional_class_text


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


class FrozenImageFeatures:
    """``ForwardRecord.frozen_image_features`` (``Strategy.frozen_image_features``):
    the batch's image embeddings by the same model with every inserted
    ``layer``/``hook`` module bypassed and no image-embedding adapter, in eval
    mode, normalised, without gradient: the pretrained model's features, with
    no second model in memory.

    With ``cache`` (an indexable train split without random augmentation) they
    come from a store ``[N, D]`` keyed by sample index, filled by one in-order
    pass over the train split at the first step that asks (under a forked RNG,
    so training draws what it would have). Every value is computed in that one
    pass, whichever step comes first, so a resumed run reads the same values
    as the run it continues. Otherwise each step computes its own batch."""

    def __init__(self, enc: Encoders, loaders, cache: bool):
        self.enc, self.loaders, self.cache = enc, loaders, cache
        self.store = None     # [N, D] float32 on the device
        self.filled = None    # [N] bool: undecodable samples stay unfilled

    @torch.no_grad()
    def compute(self, pixels) -> torch.Tensor:
        model = self.enc.model
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        restore = bypass_inserted(model)
        try:
            with torch.random.fork_rng(devices=[]):
                return F.normalize(self.enc.image_raw(pixels).float(), dim=-1)
        finally:
            restore()
            for m, training in modes:
                m.training = training

    def _fill(self) -> None:
        with torch.random.fork_rng(devices=[]):   # the loader's pass draws from the global stream
            self._fill_store()

    def _fill_store(self) -> None:
        n = len(self.loaders.bundle.train)
        for b in self.loaders.train_in_order():
            feats = self.compute(b["images"])
            if self.store is None:
                self.store = torch.zeros(n, feats.shape[-1], device=feats.device)
                self.filled = torch.zeros(n, dtype=torch.bool, device=feats.device)
            index = b["index"].to(feats.device)
            self.store[index] = feats
            self.filled[index] = True

    def __call__(self, batch: Batch) -> torch.Tensor:
        if self.cache:
            if self.store is None:
                self._fill()
            if self.store is not None:
                index = batch.index.to(self.store.device)
                if bool(self.filled[index].all()):
                    return self.store[index]
        if batch.inputs is None or batch.at != "pixels":
            raise ClipftError("the frozen model's image features need the batch's pixels, which this step "
                              f"does not hold ({'none' if batch.inputs is None else batch.at})")
        return self.compute(batch.inputs)


def _pixels(batches):
    """A loader's batches as :func:`~clipft.encode.embed_batches` takes them."""
    return ((b["images"], b["labels"], b["captions"]) for b in batches)


def _stored(batches):
    """Batches replayed from a store, embedded through ``image_features``."""
    return ((b, b.labels, b.captions) for b in batches)
