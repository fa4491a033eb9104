"""``promptsrc`` (plugins/clipft-promptsrc): PromptSRC's equations on tiny
inputs against hand computations (the L1 agreements, the logit KL, GPA's
weights and aggregate), all weights 0 and no GPA being IVLP's gradients, the
frozen model's image features coming from the bypassed prompts and the
per-sample cache (no second model), a bit-exact resume, export and reload of
the aggregated prompts, and the usage errors."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import clipft
from clipft import testing
from resume_check import assert_same_checkpoints, crash_after_first_checkpoint_then_resume

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["red circle", "blue square", "green triangle"]
DATA = "shapes:n=32,val_n=16"


@pytest.fixture(scope="module")
def tiny():
    model, tok, _ = testing.tiny_model()
    return model.eval().requires_grad_(False), tok


def ctx_for(model, tok, loss="cross-entropy", head="text"):
    from clipft.context import BuildContext
    return BuildContext(model=model, model_name="tiny-vit", tokenizer=tok, device=torch.device("cpu"),
                        classnames=list(CLASSES), loss=loss, head=head)


def promptsrc(model, tok, **kw):
    from clipft_promptsrc import PromptSRC, PromptSRCOptions
    m = copy.deepcopy(model)
    strategy = PromptSRC(PromptSRCOptions(**{"depth": 2, "templates": "run", **kw}))
    return m, strategy, strategy.apply(m, ctx_for(m, tok))


def images(n=2):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# -- the equations -----------------------------------------------------------------
def test_terms_against_a_hand_computation():
    from clipft.record import ForwardRecord
    from clipft_promptsrc import PromptSRCOptions
    from clipft_promptsrc.terms import promptsrc_terms

    f = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    f0 = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    w0 = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]])
    record = ForwardRecord(image_features=f, logit_scale=torch.tensor(2.0), class_text_features=w,
                           frozen_image_features=f0)
    terms = promptsrc_terms(record, w0, PromptSRCOptions())
    # |0.6-0.8| + |0.8-0.6| + |1-0| + |0-1| = 2.4 over 4 entries
    assert float(terms["scl_image"]) == pytest.approx(10 * 2.4 / 4, rel=1e-6)
    # rows: 0.4 + 0.8, 1 + 1, 0.6 + 0.2 = 4.0 over 6 entries
    assert float(terms["scl_text"]) == pytest.approx(25 * 4.0 / 6, rel=1e-6)

    def softmax(row):
        e = [math.exp(x) for x in row]
        return [x / sum(e) for x in e]

    kl = 0.0
    for i in range(2):
        p = softmax([2 * sum(a * b for a, b in zip(f[i].tolist(), wc)) for wc in w.tolist()])
        q = softmax([2 * sum(a * b for a, b in zip(f0[i].tolist(), wc)) for wc in w0.tolist()])
        kl += sum(qc * math.log(qc / pc) for pc, qc in zip(p, q))
    assert float(terms["scl_kl"]) == pytest.approx(kl / 6, rel=1e-5)     # summed, over B x C = 6
    assert kl > 0.01
    only = promptsrc_terms(record, w0, PromptSRCOptions(image_weight=0, kl_weight=0))
    assert set(only) == {"scl_text"}


def test_gpa_weights_and_aggregate():
    from torch import nn

    from clipft_promptsrc.gpa import GaussianPromptAggregate, gpa_parameters, gpa_weights

    # the paper's schedule: mean 15, sigma 1 over 20 epochs, the default for 20 epochs
    assert gpa_parameters(20) == (15.0, 1.0) and gpa_parameters(4) == (3.0, 0.2)
    w = gpa_weights(20)
    g = [math.exp(-0.5 * (e - 15) ** 2) for e in range(1, 21)]   # the density's constant cancels
    assert w == pytest.approx([x / sum(g) for x in g], rel=1e-12)
    assert max(range(20), key=w.__getitem__) == 14 and w[14] / w[15] == pytest.approx(math.exp(0.5))
    assert sum(w) == pytest.approx(1.0, rel=1e-12) and w[0] < 1e-40       # epoch 1: 14 sigma away

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(3))

    m = Tiny()
    m.add_module("gpa", GaussianPromptAggregate(m, ["p"], mean=2.5, std=1.0))
    assert m.gpa.use_eval_weights() is None                       # no epoch yet: the live weights
    values = [torch.tensor([1.0, 2.0, 3.0]) * e + e ** 2 for e in range(1, 5)]
    for e, v in enumerate(values, 1):
        with torch.no_grad():
            m.p.copy_(v)
        m.gpa.after_epoch(e, 4)
    expected = sum(wi * v for wi, v in zip(gpa_weights(4, 2.5, 1.0), values))
    live = m.p.detach().clone()
    restore = m.gpa.use_eval_weights()
    assert torch.allclose(m.p.detach(), expected, rtol=1e-6, atol=1e-6)
    restore()
    assert torch.equal(m.p.detach(), live)
    # the tiny weights of epochs far from the mean neither underflow nor divide by zero
    m2 = Tiny()
    m2.add_module("gpa", GaussianPromptAggregate(m2, ["p"], mean=60.0, std=0.5))
    m2.gpa.after_epoch(1, 2)
    assert torch.isfinite(m2.gpa._buffers["p"]).all()


# -- the model -----------------------------------------------------------------------
def test_frozen_features_are_the_model_without_its_prompts(tiny):
    from clipft.protocols import bypass_inserted, inserted_modules

    model, tok = tiny
    m, s, (sel,) = promptsrc(model, tok)
    # no second model: the prompts (and GPA's copy of them, buffers) are all that was added
    base = sum(p.numel() for p in model.parameters())
    prompts = sum(p.numel() for _, p in sel.params)
    assert sum(p.numel() for p in m.parameters()) == base + prompts == base + 4 * 64 * 2 + 4 * 64 * 2
    assert sorted(n for n, _ in inserted_modules(m)) == ["clipft_class_text", "clipft_promptsrc_gpa",
                                                         "visual.clipft_vision_prompts"]
    assert sum(b.numel() for b in m.clipft_promptsrc_gpa.buffers()) == prompts + 1
    x = images()
    with torch.no_grad():
        prompted = m.encode_image(x)
        restore = bypass_inserted(m)
        frozen = m.encode_image(x)
        restore()
        assert torch.equal(frozen, model.encode_image(x))
        assert torch.equal(m.encode_image(x), prompted) and not torch.allclose(prompted, frozen, atol=1e-3)
    # the frozen text side: the ensemble of the run's templates, encoded before the prompts existed
    with torch.no_grad():
        w = model.encode_text(tok([f"a photo of a {c}." for c in CLASSES]))
    assert torch.allclose(s.w_frozen, torch.nn.functional.normalize(w, dim=-1), atol=1e-6)
    assert s.frozen_image_features


def test_zero_weights_without_gpa_is_ivlp(tiny):
    """IVLP (``prompt:depth`` + ``vision-prompt:depth``) with the same prompt
    values gets the same loss and gradients, bit for bit."""
    from clipft_prompt import PromptOptions, PromptTuning
    from clipft_vision_prompt import VisionPrompt, VisionPromptOptions
    import torch.nn.functional as F

    model, tok = tiny
    m, s, (sel,) = promptsrc(model, tok, image_weight=0, text_weight=0, kl_weight=0, gpa=False)
    assert s.w_frozen is None and not s.frozen_image_features and s.loss_terms(None) == {}
    assert not hasattr(m, "clipft_promptsrc_gpa")
    iv = copy.deepcopy(model)
    (t,) = PromptTuning(PromptOptions(depth=2)).apply(iv, ctx_for(iv, tok))
    (v,) = VisionPrompt(VisionPromptOptions(n_tokens=4, depth=2)).apply(iv, None)
    ivlp = dict(t.params + v.params)
    assert ivlp.keys() == dict(sel.params).keys()
    with torch.no_grad():
        for name, p in sel.params:
            p.normal_(0, 0.1)
            ivlp[name].copy_(p)
    labels = torch.tensor([0, 2])

    def loss_and_grads(mod, params):
        img = F.normalize(mod.encode_image(images()), dim=-1)
        cls = F.normalize(mod.clipft_class_text(mod, tok, CLASSES), dim=-1)
        loss = F.cross_entropy(mod.logit_scale.exp() * img @ cls.t(), labels)
        return loss, torch.autograd.grad(loss, [p for _, p in params])

    a, ga = loss_and_grads(m, sel.params)
    b, gb = loss_and_grads(iv, [(n, ivlp[n]) for n, _ in sel.params])
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb))


# -- runs ----------------------------------------------------------------------------
def steps(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["type"] == "step"]


def test_trains_resumes_exactly_exports_and_caches_frozen_features(tmp_path, monkeypatch):
    from clipft.api import RunConfig, export
    from clipft.engine.features import FrozenImageFeatures

    computed = []
    real = FrozenImageFeatures.compute

    def counting(self, pixels):
        computed.append(len(pixels))
        return real(self, pixels)

    monkeypatch.setattr(FrozenImageFeatures, "compute", counting)
    cfg = RunConfig(model="tiny-vit", pretrained="none", data=DATA, head="text", loss="cross-entropy",
                    strategies=["promptsrc:depth=2,templates=run"], epochs=2, batch_size=16, lr=5e-3,
                    device="cpu", callbacks=["none"])
    checked = {}

    def before_crash(summary, straight):
        # the frozen image features: one in-order pass over the 32 training images for both epochs
        checked["computed"] = list(computed)
        checked["summary"] = summary

    r = crash_after_first_checkpoint_then_resume(cfg, tmp_path, monkeypatch, before_crash=before_crash)
    assert sum(checked["computed"]) == 32
    straight = checked["summary"]
    assert straight["params"]["trainable"] == 2 * 4 * 64 * 2
    rows = steps(tmp_path / "straight")
    assert rows and all(r[k] > 0 for r in rows for k in ("reg.scl_text", "reg.scl_image", "reg.scl_kl"))

    assert_same_checkpoints(tmp_path / "straight", tmp_path / "crashed")
    assert r.resumed["eval"]["after"] == straight["eval"]["after"]
    w = load_file(str(tmp_path / "straight" / "checkpoint" / "model.safetensors"))
    assert float(w["clipft_promptsrc_gpa.weight_sum"]) > 0
    # with 2 epochs GPA's mean is 1.5 and sigma 0.1: both epochs weigh 1/2
    first = r.first["visual.clipft_vision_prompts.deep"]
    last = w["visual.clipft_vision_prompts.deep"]
    assert torch.allclose(w["clipft_promptsrc_gpa.visual:clipft_vision_prompts:deep"], (first + last) / 2,
                          atol=1e-6)

    export(tmp_path / "straight", tmp_path / "export")
    assert load_file(str(tmp_path / "export" / "promptsrc_vision_prompts.safetensors"))[
        "visual.clipft_vision_prompts.deep"].equal(w["clipft_promptsrc_gpa.visual:clipft_vision_prompts:deep"])
    exp = clipft.load(tmp_path / "export", device="cpu")
    live = clipft.load(tmp_path / "straight", device="cpu")
    img = images(3)
    with torch.no_grad():
        assert torch.allclose(exp.classify(img), live.classify(img), atol=1e-5)


def test_augmented_images_get_their_frozen_features_per_step(tmp_path, monkeypatch):
    from clipft.engine.features import FrozenImageFeatures

    computed = []
    real = FrozenImageFeatures.compute
    monkeypatch.setattr(FrozenImageFeatures, "compute", lambda self, px: computed.append(len(px)) or real(self, px))
    s = testing.run_plugin(None, strategy="promptsrc:depth=2,templates=run", head="text", loss="cross-entropy",
                           data=DATA, batch_size=16, epochs=2, augment=True, tmp_path=tmp_path, callbacks=["none"])
    # a random crop is a new image every epoch: no cache, each step's own batch
    assert computed == [16] * 4 and s["train"]["steps"] == 4


def test_usage_errors(invoke, tmp_path):
    cases = [("promptsrc:depth=9", "depth=9, but the text transformer has"),
             ("promptsrc:image_weight=-1", "image_weight must be >= 0"),
             ("promptsrc:gpa_std=0", "gpa_std must be > 0"),
             ("promptsrc:templates=nothing", "templates must be 'run'"),
             ("promptsrc:depth=2,n_ctx=3", "n_ctx=3, but init 'a photo of a' is 4 tokens")]
    for strategy, message in cases:
        r = invoke("plan", "--model", "tiny-vit", "--data", "shapes:n=8,val_n=8", "--strategy", strategy,
                   "--head", "text", "--loss", "cross-entropy")
        assert r.exit_code == 2 and message in r.stderr, (strategy, r.stderr)
    r = invoke("plan", "--model", "tiny-vit", "--data", "shapes:n=8,val_n=8", "--strategy", "promptsrc:depth=2",
               "--head", "zero-shot", "--loss", "cross-entropy")
    assert r.exit_code == 2 and "use --head text" in r.stderr
    # a layer that cannot be bypassed leaves no way to the frozen model's features
    out = tmp_path / "lora"
    r = invoke("run", "--model", "tiny-vit", "--data", "shapes:n=8,val_n=8", "--strategy", "promptsrc:depth=2",
               "--strategy", "lora", "--head", "text", "--loss", "cross-entropy", "--epochs", "1",
               "--callback", "none", "--out", out)
    assert r.exit_code == 2 and "cannot be bypassed" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
    r = invoke("plugins")
    assert r.exit_code == 0 and "promptsrc" in r.stdout
