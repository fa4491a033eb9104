"""What ``clipft eval`` and ``clipft predict`` evaluate: a run directory, an
export directory, or a plain open_clip model (``--model M --pretrained P``).

Each becomes a :class:`Source`: a model in eval mode with its tokenizer and
val transform, the head when there is one, and the class names and templates
the model was trained for (None for a plain model).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import attrs
import torch

from clipft.commands.export import MANIFEST, load_export
from clipft.engine.assemble import pick_device
from clipft.engine.loadrun import load_run
from clipft.errors import ClipftUsageError
from clipft.models import load_model

KIND_RUN, KIND_EXPORT, KIND_MODEL = "run", "export", "model"


@attrs.define
class Source:
    kind: str
    description: str
    model: torch.nn.Module
    tokenizer: object
    preprocess: object
    head: Optional[torch.nn.Module]
    classnames: Optional[list]
    templates: Optional[tuple]
    device: torch.device
    #: the split seed of the run (so a run's own val split is the one it saw)
    seed: int = 0
    #: the run's RunConfig, for a run directory
    config: object = None
    #: the loaded run (``clipft.engine.loadrun.LoadedRun``), for a run directory
    run: object = None
    #: the head's ``HeadSpec`` (None without a head): what it declares (``encodes_text``)
    head_spec: object = None


def source_kind(path: Path) -> str:
    if (path / "config.toml").is_file():
        return KIND_RUN
    if (path / MANIFEST).is_file():
        return KIND_EXPORT
    if not path.exists():
        raise ClipftUsageError(f"{path} does not exist; SOURCE is a run directory, an export "
                               "directory, or give --model M --pretrained P instead")
    raise ClipftUsageError(f"{path} is neither a clipft run directory (config.toml) nor an export "
                           "(clipft_export.json); or give --model M --pretrained P instead")


def load_source(source: Optional[str], model_name: Optional[str] = None, pretrained: Optional[str] = None,
                registry=None, device: str = "cpu", best: bool = False) -> Source:
    """``best``: a run's ``checkpoint-best/`` instead of its final weights."""
    if source and model_name:
        raise ClipftUsageError(f"give either SOURCE ({source}) or --model, not both")
    if best and model_name:
        raise ClipftUsageError("--best picks a run's best checkpoint; it does not go with --model")
    if not source and not model_name:
        raise ClipftUsageError("nothing to evaluate: give a run directory, an export directory, "
                               "or --model M --pretrained P")
    if pretrained and not model_name:
        raise ClipftUsageError("--pretrained goes with --model (a run or export knows its weights)")
    dev = pick_device(device)
    if model_name:
        loaded = load_model(model_name, pretrained or "auto", device=str(dev))
        loaded.model.requires_grad_(False)
        loaded.model.eval()
        return Source(KIND_MODEL, f"{model_name} ({loaded.pretrained})", loaded.model, loaded.tokenizer,
                      loaded.preprocess_val, None, None, None, dev)
    path = Path(source)
    kind = source_kind(path)
    if best and kind != KIND_RUN:
        raise ClipftUsageError(f"--best picks a run's best checkpoint; {path} is an export, not a run directory")
    if kind == KIND_RUN:
        run = load_run(path, registry, device=str(dev), best=best)
        return Source(KIND_RUN, f"run {path}" + (" (best checkpoint)" if best else ""), run.model, run.tokenizer,
                      run.preprocess, run.head, run.classnames, tuple(run.templates), dev, seed=run.config.seed,
                      config=run.config, run=run,
                      head_spec=run.resolved.head[0] if run.resolved.head is not None else None)
    if is_onnx_export(path):
        raise ClipftUsageError(f"{path} is an ONNX export (clipft export --format onnx): clipft predict runs it, "
                               "clipft eval takes a run or an open_clip export")
    exp = load_export(path, registry, device=str(dev))
    return Source(KIND_EXPORT, f"export {path}", exp["model"], exp["tokenizer"], exp["preprocess"],
                  exp["head"], exp["classnames"], tuple(exp["templates"]) if exp["classnames"] else None,
                  dev, seed=int(exp["manifest"].get("seed", 0)),
                  head_spec=(registry.get("head", exp["manifest"]["head"]["name"])
                             if exp["head"] is not None and registry is not None else None))


def run_data(source: Optional[str], model_name: Optional[str] = None):
    """The data reference a run directory's ``config.toml`` records: what
    ``clipft eval RUN`` evaluates on without ``--data`` (the run's own split)."""
    from clipft.config import RunConfig, load_toml
    if not source or model_name or source_kind(Path(source)) != KIND_RUN:
        raise ClipftUsageError("--data is required (a run directory as SOURCE evaluates on its own data "
                               "without it), e.g. --data imagefolder:root=./pets")
    path = Path(source) / "config.toml"
    return RunConfig.from_toml_dict(load_toml(path), where=str(path)).data


def is_onnx_export(path: Path) -> bool:
    """Whether ``path`` is an export of ``clipft export --format onnx``."""
    import json
    try:
        return json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("format_name") == "onnx"
    except (OSError, ValueError, AttributeError):
        return False   # load_export names what is wrong with it
