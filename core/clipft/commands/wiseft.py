"""WiSE-FT (Wortsman et al. 2022): weight-space ensembles of a fine-tuned model
and the zero-shot model it started from, ``θ(α) = (1-α)·θ_zero-shot + α·θ_fine-tuned``.

It needs both endpoints in one parameterisation: the run's model with its
adapters folded into the base weights (LoRA merges), tensor for tensor the
shape of the base model. It has no meaning where the fine-tuned model has
parts the zero-shot one lacks or shapes it does not share (prompt vectors, a
reprojected dimension, an adapter that exports itself), or for a head that did
not start from zero-shot weights (``linear``); those are refused with the
reason. A ``zero-shot`` head interpolates with its zero-shot initialisation,
rebuilt from the base model.

``torch.lerp`` computes ``a + α·(b - a)``: a tensor training left alone stays
bit-identical at every α, and α=0 and α=1 give the endpoints exactly.
"""
from __future__ import annotations

from typing import Optional

import attrs
import torch

from clipft.engine.assemble import assemble, seed_everything
from clipft.errors import ClipftUsageError
from clipft.models import load_model
from clipft.protocols import inserted_modules


def parse_alphas(text: str) -> list[float]:
    try:
        alphas = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ClipftUsageError(f"--wise-ft-sweep {text}: expected numbers such as 0,0.25,0.5,0.75,1") from None
    if not alphas:
        raise ClipftUsageError("--wise-ft-sweep needs at least one α, e.g. 0,0.5,1")
    for a in alphas:
        check_alpha(a)
    return alphas


def check_alpha(alpha: float) -> None:
    if not (0.0 <= alpha <= 1.0):
        raise ClipftUsageError(f"WiSE-FT α {alpha}: must be in [0, 1] (0 = zero-shot, 1 = fine-tuned)")


def refusal(run) -> Optional[str]:
    """Why WiSE-FT cannot interpolate this run, or None."""
    names = [s.name for s, _ in run.resolved.strategies]
    for qname, module in inserted_modules(run.model):
        if not module.folds_into_base:
            what = {"class-text": "learned prompt vectors"}.get(module.enters, f"a {module.enters} module")
            return (f"the run's model has {what} ({qname}, from strategy "
                    f"{'/'.join(names)}) that the zero-shot model does not have; interpolating "
                    "weights has no meaning for it")
    if run.head is not None and run.head.state_dict() and not run.resolved.head[0].zero_shot_init:
        return (f"head '{run.resolved.head[0].name}' did not start from zero-shot weights, so it has "
                "no zero-shot endpoint; train with --head zero-shot for WiSE-FT")
    return None


@attrs.define
class Endpoints:
    zero_shot: dict
    tuned: dict
    head_zero_shot: Optional[dict] = None
    head_tuned: Optional[dict] = None
    #: adapter layers folded into the base weights to get ``tuned``
    folded: int = 0


def fold_adapters(model) -> int:
    n = 0
    for _, module in inserted_modules(model):
        if module.folds_into_base:
            module.fold_into_base()
            n += 1
    return n


def endpoints(run) -> Endpoints:
    """The two endpoints of a loaded run (:func:`clipft.engine.loadrun.load_run`).
    Folds the run's adapters into ``run.model`` in place."""
    reason = refusal(run)
    if reason:
        raise ClipftUsageError(f"WiSE-FT: {reason}")
    folded = fold_adapters(run.model)
    tuned = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    cfg = run.config
    seed_everything(cfg.seed)          # a random-init base is rebuilt as the run built it
    base = load_model(cfg.model, cfg.pretrained, device=str(run.device))
    zero = base.model.state_dict()
    for k, v in tuned.items():
        if k not in zero:
            raise ClipftUsageError(f"WiSE-FT: the fine-tuned model has {k}, which the zero-shot model lacks")
        if zero[k].shape != v.shape:
            raise ClipftUsageError(
                f"WiSE-FT: {k} is {tuple(v.shape)} after fine-tuning and {tuple(zero[k].shape)} in the "
                "zero-shot model (a replaced projection dimension); interpolating has no meaning for it")
    head_zero = head_tuned = None
    if run.head is not None and run.head.state_dict():
        built = assemble(base.model, model_name=cfg.model, tokenizer=base.tokenizer, device=run.device,
                         strategies=[], head=run.resolved.head, classnames=run.classnames,
                         templates=run.templates, seed=cfg.seed)
        head_zero = {k: v.detach().clone() for k, v in built.head.state_dict().items()}
        head_tuned = {k: v.detach().clone() for k, v in run.head.state_dict().items()}
    return Endpoints({k: zero[k] for k in tuned}, tuned, head_zero, head_tuned, folded)


def interpolate(zero: dict, tuned: dict, alpha: float) -> dict:
    """``lerp(zero, tuned, α)`` for floating-point tensors; others (integer
    buffers) come from the fine-tuned model."""
    check_alpha(alpha)
    out = {}
    for k, b in tuned.items():
        a = zero[k].to(b.device)
        if b.is_floating_point() and not torch.equal(a, b):
            out[k] = torch.lerp(a.float(), b.float(), alpha).to(b.dtype)
        else:
            out[k] = b.clone()
    return out


def apply(run, ends: Endpoints, alpha: float) -> None:
    """Load ``θ(α)`` into ``run.model`` (and its head)."""
    run.model.load_state_dict(interpolate(ends.zero_shot, ends.tuned, alpha))
    if ends.head_tuned is not None:
        run.head.load_state_dict(interpolate(ends.head_zero_shot, ends.head_tuned, alpha))

