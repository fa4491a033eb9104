"""The ``siglip`` loss (Zhai et al. 2023): -1/B sum_ij log sigmoid(z_ij (t x_i.y_j + b)),
z = +1 for matching pairs and -1 elsewhere. It equals open_clip's ``SigLipLoss``
on the same inputs; ``duplicates=positive`` makes identical captions matching
pairs; on a model without ``logit_bias`` the loss owns a trainable bias (-10 at
start) that trains, is checkpointed and resumes exactly; a short run lowers it."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from numerics import EPS32, assert_close_rel, float_tol
from resume_check import crash_after_first_checkpoint_then_resume

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = "shapes:n=64,val_n=16"


def features(b=6, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.5 * torch.randn(b, d, generator=g), dim=-1)
    return img, txt


def reference(img, txt, t, b, positive):
    """The definition, pair by pair, in float64."""
    img, txt = img.double(), txt.double()
    total = 0.0
    for i in range(img.shape[0]):
        for j in range(txt.shape[0]):
            z = 1.0 if positive(i, j) else -1.0
            logit = float(t) * float(img[i] @ txt[j]) + float(b)
            total += -math.log(1.0 / (1.0 + math.exp(-z * logit)))
    return total / img.shape[0]


@pytest.mark.numerics
@pytest.mark.parametrize("b", [4, 6])
def test_equals_open_clip_siglip_loss(b):
    """The issue asks for 1e-6 relative. Two float32 evaluations of this loss that
    took different kernel paths would differ by up to float_tol(reduction=B^2):
    the loss is a sum of B^2 positive terms (no cancellation) after a D=64 dot
    product per logit, 8 * eps * sqrt(B^2) = 3.8e-6 at B=4 and 5.7e-6 at B=6, above
    1e-6. So 1e-6 is honest only because ``siglip_loss`` runs open_clip's own
    operations in open_clip's order: the two are bit-identical (asserted). Both
    are also within float_tol of a float64 evaluation of the definition."""
    from open_clip.loss import SigLipLoss

    from clipft_losses import siglip_loss
    img, txt = features(b)
    t, bias = torch.tensor(10.0), torch.tensor(-10.0)
    ours = siglip_loss(img, txt, t, bias)
    theirs = SigLipLoss()(img, txt, t, bias)
    rel = float((ours - theirs).abs() / theirs.abs())
    print(f"siglip vs open_clip SigLipLoss, B={b}: relative difference {rel:.3g}")
    assert rel <= 1e-6
    assert torch.equal(ours, theirs)          # the same ops in the same order
    # distinct caption ids: duplicates=positive changes nothing
    assert torch.equal(siglip_loss(img, txt, t, bias, torch.arange(b)), theirs)
    want = reference(img, txt, 10.0, -10.0, lambda i, j: i == j)
    assert float_tol(reduction=b * b, depth=2) > 1e-6 > EPS32
    assert_close_rel(ours, torch.tensor(want), reduction=b * b, depth=2, what=f"siglip vs float64 B={b}")


@pytest.mark.numerics
def test_duplicates_positive_counts_identical_captions_as_matching_pairs():
    from clipft_losses import siglip_loss
    img, txt = features(5, seed=1)
    ids = torch.tensor([0, 1, 0, 2, 1])        # captions a b a c b
    t, bias = torch.tensor(12.0), torch.tensor(-4.0)
    got = siglip_loss(img, txt, t, bias, ids)
    want = reference(img, txt, 12.0, -4.0, lambda i, j: ids[i] == ids[j])
    assert_close_rel(got, torch.tensor(want), reduction=25, depth=2, what="siglip duplicates=positive")
    plain = reference(img, txt, 12.0, -4.0, lambda i, j: i == j)
    assert abs(want - plain) > 0.1                # the option matters on this batch


def _record(img, txt, **kw):
    from clipft import ForwardRecord
    return ForwardRecord(image_features=img, text_features=txt, **kw)


def test_the_loss_adds_a_bias_only_where_the_model_has_none():
    from clipft import testing
    from clipft.api import make_registry
    from clipft.context import BuildContext
    from clipft.options import build_options

    spec = make_registry().get("loss", "siglip")
    model, tok, _ = testing.tiny_model()
    assert model.logit_bias is None             # tiny-vit: a CLIP, no bias

    def built(m, **opts):
        loss = spec.build(build_options("loss", spec, opts))
        loss.setup(BuildContext(model=m, model_name="tiny-vit", tokenizer=tok, device=torch.device("cpu")))
        return loss

    loss = built(model)
    assert dict(loss.named_parameters()).keys() == {"logit_bias"}      # the model has logit_scale
    assert loss.logit_bias.item() == -10.0
    img, txt = features(4)
    ls = torch.tensor(10.0)
    from clipft_losses import siglip_loss
    assert torch.equal(loss(_record(img, txt, logit_scale=ls)), siglip_loss(img, txt, ls, loss.logit_bias))
    # a model with a logit_bias (SigLIP checkpoints): the model's is used, the loss owns nothing
    model.logit_bias = torch.nn.Parameter(torch.tensor([-3.0]))
    own = built(model, bias_init=-7.0)
    assert list(own.parameters()) == []
    assert torch.equal(own(_record(img, txt, logit_scale=ls, logit_bias=model.logit_bias)),
                       siglip_loss(img, txt, ls, model.logit_bias))
    # a model without logit_scale: the paper's init, t = exp(log 10)
    del model.logit_scale
    bare = built(model)
    assert set(dict(bare.named_parameters())) == {"logit_scale"}
    assert bare.logit_scale.item() == pytest.approx(math.log(10.0))
    assert torch.equal(bare(_record(img, txt, logit_bias=model.logit_bias)),
                       siglip_loss(img, txt, bare.logit_scale.exp(), model.logit_bias))


@pytest.mark.numerics
def test_the_bias_trains_is_checkpointed_and_resumes_exactly(tmp_path, monkeypatch):
    from clipft.api import RunConfig
    conf = RunConfig(model="tiny-vit", data=DATA, batch_size=16, lr=1e-2, epochs=2, loss="siglip",
                     strategies=["last-n:n=1"], callbacks=["none"])
    seen = {}

    def trained(whole, straight):
        groups = {g["name"]: g for g in whole["params"]["groups"]}
        assert groups["loss/no_decay"]["params"] == 1 and groups["loss/no_decay"]["lr"] == 1e-2
        seen["bias"] = load_file(str(straight / "checkpoint" / "loss.safetensors"))
        assert set(seen["bias"]) == {"logit_bias"} and seen["bias"]["logit_bias"].item() != -10.0  # it trained

    r = crash_after_first_checkpoint_then_resume(conf, tmp_path, monkeypatch, "loss.safetensors", trained)
    first, resumed, whole, straight, crashed, bias = r.first, r.resumed, r.whole, r.straight, r.crashed, seen["bias"]
    # exact: the bias comes back from the checkpoint with its optimizer state, and
    # the resumed epoch recomputes what the uninterrupted one did
    for name in ("model", "loss"):
        a = load_file(str(straight / "checkpoint" / f"{name}.safetensors"))
        b = load_file(str(crashed / "checkpoint" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not torch.equal(first["logit_bias"], bias["logit_bias"])   # the second epoch moved it
    assert resumed["eval"]["after"] == whole["eval"]["after"]
    assert resumed["train"]["final_loss"] == whole["train"]["final_loss"]


def test_a_short_run_lowers_the_loss(invoke, tmp_path):
    """From random init, 3 epochs of last-n:n=1: the mean train loss fell from 27.9
    to 12.8 on this data (the bias starts at -10 and the positives' logits near
    it, so the first epoch pays ~B log(1 + e^10) / B per row); asked: a third off."""
    import json
    out = tmp_path / "run"
    r = invoke("run", "--data", "shapes:n=128,val_n=32", "--strategy", "last-n:n=1", "--loss", "siglip",
               "--lr", "1e-3", "--epochs", "3", "--batch-size", "32", "--callback", "none",
               "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    losses = [h["train_loss"] for h in s["eval"]["history"][1:]]
    print("siglip train loss per epoch:", [round(x, 3) for x in losses])
    assert losses[-1] < 0.67 * losses[0], losses
    assert s["loss"] == {"name": "siglip", "duplicates": "positive", "bias_init": -10.0,
                         "scale_init": math.log(10.0)}
