"""Strategy modifier ``ema``: an exponential moving average of the trained weights.

After every optimizer step ``t`` (1-based) each trained parameter's average is

    ema = param                              while t <= start_step
    ema = decay * ema + (1 - decay) * param  after that (``ema.lerp_(param, 1 - decay)``)

starting from the weights training starts from. With ``use_for_eval=true``
(the default) the run's evaluations (``eval.before``/``eval.after`` and every
epoch's) are computed on the averages, and ``load_run`` (``clipft eval``,
``predict``, ``export``) rebuilds the model with them, so ``clipft export``
writes the averaged weights as a plain open_clip model.

Why a strategy modifier and not a callback: a callback has no state in the
checkpoint, by design, and the averages must be saved for ``--resume`` to be
exact and be usable by evaluation and export. As a modifier, ``ema`` sees what
the other strategies selected, and the averages are buffers of an inserted
module (``clipft_ema``): checkpoints store them, ``load_run`` rebuilds them, and
the :class:`clipft.InsertedModule` hooks update, swap in and fold them. The head
is not averaged (it is built after the strategies).
"""
from __future__ import annotations

import attrs

from clipft import StrategyModifier, StrategySpec, hookimpl
from clipft.options import unit_fraction

#: the model attribute the averages live under
ATTR = "clipft_ema"


def _start(inst, attribute, value):
    if value < 0:
        raise ValueError(f"start_step must be >= 0, got {value}")


@attrs.frozen
class EmaOptions:
    decay: float = attrs.field(default=0.999, validator=unit_fraction, metadata={"help": (
        "weight of the old average at each optimizer step (0.999 averages over about "
        "1000 steps; a short run wants 0.9-0.99)")})
    start_step: int = attrs.field(default=0, validator=_start, metadata={"help": (
        "the average follows the weights exactly up to this optimizer step, then averages")})
    use_for_eval: bool = attrs.field(default=True, metadata={"help": (
        "evaluate (summary.json's metrics), eval/predict and export the averaged weights; "
        "false: the averages are only kept in the checkpoint")})


def buffer_name(param_name: str) -> str:
    """The buffer under ``clipft_ema`` holding a parameter's average (module
    attribute names cannot contain dots)."""
    return param_name.replace(".", ":")


class Ema(StrategyModifier):
    def __init__(self, opts: EmaOptions):
        self.opts = opts

    def modify(self, selections, model, ctx):
        from clipft.errors import ClipftUsageError

        from clipft_ema.average import ExponentialMovingAverage

        if getattr(model, ATTR, None) is not None:
            raise ClipftUsageError("the model already has an ema; give --strategy ema once")
        names = list(dict.fromkeys(n for sel in selections for n, _ in sel.params))
        model.add_module(ATTR, ExponentialMovingAverage(model, names, self.opts))
        return selections


@hookimpl
def clipft_register_strategies(register):
    register(StrategySpec(
        name="ema",
        summary="Exponential moving average of the trained weights (a modifier: add it to the "
                "strategies that select); evaluated and exported with use_for_eval=true.",
        options=EmaOptions,
        build=Ema,
        default_lr=None,
    ))
