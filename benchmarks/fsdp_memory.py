"""Row 10: per-rank peak RSS of a 2-process full fine-tune under
``--parallel fsdp`` against ``--parallel ddp`` (CPU, gloo), each launch in
fresh processes (``fsdp_probe.py`` reports each rank's own high-water mark).

Under DDP every rank holds the whole model, its gradients and AdamW's two
moments (16 bytes a parameter); under FSDP each holds half of them plus what
is gathered at once (the root unit and two blocks) and what stays whole
(logit_scale). The ratio is of the larger rank of each; below the
0.65 target, sharding pays for the process's fixed share (torch, the data,
activations) that it cannot halve. ``CLIPFT_BENCH_FSDP_MODEL=tiny-vit``
checks the row quickly.
"""
from __future__ import annotations

import json
import os

from common import BENCH, Row, now, python_exe, run_child

MODEL = os.environ.get("CLIPFT_BENCH_FSDP_MODEL", "ViT-B-32")
BATCH, STEPS, WORLD = 8, 3, 2


def probe(work, mode: str) -> list:
    out = work / f"fsdp-{mode}"
    args = [python_exe(), "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
            str(BENCH / "fsdp_probe.py"), "run", "--model", MODEL, "--pretrained", "none", "--strategy", "full",
            "--loss", "contrastive", "--optimizer", "adamw", "--precision", "fp32", "--callback", "none",
            "--data", f"shapes:n={BATCH * WORLD * STEPS},val_n={WORLD},size=224", "--batch-size", str(BATCH),
            "--epochs", "1", "--checkpoint-every", "epoch", "--parallel", mode, "--out", str(out / "run")]
    res = run_child(args, timeout=3600, env={"FSDP_PROBE_OUT": str(out / "rss"), "OMP_NUM_THREADS": "1"})
    if res.returncode != 0:
        raise RuntimeError(f"fsdp probe {mode} failed:\n{res.stderr[-2000:]}")
    return [json.loads((out / "rss" / f"rank{r}.json").read_text())["peak_rss_mb"] for r in range(WORLD)]


def run(reg, work) -> list:
    t0 = now()
    ddp = probe(work, "ddp")
    fsdp = probe(work, "fsdp")
    return [Row(
        id="10", name=f"{WORLD}-process {MODEL} full fine-tune, AdamW fp32: per-rank peak RSS, FSDP / DDP",
        ratio=max(fsdp) / max(ddp), target="<= 0.65",
        figures={"fsdp_peak_rss_mb": max(fsdp), "ddp_peak_rss_mb": max(ddp),
                 "fsdp_per_rank_mb": fsdp, "ddp_per_rank_mb": ddp},
        note="CPU, gloo; each rank's own high-water mark",
        seconds=now() - t0)]
