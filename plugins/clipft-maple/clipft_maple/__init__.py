"""Strategy ``maple``: MaPLe, multi-modal prompt learning (Khattak et al.,
CVPR 2023), built on :mod:`clipft.prompt_kit` and clipft's public API only.

Deep prompts in both towers up to ``depth`` J: the text context of block 0
(``n_ctx`` vectors from the first words of ``init``, the rest of ``init``
kept as fixed words, so step 0 is "a photo of a {class}.") and fresh text
context for blocks 1..J-1 (N(0, 0.02^2)); the vision prompts of every block j
are a linear projection of block j's text context (one coupling layer
``Linear(text width, vision width)`` per depth), so vision prompts get no
parameters of their own. CLIP stays frozen. The module is
:mod:`clipft_maple.learner`.
"""
from __future__ import annotations

from typing import Optional

import attrs

from clipft import Strategy, StrategySpec, hookimpl
from clipft.options import at_least_one, init_text

#: MaPLe's prompt depth (both towers), context length and init
DEPTH, N_CTX, INIT = 9, 2, "a photo of a"


@attrs.frozen
class MapleOptions:
    depth: int = attrs.field(default=DEPTH, validator=at_least_one, metadata={"help": (
        f"prompt depth J in both towers (MaPLe: {DEPTH}); must not exceed either tower's block count")})
    n_ctx: int = attrs.field(default=N_CTX, validator=at_least_one, metadata={"help": (
        f"context vectors per block (MaPLe: {N_CTX}); with init, the first n_ctx words learn and the rest "
        "stay fixed words of the prompt")})
    init: Optional[str] = attrs.field(default=INIT, converter=init_text, metadata={"help": (
        "text whose first n_ctx words initialise the block-0 context; 'none': N(0, 0.02^2)")})


class Maple(Strategy):
    def __init__(self, opts: MapleOptions):
        self.opts = opts

    def apply(self, model, ctx):
        from clipft_maple.learner import install_maple
        return install_maple(model, ctx, self.opts)


@hookimpl
def clipft_register_strategies(register):
    register(StrategySpec(
        name="maple",
        summary="MaPLe: deep prompts in both towers, vision prompts projected from the text prompts; "
                "CLIP stays frozen. Use with --head text.",
        options=MapleOptions,
        build=Maple,
        # MaPLe: SGD lr 0.0035, batch 4, 5 epochs, 16 shots; only the lr is a
        # strategy default (batch, epochs, optimizer and shots are run options)
        default_lr=3.5e-3,
    ))
