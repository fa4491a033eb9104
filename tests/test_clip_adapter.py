"""CLIP-Adapter (plugin clipft-clip-adapter): the paper's residual bottleneck MLP
on the image (and text) embedding, only the adapters train, the frozen towers
stay cached (and agree with a live run), checkpoints resume bit for bit,
``clipft export`` writes each adapter to its own file and ``load_export`` puts
them back, and tuning improves zero-shot top-1 on a task the base never saw."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from numerics import assert_close_rel
from peft_base import NOVEL_DATA, base_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = "shapes:n=64,val_n=32"
TINY = "tiny-vit"
#: tiny-vit's shared embedding width (core/clipft/model_configs/tiny-vit.json)
EMBED_DIM = 64


def run_cli(invoke, out, *args, data=DATA, epochs=1):
    r = invoke("run", "--model", TINY, "--data", data, "--head", "text", "--epochs", epochs,
               "--batch-size", "16", "--callback", "none", "--out", out, "--json", *args)
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def test_the_adapter_is_the_papers_residual_bottleneck():
    """x' = a * ReLU(ReLU(x W1^T) W2^T) + (1 - a) x, W1: D -> D/4, no biases; only
    the adapter's own parameters are selected, and gradients reach both layers."""
    from clipft import testing
    from clipft.context import BuildContext
    from clipft_clip_adapter import ClipAdapter, ClipAdapterOptions

    model, tok, _ = testing.tiny_model()
    model.requires_grad_(False)
    ctx = BuildContext(model=model, model_name=TINY, tokenizer=tok, device=torch.device("cpu"),
                       classnames=["a", "b"])
    (sel,) = ClipAdapter(ClipAdapterOptions(ratio=0.3)).apply(model, ctx)
    adapter = model.clipft_image_adapter
    assert [n for n, _ in sel.params] == ["clipft_image_adapter.down.weight", "clipft_image_adapter.up.weight"]
    assert adapter.down.weight.shape == (EMBED_DIM // 4, EMBED_DIM) and adapter.down.bias is None
    assert adapter.up.weight.shape == (EMBED_DIM, EMBED_DIM // 4) and adapter.up.bias is None
    x = torch.randn(5, EMBED_DIM, generator=torch.Generator().manual_seed(0))
    w1, w2 = adapter.down.weight.detach(), adapter.up.weight.detach()
    mlp = (x @ w1.t()).clamp(min=0) @ w2.t()
    assert (mlp < 0).any()                      # so the final ReLU has work to do
    want = 0.3 * mlp.clamp(min=0) + 0.7 * x
    # the same two products, in the same order: exact
    assert torch.equal(adapter(x), want)
    for p in adapter.parameters():
        p.requires_grad_(True)
    adapter(x).sum().backward()
    assert adapter.down.weight.grad.abs().sum() > 0 and adapter.up.weight.grad.abs().sum() > 0


def test_only_the_adapters_train_and_the_image_tower_stays_cached(invoke, tmp_path):
    out = tmp_path / "both"
    s = run_cli(invoke, out, "--strategy", "clip-adapter:text=true", epochs=2)
    # 2 * D * D/r per adapter (down and up, no biases), counted from the config
    per_adapter = 2 * EMBED_DIM * (EMBED_DIM // 4)
    assert s["params"]["trainable"] == 2 * per_adapter
    assert [g["name"] for g in s["params"]["groups"]] == ["clip-adapter"]
    saved = load_file(str(out / "checkpoint" / "model.safetensors"))
    assert sorted(saved) == ["clipft_image_adapter.down.weight", "clipft_image_adapter.up.weight",
                             "clipft_text_adapter.down.weight", "clipft_text_adapter.up.weight"]
    assert sum(v.numel() for v in saved.values()) == 2 * per_adapter
    # the whole image tower is frozen: its output is cached and the adapter runs on it
    assert s["cache"]["image"].startswith("output (image tower frozen")
    assert "image-embedding adapter runs live on the cached value" in s["cache"]["image"]
    assert s["cache"]["image_hits"] > 0
    # the text adapter trains, so the class prompts are encoded live (their
    # frozen tower output is still served from the text cache)
    assert "clipft_text_adapter" in s["cache"]["class_prompts"]
    from clipft import testing
    trained = testing.load_trained(out).model
    testing.assert_only_selected_changed(testing.initial_state(out), trained,
                                         lambda n: n.startswith(("clipft_image_adapter.", "clipft_text_adapter.")))


@pytest.mark.numerics
def test_a_cached_run_equals_a_live_one(invoke, tmp_path):
    cached = run_cli(invoke, tmp_path / "cached", "--strategy", "clip-adapter", "--lr", "1e-2", epochs=2)
    live = run_cli(invoke, tmp_path / "live", "--strategy", "clip-adapter", "--lr", "1e-2", "--no-cache",
                   epochs=2)
    assert "cache" not in live and cached["cache"]["image_misses"] == 64 + 32
    a = load_file(str(tmp_path / "cached" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "live" / "checkpoint" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    # the cache replays the tower's own output, so both runs feed the adapter the
    # same values (in practice bit for bit); the tolerance allows for another
    # kernel path in the live tower's batch: rounding in its 4 blocks and the
    # projection, then 8 optimizer steps through the adapter's 2 layers
    for k in a:
        assert_close_rel(a[k], b[k], reduction=256, depth=5 + 2 * 8, what=f"clip-adapter cached vs live {k}")
    assert cached["eval"]["after"]["top1"] == pytest.approx(live["eval"]["after"]["top1"], abs=1 / 32)


def _final(run_dir):
    ck = run_dir / "checkpoint"
    tensors = load_file(str(ck / "model.safetensors"))
    tensors.update({k: v for k, v in load_file(str(ck / "optimizer.safetensors")).items()})
    state = json.loads((ck / "state.json").read_text())
    loop = {k: v for k, v in state["loop"].items() if k not in ("seconds", "epoch_seconds")}
    return tensors, state["optimizer"], state["scheduler"], loop


def stop_after_step(monkeypatch, step):
    """SIGTERM to this process right after optimizer step ``step``: clipft's own
    handler stops the run after that step and writes a checkpoint (exit 143)."""
    import os
    import signal

    from clipft.engine import session
    real = session.MetricsLog.on_step_end

    def on_step_end(self, s):
        real(self, s)
        if s.stepped and s.step == step:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(session.MetricsLog, "on_step_end", on_step_end)


def test_checkpoint_and_resume_are_bit_exact(invoke, tmp_path, monkeypatch):
    """Stopped part-way through the first epoch (step 3 of 4), resumed: the
    adapters, the optimizer state and the history end bit-identical to the run
    left alone."""
    args = ("--model", TINY, "--data", DATA, "--head", "text", "--epochs", "2", "--batch-size", "16",
            "--strategy", "clip-adapter:text=true", "--lr", "1e-2", "--callback", "none")
    assert invoke("run", *args, "--out", tmp_path / "straight").exit_code == 0
    with monkeypatch.context() as m:
        stop_after_step(m, 3)
        r = invoke("run", *args, "--out", tmp_path / "resumed")
    assert r.exit_code == 143, r.output
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())
    assert (state["epoch"], state["global_step"]) == (0, 3)
    assert invoke("run", "--resume", tmp_path / "resumed").exit_code == 0
    ta, oa, sa, la = _final(tmp_path / "straight")
    tb, ob, sb, lb = _final(tmp_path / "resumed")
    assert ta.keys() == tb.keys() and any(k.startswith("optim.") for k in ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k       # same kernels, same inputs, same order
    assert (oa, sa, la) == (ob, sb, lb)
    history = [[{k: v for k, v in h.items() if k != "epoch_seconds"}
                for h in json.loads((d / "summary.json").read_text())["eval"]["history"]]
               for d in (tmp_path / "straight", tmp_path / "resumed")]
    assert history[0] == history[1] and len(history[0]) == 3


def test_export_writes_each_adapter_to_its_own_file_and_load_export_puts_them_back(invoke, tmp_path):
    from clipft.encode import class_text_features, encode_images
    from clipft.commands.export import load_export
    from clipft.engine.loadrun import load_run

    run_dir, out = tmp_path / "run", tmp_path / "export"
    run_cli(invoke, run_dir, "--strategy", "clip-adapter:text=true,ratio=0.5,text_ratio=0.3", "--lr", "1e-2")
    r = invoke("export", run_dir, out)
    assert r.exit_code == 0, r.stderr
    manifest = json.loads((out / "clipft_export.json").read_text())
    drops = {d["module"]: d["file"] for d in manifest["plain_open_clip_drops"]}
    assert drops == {"clipft_image_adapter": "clip_adapter_image.safetensors",
                     "clipft_text_adapter": "clip_adapter_text.safetensors"}
    assert manifest["load_export_max_abs_diff"] <= 1e-6
    assert sorted(load_file(str(out / "clip_adapter_image.safetensors"))) == [
        "clipft_image_adapter.down.weight", "clipft_image_adapter.up.weight"]
    back = load_export(out)
    run = load_run(run_dir)
    model = back["model"]
    assert model.clipft_image_adapter.ratio == 0.5 and model.clipft_text_adapter.ratio == 0.3
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # same weights, same kernels: exact
        assert torch.equal(encode_images(model, images), encode_images(run.model, images))
        want = class_text_features(run.model, run.tokenizer, run.classnames, run.templates, "cpu")
        got = class_text_features(model, back["tokenizer"], back["classnames"], back["templates"], "cpu")
        assert torch.equal(got, want)
        # plain open_clip has neither adapter: its image features differ by far more than rounding
        del model.clipft_image_adapter
        assert not torch.allclose(encode_images(model, images), encode_images(run.model, images), atol=1e-3)


def test_options_and_errors(invoke):
    cases = [
        ("clip-adapter:ratio=1.5", "ratio must be in (0, 1], got 1.5"),
        ("clip-adapter:ratio=0", "ratio must be in (0, 1], got 0"),
        ("clip-adapter:reduction=0", "reduction must be at least 1"),
        ("clip-adapter:image=false", "must go on at least one embedding"),
        ("clip-adapter:alpha=0.2", "Valid options: ratio, reduction, image, text, text_ratio"),
    ]
    for strategy, message in cases:
        r = invoke("plan", "--model", TINY, "--data", "shapes:n=8,val_n=8", "--strategy", strategy)
        assert r.exit_code == 2, (strategy, r.output)
        assert message in r.stderr, (strategy, r.stderr)
    r = invoke("plan", "--model", TINY, "--data", "shapes:n=8,val_n=8", "--strategy", "clip-adapter:text=true",
               "--head", "zero-shot", "--loss", "cross-entropy")
    assert r.exit_code == 2 and "use --head text" in r.stderr
    r = invoke("plan", "--model", TINY, "--data", "shapes:n=8,val_n=8", "--strategy",
               "clip-adapter:image=false,text=true,reduction=8", "--head", "text", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["params"]["trainable"] == 2 * EMBED_DIM * (EMBED_DIM // 8)
    r = invoke("describe", "strategy", "clip-adapter")
    assert r.exit_code == 0 and "residual ratio" in r.output


@pytest.mark.numerics
def test_clip_adapter_improves_top1_on_a_new_task(invoke, tmp_path_factory, tmp_path):
    """The paper's objective (cross-entropy through the frozen class prompts, the
    ``text`` head) on colours the base never saw, 4 epochs at lr 1e-2. Over 5
    bases (seeds 0-3, and seed 0 on ATen's AVX2 kernels) top-1 went from
    0.00-0.51 (the adapter starts random, as the paper's does, so ``before``
    is near, not at, zero-shot) to 0.56-0.65 as the mean of 2 seeds (single
    seeds 0.52-0.70); the smallest mean gain was +0.09 (the base that starts
    at 0.51), and the margin asked is a third of it."""
    base = base_checkpoint(tmp_path_factory)
    before, after = [], []
    for seed in (0, 1):
        s = run_cli(invoke, tmp_path / f"run{seed}", "--pretrained", base["weights"], "--strategy",
                    "clip-adapter", "--lr", "1e-2", "--batch-size", "32", "--seed", seed, data=NOVEL_DATA,
                    epochs=4)
        before.append(s["eval"]["before"]["top1"])
        after.append(s["eval"]["after"]["top1"])
        assert math.isclose(s["eval"]["after"]["head_top1"], after[-1])   # the text head is the zero-shot classifier
    b, a = sum(before) / 2, sum(after) / 2
    print(f"clip-adapter top-1 on unseen colours: {before} -> {after} (means {b:.3f} -> {a:.3f})")
    assert a >= b + 0.03, (before, after)
    assert a >= 0.45, after                      # chance is 1/6
