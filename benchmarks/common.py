"""Shared pieces of the benchmark suite: timing, the machine description, the
result record of a row, and building clipft runs in-process.

Every row compares two things measured in the same process run (side by side,
interleaved where the work allows), so a busy machine slows both sides alike;
medians of repeated measurements are reported next to the ratio.

Rows built from step pairs (``paired_row``) report a conservative headline and
the spread of the pairs, and say when the pairs disagree too much to trust the
headline (``noisy``); see ``paired_stats`` for the definitions.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import platform
import re
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


def quantile(xs, q: float) -> float:
    """The ``q`` quantile (0..1) of ``xs``, linear between order statistics
    (numpy's default method); nan for no values."""
    xs = sorted(x for x in xs if x is not None and x == x)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


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
    #: True when the pairs behind the ratio spread too much to trust it
    #: (``paired_stats``); None for rows that are not built from pairs
    noisy: Optional[bool] = None

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


def _first(pattern: str, text: str) -> Optional[str]:
    m = re.search(pattern, text, re.MULTILINE)
    return m.group(1).strip() if m else None


def torch_build() -> dict:
    """The essentials of ``torch.__config__.show()``: which BLAS and LAPACK the
    wheel was built against, the MKL and oneDNN (mkldnn) versions, OpenMP, and
    the CPU capability ATen dispatches to here (AVX2 / AVX512 / ...)."""
    import torch
    text = torch.__config__.show()
    return {
        "blas": _first(r"BLAS_INFO=([^,\s]+)", text),
        "lapack": _first(r"LAPACK_INFO=([^,\s]+)", text),
        "lapack_enabled": "LAPACK is enabled" in text,
        "mkl": _first(r"Math Kernel Library Version ([^\n]+?) for ", text)
        or _first(r"Math Kernel Library Version ([^\n]+)", text),
        "use_mkl": _first(r"USE_MKL=(\w+)", text),
        "mkldnn": _first(r"(?:MKL-DNN|oneDNN)\s+(v[\w.]+)", text),
        "use_mkldnn": _first(r"USE_MKLDNN=(\w+)", text),
        "openmp": _first(r"OpenMP (\d+)", text),
        "cpu_capability_usage": _first(r"CPU capability usage: (\S+)", text),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def torch_parallel() -> dict:
    """The essentials of ``torch.__config__.parallel_info()``: ATen's parallel
    backend, its intra- and inter-op threads, OpenMP's and MKL's own thread
    counts and the environment variables that set them."""
    import torch
    text = torch.__config__.parallel_info()

    def num(pattern):
        v = _first(pattern, text)
        return int(v) if v is not None and v.isdigit() else v

    return {
        "backend": _first(r"ATen parallel backend: ([^\n]+)", text),
        "intra_op_threads": num(r"at::get_num_threads\(\) : (\S+)"),
        "inter_op_threads": num(r"at::get_num_interop_threads\(\) : (\S+)"),
        "omp_max_threads": num(r"omp_get_max_threads\(\) : (\S+)"),
        "mkl_max_threads": num(r"mkl_get_max_threads\(\) : (\S+)"),
        "OMP_NUM_THREADS": _first(r"OMP_NUM_THREADS : ([^\n]+)", text),
        "MKL_NUM_THREADS": _first(r"MKL_NUM_THREADS : ([^\n]+)", text),
    }


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
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "nproc": {"cpu_count": os.cpu_count(), "affinity": affinity},
        "torch_threads": torch.get_num_threads(),
        "isa": isa,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_build": torch_build(),
        "torch_parallel": torch_parallel(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_start": os.getloadavg(),
    }


def machine_header(info: dict) -> list:
    """A few lines describing the machine, for above the results table."""
    b, p, n = info.get("torch_build", {}), info.get("torch_parallel", {}), info.get("nproc", {})
    load = " ".join(f"{x:.2f}" for x in info.get("load_average_start", ()))
    lines = [
        f"machine: {info.get('cpu')}, nproc {n.get('cpu_count')} (affinity {n.get('affinity')}), "
        f"ISA {' '.join(info.get('isa') or []) or '-'}; torch {info.get('torch')}, python {info.get('python')}",
        f"torch build: BLAS {b.get('blas')}, LAPACK {b.get('lapack')}, MKL {b.get('mkl') or '-'}, "
        f"oneDNN {b.get('mkldnn') or '-'}, OpenMP {b.get('openmp') or '-'}; "
        f"CPU capability {b.get('cpu_capability')}",
        f"threads: ATen backend {p.get('backend')}, intra-op {p.get('intra_op_threads')}, "
        f"inter-op {p.get('inter_op_threads')}, OMP_NUM_THREADS {p.get('OMP_NUM_THREADS')}, "
        f"MKL_NUM_THREADS {p.get('MKL_NUM_THREADS')}; load average at start {load}",
    ]
    if "load_average_end" in info:
        lines[-1] += " / end " + " ".join(f"{x:.2f}" for x in info["load_average_end"])
    return lines


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


def pair_ratios(pairs) -> list:
    """other / clipft over neighbouring steps. The steps ran alternately
    (c1 o1 c2 o2 ...), so each ``o_i`` is compared with the clipft step before
    it and the one after it (2n - 1 ratios for n pairs): robust to load that
    changes during the run, and not biased by which of the two goes first."""
    ratios = []
    for i, (c, o) in enumerate(pairs):
        ratios.append(o / c)
        if i + 1 < len(pairs):
            ratios.append(o / pairs[i + 1][0])
    return ratios


def paired_ratio(pairs) -> float:
    """Median of ``pair_ratios``."""
    return median(pair_ratios(pairs))


#: a paired row is noisy when its 10th or 90th percentile pair ratio lies more
#: than this fraction away from the median pair ratio
NOISY_SPREAD = 0.10


def paired_stats(pairs, target: str) -> dict:
    """The statistics of a row built from (clipft, other) step pairs.

    - ``paired_median``: the median of the neighbouring-step ratios
      (``pair_ratios``); ``ratio_of_medians``: median(other) / median(clipft).
    - ``headline``: the more conservative of the two, i.e. the one less
      favourable to clipft with respect to the target's direction: the smaller
      for a ``>=`` target, the larger for a ``<=`` one. An ``info`` target has no
      direction; its headline is the paired median. ``headline_from`` names it.
    - ``spread``: min, 10th, 25th, 75th, 90th percentile and max of the pair
      ratios (linear interpolation between order statistics).
    - ``noisy``: True when the middle 80% of the pair ratios does not fit in
      +-10% of their median: p10 < 0.9 * median or p90 > 1.1 * median. (With
      fewer than 5 ratios the percentiles are close to min and max, so a short
      row is judged on nearly its extremes.)
    """
    ratios = pair_ratios(pairs)
    pm = median(ratios)
    rom = median([o for _, o in pairs]) / median([c for c, _ in pairs]) if pairs else float("nan")
    op = target.split()[0] if target != "info" else None
    if op == ">=":
        headline, source = (pm, "paired_median") if pm <= rom else (rom, "ratio_of_medians")
    elif op == "<=":
        headline, source = (pm, "paired_median") if pm >= rom else (rom, "ratio_of_medians")
    else:
        headline, source = pm, "paired_median"
    spread = {"min": min(ratios, default=float("nan")), "p10": quantile(ratios, 0.10),
              "p25": quantile(ratios, 0.25), "p75": quantile(ratios, 0.75),
              "p90": quantile(ratios, 0.90), "max": max(ratios, default=float("nan"))}
    noisy = bool(ratios) and (spread["p10"] < (1 - NOISY_SPREAD) * pm or spread["p90"] > (1 + NOISY_SPREAD) * pm)
    return {"headline": headline, "headline_from": source, "paired_median": pm, "ratio_of_medians": rom,
            "spread": spread, "pairs": len(pairs), "ratios": ratios, "noisy": noisy}


def paired_row(pairs, target: str, figures: Optional[dict] = None, **row) -> Row:
    """A Row whose ratio is ``paired_stats``' headline; the figures get the
    paired median, the ratio of medians, which of the two is the headline, the
    spread of the pair ratios (and in JSON every pair ratio), and the row its
    ``noisy`` flag."""
    st = paired_stats(pairs, target)
    figs = {**(figures or {}), "paired_median": st["paired_median"], "ratio_of_medians": st["ratio_of_medians"],
            "headline": st["headline_from"], "pairs": st["pairs"], "pair_ratios": st["spread"],
            "pair_ratio_values": st["ratios"]}
    return Row(ratio=st["headline"], target=target, figures=figs, noisy=st["noisy"], **row)


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
