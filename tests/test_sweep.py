"""``clipft sweep``: members run as ordinary runs in their own processes, one
table and ``sweep.json``; a failing member is reported and the rest go on."""
from __future__ import annotations

import json

import pytest

from peft_base import SMALL_NOVEL, base_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

CONTROL = "shapes:n=16,val_n=24,seed=2,colours=red,green,blue,yellow,shapes=circle,square,triangle"


def test_parse_members():
    from clipft.commands.sweep import member_name, parse_members
    members = parse_members("projections,last-n:n=2,tower=vision,lora,reproject:dim=64+last-n:n=1")
    assert [[r.name for r in m] for m in members] == [["projections"], ["last-n"], ["lora"],
                                                      ["reproject", "last-n"]]
    assert members[1][0].options == {"n": "2", "tower": "vision"}   # typed when resolved
    assert member_name(members[3]) == "reproject.dim=64+last-n.n=1"


def test_two_strategies_one_seed_and_a_failing_member(invoke, tmp_path_factory, tmp_path):
    base = base_checkpoint(tmp_path_factory)
    out = tmp_path / "sweep"
    res = invoke("sweep", "--model", "tiny-vit", "--pretrained", base["weights"], "--data", SMALL_NOVEL,
                 "--strategies", "projections,last-n:n=99,lora", "--epochs", "1", "--batch-size", "16",
                 "--callback", "none", "--control-data", CONTROL, "--out", out, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert json.loads((out / "sweep.json").read_text()) == doc
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    names = [m["name"] for m in doc["members"]]
    assert names == ["projections", "last-n.n=99", "lora"]
    failed = doc["members"][1]
    assert failed["ok"] == 0 and "exceeds the depth" in failed["runs"][0]["error"]
    assert "last-n.n=99 seed 0 failed" in res.stderr
    for m in (doc["members"][0], doc["members"][2]):
        run = m["runs"][0]
        assert m["ok"] == 1 and run["status"] == "ok"
        summary = json.loads((out / m["name"] / "seed0" / "summary.json").read_text())
        # the table's numbers are the member run's own
        assert run["top1_after"] == summary["eval"]["after"]["top1"]
        assert run["trainable"] == summary["params"]["trainable"]
        assert run["peak_rss_mb"] == summary["train"]["peak_rss_mb"]
        assert run["checkpoint_mb"] > 0
        assert run["forgetting"] == pytest.approx(run["control_before"] - run["control_after"])
        assert m["mean"]["top1_after"] == run["top1_after"] and m["std"]["top1_after"] == 0.0
    # the members are ordinary runs: clipft runs lists them
    res = invoke("runs", out, "--json")
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)["runs"]) == 2
    # a second sweep into the same folder needs --overwrite
    res = invoke("sweep", "--model", "tiny-vit", "--data", SMALL_NOVEL, "--strategies", "lora", "--out", out)
    assert res.exit_code == 2 and "--overwrite" in res.stderr


def test_sweep_usage_errors(invoke, tmp_path):
    res = invoke("sweep", "--data", SMALL_NOVEL, "--strategies", "lora,nosuch", "--out", tmp_path / "s")
    assert res.exit_code == 2 and "unknown strategy 'nosuch'" in res.stderr
    assert not (tmp_path / "s").exists()
    res = invoke("sweep", "--data", SMALL_NOVEL, "--strategies", "lora", "--strategy", "full")
    assert res.exit_code == 2 and "--strategies" in res.stderr
    res = invoke("sweep", "--data", SMALL_NOVEL, "--strategies", "lora,lora")
    assert res.exit_code == 2 and "twice" in res.stderr
    res = invoke("sweep", "--data", SMALL_NOVEL, "--strategies", "lora", "--seeds", "0")
    assert res.exit_code == 2


def test_a_head_only_member_runs(invoke, tmp_path):
    """``--strategies none`` with a head: the member trains the head alone (TaskRes,
    CLAP and linear probes are swept so), instead of failing on the name 'none'."""
    out = tmp_path / "sweep"
    res = invoke("sweep", "--model", "tiny-vit", "--pretrained", "none", "--data", "shapes:n=32,val_n=16,size=32",
                 "--strategies", "none", "--head", "linear", "--loss", "cross-entropy", "--epochs", "1",
                 "--batch-size", "16", "--callback", "none", "--out", out, "--json")
    assert res.exit_code == 0, res.output
    member = json.loads(res.stdout)["members"][0]
    assert member["name"] == "none" and member["ok"] == 1 and member["runs"][0]["trainable"] > 0
