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

import torch  # noqa: E402

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


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


class Phases:
    """``--trace``: the peak resident memory of each phase of a step (Linux:
    VmHWM read at the phase's end, then reset through /proc/self/clear_refs),
    and the resident memory at its end; where the peak of the run comes from."""

    def __init__(self):
        self.peaks: dict = {}
        self.after: dict = {}
        self.overall = _status_mb("VmHWM")
        self.mark(None)

    def mark(self, name) -> None:
        if name is not None:
            hwm = _status_mb("VmHWM")
            self.overall = max(self.overall, hwm)
            self.peaks[name] = max(self.peaks.get(name, 0.0), hwm)
            self.after[name] = _status_mb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def install(self, trainer) -> None:
        from clipft.engine import accumulate
        phases, lb = self, accumulate.LargeBatch
        add, second, opt = lb.add, lb._second_pass, type(trainer).optimizer_step

        def traced_add(self, t, batch):
            add(self, t, batch)
            phases.mark("1 first pass of a micro-batch (no grad)")

        def traced_second(self, t, micro, out_grads, direct):
            phases.mark("2 loss over the group and its gradient")
            second(self, t, micro, out_grads, direct)
            phases.mark("3 second pass: forward + backward of each micro-batch")

        def traced_opt(self):
            phases.mark("forward + backward (one batch)" if self.large is None else "between")
            norm = opt(self)
            phases.mark("4 optimizer step")
            return norm
        lb.add, lb._second_pass, type(trainer).optimizer_step = traced_add, traced_second, traced_opt

    def sizes(self, run) -> dict:
        t = run.trainer
        params = [p for p in t.params if p.requires_grad]
        state = [v for s in t.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        mb = lambda xs: sum(x.numel() * x.element_size() for x in xs) / 2**20   # noqa: E731
        return {"model_mb": mb(list(run.model.parameters()) + list(run.model.buffers())),
                "trained_params_mb": mb(params), "optimizer_state_mb": mb(state)}


def trim_before_second_pass(trainer) -> None:
    """Hand the heap's free pages back to the kernel before each micro-batch's
    second pass (only the second pass calls ``Trainer.outputs`` in one process)."""
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    outputs = type(trainer).outputs

    def trimmed(self, batch, replay=None):
        libc.malloc_trim(0)
        return outputs(self, batch, replay)
    type(trainer).outputs = trimmed


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
    ap.add_argument("--cache", action="store_true", help="cache the frozen towers (with freeze-vision)")
    ap.add_argument("--trace", action="store_true", help="the peak resident memory of each phase of a step")
    ap.add_argument("--trim", action="store_true",
                    help="glibc malloc_trim(0) before each second-pass forward: what heap fragmentation costs")
    ap.add_argument("--work", required=True)
    a = ap.parse_args(argv)
    n = a.batch_size * a.grad_accum * (a.steps + 1)
    cfg = RunConfig(model=a.model, pretrained="none", device="cpu", epochs=1, batch_size=a.batch_size,
                    grad_accum=a.grad_accum, strategies=[a.strategy], loss="contrastive",
                    data=f"shapes:n={n},val_n=8", cache=a.cache)
    run = prepare(cfg, registry())
    built = peak_rss_mb()
    phases = Phases() if a.trace else None
    if phases is not None:
        phases.install(run.trainer)
    if a.trim:
        trim_before_second_pass(run.trainer)
    clock = StepTimes()
    Path(a.work).mkdir(parents=True, exist_ok=True)
    with steps_only():
        train_run(run, Path(a.work), clock)
    traced = {"phases_peak_mb": phases.peaks, "phases_end_rss_mb": phases.after, **phases.sizes(run)} if phases else {}
    print(json.dumps({"peak_rss_mb": max(peak_rss_mb(), phases.overall if phases else 0.0),
                      "rss_after_build_mb": built, **traced,
                      "step_s": median(clock.times[1:]), "steps": len(clock.times),
                      "mode": "large-batch" if run.trainer.large is not None else "plain"}))


if __name__ == "__main__":
    main()
