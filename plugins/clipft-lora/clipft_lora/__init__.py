"""Strategy ``lora``: low-rank adapters in the transformer blocks (seed Strategy 7).

Adapters go on the attention projections, chosen one by one among q, k and v
(row blocks of ``nn.MultiheadAttention``'s packed ``in_proj_weight``) and
``out`` (``out_proj``), and optionally on the MLP linears (``mlp``: ``c_fc`` and
``c_proj``), in the vision tower, the text tower or both, in every block or the
last n. Each adapter is ``s·B A`` with ``s = alpha / r``, ``A`` Kaiming-uniform
and ``B`` zero, so at step 0 the model computes exactly what the base model
computes. Only the adapters train. See :mod:`clipft_lora.layers` for how the
packed projection is adapted, and :func:`clipft_lora.layers.merge`,
``unmerge`` and ``fold`` for merging.

Defaults follow CLIP-LoRA (Zanella & Ben Ayed, 2024): q, k, v in every block
of both towers, r=2, alpha=1, dropout 0.25, AdamW at lr 2e-4. ``dora=true``: DoRA
(Liu et al., 2024), see :mod:`clipft_lora.layers`.
"""
from __future__ import annotations

from typing import Literal

import attrs

from clipft import Selection, Strategy, StrategySpec, hookimpl
from clipft.options import at_least_one, unit_fraction

TARGETS = ("q", "k", "v", "out", "mlp")


def _targets(value):
    items = value.split(",") if isinstance(value, str) else list(value)
    items = tuple(dict.fromkeys(str(v).strip().lower() for v in items if str(v).strip()))
    bad = [t for t in items if t not in TARGETS]
    if bad or not items:
        raise ValueError(f"targets must be a non-empty subset of {', '.join(TARGETS)}; got {list(items) or 'nothing'}")
    return items


def _layers(value):
    text = str(value).strip().lower()
    if text == "all":
        return "all"
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"layers must be 'all' or a positive number of last blocks, got {value!r}")
    return str(n)


def _alpha(inst, attribute, value):
    if value <= 0:
        raise ValueError(f"alpha must be > 0, got {value}")


@attrs.frozen
class LoraOptions:
    r: int = attrs.field(default=2, validator=at_least_one, metadata={"help": "rank of each adapter"})
    alpha: float = attrs.field(default=1.0, validator=_alpha, metadata={"help": (
        "scaling numerator: the adapter is scaled by alpha / r")})
    dropout: float = attrs.field(default=0.25, validator=unit_fraction, metadata={"help": (
        "dropout on the input of each adapter (training only)")})
    targets: tuple = attrs.field(default=("q", "k", "v"), converter=_targets, metadata={"help": (
        "any of q, k, v (rows of the packed in_proj_weight), out (out_proj), mlp (c_fc, c_proj); "
        "inline as targets=q,v")})
    tower: Literal["vision", "text", "both"] = attrs.field(default="both", metadata={"help": (
        "the tower(s) to adapt")})
    layers: str = attrs.field(default="all", converter=_layers, metadata={"help": (
        "all blocks, or N for the last N blocks of each chosen tower")})
    dora: bool = attrs.field(default=False, metadata={"help": (
        "DoRA (Liu et al. 2024): W' = m * (W + s*BA) / ||W + s*BA|| with a learned magnitude m, "
        "one per output feature (row norm of the [out, in] weight), initialised to ||W||; "
        "merges exactly on export")})


class Lora(Strategy):
    def __init__(self, opts: LoraOptions):
        self.opts = opts

    def apply(self, model, ctx):
        from clipft_lora.inject import inject
        params = inject(model, self.opts)
        return [Selection("lora", params)]


@hookimpl
def clipft_register_strategies(register):
    register(StrategySpec(
        name="lora",
        summary="LoRA adapters on attention (q, k, v, out, chosen separately) and MLP linears "
                "(dora=true: DoRA); only the adapters train; merge into plain open_clip weights with "
                "`clipft export`.",
        options=LoraOptions,
        build=Lora,
        default_lr=2e-4,  # CLIP-LoRA
    ))
