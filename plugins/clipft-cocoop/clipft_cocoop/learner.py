"""The conditional prompt learner of CoCoOp.

For image ``b`` and class ``c`` the prompt is ``[SOT] (v_1 + pi_b) .. (v_n + pi_b)
name_c . [EOT]``: the learned context ``v`` (CoOp's), shifted by ``pi_b =
meta_net(f_b)``, a two-layer network of the image's normalised embedding, so
the text tower encodes ``B x C`` prompts per batch.

Two ways through the text tower, the same maths:

- **direct** (open_clip's own ``CLIP`` text path): the class rows' token
  embeddings are looked up once, the shifted context is spliced in for every
  image, and :func:`clipft.encode.encode_token_embeddings` runs the causal
  tower on the positions up to the last end-of-text token only;
- **hooked** (any other text tower with open_clip's ``token_embedding``): the
  prompt learner's way, a forward hook on ``token_embedding`` that splices the
  context into ``B x C`` full rows for one ``encode_text`` call.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from clipft.encode import causal_text_length, encode_token_embeddings
from clipft.prompt_kit import ContextLearner, token_embedding_of

#: False forces the hooked path (the timing script compares both)
DIRECT = True


def _direct_ok(model) -> bool:
    from open_clip.model import CLIP
    return (DIRECT and "encode_text" not in model.__dict__ and type(model).encode_text is CLIP.encode_text
            and isinstance(getattr(model, "token_embedding", None), nn.Embedding))


class ConditionalPromptLearner(ContextLearner):
    """CoCoOp's prompt learner: ``ctx`` ``[n_ctx, W]`` and ``meta_net``
    (``Linear(D, D // reduction)``-ReLU-``Linear(D // reduction, W)``).
    Called with ``image_features`` ``[B, D]`` it returns ``[B, C, D]``; without,
    the unshifted context's prompts ``[C, D]`` (as CoOp's)."""

    conditional = True
    export_file = "cocoop_prompts.safetensors"

    def __init__(self, ctx: torch.Tensor, placeholder: list[int], position: str, classnames: list[str],
                 options: dict, embed_dim: int, reduction: int, seed: int):
        super().__init__(ctx, placeholder, position, classnames, options, strategy="cocoop")
        width = int(ctx.shape[1])
        hidden = max(1, embed_dim // reduction)
        # nn.Linear's own initialisation, drawn from a generator of its own: the
        # run's global random stream is left as a CoOp run leaves it
        with torch.random.fork_rng(devices=[]):
            self.meta_net = nn.Sequential(OrderedDict([
                ("linear1", nn.Linear(embed_dim, hidden)), ("relu", nn.ReLU()),
                ("linear2", nn.Linear(hidden, width))]))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in (self.meta_net.linear1, self.meta_net.linear2):
                w = torch.empty(layer.weight.shape)
                nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=gen)
                bound = 1.0 / math.sqrt(layer.in_features)
                b = torch.empty(layer.bias.shape).uniform_(-bound, bound, generator=gen)
                layer.weight.copy_(w)
                layer.bias.copy_(b)

    def shifts(self, image_features: torch.Tensor) -> torch.Tensor:
        """``pi = meta_net(f)`` ``[B, W]``, for normalised image features ``f``."""
        return self.meta_net(image_features.to(self.ctx.dtype))

    def forward(self, model, tokenizer, classnames, templates=None, image_features=None) -> torch.Tensor:
        rows, index = self.rows_for(tokenizer, tuple(classnames), self.ctx.device)
        if image_features is None:
            return self._encode(model, rows, index, self.ctx.unsqueeze(0))[0]
        contexts = self.ctx.unsqueeze(0) + self.shifts(image_features).unsqueeze(1)   # [B, n_ctx, W]
        return self._encode(model, rows, index, contexts)

    def _encode(self, model, rows, index, contexts) -> torch.Tensor:
        """``[B, C, D]`` for ``contexts`` ``[B, n_ctx, W]`` and class rows ``[C, L]``."""
        n_images, n_classes = contexts.shape[0], rows.shape[0]
        tokens = rows.repeat(n_images, 1)                                 # row b * C + c
        safe = index.clamp(min=0)
        if _direct_ok(model):
            length = causal_text_length(model, rows) or rows.shape[1]
            base = model.token_embedding(rows[:, :length])                # [C, L', W], once
            spliced = contexts[:, safe[:, :length]]                       # [B, C, L', W]
            is_ctx = (index[:, :length] >= 0)[None, :, :, None]
            x = torch.where(is_ctx, spliced.to(base.dtype), base.unsqueeze(0))
            out = encode_token_embeddings(model, x.reshape(n_images * n_classes, length, -1), tokens)
        else:
            emb_module = token_embedding_of(model, self.strategy)
            spliced = contexts[:, safe].reshape(n_images * n_classes, rows.shape[1], -1)
            is_ctx = (index >= 0).repeat(n_images, 1).unsqueeze(-1)

            def splice(module, args, output):
                return torch.where(is_ctx, spliced.to(output.dtype), output)

            handle = emb_module.register_forward_hook(splice)
            try:
                out = model.encode_text(tokens)
            finally:
                handle.remove()
        return out.reshape(n_images, n_classes, -1)

    def export_info(self) -> dict:
        return {**super().export_info(), "conditional": True}
