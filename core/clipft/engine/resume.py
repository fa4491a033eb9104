"""What a resumed run may change.

A resume continues the run in its own directory with the config it was
written with (``config.toml``): only the options in :data:`RESUMABLE` may
differ, since the others decide the model, the data order or the optimizer
state the checkpoint holds. ``clipft run --resume`` and
``clipft.api.run(resume=...)`` both go through :func:`resume_config`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import attrs

from clipft import kinds
from clipft.config import RunConfig, flag_fields, flag_name, load_toml
from clipft.errors import ClipftUsageError
from clipft.options import build_options, options_to_dict

#: the options a resumed run may change: RunConfig fields marked ``resumable``
#: (clipft.config.option), and the callbacks, which only observe
RESUMABLE = tuple(f.name for f in flag_fields() if f.metadata["resumable"]) + ("callbacks",)

#: the component fields' flags (``--strategy`` for ``strategies``), from the kinds table
_FLAGS = {k.config_field: k.flag for k in kinds.KINDS}

#: component fields: their kind, to compare options by value rather than by spelling
_KINDS = {"data": "data", "loss": "loss", "head": "head", "strategies": "strategy"}


def flag(name: str) -> str:
    """The command-line spelling of option ``name`` (``batch_size`` -> ``--batch-size``)."""
    return _FLAGS.get(name) or flag_name(name)


def resume_config(run_dir: Path, config: Optional[RunConfig], registry, given: Optional[Iterable[str]] = None,
                  out: Optional[Path] = None, overwrite: bool = False) -> RunConfig:
    """The config a resume of ``run_dir`` trains with; a usage error naming the
    first option that may not change.

    ``given``: the options the caller set explicitly (``config`` for a config
    file), in order; ``config`` is then the saved config with them applied
    (``clipft run --resume``). None: ``config`` is a whole config (the Python
    API), or None for the saved one; the options it sets (those not at their
    defaults) must match the saved config, except the resumable ones, which it
    changes. ``out`` elsewhere and ``overwrite`` are refused: a resumed run
    stays in its directory."""
    run_dir = Path(run_dir)
    path = run_dir / "config.toml"
    if not path.is_file():
        raise ClipftUsageError(f"--resume {run_dir}: no config.toml there; is it a clipft run directory?")
    if given is None:
        saved = RunConfig.from_toml_dict(load_toml(path), where=str(path))
        out = out if out is not None else (config.out if config is not None else None)
        given, config = _set_in(config, saved, registry)
    changed = [k for k in given if k not in RESUMABLE]
    # a resumed run stays in its directory: --out elsewhere would be silently ignored
    if out is not None and Path(out).resolve() != run_dir.resolve():
        changed.append("out")
    if overwrite:
        changed.append("overwrite")
    if changed:
        names = [flag(n) for n in RESUMABLE]
        raise ClipftUsageError(
            f"only {', '.join(names[:-1])} and {names[-1]} can change when resuming (the run continues "
            f"in its own directory); got {flag(changed[0])}")
    if config.drop_last is None and "drop_last" not in load_toml(path):
        # a run from before --drop-last kept every epoch's short last batch: its
        # checkpoint's position counts those batches, so the resume must too
        config = attrs.evolve(config, drop_last=False)
    return config


def _set_in(config: Optional[RunConfig], saved: RunConfig, registry) -> tuple[list, RunConfig]:
    """``(changed, config)``: the options ``config`` sets to something other
    than the saved run's, and the saved config with its resumable ones applied."""
    if config is None:
        return [], saved
    changed, keep = [], {}
    for f in attrs.fields(RunConfig):
        if f.name == "out":   # where the run is: resume_config checks it
            continue
        value = getattr(config, f.name)
        default = f.default.factory() if isinstance(f.default, attrs.Factory) else f.default
        if value == default or _same(f.name, value, getattr(saved, f.name), registry):
            continue
        changed.append(f.name)
        if f.name in RESUMABLE:
            keep[f.name] = value
    return changed, attrs.evolve(saved, **keep)


def _same(name: str, value, saved, registry) -> bool:
    if value == saved:
        return True
    kind = _KINDS.get(name)
    if kind is None:
        return False
    # "last-n:n=1" and the saved {n = 1} are one choice: compare the options typed
    return _typed(kind, value, registry) == _typed(kind, saved, registry)


def _typed(kind: str, refs, registry) -> list:
    refs = refs if isinstance(refs, list) else [refs]
    out = []
    for ref in refs:
        if ref is None or (kind == "strategy" and ref.name == "none" and not ref.options):
            continue
        spec = registry.get(kind, ref.name)
        out.append((ref.name, options_to_dict(build_options(kind, spec, ref.options))))
    return out
