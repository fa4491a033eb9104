"""Embeddings as clipft computes them, for the engine and for plugins.

``encode_image``/``encode_text`` are open_clip's own, followed by the embedding
adapter a strategy installed in that slot (:mod:`clipft.protocols`), if any,
and L2 normalisation. Class prompts go through the model's class-prompt encoder
when it has one, else through CLIP's template ensemble.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F

from clipft.protocols import (
    ENTERS_IMAGE_EMBEDDING,
    ENTERS_TEXT_EMBEDDING,
    class_text_encoder,
    conditional_class_text,
    installed,
)

#: conditional class prompts (CoCoOp) are encoded for this many (image, class)
#: pairs at a time at most, bounding the text tower's batch
CONDITIONAL_CHUNK = 2048
#: captions are encoded this many at a time at most (evaluation encodes a whole
#: split's captions, far more than one batch)
TEXT_CHUNK = 256

# set by shared_class_text(): class-prompt embeddings already computed in the block
_SHARED_CLASS_TEXT: contextvars.ContextVar = contextvars.ContextVar("clipft_shared_class_text", default=None)
# set by captured_class_text(): where the first class-prompt embeddings of the block go
_CAPTURED_CLASS_TEXT: contextvars.ContextVar = contextvars.ContextVar("clipft_captured_class_text", default=None)


@contextlib.contextmanager
def shared_class_text():
    """Within the block, :func:`class_text_features` computed without
    gradient runs once per model, classes, templates, device and autocast
    state (and tokenizer), and later calls get the same tensor.

    For a pass in which no weight changes: the engine's evaluation asks for the
    class prompts twice (zero-shot top-1, and a ``text`` head's logits), and
    with a prompt learner that is a text-tower pass each. Conditional prompts
    (CoCoOp with image features) depend on the image and are never shared."""
    token = _SHARED_CLASS_TEXT.set({})
    try:
        yield
    finally:
        _SHARED_CLASS_TEXT.reset(token)


@contextlib.contextmanager
def captured_class_text():
    """Yields a list that receives the first class-prompt embeddings ``[C, D]``
    (normalised, unconditioned) computed within the block, by
    :func:`class_text_features` or :func:`note_class_text`: how the engine
    hands the class text a training forward computed (a ``text`` head, the
    paired text of labelled images) to ``ForwardRecord.class_text_features``
    without encoding the prompts again."""
    box: list = []
    token = _CAPTURED_CLASS_TEXT.set(box)
    try:
        yield box
    finally:
        _CAPTURED_CLASS_TEXT.reset(token)


def note_class_text(features: torch.Tensor) -> torch.Tensor:
    """Offer ``features`` (``[C, D]`` class-prompt embeddings) to the enclosing
    :func:`captured_class_text`, if any; returns them."""
    box = _CAPTURED_CLASS_TEXT.get()
    if box is not None and not box and features.ndim == 2:
        box.append(features)
    return features


def _autocast_state() -> tuple:
    return tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda"))


def image_embedding(model, raw: torch.Tensor) -> torch.Tensor:
    """``encode_image``'s output through the image-embedding adapter, if any."""
    adapter = installed(model, ENTERS_IMAGE_EMBEDDING)
    return raw if adapter is None else adapter(raw)


def text_embedding(model, raw: torch.Tensor) -> torch.Tensor:
    adapter = installed(model, ENTERS_TEXT_EMBEDDING)
    return raw if adapter is None else adapter(raw)


def encode_images(model, images: torch.Tensor) -> torch.Tensor:
    return F.normalize(image_embedding(model, model.encode_image(images)), dim=-1)


def encode_texts(model, tokens: torch.Tensor, trim: bool = False) -> torch.Tensor:
    """Normalised text embeddings; ``trim`` skips the padding the causal text
    tower cannot see (same result up to float rounding, see :func:`text_trim_length`)."""
    raw = encode_text_trimmed(model, tokens) if trim else model.encode_text(tokens)
    return F.normalize(text_embedding(model, raw), dim=-1)


def embed_batches(batches, encode, device=None, autocast=contextlib.nullcontext):
    """``(features, labels, captions)`` of a whole pass: ``batches`` yields
    ``(inputs, labels, captions)``, ``encode(inputs)`` embeds one batch (under
    ``autocast``), and the features come back as float32, the labels on
    ``device``. Every evaluation embeds its images with this loop."""
    feats, labels, captions = [], [], []
    for inputs, batch_labels, batch_captions in batches:
        with autocast():
            feats.append(encode(inputs).float())
        labels.append(batch_labels)
        captions.extend(batch_captions)
    if not feats:
        return torch.empty(0), torch.empty(0, dtype=torch.long), []
    return torch.cat(feats), torch.cat(labels).to(device), captions


def text_chunks(texts: list) -> list:
    """``texts`` in slices of at most :data:`TEXT_CHUNK`."""
    return [texts[i:i + TEXT_CHUNK] for i in range(0, len(texts), TEXT_CHUNK)]


def embed_unique_texts(texts, encode, autocast=contextlib.nullcontext) -> torch.Tensor:
    """Float32 features of the distinct strings of ``texts`` in order of first
    appearance (what :func:`clipft.metrics.retrieval_metrics` takes), each
    :func:`text_chunks` slice embedded by ``encode(strings)`` under ``autocast``."""
    out = []
    for chunk in text_chunks(list(dict.fromkeys(texts))):
        with autocast():
            out.append(encode(chunk).float())
    return torch.cat(out) if out else torch.empty(0)


def class_text_features(model, tokenizer, classnames, templates, device, batch: int = 256,
                        image_features=None) -> torch.Tensor:
    """Zero-shot classifier weights ``[C, D]``: per class, the normalised mean of
    the normalised template embeddings (CLIP's prompt ensembling), or the
    normalised output of the model's class-prompt encoder when it has one.
    The templates' text tower runs on the positions the prompts reach
    (:func:`encode_text_trimmed`), not on all 77.

    With a *conditional* class-prompt encoder (CoCoOp) and ``image_features``
    (``[B, D]``, normalised), the prompts of each image: ``[B, C, D]``; without
    ``image_features`` its unconditioned prompts ``[C, D]``. ``image_features``
    is ignored otherwise (the weights do not depend on the image); use
    :func:`class_scores` to classify either way. Inside :func:`shared_class_text`
    a repeated call without gradient returns the first result."""
    encoder = class_text_encoder(model)
    shared = _SHARED_CLASS_TEXT.get()
    per_image = image_features is not None and encoder is not None and encoder.conditional
    if per_image:
        return _class_text_features(model, encoder, tokenizer, classnames, templates, device, batch,
                                    image_features)
    if shared is None or torch.is_grad_enabled():
        return note_class_text(_class_text_features(model, encoder, tokenizer, classnames, templates, device,
                                                    batch, None))
    key = (id(model), id(tokenizer), tuple(classnames), tuple(templates), str(device), _autocast_state())
    if key not in shared:
        shared[key] = _class_text_features(model, encoder, tokenizer, classnames, templates, device, batch, None)
    return note_class_text(shared[key])


def _class_text_features(model, encoder, tokenizer, classnames, templates, device, batch, image_features):
    if encoder is not None:
        if image_features is not None and encoder.conditional:
            raw = encoder(model, tokenizer, list(classnames), tuple(templates), image_features=image_features)
        else:
            raw = encoder(model, tokenizer, list(classnames), tuple(templates))
        return F.normalize(text_embedding(model, raw), dim=-1)
    texts = [t.format(c) for c in classnames for t in templates]
    feats = []
    for i in range(0, len(texts), batch):
        # class prompts are a few tokens of 77: the causal tower runs only as far
        # as the longest one reaches (same result up to rounding, tests/test_trim.py)
        feats.append(encode_texts(model, tokenizer(texts[i:i + batch]).to(device), trim=True))
    feats = torch.cat(feats).view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(feats, dim=-1)


def class_scores(model, tokenizer, classnames, templates, device, image_features) -> torch.Tensor:
    """Cosine similarity of each image to each class prompt, ``[B, C]``
    (``image_features`` normalised ``[B, D]``): against the class-prompt
    embeddings, or, with a conditional class-prompt encoder (CoCoOp), against
    each image's own prompts, encoded for a few images at a time."""
    if not conditional_class_text(model):
        cls = class_text_features(model, tokenizer, classnames, templates, device)
        return image_features @ cls.t().to(image_features.dtype)
    step = max(1, CONDITIONAL_CHUNK // max(1, len(classnames)))
    out = []
    for i in range(0, len(image_features), step):
        f = image_features[i:i + step]
        cls = class_text_features(model, tokenizer, classnames, templates, device, image_features=f)
        out.append(torch.einsum("bd,bcd->bc", f, cls.to(f.dtype)))
    return torch.cat(out) if out else image_features.new_zeros(0, len(classnames))


def infer_embed_dim(model: torch.nn.Module) -> int:
    """Output dimension of the shared embedding space (reads the live model, so it
    follows a replaced projection)."""
    visual = model.visual
    proj = getattr(visual, "proj", None)
    if isinstance(proj, torch.nn.Parameter):
        return int(proj.shape[1])
    if isinstance(proj, torch.nn.Linear):
        return int(proj.out_features)
    attnpool = getattr(visual, "attnpool", None)
    if attnpool is not None:
        return int(attnpool.c_proj.out_features)
    head = getattr(visual, "head", None)
    if head is not None and isinstance(getattr(head, "proj", None), torch.nn.Linear):
        return int(head.proj.out_features)
    # towers whose projection is a trunk classifier (timm configs without a
    # head projection): ask the model itself with one blank image
    size = getattr(visual, "image_size", 224)
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    p = next(model.parameters())
    was_training = model.training
    model.eval()  # no BatchNorm statistics update from the probe
    try:
        with torch.no_grad():
            out = model.encode_image(torch.zeros(1, 3, *size, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
    return int(out.shape[-1])


# -- text: do not run the padding ------------------------------------------------
def text_trim_length(model, tokens: torch.Tensor):
    """How many leading token positions ``encode_text`` needs, or None when the
    full row is needed (or the model is not one this applies to).

    CLIP's text tower is causal (position i attends to positions <= i) and pools
    at the end-of-text token, so the padding after the last end-of-text token of
    a batch never influences the result: cutting it off gives the same
    embedding up to float rounding, at a fraction of the cost (a class prompt
    or caption is ~10 of 77 positions; attention cost is quadratic in length).
    """
    from open_clip.model import CLIP

    if "encode_text" in model.__dict__ or type(model).encode_text is not CLIP.encode_text:
        return None
    return causal_text_length(model, tokens)


def causal_text_length(model, tokens: torch.Tensor):
    """The cut of :func:`text_trim_length` for a model whose text path is CLIP's
    (the caller vouches for that): None unless pooling and mask allow it."""
    pool = getattr(model, "text_pool_type", None)
    if pool == "argmax":
        last = tokens.argmax(dim=-1)
    elif pool == "eos" and getattr(model, "text_eos_id", None) is not None:
        last = (tokens == model.text_eos_id).int().argmax(dim=-1)
    else:
        return None
    if not _is_causal(getattr(model, "attn_mask", None), tokens.shape[1]):
        return None
    length = int(last.max()) + 1
    return length if length < tokens.shape[1] else None


def _is_causal(mask, length: int) -> bool:
    if mask is None or mask.ndim != 2 or mask.shape[0] != length or mask.shape[1] != length:
        return False
    blocked = torch.isinf(mask) & (mask < 0)
    upper = torch.ones(length, length, dtype=torch.bool, device=mask.device).triu(1)
    return bool(torch.equal(blocked, upper)) and bool((mask[~upper] == 0).all())


def encode_text_trimmed(model, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` without the trailing padding (see
    :func:`text_trim_length`); falls back to ``encode_text`` when it does not apply.
    The token embedding still sees the full rows, so hooks on it (prompt
    learners) work unchanged."""
    length = text_trim_length(model, tokens)
    if length is None:
        return model.encode_text(tokens)
    return encode_text_prefix(model, tokens, length)


def encode_text_prefix(model, tokens: torch.Tensor, length: int) -> torch.Tensor:
    """CLIP's ``encode_text`` run on the first ``length`` positions only."""
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding.to(cast_dtype)
    return _text_tower_from(model, x[:, :length], tokens, length)


def encode_token_embeddings(model, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP's ``encode_text`` from given token embeddings: ``embeddings``
    ``[N, L', W]`` stand for ``model.token_embedding(tokens)[:, :L']`` (a prompt
    learner's context spliced in), ``tokens`` ``[N, L]`` are the token ids
    (they decide where the text is pooled). Every position the pooling needs
    must be within ``L'`` (:func:`causal_text_length` gives the shortest);
    positions after it are never computed. For a model whose text path is
    CLIP's own (:func:`text_trim_length` is not None for its tokens), else a
    ``ValueError``."""
    from open_clip.model import CLIP

    length = embeddings.shape[1]
    if "encode_text" in model.__dict__ or type(model).encode_text is not CLIP.encode_text:
        raise ValueError("encode_token_embeddings needs open_clip's own CLIP text tower "
                         f"({type(model).__name__} has another)")
    if length < tokens.shape[1]:
        need = causal_text_length(model, tokens)   # None: the mask or the pooling allow no cut
        if need is None or length < need:
            raise ValueError(f"token embeddings of length {length} do not reach the pooled position of "
                             f"every row (need {need or tokens.shape[1]})")
    cast_dtype = model.transformer.get_cast_dtype()
    x = embeddings.to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    return _text_tower_from(model, x, tokens, length)


def _text_tower_from(model, x: torch.Tensor, tokens: torch.Tensor, length: int) -> torch.Tensor:
    """The causal text transformer, ``ln_final``, pooling and projection on the
    first ``length`` positions (``x`` already embedded, positions added)."""
    from open_clip.transformer import text_global_pool

    mask = model.attn_mask   # None on a text tower built without a causal mask
    x = model.transformer(x, attn_mask=None if mask is None else mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens[:, :length], model.text_pool_type,
                         eos_token_id=getattr(model, "text_eos_id", None))
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Module) else x @ proj
    return x
