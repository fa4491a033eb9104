"""One short GPU check (``benchmarks/gpu_check.sh``), one table at the end:

- steps/s and model FLOPs utilisation (MFU) of clipft's training step for
  ViT-B-32 and ViT-L-14 with ``full`` and ``lora`` at bf16;
- the frozen-tower probe (head only, towers cached);
- large-batch accumulation (``--grad-accum K`` under the contrastive loss,
  ``clipft.engine.accumulate``): effective batch 1024 as 8 micro-batches of 128
  against one batch of 1024 (reported "OOM" where it does not fit), ViT-B-32
  and ViT-L-14 ``full`` bf16: peak GPU memory and step time, and their ratios;
- a 1-process torchrun run, and a 2-process ``--parallel fsdp`` run (skipped,
  with the reason, on fewer than 2 GPUs or where the CLI lacks the flag).

Random-init weights (``--pretrained none``), nothing is downloaded: speed and
memory do not depend on the values. FLOPs per step are counted by
``torch.utils.flop_counter`` on one real step; MFU divides the achieved FLOP/s
by ``PEAK_TFLOPS`` (default 989, an H100/H200's dense bf16 peak).

Time (one H100, the limit is 8 minutes; every case runs under its own time
limit and the whole under ``--budget``, 450 s by default, so a slow case is cut
and the table still printed). Forward FLOPs are about 2 x parameters x tokens a
sample, a training step 3 x that, the accumulation's second forward 4 x:

- ViT-B-32: image 2 x 88M x 50 = 8.8 GFLOP, text 2 x 63M x 77 = 9.7 GFLOP (less
  with trimmed captions); a step at 1024 about 57 TFLOP, accumulated 76 TFLOP:
  0.2-0.3 s at 300-400 TFLOP/s achieved;
- ViT-L-14: image 2 x 304M x 257 = 156 GFLOP (+ attention 4 x 257^2 x 1024 x
  24 = 6.5 GFLOP), text 2 x 123M x 77 = 19 GFLOP; a step at 1024 about 540
  TFLOP, accumulated 720 TFLOP: about 2 s. One batch of 1024 keeps roughly
  1024 x 24 layers x 257 x 1024 x ~17 bf16 values, about 200 GB of
  activations: OOM on one 80 GB card, found within its first forward;
- the MFU rows take 22 steps of 1-17 TFLOP (seconds each), the probe 12
  steps; building a model (random init on the CPU) 5-25 s, four times for
  ViT-L-14; drawing the shapes images (224 px, 1024-2816 per case) about
  6.5 ms an image on one busy core, 70 s in all at worst;
- the torchrun rows: 2048 samples of ViT-B-32 each, process start 10-20 s.

In all about 4-5 minutes, so the 450 s budget leaves room.

    python benchmarks/gpu_check.py [--steps 20] [--json OUT.json] [--budget 450]
    python benchmarks/gpu_check.py --dry-run    # every row's code, tiny-vit on the CPU, seconds
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

PEAK = float(os.environ.get("PEAK_TFLOPS", "989")) * 1e12


@dataclass
class Setup:
    """What each row runs; ``GPU`` is the real check, ``DRY`` the same code on
    tiny-vit on the CPU (``--dry-run``, tests/test_gpu_check.py)."""

    device: str
    precision: str
    size: int                       # shapes image size
    mfu_cases: list                 # (model, strategy, batch)
    probe: tuple                    # (model, batch)
    accum_models: tuple
    effective: int                  # the accumulation rows' effective batch ...
    micro: int                      # ... as effective // micro micro-batches of micro
    run_model: str                  # the torchrun rows' model and data
    run_n: int
    run_batch: int
    fsdp_procs: int                 # processes (one GPU each) of the FSDP row
    case_limit_s: float             # each in-process case's time limit
    run_limit_s: float              # each torchrun row's time limit
    peak: Optional[float] = PEAK    # None: no MFU (the CPU)
    extra: list = field(default_factory=list)   # CLI arguments of the torchrun rows


GPU = Setup(device="cuda", precision="bf16", size=224,
            mfu_cases=[("ViT-B-32", "full", 128), ("ViT-B-32", "lora", 128),
                       ("ViT-L-14", "full", 32), ("ViT-L-14", "lora", 32)],
            probe=("ViT-B-32", 256), accum_models=("ViT-B-32", "ViT-L-14"), effective=1024, micro=128,
            run_model="ViT-B-32", run_n=2048, run_batch=128, fsdp_procs=2, case_limit_s=90, run_limit_s=150)

DRY = Setup(device="cpu", precision="fp32", size=32,
            mfu_cases=[("tiny-vit", "full", 8)],
            probe=("tiny-vit", 8), accum_models=("tiny-vit",), effective=8, micro=4,
            run_model="tiny-vit", run_n=16, run_batch=8, fsdp_procs=2, case_limit_s=60, run_limit_s=120,
            peak=None, extra=["--device", "cpu"])


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise :class:`CaseTimeout` in the main thread after ``seconds`` (SIGALRM;
    no limit where there is none, as off the main thread)."""
    import threading
    if seconds <= 0:
        raise CaseTimeout("no time left in the budget")
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum, frame):
        raise CaseTimeout(f"over its {seconds:.3g} s limit")
    before = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


class Budget:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def limit(self, cap: float) -> float:
        return min(cap, self.end - time.perf_counter())


def _sync(setup: Setup) -> None:
    if setup.device == "cuda":
        torch.cuda.synchronize()


def _reset_memory(setup: Setup) -> None:
    if setup.device == "cuda":     # (a full collection costs ~0.4 s: not on the CPU, where nothing is measured)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(setup: Setup) -> Optional[float]:
    return torch.cuda.max_memory_allocated() / 2**30 if setup.device == "cuda" else None


def _prepared(setup: Setup, model, strategy, batch, n, head=None, cache=False, grad_accum=1):
    from clipft.config import RunConfig
    from clipft.engine.prepare import prepare
    from clipft.options import ComponentRef
    from clipft.plugins import Registry
    cfg = RunConfig(model=model, pretrained="none", device=setup.device, precision=setup.precision,
                    batch_size=batch, grad_accum=grad_accum,
                    data=ComponentRef("shapes", {"n": n, "val_n": 8, "size": setup.size}),
                    strategies=[ComponentRef(strategy)] if strategy else [],
                    head=ComponentRef(head) if head else None,
                    loss=ComponentRef("cross-entropy" if head else "contrastive"), cache=cache)
    return prepare(cfg, Registry().load())


def _plain_step(t, b) -> None:
    from clipft.engine.loop import loss_total
    with t.autocast():
        total, _ = loss_total(t.loss(t.record(b)))
    total.backward()
    t.optimizer_step()


def _large_step(t, group) -> None:
    """One optimizer step of large-batch accumulation over ``group``, as the
    loop runs it (clipft.engine.loop.train's large_step)."""
    for b in group:
        t.large.add(t, b)
    t.large.step(t)
    t.optimizer_step()


def _timed(setup: Setup, one, items, warmup: int, steps: int, soft_s: float) -> tuple[float, int]:
    """Seconds a step (median-free: total over the timed steps) after
    ``warmup`` steps; stops early once ``soft_s`` is spent (at least one step)."""
    for x in items[:warmup]:       # warm-up: kernels, allocator, cache build
        one(x)
    _sync(setup)
    start, done = time.perf_counter(), 0
    for x in items[warmup:warmup + steps]:
        one(x)
        done += 1
        _sync(setup)
        if time.perf_counter() - start > soft_s:
            break
    return (time.perf_counter() - start) / max(done, 1), done


def _flops(run, batch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from clipft.engine.loop import loss_total
    t = run.trainer
    with FlopCounterMode(display=False) as fc:
        with t.autocast():
            total, _ = loss_total(t.loss(t.record(batch)))
        total.backward()
    t.optimizer.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


def mfu_case(setup: Setup, model, strategy, batch, steps) -> dict:
    run = _prepared(setup, model, strategy, batch, batch * (steps + 2))
    t = run.trainer
    t.set_train_mode()
    batches = list(t.features.train_epoch(0))[:steps + 2]
    step_s, done = _timed(setup, lambda b: _plain_step(t, b), batches, 2, steps, setup.case_limit_s / 2)
    flops = _flops(run, batches[-1])
    row = {"case": f"{model} {strategy} {setup.precision}", "batch": batch, "steps": done, "step_s": step_s,
           "samples_per_s": batch / step_s, "tflops_per_step": flops / 1e12,
           "mfu": flops / step_s / setup.peak if setup.peak else None, "peak_mem_gb": _peak_gb(setup)}
    del run, t, batches
    return row


def probe_case(setup: Setup, steps) -> dict:
    model, batch = setup.probe
    start = time.perf_counter()
    run = _prepared(setup, model, None, batch, batch * 12, head="linear", cache=True)
    t = run.trainer
    t.set_train_mode()
    batches = list(t.features.train_epoch(0))[:steps + 2]
    step_s, done = _timed(setup, lambda b: _plain_step(t, b), batches, 2, steps, setup.case_limit_s / 2)
    row = {"case": f"{model} frozen-tower probe (linear head, cached)", "batch": batch, "steps": done,
           "step_s": step_s, "samples_per_s": batch / step_s, "peak_mem_gb": _peak_gb(setup),
           "note": f"{time.perf_counter() - start:.1f} s incl. cache build"}
    del run, t, batches
    return row


def _oom_errors() -> tuple:
    return (torch.cuda.OutOfMemoryError,)


def accum_cases(setup: Setup, model, steps: int = 3) -> list:
    """Effective batch ``setup.effective`` of ``model`` (``full``, contrastive):
    K = effective / micro micro-batches under large-batch accumulation, then
    one batch of ``effective``; each from a fresh run, the peak memory reset
    between them."""
    k, micro, eff = setup.effective // setup.micro, setup.micro, setup.effective
    rows = []
    for name, batch, accum in (("large-batch", micro, k), ("one batch", eff, 1)):
        _reset_memory(setup)
        case = f"{model} full {setup.precision}, batch {eff}: " + (
            f"{k} x {micro} large-batch accumulation" if accum > 1 else f"one batch of {eff}")
        row = {"case": case, "batch": eff}
        run = t = items = None
        try:
            run = _prepared(setup, model, "full", batch, eff, grad_accum=accum)
            t = run.trainer
            assert (t.large is not None) == (accum > 1), "large-batch mode not as expected"
            t.set_train_mode()
            batches = list(t.features.train_epoch(0))
            # the same effective batch every step: speed and memory do not depend on the values
            items = [batches[:accum]] * (steps + 1) if accum > 1 else [batches[0]] * (steps + 1)
            one = (lambda g: _large_step(t, g)) if accum > 1 else (lambda b: _plain_step(t, b))
            step_s, done = _timed(setup, one, items, 1, steps, setup.case_limit_s / 3)
            row.update(step_s=step_s, steps=done, samples_per_s=eff / step_s, peak_mem_gb=_peak_gb(setup))
        except _oom_errors():
            row.update(peak_mem_gb="OOM", note=f"OOM (peak before it {_peak_gb(setup) or 0:.1f} GiB)")
        run = t = items = batches = one = None      # noqa: F841 (drop the failed step's tensors)
        _reset_memory(setup)
        rows.append(row)
    big, one = rows
    if one.get("peak_mem_gb") == "OOM":
        big.setdefault("note", "one batch of the same size does not fit")
    elif "step_s" in big and "step_s" in one:
        big["step_time_ratio"] = big["step_s"] / one["step_s"]
        said = [f"step time x{big['step_time_ratio']:.3f}"]
        if isinstance(one.get("peak_mem_gb"), float) and isinstance(big.get("peak_mem_gb"), float):
            big["memory_ratio"] = big["peak_mem_gb"] / one["peak_mem_gb"]
            said.insert(0, f"peak memory x{big['memory_ratio']:.3f}")
        big["note"] = "vs one batch: " + ", ".join(said)
    return rows


def _torchrun(setup: Setup, procs: int, strategy: str, out: str, extra=()) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
            "-m", "clipft", "run", "--model", setup.run_model, "--pretrained", "none",
            "--data", f"shapes:n={setup.run_n},val_n=8,size={setup.size}", "--strategy", strategy,
            "--batch-size", str(setup.run_batch), "--epochs", "1", "--callback", "none", "--out", out,
            "--overwrite", "--json", *setup.extra, *extra]


def _summary_row(case: str, r, start: float) -> dict:
    try:
        summary = json.loads(r.stdout) if r.returncode == 0 else {}
    except json.JSONDecodeError:
        summary = {}
    row = {"case": case, "exit": r.returncode, "wall_s": time.perf_counter() - start,
           "samples_per_s": summary.get("train", {}).get("samples_per_s")}
    row["note"] = (f"failed: exit {r.returncode}: {r.stderr.strip()[-300:]}" if r.returncode
                   else f"{row['wall_s']:.0f} s whole process")
    return row


def _run(cmd: list, limit: float) -> subprocess.CompletedProcess:
    """``cmd`` in its own process group, which is killed whole (torchrun and
    its workers) past ``limit`` seconds or when this process is interrupted."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=limit)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def torchrun_row(setup: Setup, limit: float, out: str) -> dict:
    case = f"torchrun 1 process, {setup.run_model} lora, {setup.run_n} samples"
    start = time.perf_counter()
    r = _run(_torchrun(setup, 1, "lora", out), limit)
    return _summary_row(case, r, start)


def fsdp_available() -> bool:
    """Whether ``clipft run`` knows ``--parallel`` with an ``fsdp`` choice."""
    from clipft.cli import cli
    for p in cli.commands["run"].params:
        if "--parallel" in p.opts:
            return "fsdp" in getattr(p.type, "choices", ("fsdp",))
    return False


def fsdp_row(setup: Setup, limit: float, out: str, gpus: Optional[int] = None) -> dict:
    case = f"torchrun {setup.fsdp_procs} processes --parallel fsdp, {setup.run_model} full, {setup.run_n} samples"
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if gpus < setup.fsdp_procs:
        return {"case": case, "note": f"skipped: needs {setup.fsdp_procs} GPUs, found {gpus}"}
    if not fsdp_available():
        return {"case": case, "note": "skipped: --parallel fsdp not available"}
    start = time.perf_counter()
    r = _run(_torchrun(setup, setup.fsdp_procs, "full", out, ["--parallel", "fsdp"]), limit)
    if r.returncode == 2:      # a usage error: this clipft cannot run FSDP here
        tail = r.stderr.strip().splitlines()[-1:] or [""]
        return {"case": case, "exit": 2, "note": f"skipped: --parallel fsdp not available ({tail[0][:200]})"}
    return _summary_row(case, r, start)


def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def table(rows: list, header: dict) -> str:
    """The one table, as text (rich's layout)."""
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"clipft GPU check: {header['device']}, torch {header['torch']} "
                    f"({header['seconds']:.0f} s)")
    for col in ("case", "batch", "s/step", "samples/s", "MFU", "peak GiB", "note"):
        t.add_column(col, overflow="fold")
    for r in rows:
        mfu = r.get("mfu")
        t.add_row(r["case"], _fmt(r.get("batch")), _fmt(r.get("step_s")), _fmt(r.get("samples_per_s")),
                  f"{mfu:.1%}" if isinstance(mfu, float) else "-",
                  _fmt(r.get("peak_mem_gb")), r.get("note") or "")
    console = Console(width=180, record=True, file=open(os.devnull, "w"))
    console.print(t)
    return console.export_text()


def _guarded(rows: list, case: str, limit: float, fn, *args) -> None:
    """Run one case under its time limit; a failure or a timeout is a row too."""
    start = time.perf_counter()
    try:
        with time_limit(limit):
            out = fn(*args)
    except CaseTimeout as exc:
        out = {"case": case, "note": f"stopped: {exc}"}
    except subprocess.TimeoutExpired:
        out = {"case": case, "note": f"stopped: over its {limit:.0f} s limit"}
    except Exception as exc:  # a failed case is reported, the others still run
        out = {"case": case, "note": f"failed: {type(exc).__name__}: {str(exc)[:200]}"}
    new = out if isinstance(out, list) else [out]
    for r in new:
        r.setdefault("seconds", time.perf_counter() - start)
        print(json.dumps(r), file=sys.stderr, flush=True)
    rows.extend(new)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="timed steps of the MFU rows")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--budget", type=float, default=450, help="seconds for the whole check")
    ap.add_argument("--dry-run", action="store_true", help="every row's code on tiny-vit on the CPU")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    setup = DRY if a.dry_run else GPU
    if setup.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check needs a CUDA device (--dry-run runs its code on the CPU)", file=sys.stderr)
        return 2
    steps = 1 if a.dry_run else a.steps
    budget, t0 = Budget(a.budget), time.perf_counter()
    rows: list = []
    for model, strategy, batch in setup.mfu_cases:
        _guarded(rows, f"{model} {strategy}", budget.limit(setup.case_limit_s), mfu_case, setup, model, strategy,
                 batch, steps)
        _reset_memory(setup)
    _guarded(rows, "frozen-tower probe", budget.limit(setup.case_limit_s), probe_case, setup, min(steps, 10))
    _reset_memory(setup)
    for model in setup.accum_models:
        _guarded(rows, f"{model} accumulation", budget.limit(2 * setup.case_limit_s), accum_cases, setup, model,
                 min(steps, 3))
        _reset_memory(setup)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        lim = budget.limit(setup.run_limit_s)
        _guarded(rows, "torchrun 1 process", lim, torchrun_row, setup, lim - 5, os.path.join(tmp, "one"))
        lim = budget.limit(setup.run_limit_s)
        _guarded(rows, "torchrun --parallel fsdp", lim, fsdp_row, setup, lim - 5, os.path.join(tmp, "fsdp"))
    header = {"device": torch.cuda.get_device_name(0) if setup.device == "cuda" else "cpu (dry run)",
              "torch": torch.__version__, "peak_tflops": (setup.peak or 0) / 1e12,
              "seconds": time.perf_counter() - t0, "budget_s": a.budget}
    print(table(rows, header))
    if a.json:
        with open(a.json, "w") as f:
            json.dump([header, *rows], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
