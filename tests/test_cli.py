"""CliRunner tests of the core commands: plugins, describe, run, exit codes."""
import json

import pytest
from safetensors.torch import load_file

from conftest import read_summary

RUN = ["run", "--model", "tiny-vit", "--data", "shapes:n=64,val_n=32", "--batch-size", "16",
       "--epochs", "1"]


def test_version_and_help(invoke):
    r = invoke("--version")
    assert r.exit_code == 0 and "0.1.0" in r.stdout
    r = invoke("--help")
    assert r.exit_code == 0
    for cmd in ("run", "plugins", "describe", "plan"):
        assert cmd in r.stdout


def test_plugins_json_lists_builtin_distributions(invoke):
    r = invoke("plugins", "--json")
    assert r.exit_code == 0
    doc = json.loads(r.stdout)  # exactly one JSON document on stdout
    by_dist = {p["distribution"]: p for p in doc["plugins"]}
    assert by_dist["clipft-full"]["provides"]["strategy"] == ["full"]
    assert set(by_dist["clipft-losses"]["provides"]["loss"]) >= {"contrastive", "cross-entropy"}
    assert set(by_dist["clipft-heads"]["provides"]["head"]) >= {"linear", "zero-shot"}
    assert set(by_dist["clipft-data"]["provides"]["data"]) == {"imagefolder", "captions", "shapes"}
    for dist in ("clipft-full", "clipft-losses", "clipft-heads", "clipft-data"):
        assert by_dist[dist]["status"] == "active"
    assert by_dist["clipft-full"]["version"] == "0.1.0"


def test_plugins_table_goes_to_stdout(invoke):
    r = invoke("plugins")
    assert r.exit_code == 0
    assert r.stderr == ""
    assert "clipft-full" in r.stdout and "active" in r.stdout


def test_describe_shows_options_type_default_help(invoke):
    r = invoke("describe", "data", "shapes", "--json")
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    opts = {o["name"]: o for o in doc["options"]}
    assert opts["n"]["type"] == "int" and opts["n"]["default"] == 512
    assert opts["seed"]["help"]
    assert doc["distribution"] == "clipft-data"
    r = invoke("describe", "loss", "contrastive")
    assert r.exit_code == 0 and "duplicates" in r.stdout


def test_nothing_to_train_is_usage_error(invoke, tmp_path):
    r = invoke(*RUN, "--strategy", "none", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "nothing would train" in r.stderr


def test_run_json_summary_and_run_directory(invoke, tmp_path):
    out = tmp_path / "run"
    r = invoke(*RUN, "--strategy", "full", "--lr", "1e-3", "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)  # stdout holds exactly the summary
    assert summary == read_summary(out)
    assert summary["params"]["total"] == summary["params"]["trainable"] > 0
    assert summary["train"]["samples_per_s"] > 0 and summary["train"]["seconds"] > 0
    assert summary["train"]["peak_rss_mb"] > 0
    for split in ("before", "after"):
        assert {"top1", "recall@1", "recall@5"} <= set(summary["eval"][split])
    assert "head_top1" not in summary["eval"]["after"]
    # with --json, progress and the metrics table went to stderr
    assert "epoch 1/1" in r.stderr and "before" in r.stderr
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["type"] == "eval" and lines[0]["epoch"] == 0
    assert any(x["type"] == "step" for x in lines)
    assert (out / "checkpoint" / "state.json").is_file()
    tensors = load_file(str(out / "checkpoint" / "model.safetensors"))
    assert "visual.proj" in tensors and "logit_scale" in tensors


def test_config_toml_repeats_the_run(invoke, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    r = invoke(*RUN, "--strategy", "full", "--lr", "1e-3", "--out", a, "--json")
    assert r.exit_code == 0, r.stderr
    r2 = invoke("run", "--config", a / "config.toml", "--out", b, "--json")
    assert r2.exit_code == 0, r2.stderr
    sa, sb = json.loads(r.stdout), json.loads(r2.stdout)
    assert sa["eval"]["after"] == sb["eval"]["after"]
    ta = load_file(str(a / "checkpoint" / "model.safetensors"))
    tb = load_file(str(b / "checkpoint" / "model.safetensors"))
    assert all((ta[k] == tb[k]).all() for k in ta)


def test_out_dir_with_a_run_is_refused_unless_overwrite(invoke, tmp_path):
    out = tmp_path / "run"
    assert invoke(*RUN, "--strategy", "full", "--out", out).exit_code == 0
    before = (out / "summary.json").read_text()
    r = invoke(*RUN, "--strategy", "full", "--seed", "3", "--out", out)
    assert r.exit_code == 2 and "already holds a run" in r.stderr
    assert (out / "summary.json").read_text() == before
    r = invoke(*RUN, "--strategy", "full", "--seed", "3", "--out", out, "--overwrite")
    assert r.exit_code == 0
    assert (out / "summary.json").read_text() != before
    assert sum(1 for x in (out / "metrics.jsonl").read_text().splitlines()
               if '"epoch": 0' in x) == 1  # the old metrics were replaced, not appended


def test_toml_config_with_cli_override_and_bad_key(invoke, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('model = "tiny-vit"\nepochs = 3\nbatch_size = 16\n'
                   '[data]\nname = "shapes"\nn = 32\nval_n = 16\n'
                   '[[strategy]]\nname = "full"\n')
    r = invoke("run", "--config", cfg, "--epochs", "1", "--out", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["train"]["epochs"] == 1
    bad = tmp_path / "bad.toml"
    bad.write_text('modle = "tiny-vit"\n')
    r = invoke("run", "--config", bad, "--out", tmp_path / "o2")
    assert r.exit_code == 2 and "unknown key 'modle'" in r.stderr and "Valid keys" in r.stderr
    bad.write_text('epochs = "three"\n')
    r = invoke("run", "--config", bad, "--out", tmp_path / "o2")
    assert r.exit_code == 2 and "'epochs' has the wrong type" in r.stderr
    bad.write_text('[data]\nname = "shapes"\nn = "lots"\n')
    r = invoke("run", "--config", bad, "--out", tmp_path / "o2")
    assert r.exit_code == 2 and "option 'n'" in r.stderr


def test_offline_pretrained_tag_fails_clearly(invoke, tmp_path):
    r = invoke("run", "--model", "RN50", "--pretrained", "openai", "--data", "shapes:n=8,val_n=8",
               "--out", tmp_path / "o", env={"HF_HUB_OFFLINE": "1"})
    assert r.exit_code == 1
    assert "--pretrained /path/to" in r.stderr and "local" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("pretrained,needle", [
    ("./missing.safetensors", "checkpoint file not found"),
    ("notatag", "unknown pretrained tag"),
])
def test_bad_pretrained_values(invoke, tmp_path, pretrained, needle):
    r = invoke("run", "--model", "tiny-vit", "--pretrained", pretrained, "--out", tmp_path / "o")
    assert r.exit_code == 2 and needle in r.stderr


def test_local_checkpoint_file_as_pretrained(invoke, tmp_path):
    """--pretrained accepts a local state-dict file (the offline path for real weights)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from clipft.models import register_tiny_configs
    register_tiny_configs()
    torch.manual_seed(123)
    model = open_clip.create_model("tiny-vit")
    ck = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ck))
    out = tmp_path / "o"
    r = invoke(*RUN, "--pretrained", ck, "--strategy", "full", "--epochs", "1", "--lr", "0", "--out", out)
    assert r.exit_code == 0, r.stderr
    tensors = load_file(str(out / "checkpoint" / "model.safetensors"))
    assert torch.equal(tensors["visual.proj"], model.state_dict()["visual.proj"])


def test_disable_plugin_flag_and_env(invoke, tmp_path):
    r = invoke("--disable-plugin", "full", "plugins", "--json")
    st = {p["distribution"]: p["status"] for p in json.loads(r.stdout)["plugins"]}
    assert st["clipft-full"] == "disabled" and st["clipft-losses"] == "active"
    r = invoke("plugins", "--json", env={"CLIPFT_DISABLE_PLUGINS": "clipft-full,heads"})
    st = {p["distribution"]: p["status"] for p in json.loads(r.stdout)["plugins"]}
    assert st["clipft-full"] == st["clipft-heads"] == "disabled"
    r = invoke("--disable-plugin", "clipft-full", *RUN, "--strategy", "full", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "unknown strategy 'full'" in r.stderr


def test_default_loss_follows_the_head(invoke, tmp_path):
    r = invoke(*RUN, "--head", "linear", "--out", tmp_path / "a", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["loss"]["name"] == "cross-entropy"
    r = invoke(*RUN, "--strategy", "full", "--out", tmp_path / "b", "--json")
    assert json.loads(r.stdout)["loss"]["name"] == "contrastive"


def test_a_head_the_loss_ignores_is_reported(invoke, tmp_path):
    r = invoke(*RUN, "--head", "linear", "--loss", "contrastive", "--out", tmp_path / "a")
    assert r.exit_code == 2 and "would never train" in r.stderr
    r = invoke(*RUN, "--head", "linear", "--loss", "contrastive", "--strategy", "full",
               "--out", tmp_path / "b", "--json")
    assert r.exit_code == 0
    assert "warning:" in r.stderr and "would never train" in r.stderr
    s = json.loads(r.stdout)
    assert "head" not in {g["name"] for g in s["params"]["groups"]}
    assert "head_top1" in s["eval"]["after"]


def test_a_closed_or_departed_stdout(tmp_path):
    """`--json >&-` writes nothing and says so (exit 2); `predict --json | head -1`
    stops quietly when the reader leaves (no traceback, no error)."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image
    r = subprocess.run(f"{sys.executable} -m clipft plugins --json >&-", shell=True, capture_output=True, text=True)
    assert r.returncode == 2 and "standard output is closed" in r.stderr
    for i in range(40):
        Image.fromarray(np.full((16, 16, 3), i * 5, np.uint8)).save(tmp_path / f"{i:02d}.png")
    r = subprocess.run(f"{sys.executable} -m clipft predict --model tiny-vit --labels a,b --batch-size 4 --json "
                       f"{tmp_path} | head -1; exit ${{PIPESTATUS[0]}}", shell=True, executable="/bin/bash",
                       capture_output=True, text=True)
    assert r.stdout.count("\n") == 1 and '"top"' in r.stdout
    assert "Traceback" not in r.stderr and "error" not in r.stderr, r.stderr
    assert r.returncode in (0, 141), r.stderr
