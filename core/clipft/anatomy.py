"""Model anatomy: where the towers, blocks, final norms and projections of an
open_clip model live, drawn once for every tower type open_clip builds so that no
plugin has to special-case class names (the table is in docs/strategies.md).

The map is in qualified parameter names, as ``model.named_parameters()`` yields
them. Each tower is cut, input to output, into ``stem`` (below the first block),
``blocks`` (the depth units: ViT/text resblocks, ModifiedResNet stages, timm's
parameter groups without the stem, else the longest ``nn.ModuleList`` of one type),
``final`` (between the last block and the projection) and ``projection``.
``CLIP`` keeps its text tower on itself, ``CustomTextCLIP`` and ``CoCa`` at
``model.text``: both give the same :class:`Tower`. ``logit`` (``logit_scale``,
``logit_bias``) and ``other`` (e.g. CoCa's ``text_decoder``) are outside both.

Parameters a plugin inserts (LoRA factors, prompts) belong to the block they sit
in, else to the stem. A description is a snapshot: describe the model again after
changing it.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional

import attrs
import torch
from torch import nn

from clipft.errors import ClipftUsageError

VISION = "vision"
TEXT = "text"
SIDES = (VISION, TEXT)
#: the values a ``tower=`` option may take
TOWER_CHOICES = ("vision", "text", "both")

__all__ = [
    "VISION", "TEXT", "SIDES", "TOWER_CHOICES",
    "Tower", "ModelAnatomy", "describe", "named_params", "get_path",
    "replace_projection", "layer_positions",
]


@attrs.frozen
class Tower:
    """One tower of a CLIP model, as qualified parameter names."""

    #: ``"vision"`` or ``"text"``
    side: str
    #: ``vit``, ``modified-resnet``, ``timm``, ``text-transformer``, ``hf-text``
    #: or ``generic``
    kind: str
    #: module path of the tower in the model (``visual``, ``text``), or ``""``
    #: for the text tower that ``CLIP`` keeps on itself
    path: str
    #: what one depth unit is called in messages (``block``, ``stage``, ...)
    unit: str
    stem: tuple
    #: depth units from input to output, each a tuple of parameter names
    blocks: tuple
    final: tuple
    projection: tuple
    #: dotted path of the projection (a Parameter or a Module), None when the
    #: tower has none
    projection_path: Optional[str] = None
    #: class name of the tower module, for messages
    class_name: str = ""

    @property
    def depth(self) -> int:
        """Number of depth units (blocks, stages, timm groups)."""
        return len(self.blocks)

    @property
    def names(self) -> tuple:
        """Every parameter name of the tower, stem to projection."""
        return self.stem + tuple(n for b in self.blocks for n in b) + self.final + self.projection

    @property
    def label(self) -> str:
        """``vision tower (VisionTransformer)``: for messages."""
        return f"{self.side} tower ({self.class_name or self.kind})"

    def last_blocks(self, n: int) -> tuple:
        """Names of the last ``n`` depth units; a usage error that gives the
        depth when ``n`` exceeds it."""
        if n < 1:
            raise ClipftUsageError(f"n must be at least 1, got {n}")
        if n > self.depth:
            raise ClipftUsageError(
                f"n={n} exceeds the depth of the {self.label}: it has {self.depth} "
                f"{self.unit}{'s' if self.depth != 1 else ''}; use n between 1 and {self.depth}")
        return tuple(name for b in self.blocks[self.depth - n:] for name in b)

    def require_projection(self, model_name: str = "the model") -> tuple:
        """The projection's names, or a usage error when there is none."""
        if not self.projection:
            raise ClipftUsageError(
                f"{model_name} has no {self.side} projection: its {self.label} maps straight "
                "into the embedding space (for example a timm tower with timm_proj='none', or a "
                "text tower with proj_type='none'), so there is nothing to train or replace there")
        return self.projection


@attrs.frozen
class ModelAnatomy:
    """The map of a whole model: both towers, the logit parameters, the rest."""

    model_class: str
    vision: Optional[Tower]
    text: Optional[Tower]
    #: ``logit_scale`` and ``logit_bias`` when present
    logit: tuple
    #: parameters outside both towers and the logit parameters
    other: tuple

    def tower(self, side: str) -> Tower:
        t = self.vision if side == VISION else self.text if side == TEXT else None
        if side not in SIDES:
            raise ValueError(f"unknown tower side {side!r}")
        if t is None:
            raise ClipftUsageError(f"{self.model_class} has no {side} tower")
        return t

    def towers(self, which: str) -> list:
        """``which`` is ``vision``, ``text`` or ``both``."""
        if which == "both":
            return [self.tower(VISION), self.tower(TEXT)]
        if which not in SIDES:
            raise ClipftUsageError(f"tower must be one of {', '.join(TOWER_CHOICES)}, got {which!r}")
        return [self.tower(which)]

    def side_of(self, name: str) -> Optional[str]:
        """``vision``, ``text`` or None for a parameter name."""
        for t in (self.vision, self.text):
            if t is not None and name in set(t.names):
                return t.side
        return None


# -- helpers ------------------------------------------------------------------
def _under(names: Iterable[str], prefix: str) -> tuple:
    """Names equal to ``prefix`` or inside it (``prefix.``); order kept."""
    if not prefix:
        return tuple(names)
    dot = prefix + "."
    return tuple(n for n in names if n == prefix or n.startswith(dot))


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def get_path(model: nn.Module, path: str):
    """The attribute at a dotted path (``visual.attnpool.c_proj``)."""
    obj = model
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part)
    return obj


def named_params(model: nn.Module, names: Iterable[str]) -> list:
    """``[(name, Parameter)]`` for ``names``, in the model's own order.

    Unknown names are an error (a stale description): describe the model again
    after changing it."""
    wanted = set(names)
    out = [(n, p) for n, p in model.named_parameters() if n in wanted]
    if len(out) != len(wanted):
        missing = sorted(wanted - {n for n, _ in out})
        raise KeyError(f"parameters not in the model (describe it again after changing it): {missing[:5]}")
    return out


def _has_params(obj) -> bool:
    if isinstance(obj, nn.Parameter):
        return True
    return isinstance(obj, nn.Module) and any(True for _ in obj.parameters())


def _longest_modulelist(module: nn.Module) -> Optional[str]:
    """Relative path of the longest ModuleList whose items share one type
    (the stack of blocks of an unknown tower); None when there is none."""
    best, best_len = None, 0
    for name, m in module.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > best_len:
            kinds = {type(x) for x in m}
            if len(kinds) == 1 and any(True for _ in m.parameters()):
                best, best_len = name, len(m)
    return best


def _rest(all_names: tuple, *taken: Iterable[str]) -> tuple:
    used = set().union(*taken)
    return tuple(n for n in all_names if n not in used)


def _classify_by_order(names: tuple, blocks: tuple, projection: tuple) -> tuple:
    """Stem/final for a generic tower: parameters registered before the first
    block are the stem, those after the last block the final part."""
    in_blocks = {n for b in blocks for n in b}
    proj = set(projection)
    if not in_blocks:
        return tuple(n for n in names if n not in proj), ()
    idx = [i for i, n in enumerate(names) if n in in_blocks]
    last = idx[-1]
    stem = tuple(n for i, n in enumerate(names) if n not in in_blocks and n not in proj and i < last)
    final = tuple(n for i, n in enumerate(names) if n not in in_blocks and n not in proj and i > last)
    return stem, final


# -- vision towers --------------------------------------------------------------
def _vit(visual, p: str, names: tuple) -> Tower:
    blocks = tuple(_under(names, _join(p, "transformer.resblocks", str(i)))
                   for i in range(len(visual.transformer.resblocks)))
    final = tuple(n for part in ("ln_post", "attn_pool", "attn_pool_contrastive")
                  for n in _under(names, _join(p, part)))
    projection = _under(names, _join(p, "proj")) if getattr(visual, "proj", None) is not None else ()
    stem = _rest(names, *blocks, final, projection)
    return Tower(VISION, "vit", p, "block", stem, blocks, final, projection,
                 _join(p, "proj") if projection else None, type(visual).__name__)


def _modified_resnet(visual, p: str, names: tuple) -> Tower:
    stages = []
    k = 1
    while isinstance(getattr(visual, f"layer{k}", None), nn.Module):
        stages.append(_under(names, _join(p, f"layer{k}")))
        k += 1
    projection = _under(names, _join(p, "attnpool.c_proj"))
    final = tuple(n for n in _under(names, _join(p, "attnpool")) if n not in set(projection))
    stem = _rest(names, *stages, final, projection)
    return Tower(VISION, "modified-resnet", p, "stage", stem, tuple(stages), final, projection,
                 _join(p, "attnpool.c_proj") if projection else None, type(visual).__name__)


def _timm_unmatched(rel_names: list, matcher) -> set:
    """Trunk parameters timm's group matcher does not match: its head/neck
    (``head.norm``, ``fc_norm``, attention pools). timm puts them after the
    last group."""
    if not isinstance(matcher, dict):
        return set()
    regexes = []
    for spec in matcher.values():
        if spec is None:
            continue
        if isinstance(spec, (tuple, list)):
            regexes.extend(re.compile(s[0]) for s in spec)
        else:
            regexes.append(re.compile(spec))
    return {n for n in rel_names if not any(r.match(n) for r in regexes)}


def _timm(visual, p: str, names: tuple) -> Tower:
    trunk = visual.trunk
    trunk_p = _join(p, "trunk")
    head = getattr(visual, "head", None)
    projection_path = None
    projection: tuple = ()
    if isinstance(head, nn.Module) and _has_params(head):
        projection_path = _join(p, "head")
        projection = _under(names, projection_path)
    else:
        get_cls = getattr(trunk, "get_classifier", None)
        cls = get_cls() if callable(get_cls) else None
        if isinstance(cls, nn.Module) and _has_params(cls):
            rel = next((n for n, m in trunk.named_modules() if m is cls and n), None)
            if rel is not None:
                projection_path = _join(trunk_p, rel)
                projection = _under(names, projection_path)
    trunk_names = _under(names, trunk_p)
    rel_names = [n[len(trunk_p) + 1:] for n in trunk_names]
    proj_set = set(projection)
    try:
        from timm.models import group_parameters
        matcher = trunk.group_matcher(coarse=False)
        groups = group_parameters(trunk, matcher)
        unmatched = _timm_unmatched(rel_names, matcher)
    except Exception:  # a trunk without a group matcher: one unit
        groups, unmatched = {0: [], 1: rel_names}, set()
    ordered = [groups[k] for k in sorted(groups)]
    stem: tuple = ()
    blocks = []
    for i, rels in enumerate(ordered):
        full = tuple(_join(trunk_p, r) for r in rels if r not in unmatched)
        full = tuple(n for n in full if n not in proj_set)
        if i == 0:
            stem = full
        elif full:
            blocks.append(full)
    final = tuple(n for n in (_join(trunk_p, r) for r in rel_names if r in unmatched)
                  if n not in proj_set)
    # parameters of the adapter outside trunk and head (none in open_clip
    # 3.3.0): count them with the stem
    stem = stem + _rest(names, trunk_names, projection)
    return Tower(VISION, "timm", p, "parameter group", stem, tuple(blocks), final, projection,
                 projection_path, f"TimmModel[{type(trunk).__name__}]")


def _generic(module, side: str, p: str, names: tuple, kind: str = "generic") -> Tower:
    rel = _longest_modulelist(module)
    blocks: tuple = ()
    if rel is not None:
        mlist = get_path(module, rel)
        blocks = tuple(b for b in (_under(names, _join(p, rel, str(i))) for i in range(len(mlist))) if b)
    projection_path = None
    projection: tuple = ()
    for attr in ("proj", "text_projection"):
        obj = getattr(module, attr, None)
        if obj is not None and _has_params(obj):
            projection_path = _join(p, attr)
            projection = _under(names, projection_path)
            break
    stem, final = _classify_by_order(names, blocks, projection)
    unit = "layer" if kind == "hf-text" else "block"
    return Tower(side, kind, p, unit, stem, blocks, final, projection, projection_path,
                 type(module).__name__)


def _vision_tower(model, all_names: tuple) -> Optional[Tower]:
    visual = getattr(model, "visual", None)
    if not isinstance(visual, nn.Module):
        return None
    names = _under(all_names, "visual")
    cls = type(visual).__name__
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer
    if isinstance(visual, VisionTransformer):
        return _vit(visual, "visual", names)
    if isinstance(visual, ModifiedResNet):
        return _modified_resnet(visual, "visual", names)
    if cls == "TimmModel" or isinstance(getattr(visual, "trunk", None), nn.Module):
        return _timm(visual, "visual", names)
    return _generic(visual, VISION, "visual", names)


# -- text towers ---------------------------------------------------------------------
_CLIP_TEXT_PARTS = ("transformer", "token_embedding", "positional_embedding", "ln_final",
                    "text_projection", "cls_emb")


def _text_transformer(owner, p: str, names: tuple, class_name: str) -> Tower:
    blocks = tuple(_under(names, _join(p, "transformer.resblocks", str(i)))
                   for i in range(len(owner.transformer.resblocks)))
    final = _under(names, _join(p, "ln_final"))
    proj = getattr(owner, "text_projection", None)
    projection = _under(names, _join(p, "text_projection")) if proj is not None else ()
    stem = _rest(names, *blocks, final, projection)
    return Tower(TEXT, "text-transformer", p, "block", stem, blocks, final, projection,
                 _join(p, "text_projection") if projection else None, class_name)


def _text_tower(model, all_names: tuple) -> Optional[Tower]:
    text = getattr(model, "text", None)
    if isinstance(text, nn.Module):
        names = _under(all_names, "text")
        from open_clip.transformer import TextTransformer
        if isinstance(text, TextTransformer):
            return _text_transformer(text, "text", names, type(text).__name__)
        kind = "hf-text" if type(text).__name__ == "HFTextEncoder" else "generic"
        return _generic(text, TEXT, "text", names, kind)
    transformer = getattr(model, "transformer", None)
    if isinstance(transformer, nn.Module) and hasattr(model, "token_embedding"):
        names = tuple(n for part in _CLIP_TEXT_PARTS for n in _under(all_names, part))
        names = tuple(n for n in all_names if n in set(names))
        if hasattr(transformer, "resblocks"):
            return _text_transformer(model, "", names, f"{type(model).__name__} text")
    return None


def describe(model: nn.Module) -> ModelAnatomy:
    """Map ``model`` (``CLIP``, ``CustomTextCLIP``, ``CoCa`` or anything with
    ``visual`` and a text tower) into towers and parts."""
    all_names = tuple(n for n, _ in model.named_parameters())
    vision = _vision_tower(model, all_names)
    text = _text_tower(model, all_names)
    in_towers = set(vision.names if vision else ()) | set(text.names if text else ())
    logit = tuple(n for n in ("logit_scale", "logit_bias") if n in all_names)
    other = tuple(n for n in all_names if n not in in_towers and n not in logit)
    return ModelAnatomy(type(model).__name__, vision, text, logit, other)


# -- layer positions (layer-wise lr decay) ----------------------------------------------
def layer_positions(tower: Tower) -> dict:
    """``{name: (position, top)}`` with position 0 for the stem, ``i + 1`` for
    depth unit ``i`` and ``top = depth + 1`` for the final part and projection.
    Layer-wise decay gives a parameter ``decay ** (top - position)``."""
    top = tower.depth + 1
    pos = {n: (0, top) for n in tower.stem}
    for i, block in enumerate(tower.blocks):
        pos.update({n: (i + 1, top) for n in block})
    pos.update({n: (top, top) for n in tower.final + tower.projection})
    return pos


# -- replacing projections ------------------------------------------------------------
def _last_linear(module: nn.Module) -> Optional[str]:
    return next((n for n, m in reversed(list(module.named_modules())) if isinstance(m, nn.Linear)), None)


def replace_projection(model: nn.Module, tower: Tower, dim: int, std: Optional[float] = None,
                       generator: Optional[torch.Generator] = None) -> str:
    """Replace ``tower``'s projection by a freshly initialised one with output
    dimension ``dim``; returns the dotted path of what was replaced.

    - an ``nn.Parameter`` ``[width, out]`` (applied as ``x @ proj``) becomes a
      Parameter ``[width, dim]``;
    - an ``nn.Linear`` becomes an ``nn.Linear(in, dim)`` (with a zero bias when
      the old one had a bias);
    - any other module (an MLP, timm's attention pool) has its *last*
      ``nn.Linear`` replaced.

    Weights are drawn from N(0, std²), std defaulting to ``width ** -0.5``
    (open_clip's own initialisation of projections), with ``generator`` so
    that the result does not depend on the global RNG. The tower module's
    ``output_dim`` attribute is set to the new dimension (timm towers get one).
    """
    if dim < 1:
        raise ClipftUsageError(f"the new projection dimension must be >= 1, got {dim}")
    path = tower.projection_path
    if path is None:
        tower.require_projection(type(model).__name__)
    obj = get_path(model, path)
    if isinstance(obj, nn.Module) and not isinstance(obj, nn.Linear):
        rel = _last_linear(obj)
        if rel is None:
            raise ClipftUsageError(
                f"cannot replace the {tower.side} projection at '{path}' "
                f"({type(obj).__name__}): it contains no nn.Linear")
        path = _join(path, rel)
        obj = get_path(model, path)
    owner_path, _, attr = path.rpartition(".")
    owner = get_path(model, owner_path)

    def normal(shape, fan_in, like):
        s = std if std is not None else fan_in ** -0.5
        w = torch.empty(shape, dtype=torch.float32)
        w.normal_(0.0, s, generator=generator)
        return w.to(device=like.device, dtype=like.dtype)

    if isinstance(obj, nn.Parameter):
        if obj.ndim != 2:
            raise ClipftUsageError(f"cannot replace the {tower.side} projection at '{path}': "
                                   f"expected a 2-d [width, dim] Parameter, got shape {tuple(obj.shape)}")
        width = obj.shape[0]
        new = nn.Parameter(normal((width, dim), width, obj))
        setattr(owner, attr, new)
    elif isinstance(obj, nn.Linear):
        lin = nn.Linear(obj.in_features, dim, bias=obj.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(normal((dim, obj.in_features), obj.in_features, obj.weight))
            if lin.bias is not None:
                lin.bias.zero_()
        lin.to(device=obj.weight.device, dtype=obj.weight.dtype)
        setattr(owner, attr, lin)
    else:
        raise ClipftUsageError(
            f"cannot replace the {tower.side} projection at '{path}': unsupported type "
            f"{type(obj).__name__}")
    if tower.path:  # CLIP's inline text tower has no module of its own
        get_path(model, tower.path).output_dim = dim
    return path
