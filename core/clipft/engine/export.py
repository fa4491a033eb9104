"""``clipft export RUN_DIR OUT``: a trained run as a plain open_clip model.

``OUT`` holds:

- ``open_clip_model.safetensors``: a standard open_clip state dict. Adapters
  (LoRA) are merged into the base weights; trained, unfrozen and reprojected
  weights are included. It has open_clip's keys and nothing else.
- ``open_clip_config.json``: ``{"model_cfg": ..., "preprocess_cfg": ...}``, so
  ``open_clip.create_model_and_transforms("local-dir:OUT")`` loads the model
  with no clipft installed (``create_model(name, pretrained="OUT/open_clip_model.safetensors")``
  works too while the architecture is unchanged).
- one file per module a strategy inserted that has no place in an open_clip
  state dict: ``prompts.safetensors`` (learned text context) and
  ``vision_prompts.safetensors`` (VPT tokens). Tensors are stored under their
  names in the clipft model (``clipft_class_text.ctx``); the safetensors
  metadata key ``clipft`` holds JSON with the strategy, its options and the
  class names, which is what :func:`load_export` needs to put them back.
- ``head.safetensors`` when the run's head has weights (metadata as above).
- ``clipft_export.json``: a manifest (source run, class names, templates, the
  files above, the number of merged adapter layers, and the largest difference
  between the run's model and the reloaded export on a probe input).

Protocols for modules that strategies insert (no plugin is special-cased here):

- ``clipft_fold_into_base()``: fold yourself into the base weights and leave a
  plain open_clip module behind (LoRA layers);
- ``clipft_export_extra() -> dict``: state that cannot live in open_clip's state
  dict; returns at least ``file`` and ``strategy`` (and ``options``); the
  module's tensors go to that file. ``clipft_uninstall()``, when present, is
  called before the module is detached (to remove hooks).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from clipft.errors import ClipftError, ClipftUsageError

WEIGHTS = "open_clip_model.safetensors"
CONFIG = "open_clip_config.json"
MANIFEST = "clipft_export.json"
HEAD = "head.safetensors"
FORMAT = 1
#: largest allowed |run model - reloaded export| on the probe, relative to the
#: features' magnitude
VERIFY_RTOL = 1e-4


def _get(model, path: str):
    obj = model
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part)
    return obj


def _model_cfg(model, model_name: str) -> dict:
    import open_clip

    from clipft.engine.context import infer_embed_dim
    from clipft.models import register_tiny_configs

    register_tiny_configs()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ClipftError(f"open_clip has no config for '{model_name}'; cannot write {CONFIG}")
    cfg = json.loads(json.dumps(cfg))
    cfg["embed_dim"] = infer_embed_dim(model)  # follows a replaced projection
    from open_clip.transformer import QuickGELU
    if any(isinstance(m, QuickGELU) for m in model.modules()):
        cfg["quick_gelu"] = True  # set by some pretrained tags at load time
    return cfg


def _probe(model, tokenizer):
    size = getattr(model.visual, "image_size", 224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    g = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    images = torch.randn(2, 3, h, w, generator=g).to(device)
    tokens = tokenizer(["a photo of a cat.", "a diagram of a red square"]).to(device)
    return images, tokens


@torch.no_grad()
def _features(model, probe) -> torch.Tensor:
    images, tokens = probe
    return torch.cat([model.encode_image(images).float().flatten(), model.encode_text(tokens).float().flatten()])


def _save(tensors: dict, path: Path, meta: Optional[dict] = None) -> None:
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path),
              metadata={"clipft": json.dumps(meta)} if meta is not None else None)


def _prepare_out(out: Path, overwrite: bool) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ClipftUsageError(f"{out} already exists and is not empty; pass --overwrite to replace an export")
        if not (out / MANIFEST).is_file():
            raise ClipftUsageError(f"{out} is not a clipft export (no {MANIFEST}); refusing to overwrite it")
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def export_run(run_dir, out, registry=None, overwrite: bool = False, device: str = "cpu") -> dict:
    """Export a run directory; returns the manifest."""
    import open_clip

    from clipft import __version__
    from clipft.engine.loadrun import load_run
    from clipft.options import options_to_dict

    out = Path(out)
    run = load_run(run_dir, registry, device=device)
    model = run.model
    tmp = _prepare_out(out, overwrite)
    try:
        # 1. inserted modules that cannot live in an open_clip state dict
        extras = []
        for qname, module in list(model.named_modules()):
            describe = getattr(module, "clipft_export_extra", None)
            if qname and callable(describe):
                info = dict(describe())
                info.setdefault("classnames", run.classnames)
                info["module"] = qname
                tensors = {f"{qname}.{k}": v for k, v in module.state_dict().items()}
                extras.append((qname, module, info, tensors))
        files = [i["file"] for _, _, i, _ in extras]
        if len(set(files)) != len(files) or {WEIGHTS, CONFIG, MANIFEST, HEAD} & set(files):
            raise ClipftError(f"inserted modules want clashing export files: {files}")
        for qname, module, _, _ in extras:
            uninstall = getattr(module, "clipft_uninstall", None)
            if callable(uninstall):
                uninstall()
            parent, _, attr = qname.rpartition(".")
            delattr(_get(model, parent), attr)

        # 2. reference outputs of the run's model (adapters live, unmerged)
        probe = _probe(model, run.tokenizer)
        reference = _features(model, probe)

        # 3. fold adapters into the base weights
        folded = 0
        for _, module in list(model.named_modules()):
            fold = getattr(module, "clipft_fold_into_base", None)
            if callable(fold):
                fold()
                folded += 1
        state = model.state_dict()
        stray = sorted(set(state) - set(run.base_shapes))
        if stray:
            raise ClipftError(
                f"the model has tensors open_clip does not know ({', '.join(stray[:4])}) from a module "
                "a strategy inserted that neither folds into the base weights "
                "(clipft_fold_into_base) nor exports itself (clipft_export_extra)")
        missing = sorted(set(run.base_shapes) - set(state))
        if missing:
            raise ClipftError(f"the model lost open_clip tensors: {', '.join(missing[:4])}")

        # 4. write
        _save(state, tmp / WEIGHTS)
        cfg = {"model_cfg": _model_cfg(model, run.config.model),
               "preprocess_cfg": open_clip.get_model_preprocess_cfg(model)}
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2, default=list))
        for _, _, info, tensors in extras:
            _save(tensors, tmp / info["file"], info)
        head_info = None
        if run.resolved.head is not None:
            spec, opts = run.resolved.head
            head_info = {"name": spec.name, "options": options_to_dict(opts),
                         "classnames": run.classnames, "templates": list(run.templates), "file": None}
            head_state = run.head.state_dict()
            if head_state:
                head_info["file"] = HEAD
                _save(head_state, tmp / HEAD, head_info)

        # 5. verify: plain open_clip reloads it and computes what the run computed
        with _quiet():
            reloaded = open_clip.create_model(f"local-dir:{tmp}", device=device).eval()
        diff = float((_features(reloaded, probe) - reference).abs().max())
        scale = float(reference.abs().max()) or 1.0
        if diff > VERIFY_RTOL * max(1.0, scale):
            raise ClipftError(
                f"the exported model does not reproduce the run's model (max |diff| {diff:.3g}); "
                "this is a bug, please report it")

        manifest = {
            "format": FORMAT,
            "clipft_version": __version__,
            "source_run": str(Path(run_dir).resolve()),
            "model": run.config.model,
            "pretrained": run.pretrained,
            "load_with": f"open_clip.create_model_and_transforms('local-dir:{out}')",
            "weights": WEIGHTS,
            "config": CONFIG,
            "strategies": [{"name": s.name, **options_to_dict(o)} for s, o in run.resolved.strategies],
            "merged_adapter_layers": folded,
            "classnames": run.classnames,
            "templates": list(run.templates),
            "extras": [info for _, _, info, _ in extras],
            "head": head_info,
            "verified_max_abs_diff": diff,
            "bytes": {p.name: p.stat().st_size for p in sorted(tmp.iterdir())},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


class _quiet:
    """open_clip logs at INFO/WARNING while loading local dirs; keep stderr clean."""

    def __enter__(self):
        import logging
        self.logger = logging.getLogger()
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)
        return False


def read_extra(path) -> tuple[dict, dict]:
    """Tensors and the ``clipft`` metadata of an extras file (prompts, head)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("clipft", "{}"))
    return load_file(str(path)), meta


def load_export(out, registry=None, device: str = "cpu") -> dict:
    """Load an export for inference: the open_clip model (through open_clip's
    own ``local-dir:`` loader), with the exported extras re-installed by their
    strategies and the head rebuilt. Returns a dict with ``model``,
    ``preprocess``, ``tokenizer``, ``classnames``, ``templates``, ``head`` and
    ``manifest``; the model's class-prompt encoder (if any) is back in place, so
    :func:`clipft.engine.forward.class_text_features` uses the learned prompts."""
    import open_clip

    from clipft.engine.context import BuildContext
    from clipft.options import build_options

    out = Path(out)
    if not (out / MANIFEST).is_file():
        raise ClipftUsageError(f"{out} is not a clipft export (no {MANIFEST})")
    manifest = json.loads((out / MANIFEST).read_text())
    dev = torch.device(device)
    with _quiet():
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}", device=device)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    model.eval()
    if registry is None and (manifest["extras"] or manifest.get("head")):
        from clipft.plugins import Registry
        registry = Registry().load()
    classnames = manifest.get("classnames")
    templates = tuple(manifest.get("templates") or ("a photo of a {}.",))

    def context(names):
        return BuildContext(model=model, model_name=f"local-dir:{out}", tokenizer=tokenizer,
                            device=dev, config=None, classnames=names, templates=templates)

    for info in manifest["extras"]:
        tensors, meta = read_extra(out / info["file"])
        spec = registry.get("strategy", meta["strategy"])
        strategy = spec.build(build_options("strategy", spec, meta.get("options", {})))
        strategy.apply(model, context(meta.get("classnames") or classnames))
        model.to(dev)
        unknown = [k for k in tensors if k not in model.state_dict()]
        if unknown:
            raise ClipftError(f"{info['file']} does not fit the model rebuilt by strategy "
                              f"'{meta['strategy']}': {unknown[:3]}")
        model.load_state_dict(tensors, strict=False)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    head = None
    if manifest.get("head"):
        h = manifest["head"]
        spec = registry.get("head", h["name"])
        head = spec.build(build_options("head", spec, h.get("options", {})), context(h.get("classnames") or classnames))
        if h.get("file"):
            tensors, _ = read_extra(out / h["file"])
            head.load_state_dict(tensors)
        head.to(dev).eval()
    return {"model": model, "preprocess": preprocess, "tokenizer": tokenizer,
            "classnames": classnames, "templates": templates, "head": head, "manifest": manifest}
