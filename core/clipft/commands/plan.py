"""``clipft plan``: the parameter groups a run would train, without training.

:func:`make_plan` assembles the run exactly as ``clipft run`` would (same
config, model, strategies, head and optimizer groups) and reports, as one JSON
document:

- ``groups``: one row per optimizer parameter group: name, the strategies it
  came from, number of tensors, parameter count, lr, weight decay and its share
  of the model;
- ``params``: total and trainable counts, and per part of the model (vision
  tower, text tower, logit, other, head), so that the share of each tower
  that trains is visible;
- ``towers``: what :mod:`clipft.anatomy` found (class, depth and depth unit),
  which is what ``last-n:n=`` counts;
- ``memory``: an estimate of what training adds on top of the weights:
  optimizer state (AdamW keeps two moments per trainable element, SGD with
  momentum one) and gradients, both in the parameters' own dtype. Activations
  depend on the batch and are not included. With ``nproc`` > 1, ``per_rank``:
  what each process holds under ``--parallel`` (DDP: everything; FSDP: its
  shards, what stays whole, and the blocks gathered whole while they run;
  :func:`clipft.engine.fsdp.per_rank_bytes`), computed, not measured.

:func:`render_plan` prints the same content as a table.
"""
from __future__ import annotations

from clipft.engine.accumulate import accumulation_of
from clipft.engine.accumulate import describe as describe_accumulation
from clipft.engine.prepare import prepare

#: optimizer state tensors kept per trainable element
STATE_TENSORS = {"adamw": 2, "sgd": 1}


def _state_tensors(config) -> int:
    if config.optimizer == "sgd" and not getattr(config, "momentum", 0.0):
        return 0
    return STATE_TENSORS[config.optimizer]


def _part_counts(run) -> dict:
    from clipft.anatomy import describe

    a = describe(run.model)
    params = dict(run.model.named_parameters())
    parts = {}
    for key, names in (("vision", a.vision.names if a.vision else ()),
                       ("text", a.text.names if a.text else ()),
                       ("logit", a.logit), ("other", a.other)):
        if names:
            ps = [params[n] for n in names]
            parts[key] = {"total": sum(p.numel() for p in ps),
                          "trainable": sum(p.numel() for p in ps if p.requires_grad)}
    if run.head is not None:
        hp = list(run.head.parameters())
        parts["head"] = {"total": sum(p.numel() for p in hp),
                         "trainable": sum(p.numel() for p in hp if p.requires_grad)}
    towers = {}
    for t in (a.vision, a.text):
        if t is not None:
            towers[t.side] = {"class": t.class_name, "kind": t.kind, "depth": t.depth, "unit": t.unit,
                              "has_projection": bool(t.projection)}
    return {"parts": parts, "towers": towers}


def make_plan(config, registry, nproc: int = 1) -> dict:
    """Build the run without an optimizer and describe what would train. A
    multi-stage run is described by its first stage, and ``stages`` lists what
    each stage would train (name, epochs, lr, counts, groups)."""
    from clipft.engine.assemble import resolve

    res = resolve(config, registry)
    plan = _plan_one(config, prepare(config, registry, build_optimizer=False, resolved=res), nproc)
    if res.stages:
        plan["stages"] = []
        for k, st in enumerate(res.stages):
            one = plan if k == 0 else _plan_one(
                config, prepare(config, registry, build_optimizer=False, stage=k, resolved=res))
            plan["stages"].append({"name": st.name, "first_epoch": st.start + 1, "last_epoch": st.end,
                                   "strategies": [s.name for s, _ in st.strategies], "lr": one["lr"],
                                   "params": {"trainable": one["params"]["trainable"],
                                              "unused_trainable": one["params"]["unused_trainable"]},
                                   "notes": one["notes"],
                                   "groups": one["groups"]})
    return plan


def _per_rank(config, run, nproc: int, state_tensors: int, memory: dict) -> dict:
    """What each of ``nproc`` processes holds (bytes; activations not included)."""
    if config.parallel == "fsdp":
        from clipft.engine.fsdp import per_rank_bytes
        in_model = {id(p) for p in run.model.parameters()}
        extra = [p for g in run.groups for _, p in g.params if id(p) not in in_model]
        return {"parallel": "fsdp", **per_rank_bytes(run.model, extra, state_tensors, nproc, run.precision)}
    keys = ("weight_bytes", "gradient_bytes", "optimizer_state_bytes")
    return {"parallel": "ddp", "world_size": nproc, **{k: memory[k] for k in keys},
            "total_bytes": sum(memory[k] for k in keys)}


def _plan_one(config, run, nproc: int = 1) -> dict:
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
    trainable_params = [p for g in run.groups for _, p in g.params]
    grad_bytes = sum(p.numel() * p.element_size() for p in trainable_params)
    state_bytes = _state_tensors(config) * grad_bytes
    weight_bytes = sum(p.numel() * p.element_size() for p in run.model.parameters())
    if run.head is not None:
        weight_bytes += sum(p.numel() * p.element_size() for p in run.head.parameters())
    anatomy = _part_counts(run)
    memory = {
        "optimizer": config.optimizer,
        "optimizer_state_bytes": state_bytes,
        "gradient_bytes": grad_bytes,
        "training_state_bytes": state_bytes + grad_bytes,
        "weight_bytes": weight_bytes,
    }
    if nproc > 1:
        memory["per_rank"] = _per_rank(config, run, nproc, _state_tensors(config), memory)
    return {
        "model": config.model,
        "pretrained": run.pretrained,
        "strategies": [s.name for s, _ in run.resolved.strategies],
        "head": run.resolved.head[0].name if run.resolved.head else None,
        "lr": run.lr,
        "lr_reason": run.lr_reason,
        "params": {"total": total, "trainable": trainable,
                   "trainable_percent": 100.0 * trainable / total if total else 0.0,
                   "trainable_tensors": len(trainable_params),
                   "by_part": anatomy["parts"],
                   "unused_trainable": run.unused.record() if run.unused is not None else None},
        "notes": [run.unused.message()] if run.unused is not None else [],
        "towers": anatomy["towers"],
        "groups": groups,
        "batches": {"batch_size": config.batch_size, "per_epoch": run.loaders.n_train_batches(),
                    "drop_last": run.loaders.drop_last, "dropped_per_epoch": run.loaders.dropped_per_epoch,
                    "batch_coupled_loss": bool(run.resolved.loss[0].batch_coupled)},
        # per optimizer step: micro-batches, the effective batch, negatives (large-batch or plain)
        "accumulation": accumulation_of(run),
        "memory": memory,
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 / 10 else f"{n / 2**10:,.1f} KiB"


def render_plan(p: dict, console) -> None:
    """Print a plan (the dict of :func:`make_plan`) as a table on ``console``."""
    from rich.table import Table

    title = (f"plan: {p['model']} · {' + '.join(p['strategies']) or 'no strategy'}"
             f"{' · head ' + p['head'] if p['head'] else ''}")
    t = Table(title=title, title_justify="left")
    for col in ("group", "from", "tensors", "params", "lr", "weight decay", "% of model"):
        t.add_column(col, justify="left" if col in ("group", "from") else "right", no_wrap=True)
    for g in p["groups"]:
        t.add_row(g["name"], ",".join(g["sources"]), str(g["tensors"]), f"{g['params']:,}",
                  f"{g['lr']:.2e}", f"{g['weight_decay']:g}", f"{g['percent_of_model']:.3f}")
    pr = p["params"]
    t.add_section()
    t.add_row("[bold]trainable[/]", "", str(pr["trainable_tensors"]), f"[bold]{pr['trainable']:,}[/]",
              "", "", f"[bold]{pr['trainable_percent']:.3f}[/]")
    t.add_row("model total", "", "", f"{pr['total']:,}", "", "", "100.000")
    # a plan is read in logs and CI output, where rich assumes 80 columns: widen
    # the console to fit the table rather than truncating group names
    width = max(console.width, console.measure(t, options=console.options.update_width(400)).maximum)
    console.width = width
    console.print(t)
    parts = []
    for key, c in pr["by_part"].items():
        share = 100.0 * c["trainable"] / c["total"] if c["total"] else 0.0
        parts.append(f"{key} {c['trainable']:,}/{c['total']:,} ({share:.1f}%)")
    console.print("trains per part: " + " · ".join(parts))
    if p.get("lr_reason"):
        console.print(f"lr {p['lr']:g}: {p['lr_reason']}")
    towers = [f"{side}: {d['class']}, {d['depth']} {d['unit']}{'s' if d['depth'] != 1 else ''}"
              for side, d in p["towers"].items()]
    if towers:
        console.print("towers: " + " · ".join(towers))
    b = p["batches"]
    line = f"batches per epoch: {b['per_epoch']:,} of {b['batch_size']}"
    why = " (the loss depends on the whole batch)" if b["batch_coupled_loss"] else ""
    if b["drop_last"] and b["dropped_per_epoch"]:
        line += (f"; the last {b['dropped_per_epoch']:,} sample(s) of each epoch are dropped: --drop-last{why}, "
                 "--no-drop-last keeps them")
    elif b["drop_last"]:
        line += f"; --drop-last{why}, but every batch is complete"
    elif b["dropped_per_epoch"]:
        line += f"; {b['dropped_per_epoch']:,} sample(s) per epoch do not divide among the ranks and are left out"
    console.print(line)
    acc = p.get("accumulation")
    if acc:
        console.print(describe_accumulation(acc)
                      or f"effective batch: {acc['effective_batch']:,} per optimizer step", markup=False)
    m = p["memory"]
    console.print(
        f"training state ≈ {_mib(m['training_state_bytes'])}: {m['optimizer']} optimizer state "
        f"{_mib(m['optimizer_state_bytes'])} + gradients {_mib(m['gradient_bytes'])} "
        f"(weights {_mib(m['weight_bytes'])}; activations not included)")
    r = m.get("per_rank")
    if r:
        gathered = (f" + blocks gathered whole {_mib(r['gathered_bytes'])}" if "gathered_bytes" in r else "")
        console.print(
            f"per rank ({r['parallel']}, {r['world_size']} processes) ≈ {_mib(r['total_bytes'])}: weights "
            f"{_mib(r['weight_bytes'])} + gradients {_mib(r['gradient_bytes'])} + optimizer state "
            f"{_mib(r['optimizer_state_bytes'])}{gathered} (computed; activations not included)")
    stages = p.get("stages") or ()
    for note in p["notes"] if not stages else ():
        console.print(f"note: {note}", markup=False)
    for i, st in enumerate(stages):
        groups = ", ".join(f"{g['name']} {g['params']:,}" for g in st["groups"])
        console.print(f"stage {i + 1} '{st['name']}' (epochs {st['first_epoch']}-{st['last_epoch']}, "
                      f"lr {st['lr']:.2e}, {' + '.join(st['strategies']) or 'head only'}): "
                      f"trains {st['params']['trainable']:,} ({groups})")
        for note in st["notes"]:
            console.print(f"  note: {note}", markup=False)
