"""``maple`` (plugins/clipft-maple, MaPLe, Khattak et al., CVPR 2023): the
coupling layers' shapes, the vision prompts of every block are the projection
of that block's text context, depth 1 starts at CLIP's zero-shot prompt,
training moves both towers' prompts, a resume is bit-exact and the export
reloads to the same predictions."""
from __future__ import annotations

import copy

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
def registry():
    import clipft_maple
    return testing.plugin_registry(clipft_maple)


@pytest.fixture(scope="module")
def tiny():
    from clipft import testing
    model, tok, _ = testing.tiny_model()
    return model.eval().requires_grad_(False), tok


def maple(model, tok, **kw):
    from clipft.context import BuildContext
    from clipft_maple import Maple, MapleOptions
    m = copy.deepcopy(model)
    ctx = BuildContext(model=m, model_name="tiny-vit", tokenizer=tok, device=torch.device("cpu"),
                       classnames=list(CLASSES))
    (sel,) = Maple(MapleOptions(**kw)).apply(m, ctx)
    return m, sel


def test_coupling_shapes_and_the_vision_prompts_are_projected_text(tiny):
    model, tok = tiny
    m, sel = maple(model, tok, depth=3)
    shapes = {n: tuple(p.shape) for n, p in sel.params}
    assert shapes == {"clipft_class_text.ctx": (2, 64), "clipft_class_text.deep_ctx": (2, 2, 64),
                      **{f"clipft_class_text.couple.{j}.weight": (64, 64) for j in range(3)},
                      **{f"clipft_class_text.couple.{j}.bias": (64,) for j in range(3)}}
    learner = m.clipft_class_text
    seen = {}
    blocks = m.visual.transformer.resblocks
    hooks = [blocks[j].ln_1.register_forward_pre_hook(lambda mod, args, j=j: seen.__setitem__(j, args[0].clone()))
             for j in range(4)]
    img = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.encode_image(img)
        for j in range(3):        # blocks 0..2: their prompts are couple[j](text context of block j)
            want = learner.couple[j](learner.ctx if j == 0 else learner.deep_ctx[j - 1])
            assert torch.equal(seen[j][:, 1:3], want.expand(2, -1, -1)), j
        assert seen[3].shape[1] == 1 + 2 + 16       # block 3: the prompts are still there, not replaced
    for h in hooks:
        h.remove()
    # gradients: the image side reaches the text context through the coupling
    m.train()
    m.encode_image(img).sum().backward()
    assert learner.ctx.grad.abs().sum() > 0 and learner.deep_ctx.grad.abs().sum() > 0
    assert all(learner.couple[j].weight.grad.abs().sum() > 0 for j in range(3))


def test_depth_one_starts_at_the_zero_shot_prompt(tiny):
    """n_ctx 2 from "a photo of a": "a photo" learns, "of a" stays words."""
    model, tok = tiny
    from clipft.encode import encode_text_trimmed
    m, _ = maple(model, tok, depth=1)
    learner = m.clipft_class_text
    assert learner.fixed == "of a" and learner.n_ctx == 2
    with torch.no_grad():
        got = learner(m, tok, CLASSES)
        want = encode_text_trimmed(model, tok([f"a photo of a {c}." for c in CLASSES]))
    assert torch.equal(got, want)
    learner.uninstall()


def test_errors(registry, tmp_path):
    for strategy, message in [("maple", "depth=9, but the text transformer has 4"),
                              ("maple:depth=2,n_ctx=5", "need its first 5 words to be 5 tokens")]:
        with pytest.raises(clipft.ClipftUsageError, match=message):
            testing.run_plugin(None, strategy=strategy, head="text", loss="cross-entropy", data=DATA,
                               tmp_path=tmp_path, registry=registry, callbacks=["none"])


def test_trains_both_towers_resumes_exactly_and_exports(registry, tmp_path, monkeypatch):
    from clipft.api import RunConfig, export, run

    cfg = RunConfig(model="tiny-vit", pretrained="none", data=DATA, head="text", loss="cross-entropy",
                    strategies=["maple:depth=3"], epochs=2, batch_size=16, device="cpu", callbacks=["none"])
    r = crash_after_first_checkpoint_then_resume(cfg, tmp_path, monkeypatch, registry=registry)
    straight, resumed = r.whole, r.resumed
    assert straight["params"]["trainable"] == 3 * 2 * 64 + 3 * (64 * 64 + 64)
    assert straight["cache"]["image"].startswith("off")      # the image tower's prompts train

    assert_same_checkpoints(tmp_path / "straight", tmp_path / "crashed")
    assert resumed["eval"]["after"] == straight["eval"]["after"]
    # every prompt and coupling parameter got gradients, so the optimizer moved it
    opt = load_file(str(tmp_path / "straight" / "checkpoint" / "optimizer.safetensors"))
    assert all((v > 0).all() for k, v in opt.items() if k.endswith("exp_avg_sq"))
    assert sum(k.endswith("exp_avg_sq") for k in opt) == 2 + 6

    export(tmp_path / "straight", tmp_path / "export", registry=registry)
    exp = clipft.load(tmp_path / "export", device="cpu", registry=registry)
    live = clipft.load(tmp_path / "straight", device="cpu", registry=registry)
    img = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(exp.classify(img), live.classify(img), atol=1e-5)
        assert torch.allclose(exp.encode_image(img), live.encode_image(img), atol=1e-5)
