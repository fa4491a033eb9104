"""MaPLe's learner; imported by :meth:`clipft_maple.Maple.apply` (it imports torch).

:class:`MapleLearner` is a :class:`clipft.prompt_kit.PromptLearner` (the
class-prompt encoder, deep text context included) with the coupling layers;
while installed it also holds forward hooks on the vision transformer that
insert the projected prompts after the class token, overwrite them at blocks
1..J-1 and drop them at the transformer's output (so pooling, ``ln_post`` and
the projection see the usual tokens). The hooks keep the image tower live in
the frozen-tower cache, as they must: its prompts train.
"""
from __future__ import annotations

import torch
from torch import nn

from clipft.errors import ClipftUsageError
from clipft.options import options_to_dict
from clipft.prompt_kit import (RANDOM_STD, PromptLearner, Tokens, build_rows, check_prompt_context,
                               initial_context, text_blocks_of)
from clipft.protocols import install
from clipft.specs import Selection

STRATEGY = "maple"


class MapleLearner(PromptLearner):
    """Text context ``ctx`` ``[n, Wt]`` and ``deep_ctx`` ``[J-1, n, Wt]``;
    ``couple[j]`` maps block j's text context to its vision prompts ``[n, Wv]``.
    ``fixed``: the words of ``init`` after the context, kept between it and the
    class name."""

    def __init__(self, ctx, placeholder, fixed: str, classnames, options, deep_ctx, vision_width: int):
        super().__init__(ctx, placeholder, "end", classnames, options, STRATEGY, deep_ctx)
        self.fixed = fixed
        depth = 1 if deep_ctx is None else 1 + deep_ctx.shape[0]
        self.couple = nn.ModuleList(nn.Linear(ctx.shape[-1], vision_width) for _ in range(depth)).to(ctx.device)

    def rows_for(self, tokenizer, classnames, device):
        names = tuple(f"{self.fixed} {c}" for c in classnames) if self.fixed else tuple(classnames)
        return super().rows_for(tokenizer, names, device)

    def vision_prompts(self, layer: int) -> torch.Tensor:
        """Block ``layer``'s vision prompts ``[n, Wv]``, projected from its text context."""
        text = self.ctx if layer == 0 else self.deep_ctx[layer - 1]
        return self.couple[layer](text)

    # -- the vision hooks ---------------------------------------------------------------
    def hook_vision(self, visual) -> None:
        prefix = 1 if getattr(visual, "class_embedding", None) is not None else 0
        n = self.n_ctx

        def tokens(layer, x):
            return self.vision_prompts(layer).to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)

        def insert(module, args, kwargs):
            x = args[0]
            return (torch.cat([x[:, :prefix], tokens(0, x), x[:, prefix:]], dim=1), *args[1:]), kwargs

        def replacer(layer):
            def replace(module, args, kwargs):
                x = args[0]
                return (torch.cat([x[:, :prefix], tokens(layer, x), x[:, prefix + n:]], dim=1), *args[1:]), kwargs
            return replace

        def remove(module, args, kwargs, output):
            return torch.cat([output[:, :prefix], output[:, prefix + n:]], dim=1)

        blocks = visual.transformer.resblocks
        self.__dict__["_handles"] = [
            visual.transformer.register_forward_pre_hook(insert, with_kwargs=True),
            visual.transformer.register_forward_hook(remove, with_kwargs=True),
        ] + [blocks[j].register_forward_pre_hook(replacer(j), with_kwargs=True) for j in range(1, self.depth)]

    def uninstall(self) -> None:
        for handle in self.__dict__.pop("_handles", []):
            handle.remove()

    def export_info(self) -> dict:
        return {**super().export_info(), "kind": "maple-prompts", "depth": self.depth}


def install_maple(model, ctx, opts):
    """MaPLe's ``apply``: checks, initialisation, installation; the selections."""
    visual = model.visual
    if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
        raise ClipftUsageError(f"strategy '{STRATEGY}' prompts a vision transformer; this model's image tower "
                               f"is {type(visual).__name__}, with no token sequence")
    if ctx.loss is not None:
        check_prompt_context(ctx, STRATEGY)
    n_text, n_vision = len(text_blocks_of(model, STRATEGY)), len(visual.transformer.resblocks)
    if opts.depth > min(n_text, n_vision):
        raise ClipftUsageError(f"strategy '{STRATEGY}': depth={opts.depth}, but the text transformer has {n_text} "
                               f"blocks and the vision transformer {n_vision}")
    tokens = Tokens(ctx.tokenizer, STRATEGY)
    fixed = ""
    init = opts.init
    if init is not None:
        words = init.split()
        init, fixed = " ".join(words[:opts.n_ctx]), " ".join(words[opts.n_ctx:])
        if len(words) < opts.n_ctx or len(tokens.ids(init)) != opts.n_ctx:
            raise ClipftUsageError(f"strategy '{STRATEGY}': n_ctx={opts.n_ctx} context vectors from init "
                                   f"{opts.init!r} need its first {opts.n_ctx} words to be {opts.n_ctx} tokens")
    vectors, placeholder = initial_context(model, tokens, init, opts.n_ctx, STRATEGY, std=RANDOM_STD)
    names = [f"{fixed} {c}" if fixed else c for c in ctx.classnames]
    build_rows(tokens, names, opts.n_ctx, "end", placeholder)        # fits? a clear error now
    deep = None
    if opts.depth > 1:
        deep = torch.empty(opts.depth - 1, *vectors.shape).normal_(0.0, RANDOM_STD).to(vectors.device)
    learner = MapleLearner(vectors, placeholder, fixed, list(ctx.classnames), options_to_dict(opts), deep,
                           visual.conv1.out_channels)
    slot = install(model, learner)
    learner.hook_vision(visual)
    return [Selection(STRATEGY, [(f"{slot}.{name}", p) for name, p in learner.named_parameters()])]
