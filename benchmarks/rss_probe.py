"""Child process of row 4: train a few clipft steps and report the process's
peak resident set size (its own high-water mark, so each configuration gets a
fresh process). Prints one JSON line."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ClipftEpochs, median, peak_rss_mb, registry  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--strategy", action="append", required=True)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--work", required=True)
    a = ap.parse_args(argv)
    before = peak_rss_mb()
    ours = ClipftEpochs(registry(), Path(a.work), 1, a.steps, a.batch_size, model=a.model,
                        strategies=a.strategy, loss="contrastive", grad_checkpointing=a.grad_checkpointing)
    built = peak_rss_mb()
    steps = ours.round().step_times()
    total, trainable = ours.run.param_counts
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "rss_after_build_mb": built, "rss_at_start_mb": before,
                      "step_s": median(steps), "params_trainable": trainable, "params_total": total}))


if __name__ == "__main__":
    main()
