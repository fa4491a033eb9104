"""Row 9: ``--grad-accum K`` under the contrastive loss (large-batch
accumulation, engine/accumulate.py) against one batch of K·B: the same loss over
the same K·B pairs per optimizer step, ViT-B-32. By default the issue's size,
an effective batch of 256 from micro-batches of 32 (K = 8);
``CLIPFT_BENCH_LARGE_BATCH=EFFECTIVE/MICRO`` (e.g. ``64/16``) sets another,
``CLIPFT_BENCH_LARGE_BATCH_STEPS`` the timed steps (default 3, after one
warm-up step). Each configuration runs in a fresh process
(``large_batch_probe.py``), so each peak RSS is that process's own.

- 9: peak RSS ratio, ``full``, K micro-batches / one batch: the activations of
  one micro-batch instead of K·B (plus the group's embeddings and images);
  the lower the better, the more the activations dominate the weights and the
  AdamW state (``--trace`` of the probe shows each phase's peak);
- 9t: step-time ratio, ``full``: the second forward of each micro-batch costs
  about a third more (a backward is about two forwards);
- 9f: step-time ratio with the image tower frozen and served from the cache
  (``freeze-vision --cache``): only the text tower runs, twice in forward
  under large-batch accumulation, against its one run in one batch.

Step times need a quiet machine (the processes run one after the other, not
interleaved); peak RSS does not depend on the load.
"""
from __future__ import annotations

import json
import os

from common import BENCH, Row, now, python_exe, run_child

MODEL = "ViT-B-32"
SIZE_ENV, STEPS_ENV = "CLIPFT_BENCH_LARGE_BATCH", "CLIPFT_BENCH_LARGE_BATCH_STEPS"


def sizes() -> tuple[int, int, int]:
    """``(effective, micro, steps)`` from the environment (default 256, 32, 3)."""
    value = os.environ.get(SIZE_ENV, "").strip() or "256/32"
    try:
        eff, micro = (int(x) for x in value.split("/"))
    except ValueError:
        raise ValueError(f"{SIZE_ENV} must be EFFECTIVE/MICRO, e.g. 256/32, got {value!r}") from None
    if micro < 1 or eff < 2 * micro or eff % micro:
        raise ValueError(f"{SIZE_ENV}: EFFECTIVE must be a multiple (>= 2) of MICRO, got {value!r}")
    steps = int(os.environ.get(STEPS_ENV, "").strip() or 3)
    if steps < 1:
        raise ValueError(f"{STEPS_ENV} must be >= 1, got {steps}")
    return eff, micro, steps


def probe(work, name, batch_size, grad_accum, steps, extra=()) -> dict:
    args = [python_exe(), str(BENCH / "large_batch_probe.py"), "--model", MODEL,
            "--batch-size", str(batch_size), "--grad-accum", str(grad_accum), "--steps", str(steps),
            "--work", str(work / f"large-batch-{name}"), *extra]
    res = run_child(args, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"large-batch probe {name} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(reg, work) -> list:
    eff, micro, steps = sizes()
    k = eff // micro
    t0 = now()
    accum = probe(work, "accum", micro, k, steps, ["--strategy", "full"])
    one = probe(work, "one", eff, 1, steps, ["--strategy", "full"])
    assert accum["mode"] == "large-batch" and one["mode"] == "plain"
    t1 = now()
    frozen = ["--strategy", "freeze-vision", "--cache"]
    f_accum = probe(work, "frozen-accum", micro, k, steps, frozen)
    f_one = probe(work, "frozen-one", eff, 1, steps, frozen)
    assert f_accum["mode"] == "large-batch"
    what = f"{k} micro-batches of {micro} / one batch of {eff}, {MODEL}"
    full_figs = {"accum_peak_rss_mb": accum["peak_rss_mb"], "one_batch_peak_rss_mb": one["peak_rss_mb"],
                 "rss_after_build_mb": one["rss_after_build_mb"],
                 "accum_step_s": accum["step_s"], "one_batch_step_s": one["step_s"]}
    return [
        Row(id="9", name=f"{what} full contrastive: peak RSS", ratio=accum["peak_rss_mb"] / one["peak_rss_mb"],
            target="<= 0.35", figures=full_figs, seconds=t1 - t0),
        Row(id="9t", name=f"{what} full contrastive: step time", ratio=accum["step_s"] / one["step_s"],
            target="<= 1.45", figures=full_figs, note="the second forward, expected about 1.33; needs a quiet machine",
            seconds=0.0),
        Row(id="9f", name=f"{what}, image tower frozen and cached (freeze-vision --cache): step time",
            ratio=f_accum["step_s"] / f_one["step_s"], target="<= 1.1",
            figures={"accum_step_s": f_accum["step_s"], "one_batch_step_s": f_one["step_s"],
                     "accum_peak_rss_mb": f_accum["peak_rss_mb"], "one_batch_peak_rss_mb": f_one["peak_rss_mb"]},
            note="the text tower's second forward; needs a quiet machine", seconds=now() - t1),
    ]
