"""``clipft runs``: list the run directories under a folder, and compare two.

Reads only the run directory contract (``config.toml``, ``summary.json``, the
``.clipft-run`` marker; see :mod:`clipft.engine.rundir`), never a checkpoint, so
it imports neither torch nor the engine and stays fast on a folder of many runs.

Options are shown compactly: only those that differ from the component's
defaults (``last-n:n=2``). The defaults come from a registry when one is given,
else from the plugins' provides cache (:func:`clipft.plugins.cached_defaults`),
so that ``clipft runs`` imports no plugin; a component neither knows shows every
option the run recorded.
"""
from __future__ import annotations

import json
import math
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from clipft import kinds
from clipft.errors import ClipftUsageError

#: the marker a run writes when it starts: clipft.engine.rundir.MARKER (not
#: imported from there: the engine pulls in torch; tests check they agree)
MARKER = ".clipft-run"
CONFIG, SUMMARY = "config.toml", "summary.json"
#: how far below DIR runs are looked for: DIR/sweep/member/seed-N/ is depth 3
MAX_DEPTH = 4
#: the metric a run's top-1 column shows, in order of preference (recall@1 for
#: caption data without classes)
TOP1 = ("top1", "recall@1")
#: the status of a run: it has a readable summary.json / no summary.json yet
#: (crashed, interrupted, or still training) / summary.json or config.toml unreadable
COMPLETE, INCOMPLETE, UNREADABLE = "complete", "incomplete", "unreadable"


# -- finding runs ------------------------------------------------------------------
def is_run_dir(path: Path) -> bool:
    """A run directory: ``config.toml`` and ``summary.json``, or the marker
    (a run that has not finished has the marker and no summary)."""
    path = Path(path)
    try:
        return ((path / CONFIG).is_file() and (path / SUMMARY).is_file()) or (path / MARKER).is_file()
    except OSError:   # a folder we may not look into
        return False


def _check_dir(directory: Path) -> Path:
    directory = Path(directory)
    if not directory.exists():
        raise ClipftUsageError(f"{directory}: no such directory "
                               "(`clipft runs DIR` lists the runs under DIR, default runs/)")
    if not directory.is_dir():
        raise ClipftUsageError(f"{directory}: not a directory")
    return directory


def find_runs(directory, max_depth: int = MAX_DEPTH) -> list[Path]:
    """The run directories at or below ``directory`` (up to ``max_depth``
    levels down), in path order. A run's own subfolders are not searched (its
    checkpoints are not runs), nor hidden folders (an ``--overwrite`` backup,
    ``.NAME.clipft-previous``) or symbolic links (one run listed twice)."""
    root = _check_dir(directory)
    found: list[Path] = []

    def walk(d: Path, depth: int) -> None:
        if is_run_dir(d):
            found.append(d)
            return
        if depth >= max_depth:
            return
        try:
            children = sorted(p for p in d.iterdir()
                              if not p.name.startswith(".") and not p.is_symlink() and p.is_dir())
        except OSError:   # unreadable folder: nothing to list there
            return
        for child in children:
            walk(child, depth + 1)

    walk(root, 0)
    return found


# -- one run ---------------------------------------------------------------------------
def _read_json(path: Path) -> tuple[Optional[dict], Optional[str]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"{path.name}: {type(exc).__name__}: {exc}"
    if not isinstance(doc, dict):
        return None, f"{path.name}: not a JSON object"
    return doc, None


def _read_toml(path: Path) -> tuple[Optional[dict], Optional[str]]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8")), None
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return None, f"{path.name}: {type(exc).__name__}: {exc}"


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _number(v) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return v if math.isfinite(v) else None


def _metrics(d) -> dict:
    """An eval dict's numeric entries (``eval.before`` / ``eval.after``)."""
    if not isinstance(d, dict):
        return {}
    return {k: v for k, v in d.items() if _number(v) is not None}


def format_value(v) -> str:
    """An option value the way the command line spells it (``targets=q,k,v``)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ",".join(format_value(x) for x in v)
    if v is None:
        return "none"
    return str(v)


def _norm(v):
    return [_norm(x) for x in v] if isinstance(v, (list, tuple)) else v


def _defaults(registry, kind: str, name: str) -> Optional[dict]:
    """The component's option defaults (required options have none), or None
    when there is no registry or the component is not installed."""
    if registry is None:   # `clipft runs` imports no plugin: what the provides cache recorded
        from clipft.plugins import cached_defaults
        return cached_defaults(kind, name)
    try:
        from clipft.options import describe_options
        spec = registry.get(kind, name)
        return {r["name"]: r["default"] for r in describe_options(spec) if not r["required"]}
    except Exception:  # noqa: BLE001 - unknown, conflicting or broken: show every option
        return None


def component_string(table, kind: str, registry=None) -> Optional[str]:
    """``NAME:k=v,...`` for a component table (``{"name": ..., **options}``, as
    config.toml and summary.json record it): the options that differ from the
    component's defaults, or every option when the defaults are unknown."""
    if isinstance(table, str):
        return table
    if not isinstance(table, dict) or not isinstance(table.get("name"), str):
        return None
    name = table["name"]
    defaults = _defaults(registry, kind, name)
    shown = []
    for k, v in table.items():
        if k == "name" or v is None:
            continue
        if defaults is not None and k in defaults and _norm(defaults[k]) == _norm(v):
            continue
        shown.append(f"{k}={format_value(v)}")
    return name + (":" + ",".join(shown) if shown else "")


def strategies_string(tables, registry=None) -> str:
    """Composed strategies joined with ``+`` in their order; ``none`` for none."""
    parts = [component_string(t, "strategy", registry) for t in (tables or [])]
    return "+".join(p for p in parts if p) or "none"


def _mtime(path: Path) -> Optional[float]:
    times = []
    for name in (SUMMARY, "metrics.jsonl", CONFIG, MARKER):
        try:
            times.append((path / name).stat().st_mtime)
        except OSError:
            pass
    return max(times) if times else None


def run_row(path, root=None, registry=None) -> dict:
    """One run's row. Numbers stay numbers; what the run does not have is None.

    ``time`` is when the run last wrote one of its files (Unix seconds): for a
    finished run, when it wrote summary.json. Components come from summary.json
    when the run finished and from config.toml otherwise; ``data`` always from
    config.toml (summary.json records the sizes, not the options)."""
    path = Path(path)
    run = str(path)
    if root is not None:
        rel = path.relative_to(root).as_posix()
        run = str(root) if rel == "." else rel
    summary, summary_error = _read_json(path / SUMMARY)
    config, config_error = _read_toml(path / CONFIG)
    if summary_error or (summary is None and config_error):
        status = UNREADABLE
    else:
        status = COMPLETE if summary is not None else INCOMPLETE
    errors = [e for e in (summary_error, config_error) if e]
    src = summary if summary is not None else {}
    cfg = config or {}

    strategies = src.get("strategies") if isinstance(src.get("strategies"), list) else cfg.get("strategy")
    loss = src.get("loss") if "loss" in src else cfg.get("loss")
    head = src.get("head") if "head" in src else cfg.get("head")
    total, trainable = _number(_get(src, "params", "total")), _number(_get(src, "params", "trainable"))
    before, after = _metrics(_get(src, "eval", "before")), _metrics(_get(src, "eval", "after"))
    return {
        "run": run,
        "path": str(path),
        "status": status,
        "error": "; ".join(errors) or None,
        "time": _mtime(path),
        "model": src.get("model") if isinstance(src.get("model"), str) else cfg.get("model"),
        "strategy": strategies_string(strategies if isinstance(strategies, list) else [], registry),
        "loss": component_string(loss, "loss", registry),
        "head": component_string(head, "head", registry),
        "data": component_string(cfg.get("data") or _get(src, "data", "name"), "data", registry),
        "train_size": _number(_get(src, "data", "train_size")),
        "val_size": _number(_get(src, "data", "val_size")),
        "params_total": total,
        "params_trainable": trainable,
        "trainable_pct": 100.0 * trainable / total if total and trainable is not None else None,
        "before": before,
        "after": after,
        "epochs": _number(_get(src, "train", "epochs")),
        "steps": _number(_get(src, "train", "steps")),
        "train_seconds": _number(_get(src, "train", "seconds")),
        "samples_per_s": _number(_get(src, "train", "samples_per_s")),
        "peak_rss_mb": _number(_get(src, "train", "peak_rss_mb")),
    }


def list_runs(directory, registry=None, max_depth: int = MAX_DEPTH) -> dict:
    """``{"dir": ..., "runs": [row, ...]}``: every run under ``directory``,
    oldest first (the newest is printed last, next to the prompt)."""
    root = Path(directory)
    rows = [run_row(p, root, registry) for p in find_runs(root, max_depth)]
    rows.sort(key=lambda r: (r["time"] is None, r["time"] or 0.0, r["run"]))
    return {"dir": str(root), "runs": rows}


# -- two runs --------------------------------------------------------------------------
def resolve_run(arg, base=None, what: str = "--compare") -> Path:
    """A run directory named on the command line: a path, or a name relative to
    ``base`` (the DIR of ``clipft runs``, as its table shows runs)."""
    p = Path(arg)
    tries = [p] + ([Path(base) / p] if base is not None and not p.is_absolute() else [])
    for t in tries:
        if t.is_dir() and is_run_dir(t):
            return t
    if not any(t.exists() for t in tries):
        raise ClipftUsageError(f"{what}: {arg}: no such directory")
    raise ClipftUsageError(
        f"{what}: {arg} is not a clipft run directory (no {CONFIG} + {SUMMARY}, no {MARKER} marker)")


def config_items(config: Optional[dict], registry=None) -> dict:
    """A config.toml as comparable items: scalars under their own keys,
    components as ``NAME:k=v`` strings under their TOML key (composed
    strategies joined with ``+``). A missing strategy or head is ``none``."""
    config = config or {}
    by_key = {k.toml_key: k for k in kinds.KINDS}
    out: dict[str, Any] = {}
    for key, value in config.items():
        kind = by_key.get(key)
        if kind is None:
            out[key] = value
        elif kind.repeatable:
            tables = value if isinstance(value, list) else [value]
            out[key] = "+".join(p for p in (component_string(t, kind.name, registry) for t in tables) if p)
        else:
            out[key] = component_string(value, kind.name, registry) if value != "none" else "none"
    for k in kinds.KINDS:
        if k.toml_key not in out and (k.toml_key == "strategy" or k.can_be_none):
            out[k.toml_key] = "none"
    return out


def compare(a, b, registry=None) -> dict:
    """Two runs side by side: ``a``/``b`` (each a :func:`run_row` plus its
    parsed ``config``), ``differing`` (key -> ``{"a": .., "b": ..}``; None where
    a run lacks the key), ``equal`` (key -> value), and ``metrics`` (metric ->
    each run's before/after, and ``difference``: b's after minus a's)."""
    sides = {}
    for name, path in (("a", Path(a)), ("b", Path(b))):
        if not is_run_dir(path):
            raise ClipftUsageError(f"{path} is not a clipft run directory")
        row = run_row(path, registry=registry)
        row["config"], _ = _read_toml(path / CONFIG)
        sides[name] = row
    ia, ib = (config_items(sides[s]["config"], registry) for s in "ab")
    keys = list(ia) + [k for k in ib if k not in ia]
    differing = {k: {"a": ia.get(k), "b": ib.get(k)} for k in keys
                 if k not in ia or k not in ib or ia[k] != ib[k]}
    equal = {k: ia[k] for k in keys if k not in differing}
    names = []
    for side in "ab":
        for part in ("after", "before"):
            names += [m for m in sides[side][part] if m not in names]
    metrics = {}
    for m in names:
        entry = {s: {"before": sides[s]["before"].get(m), "after": sides[s]["after"].get(m)} for s in "ab"}
        aa, ba = entry["a"]["after"], entry["b"]["after"]
        entry["difference"] = ba - aa if aa is not None and ba is not None else None
        metrics[m] = entry
    return {**sides, "differing": differing, "equal": equal, "metrics": metrics}


# -- rendering -------------------------------------------------------------------------
def format_seconds(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    s = int(round(s))
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _num(v, fmt: str = "{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def _before_after(before, after, label: str = "") -> str:
    if before is None and after is None:
        return "-"
    arrow = f"{_num(before)} → {_num(after)}"
    if before is not None and after is not None and after != before:
        colour = "green" if after > before else "red"
        arrow = f"{_num(before)} → [{colour}]{_num(after)}[/]"
    return f"{label}{arrow}"


def top1_cell(row: dict) -> str:
    """``top1`` before → after; ``recall@1`` (labelled) when the data has no classes."""
    for metric in TOP1:
        if metric in row["after"] or metric in row["before"]:
            label = "" if metric == "top1" else f"{metric} "
            return _before_after(row["before"].get(metric), row["after"].get(metric), label)
    return "-"


def render_runs(doc: dict, console) -> None:
    """The table of :func:`list_runs` (oldest first), on a rich console."""
    from rich.markup import escape
    from rich.table import Table
    rows = doc["runs"]
    if not rows:
        console.print(f"no clipft runs under {escape(doc['dir'])}")
        return
    heads = any("head_top1" in r["after"] or "head_top1" in r["before"] for r in rows)
    t = Table(title=f"clipft runs in {escape(doc['dir'])} ({len(rows)}, oldest first)")
    columns = ["run", "finished", "strategy", "loss", "head", "data", "trainable", "top-1"]
    columns += ["head top-1"] if heads else []
    columns += ["train", "peak RSS"]
    right = {"trainable", "top-1", "head top-1", "train", "peak RSS"}
    for c in columns:
        t.add_column(c, justify="right" if c in right else "left", overflow="fold")
    for r in rows:
        when = datetime.fromtimestamp(r["time"]).strftime("%Y-%m-%d %H:%M") if r["time"] else "-"
        if r["status"] == COMPLETE:
            status = when
        else:
            colour = "yellow" if r["status"] == INCOMPLETE else "red"
            status = f"[{colour}]{r['status']}[/]"
        cells = [escape(r["run"]), status, escape(r["strategy"]), escape(r["loss"] or "-"),
                 escape(r["head"] or "-"), escape(r["data"] or "-"),
                 _num(r["trainable_pct"], "{:.2f}%"), top1_cell(r)]
        if heads:
            cells.append(_before_after(r["before"].get("head_top1"), r["after"].get("head_top1")))
        cells += [format_seconds(r["train_seconds"]), _num(r["peak_rss_mb"], "{:.0f} MB")]
        t.add_row(*cells)
    console.print(t)
    for r in rows:
        if r["error"]:
            console.print(f"[red]{escape(r['run'])}[/]: {escape(r['error'])}", soft_wrap=True)


def _value(v) -> str:
    return "-" if v is None else v if isinstance(v, str) else format_value(v)


def render_compare(doc: dict, console, show_all: bool = False) -> None:
    """:func:`compare`'s document: the differing config keys (and the equal
    ones, dimmed, with ``show_all``), the metrics, then time and memory."""
    from rich.markup import escape
    from rich.table import Table
    a, b = doc["a"], doc["b"]
    console.print(f"[bold]A[/] {escape(a['path'])} ({a['status']})   "
                  f"[bold]B[/] {escape(b['path'])} ({b['status']})", soft_wrap=True)
    for side in (a, b):
        if side["error"]:
            console.print(f"[red]{escape(side['path'])}[/]: {escape(side['error'])}", soft_wrap=True)
    n = len(doc["differing"])
    t = Table(title=f"config: {n} key{'s' if n != 1 else ''} differ{'s' if n == 1 else ''}"
                    + ("" if show_all else f", {len(doc['equal'])} equal (--all shows them)"))
    for c in ("key", "A", "B"):
        t.add_column(c, overflow="fold")
    for k, v in doc["differing"].items():
        t.add_row(escape(k), escape(_value(v["a"])), escape(_value(v["b"])))
    if show_all:
        for k, v in doc["equal"].items():
            t.add_row(escape(k), escape(_value(v)), escape(_value(v)), style="dim")
    if n or show_all:
        console.print(t)
    else:
        console.print(f"configs are identical ({len(doc['equal'])} keys)")

    if doc["metrics"]:
        m = Table(title="metrics (val split)")
        for c in ("metric", "A before", "A after", "B before", "B after", "B − A (after)"):
            m.add_column(c, justify="left" if c == "metric" else "right")
        for name, e in doc["metrics"].items():
            d = e["difference"]
            diff = "-" if d is None else (f"[green]{d:+.4f}[/]" if d > 0 else
                                          f"[red]{d:+.4f}[/]" if d < 0 else f"{d:+.4f}")
            m.add_row(escape(name), _num(e["a"]["before"], "{:.4f}"), _num(e["a"]["after"], "{:.4f}"),
                      _num(e["b"]["before"], "{:.4f}"), _num(e["b"]["after"], "{:.4f}"), diff)
        console.print(m)
    else:
        console.print("no metrics in either run (no summary.json)")

    r = Table(title="run")
    for c in ("", "A", "B", "B − A"):
        r.add_column(c, justify="left" if not c else "right")

    def diff(x, y, fmt):
        return "-" if x is None or y is None else fmt.format(y - x)
    r.add_row("trainable params", _num(a["params_trainable"], "{:,.0f}"), _num(b["params_trainable"], "{:,.0f}"),
              diff(a["params_trainable"], b["params_trainable"], "{:+,.0f}"))
    r.add_row("trainable %", _num(a["trainable_pct"], "{:.2f}%"), _num(b["trainable_pct"], "{:.2f}%"),
              diff(a["trainable_pct"], b["trainable_pct"], "{:+.2f}"))
    r.add_row("train time", format_seconds(a["train_seconds"]), format_seconds(b["train_seconds"]),
              diff(a["train_seconds"], b["train_seconds"], "{:+.1f}s"))
    r.add_row("peak RSS", _num(a["peak_rss_mb"], "{:.0f} MB"), _num(b["peak_rss_mb"], "{:.0f} MB"),
              diff(a["peak_rss_mb"], b["peak_rss_mb"], "{:+.0f} MB"))
    console.print(r)
