"""``make bench``: clipft's performance rows, each a ratio of two measurements
taken side by side in this run, with the absolute figures next to it.

    python benchmarks/run.py [--rows 1,2,3,4,5,6,7,8,8b,9,10,defaults] [--out benchmarks/results.json]

Prints a short description of the machine (CPU, nproc, torch's BLAS / LAPACK /
MKL / oneDNN build and its threads), then a table, and writes the results
(machine, rows, figures, seconds) to JSON; the last-n sweep also writes
``benchmarks/last_n.png``. A row built from step pairs whose pair ratios
spread more than +-10% is marked noisy (in the ``met`` column and in the JSON;
``common.paired_stats``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROWS = {
    "1": ("full_step", "full fine-tune step vs seed loop"),
    "2": ("linear_probe", "linear head on a frozen tower vs seed loop"),
    "3": ("prompt", "prompt tuning vs plain loop"),
    "4": ("lora_memory", "peak RSS lora vs full"),
    "5": ("vs_open_clip_train", "vs open_clip_train synthetic"),
    "6": ("last_n", "last-n step time sweep"),
    "7": ("scale", "frozen-tower cache cost vs data size, memory vs --cache-dir"),
    "8": ("small_data", "small folder, whole process vs seed loop process"),
    "8b": ("cache_build", "row 8's cache build vs a plain encode_image loop, one process"),
    "9": ("large_batch", "--grad-accum 8 x 32 large-batch loss vs one batch of 256: peak RSS, step time, "
                         "and with the image tower frozen and cached"),
    "10": ("fsdp_memory", "per-rank peak RSS of a 2-process full fine-tune, --parallel fsdp vs ddp"),
    "defaults": ("defaults", "precision and workers defaults"),
    "onnx": ("onnx_cpu", "image encoding on CPU, onnxruntime vs torch eager"),
}


def print_table(rows, total: float, info: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from common import fmt, machine_header

    console = Console(width=200)
    for line in machine_header(info):
        console.print(line, markup=False, highlight=False)

    t = Table(title=f"clipft benchmarks ({total:.0f} s)", show_lines=False)
    for col in ("row", "what", "ratio", "target", "met", "figures"):
        t.add_column(col, overflow="fold")
    for r in rows:
        figs = ", ".join(f"{k}={fmt(v)}" for k, v in r.figures.items()
                         if not isinstance(v, (list, dict)))
        # one level of nesting; deeper values (and lists) are in the JSON only
        nested = "; ".join(f"{k}: " + " ".join(f"{kk}={fmt(vv)}" for kk, vv in v.items()
                                               if not isinstance(vv, (list, dict)))
                           for k, v in r.figures.items()
                           if isinstance(v, dict) and any(not isinstance(vv, (list, dict)) for vv in v.values()))
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}[r.met]
        if r.noisy:
            met += " [yellow](noisy)[/]"
        t.add_row(r.id, r.name + (f" [dim]({r.note})[/]" if r.note else ""), fmt(r.ratio), r.target, met,
                  "; ".join(x for x in (figs, nested) if x))
    console.print(t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ",".join(ROWS))
    ap.add_argument("--out", default=str(HERE / "results.json"))
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    a = ap.parse_args(argv)

    from common import Row, machine, now, registry, reuse_models

    selected = [r.strip() for r in a.rows.split(",") if r.strip()]
    unknown = [r for r in selected if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    info = machine()
    reg = registry()
    results = []
    t0 = now()
    with tempfile.TemporaryDirectory(prefix="clipft-bench-") as tmp, reuse_models():
        work = Path(a.work or tmp)
        for key in selected:
            module_name, what = ROWS[key]
            start = now()
            print(f"[bench] row {key}: {what} ...", file=sys.stderr, flush=True)
            try:
                module = __import__(module_name)
                rows = module.run(reg, work)
            except Exception as exc:  # a failed row is reported, the others still run
                traceback.print_exc()
                rows = [Row(id=key, name=what, ratio=float("nan"), target="info", figures={},
                            note=f"failed: {type(exc).__name__}: {exc}"[:300], seconds=now() - start)]
            for r in rows:
                print(f"[bench]   {r.id}: ratio {r.ratio:.3g} (target {r.target})"
                      f"{' noisy' if r.noisy else ''} in {r.seconds:.0f}s", file=sys.stderr, flush=True)
            results.extend(rows)
    total = now() - t0
    info["load_average_end"] = os.getloadavg()
    doc = {"machine": info, "rows": [r.to_json() for r in results], "total_seconds": total,
           "load_average_end": info["load_average_end"], "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(a.out).write_text(json.dumps(doc, indent=2))
    print_table(results, total, info)
    print(f"results: {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
