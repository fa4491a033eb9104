"""Shared pieces of the benchmark suite: timing, the machine description, the
result record of a row, and building clipft runs in-process.

Every row compares two things measured in the same process run (side by side,
interleaved where the work allows), so a busy machine slows both sides alike;
medians of repeated measurements are reported next to the ratio.
"""
from __future__ import annotations

import contextlib
import copy
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import attrs

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def median(xs) -> float:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def now() -> float:
    return time.perf_counter()


@attrs.define
class Row:
    """One line of the results table."""

    id: str
    name: str
    ratio: float
    target: str                      # e.g. ">= 0.97"
    figures: dict                    # the absolute numbers behind the ratio
    note: str = ""
    seconds: float = 0.0

    @property
    def met(self) -> Optional[bool]:
        if self.target == "info":
            return None
        op, value = self.target.split()
        value = float(value)
        if self.ratio != self.ratio:  # nan: not measured
            return None
        return self.ratio >= value if op == ">=" else self.ratio <= value

    def to_json(self) -> dict:
        d = attrs.asdict(self)
        d["met"] = self.met
        return d


def machine() -> dict:
    import torch
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f" {f}" in flags]
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "isa": isa,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_start": os.getloadavg(),
    }


class StepClock:
    """A progress reporter for clipft's train loop that times every step (the
    loop's own step time includes fetching the batch).

    With ``other`` (a callable running one step of the implementation clipft
    is compared with, returning its seconds), that step runs right after each
    clipft step: the two alternate step by step and see the same machine load.
    The time spent in ``other`` is excluded from clipft's figures (``paused``).
    """

    def __init__(self, other=None):
        self.other = other
        self.epochs: list = []
        self.theirs: list = []
        self.paused = 0.0
        self._last = None

    def on_run_start(self, run): ...

    def on_epoch_start(self, epoch, epochs, n_batches):
        self.epochs.append([])
        self._last = now()

    def on_step_end(self, info):
        t = now()
        self.epochs[-1].append(t - self._last)
        if self.other is not None:
            self.theirs.append(self.other())
        self._last = now()
        self.paused += self._last - t

    def on_run_end(self, summary): ...

    def step_times(self, skip: int = 1) -> list:
        """Seconds per clipft step, dropping the first ``skip`` steps of every
        epoch (warm-up: first-touch allocation, oneDNN primitive creation)."""
        return [d for ep in self.epochs for d in ep[skip:]]

    def pairs(self, skip: int = 1) -> list:
        """(clipft step, other step) in the order they ran, warm-ups dropped."""
        ours = [d for ep in self.epochs for d in ep]
        keep = set()
        i = 0
        for ep in self.epochs:
            keep.update(range(i + skip, i + len(ep)))
            i += len(ep)
        return [(ours[j], self.theirs[j]) for j in sorted(keep) if j < len(self.theirs)]


def paired_ratio(pairs) -> float:
    """Median over neighbouring steps of other / clipft. The steps ran
    alternately (c1 o1 c2 o2 ...), so each ``o_i`` is compared with the clipft
    step before it and the one after it: robust to load that changes during
    the run, and not biased by which of the two goes first."""
    ratios = []
    for i, (c, o) in enumerate(pairs):
        ratios.append(o / c)
        if i + 1 < len(pairs):
            ratios.append(o / pairs[i + 1][0])
    return median(ratios)


_MODEL_MEMO: dict = {}


@contextlib.contextmanager
def reuse_models():
    """Build each (model, pretrained) once and hand out deep copies: a
    random-init ViT-B-32 takes seconds to initialise, which the benchmarks
    would otherwise pay again for every configuration. Copies are identical
    to a fresh build with the same seed."""
    import clipft.engine.prepare as runner
    original = runner.load_model

    def memo(name, pretrained, device="cpu"):
        key = (name, pretrained, device)
        if key not in _MODEL_MEMO:
            _MODEL_MEMO[key] = original(name, pretrained, device=device)
        loaded = _MODEL_MEMO[key]
        return attrs.evolve(loaded, model=copy.deepcopy(loaded.model))

    runner.load_model = memo
    try:
        yield
    finally:
        runner.load_model = original


def registry():
    from clipft.api import make_registry
    return make_registry()


def clipft_train(reg, out: Path, other=None, prepared=None, **config):
    """prepare + train a clipft run in-process, with ``other`` interleaved step
    by step (see StepClock); returns (run, stats, clock, clipft's own wall
    seconds of ``train()``: evaluation and checkpoints included, ``other``'s
    steps excluded)."""
    from clipft.config import RunConfig
    from clipft.engine.prepare import prepare
    from clipft.engine.session import train_run as train

    cfg = RunConfig(**{"pretrained": "none", "device": "cpu", **config})
    run = prepared or prepare(cfg, reg)
    out.mkdir(parents=True, exist_ok=True)
    clock = StepClock(other)
    t0 = now()
    stats = train(run, out, clock)
    return run, stats, clock, now() - t0 - clock.paused


def prepared_run(reg, **config):
    from clipft.config import RunConfig
    from clipft.engine.prepare import prepare
    return prepare(RunConfig(**{"pretrained": "none", "device": "cpu", **config}), reg)


def python_exe() -> str:
    return sys.executable


def run_child(args: list, timeout: float, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)


def peak_rss_mb() -> float:
    """Peak resident memory of this process's own address space (clipft's
    summary figure; ru_maxrss would include the parent's size at fork)."""
    from clipft.engine.session import peak_rss_mb as clipft_peak_rss_mb
    return clipft_peak_rss_mb()


def fmt(x, digits: int = 3) -> str:
    if isinstance(x, float):
        if x != x:
            return "n/a"
        return f"{x:.{digits}g}"
    return str(x)


@contextlib.contextmanager
def steps_only():
    """For rows that measure step throughput: skip clipft's per-epoch
    evaluation and checkpoint writing (neither is part of a step, and a full
    ViT-B-32 checkpoint with AdamW state is 1.8 GB to write)."""
    from clipft.engine.checkpoint import Checkpointer
    from clipft.engine.evaluate import Evaluator
    saved = Evaluator.__call__, Checkpointer.save
    Evaluator.__call__ = lambda self: {}
    Checkpointer.save = lambda *a, **k: None
    try:
        yield
    finally:
        Evaluator.__call__, Checkpointer.save = saved


class ClipftEpochs:
    """A clipft run prepared once whose epochs are trained one at a time
    (``steps + 1`` batches each, the first one a warm-up), so that its steps can
    be interleaved with another implementation's."""

    def __init__(self, reg, work: Path, rounds: int, steps: int, batch_size: int, **config):
        from clipft.config import RunConfig
        from clipft.engine.loop import LoopState
        from clipft.engine.prepare import prepare

        n = batch_size * (steps + 1)
        self.cfg = RunConfig(**{"pretrained": "none", "device": "cpu", "epochs": rounds,
                                "batch_size": batch_size,
                                "data": f"shapes:n={n},val_n={batch_size}", **config})
        self.run = prepare(self.cfg, reg)
        self.out = work
        self.out.mkdir(parents=True, exist_ok=True)
        self.epoch, self.state = 0, LoopState()

    def round(self, other=None) -> StepClock:
        """Train the next epoch; ``other`` runs after every clipft step (see StepClock)."""
        from clipft.engine.session import train_run
        clock = StepClock(other)
        self.run.config.epochs = self.epoch + 1
        with steps_only():
            self.state = train_run(self.run, self.out, clock, state=self.state)
        self.epoch += 1
        return clock
