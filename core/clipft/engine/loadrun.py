"""Rebuilding a trained model from a run directory (``config.toml`` +
``checkpoint/``), for export, evaluation and prediction.

The base model is loaded as the run loaded it, the strategies are applied
again (so inserted modules such as LoRA adapters and prompt learners exist),
the head is rebuilt, and the checkpoint's tensors are loaded on top. Inserted
modules then swap in the weights the run evaluated with
(:meth:`clipft.InsertedModule.use_eval_weights`; ``ema``'s averages), so the
rebuilt model is the one ``summary.json``'s metrics describe. The data
is not needed: the class names and templates the run was built for are kept in
the checkpoint state (older checkpoints fall back to building the data source).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import attrs
import torch

from clipft.config import RunConfig, load_toml
from clipft.data import DataContext
from clipft.engine.assemble import assemble, pick_device, resolve, seed_everything
from clipft.engine.checkpoint import (BEST, CURRENT, checkpoint_to_load, inspect_checkpoint, load_trained_tensors,
                                      verify_checkpoint)
from clipft.engine.rundir import backup_of
from clipft.errors import ClipftError, ClipftUsageError
from clipft.models import load_model
from clipft.plugins import Registry
from clipft.protocols import use_eval_weights


@attrs.define
class LoadedRun:
    run_dir: Path
    config: object            # RunConfig
    resolved: object          # assemble.Resolved
    model: torch.nn.Module    # strategies applied, trained tensors loaded, eval mode
    tokenizer: object
    preprocess: object        # the val transform
    head: Optional[torch.nn.Module]
    classnames: Optional[list]
    templates: tuple
    #: state-dict key -> shape of the plain open_clip model, before any strategy
    base_shapes: dict
    pretrained: str
    device: torch.device
    state: dict


def _classes_from_data(config, resolved, loaded):
    spec, opts = resolved.data
    dctx = DataContext(transform_train=loaded.preprocess_val, transform_val=loaded.preprocess_val,
                       seed=config.seed, deterministic_train=True)
    bundle = spec.build(opts, dctx)
    return bundle.classnames, tuple(bundle.templates)


def best_checkpoint(run_dir: Path) -> tuple:
    """``(folder, state)`` of a run's ``checkpoint-best/`` (``--best``), or a
    usage error when the run kept none, a runtime error when it is damaged."""
    folder = Path(run_dir) / BEST
    if not folder.exists():
        raise ClipftUsageError(f"--best: {run_dir} kept no best checkpoint ({BEST}/); a run keeps one "
                               "with --keep-best METRIC. Without --best, RUN means its final weights")
    state, why = inspect_checkpoint(folder)
    if state is None:
        raise ClipftUsageError(f"--best: {run_dir}'s best checkpoint is incomplete: {why}")
    damaged = verify_checkpoint(folder, state)
    if damaged:
        raise ClipftError(f"--best: {damaged}")
    return folder, state


def load_run(run_dir, registry=None, device: str = "cpu", best: bool = False) -> LoadedRun:
    """The model of a finished (or checkpointed) run, ready for inference: its
    final weights (the newest checkpoint), or with ``best`` the ones
    ``--keep-best`` kept in ``checkpoint-best/``."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.toml"
    if not cfg_path.is_file():
        raise ClipftUsageError(f"{run_dir} is not a clipft run directory (no config.toml)")
    ck, state = best_checkpoint(run_dir) if best else checkpoint_to_load(run_dir, str(run_dir))
    if ck is None:
        if backup_of(run_dir).exists():
            raise ClipftUsageError(
                f"{run_dir} has no complete checkpoint: an --overwrite of it was interrupted before the new "
                f"run's first checkpoint, and the previous run is kept in {backup_of(run_dir)}; restore it "
                f"with `rm -rf {run_dir} && mv {backup_of(run_dir)} {run_dir}`")
        if (run_dir / CURRENT).is_dir():   # there is one, but it is damaged: say which file
            raise ClipftUsageError(
                f"{run_dir} has no complete checkpoint: {inspect_checkpoint(run_dir / CURRENT)[1]}")
        raise ClipftUsageError(
            f"{run_dir} has no complete checkpoint (checkpoint/state.json); a run writes one at the "
            "end of each epoch")
    if registry is None:
        registry = Registry().load()
    config = RunConfig.from_toml_dict(load_toml(cfg_path), where=str(cfg_path))
    resolved = resolve(config, registry)
    dev = pick_device(device)
    seed_everything(config.seed)
    loaded = load_model(config.model, config.pretrained, device=str(dev))
    if "classnames" in state:
        classnames = state["classnames"]
        templates = tuple(state.get("templates") or ("a photo of a {}.",))
    else:
        classnames, templates = _classes_from_data(config, resolved, loaded)
    # a multi-stage run: every stage up to the checkpoint's, in order
    strategies, before = resolved.stage_strategies(resolved.saved_stage(state))
    built = assemble(loaded.model, model_name=config.model, tokenizer=loaded.tokenizer, device=dev,
                     strategies=strategies, head=resolved.head, classnames=classnames,
                     templates=templates, seed=config.seed, before=before)
    model, head = built.model, built.head
    load_trained_tensors(ck, model, head, dev)
    for m in (model, head):
        if m is not None:
            m.requires_grad_(False)
            m.eval()
    # the weights the run's evaluations used (ema's averages), kept: eval,
    # predict and export see what summary.json's metrics were computed on
    use_eval_weights(model)
    return LoadedRun(run_dir=run_dir, config=config, resolved=resolved, model=model,
                     tokenizer=loaded.tokenizer, preprocess=loaded.preprocess_val, head=head,
                     classnames=classnames, templates=templates, base_shapes=built.base_shapes,
                     pretrained=loaded.pretrained, device=dev, state=state)
