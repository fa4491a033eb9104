"""Strategy ``prompt``: CoOp context optimisation (seed Strategy 6).

The whole CLIP model stays frozen; only the context vectors of the class
prompts train. The learner is installed on the model as its class-prompt
encoder (``clipft.install``, a :class:`clipft.ClassTextEncoder`; the learner
and its helpers are :mod:`clipft.prompt_kit`'s), so zero-shot
evaluation, the ``text`` and ``zero-shot`` heads and the paired text of
labelled images all use the learned prompts.

Defaults follow CoOp: context initialised from "a photo of a" (4 tokens, so
step 0 reproduces CLIP's zero-shot prompt exactly), class token at the end, one
context shared by all classes; ``init=none`` gives CoOp's 16 random vectors.
"""
from typing import Literal, Optional

import attrs

from clipft import Strategy, StrategySpec, hookimpl

RANDOM_N_CTX = 16
RANDOM_STD = 0.02


def _n_ctx(inst, attribute, value):
    if value is not None and value < 1:
        raise ValueError(f"n_ctx must be at least 1, got {value}")


def _init(value):
    if value is None:
        return None
    value = str(value).strip()
    return None if value.lower() in ("", "none", "random") else value


@attrs.frozen
class PromptOptions:
    n_ctx: Optional[int] = attrs.field(default=None, validator=_n_ctx, metadata={"help": (
        f"number of context tokens; default: the token count of init, or {RANDOM_N_CTX} "
        "when init is none")})
    init: Optional[str] = attrs.field(default="a photo of a", converter=_init, metadata={"help": (
        "text whose token embeddings initialise the context; 'none' draws it at random "
        f"(N(0, {RANDOM_STD}^2), CoOp)")})
    class_specific: bool = attrs.field(default=False, metadata={"help": (
        "one context per class (CoOp's CSC); the prompts then only encode the trained classes")})
    position: Literal["end", "middle", "front"] = attrs.field(default="end", metadata={"help": (
        "where the class name goes: after the context (end), inside it (middle) or before it (front)")})


class PromptTuning(Strategy):
    def __init__(self, opts: PromptOptions):
        self.opts = opts

    def apply(self, model, ctx):
        from clipft.options import options_to_dict
        from clipft.prompt_kit import install_prompt_learner

        opts = self.opts
        _, selections = install_prompt_learner(
            model, ctx, "prompt", init=opts.init, n_ctx=opts.n_ctx, position=opts.position,
            class_specific=opts.class_specific, options=options_to_dict(opts),
            n_random=RANDOM_N_CTX, std=RANDOM_STD)
        return selections


@hookimpl
def clipft_register_strategies(register):
    register(StrategySpec(
        name="prompt",
        summary="CoOp prompt tuning: learn the context of the class prompts; CLIP stays frozen. "
                "Use with --head text (or the contrastive loss on labelled data).",
        options=PromptOptions,
        build=PromptTuning,
        # CoOp: lr 0.002 (SGD); with AdamW the same rate trains the context well
        default_lr=2e-3,
    ))
