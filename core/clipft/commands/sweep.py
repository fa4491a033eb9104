"""``clipft sweep``: several strategies on the same data, budget and seeds, in
one table: in-task top-1 before and after, forgetting on a control set, and
the cost (trainable parameters, train seconds, peak RSS, checkpoint bytes).

Each member run is an ordinary ``clipft run`` in its own process, writing an
ordinary run directory (``OUT/<member>/seed<S>/``), so ``clipft runs OUT``
lists them, a member that fails or crashes does not stop the others, and each
member's peak RSS is its own (one process's high-water mark would only grow).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import attrs

from clipft import atomic
from clipft.engine import signals
from clipft.errors import ClipftUsageError, Interrupted
from clipft.options import ComponentRef, parse_ref

SWEEP_JSON = "sweep.json"
#: the numbers of a --base-to-novel sweep, in table order
B2N = ("base_top1", "novel_top1", "hm")
SWEEP_PNG = "sweep.png"
#: the numbers averaged over seeds, in table order
NUMBERS = ("top1_before", "top1_after", "head_top1_after", "control_before", "control_after",
           "forgetting", "base_top1", "novel_top1", "hm", "trainable", "train_seconds", "peak_rss_mb", "checkpoint_mb")


def parse_members(text: str) -> list[list[ComponentRef]]:
    """``projections,last-n:n=2,tower=vision,lora,reproject:dim=64+last-n:n=1``:
    commas separate members, a ``k=v`` piece after a member is one more option
    of it, and ``+`` composes strategies inside one member."""
    members, current = [], None
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if "=" in piece and ":" not in piece.split("=", 1)[0] and current is not None:
            current += "," + piece
            continue
        if current is not None:
            members.append(current)
        current = piece
    if current is not None:
        members.append(current)
    if not members:
        raise ClipftUsageError("--strategies is empty; e.g. --strategies projections,last-n:n=2,lora")
    out = [[parse_ref(s) for s in m.split("+")] for m in members]
    names = [member_name(m) for m in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ClipftUsageError(f"--strategies names {', '.join(dup)} twice")
    return out


def member_name(refs) -> str:
    """A folder-safe name: ``last-n.n=2+lora``."""
    parts = []
    for r in refs:
        opts = ",".join(f"{k}={v}" for k, v in sorted(r.options.items()))
        parts.append(r.name + (f".{opts}" if opts else ""))
    return "+".join(parts).replace("/", "_").replace(" ", "_")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _mean_std(values: list) -> tuple:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, sd


@attrs.define
class SweepSpec:
    config: object                 # RunConfig shared by the members (strategies, seed replaced)
    members: list                  # [[ComponentRef]]
    seeds: int
    out: Path
    control: Optional[ComponentRef] = None
    disabled: tuple = ()
    #: start every member over (--overwrite); else a member run finished with
    #: the same config is kept and one stopped part-way resumes
    fresh: bool = False
    #: --base-to-novel: ``{"base": ref, "novel": ref}`` (config.data is the base half)
    base_to_novel: Optional[dict] = None
    stop: Optional["MemberSignals"] = attrs.field(default=None, init=False)


class _Stopped(Exception):
    """A stop signal between member runs (the sweep's own evaluations)."""


class MemberSignals(signals.Handlers):
    """SIGINT, SIGTERM and SIGHUP stop the sweep. While a member runs, each
    one is passed on to it (the first: it checkpoints and exits; a second: it
    exits at once) and the sweep stops when the member has exited; between
    members the first one stops the sweep at once. Members run in a session of
    their own, so a Ctrl-C at the terminal reaches them once, through the sweep
    (reaching both, it would count twice)."""

    def __init__(self):
        super().__init__()
        self.member: Optional[subprocess.Popen] = None
        self._waiting, self._unsent = False, None

    def _handle(self, signum, frame):
        if not self._waiting:
            return super()._handle(signum, frame)
        self.received = self.received or signum
        if self.member is None:
            self._unsent = signum              # the member is being started
        else:
            self.member.send_signal(signum)    # a no-op once it has exited

    def first(self, signum: int) -> None:
        raise _Stopped()

    def call(self, cmd: list, env: dict) -> tuple:
        """``(exit code, stdout, stderr)`` of a member run; no member outlives it."""
        self._waiting = True
        try:
            self.member = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                           env=env, start_new_session=True)
            if self._unsent is not None:
                self.member.send_signal(self._unsent)
            out, err = self.member.communicate()
            return self.member.returncode, out, err
        finally:
            if self.member is not None and self.member.poll() is None:
                self.member.terminate()        # the sweep itself failed: the member checkpoints and exits
                self.member.communicate()
            self.member, self._waiting, self._unsent = None, False, None


def _has_checkpoint(run_dir: Path) -> bool:
    from clipft.engine.checkpoint import CURRENT, STEP_PREFIX
    return run_dir.is_dir() and any(p.is_dir() and (p.name == CURRENT or p.name.startswith(STEP_PREFIX))
                                    for p in run_dir.iterdir())


def _plan(spec: SweepSpec, cfg_file: Path, cfg_text: str, run_dir: Path) -> str:
    """``new``, ``resumed`` or ``kept``: only a run of this very member config
    (its ``seed<S>.toml`` as this sweep writes it) is kept or resumed."""
    if spec.fresh or not cfg_file.is_file() or cfg_file.read_text() != cfg_text:
        return "new"
    if (run_dir / "summary.json").is_file():
        return "kept"
    return "resumed" if _has_checkpoint(run_dir) else "new"


def _ok_row(row: dict, summary: dict, run_dir: Path) -> dict:
    before, after = summary["eval"]["before"], summary["eval"]["after"]
    row.update(status="ok", top1_before=before.get("top1"), top1_after=after.get("top1"),
               head_top1_after=after.get("head_top1"), trainable=summary["params"]["trainable"],
               trainable_fraction=summary["params"]["trainable_fraction"],
               train_seconds=summary["train"]["seconds"], peak_rss_mb=summary["train"]["peak_rss_mb"],
               checkpoint_mb=_dir_bytes(run_dir / "checkpoint") / 2**20,
               # a seed that stopped learning: its numbers still count in the mean, so say it
               collapse=((summary.get("callbacks") or {}).get("collapse") or {}).get("signals") or None)
    return row


def _run_member(spec: SweepSpec, refs, seed: int, run_dir: Path) -> dict:
    from clipft.engine.session import config_for_dir
    cfg = attrs.evolve(spec.config, strategies=list(refs), seed=seed)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cfg_file = run_dir.parent / f"seed{seed}.toml"
    cfg_text = config_for_dir(cfg, run_dir)
    how = _plan(spec, cfg_file, cfg_text, run_dir)
    row = {"seed": seed, "run_dir": str(run_dir), "how": how}
    if how == "kept":
        return _ok_row(row, json.loads((run_dir / "summary.json").read_text()), run_dir)
    cmd = [sys.executable, "-m", "clipft.cli"]
    for d in spec.disabled:
        cmd += ["--disable-plugin", d]
    if how == "resumed":
        cmd += ["run", "--resume", str(run_dir), "--json"]
    else:
        atomic.write_text(cfg_file, cfg_text)
        cmd += ["run", "--config", str(cfg_file), "--out", str(run_dir), "--overwrite", "--json"]
    env = dict(os.environ, COLUMNS=os.environ.get("COLUMNS", "120"))
    started = time.perf_counter()
    code, stdout, stderr = (spec.stop or MemberSignals()).call(cmd, env)
    row["wall_seconds"] = time.perf_counter() - started
    if code == 0:
        return _ok_row(row, json.loads(stdout), run_dir)
    if spec.stop is not None and spec.stop.received is not None:
        row.update(status="interrupted", exit_code=code, checkpoint=_has_checkpoint(run_dir))
        return row
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    row.update(status="failed", exit_code=code,
               error=(errors[-1][7:] if errors else (stderr.strip().splitlines() or ["?"])[-1]))
    return row


def _control_top1(source_args: dict, control_ref, registry) -> float:
    from clipft.commands import inference
    from clipft.commands.source import load_source
    src = load_source(registry=registry, **source_args)
    bundle = inference.build_data(control_ref, registry, src)
    res = inference.evaluate_source(src, bundle, control_ref)
    return res.doc["metrics"].get("top1")


def _base_to_novel(source_args: dict, refs: dict, registry) -> dict:
    """Base top-1, novel top-1 and their harmonic mean, as ``clipft eval --base-to-novel``."""
    from clipft.commands import inference
    from clipft.commands.source import load_source
    src = load_source(registry=registry, **source_args)
    doc = inference.evaluate_base_to_novel(src, refs, registry)
    return {**doc["metrics"], "novel_by": doc["novel_by"]}


def _member_entry(refs, name: str, runs: list) -> dict:
    ok = [r for r in runs if r["status"] == "ok"]
    stats = {k: _mean_std([r.get(k) for r in ok]) for k in NUMBERS}
    return {"name": name, "strategies": [{"name": r.name, **r.options} for r in refs],
            "runs": runs, "ok": len(ok), "failed": sum(r["status"] == "failed" for r in runs),
            "collapsed": [r["seed"] for r in ok if r.get("collapse")],
            "mean": {k: v[0] for k, v in stats.items()}, "std": {k: v[1] for k, v in stats.items()}}


def is_unfinished(out: Path) -> bool:
    """Whether ``out/sweep.json`` is that of a sweep a signal stopped (which
    the same sweep command continues)."""
    try:
        return json.loads((out / SWEEP_JSON).read_text()).get("status") == "interrupted"
    except (OSError, ValueError, AttributeError):
        return False


def run_sweep(spec: SweepSpec, registry, on_member=None, on_done=None) -> dict:
    """Run every member with every seed; returns (and writes) ``sweep.json``.
    ``on_member(done, total, name, seed)`` is called before each member run,
    ``on_done(name, row)`` after it. A stop signal is passed on to the member
    running (:class:`MemberSignals`), which checkpoints; ``sweep.json`` then
    records it as interrupted and :class:`Interrupted` is raised."""
    spec.out.mkdir(parents=True, exist_ok=True)
    cfg = spec.config
    seeds = [cfg.seed + k for k in range(spec.seeds)]
    members, current = [], None
    doc = {"out": str(spec.out), "seeds": seeds, "model": cfg.model, "pretrained": cfg.pretrained,
           "data": {"name": cfg.data.name, **cfg.data.options}, "epochs": cfg.epochs,
           "control_data": ({"name": spec.control.name, **spec.control.options} if spec.control else None),
           "base_to_novel": spec.base_to_novel is not None,
           "status": "complete", "members": members}
    with MemberSignals() as stop:
        spec.stop = stop
        try:
            control_before = None
            if spec.control is not None:
                control_before = _control_top1({"source": None, "model_name": cfg.model,
                                                "pretrained": cfg.pretrained, "device": cfg.device},
                                               spec.control, registry)
            model_args = {"source": None, "model_name": cfg.model, "pretrained": cfg.pretrained, "device": cfg.device}
            if spec.base_to_novel is not None:   # the row every method is read against
                doc["zero_shot"] = _base_to_novel(model_args, spec.base_to_novel, registry)
            total, done = len(spec.members) * len(seeds), 0
            for refs in spec.members:
                current = (refs, member_name(refs), [])
                for seed in seeds:
                    if stop.received is not None:   # raised between members, and caught on the way
                        raise _Stopped()
                    if on_member:
                        on_member(done, total, current[1], seed)
                    row = _run_member(spec, refs, seed, spec.out / current[1] / f"seed{seed}")
                    current[2].append(row)
                    if stop.received is not None:
                        raise _Stopped()
                    if row["status"] == "ok" and spec.control is not None:
                        row["control_before"] = control_before
                        row["control_after"] = _control_top1({"source": row["run_dir"], "device": cfg.device},
                                                             spec.control, registry)
                        row["forgetting"] = control_before - row["control_after"]
                    if row["status"] == "ok" and spec.base_to_novel is not None:
                        try:
                            row.update(_base_to_novel({"source": row["run_dir"], "device": cfg.device},
                                                      spec.base_to_novel, registry))
                        except ClipftUsageError as exc:   # trained, but cannot score novel classes
                            row.update(status="failed", error=str(exc))
                    if on_done:
                        on_done(current[1], row)
                    done += 1
                members.append(_member_entry(*current))
                current = None
            if stop.received is not None:
                raise _Stopped()
        except _Stopped:
            raise _interrupted(spec, doc, current, stop.received) from None
        finally:
            spec.stop = None
    atomic.write_json(spec.out / SWEEP_JSON, doc, indent=2)
    return doc


def _interrupted(spec: SweepSpec, doc: dict, current, signum: int) -> Interrupted:
    """Record the sweep as stopped (the member running as interrupted) and say how to continue."""
    name, code = signals.describe(signum)
    if current is not None and current[2]:
        doc["members"].append(_member_entry(*current))
    doc.update(status="interrupted", signal=name)
    atomic.write_json(spec.out / SWEEP_JSON, doc, indent=2)
    last = doc["members"][-1]["runs"][-1] if doc["members"] else None
    where = ""
    if last is not None and last["status"] == "interrupted":
        where = (f" {doc['members'][-1]['name']} seed {last['seed']} was interrupted"
                 + (f" (checkpoint in {last['run_dir']})" if last["checkpoint"] else " before its first checkpoint")
                 + ";")
    return Interrupted(f"{name}: sweep stopped;{where} run the same clipft sweep command again (same --out "
                       f"{spec.out} and options) to continue it: finished members are kept, an interrupted "
                       "one resumes from its checkpoint", code)


def _pm(m, sd, fmt="{:.3f}") -> str:
    if m is None:
        return "-"
    return fmt.format(m) + (f" ± {fmt.format(sd)}" if sd else "")


def render_sweep(doc: dict, console) -> None:
    from rich.markup import escape
    from rich.table import Table
    n = len(doc["seeds"])
    t = Table(title=escape(f"sweep: {doc['model']} on {doc['data']['name']}, {doc['epochs']} epochs, "
                           f"{n} seed{'s' if n > 1 else ''} (mean ± std)"))
    control = doc["control_data"] is not None
    b2n = bool(doc.get("base_to_novel"))
    cols = ["strategy"] + (["base", "novel", "HM"] if b2n else ["top1 before", "top1 after"])
    if not b2n and any(m["mean"]["head_top1_after"] is not None for m in doc["members"]):
        cols.append("head top1")
    if control:
        cols += ["control after", "forgetting"]
    cols += ["trainable", "train s", "peak RSS MB", "ckpt MB", "runs"]
    for c in cols:
        t.add_column(c, justify="left" if c == "strategy" else "right")
    if b2n and doc.get("zero_shot"):
        z = doc["zero_shot"]
        t.add_row("zero-shot (before)", *(_pm(z[k], None) for k in B2N), *[""] * (len(cols) - 4))
    for m in doc["members"]:
        mean, sd = m["mean"], m["std"]
        row = [escape(m["name"])] + ([_pm(mean[k], sd[k]) for k in B2N] if b2n else [
            _pm(mean["top1_before"], sd["top1_before"]), _pm(mean["top1_after"], sd["top1_after"])])
        if "head top1" in cols:
            row.append(_pm(mean["head_top1_after"], sd["head_top1_after"]))
        if control:
            row += [_pm(mean["control_after"], sd["control_after"]), _pm(mean["forgetting"], sd["forgetting"])]
        row += ["-" if mean["trainable"] is None else f"{mean['trainable']:,.0f}",
                _pm(mean["train_seconds"], None, "{:.1f}"), _pm(mean["peak_rss_mb"], None, "{:.0f}"),
                _pm(mean["checkpoint_mb"], None, "{:.2f}"),
                f"{m['ok']} ok" + (f", [red]{m['failed']} failed[/red]" if m["failed"] else "")
                + (f", [yellow]collapsed: seed {', '.join(map(str, m['collapsed']))}[/yellow]"
                   if m.get("collapsed") else "")]
        t.add_row(*row)
    console.print(t)
    for m in doc["members"]:
        for r in m["runs"]:
            if r.get("collapse"):
                console.print(f"[yellow]collapsed[/yellow]: {escape(m['name'])} seed {r['seed']}: "
                              f"{escape(r['collapse'][0]['reason'])} (in the mean ± std above; {r['run_dir']})")
    befores = [r["control_before"] for m in doc["members"] for r in m["runs"] if "control_before" in r]
    if b2n:
        fallback = sorted({m["name"] for m in doc["members"] for r in m["runs"]
                           if r.get("novel_by") == "zero-shot fallback"})
        console.print("base and novel: top-1 on each half's val split (novel: zero-shot over the novel names "
                      "through the run's class-text path); HM = 2·base·novel/(base+novel) per seed")
        if fallback:
            console.print(f"[yellow]note[/yellow]: novel: zero-shot fallback for {escape(', '.join(fallback))} "
                          "(a head whose weights exist for the base classes only)")
    if befores:
        console.print(f"control top-1 of the model before fine-tuning: {befores[0]:.3f}; "
                      "forgetting = control before - control after")


def write_sweep_png(doc: dict, path: Path) -> None:
    from clipft.commands.inference import _save_png, require_matplotlib
    plt = require_matplotlib("the sweep plot")
    members = [m for m in doc["members"] if m["ok"]]
    if not members:
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(members)), 4), dpi=100)
    try:
        xs = range(len(members))
        series = ([("base_top1", "base top-1"), ("novel_top1", "novel top-1"), ("hm", "HM")]
                  if doc.get("base_to_novel") else [("top1_after", "in-task top-1")])
        if doc["control_data"]:
            series.append(("control_after", "control top-1"))
        width = 0.8 / len(series)
        for i, (key, label) in enumerate(series):
            ax.bar([x + i * width for x in xs], [m["mean"][key] for m in members], width,
                   yerr=[m["std"][key] or 0 for m in members], label=label, capsize=3)
        b2n = bool(doc.get("base_to_novel"))
        before = (doc.get("zero_shot") or {}).get("hm") if b2n else members[0]["mean"]["top1_before"]
        if before is not None:
            ax.axhline(before, color="grey", linestyle="--", label="zero-shot HM" if b2n else "in-task before")
        ax.set_xticks([x + (len(series) - 1) * width / 2 for x in xs], [m["name"] for m in members],
                      rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("top-1")
        ax.set_title(("base-to-novel " if b2n else "") + f"sweep over {len(doc['seeds'])} seed(s)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        _save_png(fig, path)
    finally:
        plt.close(fig)
