"""Multi-stage runs as configuration: ``[[stages]]`` tables in a config file, each
with its own strategies, lr, optimizer and cache plan. What an earlier stage
trained carries over and stays in every later checkpoint (and in the rebuilt
run) even when the later stage keeps it frozen; the resolved config repeats the
run; ``--resume --epochs N`` extends the last stage; contradictions are usage
errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = '''model = "tiny-vit"
epochs = 3
batch_size = 16
seed = 0

[data]
name = "shapes"
n = 32
val_n = 16

[[stages]]
name = "biases"
epochs = 1
strategies = ["bitfit"]
lr = 0.01

[[stages]]
name = "top"
strategies = ["last-n:n=1,tower=vision"]
lr = 0.001

[[callback]]
name = "none"
'''


def write(tmp_path, text=CONFIG, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_stages_from_a_config_file_carry_their_weights_over(invoke, tmp_path):
    out = tmp_path / "run"
    r = invoke("run", "--config", write(tmp_path), "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    first, second = s["stages"]
    assert s["staged_by"] is None and s["strategies"] == []
    assert (first["name"], first["epochs"], first["lr"]) == ("biases", 1, 0.01)
    assert (second["name"], second["epochs"], second["lr"]) == ("top", 2, 0.001)
    assert {g["name"] for g in first["params"]["groups"]} == {"bias/no_decay"}
    assert all(g["name"].startswith("vision.") for g in second["params"]["groups"])
    assert s["train"]["steps"] == 3 * 2
    from clipft import testing
    base = testing.initial_state(out)
    saved = load_file(str(out / "checkpoint" / "model.safetensors"))
    # block 0's biases trained in stage 1 only: still saved (the stage-2 checkpoint keeps them)
    early = "visual.transformer.resblocks.0.attn.in_proj_bias"
    text_bias = "transformer.resblocks.0.mlp.c_fc.bias"
    for k in (early, text_bias):
        assert k in saved and not torch.equal(saved[k], base[k]), k
    assert "visual.transformer.resblocks.3.attn.in_proj_weight" in saved          # stage 2's
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" not in saved      # never trained
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert early not in state["trainable"]                                         # frozen in stage 2
    loaded = testing.load_trained(out, testing.plugin_registry())
    sd = loaded.model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in saved.items())
    # the run directory's config repeats the run, stages and all
    again = tmp_path / "again"
    r = invoke("run", "--config", out / "config.toml", "--out", again, "--json")
    assert r.exit_code == 0, r.stderr
    s2 = json.loads(r.stdout)
    assert [st["params"] for st in s2["stages"]] == [st["params"] for st in s["stages"]]
    b = load_file(str(again / "checkpoint" / "model.safetensors"))
    # exact: the same config on the same machine runs the same kernels
    assert b.keys() == saved.keys() and all(torch.equal(b[k], saved[k]) for k in b)


def test_resume_extends_the_last_stage(invoke, tmp_path):
    out = tmp_path / "run"
    assert invoke("run", "--config", write(tmp_path), "--out", out).exit_code == 0
    r = invoke("run", "--resume", out, "--epochs", "4", "--json")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    assert [st["epochs"] for st in s["stages"]] == [1, 3] and s["train"]["steps"] == 4 * 2
    assert len(s["eval"]["history"]) == 5


@pytest.mark.parametrize("change,message", [
    (("epochs = 3", "epochs = 1"), "nothing is left; pass --epochs N with N > 1"),
    (('strategies = ["last-n:n=1,tower=vision"]', 'epochs = 1\nstrategies = ["last-n:n=1"]'),
     "the stages add up to 2 epochs but --epochs is 3"),
    (('name = "top"', 'name = "biases"'), "stage 'biases' is named twice"),
    (("lr = 0.001", "lr = 0.001\nrate = 2"), "stage 'top': unknown key 'rate'"),
    (('name = "biases"\nepochs = 1', 'name = "biases"'), "only the last stage may leave them out"),
    (('seed = 0', 'seed = 0\n[[strategy]]\nname = "full"'), "leave the top-level strategies out"),
    (('strategies = ["bitfit"]', 'strategies = ["lp-ft"]'), "stages do not nest"),
    (('strategies = ["bitfit"]', 'strategies = []'), "stage 'biases': nothing would train"),
])
def test_contradictions_are_usage_errors(invoke, tmp_path, change, message):
    path = write(tmp_path, CONFIG.replace(*change, 1))
    r = invoke("plan", "--config", path)
    assert r.exit_code == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
