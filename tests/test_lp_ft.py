"""LP-FT (``lp-ft:probe_epochs=K,then=...``, Kumar et al. 2022): a linear probe
(only the head trains, both towers frozen and cached), then fine-tuning with the
strategy ``then`` from that head, as two stages of one run. Stage 1 trains only
the head, stage 2 what ``then`` says; a resume in the middle of stage 2 (or at
the boundary) ends bit-identical to the run left alone; the run's directory
rebuilds and exports; and it improves on a task the base never saw."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from peft_base import NOVEL_DATA, base_checkpoint, wanted

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = "shapes:n=64,val_n=16"      # 4 steps per epoch at batch 16
CLASSES, DIM = 9, 64


def plan(invoke, *args):
    r = invoke("plan", "--model", "tiny-vit", "--data", DATA, *args, "--json")
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("then", ["last-n:n=2", "full"])
def test_stage_one_trains_only_the_head_and_stage_two_what_then_says(invoke, then):
    p = plan(invoke, "--strategy", f"lp-ft:probe_epochs=1,then={then}", "--head", "linear", "--epochs", "3")
    probe, tune = p["stages"]
    head = DIM * CLASSES + CLASSES                     # the linear head: weight and bias
    assert (probe["name"], probe["first_epoch"], probe["last_epoch"]) == ("probe", 1, 1)
    assert probe["params"]["trainable"] == head and probe["lr"] == 1e-3
    assert {g["name"] for g in probe["groups"]} == {"head", "head/no_decay"}
    alone = plan(invoke, "--strategy", then)           # what `then` trains on its own
    assert (tune["name"], tune["first_epoch"], tune["last_epoch"]) == ("fine-tune", 2, 3)
    # under cross-entropy through a linear head nothing uses the text side `then`
    # selects: it is left frozen, and said so (issue 22)
    text = alone["params"]["by_part"]["text"]["trainable"]
    assert text > 0 and tune["params"]["unused_trainable"]["params"] == text
    assert tune["params"]["trainable"] == alone["params"]["trainable"] - text + head
    assert tune["strategies"] == [then.split(":")[0]] and tune["lr"] == alone["lr"]
    assert p["params"]["trainable"] == head            # the plan's top level is the first stage


def test_the_run_trains_the_head_on_cached_towers_then_fine_tunes(tmp_path):
    from clipft import testing
    from clipft.api import RunConfig, run
    conf = RunConfig(model="tiny-vit", data=DATA, batch_size=16, epochs=3, head="linear",
                     strategies=["lp-ft:probe_epochs=1,then=last-n:n=1"], callbacks=["none"],
                     keep_checkpoints=3)
    out = tmp_path / "run"
    s = run(conf, out=out)
    probe, tune = s["stages"]
    assert s["staged_by"] == "lp-ft" and s["train"]["steps"] == 12
    assert (probe["steps"], tune["steps"]) == (4, 8)
    assert probe["cache"]["image"].startswith("output") and probe["cache"]["text"].startswith("on")
    assert probe["cache"]["image_misses"] == 64 + 16    # each image through the tower once
    assert not probe["cache"]["text"].startswith("off")
    assert tune["params"]["trainable"] == s["params"]["trainable"]
    # the checkpoint that ended the probe holds only the head
    after_probe = out / "checkpoint-step00000004"
    assert load_file(str(after_probe / "model.safetensors")) == {}
    probed = load_file(str(after_probe / "head.safetensors"))
    final_model, final_head = testing.checkpoint_tensors(out)
    assert final_model and all(k.startswith(("visual.transformer.resblocks.3.", "visual.ln_post",
                                             "visual.proj", "transformer.resblocks.3.", "ln_final",
                                             "text_projection")) for k in final_model)
    assert not torch.equal(probed["weight"], final_head["weight"])   # the head kept training
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["loop"]["stage"] == 1
    # the directory rebuilds (both stages applied) and exports as plain open_clip
    reg = testing.plugin_registry()
    testing.assert_checkpoint_roundtrip(out, reg)
    manifest = testing.assert_export_roundtrip(out, tmp_path / "export", reg)
    assert manifest["plain_open_clip_drops"] == []


@pytest.mark.numerics
@pytest.mark.parametrize("crash_at", [6, 4])
def test_resume_in_stage_two_and_at_the_boundary_is_bit_exact(tmp_path, monkeypatch, crash_at):
    """A checkpoint after every step; the run dies after writing step 6 (stage 2,
    mid-epoch) or step 4 (the end of the probe), is resumed, and ends with the
    uninterrupted run's tensors, head, metrics and losses."""
    from clipft.api import RunConfig, run
    from clipft.engine.checkpoint import Checkpointer

    conf = RunConfig(model="tiny-vit", data=DATA, batch_size=16, epochs=3, head="linear", lr=1e-3,
                     strategies=["lp-ft:probe_epochs=1,then=last-n:n=1"], callbacks=["none"],
                     checkpoint_every="1")
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    whole = run(conf, out=straight)

    class Crash(Exception):
        pass

    real_save = Checkpointer.save

    def save_then_crash(self, loop, *a, **k):
        folder = real_save(self, loop, *a, **k)
        if loop["step"] == crash_at:
            raise Crash
        return folder

    monkeypatch.setattr(Checkpointer, "save", save_then_crash)
    with pytest.raises(Crash):
        run(conf, out=crashed)
    monkeypatch.setattr(Checkpointer, "save", real_save)
    state = json.loads((crashed / "checkpoint" / "state.json").read_text())
    assert (state["loop"]["stage"], state["global_step"]) == ((1, 6) if crash_at == 6 else (0, 4))
    resumed = run(resume=crashed)
    # exact: mid-stage, the checkpoint restores weights, optimizer, schedule and RNG;
    # at the boundary only the weights, and the next stage starts from a fresh
    # build exactly as the uninterrupted run's did
    for name in ("model", "head"):
        a = load_file(str(straight / "checkpoint" / f"{name}.safetensors"))
        b = load_file(str(crashed / "checkpoint" / f"{name}.safetensors"))
        assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    def history(s):   # without wall times
        return [(h["epoch"], h.get("train_loss"), h["eval"]) for h in s["eval"]["history"]]
    assert history(resumed) == history(whole)
    assert resumed["train"]["final_loss"] == whole["train"]["final_loss"]
    assert [s["name"] for s in resumed["stages"]] == ["probe", "fine-tune"]
    assert resumed["stages"][0]["params"] == whole["stages"][0]["params"]


def test_usage_errors(invoke):
    cases = [
        (["--strategy", "lp-ft", "--epochs", "2"], "stage 'probe': nothing would train"),  # no head
        (["--strategy", "lp-ft:probe_epochs=2", "--head", "linear", "--epochs", "2"],
         "pass --epochs N with N > 2"),
        (["--strategy", "lp-ft", "--strategy", "bitfit", "--head", "linear", "--epochs", "2"],
         "'lp-ft' defines the stages of the run and is given alone"),
        (["--strategy", "lp-ft:then=nope", "--head", "linear", "--epochs", "2"], "nope"),
        (["--strategy", "lp-ft:then=lp-ft", "--head", "linear", "--epochs", "2"], "then must name"),
        (["--strategy", "lp-ft:probe_epochs=0", "--head", "linear", "--epochs", "2"],
         "probe_epochs must be at least 1"),
    ]
    for args, message in cases:
        r = invoke("plan", "--model", "tiny-vit", "--data", DATA, *args)
        assert r.exit_code == 2 and message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr


@pytest.mark.numerics
def test_lp_ft_improves_on_a_new_task(invoke, tmp_path_factory, tmp_path):
    """A zero-shot head (so head top-1 starts at zero-shot top-1), one probe epoch
    at 1e-2, then one epoch of last-n:n=2 at 1e-3. Over 12 bases (peft_base.wanted)
    the head's top-1 reached 0.53-0.76: at least +0.24 over zero-shot on eleven,
    +0.04 (0.65 -> 0.69) on the one whose zero-shot was already high. Asked: a
    third of the smallest gain, or 0.55 (chance is 1/6)."""
    base = base_checkpoint(tmp_path_factory)
    out = tmp_path / "lpft"
    r = invoke("run", "--model", "tiny-vit", "--pretrained", base["weights"], "--data", NOVEL_DATA,
               "--strategy", "lp-ft:probe_epochs=1,then=last-n:n=2,probe_lr=1e-2", "--lr", "1e-3",
               "--head", "zero-shot", "--epochs", "2", "--batch-size", "32", "--callback", "none",
               "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    before, after = s["eval"]["before"], s["eval"]["after"]
    assert before["head_top1"] == before["top1"]          # the zero-shot head starts as zero-shot
    print(f"lp-ft head top-1 on unseen colours: {before['head_top1']:.3f} -> {after['head_top1']:.3f}")
    assert after["head_top1"] >= wanted(before["head_top1"], 0.08, 0.55), (before, after)
    assert after["head_top1"] >= 0.5, after
