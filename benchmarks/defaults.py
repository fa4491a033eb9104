"""The measurements behind clipft's defaults on the machine at hand
(docs/performance.md): autocast precision and DataLoader workers.

- precision: clipft's full contrastive ViT-B-32 step at batch 16 in fp32,
  interleaved step by step with the same step under bf16 autocast (the seed
  loop's step with ``torch.autocast``). On a CPU without native bf16 (AVX2 only)
  bf16 is emulated and slower; with AMX/AVX512-BF16 it is faster. clipft keeps
  fp32 as the default either way (bf16 changes the numbers a run produces);
  the row records what ``--precision bf16`` buys here. Its headline is the
  median pair ratio (an ``info`` row has no direction to be conservative in);
  the ratio of medians, the spread and the noisy flag are as in row 1
  (``common.paired_stats``).
- workers: tiny-vit full fine-tuning at batch 64 (where loading is the largest
  share of a step) with 0, 1 and 2 DataLoader worker processes, two rounds.
"""
from __future__ import annotations

import copy

import torch

from common import ClipftEpochs, Row, median, now, paired_row
from plain_loops import SeedFullFinetune


def precision(reg, work) -> Row:
    from clipft.engine.perf import native_precisions
    t0 = now()
    ours = ClipftEpochs(reg, work / "precision", 1, 3, 16, model="ViT-B-32", strategies=["full"],
                        loss="contrastive:duplicates=ignore", lr=1e-5, weight_decay=0.01, cache=False)
    bf16 = SeedFullFinetune(copy.deepcopy(ours.run.model), ours.run.tokenizer, ours.run.bundle.train, 16,
                            autocast_dtype=torch.bfloat16)
    pairs = ours.round(other=bf16.step).pairs()
    native = native_precisions(torch.device("cpu"))
    # (bf16, fp32) pairs: the ratio is fp32 time / bf16 time
    return paired_row([(b, a) for a, b in pairs], "info",
                      {"fp32_step_s": median([p[0] for p in pairs]), "bf16_step_s": median([p[1] for p in pairs]),
                       "native_bf16": native["bf16"], "default": "fp32"},
                      id="D1", name="precision: ViT-B-32 full step, fp32 time / bf16-autocast time",
                      note="default stays fp32 (bf16 changes results); --precision bf16 where the CPU/GPU has it",
                      seconds=now() - t0)


def workers(reg, work) -> Row:
    t0 = now()
    runs = {w: ClipftEpochs(reg, work / f"workers-{w}", 2, 8, 64, model="tiny-vit", strategies=["full"],
                            loss="contrastive", num_workers=w, cache=False) for w in (0, 1, 2)}
    times = {w: [] for w in runs}
    for _ in range(2):
        for w, r in runs.items():
            times[w] += r.round().step_times()
    res = {w: median(t) for w, t in times.items()}
    best = min(res, key=res.get)
    return Row(id="D2", name="DataLoader workers: tiny-vit bs64 step, time with 0 workers / fastest",
               ratio=res[0] / res[best], target="info",
               figures={f"step_s_workers_{w}": t for w, t in res.items()}, note=f"fastest: {best} workers",
               seconds=now() - t0)


def run(reg, work) -> list:
    return [precision(reg, work), workers(reg, work)]
