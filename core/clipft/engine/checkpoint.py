"""Checkpoints: safetensors tensors plus a JSON state, written crash-safely.

Layout of a checkpoint folder:
- ``model.safetensors``: trainable tensors, buffers of trained modules, and any
  tensor a strategy added or reshaped (the rest comes from the base model);
- ``head.safetensors``: the head's state, when there is a head;
- ``loss.safetensors``: the state of a loss with parameters of its own
  (:class:`clipft.Loss`, e.g. ``siglip``'s bias on a model without one);
- ``optimizer.safetensors`` + ``state.json``: optimizer, scheduler and grad
  scaler state, RNG states, and where training is (epoch, step, position in the
  epoch, counters, the number of ``metrics.jsonl`` rows), so that ``--resume``
  continues exactly, also from the middle of an epoch.

Under ``--parallel fsdp`` a checkpoint taken while training goes on holds
``shards/`` (a torch.distributed.checkpoint save of the model and optimizer,
one file per rank) and ``rng.safetensors`` instead of the model and optimizer
files; the run's last checkpoint is gathered into the files above.

``checkpoint/`` is the newest complete checkpoint, older ones sit beside it as
``checkpoint-step00000120/`` and ``--keep-best``'s as ``checkpoint-best/`` (never a
``--resume`` candidate). How a write stays crash-safe is in docs/usage.md: a
temporary folder, every file fsynced, ``state.json`` last (it lists the other files
and their sizes, which is what makes a folder "complete"), then renames.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from clipft import atomic
from clipft.engine.optim import kept_impl
from clipft.errors import ClipftError, ClipftUsageError

FORMAT = "clipft-checkpoint"
FORMAT_VERSION = 2
CURRENT = "checkpoint"
#: ``--keep-best``: the checkpoint with the best value of a val metric; never
#: one that resume or ``newest_complete`` picks (it may be older than others)
BEST = "checkpoint-best"
STEP_PREFIX = "checkpoint-step"
#: how a checkpoint's temporary folders start (clipft.atomic's name for ``checkpoint``)
TMP_PREFIX = f".{CURRENT}.tmp-"
#: the state of a loss that has parameters of its own (clipft.Loss)
LOSS_FILE = "loss.safetensors"
#: ``--parallel fsdp``, a checkpoint taken during training: the folder of the
#: torch.distributed.checkpoint save (model and optimizer, one file per rank)
SHARDS_DIR = "shards"
#: beside the shards: the RNG states (rank 0's, as in ``optimizer.safetensors``)
RNG_FILE = "rng.safetensors"


def is_sharded(state) -> bool:
    """Whether a checkpoint's state says it was written as shards (no ``model.safetensors``)."""
    return isinstance(state, dict) and isinstance(state.get("sharded"), dict)


def read_state(folder: Path):
    """The state of a *complete* checkpoint folder, or None: ``state.json``
    parses, is clipft's, and every file it lists is there with its size."""
    return inspect_checkpoint(folder)[0]


def inspect_checkpoint(folder: Path) -> tuple:
    """``(state, None)`` for a complete checkpoint folder, else ``(None, why)``
    with what is wrong, naming the file (for messages; :func:`read_state` is
    the predicate)."""
    folder = Path(folder)
    path = folder / "state.json"
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None, f"{path} is missing"
    except OSError as exc:
        return None, f"{path} cannot be read ({exc.strerror or exc})"
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"{path} is corrupt (not valid JSON: {str(exc).splitlines()[0][:120]})"
    if not isinstance(state, dict):
        return None, f"{path} is corrupt (a JSON {type(state).__name__}, not an object)"
    if state.get("format") == 1 and "global_step" in state:   # written before FORMAT_VERSION 2
        return state, None
    if state.get("format") != FORMAT or not isinstance(state.get("files"), dict):
        return None, f"{path} is not a clipft checkpoint state (no format/files)"
    for name, size in state["files"].items():
        f = folder / name
        if not f.is_file():
            return None, f"{f} is missing (state.json lists it)"
        if f.stat().st_size != size:
            return None, f"{f} is {f.stat().st_size} bytes, state.json says {size}: incomplete or corrupt"
    return state, None


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in 8 MiB blocks (hashlib releases the GIL on
    them). Just after a checkpoint is written the bytes are in the page cache,
    so this costs a read of memory, not of the disk: docs/performance.md has
    the figure for ViT-B-32."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def verify_checkpoint(folder: Path, state: dict):
    """None when every file of a complete checkpoint matches the SHA-256 its
    ``state.json`` recorded, else what is damaged, naming the file. (Sizes are
    checked by :func:`inspect_checkpoint`; a checksum finds damage that keeps
    the size, such as flipped bytes. Checkpoints written before checksums
    were recorded pass on their sizes.)"""
    digests = state.get("sha256")
    if not isinstance(digests, dict):
        return None
    for name, digest in sorted(digests.items()):
        f = Path(folder) / name
        try:
            if file_digest(f) != digest:
                return f"{f} does not match the checksum state.json recorded for it: the file is damaged"
        except OSError as exc:
            return f"{f} cannot be read ({exc.strerror or exc})"
    return None


def newest_intact(run_dir: Path) -> tuple:
    """``(folder, state, damaged)``: the newest complete checkpoint whose files
    match their checksums, or ``(None, None, damaged)``; ``damaged`` lists the
    newer ``(folder, why)`` passed over, for the caller to warn about (or to
    name, when nothing is intact)."""
    damaged = []
    for folder, state in sorted(_complete(run_dir), key=lambda fs: _order(fs[1]), reverse=True):
        why = verify_checkpoint(folder, state)
        if why is None:
            return folder, state, damaged
        damaged.append((folder, why))
    return None, None, damaged


def checkpoint_to_load(run_dir: Path, what: str, warn=None) -> tuple:
    """``(folder, state)`` of the checkpoint a command loads (``what`` names it
    in messages: ``--resume RUN``, ``RUN``): the newest complete one whose files
    match their checksums. A newer damaged one is passed over with a warning;
    when every complete checkpoint is damaged, a runtime error (exit 1) names
    the file. ``(None, None)`` when there is no complete checkpoint at all."""
    folder, state, damaged = newest_intact(run_dir)
    if folder is None and damaged:
        raise ClipftError(f"{what}: no intact checkpoint: {damaged[0][1]}"
                          + (f" (and {len(damaged) - 1} older damaged)" if len(damaged) > 1 else ""))
    for bad, why in damaged:
        message = f"{why}; using {folder.name}, the newest intact checkpoint"
        if warn is not None:
            warn(message)
        else:
            print(f"warning: {message}", file=sys.stderr)
    return folder, state


def _order(state) -> tuple:
    return (int(state.get("global_step", 0)), int(state.get("epoch", 0)))


def candidates(run_dir: Path) -> list:
    """Folders that may hold a checkpoint, newest naming first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return [run_dir / CURRENT] + sorted(
        (p for p in run_dir.iterdir() if p.name.startswith((STEP_PREFIX, TMP_PREFIX)) and p.is_dir()),
        reverse=True)


def _complete(run_dir: Path) -> list:
    return [(f, s) for f in candidates(run_dir) if (s := read_state(f)) is not None]


def newest_complete(run_dir: Path):
    """``(folder, state)`` of the newest complete checkpoint in ``run_dir``
    (by step), or ``(None, None)``."""
    return max(_complete(run_dir), key=lambda fs: _order(fs[1]), default=(None, None))


def changed_keys(model: torch.nn.Module, base_shapes: dict) -> set:
    """Keys of the tensors that differ from the base model: trainable
    parameters, buffers of modules that train, and keys that are new or reshaped."""
    sd = model.state_dict()
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    for mname, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            prefix = f"{mname}." if mname else ""
            keep.update(prefix + b for b, _ in module.named_buffers(recurse=False))
    for k, v in sd.items():
        if k not in base_shapes or tuple(base_shapes[k]) != tuple(v.shape):
            keep.add(k)
    return {k for k in keep if k in sd}


def changed_state(model: torch.nn.Module, base_shapes: dict, also=()) -> dict:
    """The tensors of :func:`changed_keys`, plus the keys ``also`` (what earlier
    stages of a multi-stage run trained)."""
    sd = model.state_dict()
    keep = changed_keys(model, base_shapes) | {k for k in also if k in sd}
    return _cpu({k: sd[k] for k in sorted(keep)})


def _cpu(tensors: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def _rng_tensors() -> dict:
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    return rng


#: safetensors' names of torch dtypes (its format's ``dtype`` field)
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL"}


def stream_safetensors(path, entries: list) -> None:
    """Write a safetensors file one tensor at a time: ``entries`` is
    ``[(key, like, make)]``, ``like`` giving the shape and dtype (known before
    the tensor is), ``make()`` the CPU tensor. The header comes first (8-byte
    little-endian length, JSON, space-padded to 8 bytes), then each tensor's
    bytes in order, the format ``safetensors.torch.load_file`` reads. With
    ``path`` None nothing is written but every ``make()`` is still called (a
    rank that only takes part in gathering). A failed write stops writing, not
    making: the other ranks' collectives still find this one, and the error
    is raised after."""
    import struct
    header, offset = {}, 0
    for key, like, _ in entries:
        n = like.numel() * like.element_size()
        header[key] = {"dtype": _ST_DTYPES[like.dtype], "shape": list(like.shape),
                       "data_offsets": [offset, offset + n]}
        offset += n
    f, failure = None, None
    if path is not None:
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        try:
            f = open(path, "wb")
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
        except OSError as exc:
            failure = exc
    try:
        for key, like, make in entries:
            t = make()
            if f is not None and failure is None:
                try:
                    f.write(t.reshape(-1).view(torch.uint8).numpy().data)
                except OSError as exc:
                    failure = exc
            del t
    finally:
        if f is not None:
            f.close()
    if failure is not None:
        raise failure


def _optimizer_tensors(optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, meta = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                meta[f"{pid}.{k}"] = v
    return tensors, {"scalars": meta, "param_groups": [dict(g) for g in sd["param_groups"]]}


def _check_groups(optimizer, saved_groups: list, folder: Path) -> None:
    """The checkpoint's optimizer groups hold as many tensors as this run's, or
    a usage error that shows both (torch's own error names neither)."""
    saved = [len(g["params"]) for g in saved_groups]
    if saved == [len(g["params"]) for g in optimizer.param_groups]:
        return
    def show(groups):
        return ", ".join(f"{g.get('name', i)} {len(g['params'])}" for i, g in enumerate(groups))
    raise ClipftUsageError(
        f"{folder}'s optimizer trained other tensors than this run would (groups: {show(saved_groups)}; "
        f"this run: {show(optimizer.param_groups)}), so it cannot resume (a run started with a clipft "
        "that still trained text towers nothing used, say); evaluate or export it as it is, or start it again")


def _restore_optimizer(optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, v in {**tensors, **meta["scalars"]}.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    optimizer.load_state_dict({"state": state, "param_groups": kept_impl(optimizer, meta["param_groups"])})


def _write_failure(exc: BaseException) -> bool:
    """An error of the file system under a checkpoint write (a full disk, say):
    ``OSError`` from Python, ``SafetensorError`` from safetensors, torch.save's
    ``RuntimeError`` from its stream writer."""
    from safetensors import SafetensorError
    from torch.distributed.checkpoint.api import CheckpointException
    if isinstance(exc, (OSError, SafetensorError, CheckpointException)):
        return True
    return isinstance(exc, RuntimeError) and "writ" in str(exc).lower()


class Checkpointer:
    """Writes and restores the checkpoints of one run: the parts it saves are
    handed over when it is built."""

    def __init__(self, run_dir: Path, model, head, base_shapes: dict, optimizer, scheduler, scaler,
                 classnames, templates, keep: int = 1, loss=None, also=(), sharding=None,
                 writes: bool = True, epochs=None):
        self.run_dir = Path(run_dir)
        self.model, self.head, self.base_shapes = model, head, base_shapes
        #: a loss with a state of its own (a module: clipft.Loss), saved as loss.safetensors
        self.loss = loss if isinstance(loss, torch.nn.Module) and loss.state_dict() else None
        #: keys earlier stages trained, saved although this stage keeps them frozen
        self.also = frozenset(also)
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.classnames, self.templates = classnames, templates
        self.keep = max(1, int(keep))
        #: (step, epoch, batch) of the last checkpoint written, so one point is saved once
        self.last_saved = None
        #: ``--parallel fsdp`` (``clipft.engine.fsdp.Sharding``): the model's tensors
        #: are gathered whole by every rank, and written by the one that ``writes``
        self.sharding = sharding
        self.writes = writes
        #: the run's epochs: under FSDP a checkpoint before the end of the last
        #: one is written as shards, the one that ends training gathered whole
        self.epochs = epochs

    def _as_shards(self, loop: dict) -> bool:
        """Whether the checkpoint of ``loop`` is written as shards: under FSDP,
        while training goes on (the run's last checkpoint, the one ``eval``,
        ``predict`` and ``export`` read, is gathered whole)."""
        return (self.sharding is not None and self.epochs is not None and loop["epoch"] < self.epochs
                and not loop.get("stopped_early"))

    def _resharded(self) -> None:
        """Every FSDP unit back to its shards: after a forward without backward
        (an evaluation) the root unit keeps its whole parameters registered,
        which are not the ones the optimizer steps."""
        for unit in self.sharding.units:
            unit.reshard()

    def _holder(self) -> torch.nn.Module:
        """The modules whose parameters the optimizer steps, under one root, so
        that torch.distributed.checkpoint names each optimizer state by its
        parameter's name (``model.visual...``, ``head.weight``)."""
        parts = {"model": self.model}
        if self.head is not None:
            parts["head"] = self.head
        if isinstance(self.loss, torch.nn.Module):
            parts["loss"] = self.loss
        return torch.nn.ModuleDict(parts)

    def _sharded_model_state(self) -> dict:
        """This rank's shards of the tensors ``model.safetensors`` would hold
        (DTensors; what every rank holds whole, plain tensors)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=False))
        keep = changed_keys(self.model, self.base_shapes) | {k for k in self.also if k in sd}
        return {k: sd[k] for k in sorted(keep)}

    def _save_shards(self, folder: Path) -> None:
        """Every rank writes its shards of the model and optimizer into
        ``folder/shards`` (a collective: it returns once every rank's file and
        the metadata are written)."""
        from torch.distributed.checkpoint import FileSystemWriter, save
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        self._resharded()
        optim = get_optimizer_state_dict(self._holder(), self.optimizer,
                                         options=StateDictOptions(full_state_dict=False))
        save({"model": self._sharded_model_state(), "optim": optim},
             storage_writer=FileSystemWriter(str(Path(folder) / SHARDS_DIR)))

    def _load_shards(self, folder: Path, optimizer: bool) -> None:
        """Read this rank's shards of a sharded checkpoint into the model (and
        the optimizer): a collective, every rank calls it."""
        from torch.distributed.checkpoint import FileSystemReader, load
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                             set_model_state_dict, set_optimizer_state_dict)
        reader = FileSystemReader(str(Path(folder) / SHARDS_DIR))
        self._resharded()
        model_sd = self._sharded_model_state()
        load({"model": model_sd}, storage_reader=reader)
        set_model_state_dict(self.model, model_sd, options=StateDictOptions(strict=False))
        if optimizer:
            holder = self._holder()
            # the optimizer's state is made (a step of lr 0 on zero gradients) to be loaded into
            optim = get_optimizer_state_dict(holder, self.optimizer, options=StateDictOptions(full_state_dict=False))
            load({"optim": optim}, storage_reader=FileSystemReader(str(Path(folder) / SHARDS_DIR)))
            set_optimizer_state_dict(holder, self.optimizer, optim, options=StateDictOptions(full_state_dict=False))

    def _model_entries(self) -> list:
        """``[(key, tensor, whole)]`` of ``model.safetensors`` under FSDP:
        ``whole()`` gathers the tensor whole onto the CPU (a collective)."""
        sd = self.model.state_dict()
        keep = changed_keys(self.model, self.base_shapes) | {k for k in self.also if k in sd}
        full = self.sharding.full
        return [(k, sd[k], lambda v=sd[k]: full(v).detach().contiguous().cpu()) for k in sorted(keep)]

    def _optimizer_entries(self) -> tuple:
        """``(entries, meta)`` of ``optimizer.safetensors`` under FSDP, as
        :meth:`_model_entries`, with the RNG states."""
        sd = self.optimizer.state_dict()
        full = self.sharding.full
        entries, scalars = [], {}
        for pid in sorted(sd["state"]):     # one order on every rank: ``full`` is a collective
            st = sd["state"][pid]
            for k in sorted(st):
                v = st[k]
                if torch.is_tensor(v):
                    entries.append((f"optim.{pid}.{k}", v, lambda v=v: full(v).detach().contiguous().cpu()))
                else:
                    scalars[f"{pid}.{k}"] = v
        for k, v in _rng_tensors().items():
            entries.append((f"rng.{k}", v, lambda v=v: v))
        return entries, {"scalars": scalars, "param_groups": [dict(g) for g in sd["param_groups"]]}

    def _optimizer_shard(self):
        """Under FSDP, ``(key, whole tensor) -> this rank's shard`` for the
        optimizer file's tensors of sharded parameters, applied as each is read
        (a rank never holds the whole optimizer state); else None."""
        if self.sharding is None:
            return None
        params = [p for g in self.optimizer.param_groups for p in g["params"]]

        def shard(key: str, t: torch.Tensor) -> torch.Tensor:
            if not key.startswith("optim."):
                return t
            pid = int(key.split(".")[1])
            like = params[pid] if pid < len(params) else None
            if like is None or not t.ndim or tuple(t.shape) != tuple(like.shape):
                return t
            return self.sharding.local(t, like)
        return shard

    def _take_part(self) -> None:
        """A rank that does not write (``--parallel fsdp``): its part of the
        gathering, each whole tensor dropped as soon as it is made."""
        stream_safetensors(None, self._model_entries())
        stream_safetensors(None, self._optimizer_entries()[0])

    def _write(self, folder: Path, loop: dict, history: list, extra: dict, sharded: bool = False) -> None:
        """The checkpoint's files into ``folder``, ``state.json`` last. ``sharded``:
        the model and optimizer are in :data:`SHARDS_DIR` already (every rank
        wrote its part), so only the rest is written here."""
        if sharded:
            pass
        elif self.sharding is not None:
            # one whole tensor at a time: gathering the whole state at once would
            # hold more on the writing rank than a DDP replica does
            stream_safetensors(folder / "model.safetensors", self._model_entries())
        else:
            save_file(changed_state(self.model, self.base_shapes, self.also), str(folder / "model.safetensors"))
        if self.head is not None:
            save_file(_cpu(self.head.state_dict()), str(folder / "head.safetensors"))
        if self.loss is not None:
            save_file(_cpu(self.loss.state_dict()), str(folder / LOSS_FILE))
        if sharded:
            save_file(_rng_tensors(), str(folder / RNG_FILE))
            groups = self.optimizer.state_dict()["param_groups"]
            opt_meta = {"scalars": {}, "param_groups": [dict(g) for g in groups]}
            extra = {**extra, "sharded": {"format": "torch.distributed.checkpoint", "dir": SHARDS_DIR,
                                          "world_size": self.sharding.world}}
        elif self.sharding is not None:
            entries, opt_meta = self._optimizer_entries()
            stream_safetensors(folder / "optimizer.safetensors", entries)
        else:
            opt_tensors, opt_meta = _optimizer_tensors(self.optimizer)
            save_file({**{f"optim.{k}": v for k, v in opt_tensors.items()},
                       **{f"rng.{k}": v for k, v in _rng_tensors().items()}},
                      str(folder / "optimizer.safetensors"))
        files, digests = {}, {}
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            atomic.fsync_file(f)
            name = f.relative_to(folder).as_posix()
            files[name] = f.stat().st_size
            digests[name] = file_digest(f)
        for d in (p for p in folder.iterdir() if p.is_dir()):
            atomic.fsync_dir(d)
        np_state = np.random.get_state()
        state = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "epoch": loop["epoch"],
            "global_step": loop["step"],
            "loop": loop,
            "files": files,
            "sha256": digests,
            "optimizer": opt_meta,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "python_random": random.getstate(),   # json writes its tuples as lists
            "numpy_random": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "history": history,
            "trainable": sorted(n for n, p in self.model.named_parameters() if p.requires_grad),
            # what strategies and heads were built for, so that a run directory can be
            # rebuilt (export, eval, predict) without its data (engine/loadrun.py)
            "classnames": list(self.classnames) if self.classnames else None,
            "templates": list(self.templates),
            **extra,
        }
        with open(folder / "state.json", "w") as f:
            f.write(json.dumps(state, default=_json_default))
            f.flush()
            os.fsync(f.fileno())
        atomic.fsync_dir(folder)

    def save_best(self, loop: dict, history: list, extra: dict | None = None) -> Path:
        """Write a checkpoint of ``loop`` as ``checkpoint-best/`` (same files,
        same crash safety: the previous best stays until the new one is
        complete); the current checkpoint and its schedule are untouched."""
        if not self.writes:
            self._take_part()
            return None
        tmp = self._write_temp(BEST, loop, history, extra)
        best = self.run_dir / BEST
        old = None
        if best.is_dir():
            old = self.run_dir / atomic.temp_name(BEST)
            os.replace(best, old)
        os.replace(tmp, best)
        atomic.fsync_dir(self.run_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return best

    def _raise_write_failure(self, exc: BaseException) -> None:
        """Re-raise what stopped a checkpoint's write: a disk-side failure as a
        ClipftError naming the checkpoint still in place, anything else as it is."""
        if not _write_failure(exc):
            raise exc
        previous = CURRENT if (self.run_dir / CURRENT).is_dir() else "none yet"
        raise ClipftError(
            f"could not write a checkpoint in {self.run_dir}: {getattr(exc, 'strerror', None) or exc} "
            f"(the previous checkpoint is intact: {previous})") from exc

    def _write_temp(self, name: str, loop: dict, history: list, extra) -> Path:
        # not atomic.building_dir: once written, the folder is a complete checkpoint,
        # which a failed swap must leave behind (newest_complete finds it)
        tmp = None
        try:
            tmp = atomic.make_temp_dir(self.run_dir / name)
            self._write(tmp, loop, history, extra or {})
        except BaseException as exc:
            # a half-written folder never stays behind, whatever stopped the write
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            self._raise_write_failure(exc)
        return tmp

    def _shared_temp(self, name: str, loop: dict, history: list, extra) -> Path:
        """A sharded checkpoint's temporary folder, written by every rank: rank 0
        makes it and tells the others its name; every rank writes its shards
        into it, then rank 0 the rest, ``state.json`` last. On a failure rank 0
        removes it: a half-written folder never stays behind."""
        import torch.distributed as dist
        tmp, made = None, [None]
        if self.writes:
            try:
                tmp = atomic.make_temp_dir(self.run_dir / name)
                made[0] = str(tmp)
            except OSError as exc:
                made[0] = f"error: {exc.strerror or exc}"
        dist.broadcast_object_list(made, src=0)
        if not Path(made[0]).is_absolute():
            raise ClipftError(f"could not write a checkpoint in {self.run_dir}: {made[0]}")
        tmp = Path(made[0])
        try:
            self._save_shards(tmp)
            if self.writes:
                self._write(tmp, loop, history, extra or {}, sharded=True)
        except BaseException as exc:
            if self.writes:
                shutil.rmtree(tmp, ignore_errors=True)
            self._raise_write_failure(exc)
        return tmp

    def save(self, loop: dict, history: list, extra: dict | None = None) -> Path:
        """Write a checkpoint of ``loop`` (:meth:`LoopState.counters`) and make it
        the current one; returns its folder (None on a rank that does not write)."""
        if self._as_shards(loop):
            tmp = self._shared_temp(CURRENT, loop, history, extra)
            if not self.writes:
                self.last_saved = (loop["step"], loop["epoch"], loop["batch"])
                return None
        elif not self.writes:
            self._take_part()
            self.last_saved = (loop["step"], loop["epoch"], loop["batch"])
            return None
        else:
            tmp = self._write_temp(CURRENT, loop, history, extra)
        current = self.run_dir / CURRENT
        old = read_state(current) if current.is_dir() else None
        if current.is_dir():
            if old is not None and self.keep > 1:
                aside = self.run_dir / f"{STEP_PREFIX}{_order(old)[0]:08d}"
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(current, aside)
            else:
                # not kept: set aside under a temporary name, dropped once the new one is in
                os.replace(current, self.run_dir / atomic.temp_name(CURRENT))
        os.replace(tmp, current)
        atomic.fsync_dir(self.run_dir)
        self._prune()
        self.last_saved = (loop["step"], loop["epoch"], loop["batch"])
        return current

    def _prune(self) -> None:
        for p in self.run_dir.iterdir():
            if p.name.startswith(TMP_PREFIX) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
        kept = sorted((p for p in self.run_dir.iterdir() if p.name.startswith(STEP_PREFIX)), reverse=True)
        for p in kept[self.keep - 1:]:
            shutil.rmtree(p, ignore_errors=True)

    def restore_weights(self, folder: Path) -> dict:
        """Load only the tensors of a checkpoint folder (model, head, loss), not
        the optimizer, schedule or RNG: how the next stage of a multi-stage run
        starts from the checkpoint that ended the previous one. Returns its state."""
        state = read_state(folder)
        if state is None:
            raise ClipftError(f"{folder} is not a complete checkpoint")
        if is_sharded(state) and self.sharding is not None:
            self._load_shards(folder, optimizer=False)
            _load_head(folder, self.head, _device_of(self.model))
        else:
            load_trained_tensors(folder, self.model, self.head, _device_of(self.model),
                                 local=self.sharding.local if self.sharding is not None else None)
        if self.loss is not None:
            path = Path(folder) / LOSS_FILE
            try:
                self.loss.load_state_dict(_read_tensors(path, _device_of(self.model)))
            except RuntimeError as exc:
                raise ClipftUsageError(f"{path} does not fit the run's loss: "
                                       f"{str(exc).splitlines()[0][:200]}") from None
        return state

    def restore(self, folder: Path) -> dict:
        """Load a checkpoint folder into the model, head, optimizer, schedule
        and scaler; returns its state, with ``restore_rng``, a function that puts
        the RNG states back (the loop calls it at the point they were saved)."""
        state = self.restore_weights(folder)
        _check_groups(self.optimizer, state["optimizer"]["param_groups"], folder)
        if is_sharded(state) and self.sharding is not None:
            self._load_shards(folder, optimizer=True)
            rest = {f"rng.{k}": v for k, v in _read_tensors(folder / RNG_FILE, "cpu").items()}
        else:
            rest = _read_tensors(folder / "optimizer.safetensors", "cpu", self._optimizer_shard())
            opt_t = {k[len("optim."):]: v for k, v in rest.items() if k.startswith("optim.")}
            _restore_optimizer(self.optimizer, opt_t, state["optimizer"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])

        def restore_rng(gens=(torch.default_generator, random, np.random)):
            torch_gen, py_gen, np_gen = gens
            torch_gen.set_state(rest["rng.torch_cpu"])
            cuda_states = [rest[k] for k in sorted(rest) if k.startswith("rng.torch_cuda_")]
            if cuda_states and torch.cuda.is_available() and torch_gen is torch.default_generator:
                torch.cuda.set_rng_state_all(cuda_states)
            py_gen.setstate(_tuplify(state["python_random"]))
            ns = state["numpy_random"]
            np_gen.set_state((ns[0], np.array(ns[1], dtype=np.uint32), *ns[2:]))

        try:   # on scratch generators first: a bad state is refused before the run changes anything
            restore_rng((torch.Generator(), random.Random(), np.random.RandomState()))
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, OverflowError) as exc:
            raise ClipftUsageError(
                f"{folder / 'state.json'} is corrupt: its random-number states cannot be restored "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
                f"{_older_checkpoints_hint(folder)}") from None

        state["restore_rng"] = restore_rng
        loop = state.get("loop") or {"epoch": state["epoch"], "step": state["global_step"], "batch": 0}
        self.last_saved = (loop["step"], loop["epoch"], loop.get("batch", 0))
        return state


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    raise TypeError(type(o).__name__)


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def _older_checkpoints_hint(ck: Path) -> str:
    older = sorted((p.name for p in Path(ck).parent.glob(f"{STEP_PREFIX}*") if read_state(p) is not None),
                   reverse=True)
    if not older or Path(ck).name != CURRENT:
        return ""
    return f"; move {ck} aside to fall back to {older[0]}, the newest older checkpoint"


def _read_tensors(path: Path, device, each=None) -> dict:
    """A checkpoint's safetensors file, or a usage error saying it is corrupt.
    ``each(key, tensor)``: what to keep of each tensor, applied as it is read."""
    from safetensors import SafetensorError
    try:
        if each is not None:
            from safetensors import safe_open
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                return {k: each(k, f.get_tensor(k)) for k in f.keys()}
        return load_file(str(path), device=str(device))
    except FileNotFoundError:
        raise ClipftUsageError(f"checkpoint file {path} is missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ClipftUsageError(
            f"checkpoint file {path} is corrupt: not a readable safetensors file "
            f"({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})"
            f"{_older_checkpoints_hint(path.parent)}") from None


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def load_trained_tensors(ck: Path, model: torch.nn.Module, head, device, local=None) -> None:
    """Load ``model.safetensors`` (and ``head.safetensors``) of a checkpoint
    folder into a model rebuilt from the same config, strategies re-applied.
    A file that does not read, or does not fit, is a usage error naming it.
    ``local(full, like)``: this rank's shard of a tensor of a sharded model."""
    path = Path(ck) / "model.safetensors"
    sd = model.state_dict()
    if not path.exists() and (Path(ck) / SHARDS_DIR / ".metadata").is_file():
        model_t = _read_shards_whole(Path(ck) / SHARDS_DIR, sd, device)
    else:
        model_t = _read_tensors(path, device)
    missing = [k for k in model_t if k not in sd]
    misshapen = [k for k in model_t if k in sd and tuple(sd[k].shape) != tuple(model_t[k].shape)]
    if missing or misshapen:
        raise ClipftUsageError(
            f"checkpoint tensors in {path} do not fit the model rebuilt from the run's config: "
            f"{(missing or misshapen)[:5]}")
    if local is not None:
        model_t = {k: local(v, sd[k]) for k, v in model_t.items()}
    model.load_state_dict(model_t, strict=False)
    _load_head(ck, head, device)


def _read_shards_whole(folder: Path, sd: dict, device) -> dict:
    """The model tensors of a sharded checkpoint read whole by one process (no
    process group: torch.distributed.checkpoint puts every rank's shard of a
    tensor into one tensor of its full shape), for ``eval``, ``predict`` and
    ``export`` of a run whose newest checkpoint was taken during training."""
    from torch.distributed.checkpoint import FileSystemReader, load
    try:
        reader = FileSystemReader(str(folder))
        keys = [k[len("model."):] for k in reader.read_metadata().state_dict_metadata if k.startswith("model.")]
        missing = [k for k in keys if k not in sd]
        if missing:
            raise ClipftUsageError(f"checkpoint tensors in {folder} do not fit the model rebuilt from the "
                                   f"run's config: {missing[:5]}")
        out = {k: torch.empty_like(sd[k], device="cpu") for k in keys}
        import warnings
        with warnings.catch_warnings():   # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            load({"model": out}, storage_reader=reader, no_dist=True)
    except ClipftUsageError:
        raise
    except Exception as exc:   # torch.distributed.checkpoint raises its own kinds for a damaged file
        raise ClipftUsageError(f"the sharded checkpoint in {folder} cannot be read "
                               f"({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})"
                               f"{_older_checkpoints_hint(folder.parent)}") from None
    return {k: v.to(device) for k, v in out.items()}


def _load_head(ck: Path, head, device) -> None:
    if head is not None:
        path = Path(ck) / "head.safetensors"
        try:
            head.load_state_dict(_read_tensors(path, device))
        except RuntimeError as exc:
            raise ClipftUsageError(
                f"{path} does not fit the head rebuilt from the run's config: "
                f"{str(exc).splitlines()[0][:200]}") from None
