"""Helpers for a plugin's own test suite (public API; ``clipft new`` writes tests
that use them).

    from clipft import testing
    import clipft_myplugin

    def test_trains_only_what_it_selects(tmp_path):
        summary = testing.run_plugin(clipft_myplugin, strategy="mine", steps=2, tmp_path=tmp_path)
        run_dir = summary["run_dir"]
        trained = testing.load_trained(run_dir, testing.plugin_registry(clipft_myplugin)).model
        testing.assert_only_selected_changed(testing.initial_state(run_dir), trained,
                                             lambda name: name.endswith("bias"))

Everything runs on the embedded ``tiny-vit`` (a 3.6M-parameter CLIP) and the
synthetic ``shapes`` data, offline, in a few seconds on a CPU. Runs, checkpoints
and exports go through the same code as ``clipft run`` / ``clipft export``.

Names:

- :func:`tiny_model`: ``(model, tokenizer, preprocess)`` of an embedded tiny
  model, with exactly the weights a run with the same seed starts from;
- :func:`tiny_base_checkpoint`: a tiny-vit briefly trained on ``shapes`` (zero-shot
  well above chance), exported; pass its ``weights`` as ``pretrained=``;
- :func:`plugin_registry`: the installed plugins plus yours, registered in-process;
- :func:`run_plugin`: a short in-process run with your plugin; the summary;
- :func:`resume_run`: resume a run, changing some settings, as ``clipft run
  --resume`` does (the same settings may change; the others are refused alike);
- :func:`initial_state`, :func:`load_trained`, :func:`checkpoint_tensors`: the
  model a run started from, the model it trained (rebuilt from its directory),
  and the tensors its checkpoint holds;
- :func:`assert_only_selected_changed`, :func:`assert_checkpoint_roundtrip`,
  :func:`assert_export_roundtrip`: the checks most plugins want.

This module is core (it may use ``clipft.engine``); a plugin imports it, never
``clipft.engine``. Nothing here imports torch or pytest until it is called.
"""
from __future__ import annotations

import importlib.metadata as md
import json
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Union

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "tiny_model",
    "tiny_base_checkpoint",
    "plugin_registry",
    "run_plugin",
    "resume_run",
    "initial_state",
    "load_trained",
    "checkpoint_tensors",
    "assert_only_selected_changed",
    "assert_checkpoint_roundtrip",
    "assert_export_roundtrip",
]

#: batch size of :func:`run_plugin` runs (the ``shapes`` data holds steps x this)
DEFAULT_BATCH_SIZE = 8
#: validation images of :func:`run_plugin`'s default data
DEFAULT_VAL_N = 16

_base_cache: dict = {}


# -- models -------------------------------------------------------------------------
def tiny_model(name: str = "tiny-vit", pretrained: str = "none", *, seed: int = 0,
               device: str = "cpu"):
    """``(model, tokenizer, preprocess)`` of an embedded tiny model (``tiny-vit`` or
    ``tiny-rn``; any open_clip name works, offline only with a local ``pretrained``).

    The weights are the ones a run with ``seed`` (and this model/pretrained)
    starts from, before its strategies. ``preprocess`` is the val transform."""
    from clipft.engine.assemble import seed_everything
    from clipft.models import load_model

    seed_everything(seed)
    loaded = load_model(name, pretrained, device=device)
    return loaded.model, loaded.tokenizer, loaded.preprocess_val


#: the base's data: four colours x three shapes (12 classes, chance 1/12)
BASE_DATA = "shapes:n=512,val_n=48,colours=red,green,blue,yellow,shapes=circle,square,triangle"


def tiny_base_checkpoint(directory: Union[str, Path], *, epochs: int = 2, seed: int = 0) -> dict:
    """A "pretrained" ``tiny-vit``: trained from random init (``--strategy full``,
    contrastive) on :data:`BASE_DATA`, then exported. Returns ``{"run", "export",
    "weights", "top1"}``: ``weights`` (``open_clip_model.safetensors``) goes in
    ``pretrained=`` of :func:`run_plugin` or :func:`tiny_model`; ``top1`` is its
    zero-shot top-1 on the base data (well above chance, 1/12). Built once per
    process and directory (about 10 s on one CPU thread)."""
    from clipft.api import RunConfig, make_registry, run
    from clipft.commands.export import WEIGHTS, export_run

    directory = Path(directory)
    key = (str(directory.resolve()), epochs, seed)
    if key in _base_cache:
        return _base_cache[key]
    run_dir, export_dir = directory / "base-run", directory / "base-export"
    reg = make_registry()
    summary = run(RunConfig(model="tiny-vit", pretrained="none", data=BASE_DATA, strategies=["full"],
                            loss="contrastive", lr=2e-3, epochs=epochs, batch_size=32, seed=seed,
                            device="cpu"),
                  registry=reg, out=run_dir, overwrite=True)
    export_run(run_dir, export_dir, reg, overwrite=True)
    _base_cache[key] = {"run": run_dir, "export": export_dir, "weights": export_dir / WEIGHTS,
                        "top1": summary["eval"]["after"]["top1"]}
    return _base_cache[key]


# -- runs ---------------------------------------------------------------------------
def _as_list(plugin) -> list:
    if plugin is None:
        return []
    return list(plugin) if isinstance(plugin, (list, tuple)) else [plugin]


def plugin_registry(*plugins, entry_points: bool = True, disabled: Iterable[str] = ()):
    """A loaded registry with ``plugins`` (modules or objects with ``@clipft.hookimpl``
    functions) registered in-process, on top of the installed entry points (the
    built-in ``shapes`` data and losses among them).

    A plugin module that is also installed (``pip install -e .``) would register
    its names twice; the installed copy's distribution is disabled instead, so
    the module under test is the one that runs."""
    from clipft.api import make_registry

    plugins = [p for arg in plugins for p in _as_list(arg)]
    blocked = set(disabled)
    if entry_points:
        modules = {getattr(p, "__name__", None) for p in plugins} - {None}
        in_process_names = {getattr(p, "__name__", None) or type(p).__name__ for p in plugins}
        for ep in md.entry_points(group="clipft"):
            if ep.module in modules and ep.dist is not None:
                if ep.dist.name in in_process_names:  # its name would block ours too
                    plugins = [p for p in plugins if getattr(p, "__name__", None) != ep.module]
                else:
                    blocked.add(ep.dist.name)
    return make_registry(plugins=plugins, disabled=blocked, entry_points=entry_points)


def _refs(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _fresh_dir(tmp_path: Path, stem: str) -> Path:
    out, i = tmp_path / stem, 1
    while out.exists():
        i += 1
        out = tmp_path / f"{stem}-{i}"
    return out


def run_plugin(plugin, *, strategy=None, loss=None, head=None, data=None, callbacks=(),
               steps: Optional[int] = None, tmp_path, registry=None, **config) -> dict:
    """Train with ``plugin`` in-process for ``steps`` optimizer steps and return the
    summary (``summary.json``'s dict; ``summary["run_dir"]`` is the run directory,
    a fresh folder under ``tmp_path``).

    - ``plugin``: a module or hookimpl object, a list of them, or None (installed
      plugins only); ``registry`` replaces :func:`plugin_registry` ``(plugin)``.
    - ``strategy`` (a name with options, ``"mine:k=v"``, or a list), ``loss``,
      ``head``, ``data``, ``callbacks``: component references as on the command
      line. Without ``strategy`` and ``head``, the built-in ``logit-scale``
      strategy trains (cheap: one scalar), so a loss, data or callback plugin can run.
    - ``data`` defaults to ``shapes`` with ``steps x batch_size`` training images
      (one epoch of ``steps`` steps; ``steps`` defaults to 2). With your own
      ``data``, its size decides the steps, and ``steps``, when given, is checked.
    - ``**config``: any other :class:`clipft.config.RunConfig` field (``epochs``,
      ``lr``, ``pretrained``, ``seed``, ``precision`` ...). Defaults: ``tiny-vit``,
      ``pretrained="none"``, one epoch, batch size :data:`DEFAULT_BATCH_SIZE`,
      ``device="cpu"``, seed 0.
    """
    from clipft.api import RunConfig, run

    strategies = _refs(strategy)
    if not strategies and head is None:
        strategies = ["logit-scale"]
    batch_size = config.pop("batch_size", DEFAULT_BATCH_SIZE)
    epochs = config.get("epochs", 1)
    accum = config.get("grad_accum", 1)
    if data is None:
        data = f"shapes:n={(steps or 2) * batch_size * accum},val_n={DEFAULT_VAL_N}"
    fields = dict(model="tiny-vit", pretrained="none", epochs=1, device="cpu", seed=0)
    fields.update(config)
    fields.update(data=data, strategies=strategies, loss=loss, head=head,
                  callbacks=_refs(callbacks), batch_size=batch_size)
    cfg = RunConfig(**{k: str(v) if k == "pretrained" else v for k, v in fields.items()})
    reg = registry if registry is not None else plugin_registry(plugin)
    summary = run(cfg, registry=reg, out=_fresh_dir(Path(tmp_path), "run"))
    if steps is not None and summary["train"]["steps"] != steps * epochs:
        raise AssertionError(f"the run took {summary['train']['steps']} optimizer steps, not "
                             f"{steps} per epoch x {epochs} epochs (size your data to match)")
    return summary


def resume_run(run, plugin=None, *, registry=None, **changed) -> dict:
    """Resume a run in its own directory, as ``clipft run --resume RUN_DIR`` with
    ``changed`` as its flags, and return the summary. ``run`` is a run directory
    or :func:`run_plugin`'s summary; ``plugin`` and ``registry`` as for
    :func:`run_plugin`; ``changed``: :class:`clipft.config.RunConfig` fields,
    e.g. ``epochs=2`` to train on. What may change is the command line's rule
    (``clipft.engine.resume.RESUMABLE``): anything else raises the same
    :class:`clipft.ClipftUsageError`."""
    from clipft.config import RunConfig
    from clipft.engine.session import execute
    from clipft.progress import Silent

    run_dir = _run_dir(run)
    # as the command line: the saved config with the flags on top (none saved:
    # the resume itself says the directory is no run)
    cfg = _run_config(run_dir) if (run_dir / "config.toml").is_file() else RunConfig()
    for name, value in changed.items():
        if not hasattr(cfg, name):
            raise TypeError(f"resume_run() got {name!r}, which is no clipft.config.RunConfig field")
        setattr(cfg, name, value)   # runs the field's converter and validator
    reg = registry if registry is not None else plugin_registry(plugin)
    return execute(cfg, reg, Silent(), resume=run_dir, given=list(changed))


def _run_dir(run) -> Path:
    return Path(run["run_dir"]) if isinstance(run, Mapping) else Path(run)


def _run_config(run_dir: Path):
    from clipft.config import RunConfig, load_toml
    path = run_dir / "config.toml"
    return RunConfig.from_toml_dict(load_toml(path), where=str(path))


def initial_state(run) -> dict:
    """The state dict (cloned) of the model the run started from, before its
    strategies: what training changed is the difference to this. ``run`` is a
    run directory or :func:`run_plugin`'s summary."""
    cfg = _run_config(_run_dir(run))
    model, _, _ = tiny_model(cfg.model, cfg.pretrained, seed=cfg.seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def load_trained(run, registry=None, device: str = "cpu"):
    """The trained model rebuilt from a run directory (what ``clipft export`` and
    ``clipft eval`` see): the base loaded again, the strategies re-applied, the
    checkpoint's tensors on top. Returns an object with ``model``, ``head``,
    ``tokenizer``, ``preprocess``, ``classnames``, ``templates`` and ``config``."""
    from clipft.engine.loadrun import load_run
    return load_run(_run_dir(run), registry if registry is not None else plugin_registry(),
                    device=device)


def checkpoint_tensors(run) -> tuple[dict, dict]:
    """``(model tensors, head tensors)`` of the run's newest complete checkpoint:
    what trained (plus new or reshaped tensors and buffers of trained modules)."""
    from safetensors.torch import load_file

    from clipft.engine.checkpoint import newest_complete

    run_dir = _run_dir(run)
    ck, _ = newest_complete(run_dir)
    if ck is None:
        raise AssertionError(f"{run_dir} has no complete checkpoint")
    head_file = ck / "head.safetensors"
    return (load_file(str(ck / "model.safetensors")),
            load_file(str(head_file)) if head_file.is_file() else {})


# -- assertions ---------------------------------------------------------------------
def _state(model) -> Mapping:
    if isinstance(model, Mapping):
        return model
    return model.state_dict()


def _selector(selected) -> Callable[[str], bool]:
    if callable(selected):
        return selected
    names = set(selected)
    return names.__contains__


def _short(names, n: int = 8) -> str:
    names = sorted(names)
    more = f" ... ({len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def assert_only_selected_changed(before_state: Mapping, model, selected) -> list:
    """Assert that, between ``before_state`` (e.g. :func:`initial_state`) and
    ``model`` (an ``nn.Module`` or a state dict), only ``selected`` tensors changed,
    and that at least one of them did. ``selected`` is a collection of names or a
    predicate ``name -> bool``. A tensor that is new (an inserted module) or
    reshaped counts as changed. Returns the changed names."""
    import torch

    after = _state(model)
    is_selected = _selector(selected)
    if not callable(selected):
        unknown = [n for n in selected if n not in after]
        if unknown:
            raise AssertionError(f"selected names that are not in the model: {_short(unknown)}")
    changed = []
    for name, value in after.items():
        old = before_state.get(name)
        if old is None or tuple(old.shape) != tuple(value.shape) or not torch.equal(
                old.detach().cpu(), value.detach().cpu()):
            changed.append(name)
    outside = [n for n in changed if not is_selected(n)]
    if outside:
        raise AssertionError(f"{len(outside)} tensors outside the selection changed: {_short(outside)}")
    if not changed:
        raise AssertionError("none of the selected tensors changed: did anything train?")
    return sorted(changed)


def _val_metrics(loaded) -> tuple[dict, int]:
    """Zero-shot top-1 (and the head's) of a rebuilt run on its val split, and
    the number of val images."""
    import torch

    from clipft.data import DataContext
    from clipft.encode import class_scores, encode_images

    spec, opts = loaded.resolved.data
    bundle = spec.build(opts, DataContext(transform_train=loaded.preprocess,
                                          transform_val=loaded.preprocess, seed=loaded.config.seed))
    if not bundle.classnames:
        return {}, 0
    items = [x for x in (bundle.val[i] for i in range(len(bundle.val))) if x is not None]
    labels = torch.tensor([x[3] for x in items])
    metrics = {}
    with torch.no_grad():
        feats = torch.cat([encode_images(loaded.model, torch.stack([x[1] for x in items[i:i + 64]])
                                         .to(loaded.device)) for i in range(0, len(items), 64)])
        scores = class_scores(loaded.model, loaded.tokenizer, loaded.classnames, loaded.templates,
                              loaded.device, feats)
        metrics["top1"] = float((scores.argmax(-1).cpu() == labels).float().mean())
        if loaded.head is not None:
            metrics["head_top1"] = float((loaded.head(feats).argmax(-1).cpu() == labels).float().mean())
    return metrics, len(items)


def assert_checkpoint_roundtrip(run_dir, registry=None, *, metrics: bool = True):
    """Assert that rebuilding the run from its directory (:func:`load_trained`)
    gives the trained tensors back: every tensor of the checkpoint is in the
    rebuilt model (and head) unchanged, and something in it differs from the
    model the run started from. With ``metrics`` (fp32 runs), the rebuilt model's
    zero-shot (and head) top-1 on the val split also matches the run's final
    evaluation in ``summary.json``, within one image. Returns the rebuilt run."""
    import torch

    run_dir = _run_dir(run_dir)
    model_t, head_t = checkpoint_tensors(run_dir)
    if not model_t and not head_t:
        raise AssertionError(f"the checkpoint in {run_dir} holds no tensors: nothing trained")
    loaded = load_trained(run_dir, registry)
    sd = loaded.model.state_dict()
    missing = [k for k in model_t if k not in sd]
    if missing:
        raise AssertionError(f"checkpoint tensors missing from the rebuilt model: {_short(missing)}")
    differ = [k for k, v in model_t.items() if not torch.equal(sd[k].detach().cpu(), v)]
    if differ:
        raise AssertionError(f"the rebuilt model does not hold the checkpoint's tensors: {_short(differ)}")
    if head_t:
        hsd = loaded.head.state_dict() if loaded.head is not None else {}
        bad = [k for k, v in head_t.items() if k not in hsd or not torch.equal(hsd[k].detach().cpu(), v)]
        if bad:
            raise AssertionError(f"the rebuilt head does not hold the checkpoint's tensors: {_short(bad)}")
    if model_t:
        before = initial_state(run_dir)
        if not any(k not in before or before[k].shape != v.shape or not torch.equal(before[k], v)
                   for k, v in model_t.items()):
            raise AssertionError("every checkpoint tensor equals the model the run started from: "
                                 "nothing trained")
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else None
    if metrics and summary and summary.get("precision") == "fp32":   # what ran (auto resolves)
        got, n = _val_metrics(loaded)
        want = summary["eval"]["after"]
        for key, value in got.items():
            if key in want and abs(value - want[key]) > 1.0 / n + 1e-9:
                raise AssertionError(f"the rebuilt model's {key} is {value:.4f}; the run ended at "
                                     f"{want[key]:.4f}")
    return loaded


def _probe(model, tokenizer, device):
    import torch
    size = getattr(model.visual, "image_size", 224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, h, w, generator=g).to(device)
    tokens = tokenizer(["a photo of a cat.", "a red square", "a diagram"]).to(device)
    return images, tokens


def _max_diff(a, b) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max())


def assert_export_roundtrip(run_dir, out, registry=None, *, atol: float = 1e-5) -> dict:
    """Assert that ``clipft export RUN OUT`` followed by ``load_export(OUT)``
    reproduces the run's model: image and text features on a probe input, the
    class-prompt features and the head's logits agree with the rebuilt run within
    ``atol``. Returns the export manifest (``manifest["plain_open_clip_drops"]``
    lists what a plain open_clip load of OUT leaves out)."""
    import torch

    from clipft.encode import class_scores, class_text_features, encode_images, encode_texts
    from clipft.commands.export import export_run, load_export

    run_dir = _run_dir(run_dir)
    registry = registry if registry is not None else plugin_registry()
    manifest = export_run(run_dir, Path(out), registry)
    exported = load_export(Path(out), registry)
    loaded = load_trained(run_dir, registry)
    a, b = loaded.model, exported["model"]
    images, tokens = _probe(a, loaded.tokenizer, loaded.device)
    with torch.no_grad():
        pairs = {"image features": (encode_images(a, images), encode_images(b, images)),
                 "text features": (encode_texts(a, tokens), encode_texts(b, tokens))}
        if loaded.classnames:
            ca = class_text_features(a, loaded.tokenizer, loaded.classnames, loaded.templates, loaded.device)
            cb = class_text_features(b, exported["tokenizer"], exported["classnames"],
                                     exported["templates"], loaded.device)
            pairs["class-prompt features"] = (ca, cb)
            # with a conditional class-prompt encoder (CoCoOp) the prompts depend on the image
            feats = pairs["image features"][0]
            pairs["class scores"] = (
                class_scores(a, loaded.tokenizer, loaded.classnames, loaded.templates, loaded.device, feats),
                class_scores(b, exported["tokenizer"], exported["classnames"], exported["templates"],
                             loaded.device, feats))
        if loaded.head is not None:
            if exported["head"] is None:
                raise AssertionError("the export lost the run's head")
            feats = pairs["image features"][0]
            pairs["head logits"] = (loaded.head(feats), exported["head"](feats))
    for what, (x, y) in pairs.items():
        if x.shape != y.shape:
            raise AssertionError(f"{what}: shape {tuple(y.shape)} after export, {tuple(x.shape)} in the run")
        diff = _max_diff(x, y)
        if diff > atol * max(1.0, float(x.abs().max())):
            raise AssertionError(f"{what} differ after export + load_export: max |diff| {diff:.2e}")
    return manifest
