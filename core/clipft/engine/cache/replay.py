"""Replaying the image tower around a cut: the frozen prefix (computed once and
cached) and the live suffix (run every step on the cached value).

The cut points, from cheapest to replay to most expensive:

``output``    the whole tower is frozen: the cached value is ``encode_image``'s
              output itself.
``pre-proj``  only the projection trains: the cached value is the pooled trunk
              output. ViT: ``pooled @ visual.proj``. ModifiedResNet: the
              attention-pool output *before* ``attnpool.c_proj``.
``blocks:k``  ViT blocks ``k..`` train: the cached value is the token sequence
              entering block ``k``.

The prefix of ``blocks:k`` uses open_clip's public ``forward_intermediates``.
The rest has no public entry point in open_clip (pooling before the
projection, blocks from ``k`` on), so it calls ``_embeds``/``_pool`` and runs
the blocks exactly as ``Transformer.forward`` does; :mod:`.plan` only offers a
cut when those methods are open_clip's own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class ImageCut:
    """The frozen prefix of the image tower and how to finish it live."""

    kind = "output"

    def describe(self) -> str:
        return self.kind

    def prefix_modules(self, model) -> list:
        """Modules (and parameters) whose outputs the cache replaces."""
        return [model.visual]

    def bypassed_modules(self, model) -> list:
        """Modules whose ``__call__`` the stage-by-stage replay skips (their hooks
        would not run, so they must have none)."""
        return []

    def prefix(self, model, images: torch.Tensor) -> torch.Tensor:
        return model.encode_image(images)

    def suffix(self, model, cached: torch.Tensor) -> torch.Tensor:
        """``encode_image``'s (un-normalised) output from a cached prefix value."""
        return cached


class VitProjCut(ImageCut):
    kind = "pre-proj"

    def bypassed_modules(self, model):
        return [model.visual, model.visual.transformer]

    def prefix_modules(self, model):
        return [*vit_stem(model.visual), model.visual.transformer, model.visual.ln_post]

    def prefix(self, model, images):
        v = model.visual
        pooled, _ = v._pool(vit_blocks(v, v._embeds(images), 0, len(v.transformer.resblocks)))
        return pooled

    def suffix(self, model, cached):
        return _apply_proj(model.visual.proj, cached)


class VitBlocksCut(VitProjCut):
    kind = "blocks"

    def __init__(self, start: int):
        self.start = start

    def describe(self):
        return f"blocks:{self.start}"

    def prefix_modules(self, model):
        return [*vit_stem(model.visual), *model.visual.transformer.resblocks[:self.start]]

    def prefix(self, model, images):
        # the token sequence after block start-1, class token included
        out = model.visual.forward_intermediates(
            images, indices=[self.start - 1], stop_early=True, intermediates_only=True,
            output_fmt="NLC", output_extra_tokens=True)
        return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)

    def suffix(self, model, cached):
        v = model.visual
        pooled, _ = v._pool(vit_blocks(v, cached, self.start, len(v.transformer.resblocks)))
        return _apply_proj(v.proj, pooled)


class ResNetProjCut(ImageCut):
    kind = "pre-proj"

    def bypassed_modules(self, model):
        return [model.visual, model.visual.attnpool]

    def prefix_modules(self, model):
        v = model.visual
        pool = v.attnpool
        return [v.conv1, v.bn1, v.conv2, v.bn2, v.conv3, v.bn3, v.layer1, v.layer2, v.layer3,
                v.layer4, pool.q_proj, pool.k_proj, pool.v_proj, pool.positional_embedding]

    def prefix(self, model, images):
        v = model.visual
        x = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(images)))))
        return _attnpool_before_c_proj(v.attnpool, x)

    def suffix(self, model, cached):
        c = model.visual.attnpool.c_proj
        return F.linear(cached, c.weight, c.bias)


def vit_stem(v) -> list:
    """A ViT's parts below its first block."""
    return [v.conv1, v.class_embedding, v.positional_embedding, v.patch_dropout, v.ln_pre]


def _apply_proj(proj, pooled):
    if proj is None:
        return pooled
    if isinstance(proj, torch.nn.Module):
        return proj(pooled)
    return pooled @ proj


def vit_blocks(visual, x, start: int, stop: int):
    """Blocks ``start..stop-1`` exactly as open_clip's ``Transformer.forward``
    runs them (batch-first in and out, gradient checkpointing honoured)."""
    from torch.utils.checkpoint import checkpoint
    tr = visual.transformer
    if not tr.batch_first:
        x = x.transpose(0, 1).contiguous()
    for blk in tr.resblocks[start:stop]:
        if tr.grad_checkpointing:
            x = checkpoint(blk, x, None, None, None, use_reentrant=False)
        else:
            x = blk(x, attn_mask=None)
    if not tr.batch_first:
        x = x.transpose(0, 1)
    return x


def _attnpool_before_c_proj(pool, x):
    """``AttentionPool2d.forward`` with the output projection left out: the
    concatenated head outputs of the pooled (mean) query. The identity in place
    of ``c_proj`` is exact (each output is one product by 1 plus zeros)."""
    x = x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3]).permute(2, 0, 1)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
    x = x + pool.positional_embedding[:, None, :].to(x.dtype)
    width = x.shape[-1]
    eye = torch.eye(width, dtype=pool.q_proj.weight.dtype, device=x.device)
    out, _ = F.multi_head_attention_forward(
        query=x, key=x, value=x, embed_dim_to_check=width, num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight,
        v_proj_weight=pool.v_proj.weight, in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.,
        out_proj_weight=eye, out_proj_bias=torch.zeros_like(pool.q_proj.bias),
        use_separate_proj_weight=True, training=pool.training, need_weights=False)
    return out[0]
