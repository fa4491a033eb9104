"""One short GPU check (``benchmarks/gpu_check.sh``): steps/s and model FLOPs
utilisation (MFU) of clipft's training step for ViT-B-32 and ViT-L-14 with
``full`` and ``lora`` at bf16, the frozen-tower probe (head only, towers
cached), and a 1-process torchrun run. Random-init weights (``--pretrained
none``): speed does not depend on the values. FLOPs per step are counted by
``torch.utils.flop_counter`` on one real step; MFU divides the achieved FLOP/s
by ``PEAK_TFLOPS`` (default 989, an H100/H200's dense bf16 peak).

    python benchmarks/gpu_check.py [--steps 20] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

PEAK = float(os.environ.get("PEAK_TFLOPS", "989")) * 1e12
CASES = [("ViT-B-32", "full", 128), ("ViT-B-32", "lora", 128), ("ViT-L-14", "full", 32), ("ViT-L-14", "lora", 32)]


def _prepared(model, strategy, batch, n, head=None, cache=False):
    from clipft.config import RunConfig
    from clipft.engine.prepare import prepare
    from clipft.options import ComponentRef
    from clipft.plugins import Registry
    cfg = RunConfig(model=model, pretrained="none", device="cuda", precision="bf16", batch_size=batch,
                    data=ComponentRef("shapes", {"n": n, "val_n": 8, "size": 224}),
                    strategies=[ComponentRef(strategy)] if strategy else [],
                    head=ComponentRef(head) if head else None,
                    loss=ComponentRef("cross-entropy" if head else "contrastive"), cache=cache)
    return prepare(cfg, Registry().load())


def _steps(run, steps: int):
    from clipft.engine.loop import loss_total
    t = run.trainer
    t.set_train_mode()
    batches = list(t.features.train_epoch(0))[:steps + 2]

    def one(b):
        with t.autocast():
            total, _ = loss_total(t.loss(t.record(b)))
        total.backward()
        t.optimizer_step()
    for b in batches[:2]:          # warm-up: kernels, allocator, cache build
        one(b)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for b in batches[2:]:
        one(b)
    torch.cuda.synchronize()
    return (len(batches) - 2) / (time.perf_counter() - start), batches[2]


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


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA device")
    rows = [{"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "peak_tflops": PEAK / 1e12}]
    for model, strategy, batch in CASES:
        run = _prepared(model, strategy, batch, batch * (a.steps + 2))
        rate, b = _steps(run, a.steps)
        flops = _flops(run, b)
        rows.append({"case": f"{model} {strategy} bf16 batch {batch}", "steps_per_s": rate,
                     "samples_per_s": rate * batch, "tflops_per_step": flops / 1e12,
                     "mfu": rate * flops / PEAK, "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30})
        print(json.dumps(rows[-1]), flush=True)
        del run
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    run = _prepared("ViT-B-32", None, 256, 256 * 12, head="linear", cache=True)
    start = time.perf_counter()
    rate, _ = _steps(run, 10)
    rows.append({"case": "ViT-B-32 frozen-tower probe (linear head, cached)", "steps_per_s": rate,
                 "samples_per_s": rate * 256, "seconds_incl_cache_build": time.perf_counter() - start})
    print(json.dumps(rows[-1]), flush=True)
    del run
    out = "/tmp/gpu_check_torchrun"
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                        "-m", "clipft", "run", "--model", "ViT-B-32", "--pretrained", "none",
                        "--data", "shapes:n=2048,val_n=64,size=224", "--strategy", "lora", "--batch-size", "128",
                        "--epochs", "1", "--callback", "none", "--out", out, "--overwrite", "--json"],
                       capture_output=True, text=True)
    summary = json.loads(r.stdout) if r.returncode == 0 else {}
    rows.append({"case": "torchrun 1 process, ViT-B-32 lora bf16, 2048 samples", "exit": r.returncode,
                 "samples_per_s": summary.get("train", {}).get("samples_per_s"),
                 "wall_s": time.perf_counter() - start, "error": r.stderr[-500:] if r.returncode else None})
    print(json.dumps(rows[-1]), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
