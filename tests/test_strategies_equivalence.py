"""Each strategy, K steps through clipft == the same K steps in a hand-written
loop in the style of the seed guide (same model, seed, data order, optimizer).

The reference loop never touches clipft's strategies or anatomy: it freezes and
unfreezes with the seed's own idioms (``for p in model.visual.parameters():
p.requires_grad = False``), written out per tower type, and builds its AdamW
param groups by hand. Afterwards:

- both sides train exactly the same set of parameters;
- the trainable parameters match bit for bit (and did move);
- every frozen parameter is bit-identical to its initial value, on both sides.

Covered: tiny-vit (VisionTransformer), tiny-rn (ModifiedResNet) and tiny-timm
(a timm ConvNeXt tower built offline, tests/model_configs/tiny-timm.json).
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

K = 3            # optimizer steps
BATCH = 16
SEED = 11
LR = 1e-3        # large enough that every trainable tensor visibly moves in K steps
WD = 0.1
BETAS, EPS = (0.9, 0.98), 1e-6   # clipft's AdamW settings (CLIP's)
# Exact, not a tolerance: both loops run the same open_clip modules, the same loss
# expression and the same implementation of torch's AdamW (clipft's default on
# the CPU is the fused kernel, ``--optimizer-impl auto``; the reference loop asks
# for it with ``fused=True``; ``for-loop`` is checked against torch's for-loop
# AdamW) on the same batches in the same process, so the same kernels see the
# same inputs; any difference means the loops differ. Fused and for-loop AdamW
# round differently; tests/test_optim.py bounds that difference.
EXACT = 0.0
CONFIG_DIR = Path(__file__).parent / "model_configs"
MODELS = ("tiny-vit", "tiny-rn", "tiny-timm")


@pytest.fixture(scope="module", autouse=True)
def tiny_timm_config():
    import open_clip
    from clipft.models import register_tiny_configs

    register_tiny_configs()
    if "tiny-timm" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


pytestmark = pytest.mark.usefixtures("one_thread")




# -- the seed-style reference ---------------------------------------------------------------
def image_projection(model) -> list:
    """Seed Strategy 4's ``model.visual.proj``, wherever the tower keeps it."""
    v = model.visual
    if hasattr(v, "attnpool"):          # ModifiedResNet
        return list(v.attnpool.c_proj.parameters())
    if hasattr(v, "trunk"):             # timm tower, timm_proj='linear'
        return list(v.head.proj.parameters())
    return [v.proj]                     # VisionTransformer


def image_units(model) -> tuple[list, list]:
    """(depth units from input to output, final part) of the image tower, as
    lists of parameter lists (seed Strategy 5's ``resblocks``)."""
    v = model.visual
    if hasattr(v, "transformer"):
        return [list(b.parameters()) for b in v.transformer.resblocks], list(v.ln_post.parameters())
    if hasattr(v, "attnpool"):
        stages = [list(getattr(v, f"layer{i}").parameters()) for i in range(1, 5)]
        c_proj = {id(p) for p in v.attnpool.c_proj.parameters()}
        return stages, [p for p in v.attnpool.parameters() if id(p) not in c_proj]
    from timm.models import group_parameters
    groups = group_parameters(v.trunk, v.trunk.group_matcher(), return_values=True)
    ids = sorted(groups)
    names = group_parameters(v.trunk, v.trunk.group_matcher())
    # timm's ConvNeXt: group 0 is the stem; the last group is head.norm, the
    # final norm the matcher leaves to the head; the groups between are units
    assert names[ids[-1]] == ["head.norm.weight", "head.norm.bias"]
    return [groups[i] for i in ids[1:-1]], groups[ids[-1]]


def text_units(model) -> tuple[list, list]:
    return [list(b.parameters()) for b in model.transformer.resblocks], list(model.ln_final.parameters())


def set_trainable(params, flag=True):
    for p in params:
        p.requires_grad = flag


def seed_freeze_vision(model, **_):
    # Strategy 2: freeze the vision encoder, everything else trains
    for p in model.parameters():
        p.requires_grad = True
    for p in model.visual.parameters():
        p.requires_grad = False


def seed_freeze_text(model, **_):
    # Strategy 3, with the whole text tower frozen (CLIP keeps its parts on itself)
    for p in model.parameters():
        p.requires_grad = True
    for part in (model.transformer, model.token_embedding, model.ln_final):
        set_trainable(part.parameters(), False)
    model.positional_embedding.requires_grad = False
    model.text_projection.requires_grad = False


def seed_projections(model, **_):
    # Strategy 4
    for p in model.parameters():
        p.requires_grad = False
    set_trainable(image_projection(model))
    model.text_projection.requires_grad = True
    model.logit_scale.requires_grad = True


def seed_last_n(model, n=2, **_):
    # Strategy 5, both towers, with the final norms and projections
    for p in model.parameters():
        p.requires_grad = False
    for units, final in (image_units(model), text_units(model)):
        for i, block in enumerate(units):
            set_trainable(block, i >= len(units) - n)
        set_trainable(final)
    set_trainable(image_projection(model))
    model.text_projection.requires_grad = True


def seed_logit_scale(model, **_):
    # Strategy 9
    for p in model.parameters():
        p.requires_grad = False
    model.logit_scale.requires_grad = True


def seed_reproject(model, init, dim, **_):
    # Step 6, with the projections oriented as open_clip applies them
    # (x @ proj, so [width, dim]); the initial values are clipft's, copied
    for p in model.parameters():
        p.requires_grad = False
    v = model.visual
    if hasattr(v, "attnpool"):
        old = v.attnpool.c_proj
        v.attnpool.c_proj = nn.Linear(old.in_features, dim)
        new = {"visual.attnpool.c_proj.weight": v.attnpool.c_proj.weight,
               "visual.attnpool.c_proj.bias": v.attnpool.c_proj.bias}
    elif hasattr(v, "trunk"):
        old = v.head.proj
        v.head.proj = nn.Linear(old.in_features, dim, bias=False)
        new = {"visual.head.proj.weight": v.head.proj.weight}
    else:
        v.proj = nn.Parameter(torch.empty(v.proj.shape[0], dim))
        new = {"visual.proj": v.proj}
    model.text_projection = nn.Parameter(torch.empty(model.text_projection.shape[0], dim))
    new["text_projection"] = model.text_projection
    with torch.no_grad():
        for name, p in new.items():
            p.copy_(init[name])


SEED_RECIPES = {
    "freeze-vision": seed_freeze_vision,
    "freeze-text": seed_freeze_text,
    "projections": seed_projections,
    "last-n": seed_last_n,
    "logit-scale": seed_logit_scale,
    "reproject": seed_reproject,
}


def differential_lr_groups(model) -> list:
    """Strategy 8 by hand, for last-n:n=2 + differential-lr:visual=0.1,proj=10,
    layer_decay=0.5: (params, lr multiplier) per part."""
    out = [(image_projection(model), 10.0), ([model.text_projection], 10.0)]
    (v_units, v_final), (t_units, t_final) = image_units(model), text_units(model)
    out += [(v_units[-1], 0.1 * 0.5), (v_units[-2], 0.1 * 0.25), (v_final, 0.1)]
    out += [(t_units[-1], 0.5), (t_units[-2], 0.25), (t_final, 1.0)]
    return out


def clip_contrastive_loss(image_features, text_features, logit_scale):
    # Step 8
    logits_per_image = logit_scale * image_features @ text_features.t()
    logits_per_text = logits_per_image.t()
    ground_truth = torch.arange(len(logits_per_image))
    loss_i = F.cross_entropy(logits_per_image, ground_truth)
    loss_t = F.cross_entropy(logits_per_text, ground_truth)
    return (loss_i + loss_t) / 2


def reference_run(model_name, recipe, batches, init, impl="fused", **kw):
    import open_clip

    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=None, device="cpu")
    tokenizer = open_clip.get_tokenizer(model_name)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    same = [n for n in start if n in init and start[n].shape == init[n].shape]
    assert same and all(torch.equal(start[n], init[n]) for n in same), "not the same model as clipft's"

    if recipe == "differential-lr":
        seed_last_n(model, n=2)
        lr_parts = differential_lr_groups(model)
    else:
        SEED_RECIPES[recipe](model, init=init, **kw)
        lr_parts = [([p for p in model.parameters() if p.requires_grad], 1.0)]
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for params, mult in lr_parts:
        # CLIP's recipe: no weight decay on 1-d tensors (biases, norms, logit
        # scale) and positional embeddings
        decay = [p for p in params if p.ndim >= 2 and "positional_embedding" not in names[id(p)]]
        no_decay = [p for p in params if not (p.ndim >= 2 and "positional_embedding" not in names[id(p)])]
        groups += [{"params": decay, "lr": LR * mult, "weight_decay": WD},
                   {"params": no_decay, "lr": LR * mult, "weight_decay": 0.0}]
    flags = {"fused": dict(fused=True), "for-loop": dict(foreach=False)}[impl]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=LR, betas=BETAS, eps=EPS, **flags)

    model.train()
    for m in model.modules():  # frozen BatchNorm keeps its running statistics
        if isinstance(m, nn.BatchNorm2d) and not any(p.requires_grad for p in m.parameters()):
            m.eval()
    for batch in batches:
        image_features = model.encode_image(batch["images"])
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = model.encode_text(tokenizer(batch["captions"]))
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        loss = clip_contrastive_loss(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if model.logit_scale.requires_grad:
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
    return model


# -- clipft ----------------------------------------------------------------------------
def clipft_run(tmp_path, registry, model_name, strategies, impl="auto"):
    from clipft.api import RunConfig
    from clipft.engine.prepare import prepare
    from clipft.engine.session import train_run as train
    from clipft.progress import Silent

    cfg = RunConfig(model=model_name, pretrained="none", strategies=strategies,
                    data=f"shapes:n={K * BATCH},val_n=8", loss="contrastive:duplicates=ignore",
                    epochs=1, batch_size=BATCH, lr=LR, weight_decay=WD, schedule="constant",
                    warmup_steps=0, grad_clip=0.0, seed=SEED, device="cpu", cache=False,
                    optimizer_impl=impl, trim_text=False)   # the seed loop encodes all 77 positions
    run = prepare(cfg, registry)
    init = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    batches = list(run.loaders.train(0))
    assert len(batches) == K
    stats = train(run, tmp_path, Silent())
    assert stats.step == K
    return run.model, init, batches


CASES = {
    "freeze-vision": (["freeze-vision"], {}),
    "freeze-text": (["freeze-text"], {}),
    "projections": (["projections"], {}),
    "last-n": (["last-n:n=2"], {}),
    "logit-scale": (["logit-scale"], {}),
    "differential-lr": (["last-n:n=2", "differential-lr:visual=0.1,proj=10,layer_decay=0.5"], {}),
    "reproject": (["reproject:dim=16"], {"dim": 16}),
}


@pytest.mark.numerics
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("strategy", list(CASES))
def test_matches_seed_style_loop(tmp_path, registry, model_name, strategy):
    check_against_reference(tmp_path, registry, model_name, strategy, "auto", "fused")


@pytest.mark.numerics
@pytest.mark.parametrize("strategy", ["last-n", "differential-lr"])
def test_reference_optimizer_switch(tmp_path, registry, strategy):
    """``--optimizer-impl for-loop`` is torch's reference AdamW, step for step."""
    check_against_reference(tmp_path, registry, "tiny-vit", strategy, "for-loop", "for-loop")


def check_against_reference(tmp_path, registry, model_name, strategy, ours_impl, ref_impl):
    strategies, kw = CASES[strategy]
    ours, init, batches = clipft_run(tmp_path, registry, model_name, strategies, impl=ours_impl)
    ref = reference_run(model_name, strategy, batches, init, impl=ref_impl, **kw)

    ours_p, ref_p = dict(ours.named_parameters()), dict(ref.named_parameters())
    assert ours_p.keys() == ref_p.keys()
    trainable = {n for n, p in ours_p.items() if p.requires_grad}
    assert trainable == {n for n, p in ref_p.items() if p.requires_grad}
    assert trainable and len(trainable) < len(ours_p)

    diffs, moved = {}, {}
    for n in trainable:
        assert ours_p[n].shape == ref_p[n].shape
        diffs[n] = (ours_p[n] - ref_p[n]).abs().max().item()
        moved[n] = (ours_p[n] - init[n]).abs().max().item()
    worst = max(diffs, key=diffs.get)
    print(f"\n{model_name:9s} {strategy:15s} trainable tensors {len(trainable):3d}  "
          f"max |clipft - seed loop| = {diffs[worst]:.3g} ({worst})")
    assert diffs[worst] == EXACT, worst
    # the steps did train: every tensor moved, except attention key biases,
    # whose gradient is zero in exact arithmetic (softmax ignores a shift
    # shared by all keys); ConvNeXt's layer scale (init 1e-6) makes some
    # updates tiny, so "moved" means changed at all
    still = [n for n, m in moved.items() if m == 0 and not n.endswith("k_proj.bias")]
    assert not still and max(moved.values()) > 1e-4, still
    for n, p in ours_p.items():
        if n not in trainable:
            assert torch.equal(p, init[n]), f"clipft changed frozen {n}"
            assert torch.equal(ref_p[n], init[n]), f"reference changed frozen {n}"
