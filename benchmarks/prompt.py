"""Row 3: prompt tuning (CoOp), 10 epochs: a plain implementation that
recomputes the image features every step / clipft (wall time).

clipft runs ``--strategy prompt --head text --loss cross-entropy``: the frozen
image tower is embedded once and replayed; the learned context goes through
the text tower every step (it trains, so it cannot be cached). The plain loop
(``plain_loops.PlainPromptTuning``) is CoOp written out by hand, same
optimizer and learning rate, and encodes the images every step. Its steps run
interleaved with clipft's (as in row 2).

The plain loop pays for the text tower over all class prompts at open_clip's
full 77 positions; clipft's prompt learner runs the causal tower only up to the
prompts' last end-of-text token (the default since the second performance round:
exact up to rounding, tests/test_trim.py). A second pairing measures clipft with
that cut turned off (every class prompt at 77 positions, the earlier default),
for the before/after figure, against a fresh plain loop.
"""
from __future__ import annotations

import contextlib
import copy

from common import Row, clipft_train, now, prepared_run
from plain_loops import PlainPromptTuning

MODEL, N, VAL, EPOCHS, BATCH = "ViT-B-32", 64, 16, 10, 32


@contextlib.contextmanager
def full_length_text():
    """The class-prompt text tower on all 77 positions (the earlier default)."""
    import clipft.encode as enc
    real = enc.text_trim_length
    enc.text_trim_length = lambda model, tokens: None
    try:
        yield
    finally:
        enc.text_trim_length = real


def pairing(reg, work, name, full_length: bool):
    config = dict(model=MODEL, data=f"shapes:n={N},val_n={VAL}", strategies=["prompt"], head="text",
                  loss="cross-entropy", epochs=EPOCHS, batch_size=BATCH)
    prepared = prepared_run(reg, **config)
    plain_model = copy.deepcopy(prepared.model)
    delattr(plain_model, "clipft_class_text")
    plain = PlainPromptTuning(plain_model, prepared.tokenizer, prepared.bundle.train,
                              list(prepared.bundle.classnames), BATCH)
    plain.step()   # untimed warm-up, as in row 2
    with full_length_text() if full_length else contextlib.nullcontext():
        ours, stats, clock, clip_wall = clipft_train(reg, work / name, other=plain.step, prepared=prepared,
                                                     **config)
    return ours, clock, clip_wall, sum(clock.theirs)


def run(reg, work) -> list:
    t0 = now()
    ours, clock, clip_wall, plain_wall = pairing(reg, work, "prompt", full_length=False)
    _, _, full_wall, plain_wall2 = pairing(reg, work, "prompt-full-length", full_length=True)
    cache = dict(ours.features.stats)
    classes = len(ours.bundle.classnames)
    return [Row(
        id="3", name=f"prompt tuning, {MODEL}, {EPOCHS} epochs x {N} images, {classes} classes: "
                     "plain (image features every step) / clipft (wall)",
        ratio=plain_wall / clip_wall, target=">= 5",
        figures={"plain_wall_s": plain_wall, "clipft_wall_s": clip_wall, "steps_each": len(clock.theirs),
                 "ratio_before_full_length_text": plain_wall2 / full_wall,
                 "clipft_full_length_text_wall_s": full_wall, "plain_wall_s_2": plain_wall2,
                 "clipft_image_hits": cache.get("image_hits"),
                 "clipft_cache_build_s": cache.get("build_seconds")},
        seconds=now() - t0)]
