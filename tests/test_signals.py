"""SIGTERM, SIGINT and SIGHUP stop a command in order: a run checkpoints
(SIGHUP like SIGTERM), a sweep passes the signal on to its member and records
it as interrupted (the same sweep command continues it), an export leaves
neither its temporary folder nor a half-written OUT. The signals come from
drivers at exact points (fault_driver.py, signal_driver.py), so nothing races."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TRAIN = ["--model", "tiny-vit", "--data", "shapes:n=16,val_n=8", "--epochs", "1", "--batch-size", "8",
         "--callback", "none"]

pytestmark = pytest.mark.usefixtures("one_thread")


def driven(script, *args, timeout=300):
    return subprocess.run([sys.executable, str(HERE / script), *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=timeout)


def running_with(text: str) -> list:
    """Processes whose command line mentions ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def temporaries(folder: Path) -> list:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


def test_sighup_stops_a_run_like_sigterm(tmp_path, invoke):
    out = tmp_path / "hup"
    r = driven("fault_driver.py", 1, "SIGHUP", "run", *TRAIN, "--strategy", "lora", "--out", out)
    assert r.returncode == 129, r.stderr
    assert "SIGHUP" in r.stderr and f"resume with: clipft run --resume {out}" in r.stderr
    assert "Traceback" not in r.stderr and not (out / "summary.json").exists()
    assert json.loads((out / "checkpoint" / "state.json").read_text())["global_step"] == 1
    assert invoke("run", "--resume", out).exit_code == 0
    assert json.loads((out / "summary.json").read_text())["train"]["steps"] == 2


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="lists processes through /proc")
def test_sigterm_to_a_sweep_stops_its_member_and_the_same_command_continues(tmp_path, invoke):
    out = tmp_path / "sweep"
    args = ["sweep", *TRAIN, "--strategies", "projections,lora", "--out", out]
    # the sweep gets SIGTERM while lora (the second member) trains, after its first step
    r = driven("signal_driver.py", "sweep", "lora/seed0", 1, "SIGTERM", *args)
    assert r.returncode == 143, r.stderr
    assert running_with(str(out)) == []             # no member left behind
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "SIGTERM: sweep stopped; lora seed 0 was interrupted" in line[0]
    assert "run the same clipft sweep command again" in line[0] and "Traceback" not in r.stderr
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["status"] == "interrupted" and doc["signal"] == "SIGTERM"
    first, second = (m["runs"][0] for m in doc["members"])
    assert first["status"] == "ok"
    lora = out / "lora" / "seed0"
    assert second["status"] == "interrupted" and second["run_dir"] == str(lora)
    assert second["exit_code"] == 143 and second["checkpoint"]
    assert json.loads((lora / "checkpoint" / "state.json").read_text())["global_step"] == 1
    assert not (lora / "summary.json").exists()
    kept = (out / "projections" / "seed0" / "summary.json").read_bytes()

    r = invoke(*args, "--json")                        # the same command continues the sweep
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["status"] == "complete" and [m["ok"] for m in doc["members"]] == [1, 1]
    assert [m["runs"][0]["how"] for m in doc["members"]] == ["kept", "resumed"]
    assert (out / "projections" / "seed0" / "summary.json").read_bytes() == kept
    assert json.loads((lora / "summary.json").read_text())["train"]["steps"] == 2
    # finished now: it takes --overwrite again
    r = invoke(*args)
    assert r.exit_code == 2 and "--overwrite" in r.stderr


def test_sigterm_mid_export_leaves_no_temporary_and_out_as_it_was(tmp_path, invoke):
    run = tmp_path / "run"
    assert invoke("run", *TRAIN, "--strategy", "lora", "--out", run).exit_code == 0
    out = tmp_path / "export"
    r = driven("signal_driver.py", "export", "SIGTERM", "export", run, out)
    assert r.returncode == 143, r.stderr
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "SIGTERM: export stopped" in line[0] and "Traceback" not in r.stderr
    assert not out.exists() and temporaries(tmp_path) == []

    assert invoke("export", run, out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = driven("signal_driver.py", "export", "SIGTERM", "export", run, out, "--overwrite")
    assert r.returncode == 143, r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and temporaries(tmp_path) == []
