"""Row 1: full fine-tune step throughput, clipft against the seed's plain loop.

Same model (random init, same initial weights), batch, loss (CLIP's symmetric
contrastive loss over image and text, duplicates not masked, as the seed's
Step 8), optimizer (AdamW, lr 1e-5, wd 0.01, no gradient clipping, as the
seed's Step 7: clipft's default ``--grad-clip 1.0`` costs one more read of
every gradient, ~2% of a ViT-B-32 step here) and data (the synthetic shapes
set through the model's preprocess). Everything else is clipft's own loop:
its schedule, logging, checks and step timing. The two loops alternate step
by step (``common.StepClock``); the ratio is the median over neighbouring
steps of seed step time / clipft step time, first steps (warm-up) dropped.
"""
from __future__ import annotations

import copy

from common import ClipftEpochs, Row, median, now, paired_ratio
from plain_loops import SeedFullFinetune

SETTINGS = {
    # model: (batch, timed steps)
    "ViT-B-32": (16, 5),
    "tiny-vit": (64, 20),
}


def measure(reg, work, model_name: str) -> Row:
    t0 = now()
    bs, steps = SETTINGS[model_name]
    ours = ClipftEpochs(reg, work / f"full-{model_name}", 1, steps, bs, model=model_name,
                        strategies=["full"], loss="contrastive:duplicates=ignore", lr=1e-5,
                        weight_decay=0.01, grad_clip=0.0, cache=False)
    seed = SeedFullFinetune(copy.deepcopy(ours.run.model), ours.run.tokenizer, ours.run.bundle.train, bs)
    clock = ours.round(other=seed.step)
    pairs = clock.pairs()
    c, s = median([p[0] for p in pairs]), median([p[1] for p in pairs])
    return Row(
        id=f"1-{model_name}", name=f"full fine-tune step, {model_name} bs{bs}: clipft / seed loop (samples/s)",
        ratio=paired_ratio(pairs), target=">= 0.97",
        figures={"clipft_samples_per_s": bs / c, "seed_samples_per_s": bs / s,
                 "clipft_step_s": c, "seed_step_s": s, "ratio_of_medians": s / c, "pairs": len(pairs),
                 "clipft_steps": [p[0] for p in pairs], "seed_steps": [p[1] for p in pairs]},
        seconds=now() - t0)


def run(reg, work) -> list:
    return [measure(reg, work, m) for m in SETTINGS]
