"""Strategy ``cocoop``: Conditional Context Optimization (Zhou et al., CVPR 2022,
arXiv:2203.05557).

CoOp learns one context for the class prompts; CoCoOp adds a light meta-network
that maps each image's normalised embedding to a shift ``pi`` added to every
context vector, so each image gets prompts of its own and the prompts
generalise better to classes not seen in training. CLIP stays frozen; the
context and the meta-network train. The learner is the model's class-prompt
encoder, declared ``conditional`` (:class:`clipft.ClassTextEncoder`), so the
engine hands it the image features wherever it classifies images (zero-shot
evaluation, the ``text`` head, ``clipft eval`` and ``predict``).
"""
from __future__ import annotations

from typing import Literal, Optional

import attrs

from clipft import Selection, Strategy, StrategySpec, hookimpl
from clipft.options import init_text


def _n_ctx(inst, attribute, value):
    if value is not None and value < 1:
        raise ValueError(f"n_ctx must be at least 1, got {value}")


def _reduction(inst, attribute, value):
    if value < 1:
        raise ValueError(f"reduction must be at least 1, got {value}")


@attrs.frozen
class CoCoOpOptions:
    n_ctx: Optional[int] = attrs.field(default=None, validator=_n_ctx, metadata={"help": (
        "number of context tokens; default: the token count of init, or 16 when init is none")})
    init: Optional[str] = attrs.field(default="a photo of a", converter=init_text, metadata={"help": (
        "text whose token embeddings initialise the context (CoCoOp: 'a photo of a'); 'none' draws it "
        "at random (N(0, 0.02^2))")})
    reduction: int = attrs.field(default=16, validator=_reduction, metadata={"help": (
        "the meta-network's hidden width is the embedding width divided by this (CoCoOp: 16)")})
    position: Literal["end", "middle", "front"] = attrs.field(default="end", metadata={"help": (
        "where the class name goes: after the context (end, CoCoOp), inside it (middle) or before it (front)")})


class CoCoOp(Strategy):
    def __init__(self, opts: CoCoOpOptions):
        self.opts = opts

    def apply(self, model, ctx):
        from clipft import install
        from clipft.options import options_to_dict
        from clipft.prompt_kit import Tokens, build_rows, check_prompt_context, initial_context

        from clipft_cocoop.learner import ConditionalPromptLearner

        opts = self.opts
        check_prompt_context(ctx, "cocoop")
        tokens = Tokens(ctx.tokenizer, "cocoop")
        # the same random stream use as `prompt` (init=none draws from it), so the
        # two start from the same context
        vectors, placeholder = initial_context(model, tokens, opts.init, opts.n_ctx, "cocoop")
        build_rows(tokens, ctx.classnames, len(placeholder), opts.position, placeholder)  # fits? clear error now
        options = options_to_dict(opts)
        options["n_ctx"] = len(placeholder)
        learner = ConditionalPromptLearner(vectors, placeholder, opts.position, list(ctx.classnames), options,
                                           embed_dim=ctx.embed_dim, reduction=opts.reduction,
                                           seed=ctx.seed).to(ctx.device)
        slot = install(model, learner)
        return [Selection("cocoop", [(f"{slot}.{n}", p) for n, p in learner.named_parameters()])]


@hookimpl
def clipft_register_strategies(register):
    register(StrategySpec(
        name="cocoop",
        summary="CoCoOp: CoOp's learned prompt context plus a meta-network that shifts it per image; CLIP "
                "stays frozen. Use with --head text.",
        options=CoCoOpOptions,
        build=CoCoOp,
        # CoCoOp: lr 0.002 (SGD), as CoOp; with AdamW the same rate, as `prompt`
        default_lr=2e-3,
    ))
