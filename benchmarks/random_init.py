"""The measurements behind the random-init lr default (RANDOM_INIT_LR), the
warmup default (WARMUP_SHARE) and the collapse thresholds (clipft.collapse);
docs/usage.md#learning-rate-warmup-and-collapse has the results.

    # the digits as an image folder (scikit-learn kept out of the venv)
    pip install --target /tmp/skl scikit-learn pillow
    PYTHONPATH=/tmp/skl python3 benchmarks/random_init.py digits /tmp/collapse/digits
    # one grid (lr_digits_full, lr_w10, lr_digits_others, lr_shapes_rn, warmup): one JSON line per run
    python benchmarks/random_init.py grid lr_digits_full /tmp/collapse/lr_digits_full.jsonl
    # the loss_flat rule, with clipft.collapse's constants, applied to the recorded curves
    python benchmarks/random_init.py rule /tmp/collapse/*.jsonl

Runs go in-process, in /tmp/collapse/runs (each removed after it is recorded);
a grid already partly recorded in OUT continues where it stopped.
"""
import itertools
import json
import math
import shutil
import sys
import tomllib
from pathlib import Path
from clipft import Callback, CallbackSpec, hookimpl
from clipft.api import run, make_registry

CURVE = []
class Curve(Callback):
    def on_step_end(self, s):
        CURVE.append(s.loss)

class Plugin:
    @hookimpl
    def clipft_register_callbacks(self, register):
        register(CallbackSpec(name="curve", summary="loss curve", build=lambda o: Curve()))

DIGITS = {"name": "imagefolder", "root": "/tmp/collapse/digits"}
SHAPES = {"name": "shapes", "n": 1024}
HEADS = {"contrastive": (None, "contrastive"), "ce": ("linear", "cross-entropy")}

def grids(name):
    if name == "lr_digits_full":      # part 1: full from random init, both losses
        for loss, lr, seed in itertools.product(["contrastive", "ce"], [1e-5, 1e-4, 5e-4, 1e-3, 2e-3], [0, 1]):
            yield dict(model="tiny-vit", data=DIGITS, strategy="full", loss=loss, lr=lr, seed=seed, epochs=3)
    if name == "lr_digits_others":    # part 1: lora / projections, briefly
        for strat, loss, lr, seed in itertools.product(["lora", "projections"], ["contrastive"],
                                                        [1e-4, 1e-3], [0, 1]):
            yield dict(model="tiny-vit", data=DIGITS, strategy=strat, loss=loss, lr=lr, seed=seed, epochs=3)
    if name == "lr_shapes_rn":        # part 1: tiny-rn on shapes
        for loss, lr, seed in itertools.product(["contrastive", "ce"], [1e-5, 1e-4, 1e-3], [0]):
            yield dict(model="tiny-rn", data=SHAPES, strategy="full", loss=loss, lr=lr, seed=seed, epochs=3)
    if name == "lr_w10":              # part 1 again under the new 10% warmup default
        for loss, lr, seed in itertools.product(["contrastive", "ce"], [5e-4, 1e-3], [0, 1]):
            yield dict(model="tiny-vit", data=DIGITS, strategy="full", loss=loss, lr=lr, seed=seed, epochs=3)
    if name == "warmup":              # part 3
        for warm, strat, seed in itertools.product([0.05, 0.10, 0.20], ["full", "lora", "projections"], [0, 1, 2, 3]):
            yield dict(model="tiny-vit", data=DIGITS, strategy=strat, loss="contrastive", lr=2e-3, seed=seed,
                       epochs=3, warmup_share=warm)

def digits(out):
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    d = load_digits()
    for i, (img, y) in enumerate(zip(d.images, d.target)):
        folder = Path(out) / f"digit{y}"
        folder.mkdir(parents=True, exist_ok=True)
        a = (img / 16.0 * 255).astype(np.uint8)
        Image.fromarray(a).resize((32, 32), Image.NEAREST).convert("RGB").save(folder / f"{i:04d}.png")


def rule(files):
    from clipft import collapse as C
    for f in files:
        for line in open(f):
            r = json.loads(line)
            c = r["curve"]
            k = max(1, math.ceil(C.CHECK_SHARE * len(c)))
            start, w = sum(c[:C.FIRST]) / C.FIRST, c[max(0, k - C.WINDOW):k]
            drop = (start - sum(w) / len(w)) / abs(start)
            top = r["head_top1"] if r["head_top1"] is not None else r["top1"]
            print(f"{r['strategy']:11s} {r['loss']:11s} lr={r['lr']:<7g} warmup={r['warmup_steps']} seed={r['seed']} "
                  f"top1={top:.3f} final_loss={r['final_loss']:.3f} drop={drop:+.3f} "
                  f"loss_flat={len(c) >= C.MIN_STEPS and drop < C.MIN_DROP}")


def main():
    if sys.argv[1] == "digits":
        return digits(sys.argv[2])
    if sys.argv[1] == "rule":
        return rule(sys.argv[2:])
    name, out = sys.argv[2], Path(sys.argv[3])
    reg = make_registry(plugins=[Plugin()])
    done = set()
    if out.exists():
        done = {json.loads(l)["tag"] for l in out.read_text().splitlines() if l.strip()}
    for g in grids(name):
        head, loss = HEADS.get(g["loss"], (None, g["loss"]))
        tag = "_".join(f"{k}={v['name'] if isinstance(v, dict) else v}" for k, v in g.items())
        if tag in done:
            continue
        cfg = {"model": g["model"], "pretrained": "none", "data": g["data"], "strategy": [g["strategy"]],
               "loss": loss, "batch_size": 64, "epochs": g["epochs"], "lr": g["lr"], "seed": g["seed"],
               "callback": ["curve"], "checkpoint_every": "epoch"}
        if head:
            cfg["head"] = head
        if "warmup_share" in g:
            cfg["warmup_steps"] = int(round(g["warmup_share"] * 66))
        CURVE.clear()
        rd = Path("/tmp/collapse/runs") / tag
        s = run(cfg, registry=reg, out=rd, overwrite=True)
        after = s["eval"]["after"]
        rec = {"tag": tag, **g, "data": g["data"]["name"], "steps": s["train"]["steps"],
               "warmup_steps": tomllib.loads((rd / "config.toml").read_text()).get("warmup_steps"),
               "top1": after.get("top1"), "head_top1": after.get("head_top1"),
               "final_loss": s["train"]["final_loss"],
               "epoch_losses": [h.get("train_loss") for h in s["eval"]["history"][1:]],
               "curve": [round(x, 4) for x in CURVE], "collapse": (s.get("callbacks") or {}).get("collapse")}
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(tag, rec["steps"], rec["top1"], rec["head_top1"], rec["final_loss"], flush=True)
        shutil.rmtree(rd, ignore_errors=True)

main()
