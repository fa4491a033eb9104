"""Speed and memory switches of a run: precision support, gradient
checkpointing, torch.compile.

Defaults were measured, not assumed (docs/performance.md): on the 2-core CPU
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


def effective_precision(device: torch.device, precision: str) -> str:
    """``auto``: bf16 autocast on a CUDA device that supports it, fp16 (with a
    grad scaler) on older GPUs, fp32 on the CPU (exact, and what the tests pin)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def set_tf32(device: torch.device, precision: str, allow: bool) -> bool:
    """TF32 matmuls and convolutions for fp32 on Ampere or newer (10-bit
    mantissa in the multiply, fp32 accumulate: ~8x the fp32 throughput);
    ``allow=False`` (``--no-tf32``) keeps full fp32. Returns whether it is on."""
    on = bool(allow and precision == "fp32" and device.type == "cuda"
              and torch.cuda.get_device_capability(device)[0] >= 8)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on
    return on


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
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


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
    blocks = (ResidualAttentionBlock, CustomResidualAttentionBlock)
    count = 0
    for m in model.modules():
        if isinstance(m, blocks):
            m.compile()
            count += 1
    visual = getattr(model, "visual", None)
    if visual is not None and not any(isinstance(m, blocks) for m in visual.modules()):
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
