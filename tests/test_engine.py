"""Engine behaviour: linear probe, determinism, resume, accumulation, clamping."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from clipft.api import RunConfig, plan, run
from clipft.engine.optim import lr_factor
from numerics import assert_close_rel

DATA = "shapes:n=48,val_n=16"

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(**kw):
    base = dict(model="tiny-vit", data=DATA, epochs=1, batch_size=16)
    base.update(kw)
    return RunConfig(**base)


def test_linear_probe_trains_only_the_head(tmp_path):
    """No strategy: the seed's 'Freeze + classifier'. The model stays bit-identical."""
    s = run(cfg(head="linear", loss="cross-entropy", epochs=2), out=tmp_path / "probe")
    assert [g["name"] for g in s["params"]["groups"]] == ["head", "head/no_decay"]
    saved = load_file(str(tmp_path / "probe" / "checkpoint" / "model.safetensors"))
    assert saved == {}  # nothing in the model changed
    head = load_file(str(tmp_path / "probe" / "checkpoint" / "head.safetensors"))
    assert set(head) == {"weight", "bias"}
    assert s["params"]["trainable"] == 64 * 9 + 9
    assert "head_top1" in s["eval"]["after"]
    assert s["train"]["lr"] == 1e-3  # the head-only default


@pytest.mark.numerics
def test_runs_are_deterministic_on_cpu(tmp_path):
    a = run(cfg(strategies=["full"], lr=1e-3), out=tmp_path / "a")
    b = run(cfg(strategies=["full"], lr=1e-3), out=tmp_path / "b")
    # exact: the same run twice is the same kernels on the same inputs
    assert a["eval"]["after"] == b["eval"]["after"]
    ta = load_file(str(tmp_path / "a" / "checkpoint" / "model.safetensors"))
    tb = load_file(str(tmp_path / "b" / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.numerics
def test_resume_after_a_crash_continues_exactly(tmp_path, monkeypatch):
    """A 2-epoch run that dies after its first checkpoint, resumed, ends bit-identical
    to the same run left uninterrupted (model, head and metrics)."""
    from resume_check import crash_after_first_checkpoint_then_resume

    def crashed_mid_run(crashed):
        assert json.loads((crashed / "checkpoint" / "state.json").read_text())["epoch"] == 1
        assert not (crashed / "summary.json").exists()

    conf = cfg(strategies=["full"], lr=1e-3, epochs=2, head="zero-shot")
    r = crash_after_first_checkpoint_then_resume(conf, tmp_path, monkeypatch, after_crash=crashed_mid_run)
    whole, resumed = r.whole, r.resumed
    # exact: the second epoch replays from the checkpoint (weights, optimizer and
    # RNG state) what the uninterrupted run computed
    for name in ("model", "head"):
        a = load_file(str(r.straight / "checkpoint" / f"{name}.safetensors"))
        b = load_file(str(r.crashed / "checkpoint" / f"{name}.safetensors"))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["eval"]["after"] == whole["eval"]["after"]
    assert resumed["eval"]["before"] == whole["eval"]["before"]


def test_resume_cli_extends_epochs_and_rejects_other_changes(invoke, tmp_path):
    out = tmp_path / "r"
    args = ["run", "--model", "tiny-vit", "--data", DATA, "--strategy", "full", "--batch-size", "16"]
    assert invoke(*args, "--out", out).exit_code == 0
    r = invoke("run", "--resume", out)
    assert r.exit_code == 2 and "--epochs N with N > 1" in r.stderr
    r = invoke("run", "--resume", out, "--lr", "0.5")
    assert r.exit_code == 2 and "only --epochs" in r.stderr
    r = invoke("run", "--resume", out, "--epochs", "2", "--json")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    assert len(s["eval"]["history"]) == 3 and s["train"]["epochs"] == 2
    r = invoke("run", "--resume", tmp_path / "nothing")
    assert r.exit_code == 2 and "no config.toml" in r.stderr


def test_resume_through_the_api_follows_the_cli_policy(tmp_path):
    """run(config, resume=...) refuses what --resume refuses, naming the flag;
    the run's own config, spelt otherwise ("shapes:n=48,..." against the saved
    table), and the resumable options go through."""
    from clipft.errors import ClipftUsageError

    out = tmp_path / "r"
    conf = cfg(strategies=["full"])
    run(conf, out=out)
    refused = [(dict(lr=0.5), {}, "--lr"), (dict(strategies=["projections"]), {}, "--strategy"),
               (dict(batch_size=8), {}, "--batch-size"), ({}, dict(out=tmp_path / "elsewhere"), "--out"),
               ({}, dict(overwrite=True), "--overwrite")]
    for change, kw, flag in refused:
        with pytest.raises(ClipftUsageError, match=rf"only --epochs, .* can change when resuming .*; got {flag}$"):
            run(cfg(**{"strategies": ["full"], "epochs": 2, **change}), resume=out, **kw)
    with pytest.raises(ClipftUsageError, match="no config.toml"):
        run(conf, resume=tmp_path / "nothing")
    s = run(cfg(strategies=["full"], epochs=2, checkpoint_every="epoch"), resume=out)
    assert len(s["eval"]["history"]) == 3 and s["train"]["epochs"] == 2


@pytest.mark.numerics
def test_grad_accumulation_matches_a_large_batch(tmp_path):
    """Cross-entropy on a frozen model with a head: 2 micro-batches of 8 make the
    same update as one batch of 16.

    SGD, not AdamW: its update is linear in the gradient, so a mis-scaled
    accumulated gradient (a sum instead of a mean, say) changes the result, and a
    rounding difference in the gradient stays a rounding difference in the
    weights (AdamW divides by sqrt(v) and blows it up where a gradient is ~0)."""
    common = dict(head="linear", loss="cross-entropy", optimizer="sgd", lr=1.0, schedule="constant",
                  warmup_steps=0, data="shapes:n=32,val_n=8", grad_clip=0.0)
    run(cfg(batch_size=16, **common), out=tmp_path / "big")
    run(cfg(batch_size=8, grad_accum=2, **common), out=tmp_path / "acc")
    run(cfg(batch_size=16, **{**common, "lr": 0.0}), out=tmp_path / "init")
    a = load_file(str(tmp_path / "big" / "checkpoint" / "head.safetensors"))
    b = load_file(str(tmp_path / "acc" / "checkpoint" / "head.safetensors"))
    init = load_file(str(tmp_path / "init" / "checkpoint" / "head.safetensors"))
    for k in a:
        # the steps moved the head by O(0.1), so a mis-scaled update would show ...
        assert float((a[k] - init[k]).abs().max()) > 0.05, k
        # ... while the sampler order is the same for both and only the micro-
        # batching differs: the batch gradient is summed in another order (16
        # terms), in 2 steps, relative to the weights' size
        assert_close_rel(b[k], a[k], reduction=16, depth=2, what=f"grad accumulation head.{k}")


def test_logit_scale_is_clamped_at_ln100(tmp_path):
    s = run(cfg(strategies=["full"], lr=5.0, optimizer="sgd", grad_clip=0.0, schedule="constant",
                warmup_steps=0, data="shapes:n=16,val_n=8"), out=tmp_path / "c")
    t = load_file(str(tmp_path / "c" / "checkpoint" / "model.safetensors"))
    # exact: clamp_ rounds its bound ln(100) to float32 (6e-8 above the double), so
    # the clamped value is at most that float32 number, whatever the kernel
    assert t["logit_scale"].item() <= torch.tensor(math.log(100), dtype=torch.float32).item()


def test_no_weight_decay_on_biases_norms_and_logit_scale(tmp_path):
    p = plan(cfg(strategies=["full"]))
    groups = {g["name"]: g for g in p["groups"]}
    assert groups["full"]["weight_decay"] == 0.01
    assert groups["full/no_decay"]["weight_decay"] == 0.0
    from clipft.engine.compose import default_no_decay
    assert default_no_decay("logit_scale", torch.zeros(()))
    assert default_no_decay("visual.transformer.resblocks.0.ln_1.weight", torch.zeros(4))
    assert not default_no_decay("visual.proj", torch.zeros(4, 4))


def test_schedules():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(99, 100, 10, "cosine") < 0.01
    assert lr_factor(50, 100, 10, "constant") == 1.0


def test_sgd_and_constant_schedule_run(tmp_path):
    s = run(cfg(strategies=["full"], optimizer="sgd", schedule="constant", lr=1e-2), out=tmp_path / "s")
    assert s["train"]["steps"] == 3


def test_bad_config_values():
    from clipft.errors import ClipftUsageError
    with pytest.raises(ClipftUsageError, match="optimizer"):
        RunConfig(optimizer="adam9")
    with pytest.raises(ClipftUsageError, match="'epochs' must be >= 0"):
        RunConfig(epochs=-1)
    assert RunConfig(epochs=0).epochs == 0      # evaluate without training (tests/test_train_free.py)


def test_head_on_a_timm_tower_without_head_projection(tmp_path):
    """timm towers whose output comes from the trunk's classifier (no timm_proj)
    still get heads of the right width."""
    import json as _json

    import open_clip
    cfg_file = tmp_path / "tiny-timm-noproj.json"
    cfg_file.write_text(_json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"timm_model_name": "test_convnext", "timm_model_pretrained": False,
                       "timm_pool": "avg", "timm_proj": None, "image_size": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }))
    open_clip.add_model_config(cfg_file)
    s = run(RunConfig(model="tiny-timm-noproj", data="shapes:n=16,val_n=8", head="linear",
                      loss="cross-entropy", batch_size=8), out=tmp_path / "t")
    assert s["params"]["trainable"] == 32 * 9 + 9
    assert "head_top1" in s["eval"]["after"]
