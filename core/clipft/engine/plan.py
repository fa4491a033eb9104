"""``clipft plan``: the parameter groups a run would train, without training."""
from __future__ import annotations

from clipft.engine.runner import prepare

# bytes of optimizer state per trainable fp32 parameter
STATE_BYTES = {"adamw": 8, "sgd": 4}


def make_plan(config, registry) -> dict:
    run = prepare(config, registry, build_optimizer=False)
    total, trainable = run.param_counts
    groups = [{
        "name": g.name,
        "sources": list(g.sources),
        "tensors": len(g.params),
        "params": g.numel,
        "lr": g.lr,
        "weight_decay": g.weight_decay,
        "percent_of_model": 100.0 * g.numel / total if total else 0.0,
    } for g in run.groups]
    return {
        "model": config.model,
        "strategies": [s.name for s, _ in run.resolved.strategies],
        "head": run.resolved.head[0].name if run.resolved.head else None,
        "params": {"total": total, "trainable": trainable,
                   "trainable_percent": 100.0 * trainable / total if total else 0.0},
        "groups": groups,
        "memory": {
            "optimizer_state_bytes": STATE_BYTES[config.optimizer] * trainable,
            "gradient_bytes": 4 * trainable,
            "optimizer": config.optimizer,
        },
    }
