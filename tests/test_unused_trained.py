"""A selected text tower that nothing in the training forward uses is left
frozen, reported by ``clipft plan`` and at start-up, and recorded in
``summary.json`` (issue 22)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from clipft.anatomy import describe
from clipft.engine.compose import text_side, unused_trained
from clipft.specs import NEED_HEAD, NEED_LABELS, NEED_TEXT, HeadSpec, LossSpec
from clipft.testing import initial_state, load_trained, run_plugin, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = "shapes:n=32,val_n=16"
FULL_CE = ("--model", "tiny-vit", "--strategy", "full", "--head", "linear", "--loss", "cross-entropy")


def _text_count() -> tuple[int, int]:
    """``(parameters, tensors)`` of tiny-vit's text tower, from the model itself."""
    model = tiny_model()[0]
    names = describe(model).text.names
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names), len(names)


def plan_json(invoke, *args):
    r = invoke("plan", "--data", DATA, *args, "--json")
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def test_plan_reports_the_unused_text_tower_and_the_honest_trainable_count(invoke):
    p = plan_json(invoke, *FULL_CE)
    text, tensors = _text_count()
    unused = p["params"]["unused_trainable"]
    assert unused["tower"] == "text" and unused["params"] == text and unused["tensors"] == tensors
    assert p["params"]["by_part"]["text"] == {"total": text, "trainable": 0}
    assert p["params"]["trainable"] == p["params"]["total"] - text
    assert sum(g["params"] for g in p["groups"]) == p["params"]["trainable"]
    assert "freeze-text" in p["notes"][0]
    table = invoke("plan", "--data", DATA, *FULL_CE)
    assert table.exit_code == 0 and "3.37 M parameters" in table.stdout
    assert "--strategy freeze-text" in table.stdout.replace("\n", " ")


@pytest.mark.parametrize("args", [
    ("--strategy", "full"),                                                     # contrastive encodes text
    ("--strategy", "full", "--head", "text", "--loss", "cross-entropy"),        # the head encodes it
    ("--strategy", "freeze-text", "--head", "linear", "--loss", "cross-entropy"),  # nothing to report
])
def test_nothing_is_reported_when_training_encodes_text_or_it_is_frozen(invoke, args):
    p = plan_json(invoke, "--model", "tiny-vit", *args)
    assert p["params"]["unused_trainable"] is None and p["notes"] == []


def test_a_head_of_unknown_text_use_keeps_the_text_tower(tmp_path):
    model = tiny_model()[0]
    loss = LossSpec(name="ce", summary="", build=None, needs={NEED_HEAD, NEED_LABELS})
    def head(encodes):
        return HeadSpec(name="h", summary="", build=None, encodes_text=encodes)
    assert unused_trained(model, loss, head(None)) is None
    assert unused_trained(model, loss, head(True)) is None
    got = unused_trained(model, loss, head(False), ["full"])
    assert set(got.names) == set(text_side(model)) and "freeze-text" in got.fix
    contrastive = LossSpec(name="c", summary="", build=None, needs={NEED_TEXT})
    assert unused_trained(model, contrastive, head(False)) is None
    model.transformer.requires_grad_(False)   # only what still trains is reported
    rest = unused_trained(model, loss, None)
    assert rest is not None and not any(n.startswith("transformer.") for n in rest.names)
    assert "freeze-text" not in rest.fix and "no head" in rest.why


def test_the_run_never_trains_it_and_eval_and_export_still_work(tmp_path, invoke):
    s = run_plugin(None, strategy="full", head="linear", loss="cross-entropy", lr=1e-3,
                   steps=2, tmp_path=tmp_path)
    text, tensors = _text_count()
    assert s["params"]["unused_trainable"]["params"] == text
    assert s["params"]["trainable"] == s["params"]["total"] - text
    # what plan says is what the run did: one decision
    p = plan_json(invoke, "--config", f"{s['run_dir']}/config.toml")
    assert p["params"]["unused_trainable"] == s["params"]["unused_trainable"]
    assert p["params"]["trainable"] == s["params"]["trainable"]

    start = initial_state(s)
    names = describe(tiny_model()[0]).text.names
    trained = load_trained(s)
    state = trained.model.state_dict()
    assert all(torch.equal(state[n], start[n]) for n in names)
    vision = [n for n in start if n.startswith("visual.") and n in state]
    assert any(not torch.equal(state[n], start[n]) for n in vision)   # the image side did train

    out = tmp_path / "export"
    r = invoke("export", s["run_dir"], out)
    assert r.exit_code == 0, r.stderr
    exported = load_file(str(out / "open_clip_model.safetensors"))
    assert all(torch.equal(exported[n], start[n]) for n in names)
    r = invoke("eval", s["run_dir"], "--json")
    assert r.exit_code == 0, r.stderr
    got = json.loads(r.stdout)["metrics"]
    assert got["head_top1"] == pytest.approx(s["eval"]["after"]["head_top1"], abs=1e-6)
    assert got["top1"] == pytest.approx(s["eval"]["after"]["top1"], abs=1e-6)


def test_run_says_so_at_start_on_stderr(invoke, tmp_path):
    r = invoke("run", "--data", DATA, *FULL_CE, "--epochs", "1", "--batch-size", "16",
               "--out", tmp_path / "run")
    assert r.exit_code == 0, r.stderr
    assert "text tower (3.37 M parameters)" in r.stderr.replace("\n", " ")
    assert "text tower" not in r.stdout


def test_lp_ft_reports_it_for_the_fine_tune_stage_only(invoke):
    p = plan_json(invoke, "--model", "tiny-vit", "--strategy", "lp-ft:probe_epochs=1,then=full",
                  "--head", "linear", "--loss", "cross-entropy", "--epochs", "2")
    probe, tune = p["stages"]
    assert probe["params"]["unused_trainable"] is None
    assert tune["params"]["unused_trainable"]["params"] == _text_count()[0]
    assert tune["notes"] and "have the stage train freeze-text in place of full" in tune["notes"][0]


def test_a_checkpoint_whose_optimizer_trained_other_tensors_does_not_resume(invoke, tmp_path):
    """A run started before this rule trained the unused text tower: its optimizer
    groups are larger than this run's, and --resume says so instead of torch's
    unnamed size error."""
    out = tmp_path / "run"
    r = invoke("run", "--data", DATA, *FULL_CE, "--epochs", "1", "--batch-size", "16", "--out", out)
    assert r.exit_code == 0, r.stderr
    state_file = out / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    group = state["optimizer"]["param_groups"][0]
    group["params"] = group["params"] + [10_000 + i for i in range(3)]   # three text tensors more
    state_file.write_text(json.dumps(state))
    r = invoke("run", "--resume", out, "--epochs", "2")
    assert r.exit_code == 2, r.stderr
    err = " ".join(r.stderr.split())
    assert "optimizer trained other tensors than this run would" in err
    assert f"{group['name']} {len(group['params'])}" in err and "Traceback" not in r.stderr
