"""DoRA (``lora:dora=true``): W' = m * (W + s·BA) / ||W + s·BA|| with the norm of
each output row of the [out, in] weight and one learned magnitude per output
feature. m starts at ||W||, so B = 0 is the base model (exactly in eval); the
training path (LoRA dropout) and the weight path agree; merging writes W' and
equals the unmerged forward; counts are LoRA's plus one m per adapted output
feature; resume is bit-exact; export is a plain open_clip model; tuning improves
zero-shot top-1 on a task the base never saw."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from numerics import TINY_DEPTH, TINY_REDUCTION, assert_close_rel
from peft_base import NOVEL_DATA, base_checkpoint, wanted
from resume_check import crash_after_first_checkpoint_then_resume

ALL = ("q", "k", "v", "out", "mlp")
DATA = "shapes:n=32,val_n=16"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    from clipft.models import load_model
    torch.manual_seed(0)
    lm = load_model("tiny-vit", "none")
    model = lm.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 32, 32, generator=g)
    tokens = lm.tokenizer(["a photo of a red circle.", "a blue square", "green"])
    return model, images, tokens


def adapted(model, **kw):
    from clipft_lora import Lora, LoraOptions
    m = copy.deepcopy(model)
    torch.manual_seed(0)
    sel = Lora(LoraOptions(dora=True, **kw)).apply(m, None)
    return m, sel[0].params


def perturb(params, std=0.2):
    """B ~ N(0, std) (so the direction changes) and m scaled by 1 ± 0.1."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in params:
            if name.endswith(".B"):
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith(".m"):
                p.mul_(1 + 0.1 * (2 * torch.rand(p.shape, generator=g) - 1))


@torch.no_grad()
def feats(model, images, tokens):
    return model.encode_image(images), model.encode_text(tokens)


@pytest.mark.numerics
def test_b_zero_gives_the_base_model(tiny):
    model, images, tokens = tiny
    m, params = adapted(model, targets=ALL, dropout=0.25)
    attn = m.visual.transformer.resblocks[0].attn
    base_attn = model.visual.transformer.resblocks[0].attn
    d = attn.embed_dim
    # m = ||W|| per output row (norm over the input dimension), one per out-feature
    assert attn.lora["k"].m.shape == (d,)
    assert torch.equal(attn.lora["k"].m, torch.linalg.vector_norm(base_attn.in_proj_weight[d:2 * d], dim=1))
    fc = m.visual.transformer.resblocks[0].mlp.c_fc
    assert fc.lora["w"].m.shape == (fc.out_features,)
    base_i, base_t = feats(model, images, tokens)
    got_i, got_t = feats(m, images, tokens)
    # exact in eval: W' = (W + 0) * (m / ||W + 0||) where m is that same norm of
    # the same values, so m / ||.|| is exactly 1.0 and W' is W bit for bit; the
    # layers then run PyTorch's own kernels on it (layers._flagged_like)
    assert torch.equal(got_i, base_i) and torch.equal(got_t, base_t)
    m.train()
    base_train = copy.deepcopy(model).train()
    ti, tt = feats(base_train, images, tokens)
    gi, gt = feats(m, images, tokens)
    # train mode (LoRA dropout active): q, k, v computed separately and SDPA
    # called directly, x W^T and + b as two ops: same maths through other kernels
    assert_close_rel(gi, ti, reduction=TINY_REDUCTION, depth=TINY_DEPTH, what="dora B=0 train image")
    assert_close_rel(gt, tt, reduction=TINY_REDUCTION, depth=TINY_DEPTH, what="dora B=0 train text")


@pytest.mark.numerics
def test_training_path_and_weight_path_agree_with_gradients(tiny):
    """With dropout p=0 the explicit path, (m/||W+sBA||) * (x W^T + s·BA x) + b,
    equals the weight path, x W'^T + b, in outputs and in the gradients of A, B, m."""
    model, images, tokens = tiny
    from clipft_lora.layers import adapted_layers
    m, params = adapted(model, targets=ALL, dropout=0.25)
    perturb(params)
    for _, p in params:
        p.requires_grad_(True)
    m.train()
    for _, layer in adapted_layers(m):
        layer.lora_dropout.p = 0.0                 # the explicit path, without randomness
    ia, ta = m.encode_image(images), m.encode_text(tokens)
    grads_a = torch.autograd.grad(ia.sum() + ta.sum(), [p for _, p in params])
    for _, layer in adapted_layers(m):
        layer.lora_dropout = nn.Identity()         # the weight path
    ib, tb = m.encode_image(images), m.encode_text(tokens)
    grads_b = torch.autograd.grad(ib.sum() + tb.sum(), [p for _, p in params])
    assert_close_rel(ia, ib, reduction=TINY_REDUCTION, depth=TINY_DEPTH, what="dora paths image")
    assert_close_rel(ta, tb, reduction=TINY_REDUCTION, depth=TINY_DEPTH, what="dora paths text")
    # forward error, then backward through the same depth (2 x depth), as for LoRA
    assert all(g.abs().sum() > 0 for (n, _), g in zip(params, grads_b) if n.endswith(".m"))
    for (name, _), ga, gb in zip(params, grads_a, grads_b):
        assert_close_rel(ga, gb, reduction=TINY_REDUCTION, depth=2 * TINY_DEPTH, what=f"dora grad {name}")


@pytest.mark.numerics
def test_merge_writes_w_prime_and_fold_leaves_plain_open_clip(tiny):
    model, images, tokens = tiny
    from clipft_lora.layers import fold, merge, unmerge
    m, params = adapted(model, targets=ALL, dropout=0.25)
    perturb(params)
    m.eval()
    live_i, live_t = feats(m, images, tokens)
    # B ~ 0.2 and m moved by 10%: the features move by O(1), far above rounding
    assert not torch.allclose(live_i, feats(model, images, tokens)[0], atol=1e-3)
    attn = m.visual.transformer.resblocks[1].attn
    d = attn.embed_dim
    w, s = attn.in_proj_weight.detach().clone(), attn.lora_scale
    assert merge(m) == 4 * 2 + 8 * 2
    # the q block written is m * V / ||V||, V = W + s·BA, rows normalised over the input dimension
    q = attn.lora["q"]
    v = w[:d] + s * (q.B @ q.A)
    want = q.m[:, None] * v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
    assert_close_rel(attn.in_proj_weight[:d], want, reduction=d, depth=2, what="dora merged q block")
    mi, mt = feats(m, images, tokens)
    # exact: the live eval path computes the same W' and runs the same kernels on
    # it that the merged layer runs on its stored copy (in_proj and out_proj by
    # PyTorch's MHA forward, the MLP by F.linear)
    assert torch.equal(mi, live_i) and torch.equal(mt, live_t)
    unmerge(m)
    # exact: unmerge restores the weight saved at merge time (W is not recoverable from W')
    assert torch.equal(attn.in_proj_weight, w)
    assert torch.equal(feats(m, images, tokens)[0], live_i)
    base_sd = model.state_dict()
    fold(m)
    assert set(m.state_dict()) == set(base_sd)          # a plain open_clip state dict
    assert type(m.visual.transformer.resblocks[0].attn) is nn.MultiheadAttention
    assert type(m.transformer.resblocks[0].mlp.c_proj) is nn.Linear
    fi, ft = feats(m, images, tokens)
    assert torch.equal(fi, live_i) and torch.equal(ft, live_t)


def test_counts_are_lora_plus_one_magnitude_per_adapted_out_feature(invoke):
    def plan(strategy):
        r = invoke("plan", "--model", "tiny-vit", "--data", DATA, "--strategy", strategy, "--json")
        assert r.exit_code == 0, r.stderr
        return json.loads(r.stdout)["params"]["trainable"]
    d, r = 64, 2
    per_block_lora = 4 * (r * d + d * r) + (r * d + 4 * d * r) + (r * 4 * d + d * r)
    per_block_m = 4 * d + 4 * d + d     # q, k, v, out: d each; c_fc: 4d outputs; c_proj: d
    blocks = 8                           # 4 per tower
    lora = plan("lora:targets=q,k,v,out,mlp")
    dora = plan("lora:targets=q,k,v,out,mlp,dora=true")
    assert lora == blocks * per_block_lora
    assert dora == lora + blocks * per_block_m
    # the defaults (q, k, v in both towers): three d-vectors per block
    assert plan("lora:dora=true") - plan("lora") == blocks * 3 * d


def test_magnitudes_train_and_are_checkpointed(invoke, tmp_path):
    out = tmp_path / "run"
    r = invoke("run", "--model", "tiny-vit", "--data", DATA, "--strategy", "lora:dora=true,tower=vision",
               "--lr", "1e-2", "--batch-size", "16", "--callback", "none", "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    saved = load_file(str(out / "checkpoint" / "model.safetensors"))
    assert saved and all(".lora." in k for k in saved)
    ms = [k for k in saved if k.endswith(".m")]
    assert len(ms) == 4 * 3
    from clipft.models import load_model
    torch.manual_seed(0)
    base = load_model("tiny-vit", "none").model.state_dict()
    w = base["visual.transformer.resblocks.2.attn.in_proj_weight"]
    m0 = torch.linalg.vector_norm(w[64:128], dim=1)
    assert not torch.equal(saved["visual.transformer.resblocks.2.attn.lora.k.m"], m0)   # m trained


@pytest.mark.numerics
def test_resume_is_bit_exact(tmp_path, monkeypatch):
    from clipft.api import RunConfig
    conf = RunConfig(model="tiny-vit", data=DATA, batch_size=16, lr=1e-2, epochs=2,
                     strategies=["lora:dora=true,targets=q,v,mlp"], callbacks=["none"])
    r = crash_after_first_checkpoint_then_resume(conf, tmp_path, monkeypatch)
    first, resumed, whole, straight, crashed = r.first, r.resumed, r.whole, r.straight, r.crashed
    a = load_file(str(straight / "checkpoint" / "model.safetensors"))
    b = load_file(str(crashed / "checkpoint" / "model.safetensors"))
    # exact: the resumed epoch replays (weights, optimizer, RNG for LoRA dropout)
    # what the uninterrupted run computed
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(first[k], b[k]) for k in b)
    assert resumed["eval"]["after"] == whole["eval"]["after"]


@pytest.mark.numerics
def test_export_merges_and_equals_the_unmerged_run(tmp_path):
    from clipft import testing
    from clipft.commands.export import WEIGHTS
    reg = testing.plugin_registry()
    summary = testing.run_plugin(None, strategy="lora:dora=true,targets=q,k,v,out,mlp", steps=2,
                                 tmp_path=tmp_path, registry=reg, lr=1e-2)
    manifest = testing.assert_export_roundtrip(summary["run_dir"], tmp_path / "export", reg)
    assert manifest["plain_open_clip_drops"] == [] and manifest["merged_adapter_layers"] == 8 * 3
    loaded = testing.load_trained(summary["run_dir"], reg)        # unmerged: adapters live
    import open_clip
    plain = open_clip.create_model("tiny-vit", pretrained=str(tmp_path / "export" / WEIGHTS)).eval()
    g = torch.Generator().manual_seed(3)
    images = torch.randn(4, 3, 32, 32, generator=g)
    tokens = loaded.tokenizer(["a purple circle", "an orange square", "a photo of a red triangle.", "x"])
    with torch.no_grad():
        live = (loaded.model.encode_image(images), loaded.model.encode_text(tokens))
        merged = (plain.encode_image(images), plain.encode_text(tokens))
    # the merged W' is computed once (and stored) by the same function the live
    # path calls per forward; a freshly built open_clip model can take another
    # MHA kernel path (fast path and weight flags), so allow rounding per block
    for a, b, what in zip(live, merged, ("image", "text")):
        assert_close_rel(b, a, reduction=TINY_REDUCTION, depth=TINY_DEPTH, what=f"dora export {what}")


@pytest.mark.numerics
def test_dora_improves_zero_shot_on_a_new_task(invoke, tmp_path_factory, tmp_path):
    """Over 12 bases (peft_base.wanted) two epochs of DoRA reached 0.55-0.78:
    at least +0.25 over zero-shot on eleven, and 0.60 on the one whose zero-shot
    was already 0.65 (a loss of 0.04 there). Asked: a third of the smallest
    gain, or 0.5 (chance is 1/6)."""
    base = base_checkpoint(tmp_path_factory)
    out = tmp_path / "dora"
    r = invoke("run", "--model", "tiny-vit", "--pretrained", base["weights"], "--data", NOVEL_DATA,
               "--strategy", "lora:dora=true", "--lr", "1e-2", "--epochs", "2", "--batch-size", "32",
               "--callback", "none", "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    before, after = s["eval"]["before"]["top1"], s["eval"]["after"]["top1"]
    print(f"dora zero-shot top-1 on unseen colours: {before:.3f} -> {after:.3f}")
    assert after >= wanted(before, 0.08, 0.5), (before, after)
    assert after >= 0.5, after
