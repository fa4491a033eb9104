"""Row 1: full fine-tune step throughput, clipft against the seed's plain loop.

Same model (random init, same initial weights), batch, loss (CLIP's symmetric
contrastive loss over image and text, duplicates not masked, as the seed's
Step 8), optimizer (AdamW, lr 1e-5, wd 0.01, no gradient clipping, as the
seed's Step 7: clipft's default ``--grad-clip 1.0`` costs one more read of
every gradient, ~2% of a ViT-B-32 step here) and data (the synthetic shapes
set through the model's preprocess). Everything else is clipft's own loop:
its schedule, logging, checks and step timing. The two loops alternate step
by step (``common.StepClock``), first steps (warm-up) dropped. The headline
is the more conservative (the smaller) of the median over neighbouring steps
of seed step time / clipft step time and the ratio of the two median step
times; both are in the figures with the spread of the pair ratios, and the row
is marked noisy when that spread exceeds +-10% (``common.paired_stats``).

Pairs: 16 on ViT-B-32 and 40 on tiny-vit. With the earlier 5 ViT-B-32 pairs
(9 neighbouring ratios) the row's ratio spread 0.94-0.99 over six runs
(docs/performance.md), as wide as the 3% the target is about: on this shared
2-core machine one pair disturbed by another job is a large share of 9 ratios.
16 pairs give 31 ratios, so the median and the 10th/90th percentiles each
rest on several pairs. A pair costs two full steps: with one intra-op thread
(OMP_NUM_THREADS=1) a pair took ~16 s here (clipft 6.2 s, seed 9.5 s) and the
ViT-B-32 part 285 s, warm-up pair and model build included; with 2 threads a
step is ~5 s (docs/performance.md), so it stays under ~5 minutes either way.
tiny-vit pairs cost ~0.3 s, so it gets more (10 s for 40). ``CLIPFT_BENCH_PAIRS=N``
sets every model's pair count to N for a quick check of the code (the row then
says so in its note); that is not a measurement.
"""
from __future__ import annotations

import copy
import os

from common import ClipftEpochs, Row, median, now, paired_row
from plain_loops import SeedFullFinetune

SETTINGS = {
    # model: (batch, timed steps = pairs)
    "ViT-B-32": (16, 16),
    "tiny-vit": (64, 40),
}
PAIRS_ENV = "CLIPFT_BENCH_PAIRS"


def pairs_override():
    """The pair count ``CLIPFT_BENCH_PAIRS`` asks for (None: the defaults)."""
    value = os.environ.get(PAIRS_ENV, "").strip()
    if not value:
        return None
    n = int(value)
    if n < 2:
        raise ValueError(f"{PAIRS_ENV} must be >= 2, got {n}")
    return n


def measure(reg, work, model_name: str) -> Row:
    t0 = now()
    bs, steps = SETTINGS[model_name]
    quick = pairs_override()
    steps = quick or steps
    ours = ClipftEpochs(reg, work / f"full-{model_name}", 1, steps, bs, model=model_name,
                        strategies=["full"], loss="contrastive:duplicates=ignore", lr=1e-5,
                        weight_decay=0.01, grad_clip=0.0, cache=False)
    seed = SeedFullFinetune(copy.deepcopy(ours.run.model), ours.run.tokenizer, ours.run.bundle.train, bs)
    clock = ours.round(other=seed.step)
    pairs = clock.pairs()
    c, s = median([p[0] for p in pairs]), median([p[1] for p in pairs])
    return paired_row(
        pairs, ">= 1.05",
        {"clipft_samples_per_s": bs / c, "seed_samples_per_s": bs / s, "clipft_step_s": c, "seed_step_s": s,
         "clipft_steps": [p[0] for p in pairs], "seed_steps": [p[1] for p in pairs]},
        id=f"1-{model_name}", name=f"full fine-tune step, {model_name} bs{bs}: clipft / seed loop (samples/s)",
        note=f"{PAIRS_ENV}={quick}: quick check, not a measurement" if quick else "",
        seconds=now() - t0)


def run(reg, work) -> list:
    return [measure(reg, work, m) for m in SETTINGS]
