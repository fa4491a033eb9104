"""benchmarks/gpu_check.py needs a GPU to measure anything; its ``--dry-run``
runs every row's code on tiny-vit on the CPU, so the check cannot rot between
the rare runs on a GPU. The torchrun rows' processes are replaced by a stand-in
that checks their command line against the CLI (a real launch costs a process
start of many seconds: ``python benchmarks/gpu_check.py --dry-run`` does it)."""
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc_mod():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module      # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def launcher(calls, returncode=0, stderr=""):
    """A stand-in for gpu_check._run: the clipft arguments of the command must
    parse with ``clipft run`` (so a renamed option fails here)."""
    from clipft.cli import cli

    def fake(cmd, limit):
        calls.append(cmd)
        args = cmd[cmd.index("clipft") + 2:]
        if "--parallel" in args and not any("--parallel" in p.opts for p in cli.commands["run"].params):
            i = args.index("--parallel")
            args = args[:i] + args[i + 2:]
        cli.commands["run"].make_context("run", list(args))
        summary = {"train": {"samples_per_s": 12.5}} if returncode == 0 else None
        return subprocess.CompletedProcess(cmd, returncode, json.dumps(summary) if summary else "", stderr)
    return fake


def test_dry_run_prints_one_table_with_every_row(gc_mod, monkeypatch, capsys, tmp_path):
    calls = []
    monkeypatch.setattr(gc_mod, "_run", launcher(calls))
    assert gc_mod.main(["--dry-run", "--json", str(tmp_path / "rows.json")]) == 0
    out = capsys.readouterr().out
    assert out.count("clipft GPU check") == 1
    header, *rows = json.loads((tmp_path / "rows.json").read_text())
    assert header["device"] == "cpu (dry run)"
    cases = [r["case"] for r in rows]
    assert len(rows) == 6, cases
    assert not [r for r in rows if "failed" in (r.get("note") or "") or "stopped" in (r.get("note") or "")], rows
    big, one = rows[2], rows[3]
    assert "2 x 4 large-batch accumulation" in big["case"] and "one batch of 8" in one["case"]
    assert big["step_time_ratio"] == pytest.approx(big["step_s"] / one["step_s"])
    assert rows[4]["samples_per_s"] == 12.5 and "--nproc-per-node=1" in calls[0]
    # no GPUs here: the FSDP row says why it did not run
    assert rows[5]["note"] == "skipped: needs 2 GPUs, found 0"
    for r in rows:
        assert r["case"].split(",")[0] in out


def test_one_batch_that_does_not_fit_is_reported_oom(gc_mod, monkeypatch):
    prepared = gc_mod._prepared

    def prepare(setup, model, strategy, batch, n, **kw):
        if batch == setup.effective:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (stand-in)")
        return prepared(setup, model, strategy, batch, n, **kw)
    monkeypatch.setattr(gc_mod, "_prepared", prepare)
    big, one = gc_mod.accum_cases(gc_mod.DRY, "tiny-vit", steps=1)
    assert one["peak_mem_gb"] == "OOM" and "OOM" in one["note"]
    assert big["steps"] == 1 and big["note"] == "one batch of the same size does not fit"


def test_fsdp_row_runs_two_processes_or_says_why_not(gc_mod, monkeypatch, tmp_path):
    setup = gc_mod.DRY
    assert gc_mod.fsdp_row(setup, 10, str(tmp_path), gpus=1)["note"] == "skipped: needs 2 GPUs, found 1"
    monkeypatch.setattr(gc_mod, "fsdp_available", lambda: False)
    assert gc_mod.fsdp_row(setup, 10, str(tmp_path), gpus=2)["note"] == "skipped: --parallel fsdp not available"
    monkeypatch.setattr(gc_mod, "fsdp_available", lambda: True)
    calls = []
    monkeypatch.setattr(gc_mod, "_run", launcher(calls, 2, "Error: No such option: --parallel"))
    row = gc_mod.fsdp_row(setup, 10, str(tmp_path), gpus=2)
    assert row["note"].startswith("skipped: --parallel fsdp not available (Error: No such option")
    monkeypatch.setattr(gc_mod, "_run", launcher(calls))
    row = gc_mod.fsdp_row(setup, 10, str(tmp_path), gpus=2)
    assert row["samples_per_s"] == 12.5 and row["exit"] == 0
    cmd = calls[-1]
    assert "--nproc-per-node=2" in cmd and cmd[cmd.index("--parallel") + 1] == "fsdp"


def test_a_case_over_its_limit_becomes_a_row(gc_mod):
    rows = []

    def slow():
        while True:
            time.sleep(0.01)
    gc_mod._guarded(rows, "slow case", 0.2, slow)
    gc_mod._guarded(rows, "late case", 0, slow)
    assert rows[0]["note"] == "stopped: over its 0.2 s limit" and rows[0]["case"] == "slow case"
    assert rows[1]["note"] == "stopped: no time left in the budget"
