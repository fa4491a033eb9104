"""Speed and memory switches of a run: precision support, gradient
checkpointing, torch.compile.

Defaults were measured, not assumed (README "Performance"): on the 2-core CPU
this project is developed on, fp32 stays the default precision (bf16 autocast
changes the numbers a run produces, and where a CPU lacks native bf16 it is
emulated and slow); ``--precision bf16`` is there for CPUs with AMX/AVX512-BF16
and for GPUs.
"""
from __future__ import annotations

import torch

from clipft.errors import ClipftUsageError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def native_precisions(device: torch.device) -> dict:
    """Which autocast precisions the device runs natively (fast), by name."""
    if device.type == "cuda":
        return {"fp32": True, "bf16": bool(torch.cuda.is_bf16_supported()), "fp16": True}
    ok = {"fp32": True, "bf16": False, "fp16": False}
    try:
        ok["bf16"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        ok["fp16"] = bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        pass
    return ok


def check_precision(device: torch.device, precision: str) -> None:
    """A usage error when the device cannot autocast to ``precision`` at all.
    (On a CPU without native support bf16/fp16 still run, emulated and slow.)"""
    if precision == "fp32":
        return
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ClipftUsageError(
                "--precision bf16: this GPU has no bf16 support; use --precision fp16 or fp32")
        return
    if device.type == "cpu":
        if not torch.amp.is_autocast_available("cpu"):
            raise ClipftUsageError(f"--precision {precision}: this torch build has no CPU autocast")
        return
    raise ClipftUsageError(f"--precision {precision} is not supported on device '{device.type}'")


def grad_scaler(device: torch.device, precision: str):
    """fp16 needs loss scaling (its gradients underflow); bf16 and fp32 do not."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def enable_grad_checkpointing(model) -> bool:
    """open_clip's own switch: blocks recompute their activations in backward.
    Returns False when the model has none."""
    fn = getattr(model, "set_grad_checkpointing", None)
    if fn is None:
        return False
    fn(True)
    return True


def compile_blocks(model) -> int:
    """Compile each transformer block in place (``nn.Module.compile``), so the
    identical blocks share one compiled graph and parameter names, state dicts
    and the block-wise frozen-prefix cache keep working. A tower without
    transformer blocks (ModifiedResNet, timm) is compiled as a whole. Returns the
    number of modules compiled (compilation itself happens on first use)."""
    from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

    count = 0
    for m in model.modules():
        if isinstance(m, (ResidualAttentionBlock, CustomResidualAttentionBlock)):
            m.compile()
            count += 1
    visual = getattr(model, "visual", None)
    if visual is not None and not any(isinstance(m, (ResidualAttentionBlock, CustomResidualAttentionBlock))
                                       for m in visual.modules()):
        visual.compile()
        count += 1
    return count


def apply_speed_options(model, config) -> dict:
    """Apply ``grad_checkpointing`` and ``compile`` from the config; returns
    what was done (for the summary)."""
    done = {}
    if getattr(config, "grad_checkpointing", False):
        if not enable_grad_checkpointing(model):
            raise ClipftUsageError(f"--grad-checkpointing: model '{config.model}' does not support it")
        done["grad_checkpointing"] = True
    if getattr(config, "compile", False):
        done["compiled_modules"] = compile_blocks(model)
    return done


# -- text: do not run the padding ------------------------------------------------
def text_trim_length(model, tokens: torch.Tensor):
    """How many leading token positions ``encode_text`` needs, or None when the
    full row is needed (or the model is not one this applies to).

    CLIP's text tower is causal (position i attends to positions <= i) and pools
    at the end-of-text token, so the padding after the last end-of-text token of
    a batch never influences the result: cutting it off gives the same
    embedding up to float rounding, at a fraction of the cost (a class prompt
    or caption is ~10 of 77 positions; attention cost is quadratic in length).
    """
    from open_clip.model import CLIP

    if "encode_text" in model.__dict__ or type(model).encode_text is not CLIP.encode_text:
        return None
    return causal_text_length(model, tokens)


def causal_text_length(model, tokens: torch.Tensor):
    """The cut of :func:`text_trim_length` for a model whose text path is CLIP's
    (the caller vouches for that): None unless pooling and mask allow it."""
    pool = getattr(model, "text_pool_type", None)
    if pool == "argmax":
        last = tokens.argmax(dim=-1)
    elif pool == "eos" and getattr(model, "text_eos_id", None) is not None:
        last = (tokens == model.text_eos_id).int().argmax(dim=-1)
    else:
        return None
    if not _is_causal(getattr(model, "attn_mask", None), tokens.shape[1]):
        return None
    length = int(last.max()) + 1
    return length if length < tokens.shape[1] else None


def _is_causal(mask, length: int) -> bool:
    if mask is None or mask.ndim != 2 or mask.shape[0] != length or mask.shape[1] != length:
        return False
    blocked = torch.isinf(mask) & (mask < 0)
    upper = torch.ones(length, length, dtype=torch.bool, device=mask.device).triu(1)
    return bool(torch.equal(blocked, upper)) and bool((mask[~upper] == 0).all())


def encode_text_trimmed(model, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` without the trailing padding (see
    :func:`text_trim_length`); falls back to ``encode_text`` when it does not apply.
    The token embedding still sees the full rows, so hooks on it (prompt
    learners) work unchanged."""
    length = text_trim_length(model, tokens)
    if length is None:
        return model.encode_text(tokens)
    return encode_text_prefix(model, tokens, length)


def encode_text_prefix(model, tokens: torch.Tensor, length: int) -> torch.Tensor:
    """CLIP's ``encode_text`` run on the first ``length`` positions only."""
    from open_clip.transformer import text_global_pool

    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding.to(cast_dtype)
    x = x[:, :length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens[:, :length], model.text_pool_type,
                         eos_token_id=getattr(model, "text_eos_id", None))
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Module) else x @ proj
    return x
