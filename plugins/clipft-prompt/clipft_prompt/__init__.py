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

``kg_lambda=8`` is KgCoOp (Yao et al., CVPR 2023): the loss gains
``kg_lambda * mean_c ||w_c - w_clip_c||^2`` between the learned class
embeddings of the step (``ForwardRecord.class_text_features``, L2-normalised)
and CLIP's hand-crafted ones (the run's templates through the frozen text
tower, encoded once in ``apply``), logged as ``reg.kg``. 0 (the default) is
CoOp bit for bit.

``depth=J`` adds deep text prompts (:mod:`clipft.prompt_kit`): fresh context at
each of the first J blocks of the text transformer; with
``vision-prompt:depth=J`` it is IVLP (independent prompts in both towers).
"""
from typing import Literal, Optional

import attrs

from clipft import Strategy, StrategySpec, hookimpl
from clipft.options import at_least_one, init_text, non_negative

RANDOM_N_CTX = 16
RANDOM_STD = 0.02


def _n_ctx(inst, attribute, value):
    if value is not None and value < 1:
        raise ValueError(f"n_ctx must be at least 1, got {value}")


@attrs.frozen
class PromptOptions:
    n_ctx: Optional[int] = attrs.field(default=None, validator=_n_ctx, metadata={"help": (
        f"number of context tokens; default: the token count of init, or {RANDOM_N_CTX} "
        "when init is none")})
    init: Optional[str] = attrs.field(default="a photo of a", converter=init_text, metadata={"help": (
        "text whose token embeddings initialise the context; 'none' draws it at random "
        f"(N(0, {RANDOM_STD}^2), CoOp)")})
    class_specific: bool = attrs.field(default=False, metadata={"help": (
        "one context per class (CoOp's CSC); the prompts then only encode the trained classes")})
    position: Literal["end", "middle", "front"] = attrs.field(default="end", metadata={"help": (
        "where the class name goes: after the context (end), inside it (middle) or before it (front)")})
    depth: int = attrs.field(default=1, validator=at_least_one, metadata={"help": (
        "deep prompts: fresh learnable context at each of the first depth text blocks, replacing the "
        f"previous block's outputs at the context positions (N(0, {RANDOM_STD}^2)); with "
        "vision-prompt:depth it is IVLP; 1: CoOp (the input only)")})
    kg_lambda: float = attrs.field(default=0.0, validator=non_negative, metadata={"help": (
        "KgCoOp: weight of the mean squared distance between the learned and CLIP's hand-crafted "
        "class embeddings (the run's templates), logged as reg.kg; the paper uses 8; 0: off (CoOp)")})


class PromptTuning(Strategy):
    def __init__(self, opts: PromptOptions):
        self.opts = opts
        self.w_clip = None

    def apply(self, model, ctx):
        from clipft.options import options_to_dict
        from clipft.prompt_kit import check_prompt_context, install_prompt_learner

        opts = self.opts
        if opts.kg_lambda > 0 and ctx.loss is not None:
            check_prompt_context(ctx, "prompt")    # its errors first: they name the fix
            self.w_clip = _hand_crafted(model, ctx)
        _, selections = install_prompt_learner(
            model, ctx, "prompt", init=opts.init, n_ctx=opts.n_ctx, position=opts.position,
            class_specific=opts.class_specific, options=options_to_dict(opts),
            n_random=RANDOM_N_CTX, std=RANDOM_STD, depth=opts.depth)
        return selections

    def loss_terms(self, record):
        if self.w_clip is None:
            return {}
        w = record.class_text_features
        if w is None or w.shape != self.w_clip.shape:   # _hand_crafted checked the run's own steps
            from clipft.errors import ClipftError
            raise ClipftError(f"prompt:kg_lambda compares the step's class prompts with CLIP's for the "
                              f"{self.w_clip.shape[0]} classes of the run; the step encoded "
                              f"{'none' if w is None else w.shape[0]}")
        distance = (w.float() - self.w_clip.to(w.device)).pow(2).sum(-1).mean()
        return {"kg": self.opts.kg_lambda * distance}


def _hand_crafted(model, ctx):
    """CLIP's class embeddings ``[C, D]`` (normalised, float32) from the run's
    templates, encoded once by the still-frozen text tower, before the learner
    replaces the templates."""
    import torch

    from clipft.errors import ClipftUsageError
    from clipft.specs import NEED_CLASS_TEXT

    if ctx.head != "text" and NEED_CLASS_TEXT not in ctx.loss_needs:
        raise ClipftUsageError(
            f"prompt:kg_lambda compares the class prompts each step encodes with CLIP's, but with "
            f"--head {ctx.head or 'none'} and --loss {ctx.loss} no step encodes them; use --head text")
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return ctx.class_text_features(model).float()
    finally:
        model.train(was)


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
