"""What can be cached, where the image tower is cut, and why not.

Answered from the live model after the strategies have run, so it needs no
knowledge of any particular strategy:

- **Image tower.** The tower is a chain of stages (see :mod:`.replay`). The
  longest prefix of stages that holds no trainable parameter is frozen; its
  output is cached and the rest runs live. The finer cuts need the tail of the
  tower replayed stage by stage, so they are only offered for open_clip's stock
  ``VisionTransformer`` and ``ModifiedResNet`` whose methods nobody replaced;
  any other tower gets ``output`` or nothing.
- **Text tower.** Frozen when nothing that feeds ``encode_text`` trains
  (``logit_scale``/``logit_bias``, the image side, and the embedding adapters,
  which run live on the cached output, do not count). Caption embeddings are
  then cached per caption string; class-prompt embeddings too, unless a
  class-prompt encoder or the text-embedding adapter trains.

Anything that could make a cached value differ from a live one keeps the tower
live (the list is in docs/performance.md).
"""
from __future__ import annotations

from typing import Optional

import attrs
import torch

from clipft.engine.cache.replay import ImageCut, ResNetProjCut, VitBlocksCut, VitProjCut, vit_stem
from clipft.protocols import (
    ENTERS_CLASS_TEXT,
    ENTERS_IMAGE_EMBEDDING,
    ENTERS_TEXT_EMBEDDING,
    SLOTS,
    conditional_class_text,
    installed,
)


@attrs.define
class CachePlan:
    """The decision, with the reason for each part (shown in ``summary.json``)."""

    cut: Optional[ImageCut]
    image_reason: str
    text: bool
    text_reason: str
    classes: bool
    classes_reason: str

    @property
    def anything(self) -> bool:
        return self.cut is not None or self.text


def plan_cache(model, live_towers=()) -> CachePlan:
    """What to cache for ``model``; ``live_towers`` are towers strategies keep live."""
    live = set(live_towers)
    if "image" in live:
        cut, image_reason = None, "a strategy keeps the image tower live"
    else:
        cut, image_reason = plan_image_cut(model)
    if "text" in live:
        why = "a strategy keeps the text tower live"
        return CachePlan(cut, image_reason, False, why, False, why)
    text, text_reason = text_tower_frozen(model)
    classes, classes_reason = class_prompts_frozen(model)
    return CachePlan(cut, image_reason, text, text_reason, classes and text, classes_reason)


# -- inspecting the model ----------------------------------------------------
def _open_clip_classes():
    from open_clip.model import CLIP, CustomTextCLIP
    from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet
    from open_clip.transformer import Transformer, VisionTransformer
    return CLIP, CustomTextCLIP, VisionTransformer, Transformer, ModifiedResNet, AttentionPool2d


def trainable(obj) -> bool:
    if obj is None:
        return False
    if isinstance(obj, torch.nn.Parameter):
        return obj.requires_grad
    if isinstance(obj, torch.nn.Module):
        return any(p.requires_grad for p in obj.parameters())
    return False


def _submodules(modules):
    """Every module inside ``modules`` (parameters among them are skipped)."""
    for m in modules:
        if isinstance(m, torch.nn.Module):
            yield from m.modules()


def _hooked(modules) -> Optional[str]:
    """Name of the first module with forward hooks, or None."""
    return next((type(sub).__name__ for sub in _submodules(modules)
                 if sub._forward_hooks or sub._forward_pre_hooks), None)


def _overridden(modules, attrs_=("forward",)) -> Optional[str]:
    """Name of the first module whose forward was replaced on the instance."""
    return next((f"{type(sub).__name__}.{a}" for sub in _submodules(modules)
                 for a in attrs_ if a in sub.__dict__), None)


def stochastic_module(modules) -> Optional[str]:
    """Name of the first module whose output is random or batch-dependent in its
    current mode (dropout, patch dropout, drop-path, BatchNorm in training mode)."""
    for sub in _submodules(modules):
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
def _vit_cut(visual) -> tuple[Optional[ImageCut], str]:
    _, _, VisionTransformer, Transformer, _, _ = _open_clip_classes()
    stock = (all(_stock_method(visual, VisionTransformer, m)
                 for m in ("forward", "_embeds", "_pool", "forward_intermediates"))
             and isinstance(visual.transformer, Transformer)
             and all(_stock_method(visual.transformer, Transformer, m)
                     for m in ("forward", "forward_intermediates")))
    if not stock or visual.attn_pool is not None or visual.output_tokens:
        return None, "image tower trains and is not a stock open_clip ViT"
    if any(trainable(m) for m in vit_stem(visual)):
        return None, "image tower trains from its embeddings on"
    blocks = visual.transformer.resblocks
    first = next((i for i, b in enumerate(blocks) if trainable(b)), None)
    if first is not None:
        if first == 0:
            return None, "image tower trains from block 0"
        return VitBlocksCut(first), f"ViT blocks {first}.. train"
    if trainable(visual.ln_post):
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
    names = [n for n, p in visual.named_parameters() if p.requires_grad]
    if all(n.startswith("attnpool.c_proj.") for n in names):
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
    if installed(model, ENTERS_IMAGE_EMBEDDING) is not None:
        why += "; the image-embedding adapter runs live on the cached value"
    return cut, why


# -- text tower --------------------------------------------------------------
#: parameters that never feed encode_text: the logit temperature/bias, and the
#: slots whose modules run outside the text tower (on its output, or only
#: while class prompts are encoded)
_TEXT_FREE = ("logit_scale", "logit_bias")
_OUTSIDE_TEXT = tuple(f"{SLOTS[s]}." for s in (ENTERS_CLASS_TEXT, ENTERS_IMAGE_EMBEDDING, ENTERS_TEXT_EMBEDDING))


def text_modules(model) -> list:
    if hasattr(model, "text"):
        return [model.text]
    return [m for m in (getattr(model, "token_embedding", None), getattr(model, "transformer", None),
                        getattr(model, "ln_final", None), getattr(model, "text_projection", None))
            if isinstance(m, torch.nn.Module)]


def text_tower_frozen(model) -> tuple[bool, str]:
    """True when ``encode_text`` (captions) depends on frozen weights only."""
    if not _stock_encode(model, "encode_text"):
        return False, "encode_text is not open_clip's own"
    for name, p in model.named_parameters():
        if (p.requires_grad and not name.startswith(("visual.",) + _OUTSIDE_TEXT)
                and name not in _TEXT_FREE):
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
    and neither a class-prompt encoder nor a text-embedding adapter trains."""
    ok, why = text_tower_frozen(model)
    if not ok:
        return False, why
    if conditional_class_text(model):
        return False, "the class-prompt encoder conditions the prompts on each image"
    for slot in (ENTERS_CLASS_TEXT, ENTERS_TEXT_EMBEDDING):
        module = installed(model, slot)
        if module is None:
            continue
        trains = [n for n, p in module.named_parameters() if p.requires_grad]
        if trains:
            return False, f"{SLOTS[slot]}.{trains[0]} trains"
        if _hooked([module]) or _overridden([module]):
            return False, f"the {slot} module is hooked or replaced"
    return True, "class prompts fixed"
