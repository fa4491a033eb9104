"""Row 5: clipft against ``python -m open_clip_train.main --dataset-type
synthetic`` on the same model, batch and precision (fp32), in samples/s.

Both train everything with CLIP's contrastive loss (image and text towers),
AdamW, lr 1e-5, no gradient clipping (open_clip_train's default; clipft gets
``--grad-clip 0``). open_clip_train logs each step's batch time (data loading
included, ``--log-every-n-steps 1``); clipft's step time includes fetching the
batch too. Each side drops its first step. Rounds alternate (and swap which side
goes first): one open_clip_train process of ``steps + 1`` steps, one clipft
epoch of as many. Each round's two median step times are one pair for
``common.paired_row``: the headline is the more conservative of the paired
median and the ratio of medians, and the row is noisy when the pair ratios
spread more than +-10%.
``tiny-vit`` is not an open_clip config, so for it open_clip_train's ``main``
is started through ``oct_main.py``, which only registers clipft's config first.

The data are the same on both sides: clipft reads them through a data-source
plugin registered in-process here (``bench-synthetic``), which yields what
open_clip_train's ``SyntheticDataset`` yields: one black image at the
transform's input size through the model's preprocess, captioned
"Dummy caption".
"""
from __future__ import annotations

import re

import attrs

import clipft
from clipft.specs import DataSourceSpec
from common import BENCH, ClipftEpochs, Row, median, now, paired_row, python_exe, run_child


@attrs.frozen
class SyntheticOptions:
    n: int = attrs.field(default=64, metadata={"help": "training samples"})
    val_n: int = attrs.field(default=16, metadata={"help": "validation samples"})


class SyntheticDataset:
    """open_clip_train's synthetic set, as a clipft dataset (index, image, caption, label)."""

    def __init__(self, n, transform):
        from PIL import Image
        size = transform.transforms[0].size
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.n, self.transform, self.image = n, transform, Image.new("RGB", size)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i, self.transform(self.image), "Dummy caption", -1


def build_synthetic(opts, ctx):
    from clipft.data import DataBundle
    return DataBundle(train=SyntheticDataset(opts.n, ctx.transform_train),
                      val=SyntheticDataset(opts.val_n, ctx.transform_val), classnames=None,
                      has_captions=True, description="bench-synthetic")


class SyntheticPlugin:
    @clipft.hookimpl
    def clipft_register_data_sources(self, register):
        register(DataSourceSpec(name="bench-synthetic", summary="open_clip_train's synthetic data",
                                options=SyntheticOptions, build=build_synthetic))

SETTINGS = {
    # model: (batch, timed steps per round, rounds)
    "ViT-B-32": (16, 2, 3),
    # tiny-vit: open_clip_train's own step times wander 0.085-0.19 s within a process, so
    # the row stays noisy; 5 rounds (+14 s) steady its median, not its spread
    "tiny-vit": (64, 8, 5),
}
BATCH_TIME = re.compile(r"Batch \(t\): ([0-9.]+)")


def open_clip_train_steps(work, model: str, bs: int, steps: int, tag: str) -> list:
    entry = ["-m", "open_clip_train.main"] if model != "tiny-vit" else [str(BENCH / "oct_main.py")]
    args = [python_exe(), *entry, "--dataset-type", "synthetic",
            "--train-num-samples", str(bs * (steps + 1)), "--batch-size", str(bs), "--model", model,
            "--precision", "fp32", "--epochs", "1", "--workers", "0", "--log-every-n-steps", "1",
            "--lr", "1e-5", "--wd", "0.01", "--warmup", "0", "--save-frequency", "0",
            "--logs", str(work / "open_clip_train"), "--name", tag, "--seed", "0"]
    res = run_child(args, timeout=600)
    times = [float(x) for x in BATCH_TIME.findall(res.stdout + res.stderr)]
    if res.returncode != 0 or len(times) != steps + 1:
        raise RuntimeError(f"open_clip_train failed (rc {res.returncode}, {len(times)} steps logged):\n"
                           f"{(res.stdout + res.stderr)[-2000:]}")
    return times[1:]


def measure(reg, work, model: str) -> Row:
    t0 = now()
    bs, steps, rounds = SETTINGS[model]
    ours = ClipftEpochs(reg, work / f"vs-oct-{model}", rounds, steps, bs, model=model, strategies=["full"],
                        loss="contrastive:duplicates=ignore", lr=1e-5, weight_decay=0.01, grad_clip=0.0,
                        cache=False,
                        data=f"bench-synthetic:n={bs * (steps + 1)},val_n={bs}")
    oct_t, clip_t, pairs = [], [], []
    for r in range(rounds):
        # alternate which side goes first, so neither always follows the other
        first, second = ("oct", "clip") if r % 2 == 0 else ("clip", "oct")
        got = {}
        for side in (first, second):
            if side == "oct":
                got[side] = open_clip_train_steps(work, model, bs, steps, f"{model}-{r}-{int(now() * 1000)}")
            else:
                got[side] = ours.round().step_times()
        oct_t += got["oct"]
        clip_t += got["clip"]
        pairs.append((median(got["clip"]), median(got["oct"])))
    c, o = median(clip_t), median(oct_t)
    return paired_row(
        pairs, ">= 1.0",
        {"clipft_samples_per_s": bs / c, "open_clip_train_samples_per_s": bs / o,
         "clipft_step_s": c, "open_clip_train_step_s": o, "steps_each": len(clip_t),
         "clipft_steps": clip_t, "open_clip_train_steps": oct_t},
        id=f"5-{model}", name=f"vs open_clip_train (synthetic), {model} bs{bs} fp32: clipft / open_clip_train "
                             "(samples/s)",
        seconds=now() - t0)


def run(reg, work) -> list:
    from clipft.api import make_registry
    reg = make_registry(plugins=[SyntheticPlugin()])
    return [measure(reg, work, m) for m in SETTINGS]
