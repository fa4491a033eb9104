"""``clipft runs [DIR]`` and ``clipft runs --compare A B`` on real tiny runs.

Three runs are trained once for the module (tiny-vit, random init, 32 shapes, one
epoch) in a ``runs/`` folder, one at the top and two nested as a sweep would put
them; the incomplete, corrupt and caption-only runs are copies of their files,
changed as a crash, a bad disk or caption data would leave them.
"""
import json
import os
import shutil

import pytest

from conftest import read_summary

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = "shapes:n=32,val_n=16"
#: wide enough that no cell of the table wraps
WIDE = {"COLUMNS": "250"}
#: each run's files get this modification time (the table is sorted by it)
TIMES = {"a": 1_000_000, "sweep/b": 2_000_000, "sweep/seeds/c": 3_000_000, "crashed": 4_000_000,
         "corrupt": 5_000_000, "captions": 6_000_000}
RUN_FILES = ("config.toml", "metrics.jsonl", "summary.json", ".clipft-run")


def _copy_run(src, dst):
    dst.mkdir(parents=True)
    for name in RUN_FILES:
        shutil.copy(src / name, dst / name)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, one_thread):
    from clipft.api import RunConfig, make_registry, run

    root = tmp_path_factory.mktemp("home") / "runs"
    reg = make_registry()
    common = dict(model="tiny-vit", pretrained="none", data=DATA, epochs=1, batch_size=16)
    # a and b differ in strategy and lr only; c is a probe through a zero-shot head
    run(RunConfig(strategies=["full"], lr=1e-3, **common), registry=reg, out=root / "a")
    run(RunConfig(strategies=["last-n:n=1"], lr=2e-3, **common), registry=reg, out=root / "sweep" / "b")
    run(RunConfig(head="zero-shot", **common), registry=reg, out=root / "sweep" / "seeds" / "c")

    _copy_run(root / "a", root / "crashed")              # died before it wrote summary.json
    (root / "crashed" / "summary.json").unlink()
    _copy_run(root / "a", root / "corrupt")              # a summary.json cut short
    (root / "corrupt" / "summary.json").write_text('{"params": {"total": 12')
    _copy_run(root / "sweep" / "b", root / "captions")   # caption data: no classes, no top1
    s = read_summary(root / "captions")
    for part in ("before", "after"):
        s["eval"][part].pop("top1")
    (root / "captions" / "summary.json").write_text(json.dumps(s))
    (root / "notes").mkdir()                             # not a run, searched and skipped
    (root / "notes" / "todo.txt").write_text("compare lr")
    _copy_run(root / "a", root / ".a.clipft-previous")   # an --overwrite backup: hidden, not listed

    for run_name, t in TIMES.items():
        for name in RUN_FILES:
            if (root / run_name / name).exists():
                os.utime(root / run_name / name, (t, t))
    return root


def _by_run(doc):
    return {r["run"]: r for r in doc["runs"]}


def _line(text, run_name):
    """The table line of one run (its name is the first cell)."""
    hits = [ln for ln in text.splitlines() if ln.strip("│┃ ").startswith(run_name + " ")]
    assert len(hits) == 1, f"{run_name} not found once in:\n{text}"
    return hits[0]


def test_the_marker_name_is_the_run_directory_contracts():
    from clipft.commands import runs
    from clipft.engine import rundir
    assert runs.MARKER == rundir.MARKER


def test_json_lists_every_run_oldest_first_with_summary_values(invoke, runs_dir):
    r = invoke("runs", runs_dir, "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [row["run"] for row in doc["runs"]] == list(TIMES)
    assert [row["time"] for row in doc["runs"]] == list(TIMES.values())
    rows = _by_run(doc)
    expect = {"a": ("full", "contrastive", None), "sweep/b": ("last-n:n=1", "contrastive", None),
              "sweep/seeds/c": ("none", "cross-entropy", "zero-shot")}
    for name, (strategy, loss, head) in expect.items():
        row, s = rows[name], read_summary(runs_dir / name)
        assert row["status"] == "complete" and row["error"] is None
        assert (row["strategy"], row["loss"], row["head"], row["data"]) == (strategy, loss, head, DATA)
        assert row["model"] == "tiny-vit"
        assert row["params_total"] == s["params"]["total"]
        assert row["params_trainable"] == s["params"]["trainable"]
        assert row["trainable_pct"] == pytest.approx(100 * s["params"]["trainable"] / s["params"]["total"])
        assert row["before"] == s["eval"]["before"] and row["after"] == s["eval"]["after"]
        assert row["train_seconds"] == s["train"]["seconds"]
        assert row["peak_rss_mb"] == s["train"]["peak_rss_mb"]
        assert (row["train_size"], row["val_size"]) == (32, 16)
    assert rows["a"]["trainable_pct"] == pytest.approx(100.0, abs=0.1)   # full: all but the frozen few
    assert 0 < rows["sweep/b"]["trainable_pct"] < rows["a"]["trainable_pct"]
    assert "head_top1" in rows["sweep/seeds/c"]["after"] and "head_top1" not in rows["a"]["after"]


def test_incomplete_and_unreadable_runs_are_listed_not_skipped(invoke, runs_dir):
    rows = _by_run(json.loads(invoke("runs", runs_dir, "--json").stdout))
    crashed, corrupt = rows["crashed"], rows["corrupt"]
    assert crashed["status"] == "incomplete" and crashed["error"] is None
    # what config.toml says is still shown; the numbers are unknown
    assert (crashed["strategy"], crashed["loss"], crashed["data"]) == ("full", "contrastive", DATA)
    assert crashed["params_total"] is None and crashed["after"] == {} and crashed["train_seconds"] is None
    assert corrupt["status"] == "unreadable" and "summary.json" in corrupt["error"]
    assert corrupt["strategy"] == "full" and corrupt["trainable_pct"] is None
    assert "notes" not in rows and not any(".clipft-previous" in name for name in rows)


def test_table_shows_components_trainable_share_and_top1_before_after(invoke, runs_dir):
    r = invoke("runs", runs_dir, env=WIDE)
    assert r.exit_code == 0 and r.stderr == ""
    text = r.stdout
    for name in ("a", "sweep/b", "sweep/seeds/c"):
        s = read_summary(runs_dir / name)
        line = _line(text, name)
        assert f"{100 * s['params']['trainable'] / s['params']['total']:.2f}%" in line
        assert f"{s['eval']['before']['top1']:.3f} → {s['eval']['after']['top1']:.3f}" in line
        assert f"{s['train']['peak_rss_mb']:.0f} MB" in line and DATA in line
    assert "last-n:n=1" in _line(text, "sweep/b") and "contrastive" in _line(text, "sweep/b")
    c = read_summary(runs_dir / "sweep/seeds/c")["eval"]
    probe = _line(text, "sweep/seeds/c")
    assert "zero-shot" in probe and "cross-entropy" in probe and "head top-1" in text
    assert probe.count(f"{c['before']['head_top1']:.3f} → {c['after']['head_top1']:.3f}") >= 1
    # caption data: recall@1 stands in for top-1
    cap = read_summary(runs_dir / "captions")["eval"]
    assert f"recall@1 {cap['before']['recall@1']:.3f} → {cap['after']['recall@1']:.3f}" in _line(text, "captions")
    assert "incomplete" in _line(text, "crashed")
    assert "unreadable" in _line(text, "corrupt")
    assert "corrupt: summary.json: JSONDecodeError" in text
    # oldest first
    assert text.index("│ a ") < text.index("sweep/b") < text.index("sweep/seeds/c") < text.index("captions")


def test_dir_defaults_to_runs_and_may_be_a_run_or_a_sweep(invoke, runs_dir, monkeypatch):
    monkeypatch.chdir(runs_dir.parent)
    doc = json.loads(invoke("runs", "--json").stdout)
    assert doc["dir"] == "runs" and len(doc["runs"]) == len(TIMES)
    sweep = json.loads(invoke("runs", "runs/sweep", "--json").stdout)
    assert [r["run"] for r in sweep["runs"]] == ["b", "seeds/c"]
    one = json.loads(invoke("runs", "runs/a", "--json").stdout)
    assert [(r["run"], r["status"]) for r in one["runs"]] == [("runs/a", "complete")]


def test_search_depth_and_empty_folder(runs_dir, tmp_path, invoke):
    from clipft.commands import runs
    found = {p.relative_to(runs_dir).as_posix() for p in runs.find_runs(runs_dir)}
    assert found == set(TIMES)
    assert {p.name for p in runs.find_runs(runs_dir, max_depth=1)} == {"a", "crashed", "corrupt", "captions"}
    r = invoke("runs", tmp_path, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout) == {"dir": str(tmp_path), "runs": []}
    r = invoke("runs", tmp_path)
    assert r.exit_code == 0 and "no clipft runs under" in r.stdout


def test_compare_lists_exactly_the_keys_that_differ(invoke, runs_dir):
    r = invoke("runs", "--compare", runs_dir / "a", runs_dir / "sweep" / "b", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["differing"] == {"lr": {"a": 1e-3, "b": 2e-3},
                                "strategy": {"a": "full", "b": "last-n:n=1"}}
    assert doc["equal"]["data"] == DATA and doc["equal"]["batch_size"] == 16
    assert doc["equal"]["head"] == "none"
    import tomllib
    assert doc["a"]["config"] == tomllib.loads((runs_dir / "a" / "config.toml").read_text())
    sa, sb = read_summary(runs_dir / "a"), read_summary(runs_dir / "sweep" / "b")
    top1 = doc["metrics"]["top1"]
    assert top1["a"] == {"before": sa["eval"]["before"]["top1"], "after": sa["eval"]["after"]["top1"]}
    assert top1["b"]["after"] == sb["eval"]["after"]["top1"]
    assert top1["difference"] == pytest.approx(sb["eval"]["after"]["top1"] - sa["eval"]["after"]["top1"])
    assert set(doc["metrics"]) == set(sa["eval"]["after"])
    assert doc["b"]["params_trainable"] == sb["params"]["trainable"]


def test_compare_table_names_relative_to_dir_and_all(invoke, runs_dir):
    r = invoke("runs", runs_dir, "--compare", "a", "sweep/b", env=WIDE)
    assert r.exit_code == 0 and r.stderr == ""
    text = r.stdout
    assert "2 keys differ" in text
    assert "full" in _line(text, "strategy") and "last-n:n=1" in _line(text, "strategy")
    assert "0.001" in _line(text, "lr") and "0.002" in _line(text, "lr")
    assert "batch_size" not in text
    sa, sb = read_summary(runs_dir / "a"), read_summary(runs_dir / "sweep" / "b")
    diff = sb["eval"]["after"]["top1"] - sa["eval"]["after"]["top1"]
    assert f"{diff:+.4f}" in _line(text, "top1")
    r = invoke("runs", runs_dir, "--compare", "a", "sweep/b", "--all", env=WIDE)
    assert r.exit_code == 0 and "batch_size" in r.stdout and "16" in _line(r.stdout, "batch_size")


def test_compare_with_a_run_that_did_not_finish(invoke, runs_dir):
    doc = json.loads(invoke("runs", runs_dir, "--compare", "a", "crashed", "--json").stdout)
    assert doc["differing"] == {} and doc["b"]["status"] == "incomplete"
    assert doc["metrics"]["top1"]["b"] == {"before": None, "after": None}
    assert doc["metrics"]["top1"]["difference"] is None
    r = invoke("runs", runs_dir, "--compare", "a", "crashed")
    assert r.exit_code == 0 and "configs are identical" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (("runs", "{root}/nowhere"), "nowhere: no such directory"),
    (("runs", "{root}/notes/todo.txt"), "todo.txt: not a directory"),
    (("runs", "--compare", "{root}/a", "{root}/nowhere"), "nowhere: no such directory"),
    (("runs", "--compare", "{root}/notes", "{root}/a"), "notes is not a clipft run directory"),
    (("runs", "{root}", "--compare", "a", "sweep"), "sweep is not a clipft run directory"),
    (("runs", "{root}", "--all"), "--all goes with --compare"),
])
def test_usage_errors_exit_2_and_name_the_path(invoke, runs_dir, args, needle):
    r = invoke(*(a.format(root=runs_dir) for a in args))
    assert r.exit_code == 2 and r.stdout == ""
    assert needle in r.stderr


def test_missing_default_dir_says_so(invoke, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke("runs")
    assert r.exit_code == 2 and "runs: no such directory" in r.stderr and "default runs/" in r.stderr


def test_component_strings_show_options_that_differ_from_the_defaults(monkeypatch, tmp_path):
    from clipft.commands import runs
    from clipft.api import make_registry
    reg = make_registry()    # a full load: it records the defaults in the provides cache too
    t = {"name": "last-n", "n": 3, "tower": "both", "projection": True}   # n defaults to 2
    assert runs.component_string(t, "strategy", reg) == "last-n:n=3"
    # no registry (`clipft runs` imports no plugin): the defaults the cache recorded
    assert runs.component_string(t, "strategy") == "last-n:n=3"
    monkeypatch.setenv("CLIPFT_CACHE_DIR", str(tmp_path / "empty"))   # nothing recorded: every option
    assert runs.component_string(t, "strategy") == "last-n:n=3,tower=both,projection=true"
    lora = {"name": "lora", "targets": ["q", "v"], "r": 4, "dropout": None}
    assert runs.component_string(lora, "strategy", None) == "lora:targets=q,v,r=4"
    unknown = {"name": "not-installed", "alpha": 0.5}
    assert runs.component_string(unknown, "strategy", reg) == "not-installed:alpha=0.5"
    assert runs.strategies_string([], reg) == "none"
    assert runs.strategies_string([t, {"name": "differential-lr", "proj": 10.0, "rates": []}], reg) == \
        "last-n:n=3+differential-lr:proj=10"
