"""Deep prompts: ``vision-prompt:depth=J`` (VPT-deep) and ``prompt:depth=J``
(deep text prompts; both together are IVLP). Fresh tokens enter at each of the
first J blocks and replace the previous block's outputs at the prompt
positions; depth 1 is the shallow strategy unchanged; they train, resume
bit-exact, export and reload, and the tower without prompts stays cached."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import clipft
from clipft import testing
from resume_check import assert_same_checkpoints, crash_after_first_checkpoint_then_resume

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["red circle", "blue square", "green dodecahedron"]
DATA = "shapes:n=32,val_n=16"


@pytest.fixture(scope="module")
def tiny():
    from clipft import testing
    model, tok, _ = testing.tiny_model()
    return model.eval().requires_grad_(False), tok


def vision(model, **kw):
    from clipft_vision_prompt import VisionPrompt, VisionPromptOptions
    m = copy.deepcopy(model)
    sel = VisionPrompt(VisionPromptOptions(**kw)).apply(m, None)
    return m, sel


def text(model, tok, **kw):
    from clipft.context import BuildContext
    from clipft_prompt import PromptOptions, PromptTuning
    m = copy.deepcopy(model)
    ctx = BuildContext(model=m, model_name="tiny-vit", tokenizer=tok, device=torch.device("cpu"),
                       classnames=list(CLASSES))
    return m, PromptTuning(PromptOptions(**kw)).apply(m, ctx)


def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_depth_one_is_the_shallow_strategy(tiny):
    model, tok = tiny
    torch.manual_seed(1)
    m1, (s1,) = vision(model, n_tokens=3)
    torch.manual_seed(1)
    m2, (s2,) = vision(model, n_tokens=3, depth=1)
    assert [n for n, _ in s1.params] == [n for n, _ in s2.params] == ["visual.clipft_vision_prompts.prompts"]
    assert torch.equal(s1.params[0][1], s2.params[0][1])
    assert all(not b._forward_pre_hooks for b in m2.visual.transformer.resblocks)   # no per-block hooks
    torch.manual_seed(1)
    t1, (s1,) = text(model, tok)
    torch.manual_seed(1)
    t2, (s2,) = text(model, tok, depth=1)
    assert [n for n, _ in s2.params] == ["clipft_class_text.ctx"]
    with torch.no_grad():
        assert torch.equal(t1.clipft_class_text(t1, tok, CLASSES), t2.clipft_class_text(t2, tok, CLASSES))


def test_depth_adds_parameters_per_block(tiny):
    model, tok = tiny
    _, (sel,) = vision(model, n_tokens=3, depth=2)
    assert {n: tuple(p.shape) for n, p in sel.params} == {
        "visual.clipft_vision_prompts.prompts": (3, 64), "visual.clipft_vision_prompts.deep": (1, 3, 64)}
    _, (sel,) = text(model, tok, depth=2)
    assert {n: tuple(p.shape) for n, p in sel.params} == {
        "clipft_class_text.ctx": (4, 64), "clipft_class_text.deep_ctx": (1, 4, 64)}


def test_vision_block_inputs_are_the_deep_tokens(tiny):
    model, _ = tiny
    m, _ = vision(model, n_tokens=3, depth=2)
    vp = m.visual.clipft_vision_prompts
    blocks = m.visual.transformer.resblocks
    seen = []   # the block's input, as its first layer sees it (after every pre-hook of the block)
    h = blocks[1].ln_1.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    with torch.no_grad():
        out = m.encode_image(images())
    h.remove()
    (x,) = seen    # block 1's input: the fresh tokens at the prompt positions, exactly
    assert torch.equal(x[:, 1:4], vp.deep[0].expand(2, -1, -1))
    # block 0's outputs at the prompt positions are discarded: noise there changes nothing
    h = blocks[0].register_forward_hook(lambda mod, args, o: torch.cat([o[:, :1], o[:, 1:4] + 5, o[:, 4:]], 1))
    with torch.no_grad():
        assert torch.equal(m.encode_image(images()), out)
    h.remove()
    with torch.no_grad():   # while block 1's tokens steer the output
        # (a random change: a constant shift of a token vanishes in the block's LayerNorm)
        vp.deep.add_(torch.randn(vp.deep.shape, generator=torch.Generator().manual_seed(1)))
        assert not torch.allclose(m.encode_image(images()), out, atol=1e-3)
    vp.uninstall()
    with torch.no_grad():
        assert torch.equal(m.encode_image(images()), model.encode_image(images()))


def test_text_block_inputs_are_the_deep_context(tiny):
    model, tok = tiny
    m, _ = text(model, tok, depth=2)
    learner = m.clipft_class_text
    rows, index = learner.rows_for(tok, tuple(CLASSES), torch.device("cpu"))
    blocks = m.transformer.resblocks
    seen = []   # the block's input, as its first layer sees it (after every pre-hook of the block)
    h = blocks[1].ln_1.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    with torch.no_grad():
        out = learner(m, tok, CLASSES)
    h.remove()
    (x,) = seen
    for c in range(len(CLASSES)):
        for pos in range(x.shape[1]):
            i = int(index[c, pos])
            if i >= 0:
                assert torch.equal(x[c, pos], learner.deep_ctx[0, i])
    assert int((index >= 0).sum()) == 4 * len(CLASSES)
    is_ctx = (index >= 0)

    def noise(mod, args, o):   # block 0's outputs at the context positions: discarded
        return torch.where(is_ctx[:, :o.shape[1], None], o + 5, o)

    h = blocks[0].register_forward_hook(noise)
    with torch.no_grad():
        assert torch.equal(learner(m, tok, CLASSES), out)
    h.remove()
    with torch.no_grad():
        learner.deep_ctx.add_(torch.randn(learner.deep_ctx.shape, generator=torch.Generator().manual_seed(1)))
        assert not torch.allclose(learner(m, tok, CLASSES), out, atol=1e-3)
        # captions do not see the prompts: the hooks live only during the learner's call
        caps = tok(["a photo of a cat."])
        assert torch.equal(m.encode_text(caps), model.encode_text(caps))


def test_errors(invoke):
    cases = [("vision-prompt:depth=9", "depth=9, but the vision transformer has"),
             ("prompt:depth=9", "depth=9, but the text transformer has"),
             ("prompt:depth=2,class_specific=true", "deep prompts (depth=2) are shared by all classes"),
             ("vision-prompt:depth=0", "depth must be at least 1")]
    for strategy, message in cases:
        r = invoke("plan", "--model", "tiny-vit", "--data", "shapes:n=8,val_n=8", "--strategy", strategy,
                   "--head", "text")
        assert r.exit_code == 2 and message in r.stderr, (strategy, r.stderr)


def steps(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["type"] == "step"]


def test_ivlp_trains_resumes_exactly_and_exports(tmp_path, monkeypatch):
    from clipft.api import RunConfig, export, run

    cfg = RunConfig(model="tiny-vit", pretrained="none", data=DATA, head="text", loss="cross-entropy",
                    strategies=["prompt:depth=3", "vision-prompt:n_tokens=2,depth=2"], epochs=2, batch_size=16,
                    lr=5e-3, device="cpu", callbacks=["none"])
    r = crash_after_first_checkpoint_then_resume(cfg, tmp_path, monkeypatch)
    straight, resumed = r.whole, r.resumed
    assert straight["params"]["trainable"] == 3 * 4 * 64 + 2 * 2 * 64
    w = load_file(str(tmp_path / "straight" / "checkpoint" / "model.safetensors"))
    assert set(w) == {"clipft_class_text.ctx", "clipft_class_text.deep_ctx", "visual.clipft_vision_prompts.prompts",
                      "visual.clipft_vision_prompts.deep"}

    assert_same_checkpoints(tmp_path / "straight", tmp_path / "crashed")
    assert resumed["eval"]["after"] == straight["eval"]["after"]

    # every deep prompt of both towers got gradients, so AdamW moved each of them
    opt = load_file(str(tmp_path / "straight" / "checkpoint" / "optimizer.safetensors"))
    second = {tuple(v.shape): v for k, v in opt.items() if k.endswith("exp_avg_sq")}
    assert set(second) == {(4, 64), (2, 4, 64), (2, 64), (1, 2, 64)}
    assert (second[(2, 4, 64)] > 0).all() and (second[(1, 2, 64)] > 0).all()
    export(tmp_path / "straight", tmp_path / "export")
    exp = clipft.load(tmp_path / "export", device="cpu")
    live = clipft.load(tmp_path / "straight", device="cpu")
    img = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(exp.classify(img), live.classify(img), atol=1e-5)
        assert torch.allclose(exp.encode_image(img), live.encode_image(img), atol=1e-5)
    manifest = json.loads((tmp_path / "export" / "clipft_export.json").read_text())
    extras = {e["file"]: e["options"] for e in manifest["extras"]}
    assert extras["vision_prompts.safetensors"]["depth"] == 2 and extras["prompts.safetensors"]["depth"] == 3


def test_the_tower_without_prompts_stays_cached(tmp_path):
    kw = dict(head="text", loss="cross-entropy", data=DATA, batch_size=16, epochs=2, lr=5e-3, tmp_path=tmp_path,
              callbacks=["none"])
    s = testing.run_plugin(None, strategy="prompt:depth=2", **kw)
    # deep text prompts: the class prompts run live, the image tower's output is cached
    assert s["cache"]["image"].startswith("output") and s["cache"]["image_hits"] > 0
    assert s["cache"]["class_prompts"].startswith("off")
    s = testing.run_plugin(None, strategy="vision-prompt:depth=2", **kw)
    # deep vision prompts: the image tower runs live, the class prompts are encoded once
    assert s["cache"]["image"].startswith("off") and s["cache"]["image_misses"] == 0
    assert s["cache"]["class_prompts"] == "on" and s["cache"]["text_hits"] > 0
