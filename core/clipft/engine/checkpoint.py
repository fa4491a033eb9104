"""Checkpoints: safetensors tensors plus a JSON state, written atomically.

Layout of ``RUN_DIR/checkpoint/``:
- ``model.safetensors``: trainable tensors, buffers of trained modules, and any
  tensor a strategy added or reshaped (the rest comes from the base model);
- ``head.safetensors``: the head's state, when there is a head;
- ``optimizer.safetensors`` + ``state.json``: optimizer and scheduler state, RNG
  states, epoch and step counters, so that ``--resume`` continues exactly.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from clipft.errors import ClipftError

FORMAT_VERSION = 1


def changed_state(model: torch.nn.Module, base_shapes: dict) -> dict:
    """Tensors that differ from the base model: trainable parameters, buffers of
    modules that train, and keys that are new or reshaped."""
    sd = model.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    keep = set(trainable)
    for mname, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            prefix = f"{mname}." if mname else ""
            keep.update(prefix + b for b, _ in module.named_buffers(recurse=False))
    for k, v in sd.items():
        if k not in base_shapes or tuple(base_shapes[k]) != tuple(v.shape):
            keep.add(k)
    return {k: sd[k].detach().contiguous().cpu() for k in sorted(keep) if k in sd}


def _optimizer_tensors(optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, meta = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                meta[f"{pid}.{k}"] = v
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"scalars": meta, "param_groups": groups}


def _restore_optimizer(optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class Checkpointer:
    """Writes and restores ``RUN_DIR/checkpoint`` for one run: the parts it
    saves are handed over when it is built."""

    def __init__(self, run_dir: Path, model, head, base_shapes: dict, optimizer, scheduler, scaler,
                 classnames, templates):
        self.run_dir = Path(run_dir)
        self.model, self.head, self.base_shapes = model, head, base_shapes
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.classnames, self.templates = classnames, templates

    # the loop's epoch_end event
    def epoch_end(self, info, state) -> None:
        self.save(state.epoch, state.step, state.history)

    def save(self, epoch: int, global_step: int, history: list) -> None:
        final = self.run_dir / "checkpoint"
        tmp = self.run_dir / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(changed_state(self.model, self.base_shapes), str(tmp / "model.safetensors"))
        if self.head is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()},
                      str(tmp / "head.safetensors"))
        opt_tensors, opt_meta = _optimizer_tensors(self.optimizer)
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"torch_cuda_{i}"] = s
        save_file({**{f"optim.{k}": v for k, v in opt_tensors.items()},
                   **{f"rng.{k}": v for k, v in rng.items()}},
                  str(tmp / "optimizer.safetensors"))
        np_state = np.random.get_state()
        state = {
            "format": FORMAT_VERSION,
            "epoch": epoch,
            "global_step": global_step,
            "optimizer": opt_meta,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "python_random": _jsonable(random.getstate()),
            "numpy_random": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "history": history,
            "trainable": sorted(n for n, p in self.model.named_parameters() if p.requires_grad),
            # what strategies and heads were built for, so that a run directory can be
            # rebuilt (export, eval, predict) without its data (engine/loadrun.py)
            "classnames": list(self.classnames) if self.classnames else None,
            "templates": list(self.templates),
        }
        (tmp / "state.json").write_text(json.dumps(state, default=_json_default))
        # swap in atomically: a crash leaves either the old or the new checkpoint
        old = self.run_dir / "checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    def restore(self) -> dict:
        """Load the checkpoint into the model, head, optimizer, schedule, scaler
        and the RNGs; returns its state (epoch, global_step, history)."""
        ck = self.run_dir / "checkpoint"
        if not (ck / "state.json").is_file():
            raise ClipftError(f"no checkpoint found in {ck}")
        state = json.loads((ck / "state.json").read_text())
        load_trained_tensors(ck, self.model, self.head, next(self.model.parameters()).device)
        rest = load_file(str(ck / "optimizer.safetensors"))
        opt_t = {k[len("optim."):]: v for k, v in rest.items() if k.startswith("optim.")}
        _restore_optimizer(self.optimizer, opt_t, state["optimizer"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        torch.set_rng_state(rest["rng.torch_cpu"])
        cuda_states = [rest[k] for k in sorted(rest) if k.startswith("rng.torch_cuda_")]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
        random.setstate(_tuplify(state["python_random"]))
        ns = state["numpy_random"]
        np.random.set_state((ns[0], np.array(ns[1], dtype=np.uint32), *ns[2:]))
        return state


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(type(o).__name__)


def _jsonable(state):
    if isinstance(state, tuple):
        return [_jsonable(x) for x in state]
    return state


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def load_trained_tensors(ck: Path, model: torch.nn.Module, head, device) -> None:
    """Load ``model.safetensors`` (and ``head.safetensors``) of a checkpoint
    folder into a model rebuilt from the same config, strategies re-applied."""
    model_t = load_file(str(Path(ck) / "model.safetensors"), device=str(device))
    sd = model.state_dict()
    missing = [k for k in model_t if k not in sd]
    if missing:
        raise ClipftError(f"checkpoint tensors do not fit the rebuilt model: {missing[:5]}")
    model.load_state_dict(model_t, strict=False)
    if head is not None:
        head.load_state_dict(load_file(str(Path(ck) / "head.safetensors"), device=str(device)))
