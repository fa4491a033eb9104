"""Seconds per training step: CoCoOp (``cocoop``) against CoOp (``prompt``), the
same data, batch, model and head (``--head text``, cross-entropy), measured
side by side in one process.

    python benchmarks/cocoop_step.py [--model tiny-vit] [--colours 2] [--shapes 3] [--batch 32]
                                     [--steps 8] [--rounds 5] [--json]

Both runs are prepared by the engine (``clipft.engine.prepare``); one untimed
epoch fills the frozen image tower's cache, then rounds of ``--steps``
optimizer steps alternate between the strategies (so a busy machine slows both
alike) and the median seconds per step of each is reported. CoCoOp encodes
batch x classes prompts per step, CoOp classes prompts; ``cocoop (hooked)`` is
CoCoOp through the prompt learner's own text path (full-length rows, a hook on
the token embedding), the like-for-like comparison, and ``cocoop`` its default
path (the class rows embedded once, the causal tower run on the prompt
positions only).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "cross")


def data_spec(n_colours: int, n_shapes: int, n: int) -> str:
    """``n_colours x n_shapes`` classes of the ``shapes`` data."""
    return (f"shapes:n={n},val_n=8,colours={','.join(COLOURS[:n_colours])},"
            f"shapes={','.join(SHAPES[:n_shapes])}")


def prepared(model: str, strategy: str, data: str, batch: int):
    from clipft.api import RunConfig, make_registry
    from clipft.engine.prepare import prepare
    cfg = RunConfig(model=model, pretrained="none", data=data, strategies=[strategy], head="text",
                    loss="cross-entropy", epochs=100, batch_size=batch, device="cpu", callbacks=["none"])
    return prepare(cfg, make_registry())


class Stepper:
    def __init__(self, run, direct: bool = True):
        import torch
        self.run, self.t, self.direct = run, run.trainer, direct
        self.t.set_train_mode()
        self.batches = list(self.t.features.train_epoch(0))   # fills the image cache (untimed)
        self.i = 0
        self.torch = torch

    def step(self) -> float:
        import clipft_cocoop.learner as learner
        learner.DIRECT = self.direct
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        t0 = time.perf_counter()
        out = self.t.loss(self.t.record(batch))
        out.backward()
        self.t.optimizer_step()
        return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-vit")
    ap.add_argument("--colours", type=int, default=2, help="classes: colours x shapes (at most 6 x 4)")
    ap.add_argument("--shapes", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    import torch
    data = data_spec(a.colours, a.shapes, a.batch * a.steps)
    classes = a.colours * a.shapes
    steppers = {
        "prompt": Stepper(prepared(a.model, "prompt", data, a.batch)),
        "cocoop": Stepper(prepared(a.model, "cocoop", data, a.batch), direct=True),
        "cocoop (hooked)": Stepper(prepared(a.model, "cocoop", data, a.batch), direct=False),
    }
    for s in steppers.values():    # warm-up
        s.step()
    times = {k: [] for k in steppers}
    for _ in range(a.rounds):
        for name, s in steppers.items():
            times[name] += [s.step() for _ in range(a.steps)]
    med = {k: statistics.median(v) for k, v in times.items()}
    doc = {"model": a.model, "classes": classes, "batch": a.batch, "threads": torch.get_num_threads(),
           "steps_timed": a.steps * a.rounds, "seconds_per_step": med,
           "ratio_cocoop_to_prompt": med["cocoop"] / med["prompt"],
           "ratio_cocoop_hooked_to_prompt": med["cocoop (hooked)"] / med["prompt"],
           "load_average": os.getloadavg()}
    if a.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"{a.model}, {classes} classes, batch {a.batch}, {doc['threads']} thread(s), "
              f"median of {doc['steps_timed']} steps, load {doc['load_average'][0]:.2f}")
        for k, v in med.items():
            print(f"  {k:16s} {v * 1000:8.1f} ms/step  ({v / med['prompt']:.2f}x prompt)")
    return doc


if __name__ == "__main__":
    sys.exit(main() and 0)
