"""``ema`` (a strategy modifier): an exponential moving average of the trained
weights. It equals a hand-computed average over 3 steps, its state is in every
checkpoint so resume is bit-exact, and with ``use_for_eval`` the run's
after-metrics, ``load_run`` and ``clipft export`` use the averages."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from numerics import assert_close_rel
from peft_base import NOVEL_DATA, base_checkpoint
from resume_check import crash_after_first_checkpoint_then_resume

pytestmark = pytest.mark.usefixtures("one_thread")

SELECT = "last-n:n=1,tower=vision"


def shadow(tensors: dict) -> dict:
    """``{param name: average}`` from a checkpoint's model tensors."""
    from clipft_ema import ATTR
    p = f"{ATTR}."
    return {k[len(p):].replace(":", "."): v for k, v in tensors.items() if k.startswith(p)}


@pytest.mark.numerics
@pytest.mark.parametrize("start_step", [0, 1])
def test_ema_equals_a_hand_computed_average_over_3_steps(tmp_path, start_step):
    """3 optimizer steps, a checkpoint after each (the live weights theta_t and the
    averages), against e_0 = theta_0, e_t = theta_t for t <= start_step, else
    e_t = d e_{t-1} + (1 - d) theta_t, computed in float64."""
    from clipft import testing
    from clipft.api import RunConfig, run
    d = 0.5
    conf = RunConfig(model="tiny-vit", data="shapes:n=48,val_n=16", batch_size=16, lr=1e-2,
                     strategies=[SELECT, f"ema:decay={d},start_step={start_step}"], callbacks=["none"],
                     checkpoint_every="1", keep_checkpoints=3)
    out = tmp_path / "run"
    s = run(conf, out=out)
    assert s["train"]["steps"] == 3
    folders = [out / "checkpoint-step00000001", out / "checkpoint-step00000002", out / "checkpoint"]
    steps = [load_file(str(f / "model.safetensors")) for f in folders]
    base = testing.initial_state(out)
    names = sorted(shadow(steps[-1]))
    trained = json.loads((out / "checkpoint" / "state.json").read_text())["trainable"]
    assert names == sorted(trained) and len(names) > 10      # exactly the trained parameters
    expect = {n: base[n].double() for n in names}
    for t, tensors in enumerate(steps, start=1):
        for n in names:
            theta = tensors[n].double()
            expect[n] = theta if t <= start_step else d * expect[n] + (1 - d) * theta
        got = shadow(tensors)
        for n in names:
            # one rounding per step (lerp: a + w (b - a) in float32), accumulated over t steps
            scale = max(float(base[n].abs().max()), float(tensors[n].abs().max()))
            assert_close_rel(got[n], expect[n], depth=t, scale=scale, what=f"ema step {t} {n}")
    last = steps[-1]
    moved = [n for n in names if not torch.equal(shadow(last)[n], last[n])]
    assert len(moved) > len(names) // 2          # the average is not the live weights


@pytest.mark.numerics
def test_resume_is_bit_exact(tmp_path, monkeypatch):
    from clipft.api import RunConfig
    conf = RunConfig(model="tiny-vit", data="shapes:n=32,val_n=16", batch_size=16, lr=1e-2, epochs=2,
                     strategies=[SELECT, "ema:decay=0.9"], callbacks=["none"])
    r = crash_after_first_checkpoint_then_resume(conf, tmp_path, monkeypatch)
    first, resumed, whole, straight, crashed = r.first, r.resumed, r.whole, r.straight, r.crashed
    a = load_file(str(straight / "checkpoint" / "model.safetensors"))
    b = load_file(str(crashed / "checkpoint" / "model.safetensors"))
    # exact: the averages come back from the checkpoint with the weights, and
    # the resumed epoch recomputes what the uninterrupted one did
    assert shadow(a) and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(first[k], b[k]) for k in shadow(b))
    assert resumed["eval"]["after"] == whole["eval"]["after"]


@pytest.mark.numerics
def test_use_for_eval_evaluates_and_exports_the_averages(tmp_path_factory, tmp_path):
    """Bias-only tuning of the shared base on unseen colours, with ema at 0.99 over
    16 steps (the averages stay close to the base) and use_for_eval on or off.
    Training is the same either way; the after-metrics are those of the averages
    in one run and of the live weights in the other. Over 3 bases (AVX-512, AVX2,
    scalar kernels) the two after-top-1s were 0.11-0.40 apart; 0.04 is asked."""
    from clipft import testing
    from clipft.api import RunConfig, run
    from clipft.commands.export import WEIGHTS, export_run
    base = base_checkpoint(tmp_path_factory)
    reg = testing.plugin_registry()

    def go(use):
        conf = RunConfig(model="tiny-vit", pretrained=str(base["weights"]), data=NOVEL_DATA, batch_size=32,
                         lr=1e-2, strategies=["bitfit", f"ema:decay=0.99,use_for_eval={str(use).lower()}"],
                         callbacks=["none"])
        return run(conf, registry=reg, out=tmp_path / f"use-{use}")

    on, off = go(True), go(False)
    t_on = load_file(str(tmp_path / "use-True" / "checkpoint" / "model.safetensors"))
    t_off = load_file(str(tmp_path / "use-False" / "checkpoint" / "model.safetensors"))
    # exact: evaluating on the averages swaps the live weights back bit for bit,
    # so both runs trained the same weights and kept the same averages
    assert t_on.keys() == t_off.keys() and all(torch.equal(t_on[k], t_off[k]) for k in t_on)
    assert on["eval"]["before"] == off["eval"]["before"]
    averages = shadow(t_on)
    loaded = testing.load_trained(tmp_path / "use-True", reg)
    params = dict(loaded.model.named_parameters())
    # the rebuilt run holds the averages (exact copies), not the live weights
    assert all(torch.equal(params[n], v) for n, v in averages.items())
    assert any(not torch.equal(params[n], t_on[n]) for n in averages)
    live = testing.load_trained(tmp_path / "use-False", reg)
    assert all(torch.equal(dict(live.model.named_parameters())[n], t_on[n]) for n in averages)
    # the after-metrics are the averages' (recomputed here, within one image)
    got_on, n = testing._val_metrics(loaded)
    got_off, _ = testing._val_metrics(live)
    print(f"ema after top-1: averages {on['eval']['after']['top1']:.3f} (recomputed {got_on['top1']:.3f}), "
          f"live {off['eval']['after']['top1']:.3f} (recomputed {got_off['top1']:.3f})")
    assert abs(got_on["top1"] - on["eval"]["after"]["top1"]) <= 1 / n + 1e-9
    assert abs(got_off["top1"] - off["eval"]["after"]["top1"]) <= 1 / n + 1e-9
    assert abs(on["eval"]["after"]["top1"] - off["eval"]["after"]["top1"]) >= 0.04
    # export: a plain open_clip model with the averaged weights
    manifest = export_run(tmp_path / "use-True", tmp_path / "export", reg)
    assert manifest["plain_open_clip_drops"] == []
    exported = load_file(str(tmp_path / "export" / WEIGHTS))
    assert not any(k.startswith("clipft_ema") for k in exported)
    assert all(torch.equal(exported[n], v) for n, v in averages.items())


def test_options_and_composition_errors(invoke):
    data = "shapes:n=16,val_n=8"
    for strategies, message in [
        (("ema",), "'ema' only rescales or tracks what other strategies select"),
        (("last-n:n=1", "ema:decay=1"), "decay must be in [0, 1)"),
        (("last-n:n=1", "ema:start_step=-1"), "start_step must be >= 0"),
    ]:
        args = [a for s in strategies for a in ("--strategy", s)]
        r = invoke("plan", "--model", "tiny-vit", "--data", data, *args)
        assert r.exit_code == 2 and message in r.stderr, (strategies, r.stderr)
    r = invoke("plan", "--model", "tiny-vit", "--data", data, "--strategy", "ema:decay=0.9",
               "--strategy", "last-n:n=1", "--json")            # a modifier may come first
    assert r.exit_code == 0, r.stderr
    plan = json.loads(r.stdout)
    assert {g["name"].split("/")[0] for g in plan["groups"]} <= {"vision.last1", "text.last1", "vision.proj",
                                                                  "text.proj"}
