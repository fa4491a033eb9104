"""PromptSRC's ``apply`` (imports torch): the frozen text side, the prompts of
both towers, and the GPA module."""
from __future__ import annotations

import torch

from clipft.encode import class_text_features
from clipft.errors import ClipftUsageError
from clipft.options import options_to_dict
from clipft.prompt_kit import check_prompt_context, install_prompt_learner, install_vision_prompts, text_blocks_of
from clipft.specs import NEED_CLASS_TEXT, Selection

from clipft_promptsrc import GPA_ATTR, STD, STRATEGY, VISION_FILE


def frozen_class_text(model, ctx, templates) -> torch.Tensor:
    """The frozen model's class embeddings ``[C, D]`` (normalised, float32):
    CLIP's ensemble over ``templates``, encoded once, before any prompt exists."""
    from clipft.data import resolve_templates

    templates = tuple(ctx.templates) if templates == "run" else resolve_templates(templates)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return class_text_features(model, ctx.tokenizer, list(ctx.classnames), templates, ctx.device).float()
    finally:
        model.train(was)


def install_promptsrc(model, ctx, opts):
    """``(selections, w_frozen)``; ``w_frozen`` None when no term reads it (or
    the model is rebuilt for inference)."""
    visual = model.visual
    if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
        raise ClipftUsageError(f"strategy '{STRATEGY}' prompts a vision transformer; this model's image tower "
                               f"is {type(visual).__name__}, with no token sequence")
    n_text, n_vision = len(text_blocks_of(model, STRATEGY)), len(visual.transformer.resblocks)
    if opts.depth > min(n_text, n_vision):
        raise ClipftUsageError(f"strategy '{STRATEGY}': depth={opts.depth}, but the text transformer has {n_text} "
                               f"blocks and the vision transformer {n_vision}")
    training = ctx.loss is not None
    w_frozen = None
    if training and (opts.text_weight > 0 or opts.kl_weight > 0):
        check_prompt_context(ctx, STRATEGY)     # its errors first: they name the fix
        if ctx.head != "text" and NEED_CLASS_TEXT not in ctx.loss_needs:
            raise ClipftUsageError(
                f"{STRATEGY} compares the class prompts each step encodes with the frozen model's, but with "
                f"--head {ctx.head or 'none'} and --loss {ctx.loss} no step encodes them; use --head text")
        w_frozen = frozen_class_text(model, ctx, opts.templates)
    elif training and opts.image_weight > 0:
        check_prompt_context(ctx, STRATEGY)
    options = options_to_dict(opts)
    learner, text_sel = install_prompt_learner(
        model, ctx, STRATEGY, init=opts.init, n_ctx=opts.n_ctx, options=options, n_random=opts.n_ctx, std=STD,
        depth=opts.depth)
    prompts, vision_params = install_vision_prompts(model, STRATEGY, opts.n_vision, opts.depth, 0.0, options,
                                                    std=STD, export_file=VISION_FILE)
    params = [p for sel in text_sel for p in sel.params] + vision_params
    if opts.gpa:
        from clipft_promptsrc.gpa import GaussianPromptAggregate

        if getattr(model, GPA_ATTR, None) is not None:
            raise ClipftUsageError(f"the model already has {STRATEGY}'s prompt aggregate; give --strategy "
                                   f"{STRATEGY} once")
        model.add_module(GPA_ATTR, GaussianPromptAggregate(model, [n for n, _ in params], opts.gpa_mean,
                                                           opts.gpa_std))
    return [Selection(STRATEGY, params)], w_frozen
