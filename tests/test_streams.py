"""Streams: a command's result on stdout (so that ``clipft plugins | grep lora``
and ``clipft runs > list.txt`` work), progress, logs, warnings, notes and hints
on stderr; ``--json`` puts exactly one JSON document on stdout."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from shapes_folder import write_folder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = "shapes:n=64,val_n=16"
RUN = ["run", "--model", "tiny-vit", "--data", DATA, "--batch-size", "16", "--epochs", "1",
       "--callback", "none", "--strategy", "last-n:n=1"]
#: longer than a column of an 80-column table holds: a squeezed table would fold it
LONG = "a-run-whose-name-is-far-longer-than-a-narrow-table-column-would-hold"
#: no COLUMNS from the environment: the width is clipft's choice
NO_COLUMNS = {"COLUMNS": None}


def one_json(res):
    """stdout is exactly one JSON document (json.loads refuses anything after it)."""
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def invoke_m():
    from click.testing import CliRunner

    from clipft.cli import cli
    runner = CliRunner()

    def _invoke(*args, env=None):
        return runner.invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)
    return _invoke


@pytest.fixture(scope="module")
def made(invoke_m, tmp_path_factory):
    """Two tiny runs under one folder: one as a person runs it, one with --json."""
    root = tmp_path_factory.mktemp("streams") / "runs"
    human = invoke_m(*RUN, "--out", root / LONG)
    assert human.exit_code == 0, human.output
    as_json = invoke_m(*RUN, "--out", root / "b", "--json")
    return {"root": root, "human": human, "json": as_json}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """An image folder of 2 classes, 3 images each, and one broken file."""
    root = tmp_path_factory.mktemp("imgs") / "images"
    files = write_folder(root, 3, ["red", "blue"], ["circle"], size=32)
    bad = root / "red_circle" / "broken.png"
    bad.write_bytes(b"not a png")
    return root, files, bad


def test_plugins_listing_on_stdout_greps_once(invoke):
    r = invoke("plugins")
    assert r.exit_code == 0 and r.stderr == ""
    # `clipft plugins | grep -c lora` prints 1: one row for the lora distribution
    assert len([ln for ln in r.stdout.splitlines() if "clipft-lora " in ln]) == 1
    assert len([ln for ln in r.stdout.splitlines() if "lora" in ln]) == 1
    doc = one_json(invoke("plugins", "--json"))
    assert any(p["distribution"] == "clipft-lora" for p in doc["plugins"])


def test_describe_option_table_on_stdout(invoke):
    r = invoke("describe", "strategy", "lora")
    assert r.exit_code == 0 and r.stderr == ""
    assert "strategy lora (clipft-lora)" in r.stdout
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("│ r ")]
    assert len(rows) == 1 and "int" in rows[0]   # one line per option, not folded
    assert one_json(invoke("describe", "strategy", "lora", "--json"))["name"] == "lora"


def test_plan_on_stdout(invoke):
    args = ["plan", "--model", "tiny-vit", "--data", DATA, "--strategy", "last-n:n=1"]
    r = invoke(*args)
    assert r.exit_code == 0 and r.stderr == ""
    assert "plan: tiny-vit" in r.stdout and "training state" in r.stdout
    assert one_json(invoke(*args, "--json"))["strategies"] == ["last-n"]


def test_run_table_on_stdout_progress_on_stderr(made):
    r = made["human"]
    # the result: the before/after table and the closing summary line
    assert "evaluation (val split)" in r.stdout and "before" in r.stdout and "after" in r.stdout
    assert "trained 4 steps" in r.stdout and LONG in r.stdout
    # progress and the run's header are logs
    assert "epoch 1/1" in r.stderr and "clipft tiny-vit" in r.stderr
    assert "epoch 1/1" not in r.stdout and "clipft tiny-vit" not in r.stdout
    assert "evaluation (val split)" not in r.stderr


def test_run_json_is_the_only_thing_on_stdout(made):
    r = made["json"]
    summary = one_json(r)
    assert summary["run_dir"].endswith("b") and summary["train"]["steps"] == 4
    assert "evaluation (val split)" in r.stderr and "epoch 1/1" in r.stderr   # the human output stays


def test_runs_list_on_stdout_keeps_full_names(made, invoke):
    r = invoke("runs", made["root"], env=NO_COLUMNS)
    assert r.exit_code == 0 and r.stderr == ""
    rows = [ln for ln in r.stdout.splitlines() if LONG in ln]   # whole, on one line: not folded
    assert len(rows) == 1 and "last-n" in rows[0]
    assert all(len(ln) < 400 for ln in r.stdout.splitlines())   # wide, yet only as wide as needed
    doc = one_json(invoke("runs", made["root"], "--json"))
    assert sorted(x["run"] for x in doc["runs"]) == sorted([LONG, "b"])
    r = invoke("runs", made["root"], "--compare", LONG, "b", env=NO_COLUMNS)
    assert r.exit_code == 0 and r.stderr == ""
    assert "metrics (val split)" in r.stdout and LONG in r.stdout
    assert one_json(invoke("runs", made["root"], "--compare", LONG, "b", "--json"))["b"]["status"] == "complete"


def test_eval_report_on_stdout(made, invoke):
    run = made["root"] / "b"
    r = invoke("eval", run, "--data", DATA)
    assert r.exit_code == 0, r.output
    assert "top1" in r.stdout and "per-class top1" in r.stdout
    assert "top1" not in r.stderr
    doc = one_json(invoke("eval", run, "--data", DATA, "--json"))
    assert doc["samples"] == 16
    r = invoke("eval", run, "--data", DATA, "--wise-ft-sweep", "0,1")
    assert r.exit_code == 0, r.output
    assert "WiSE-FT" in r.stdout and "WiSE-FT" not in r.stderr
    assert [row["alpha"] for row in one_json(invoke("eval", run, "--data", DATA, "--wise-ft-sweep", "0,1",
                                                    "--json"))["wise_ft"]] == [0.0, 1.0]


def test_eval_notes_go_to_the_notes_console(made, invoke):
    from rich.console import Console

    from clipft.commands.inference import render_eval
    doc = one_json(invoke("eval", made["root"] / "b", "--data", DATA, "--json"))
    doc["notes"] = ["head skipped: a made-up reason"]
    out, err = io.StringIO(), io.StringIO()
    render_eval(doc, Console(file=out, width=200), notes=Console(file=err, width=200))
    assert "made-up reason" in err.getvalue() and "made-up reason" not in out.getvalue()
    assert "top1" in out.getvalue()


def test_predict_lines_on_stdout_errors_on_stderr(made, invoke, images):
    root, files, bad = images
    run = made["root"] / "b"
    r = invoke("predict", run, root, "--top-k", "2")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert sorted(ln.split("\t")[0] for ln in lines) == sorted(str(f) for f in files)
    assert all(len(ln.split("\t")[1].split("  ")) == 2 for ln in lines)
    assert f"{bad}\terror:" in r.stderr and "1 of 7 images could not be read" in r.stderr
    r = invoke("predict", run, root, "--top-k", "2", "--json")
    assert r.exit_code == 0, r.output
    recs = [json.loads(ln) for ln in r.stdout.splitlines()]   # JSON Lines, nothing else
    assert len(recs) == len(files) + 1 and sum("error" in x for x in recs) == 1
    assert "1 of 7 images could not be read" in r.stderr


def test_export_summary_on_stdout(made, invoke, tmp_path):
    run = made["root"] / "b"
    r = invoke("export", run, tmp_path / "e1")
    assert r.exit_code == 0, r.output
    assert "exported" in r.stdout and "open_clip_model.safetensors" in r.stdout and r.stderr == ""
    assert one_json(invoke("export", run, tmp_path / "e2", "--json"))["load_with"]


def test_shards_summary_on_stdout_hints_on_stderr(invoke, images, tmp_path):
    root, files, _ = images
    r = invoke("shards", root, tmp_path / "s1", "--shard-size", "4")
    assert r.exit_code == 0, r.output
    assert f"wrote 2 shard(s), {len(files)} samples, 2 classes" in r.stdout
    assert "shard-000000.tar" in r.stdout and "shard-000001.tar" in r.stdout
    for hint in ("skipped 1 unreadable image", "note: samples are in class order", "train on them"):
        assert hint in r.stderr and hint not in r.stdout
    m = one_json(invoke("shards", root, tmp_path / "s2", "--shard-size", "4", "--json"))
    assert m["samples"] == len(files)


def test_new_lists_files_on_stdout(invoke, tmp_path):
    target = tmp_path / "plugin"
    r = invoke("new", "strategy", "mine", "--dir", target)
    assert r.exit_code == 0, r.output
    listed = [ln.strip() for ln in r.stdout.splitlines()[1:]]
    written = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert sorted(listed) == written and "pyproject.toml" in listed
    assert r.stdout.startswith("wrote strategy plugin clipft-mine")
    assert "next: pip install -e" in r.stderr and "pip install" not in r.stdout


def test_sweep_table_on_stdout_progress_on_stderr(invoke, tmp_path, monkeypatch):
    """Members as canned rows: the streams are the CLI's, not the training's."""
    from clipft.commands import sweep

    def member(spec, refs, seed, run_dir):
        return {"seed": seed, "run_dir": str(run_dir), "status": "ok", "top1_before": 0.25,
                "top1_after": 0.5, "head_top1_after": None, "trainable": 10, "train_seconds": 1.0,
                "peak_rss_mb": 100.0, "checkpoint_mb": 0.5}
    monkeypatch.setattr(sweep, "_run_member", member)
    args = ["sweep", "--model", "tiny-vit", "--data", DATA, "--strategies", "projections,lora"]
    r = invoke(*args, "--out", tmp_path / "s1")
    assert r.exit_code == 0, r.output
    assert "sweep: tiny-vit on shapes" in r.stdout and "0.250" in r.stdout and "0.500" in r.stdout
    assert f"wrote {tmp_path / 's1' / 'sweep.json'}" in r.stdout
    assert "[1/2] projections seed 0" in r.stderr and "[2/2] lora seed 0" in r.stderr
    assert "seed 0" not in r.stdout
    doc = one_json(invoke(*args, "--out", tmp_path / "s2", "--json"))
    assert [m["name"] for m in doc["members"]] == ["projections", "lora"]


def test_result_console_is_wide_off_a_terminal(monkeypatch):
    from rich.table import Table

    from clipft.progress import PIPE_WIDTH, stdout_console
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stdout", buf)
    monkeypatch.setenv("COLUMNS", "40")
    console = stdout_console()
    assert console.width == PIPE_WIDTH and not console.is_terminal
    t = Table()
    t.add_column("name")
    t.add_row(LONG)
    console.print(t)
    assert any(LONG in ln for ln in buf.getvalue().splitlines())
