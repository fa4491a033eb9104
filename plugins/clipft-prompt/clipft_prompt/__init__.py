"""Strategy ``prompt``: CoOp context optimisation (seed Strategy 6).

The whole CLIP model stays frozen; only the context vectors of the class
prompts train. The learner is installed on the model as its class-prompt
encoder (``clipft.install``, a :class:`clipft.ClassTextEncoder`), so zero-shot
evaluation, the ``text`` and ``zero-shot`` heads and the paired text of
labelled images all use the learned prompts.

Defaults follow CoOp: context initialised from "a photo of a" (4 tokens, so
step 0 reproduces CLIP's zero-shot prompt exactly), class token at the end, one
context shared by all classes; ``init=none`` gives CoOp's 16 random vectors.
"""
from typing import Literal, Optional

import attrs

from clipft import Selection, Strategy, StrategySpec, hookimpl

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
        from clipft import install
        from clipft.options import options_to_dict

        from clipft_prompt.learner import PromptLearner, Tokens, build_rows, check_prompt_context, initial_context

        opts = self.opts
        check_prompt_context(ctx, "prompt")
        tokens = Tokens(ctx.tokenizer)
        vectors, placeholder = initial_context(model, tokens, opts.init, opts.n_ctx, "prompt",
                                               RANDOM_N_CTX, RANDOM_STD)
        n_ctx = len(placeholder)
        build_rows(tokens, ctx.classnames, n_ctx, opts.position, placeholder)  # fits? clear error now
        if opts.class_specific:
            vectors = vectors.unsqueeze(0).repeat(len(ctx.classnames), 1, 1)
        options = {k: v for k, v in options_to_dict(opts).items()}
        options["n_ctx"] = n_ctx
        learner = PromptLearner(vectors, placeholder, opts.position, list(ctx.classnames), options)
        slot = install(model, learner)
        return [Selection("prompt", [(f"{slot}.ctx", learner.ctx)])]


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
