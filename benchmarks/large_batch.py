"""Row 9: ``--grad-accum K`` under the contrastive loss (large-batch
accumulation, engine/accumulate.py) against one batch of K·B: the same loss over
the same K·B pairs per optimizer step. Each configuration runs in a fresh
process (``large_batch_probe.py``), so each peak RSS is that process's own.

- peak RSS ratio, K micro-batches / one batch: the activations of one
  micro-batch instead of K·B (plus the group's embeddings); below 1, the lower
  the better, the more the activations dominate the weights and optimizer state;
- step-time ratio, K micro-batches / one batch: the second forward of each
  micro-batch costs about a third more (a backward is about two forwards).
"""
from __future__ import annotations

import json

from common import BENCH, Row, now, python_exe, run_child

MODEL, STRATEGY, BATCH, K, STEPS = "ViT-B-32", "full", 16, 4, 3


def probe(work, name, batch_size, grad_accum) -> dict:
    args = [python_exe(), str(BENCH / "large_batch_probe.py"), "--model", MODEL, "--strategy", STRATEGY,
            "--batch-size", str(batch_size), "--grad-accum", str(grad_accum), "--steps", str(STEPS),
            "--work", str(work / f"large-batch-{name}")]
    res = run_child(args, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"large-batch probe {name} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(reg, work) -> list:
    t0 = now()
    accum = probe(work, "accum", BATCH, K)
    one = probe(work, "one", BATCH * K, 1)
    assert accum["mode"] == "large-batch" and one["mode"] == "plain"
    return [Row(
        id="9", name=f"{K} micro-batches of {BATCH} / one batch of {K * BATCH}, {MODEL} {STRATEGY} contrastive: "
                     "peak RSS",
        ratio=accum["peak_rss_mb"] / one["peak_rss_mb"], target="<= 1",
        figures={"accum_peak_rss_mb": accum["peak_rss_mb"], "one_batch_peak_rss_mb": one["peak_rss_mb"],
                 "rss_after_build_mb": one["rss_after_build_mb"],
                 "step_time_ratio": accum["step_s"] / one["step_s"],
                 "accum_step_s": accum["step_s"], "one_batch_step_s": one["step_s"]},
        note="step_time_ratio: the second forward, expected about 1.33",
        seconds=now() - t0)]
