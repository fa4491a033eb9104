"""``clipft export RUN_DIR OUT``: a trained run as a plain open_clip model (the
files of OUT are listed in docs/export.md). Extras files store their tensors
under their names in the clipft model, and their safetensors metadata key
``clipft`` holds JSON with the strategy, its options and the class names: what
:func:`load_export` needs to put them back.

What plain open_clip keeps: inserted modules (:class:`clipft.InsertedModule`)
that fold into the base weights (``folds_into_base``) are merged; those that
export themselves (``export_info()``) go to their own files, and plain open_clip
*drops* them. The manifest lists them under ``plain_open_clip_drops``, and
export checks two things on a probe input: ``load_export`` reproduces the run's
model (else it is a bug), and how far plain open_clip is from the run's model
(``verified_max_abs_diff``; it must be ~0 when nothing is dropped).
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from clipft import atomic
from clipft.version import __version__
from clipft.anatomy import get_path
from clipft.commands import model_card, wiseft
from clipft.commands.export_check import blame, check_config, read_manifest
from clipft.commands.wiseft import fold_adapters
from clipft.encode import image_embedding, infer_embed_dim, text_embedding
from clipft.engine.assemble import assemble
from clipft.engine.loadrun import load_run
from clipft.engine.rundir import RunLock
from clipft.engine.signals import Raising
from clipft.errors import ClipftError, ClipftUsageError
from clipft.models import quiet_logging, register_tiny_configs
from clipft.options import build_options, options_to_dict
from clipft.plugins import Registry
from clipft.protocols import inserted_modules

WEIGHTS = "open_clip_model.safetensors"
CONFIG = "open_clip_config.json"
MANIFEST = "clipft_export.json"
HEAD = "head.safetensors"
FORMAT = 1
#: largest allowed |run model - reloaded export| on the probe, relative to the
#: features' magnitude
VERIFY_RTOL = 1e-4


def _model_cfg(model, model_name: str) -> dict:
    import open_clip

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


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ClipftUsageError(f"{out} already exists and is not empty; pass --overwrite to replace an export")
        if not (out / MANIFEST).is_file():
            raise ClipftUsageError(f"{out} is not a clipft export (no {MANIFEST}); refusing to overwrite it")
        foreign = _foreign_entries(out)
        if foreign:
            raise ClipftUsageError(
                f"--overwrite: {out} holds a clipft export but also files the export did not write "
                f"({', '.join(foreign[:8])}); move them out first, clipft will not delete them")


def _foreign_entries(out: Path) -> list:
    """Entries of an export folder that its manifest does not list (every file
    an export writes is in its ``bytes``); all of them when the manifest is unreadable."""
    try:
        ours = set(json.loads((out / MANIFEST).read_text()).get("bytes", {})) | {MANIFEST}
    except (OSError, ValueError, AttributeError):
        ours = {MANIFEST}
    return sorted(p.name for p in out.iterdir() if p.name not in ours)


def _run_features(model, probe) -> torch.Tensor:
    """What the run's model computes on the probe, adapters in their slots included."""
    images, tokens = probe
    with torch.no_grad():
        img = image_embedding(model, model.encode_image(images)).float().flatten()
        txt = text_embedding(model, model.encode_text(tokens)).float().flatten()
    return torch.cat([img, txt])


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _within(diff: float, reference: torch.Tensor) -> bool:
    return diff <= VERIFY_RTOL * max(1.0, float(reference.abs().max()))


def export_run(run_dir, out, registry=None, overwrite: bool = False, device: str = "cpu",
               wise_ft: Optional[float] = None, best: bool = False) -> dict:
    """Export a run directory; returns the manifest. ``wise_ft=α`` writes the
    WiSE-FT interpolation ``(1-α)·zero-shot + α·fine-tuned`` instead of the
    fine-tuned weights (:mod:`clipft.commands.wiseft`); ``best`` exports the
    run's ``checkpoint-best/`` (``--keep-best``) instead of its final weights."""

    # SIGTERM and SIGHUP would end the process where it is, leaving the
    # temporary folder behind: as exceptions, building_dir removes it
    stop = Raising(f"export stopped before it finished; {out} is left as it was",
                   late=f"stopped after the export to {out} was complete")
    with stop, RunLock(Path(run_dir)) if Path(run_dir).is_dir() else contextlib.nullcontext():
        # one process per run: a run training (or resumed) there now would change it under us
        return _export(Path(run_dir), Path(out), registry, overwrite, device, wise_ft, stop, best)


def _export(run_dir: Path, out: Path, registry, overwrite: bool, device: str, wise_ft: Optional[float],
            stop, best: bool = False) -> dict:
    import open_clip

    run = load_run(run_dir, registry, device=device, best=best)
    model = run.model
    wise, folded = None, 0
    if wise_ft is not None:
        wiseft.check_alpha(wise_ft)
        ends = wiseft.endpoints(run)     # refuses (before anything is written) where it has no meaning
        wiseft.apply(run, ends, wise_ft)
        folded = ends.folded
        wise = {"alpha": wise_ft, "zero_shot": f"{run.config.model} pretrained {run.config.pretrained}",
                "head": ends.head_tuned is not None}
    _check_out(out, overwrite)
    atomic.remove_stale(out.parent, {out.name})
    with contextlib.ExitStack() as commit, atomic.building_dir(out) as tmp:
        probe = _probe(model, run.tokenizer)
        reference = _run_features(model, probe)  # the model as exported, everything in place

        # 1. inserted modules that cannot live in an open_clip state dict
        extras = []
        for qname, module in inserted_modules(model):
            info = None if module.folds_into_base else module.export_info()
            if info is None:
                continue
            info = dict(info)
            info.setdefault("classnames", run.classnames)
            info["module"] = qname
            info.setdefault("kind", module.enters)
            tensors = {f"{qname}.{k}": v for k, v in module.state_dict().items()}
            extras.append((qname, module, info, tensors))
        files = [i["file"] for _, _, i, _ in extras]
        if len(set(files)) != len(files) or {WEIGHTS, CONFIG, MANIFEST, HEAD} & set(files):
            raise ClipftError(f"inserted modules want clashing export files: {files}")
        for qname, module, _, _ in extras:
            module.uninstall()
            parent, _, attr = qname.rpartition(".")
            delattr(get_path(model, parent), attr)

        # 2. fold adapters into the base weights
        folded += fold_adapters(model)
        state = model.state_dict()
        stray = sorted(set(state) - set(run.base_shapes))
        if stray:
            raise ClipftError(
                f"the model has tensors open_clip does not know ({', '.join(stray[:4])}) from a module "
                "a strategy inserted that neither folds into the base weights nor exports itself "
                "(clipft.InsertedModule: folds_into_base / export_info)")
        missing = sorted(set(run.base_shapes) - set(state))
        if missing:
            raise ClipftError(f"the model lost open_clip tensors: {', '.join(missing[:4])}")

        # 3. write
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
        drops = [{"module": i["module"], "kind": i["kind"], "file": i["file"], "strategy": i["strategy"]}
                 for _, _, i, _ in extras]
        manifest = {
            "format": FORMAT,
            "clipft_version": __version__,
            "source_run": str(Path(run_dir).resolve()),
            # which of the run's weights: its final ones, or checkpoint-best/ (--best)
            "source_checkpoint": {"name": "best" if best else "final", "epoch": run.state.get("epoch"),
                                  "step": run.state.get("global_step")},
            "model": run.config.model,
            "pretrained": run.pretrained,
            "load_with": f"open_clip.create_model_and_transforms('local-dir:{out}')",
            "load_all_with": f"clipft.load('{out}')",
            "weights": WEIGHTS,
            "config": CONFIG,
            "strategies": [{"name": s.name, **options_to_dict(o)} for s, o in run.resolved.strategies],
            "merged_adapter_layers": folded,
            "classnames": run.classnames,
            "templates": list(run.templates),
            "extras": [info for _, _, info, _ in extras],
            "plain_open_clip_drops": drops,
            "head": head_info,
            "seed": run.config.seed,
            "wise_ft": wise,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))

        # 4. verify: load_export gives back the run's model; plain open_clip
        #    gives it back too unless a module it drops changes the features
        with quiet_logging():
            plain = open_clip.create_model(f"local-dir:{tmp}", device=device).eval()
        plain_diff = _max_diff(_features(plain, probe), reference)
        full_diff = _max_diff(_run_features(load_export(tmp, registry, device)["model"], probe), reference)
        if not _within(full_diff, reference) or (not drops and not _within(plain_diff, reference)):
            raise ClipftError(
                f"the exported model does not reproduce the run's model (max |diff| "
                f"{max(full_diff, plain_diff if not drops else 0.0):.3g}); this is a bug, please report it")
        manifest["verified_max_abs_diff"] = plain_diff
        manifest["load_export_max_abs_diff"] = full_diff
        model_card.write(tmp, manifest, model_card.data_of(run), str(out))
        manifest["bytes"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        # from the removal of the earlier export to the rename, a signal waits:
        # OUT is the old export or the new one, never neither
        commit.enter_context(stop.held())
        if out.exists():   # checked above: an export with nothing its manifest does not list
            shutil.rmtree(out)
    return manifest


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
    strategies (:func:`clipft.engine.assemble.assemble`, as a run builds them)
    and the head rebuilt. Returns a dict with ``model``, ``preprocess``,
    ``tokenizer``, ``classnames``, ``templates``, ``head`` and ``manifest``;
    the model's class-prompt encoder (if any) is back in place, so
    :func:`clipft.encode.class_text_features` uses the learned prompts."""
    import open_clip

    out = Path(out)
    if not (out / MANIFEST).is_file():
        raise ClipftUsageError(f"{out} is not a clipft export (no {MANIFEST})")
    manifest = read_manifest(out / MANIFEST)
    check_config(out / CONFIG)
    dev = torch.device(device)
    with quiet_logging(), blame(out / WEIGHTS, "cannot be loaded as the model open_clip_config.json describes"):
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}", device=device)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    if registry is None and (manifest["extras"] or manifest.get("head")):
        registry = Registry().load()
    classnames = manifest.get("classnames")
    templates = tuple(manifest.get("templates") or ("a photo of a {}.",))

    strategies, extra_tensors, rebuilt = [], {}, {}
    for info in manifest["extras"]:
        with blame(out / info["file"], "is not a clipft extras file"):
            tensors, meta = read_extra(out / info["file"])
            if not isinstance(meta.get("strategy"), str) or not isinstance(meta.get("options", {}), dict):
                raise ValueError("its metadata names no strategy")
        spec = registry.get("strategy", meta["strategy"])
        options = meta.get("options", {})
        # a strategy that inserted several modules (clip-adapter on both
        # embeddings) exported one file per module: it is applied once
        if spec.name in rebuilt:
            if rebuilt[spec.name] != options:
                raise ClipftError(f"the files of strategy '{spec.name}' in {out} record different options: "
                                  f"{rebuilt[spec.name]} and {options}")
        else:
            rebuilt[spec.name] = options
            strategies.append((spec, build_options("strategy", spec, options)))
        extra_tensors[info["file"]] = (tensors, meta["strategy"])
    head_ref = None
    if manifest.get("head"):
        h = manifest["head"]
        spec = registry.get("head", h["name"])
        head_ref = (spec, build_options("head", spec, h.get("options", {})))
    built = assemble(model, model_name=f"local-dir:{out}", tokenizer=tokenizer, device=dev,
                     strategies=strategies, head=head_ref, classnames=classnames, templates=templates)
    sd = model.state_dict()
    for file, (tensors, strategy) in extra_tensors.items():
        unknown = [k for k in tensors if k not in sd]
        if unknown:
            raise ClipftUsageError(f"{out / file}: does not fit the model rebuilt by strategy '{strategy}' "
                                   f"(no such tensors: {unknown[:3]})")
        with blame(out / file, f"does not fit the model rebuilt by strategy '{strategy}'"):
            model.load_state_dict(tensors, strict=False)
    head = built.head
    if head is not None and manifest["head"].get("file"):
        with blame(out / manifest["head"]["file"], f"is not the weights of head '{manifest['head']['name']}'"):
            tensors, _ = read_extra(out / manifest["head"]["file"])
            head.load_state_dict(tensors)
    for m in (model, head):
        if m is not None:
            m.requires_grad_(False)
            m.to(dev).eval()
    return {"model": model, "preprocess": preprocess, "tokenizer": tokenizer,
            "classnames": classnames, "templates": templates, "head": head, "manifest": manifest}
