"""Row 3: prompt tuning (CoOp), 10 epochs: a plain implementation that
recomputes the image features every step / clipft (wall time).

clipft runs ``--strategy prompt --head text --loss cross-entropy``: the frozen
image tower is embedded once and replayed; the learned context goes through
the text tower every step (it trains, so it cannot be cached). The plain loop
(``plain_loops.PlainPromptTuning``) is CoOp written out by hand, same
optimizer and learning rate, and encodes the images every step. Its steps run
interleaved with clipft's (as in row 2).

Both pay for the text tower over all class prompts at open_clip's full 77
positions. A second pairing measures clipft with the prompt learner's text
pass cut to the prompts' length (``clipft.engine.perf.encode_text_prefix``,
exact up to rounding), which the shipped learner does not do: it is installed
on this benchmark's model instance only, against a fresh plain loop.
"""
from __future__ import annotations

import copy

from common import Row, clipft_train, now, prepared_run
from plain_loops import PlainPromptTuning

MODEL, N, VAL, EPOCHS, BATCH = "ViT-B-32", 64, 16, 10, 32


def _trim_learner_text(model):
    """Make ``model.encode_text`` skip the padding (this process, this model)."""
    from clipft.engine.perf import causal_text_length, encode_text_prefix

    full = model.encode_text

    def encode_text(text, normalize=False):
        length = causal_text_length(model, text)
        x = full(text) if length is None else encode_text_prefix(model, text, length)
        return x / x.norm(dim=-1, keepdim=True) if normalize else x

    model.encode_text = encode_text


def pairing(reg, work, name, trim: bool):
    config = dict(model=MODEL, data=f"shapes:n={N},val_n={VAL}", strategies=["prompt"], head="text",
                  loss="cross-entropy", epochs=EPOCHS, batch_size=BATCH)
    prepared = prepared_run(reg, **config)
    plain_model = copy.deepcopy(prepared.model)
    delattr(plain_model, "clipft_class_text")
    plain = PlainPromptTuning(plain_model, prepared.tokenizer, prepared.bundle.train,
                              list(prepared.bundle.classnames), BATCH)
    plain.step()   # untimed warm-up, as in row 2
    if trim:
        _trim_learner_text(prepared.model)
    ours, stats, clock, clip_wall = clipft_train(reg, work / name, other=plain.step, prepared=prepared,
                                                 **config)
    return ours, clock, clip_wall, sum(clock.theirs)


def run(reg, work) -> list:
    t0 = now()
    ours, clock, clip_wall, plain_wall = pairing(reg, work, "prompt", trim=False)
    _, _, trim_wall, plain_wall2 = pairing(reg, work, "prompt-trimmed", trim=True)
    cache = dict(ours.features.stats)
    classes = len(ours.bundle.classnames)
    return [Row(
        id="3", name=f"prompt tuning, {MODEL}, {EPOCHS} epochs x {N} images, {classes} classes: "
                     "plain (image features every step) / clipft (wall)",
        ratio=plain_wall / clip_wall, target=">= 5",
        figures={"plain_wall_s": plain_wall, "clipft_wall_s": clip_wall, "steps_each": len(clock.theirs),
                 "ratio_with_trimmed_learner_text": plain_wall2 / trim_wall,
                 "clipft_trimmed_text_wall_s": trim_wall, "plain_wall_s_2": plain_wall2,
                 "clipft_image_hits": cache.get("image_hits"),
                 "clipft_cache_build_s": cache.get("build_seconds")},
        seconds=now() - t0)]
