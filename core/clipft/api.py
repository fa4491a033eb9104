"""The Python API for embedding clipft in other codebases: every command as
a function, with the command's defaults and errors (:class:`ClipftUsageError`
for bad input), returning what its ``--json`` prints.

    from clipft.api import run, evaluate, load, RunConfig
    summary = run(RunConfig(model="tiny-vit", strategies=["last-n:n=1"]),
                  plugins=[MyPlugin()], out="runs/x")     # summary.json
    report = evaluate("runs/x")                           # clipft eval runs/x --json
    probs = load("runs/x").classify(["cat.jpg"])          # clipft.load, the same

``plugins`` registers plugin objects (or modules) in-process: anything with
``@clipft.hookimpl`` functions. Installed entry-point plugins are loaded too
unless ``entry_points=False``. ``registry=make_registry(...)`` shares one
registry between calls. The command line calls these functions.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

from clipft.config import RunConfig
from clipft.errors import ClipftError, ClipftUsageError
from clipft.plugins import Registry

__all__ = ["RunConfig", "Registry", "run", "plan", "evaluate", "predict", "iter_predict", "export",
           "sweep", "load", "make_registry"]

PathLike = Union[str, "os.PathLike[str]"]


def make_registry(plugins: Iterable[object] = (), disabled: Iterable[str] = (),
                  entry_points: bool = True) -> Registry:
    return Registry(plugins=plugins, disabled=disabled, entry_points=entry_points).load()


def _registry(registry, plugins, disabled, entry_points) -> Registry:
    return registry or make_registry(plugins, disabled, entry_points)


def _config(config: Union[RunConfig, dict]) -> RunConfig:
    return config if isinstance(config, RunConfig) else RunConfig.from_toml_dict(config)


def run(config: Union[RunConfig, dict, None] = None, *, plugins: Iterable[object] = (),
        disabled: Iterable[str] = (), entry_points: bool = True,
        out: Optional[Union[str, Path]] = None, overwrite: bool = False,
        resume: Optional[Union[str, Path]] = None, progress=None,
        registry: Optional[Registry] = None) -> dict:
    """Train and return the summary (the same dict as ``summary.json``).

    With ``resume=RUN_DIR`` the run continues with its own config.toml: a
    ``config`` given as well may change only what ``clipft run --resume`` lets
    change (epochs, device, workers, checkpointing, callbacks), and the options
    it sets to anything else than the saved values are refused, as on the
    command line."""
    from clipft.engine.session import execute
    from clipft.progress import Silent

    if config is None and resume is None:
        raise TypeError("run() needs a config, or resume=RUN_DIR")
    reg = registry or make_registry(plugins, disabled, entry_points)
    cfg = _config(config) if config is not None else None
    return execute(cfg, reg, progress or Silent(), out_dir=Path(out) if out else None,
                   overwrite=overwrite, resume=Path(resume) if resume else None)


def plan(config: Union[RunConfig, dict], *, plugins: Iterable[object] = (),
         disabled: Iterable[str] = (), entry_points: bool = True,
         registry: Optional[Registry] = None) -> dict:
    """What would train, without training: groups, counts, lr, optimizer memory."""
    from clipft.commands.plan import make_plan

    reg = registry or make_registry(plugins, disabled, entry_points)
    return make_plan(_config(config), reg)


# -- eval, predict ----------------------------------------------------------------------
def _data_ref(value, flag: str = "--data"):
    """``"imagefolder:root=PATH"`` (``--data``'s syntax, a bare path too) or a
    :class:`clipft.options.ComponentRef`."""
    from clipft.options import ComponentRef, data_ref, parse_data_ref
    if isinstance(value, ComponentRef):
        return data_ref(value)
    if isinstance(value, str) and value.strip():
        return parse_data_ref(value)
    raise ClipftUsageError(f"{flag} is required, e.g. {flag} imagefolder:root=./pets")


def _templates(value) -> Optional[tuple]:
    """Templates, set names (``simple``, ``openai-imagenet``) or ``@FILE``s: a
    list, or one string with commas between them (as ``--templates``)."""
    if not value:
        return None
    from clipft.data import resolve_templates
    try:   # as in --data: a comma separates templates
        return resolve_templates([t for t in value.split(",") if t.strip()] if isinstance(value, str) else value)
    except (ValueError, ClipftError) as exc:
        raise ClipftUsageError(f"--templates {value}: {exc}") from None


def _batch_size(n: int) -> int:
    if not isinstance(n, int) or n < 1:
        raise ClipftUsageError(f"--batch-size {n}: must be >= 1")
    return n


def evaluate(source: Optional[PathLike] = None, *, data=None, split: str = "val", model: Optional[str] = None,
             pretrained: Optional[str] = None, templates=None, control_data=None, batch_size: int = 64,
             num_workers: int = 0, device: str = "auto", best: bool = False,
             per_class: Optional[PathLike] = None, confusion: Optional[PathLike] = None,
             wise_ft_sweep=None, wise_ft_plot: Optional[PathLike] = None, base_to_novel: bool = False,
             plugins: Iterable[object] = (), disabled: Iterable[str] = (), entry_points: bool = True,
             registry: Optional[Registry] = None) -> dict:
    """``clipft eval``: the report ``clipft eval --json`` prints.

    ``source`` is a run directory or an export directory, or give
    ``model=``/``pretrained=`` for a plain open_clip model. ``data`` is a data
    reference as ``--data`` takes it (``"imagefolder:root=./pets"``); a run
    directory without it is evaluated on its own data and split. ``per_class``,
    ``confusion`` and ``wise_ft_plot`` are files to write (a CSV, PNGs);
    ``wise_ft_sweep=[0, 0.5, 1]`` (or ``"0,0.5,1"``) returns the WiSE-FT curve
    instead (``{"source", "split", "wise_ft": [{"alpha", "data", ...}]}``).
    ``base_to_novel=True`` evaluates ``data`` with ``classes=base`` and
    ``classes=novel`` and returns ``{"protocol": "base-to-novel", "metrics":
    {"base_top1", "novel_top1", "hm"}, "base": ..., "novel": ...}``."""
    from clipft.commands import inference
    from clipft.commands.source import KIND_RUN, load_source, run_data

    reg = _registry(registry, plugins, disabled, entry_points)
    _batch_size(batch_size)
    task_ref = _data_ref(data) if data else run_data(source and str(source), model)
    control_ref = _data_ref(control_data, "--control-data") if control_data else None
    tmpl = _templates(templates)
    if wise_ft_plot and wise_ft_sweep is None:
        raise ClipftUsageError("--wise-ft-plot goes with --wise-ft-sweep")
    alphas = None
    if wise_ft_sweep is not None:
        from clipft.commands.wiseft import parse_alphas
        alphas = parse_alphas(wise_ft_sweep if isinstance(wise_ft_sweep, str)
                              else ",".join(str(a) for a in wise_ft_sweep))
        if wise_ft_plot:
            inference.require_matplotlib("--wise-ft-plot")
    if confusion:
        inference.require_matplotlib("--confusion")
    if base_to_novel:
        return _base_to_novel(source, task_ref, not data, split, model, pretrained, tmpl, batch_size, num_workers, device,
                              best, reg, extras={"control_data": control_data, "per_class": per_class,
                                                 "confusion": confusion, "wise_ft_sweep": wise_ft_sweep})
    src = load_source(source and str(source), model, pretrained, reg, device, best=best)
    sets = [("data", task_ref, inference.build_data(task_ref, reg, src))]
    if control_ref is not None:
        sets.append(("control", control_ref, inference.build_data(control_ref, reg, src)))

    def measure():
        return {name: inference.evaluate_source(src, bundle, ref, split, tmpl, batch_size, num_workers)
                for name, ref, bundle in sets}

    if alphas is not None:
        if src.kind != KIND_RUN:
            raise ClipftUsageError("--wise-ft-sweep needs a run directory as SOURCE (it interpolates "
                                   "the run's weights with the model it started from)")
        from clipft.commands import wiseft
        ends = wiseft.endpoints(src.run)
        curve = []
        for a in alphas:
            wiseft.apply(src.run, ends, a)
            curve.append({"alpha": a, **{k: r.doc["metrics"] for k, r in measure().items()}})
        if wise_ft_plot:
            inference.write_wise_ft_png(curve, Path(wise_ft_plot))
        return {"source": src.description, "split": split, "wise_ft": curve}
    results = measure()
    main = results["data"]
    if per_class:
        inference.write_per_class_csv(main, Path(per_class))
    if confusion:
        inference.write_confusion_png(main, Path(confusion))
    doc = dict(main.doc)
    if "control" in results:
        doc["control"] = results["control"].doc
    return doc


def _base_to_novel(source, task_ref, own_data: bool, split, model, pretrained, tmpl, batch_size, num_workers, device, best,
                   reg, extras: dict) -> dict:
    from clipft.commands import inference
    from clipft.commands.source import load_source
    given = [k.replace("_", "-") for k, v in extras.items() if v is not None and v is not False]
    if given:
        raise ClipftUsageError(f"--base-to-novel reports base, novel and their harmonic mean; it does not "
                               f"combine with --{', --'.join(given)}")
    refs = inference.base_to_novel_refs(task_ref, reg, own_data)
    src = load_source(source and str(source), model, pretrained, reg, device, best=best)
    return inference.evaluate_base_to_novel(src, refs, reg, split, tmpl, batch_size, num_workers)


def _labels(labels, labels_file) -> Optional[list]:
    """``labels``: a list, or one string with commas between them (as ``--labels``)."""
    if labels is not None and labels_file:
        raise ClipftUsageError("give --labels or --labels-file, not both")
    names = None
    if isinstance(labels, str):
        names = [x.strip() for x in labels.split(",")]
        if names and not all(names):   # `--labels a,,b` or `--labels ''`: a class with no name
            raise ClipftUsageError(f"--labels {labels!r}: a label is empty; give names separated by commas")
    elif labels is not None:
        names = [str(x).strip() for x in labels]
        if not all(names):
            raise ClipftUsageError(f"labels {list(labels)!r}: a label is empty")
    elif labels_file:
        from clipft.data import read_text_utf8
        names = [x.strip() for x in read_text_utf8(labels_file, "labels file").splitlines() if x.strip()]
    if names is not None and not names:
        raise ClipftUsageError("no labels given")
    if names is not None and len(set(names)) != len(names):
        raise ClipftUsageError("labels repeat: " + ", ".join(sorted({n for n in names if names.count(n) > 1})))
    return names


def iter_predict(source: Optional[PathLike] = None, images: Iterable[PathLike] = (), *,
                 model: Optional[str] = None, pretrained: Optional[str] = None, labels=None,
                 labels_file: Optional[PathLike] = None, templates=None, top_k: int = 5, batch_size: int = 64,
                 device: str = "auto", best: bool = False, plugins: Iterable[object] = (),
                 disabled: Iterable[str] = (), entry_points: bool = True,
                 registry: Optional[Registry] = None) -> Iterator[dict]:
    """:func:`predict`'s records one at a time, as they are computed (what
    ``clipft predict --json`` streams). The arguments are checked and the
    model is loaded before this returns."""
    from clipft.commands import inference
    from clipft.commands.source import is_onnx_export, load_source

    images = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    if not images:
        raise ClipftUsageError("no images given: clipft predict SOURCE IMAGE|FOLDER...")
    if top_k < 1:
        raise ClipftUsageError(f"--top-k {top_k}: must be >= 1")
    _batch_size(batch_size)
    names = _labels(labels, labels_file)
    paths = inference.image_paths(str(p) for p in images)
    if source and is_onnx_export(Path(source)):     # onnxruntime runs its graphs, no torch model
        from clipft.commands.onnx_export import predict as onnx_predict
        return onnx_predict(Path(source), paths, names, _templates(templates), top_k, batch_size, best)
    src = load_source(source and str(source), model, pretrained,
                      _registry(registry, plugins, disabled, entry_points), device, best=best)
    classifier, classes = inference.classifier_for_predict(src, names, _templates(templates))
    return inference.predict(src, paths, classifier, classes, top_k, batch_size)


def predict(source: Optional[PathLike] = None, images: Iterable[PathLike] = (), **options) -> list:
    """``clipft predict``: one record per image file (a folder gives its
    images, sorted), in order, as ``clipft predict --json`` prints them:
    ``{"image", "used": "head"|"zero-shot", "top": [{"label", "prob"}, ...]}``,
    or ``{"image", "error"}`` for a file that cannot be read. The run's classes
    (through its head when it has one), or ``labels=["a", "b"]`` for zero-shot
    use. Options as :func:`iter_predict` (``model``, ``pretrained``, ``labels``,
    ``labels_file``, ``templates``, ``top_k=5``, ``batch_size=64``,
    ``device="auto"``, ``best`` ...). For tensors rather than files, use
    :func:`load`."""
    return list(iter_predict(source, images, **options))


# -- export, sweep, load ----------------------------------------------------------------
def export(run_dir: PathLike, out: PathLike, *, overwrite: bool = False, device: str = "cpu",
           wise_ft: Optional[float] = None, best: bool = False, format: str = "open_clip",
           plugins: Iterable[object] = (),
           disabled: Iterable[str] = (), entry_points: bool = True,
           registry: Optional[Registry] = None) -> dict:
    """``clipft export``: write ``run_dir`` to ``out`` as a plain open_clip model
    (LoRA merged; learned prompts and the head beside it) and return the
    manifest (``clipft_export.json``, what ``clipft export --json`` prints).
    ``wise_ft=α`` writes the WiSE-FT weights; ``best`` the run's
    ``checkpoint-best/``; ``format="onnx"`` writes ONNX graphs instead (the
    ``onnx`` extra). Load it back with :func:`load`."""
    if format == "onnx":
        from clipft.commands.onnx_export import export_run
    elif format == "open_clip":
        from clipft.commands.export import export_run
    else:
        raise ClipftUsageError(f"--format {format!r}: choose open_clip or onnx")
    return export_run(Path(run_dir), Path(out), _registry(registry, plugins, disabled, entry_points),
                      overwrite=overwrite, device=device, wise_ft=wise_ft, best=best)


def sweep(config: Union[RunConfig, dict], strategies: Union[str, Sequence[str]], *, seeds: int = 1,
          control_data=None, out: Optional[PathLike] = None, overwrite: bool = False,
          disabled: Iterable[str] = (), entry_points: bool = True, registry: Optional[Registry] = None,
          on_member: Optional[Callable] = None, on_done: Optional[Callable] = None,
          on_note: Optional[Callable[[str], None]] = None, base_to_novel: bool = False) -> dict:
    """``clipft sweep``: each member of ``strategies`` (``"lora,last-n:n=2"``
    as ``--strategies`` takes it, or a list such as ``["lora", "reproject:dim=64+last-n:n=1"]``)
    trained with ``config`` for ``seeds`` seeds; returns ``sweep.json`` (what
    ``clipft sweep --json`` prints). Members run as ``clipft run`` processes, so
    they see the installed plugins only, not in-process ones.
    ``on_member(done, total, name, seed)`` is called before each member run,
    ``on_done(name, row)`` after it, ``on_note(text)`` for what the sweep could
    not do on the side (the plot, without matplotlib; default: a warning).
    Without ``overwrite`` the same call continues a stopped sweep.
    ``base_to_novel=True`` trains every member on the base half of the data's
    classes and reports base top-1, novel top-1 and their harmonic mean."""
    import attrs

    from clipft.commands import sweep as sweeps
    from clipft.engine.assemble import resolve

    cfg = _config(config)
    if seeds < 1:
        raise ClipftUsageError(f"--seeds {seeds}: must be >= 1")
    refs = sweeps.parse_members(strategies if isinstance(strategies, str) else ",".join(strategies))
    disabled = tuple(sorted(set(disabled)))
    reg = registry or make_registry((), disabled, entry_points)
    halves = None
    if base_to_novel:                   # refused before any member trains
        from clipft.commands import inference
        halves = inference.base_to_novel_refs(cfg.data, reg)
        if cfg.head is not None:
            inference.novel_scoring(reg.get("head", cfg.head.name))
        cfg = attrs.evolve(cfg, data=halves["base"])
    for m in refs:                      # every member resolves before the first one trains
        resolve(attrs.evolve(cfg, strategies=m), reg)
        for r in m:
            if r.name != "none" and reg.distribution_of("strategy", r.name).startswith("<in-process"):
                raise ClipftUsageError(f"sweep: strategy '{r.name}' is registered in-process; sweep members "
                                       "run as `clipft run` processes, which load installed plugins only")
    control = _data_ref(control_data, "--control-data") if control_data else None
    if control is not None:
        reg.get("data", control.name)
    out_dir = Path(out) if out else Path("runs") / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    if (out_dir / sweeps.SWEEP_JSON).exists() and not overwrite and not sweeps.is_unfinished(out_dir):
        raise ClipftUsageError(f"{out_dir} holds a sweep already; pass --overwrite to replace it")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / sweeps.SWEEP_JSON).exists() \
            and not any(out_dir.glob("*/seed*.toml")):
        raise ClipftUsageError(f"{out_dir} exists and is not a sweep directory; choose another --out")
    spec = sweeps.SweepSpec(config=cfg, members=refs, seeds=seeds, out=out_dir, control=control,
                            disabled=disabled, fresh=overwrite, base_to_novel=halves)
    doc = sweeps.run_sweep(spec, reg, on_member=on_member, on_done=on_done)
    try:
        sweeps.write_sweep_png(doc, out_dir / sweeps.SWEEP_PNG)
    except ClipftUsageError as exc:     # no matplotlib: the table and sweep.json are what matter
        note = f"no {sweeps.SWEEP_PNG}: {exc}"
        if on_note is None:
            import warnings
            warnings.warn(note, stacklevel=2)
        else:
            on_note(note)
    return doc


def load(path: PathLike, *, best: bool = False, device: str = "auto", plugins: Iterable[object] = (),
         disabled: Iterable[str] = (), entry_points: bool = True, registry: Optional[Registry] = None):
    """A trained model for inference (also ``clipft.load``): ``path`` is a run
    directory (its final weights; ``best=True``: ``checkpoint-best/``) or an
    export directory. Returns a :class:`clipft.commands.loaded.LoadedModel`:
    ``encode_image``, ``encode_text``, ``classify`` (probabilities over
    ``classes``, as ``clipft predict`` computes them), ``classes``,
    ``preprocess``, ``tokenizer``, ``model`` (the ``nn.Module``, in eval mode,
    gradients off) and ``device`` (``"auto"``: CUDA when there is one)."""
    from clipft.commands.export import MANIFEST
    from clipft.commands.loaded import LoadedModel
    from clipft.commands.source import load_source

    p = Path(path)
    if not p.exists():
        raise ClipftUsageError(f"clipft.load: {p} does not exist; give a run directory (with config.toml) "
                               f"or an export directory (with {MANIFEST})")
    if not (p / "config.toml").is_file() and not (p / MANIFEST).is_file():
        raise ClipftUsageError(f"clipft.load: {p} is neither a clipft run directory (no config.toml) nor "
                               f"an export directory (no {MANIFEST})")
    # runs and exports load the plugins they need themselves; a registry is
    # built here only when the caller shapes it
    reg = registry or (make_registry(plugins, disabled, entry_points)
                       if (plugins or disabled or not entry_points) else None)
    return LoadedModel(load_source(str(p), registry=reg, device=device, best=best), p)
