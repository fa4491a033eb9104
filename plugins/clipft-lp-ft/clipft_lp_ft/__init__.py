"""Strategy ``lp-ft``: LP-FT (Kumar, Raghunathan, Jones, Ma and Liang, ICLR 2022,
"Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution").

Fine-tuning a pretrained model with a randomly initialised head changes the
features while the head is still bad, which distorts them; LP-FT first fits the
head on the frozen features (a linear probe), then fine-tunes from that head.
Here that is two stages of one run (the engine's stages, ``clipft.specs.Stage``):

1. ``probe`` (``probe_epochs`` epochs): only the head trains; the model is
   frozen, so the engine caches both towers' embeddings and the probe trains on
   them (at ``probe_lr``);
2. ``fine-tune`` (the rest of ``--epochs``): the strategy named by ``then``
   (``full``, ``last-n:n=2``, ``lora``, ...) trains, and the head keeps training
   from where the probe left it, at ``--lr`` (or ``then``'s default rate).

The run needs a head and a loss that trains it (``cross-entropy``, the default
with a head). ``--epochs`` counts both stages. ``then`` takes one strategy with its
options; for options with commas use the config file (``then = "lora:r=4,targets=q,v"``)
or ``[[stages]]`` tables.
"""
from __future__ import annotations

import attrs

from clipft import Strategy, StrategySpec, hookimpl
from clipft.options import at_least_one, parse_ref, positive


def _then(inst, attribute, value):
    try:
        ref = parse_ref(value)
    except Exception as exc:  # noqa: BLE001 - reported as the option's error
        raise ValueError(f"then must be a strategy such as full or last-n:n=2: {exc}") from None
    if ref.name in ("lp-ft", "none"):
        raise ValueError(f"then must name the strategy that fine-tunes (full, last-n:n=2, ...), got {value!r}")


@attrs.frozen
class LpFtOptions:
    probe_epochs: int = attrs.field(default=1, validator=at_least_one, metadata={"help": (
        "epochs of the linear probe (head only, frozen and cached towers); --epochs counts them")})
    then: str = attrs.field(default="full", validator=_then, metadata={"help": (
        "the strategy that fine-tunes after the probe, with its options: full, last-n:n=2, lora, ...")})
    probe_lr: float = attrs.field(default=1e-3, validator=positive, metadata={"help": (
        "learning rate of the probe (the fine-tuning stage uses --lr, or then's default)")})


class LpFt(Strategy):
    def __init__(self, opts: LpFtOptions):
        self.opts = opts

    def stages(self):
        from clipft.specs import Stage
        return [Stage("probe", epochs=self.opts.probe_epochs, strategies=(), lr=self.opts.probe_lr),
                Stage("fine-tune", epochs=None, strategies=(self.opts.then,))]


@hookimpl
def clipft_register_strategies(register):
    register(StrategySpec(
        name="lp-ft",
        summary="LP-FT: a linear probe on frozen (cached) features, then fine-tuning with the "
                "strategy `then` from that head.",
        options=LpFtOptions,
        build=LpFt,
        default_lr=None,
    ))
