"""Row 4: peak memory (RSS) of ``lora`` against ``full`` on ViT-B-32, batch 16.

Each configuration trains ``steps + 1`` contrastive steps (image and text
towers) in a fresh process (``rss_probe.py``), so each peak is that process's
own high-water mark: weights, activations, gradients and optimizer state, plus
the Python/torch runtime both share. For scale, LoRA with
``--grad-checkpointing`` is measured too.
"""
from __future__ import annotations

import json

from common import BENCH, Row, now, python_exe, run_child

MODEL, BATCH, STEPS = "ViT-B-32", 16, 2


def probe(work, name, strategy, *extra) -> dict:
    args = [python_exe(), str(BENCH / "rss_probe.py"), "--model", MODEL, "--strategy", strategy,
            "--batch-size", str(BATCH), "--steps", str(STEPS), "--work", str(work / f"rss-{name}"), *extra]
    res = run_child(args, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"rss probe {name} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(reg, work) -> list:
    t0 = now()
    full = probe(work, "full", "full")
    lora = probe(work, "lora", "lora")
    lora_gc = probe(work, "lora-gc", "lora", "--grad-checkpointing")
    return [Row(
        id="4", name=f"peak RSS, {MODEL} bs{BATCH} contrastive: lora / full",
        ratio=lora["peak_rss_mb"] / full["peak_rss_mb"], target="<= 0.6",
        figures={"lora_peak_rss_mb": lora["peak_rss_mb"], "full_peak_rss_mb": full["peak_rss_mb"],
                 "lora_grad_checkpointing_peak_rss_mb": lora_gc["peak_rss_mb"],
                 "ratio_lora_grad_checkpointing": lora_gc["peak_rss_mb"] / full["peak_rss_mb"],
                 "lora_trainable_params": lora["params_trainable"],
                 "full_trainable_params": full["params_trainable"],
                 "rss_after_model_build_mb": full["rss_after_build_mb"],
                 "lora_step_s": lora["step_s"], "full_step_s": full["step_s"],
                 "lora_grad_checkpointing_step_s": lora_gc["step_s"]},
        seconds=now() - t0)]
