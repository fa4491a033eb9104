"""Frozen-tower caching: where a tower may be cut, and where cut results are kept.

Two questions decide what can be cached, and this module answers both from the
live model after the strategies have run (so it needs no knowledge of any
particular strategy):

- **Image tower: where is the cut?** The image tower is seen as a chain of stages.
  The longest prefix of stages that holds no trainable parameter is "frozen";
  its output is what gets cached, and the remaining stages run live on the cached
  value every step. The cut points, from cheapest to replay to most expensive:

  ``output``    the whole tower is frozen (linear/zero-shot heads, ``logit-scale``,
                ``prompt``): the cached value is the embedding itself.
  ``pre-proj``  only the projection trains (``projections``): the cached value is
                the pooled trunk output; the live projection is applied each step.
                ViT: ``pooled @ visual.proj``. ModifiedResNet: the attention-pool
                output *before* ``attnpool.c_proj``, then ``c_proj`` live.
  ``blocks:k``  ViT blocks ``k..`` (and what follows them) train, blocks ``< k``
                and the embeddings are frozen (``last-n``): the cached value is the
                token sequence entering block ``k``.

  "Entirely frozen" is just the ``output`` cut. The finer cuts need to replay the
  tail of the tower stage by stage, so they are only offered for open_clip's stock
  ``VisionTransformer`` and ``ModifiedResNet`` whose forward methods nobody has
  replaced; any other tower gets ``output`` or nothing.

- **Text tower: is it frozen?** Only when nothing outside ``model.visual`` trains
  (``logit_scale``/``logit_bias`` excepted): a prompt learner or adapter that a
  strategy inserts anywhere else could feed the text tower, so it forbids the
  text cache. Text embeddings are then cached per caption string.

Anything that could make a cached value differ from a live one disables the
cache for that tower: a replaced ``encode_image``/``encode_text`` or ``forward``,
forward hooks on a cached module, and, for the train split (computed in train
mode), active dropout, patch dropout, drop-path or BatchNorm in training mode.
A strategy can also opt a tower out explicitly with ``live_towers = {"image"}``.

Stores keep per-sample values by dataset index, in memory or, with a cache
directory, in memory-mapped files keyed by a fingerprint of the frozen weights,
the data, the transform, precision and library versions.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

FORMAT = 1
STATUS_MISSING, STATUS_OK, STATUS_FAILED = 0, 1, 2


# -- inspecting the model ----------------------------------------------------
def _open_clip_classes():
    from open_clip.model import CLIP, CustomTextCLIP
    from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet
    from open_clip.transformer import Transformer, VisionTransformer
    return CLIP, CustomTextCLIP, VisionTransformer, Transformer, ModifiedResNet, AttentionPool2d


def _trainable(obj) -> bool:
    if obj is None:
        return False
    if isinstance(obj, torch.nn.Parameter):
        return obj.requires_grad
    if isinstance(obj, torch.nn.Module):
        return any(p.requires_grad for p in obj.parameters())
    return False


def _hooked(modules) -> Optional[str]:
    """Name of the first module with forward hooks, or None."""
    for m in modules:
        if not isinstance(m, torch.nn.Module):
            continue
        for sub in m.modules():
            if sub._forward_hooks or sub._forward_pre_hooks:
                return type(sub).__name__
    return None


def _overridden(modules, attrs_=("forward",)) -> Optional[str]:
    """Name of the first module whose forward was replaced on the instance."""
    for m in modules:
        if not isinstance(m, torch.nn.Module):
            continue
        for sub in m.modules():
            for a in attrs_:
                if a in sub.__dict__:
                    return f"{type(sub).__name__}.{a}"
    return None


def stochastic_module(modules) -> Optional[str]:
    """Name of the first module whose output is random or batch-dependent in its
    current mode (dropout, patch dropout, drop-path, BatchNorm in training mode)."""
    for m in modules:
        if not isinstance(m, torch.nn.Module):
            continue
        for sub in m.modules():
            if not sub.training:
                continue
            if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm):
                return type(sub).__name__
            if isinstance(sub, torch.nn.modules.dropout._DropoutNd) and sub.p > 0:
                return type(sub).__name__
            if isinstance(sub, torch.nn.MultiheadAttention) and sub.dropout > 0:
                return "MultiheadAttention(dropout)"
            for attr in ("prob", "drop_prob", "drop_path_prob"):
                v = getattr(sub, attr, None)
                if isinstance(v, float) and v > 0:
                    return type(sub).__name__
    return None


def _stock_encode(model, attr: str) -> bool:
    CLIP, CustomTextCLIP, *_ = _open_clip_classes()
    if attr in model.__dict__:
        return False
    fn = getattr(type(model), attr, None)
    return fn is not None and fn in (getattr(CLIP, attr), getattr(CustomTextCLIP, attr))


def _stock_method(obj, cls, name: str) -> bool:
    return name not in obj.__dict__ and getattr(type(obj), name, None) is getattr(cls, name)


# -- image cut points --------------------------------------------------------
class ImageCut:
    """The frozen prefix of the image tower and how to finish it live."""

    kind = "output"

    def describe(self) -> str:
        return self.kind

    def prefix_modules(self, model) -> list:
        """Modules (and parameters) whose outputs the cache replaces."""
        return [model.visual]

    def bypassed_modules(self, model) -> list:
        """Modules whose ``__call__`` the stage-by-stage replay skips (their hooks
        would not run, so they must have none)."""
        return []

    def prefix(self, model, images: torch.Tensor) -> torch.Tensor:
        return model.encode_image(images)

    def suffix(self, model, cached: torch.Tensor) -> torch.Tensor:
        """The un-normalised image embedding from a cached prefix value."""
        return cached


class VitProjCut(ImageCut):
    kind = "pre-proj"

    def bypassed_modules(self, model):
        return [model.visual, model.visual.transformer]

    def prefix_modules(self, model):
        v = model.visual
        return [v.conv1, v.class_embedding, v.positional_embedding, v.patch_dropout, v.ln_pre,
                v.transformer, v.ln_post]

    def prefix(self, model, images):
        v = model.visual
        x = _vit_blocks(v, v._embeds(images), 0, len(v.transformer.resblocks))
        pooled, _ = v._pool(x)
        return pooled

    def suffix(self, model, cached):
        return _apply_proj(model.visual.proj, cached)


class VitBlocksCut(ImageCut):
    kind = "blocks"

    def __init__(self, start: int):
        self.start = start

    def describe(self):
        return f"blocks:{self.start}"

    def bypassed_modules(self, model):
        return [model.visual, model.visual.transformer]

    def prefix_modules(self, model):
        v = model.visual
        return [v.conv1, v.class_embedding, v.positional_embedding, v.patch_dropout, v.ln_pre,
                *v.transformer.resblocks[:self.start]]

    def prefix(self, model, images):
        v = model.visual
        return _vit_blocks(v, v._embeds(images), 0, self.start)

    def suffix(self, model, cached):
        v = model.visual
        x = _vit_blocks(v, cached, self.start, len(v.transformer.resblocks))
        pooled, _ = v._pool(x)
        return _apply_proj(v.proj, pooled)


class ResNetProjCut(ImageCut):
    kind = "pre-proj"

    def bypassed_modules(self, model):
        return [model.visual, model.visual.attnpool]

    def prefix_modules(self, model):
        v = model.visual
        pool = v.attnpool
        return [v.conv1, v.bn1, v.conv2, v.bn2, v.conv3, v.bn3, v.layer1, v.layer2, v.layer3,
                v.layer4, pool.q_proj, pool.k_proj, pool.v_proj, pool.positional_embedding]

    def prefix(self, model, images):
        v = model.visual
        x = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(images)))))
        return _attnpool_before_c_proj(v.attnpool, x)

    def suffix(self, model, cached):
        c = model.visual.attnpool.c_proj
        return F.linear(cached, c.weight, c.bias)


def _apply_proj(proj, pooled):
    if proj is None:
        return pooled
    if isinstance(proj, torch.nn.Module):
        return proj(pooled)
    return pooled @ proj


def _vit_blocks(visual, x, start: int, stop: int):
    """Blocks ``start..stop-1`` exactly as open_clip's ``Transformer.forward``
    runs them (batch-first in and out, gradient checkpointing honoured)."""
    from torch.utils.checkpoint import checkpoint
    tr = visual.transformer
    if not tr.batch_first:
        x = x.transpose(0, 1).contiguous()
    for blk in tr.resblocks[start:stop]:
        if tr.grad_checkpointing:
            x = checkpoint(blk, x, None, None, None, use_reentrant=False)
        else:
            x = blk(x, attn_mask=None)
    if not tr.batch_first:
        x = x.transpose(0, 1)
    return x


def _attnpool_before_c_proj(pool, x):
    """``AttentionPool2d.forward`` with the output projection left out: the
    concatenated head outputs of the pooled (mean) query. The identity in place
    of ``c_proj`` is exact (each output is one product by 1 plus zeros)."""
    x = x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3]).permute(2, 0, 1)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
    x = x + pool.positional_embedding[:, None, :].to(x.dtype)
    width = x.shape[-1]
    eye = torch.eye(width, dtype=pool.q_proj.weight.dtype, device=x.device)
    out, _ = F.multi_head_attention_forward(
        query=x, key=x, value=x, embed_dim_to_check=width, num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight,
        v_proj_weight=pool.v_proj.weight, in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.,
        out_proj_weight=eye, out_proj_bias=torch.zeros_like(pool.q_proj.bias),
        use_separate_proj_weight=True, training=pool.training, need_weights=False)
    return out[0]


def _vit_cut(visual) -> tuple[Optional[ImageCut], str]:
    _, _, VisionTransformer, Transformer, _, _ = _open_clip_classes()
    stock = (_stock_method(visual, VisionTransformer, "forward")
             and _stock_method(visual, VisionTransformer, "_embeds")
             and _stock_method(visual, VisionTransformer, "_pool")
             and isinstance(visual.transformer, Transformer)
             and _stock_method(visual.transformer, Transformer, "forward"))
    if not stock or visual.attn_pool is not None or visual.output_tokens:
        return None, "image tower trains and is not a stock open_clip ViT"
    if any(_trainable(m) for m in (visual.conv1, visual.class_embedding, visual.positional_embedding,
                                   visual.patch_dropout, visual.ln_pre)):
        return None, "image tower trains from its embeddings on"
    blocks = visual.transformer.resblocks
    first = next((i for i, b in enumerate(blocks) if _trainable(b)), None)
    if first is not None:
        if first == 0:
            return None, "image tower trains from block 0"
        return VitBlocksCut(first), f"ViT blocks {first}.. train"
    if _trainable(visual.ln_post):
        return VitBlocksCut(len(blocks)), "ViT ln_post trains"
    return VitProjCut(), "only the ViT projection trains"


def _resnet_cut(visual) -> tuple[Optional[ImageCut], str]:
    *_, ModifiedResNet, AttentionPool2d = _open_clip_classes()
    pool = getattr(visual, "attnpool", None)
    stock = (_stock_method(visual, ModifiedResNet, "forward")
             and _stock_method(visual, ModifiedResNet, "stem")
             and isinstance(pool, AttentionPool2d)
             and _stock_method(pool, AttentionPool2d, "forward"))
    if not stock:
        return None, "image tower trains and is not a stock open_clip ModifiedResNet"
    trainable = [n for n, p in visual.named_parameters() if p.requires_grad]
    if all(n.startswith("attnpool.c_proj.") for n in trainable):
        return ResNetProjCut(), "only the ResNet projection (attnpool.c_proj) trains"
    return None, "ResNet trunk trains"


def plan_image_cut(model) -> tuple[Optional[ImageCut], str]:
    """Where the image tower can be cut for caching, with the reason."""
    visual = getattr(model, "visual", None)
    if visual is None:
        return None, "model has no image tower"
    if not _stock_encode(model, "encode_image"):
        return None, "encode_image is not open_clip's own"
    if not any(p.requires_grad for p in visual.parameters()):
        cut, why = ImageCut(), "image tower frozen"
    else:
        _, _, VisionTransformer, _, ModifiedResNet, _ = _open_clip_classes()
        if isinstance(visual, VisionTransformer):
            cut, why = _vit_cut(visual)
        elif isinstance(visual, ModifiedResNet):
            cut, why = _resnet_cut(visual)
        else:
            return None, f"image tower ({type(visual).__name__}) trains"
        if cut is None:
            return None, why
    prefix = cut.prefix_modules(model)
    hooked = _hooked(prefix) or next(
        (type(m).__name__ for m in cut.bypassed_modules(model)
         if m._forward_hooks or m._forward_pre_hooks), None)
    if hooked:
        return None, f"forward hooks on the image tower ({hooked})"
    over = _overridden(prefix)
    if over:
        return None, f"{over} was replaced on the instance"
    return cut, why


# -- text tower --------------------------------------------------------------
TEXT_FREE = ("logit_scale", "logit_bias")


def text_modules(model) -> list:
    if hasattr(model, "text"):
        return [model.text]
    return [m for m in (getattr(model, "token_embedding", None), getattr(model, "transformer", None),
                        getattr(model, "ln_final", None), getattr(model, "text_projection", None))
            if isinstance(m, torch.nn.Module)]


def _class_encoder_name() -> str:
    try:
        from clipft.engine.forward import CLASS_TEXT_ENCODER
        return CLASS_TEXT_ENCODER
    except ImportError:  # pragma: no cover - older core
        return "clipft_class_text"


def text_tower_frozen(model) -> tuple[bool, str]:
    """True when ``encode_text`` (captions) depends on frozen weights only.

    A class-prompt encoder a strategy installed (prompt tuning) does not count:
    it only takes part while class prompts are encoded (see
    :func:`class_prompts_frozen`), never in ``encode_text`` of a caption."""
    if not _stock_encode(model, "encode_text"):
        return False, "encode_text is not open_clip's own"
    encoder = _class_encoder_name() + "."
    for name, p in model.named_parameters():
        if (p.requires_grad and not name.startswith(("visual.", encoder))
                and name not in TEXT_FREE):
            return False, f"{name} trains"
    mods = text_modules(model)
    hooked = _hooked(mods)
    if hooked:
        return False, f"forward hooks on the text tower ({hooked})"
    over = _overridden(mods)
    if over:
        return False, f"{over} was replaced on the instance"
    return True, "text tower frozen"


def class_prompts_frozen(model) -> tuple[bool, str]:
    """True when the class-prompt embeddings are fixed: the text tower is frozen
    and a class-prompt encoder, if a strategy installed one, has nothing that trains."""
    ok, why = text_tower_frozen(model)
    if not ok:
        return False, why
    encoder = getattr(model, _class_encoder_name(), None)
    if encoder is not None:
        trains = [n for n, p in encoder.named_parameters() if p.requires_grad]
        if trains:
            return False, f"{_class_encoder_name()}.{trains[0]} trains"
        if _hooked([encoder]) or _overridden([encoder]):
            return False, "the class-prompt encoder is hooked or replaced"
    return True, "class prompts fixed"


# -- fingerprints (on-disk keys) ----------------------------------------------
def tensor_digest(named_tensors) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, t in named_tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def prefix_state(model, cut: ImageCut):
    """(name, tensor) of every parameter and buffer the cached prefix reads."""
    ids = {}
    for m in cut.prefix_modules(model):
        if isinstance(m, torch.nn.Module):
            for t in list(m.parameters()) + list(m.buffers()):
                ids[id(t)] = t
        elif torch.is_tensor(m):
            ids[id(m)] = m
    named = [(n, t) for n, t in list(model.named_parameters()) + list(model.named_buffers())
             if id(t) in ids]
    return sorted(named, key=lambda x: x[0])


_ADDR = re.compile(r" at 0x[0-9a-fA-F]+")


def transform_repr(transform) -> str:
    return _ADDR.sub("", repr(transform))


def dataset_fingerprint(dataset) -> str:
    """A digest of what a dataset would yield: its attributes (not the transform),
    and size and mtime of every file it names."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(dataset).__qualname__.encode())
    state = {k: v for k, v in sorted(vars(dataset).items()) if k != "transform"} \
        if hasattr(dataset, "__dict__") else {}

    def visit(v):
        if isinstance(v, str) and len(v) < 4096 and os.path.isfile(v):
            st = os.stat(v)
            h.update(f"{v}|{st.st_size}|{st.st_mtime_ns};".encode())
        elif isinstance(v, (list, tuple)):
            h.update(b"[")
            for x in v:
                visit(x)
            h.update(b"]")
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                h.update(f"{k}=".encode())
                visit(v[k])
        else:
            h.update(_ADDR.sub("", repr(v)).encode() + b";")

    visit(state)
    h.update(f"len={len(dataset)}".encode())
    return h.hexdigest()


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


# -- stores --------------------------------------------------------------------
def memory_budget_bytes(fraction: float = 0.25) -> int:
    """Default cap on an in-memory store: a quarter of physical memory."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * fraction)
    except (ValueError, OSError, AttributeError):
        return 4 << 30


class StoreTooLarge(Exception):
    pass


class IndexStore:
    """Per-sample values of one split, by dataset index, with each sample's
    caption and label (so a cached epoch never touches the images).

    In memory by default. With ``directory``, values live in a memory-mapped
    file written under a temporary name and renamed into place when complete, so
    a crash never leaves a half-built cache that looks valid.
    """

    def __init__(self, n: int, directory: Optional[Path] = None, budget: Optional[int] = None,
                 key_parts: Optional[dict] = None):
        self.n = n
        self.directory = Path(directory) if directory is not None else None
        self.budget = budget
        self.key_parts = key_parts or {}
        self.values: Optional[torch.Tensor] = None
        self.status = torch.zeros(n, dtype=torch.uint8)
        self.captions: list = [None] * n
        self.labels = torch.full((n,), -1, dtype=torch.long)
        self.loaded = False
        self._tmp: Optional[Path] = None

    # building
    def _allocate(self, row: torch.Tensor):
        shape, dtype = tuple(row.shape[1:]), row.dtype
        numel = self.n * int(torch.Size(shape).numel())
        nbytes = numel * row.element_size()
        if self.directory is None:
            if self.budget is not None and nbytes > self.budget:
                raise StoreTooLarge(
                    f"{nbytes / 2**20:.0f} MB needed > {self.budget / 2**20:.0f} MB in-memory limit; "
                    "pass --cache-dir to keep it on disk")
            self.values = torch.empty((self.n, *shape), dtype=dtype)
            return
        self._tmp = self.directory.with_name(f"{self.directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir(parents=True)
        self.values = torch.from_file(str(self._tmp / "values.bin"), shared=True, size=numel,
                                      dtype=dtype).view(self.n, *shape)

    def put(self, index: torch.Tensor, values: torch.Tensor, captions, labels) -> None:
        values = values.detach()
        if self.values is None:
            self._allocate(values)
        idx = index.cpu()
        self.values[idx] = values.to("cpu", self.values.dtype)
        self.status[idx] = STATUS_OK
        self.labels[idx] = labels.cpu()
        for i, c in zip(idx.tolist(), captions):
            self.captions[i] = c

    def mark_failed(self, indices) -> None:
        for i in indices:
            if self.status[i] == STATUS_MISSING:
                self.status[i] = STATUS_FAILED

    @property
    def complete(self) -> bool:
        return self.values is not None and bool((self.status != STATUS_MISSING).all())

    @property
    def nbytes(self) -> int:
        return 0 if self.values is None else self.values.numel() * self.values.element_size()

    def finish(self) -> None:
        """Samples never seen (undecodable ones the loader dropped) count as failed;
        an on-disk store is committed."""
        self.status[self.status == STATUS_MISSING] = STATUS_FAILED
        if self.directory is None or self._tmp is None:
            return
        meta = {"format": FORMAT, "key": self.key_parts, "n": self.n,
                "shape": list(self.values.shape[1:]), "dtype": str(self.values.dtype).replace("torch.", ""),
                "captions": self.captions, "labels": self.labels.tolist()}
        (self._tmp / "status.bin").write_bytes(self.status.numpy().tobytes())
        (self._tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(self._tmp, self.directory)
        except OSError:  # another process committed the same key first
            shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp = None
        self._load_values()

    def discard(self) -> None:
        self.values = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    # reading
    @classmethod
    def open(cls, directory: Path, n: int, key_parts: dict) -> Optional["IndexStore"]:
        """A complete on-disk store for this key, or None."""
        meta_path = Path(directory) / "meta.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return None
        if meta.get("format") != FORMAT or meta.get("n") != n or meta.get("key") != json.loads(
                json.dumps(key_parts, default=str)):
            return None
        store = cls(n, directory, key_parts=key_parts)
        store._meta = meta
        store.status = torch.frombuffer(bytearray((Path(directory) / "status.bin").read_bytes()),
                                        dtype=torch.uint8)
        store.captions = meta["captions"]
        store.labels = torch.tensor(meta["labels"], dtype=torch.long)
        store._load_values(meta)
        store.loaded = True
        return store

    def _load_values(self, meta: Optional[dict] = None) -> None:
        meta = meta or json.loads((self.directory / "meta.json").read_text())
        shape = tuple(meta["shape"])
        dtype = getattr(torch, meta["dtype"])
        numel = self.n * int(torch.Size(shape).numel())
        # private mapping: pages load on demand, nothing is written back
        self.values = torch.from_file(str(self.directory / "values.bin"), shared=False,
                                      size=numel, dtype=dtype).view(self.n, *shape)

    def gather(self, index: torch.Tensor):
        """(values, captions, labels, index) of the decodable samples among ``index``."""
        ok = self.status[index] == STATUS_OK
        idx = index[ok]
        return self.values[idx], [self.captions[i] for i in idx.tolist()], self.labels[idx], idx
