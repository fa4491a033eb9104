"""Strategy ``clip-adapter``: CLIP-Adapter (Gao et al., 2021, arXiv:2110.04544).

CLIP stays frozen. A bottleneck MLP ``A(x) = ReLU(ReLU(x W1) W2)`` (``W1``:
D -> D/reduction, ``W2``: back to D, no biases) is blended with the embedding it
reads by a residual ratio ``a``::

    x' = a * A(x) + (1 - a) * x

on the image embedding (``encode_image``'s output, before L2 normalisation)
and, with ``text=true``, on the text embedding as well (the paper's textual
adapter, with its own ratio). The adapters sit in the model's embedding slots
(:func:`clipft.install`), so the frozen towers' outputs are cached and the
adapters run live on the cached embeddings; each adapter exports itself to a
file of its own (plain open_clip drops it, ``load_export`` puts it back).
"""
from __future__ import annotations

from typing import Optional

import attrs

from clipft import Selection, Strategy, StrategySpec, hookimpl
from clipft.options import at_least_one

#: export files, one per adapter
IMAGE_FILE = "clip_adapter_image.safetensors"
TEXT_FILE = "clip_adapter_text.safetensors"


def _ratio(inst, attribute, value):
    if value is not None and not 0.0 < value <= 1.0:
        raise ValueError(f"{attribute.name} must be in (0, 1], got {value}")


def _sides(inst, attribute, value):
    if not (inst.image or inst.text):
        raise ValueError("image and text are both false: the adapter must go on at least one embedding")


@attrs.frozen
class ClipAdapterOptions:
    ratio: float = attrs.field(default=0.2, validator=_ratio, metadata={"help": (
        "residual ratio a of the image adapter: x' = a*A(x) + (1-a)*x (the paper: 0.2 for "
        "generic images, 0.6 for fine-grained or far-from-CLIP data)")})
    reduction: int = attrs.field(default=4, validator=at_least_one, metadata={"help": (
        "bottleneck width is the embedding width divided by this (the paper's best: 4)")})
    image: bool = attrs.field(default=True, metadata={"help": "adapt the image embedding"})
    text: bool = attrs.field(default=False, validator=_sides, metadata={"help": (
        "also adapt the text embedding (the paper's textual adapter; class prompts and captions)")})
    text_ratio: Optional[float] = attrs.field(default=None, validator=_ratio, metadata={"help": (
        "residual ratio of the text adapter; default: ratio")})


class ClipAdapter(Strategy):
    def __init__(self, opts: ClipAdapterOptions):
        self.opts = opts

    def apply(self, model, ctx):
        import clipft
        from clipft.errors import ClipftUsageError
        from clipft.options import options_to_dict

        from clipft_clip_adapter.adapters import ImageAdapter, TextAdapter

        opts = self.opts
        # the text adapter trains through text features: paired text (contrastive)
        # or a head that encodes the class prompts live (text); a weight head's
        # logits never reach it
        if (opts.text and ctx.loss is not None and "text" not in ctx.loss_needs
                and ctx.head in (None, "linear", "zero-shot")):
            raise ClipftUsageError(
                f"clip-adapter:text=true trains an adapter on the text embedding, but --loss {ctx.loss} "
                f"only sees the {ctx.head or 'missing'} head's own weights, so it would never train; "
                "use --head text (or the contrastive loss)")
        dim = ctx.embed_dim
        hidden = max(1, dim // opts.reduction)
        options = options_to_dict(opts)
        params = []
        sides = [(opts.image, ImageAdapter, opts.ratio, 0),
                 (opts.text, TextAdapter, opts.ratio if opts.text_ratio is None else opts.text_ratio, 1)]
        for wanted, cls, ratio, offset in sides:
            if not wanted:
                continue
            # the same shapes from the options and the seed every time apply runs
            # (a run, its resume, load_run, load_export)
            adapter = cls(dim, hidden, ratio, ctx.seed * 2 + offset, options).to(ctx.device)
            slot = clipft.install(model, adapter)
            params += [(f"{slot}.{n}", p) for n, p in adapter.named_parameters()]
        return [Selection("clip-adapter", params)]


@hookimpl
def clipft_register_strategies(register):
    register(StrategySpec(
        name="clip-adapter",
        summary="CLIP-Adapter: residual bottleneck MLPs on the image (and text) embedding; CLIP frozen, "
                "image tower cached. Use with --head text (the paper's objective).",
        options=ClipAdapterOptions,
        build=ClipAdapter,
        default_lr=1e-3,
    ))
