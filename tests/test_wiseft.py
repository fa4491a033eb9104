"""WiSE-FT: ``clipft export --wise-ft α`` and ``clipft eval --wise-ft-sweep``.

The endpoints are exact: α=0 writes the zero-shot (base) weights bit for bit,
α=1 the fine-tuned ones (LoRA merged) bit for bit, and a zero-shot head its
zero-shot initialisation. Where interpolation has no meaning it is refused."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from numerics import TINY_DEPTH, TINY_REDUCTION, assert_close_rel
from peft_base import SMALL_NOVEL

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "shapes:n=16,val_n=8,seed=1,colours=purple,orange,shapes=circle,square,triangle"


def _export(invoke, run, out, *args):
    res = invoke("export", run, out, "--json", *args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _weights(d):
    return load_file(str(d / "open_clip_model.safetensors"))


def _assert_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_endpoints_are_exact(invoke, runs, tmp_path, strategy):
    run = runs[strategy]
    base = load_file(str(runs["base"]["weights"]))
    plain = _weights(tmp_path / "plain") if _export(invoke, run, tmp_path / "plain") else None
    m0 = _export(invoke, run, tmp_path / "a0", "--wise-ft", "0")
    m1 = _export(invoke, run, tmp_path / "a1", "--wise-ft", "1")
    assert m0["wise_ft"]["alpha"] == 0 and m1["wise_ft"]["alpha"] == 1
    _assert_equal(_weights(tmp_path / "a0"), base)
    _assert_equal(_weights(tmp_path / "a1"), plain)
    if strategy == "lora":
        assert m1["merged_adapter_layers"] > 0
    # in between: lerp of the endpoints; tensors training left alone stay as they were
    _export(invoke, run, tmp_path / "a5", "--wise-ft", "0.5")
    half = _weights(tmp_path / "a5")
    changed = 0
    for k, v in half.items():
        if torch.equal(base[k], plain[k]):
            assert torch.equal(v, base[k]), k
        else:
            changed += 1
            want = base[k] + 0.5 * (plain[k] - base[k])
            # one rounding of lerp against one of this expression
            assert (v - want).abs().max() <= 2 * torch.finfo(torch.float32).eps * want.abs().max(), k
    assert changed > 0


def test_zero_shot_head_interpolates_with_its_zero_shot_init(invoke, runs, tmp_path):
    from clipft.encode import class_text_features
    from clipft.commands.export import load_export
    run = runs["head"]
    plain = _export(invoke, run, tmp_path / "plain")
    assert plain["head"]["file"]
    _export(invoke, run, tmp_path / "a0", "--wise-ft", "0")
    _export(invoke, run, tmp_path / "a1", "--wise-ft", "1")
    h0, h1 = (load_file(str(tmp_path / d / "head.safetensors")) for d in ("a0", "a1"))
    _assert_equal(h1, load_file(str(tmp_path / "plain" / "head.safetensors")))
    base = load_export(runs["base"]["export"])
    with torch.no_grad():
        zs = class_text_features(base["model"], base["tokenizer"], plain["classnames"], plain["templates"], "cpu")
    # the same class-prompt embeddings of the same weights, batched alike: equal up to
    # the kernel paths of two processes
    assert_close_rel(h0["weight"], zs, reduction=TINY_REDUCTION, depth=TINY_DEPTH,
                     what="α=0 head vs zero-shot weights")
    assert not torch.equal(h1["weight"], h0["weight"])


@pytest.mark.parametrize("args, reason", [
    (["--strategy", "prompt", "--head", "text"], "learned prompt vectors"),
    (["--strategy", "reproject:dim=32"], "replaced projection dimension"),
    (["--strategy", "last-n:n=1", "--head", "linear", "--loss", "cross-entropy"], "--head zero-shot"),
])
def test_refused_where_interpolation_has_no_meaning(invoke, runs, tmp_path, args, reason):
    res = invoke("run", "--model", "tiny-vit", "--pretrained", runs["base"]["weights"], "--data", TINY,
                 "--callback", "none", "--out", tmp_path / "run", *args)
    assert res.exit_code == 0, res.output
    res = invoke("export", tmp_path / "run", tmp_path / "out", "--wise-ft", "0.5")
    assert res.exit_code == 2, res.output
    assert "WiSE-FT" in res.stderr and reason in res.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    res = invoke("eval", tmp_path / "run", "--data", TINY, "--wise-ft-sweep", "0,1")
    assert res.exit_code == 2 and reason in res.stderr


def test_wise_ft_sweep_endpoints_equal_eval_of_base_and_run(invoke, runs, tmp_path):
    control = "shapes:n=16,val_n=48,seed=2,colours=red,green,blue,yellow,shapes=circle,square,triangle"
    png = tmp_path / "wise_ft.png"
    res = invoke("eval", runs["full"], "--data", SMALL_NOVEL, "--control-data", control,
                 "--wise-ft-sweep", "0,0.5,1", "--wise-ft-plot", png, "--json")
    assert res.exit_code == 0, res.output
    curve = json.loads(res.stdout)["wise_ft"]
    assert [r["alpha"] for r in curve] == [0, 0.5, 1]

    def top1(*args):
        r = invoke("eval", *args, "--json")
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)["metrics"]["top1"]
    base = ("--model", "tiny-vit", "--pretrained", runs["base"]["weights"])
    assert curve[0]["data"]["top1"] == pytest.approx(top1(*base, "--data", SMALL_NOVEL), abs=1 / 32 + 1e-9)
    assert curve[0]["control"]["top1"] == pytest.approx(top1(*base, "--data", control), abs=1 / 48 + 1e-9)
    assert curve[-1]["data"]["top1"] == pytest.approx(top1(runs["full"], "--data", SMALL_NOVEL), abs=1e-9)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("alpha", ["-0.1", "1.5", "nan"])
def test_alpha_outside_zero_one_is_a_usage_error(invoke, runs, tmp_path, alpha):
    res = invoke("export", runs["full"], tmp_path / "out", "--wise-ft", alpha)
    assert res.exit_code == 2 and "[0, 1]" in res.stderr
    res = invoke("eval", runs["full"], "--data", SMALL_NOVEL, "--wise-ft-sweep", f"0,{alpha}")
    assert res.exit_code == 2 and "[0, 1]" in res.stderr
