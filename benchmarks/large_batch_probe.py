"""Child process of row 9: train a few optimizer steps of one configuration and
report the process's peak resident set size and the median optimizer-step time
(from one step's last micro-batch event to the next's, the first step dropped
as warm-up). Prints one JSON line."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, now, peak_rss_mb, registry, steps_only  # noqa: E402


class StepTimes:
    """A progress reporter timing optimizer steps (under large-batch
    accumulation a step's micro-batch events fire together, so only the
    stepped ones are timed)."""

    def __init__(self):
        self.times, self._last = [], None

    def on_run_start(self, run): ...

    def on_epoch_start(self, epoch, epochs, n_batches):
        self._last = now()

    def on_step_end(self, s):
        if s.stepped:
            t = now()
            self.times.append(t - self._last)
            self._last = t

    def on_run_end(self, summary): ...


def main(argv=None):
    from clipft.config import RunConfig
    from clipft.engine.prepare import prepare
    from clipft.engine.session import train_run

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--strategy", default="full")
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--work", required=True)
    a = ap.parse_args(argv)
    n = a.batch_size * a.grad_accum * (a.steps + 1)
    cfg = RunConfig(model=a.model, pretrained="none", device="cpu", epochs=1, batch_size=a.batch_size,
                    grad_accum=a.grad_accum, strategies=[a.strategy], loss="contrastive",
                    data=f"shapes:n={n},val_n={a.batch_size}", cache=False)
    run = prepare(cfg, registry())
    built = peak_rss_mb()
    clock = StepTimes()
    Path(a.work).mkdir(parents=True, exist_ok=True)
    with steps_only():
        train_run(run, Path(a.work), clock)
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "rss_after_build_mb": built,
                      "step_s": median(clock.times[1:]), "steps": len(clock.times),
                      "mode": "large-batch" if run.trainer.large is not None else "plain"}))


if __name__ == "__main__":
    main()
