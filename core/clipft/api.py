"""The Python API for embedding clipft in other codebases.

    from clipft.api import run, RunConfig
    summary = run(RunConfig(model="tiny-vit", strategies=["last-n:n=1"]),
                  plugins=[MyPlugin()], out="runs/x")

``plugins`` registers plugin objects (or modules) in-process: anything with
``@clipft.hookimpl`` functions. Installed entry-point plugins are loaded too
unless ``entry_points=False``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Union

from clipft.config import RunConfig
from clipft.plugins import Registry

__all__ = ["RunConfig", "Registry", "run", "plan", "make_registry"]


def make_registry(plugins: Iterable[object] = (), disabled: Iterable[str] = (),
                  entry_points: bool = True) -> Registry:
    return Registry(plugins=plugins, disabled=disabled, entry_points=entry_points).load()


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
