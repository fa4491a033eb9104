"""Putting LoRA adapters into open_clip's transformer blocks."""
from __future__ import annotations

from clipft.errors import ClipftUsageError

from clipft_lora.layers import QKV, adapt_attention, adapt_linear, adapted_layers

#: tower kinds (clipft.anatomy) whose blocks are open_clip ResidualAttentionBlocks
SUPPORTED_KINDS = ("vit", "text-transformer")


def _blocks(model, tower):
    from clipft.anatomy import get_path
    owner = get_path(model, tower.path) if tower.path else model
    transformer = getattr(owner, "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    if tower.kind not in SUPPORTED_KINDS or blocks is None:
        other = "text" if tower.side == "vision" else "vision"
        raise ClipftUsageError(
            f"lora adapts transformer blocks with nn.MultiheadAttention, but the {tower.label} "
            f"has none (it is a {tower.kind} tower); use tower={other}")
    return list(blocks)


def inject(model, opts) -> list:
    """Attach adapters as ``opts`` asks; returns the new ``[(name, Parameter)]``."""
    from torch import nn

    from clipft.anatomy import describe

    if adapted_layers(model):
        raise ClipftUsageError("the model already has LoRA adapters; give --strategy lora once")
    anatomy = describe(model)
    attn_targets = [t for t in opts.targets if t in QKV + ("out",)]
    plan = []
    for tower in anatomy.towers(opts.tower):
        blocks = _blocks(model, tower)
        if opts.layers != "all":
            n = int(opts.layers)
            if n > len(blocks):
                raise ClipftUsageError(
                    f"lora: layers={n} exceeds the depth of the {tower.label}: it has "
                    f"{len(blocks)} blocks; use layers between 1 and {len(blocks)} or layers=all")
            blocks = blocks[len(blocks) - n:]
        for block in blocks:
            attn = getattr(block, "attn", None)
            if attn_targets:
                if type(attn) is not nn.MultiheadAttention:
                    raise ClipftUsageError(
                        f"lora: the blocks of the {tower.label} use {type(attn).__name__} attention, "
                        "not nn.MultiheadAttention; only targets=mlp works there")
                plan.append(("attn", attn))
            if "mlp" in opts.targets:
                mlp = getattr(block, "mlp", None)
                linears = [getattr(mlp, n, None) for n in ("c_fc", "c_proj")]
                if any(type(lin) is not nn.Linear for lin in linears):
                    raise ClipftUsageError(
                        f"lora: the MLP of the {tower.label} blocks is not c_fc/c_proj nn.Linear; "
                        "drop mlp from targets")
                plan.extend(("linear", lin) for lin in linears)
    # a rank above a layer's smaller side adds nothing a full update lacks, and a
    # typo such as r=100000000 would try to allocate terabytes: refuse it here
    widths = [m.embed_dim if kind == "attn" else min(m.in_features, m.out_features)
              for kind, m in plan]
    if widths and opts.r > min(widths):
        raise ClipftUsageError(f"lora: r={opts.r} exceeds the width of the layers it adapts (the smallest "
                               f"is {min(widths)}); use r between 1 and {min(widths)} (2 to 64 is usual)")
    for kind, module in plan:
        try:
            if kind == "attn":
                adapt_attention(module, attn_targets, opts.r, opts.alpha, opts.dropout, opts.dora)
            else:
                adapt_linear(module, opts.r, opts.alpha, opts.dropout, opts.dora)
        except TypeError as exc:
            raise ClipftUsageError(f"lora: cannot adapt this layer: {exc}") from None
    adapters = {id(p) for _, layer in adapted_layers(model) for p in layer.lora.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) in adapters]
