"""The seed's strategies as plugins: the anatomy they share, their selections on
every tower type, composition and its errors, runs and resumed runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import read_summary
from resume_check import crash_after_first_checkpoint_then_resume

STRATEGIES = ("freeze-vision", "freeze-text", "projections", "last-n", "logit-scale",
              "differential-lr", "reproject")
DATA = "shapes:n=32,val_n=16"
CONFIG_DIR = Path(__file__).parent / "model_configs"


@pytest.fixture(scope="module", autouse=True)
def setup_models():
    """Tiny configs registered; one intra-op thread (tiny models gain nothing
    from more, and a busy 2-core machine makes spinning threads very slow)."""
    import open_clip
    from clipft.models import register_tiny_configs

    register_tiny_configs()
    if "tiny-timm" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(name):
    import open_clip
    torch.manual_seed(0)
    return open_clip.create_model(name, pretrained=None)


VIT = dict(image_size=32, layers=2, width=32, head_width=16, patch_size=8)
TXT = dict(context_length=16, vocab_size=1000, width=32, heads=2, layers=3)


def custom_text_timm(proj):
    """CustomTextCLIP: a timm ViT tower (projection per ``proj``) and a text
    tower at ``model.text`` with an nn.Linear text_projection (SigLIP style)."""
    import open_clip
    torch.manual_seed(0)
    return open_clip.CustomTextCLIP(
        embed_dim=32, text_cfg=dict(TXT, proj_bias=True),
        vision_cfg=dict(timm_model_name="test_vit", timm_model_pretrained=False,
                        timm_pool="token", timm_proj=proj, image_size=160))


def coca():
    import open_clip
    torch.manual_seed(0)
    return open_clip.CoCa(
        embed_dim=32, text_cfg=dict(TXT, embed_cls=True, output_tokens=True),
        vision_cfg=dict(VIT, attentional_pool=True, attn_pooler_heads=2, output_tokens=True),
        multimodal_cfg=dict(context_length=16, vocab_size=1000, width=32, heads=2, layers=1))


class HFLikeText(nn.Module):
    """The layout of open_clip's HFTextEncoder (a BERT-style encoder, a pooler,
    ``proj``), without the Hugging Face download."""

    def __init__(self, layers=3, width=16, out=32):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.embeddings = nn.Embedding(100, width)
        self.transformer.encoder = nn.Module()
        self.transformer.encoder.layer = nn.ModuleList(
            nn.TransformerEncoderLayer(width, 2, 32, batch_first=True) for _ in range(layers))
        self.transformer.final_norm = nn.LayerNorm(width)
        self.proj = nn.Sequential(nn.Linear(width, 24), nn.GELU(), nn.Linear(24, out))

    def forward(self, tokens):
        x = self.transformer.embeddings(tokens)
        for layer in self.transformer.encoder.layer:
            x = layer(x)
        return self.proj(self.transformer.final_norm(x).mean(dim=1))


def hf_like():
    import open_clip
    torch.manual_seed(0)
    model = open_clip.CustomTextCLIP(embed_dim=32, vision_cfg=VIT, text_cfg=TXT)
    model.text = HFLikeText()
    return model


def ctx(model, name="test-model", seed=0):
    from types import SimpleNamespace
    return SimpleNamespace(model=model, model_name=name, seed=seed)


def apply(model, *refs):
    """Strategies through the real registry and composer, as a run applies them."""
    from clipft.api import make_registry
    from clipft.engine.compose import apply_strategies
    from clipft.options import build_options, parse_ref

    reg = make_registry()
    built = []
    for text in refs:
        ref = parse_ref(text)
        spec = reg.get("strategy", ref.name)
        built.append((spec.name, spec.build(build_options("strategy", spec, ref.options))))
    return apply_strategies(model, built, ctx(model))


def trainable(model) -> set:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def numel(model, names) -> int:
    ps = dict(model.named_parameters())
    return sum(ps[n].numel() for n in names)


# -- plugins -----------------------------------------------------------------------------
def test_each_strategy_is_its_own_distribution(invoke):
    r = invoke("plugins", "--json")
    assert r.exit_code == 0
    providers = {}
    for rec in json.loads(r.stdout)["plugins"]:
        for name in rec["provides"].get("strategy", []):
            providers.setdefault(name, []).append(rec)
    for name in STRATEGIES:
        (rec,) = providers[name]
        assert rec["distribution"] == f"clipft-{name}" and rec["status"] == "active"
        assert rec["provides"] == {"strategy": [name]}


def test_describe_gives_options_and_default_lr(invoke):
    r = invoke("describe", "strategy", "last-n", "--json")
    doc = json.loads(r.stdout)
    opts = {o["name"]: o for o in doc["options"]}
    assert opts["n"]["default"] == 2 and opts["tower"]["type"] == "vision|text|both"
    assert opts["projection"]["default"] is True
    assert doc["default_lr"] == 5e-5
    r = invoke("describe", "strategy", "differential-lr", "--json")
    assert {o["name"] for o in json.loads(r.stdout)["options"]} >= {"visual", "proj", "rates", "layer_decay"}


# -- anatomy -------------------------------------------------------------------------------
def partition_ok(model, a):
    names = [n for n, _ in model.named_parameters()]
    parts = list(a.vision.names) + list(a.text.names) + list(a.logit) + list(a.other)
    assert sorted(parts) == sorted(names)  # every parameter exactly once


def test_anatomy_vit_and_clip_text():
    from clipft.anatomy import describe
    m = build("tiny-vit")
    a = describe(m)
    partition_ok(m, a)
    v, t = a.vision, a.text
    assert (v.kind, v.depth, v.unit) == ("vit", 4, "block")
    assert v.blocks[-1] == tuple(f"visual.transformer.resblocks.3.{n}"
                                 for n, _ in m.visual.transformer.resblocks[3].named_parameters())
    assert v.final == ("visual.ln_post.weight", "visual.ln_post.bias")
    assert v.projection == ("visual.proj",) and v.projection_path == "visual.proj"
    assert set(v.stem) == {"visual.class_embedding", "visual.positional_embedding", "visual.conv1.weight",
                           "visual.ln_pre.weight", "visual.ln_pre.bias"}
    assert (t.kind, t.path, t.depth) == ("text-transformer", "", 4)   # CLIP keeps it on itself
    assert t.final == ("ln_final.weight", "ln_final.bias") and t.projection == ("text_projection",)
    assert set(t.stem) == {"token_embedding.weight", "positional_embedding"}
    assert a.logit == ("logit_scale",) and a.other == ()


def test_anatomy_modified_resnet():
    from clipft.anatomy import describe
    m = build("tiny-rn")
    a = describe(m)
    partition_ok(m, a)
    v = a.vision
    assert (v.kind, v.depth, v.unit) == ("modified-resnet", 4, "stage")
    assert all(n.startswith(f"visual.layer{i + 1}.") for i, b in enumerate(v.blocks) for n in b)
    assert v.projection == ("visual.attnpool.c_proj.weight", "visual.attnpool.c_proj.bias")
    assert set(v.final) == {n for n, _ in m.named_parameters()
                            if n.startswith("visual.attnpool.") and ".c_proj." not in n}


def test_anatomy_timm_tower_counts_timm_groups():
    from timm.models import group_parameters

    from clipft.anatomy import describe
    m = build("tiny-timm")
    a = describe(m)
    partition_ok(m, a)
    v = a.vision
    groups = group_parameters(m.visual.trunk, m.visual.trunk.group_matcher())
    # timm: group 0 is the stem, the last one head.norm (left to the head)
    assert groups[max(groups)] == ["head.norm.weight", "head.norm.bias"]
    assert v.kind == "timm" and v.depth == len(groups) - 2
    assert v.blocks[-1] == tuple(f"visual.trunk.{n}" for n in groups[max(groups) - 1])
    assert v.final == ("visual.trunk.head.norm.weight", "visual.trunk.head.norm.bias")
    assert v.projection == ("visual.head.proj.weight",)


def test_anatomy_custom_text_linear_projection_and_timm_classifier():
    from clipft.anatomy import describe
    m = custom_text_timm(proj=None)   # timm_proj null: the trunk's classifier projects
    a = describe(m)
    partition_ok(m, a)
    assert a.vision.projection == ("visual.trunk.head.weight", "visual.trunk.head.bias")
    assert a.vision.depth == 6   # test_vit: 6 blocks, the final norm inside the last group
    assert "visual.trunk.norm.weight" in a.vision.blocks[-1]
    t = a.text
    assert (t.path, t.depth) == ("text", 3)
    assert t.projection == ("text.text_projection.weight", "text.text_projection.bias")


def test_anatomy_coca_and_generic_text_tower():
    from clipft.anatomy import describe
    m = coca()
    a = describe(m)
    partition_ok(m, a)
    assert "visual.attn_pool.query" in a.vision.final
    assert a.text.path == "text" and a.text.projection == ("text.text_projection",)
    assert a.other and all(n.startswith("text_decoder.") for n in a.other)

    m = hf_like()
    a = describe(m)
    partition_ok(m, a)
    t = a.text
    assert (t.kind, t.depth) == ("generic", 3)
    assert t.stem == ("text.transformer.embeddings.weight",)
    assert t.final == ("text.transformer.final_norm.weight", "text.transformer.final_norm.bias")
    assert t.projection_path == "text.proj" and len(t.projection) == 4


# -- selections ------------------------------------------------------------------------------
def test_last_n_selects_last_blocks_final_and_projection_on_every_tower():
    for model, n in ((build("tiny-vit"), 1), (build("tiny-rn"), 2), (build("tiny-timm"), 3),
                     (custom_text_timm(None), 2)):
        from clipft.anatomy import describe
        a = describe(model)
        apply(model, f"last-n:n={n}")
        want = set()
        for t in (a.vision, a.text):
            want |= {x for b in t.blocks[-n:] for x in b} | set(t.final) | set(t.projection)
        assert trainable(model) == want


def test_last_n_options_tower_and_projection():
    m = build("tiny-rn")
    apply(m, "last-n:n=1,tower=vision,projection=false")
    got = trainable(m)
    assert got and all(n.startswith(("visual.layer4.", "visual.attnpool.")) for n in got)
    assert not any(".c_proj." in n for n in got)
    # ResNet: n counts stages plus the attention pool
    assert got == {n for n, _ in m.named_parameters()
                   if n.startswith(("visual.layer4.", "visual.attnpool.")) and ".c_proj." not in n}


@pytest.mark.parametrize("model,n,msg", [
    ("tiny-vit", 5, "vision tower (VisionTransformer): it has 4 blocks"),
    ("tiny-rn", 5, "vision tower (ModifiedResNet): it has 4 stages"),
    ("tiny-timm", 10, "it has 9 parameter groups"),
])
def test_last_n_beyond_depth_is_a_usage_error_that_gives_depth(invoke, model, n, msg):
    r = invoke("plan", "--model", model, "--data", DATA, "--strategy", f"last-n:n={n},tower=vision")
    assert r.exit_code == 2
    assert msg in r.stderr and "Traceback" not in r.stderr


def test_projections_on_each_tower_type_and_missing_projection():
    from clipft.errors import ClipftUsageError
    expect = {"tiny-vit": {"visual.proj"},
              "tiny-rn": {"visual.attnpool.c_proj.weight", "visual.attnpool.c_proj.bias"},
              "tiny-timm": {"visual.head.proj.weight"}}
    for name, vis in expect.items():
        m = build(name)
        apply(m, "projections")
        assert trainable(m) == vis | {"text_projection", "logit_scale"}
    m = custom_text_timm(None)
    apply(m, "projections:logit_scale=false")
    assert trainable(m) == {"visual.trunk.head.weight", "visual.trunk.head.bias",
                            "text.text_projection.weight", "text.text_projection.bias"}
    m = custom_text_timm("none")   # timm_proj='none': the trunk maps straight into the space
    with pytest.raises(ClipftUsageError, match="has no vision projection"):
        apply(m, "projections")
    apply(m, "projections:tower=text")  # the other tower still works
    assert trainable(m) == {"text.text_projection.weight", "text.text_projection.bias", "logit_scale"}


def test_freeze_strategies_and_logit_scale():
    m = build("tiny-vit")
    apply(m, "freeze-vision")
    names = {n for n, _ in m.named_parameters()}
    assert trainable(m) == {n for n in names if not n.startswith("visual.")}
    apply(m, "freeze-text:logit_scale=false")
    assert trainable(m) == {n for n in names if n.startswith("visual.")}
    apply(m, "freeze-vision:keep_projection=true", "projections")
    assert trainable(m) == {n for n in names if not n.startswith("visual.")} | {"visual.proj"}
    m = custom_text_timm("linear")
    m.logit_bias = nn.Parameter(torch.zeros(()))   # SigLIP-style bias
    apply(m, "logit-scale")
    assert trainable(m) == {"logit_scale", "logit_bias"}


@pytest.mark.parametrize("refs,needles", [
    (("freeze-vision", "freeze-text"), ("'freeze-vision' and 'freeze-text' contradict",)),
    (("last-n", "freeze-vision"), ("'freeze-vision' and 'last-n' contradict", "visual.")),
    (("freeze-vision", "projections"), ("keeps visual.proj frozen", "'projections' trains it")),
    (("freeze-vision", "full"), ("'freeze-vision' and 'full' contradict",)),
    (("projections", "reproject:dim=16"), ("'reproject' replaced parameters", "'projections'",
                                           "list 'reproject' before 'projections'")),
    (("differential-lr:visual=0.1",), ("'differential-lr' only rescales",)),
    (("last-n", "last-n:n=1"), ("given twice",)),
])
def test_contradictions_name_both_strategies(invoke, refs, needles):
    args = [a for r in refs for a in ("--strategy", r)]
    r = invoke("plan", "--model", "tiny-vit", "--data", DATA, *args)
    assert r.exit_code == 2, r.stderr
    for needle in needles:
        assert needle in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("ref,needle", [
    ("reproject", "reproject needs the new embedding dimension"),
    ("reproject:dim=0", "dim must be a positive integer"),
    ("last-n:n=0", "n must be at least 1"),
    ("last-n:tower=image", "must be one of vision, text, both"),
    ("differential-lr", "give at least one multiplier"),
    ("differential-lr:visual=0", "visual must be a positive number"),
    ("differential-lr:layer_decay=1.5", "layer_decay must be in (0, 1]"),
    ("differential-lr:rates=resblocks", "must look like PATTERN:MULTIPLIER"),
    ("differential-lr:rates=res[:2", "invalid regular expression"),
    ("projections:towers=both", "has no option 'towers'"),
])
def test_bad_options_are_usage_errors(invoke, ref, needle):
    r = invoke("plan", "--model", "tiny-vit", "--data", DATA, "--strategy", "last-n", "--strategy", ref)
    assert r.exit_code == 2
    assert needle in r.stderr, r.stderr


def test_differential_lr_rules_and_layer_decay():
    from clipft.engine.compose import build_groups
    m = build("tiny-vit")
    sels = apply(m, "last-n:n=2", "differential-lr:visual=0.1,proj=10,rates=resblocks\\.2\\.mlp:3,"
                                  "layer_decay=0.5")
    lr = {n: s.lr_scale for s in sels for n, _ in s.params}
    assert set(lr) == trainable(m)
    assert lr["visual.proj"] == 10 and lr["text_projection"] == 10        # proj beats visual
    assert lr["visual.ln_post.weight"] == pytest.approx(0.1)              # final: decay**0
    assert lr["visual.transformer.resblocks.3.attn.in_proj_weight"] == pytest.approx(0.05)
    assert lr["visual.transformer.resblocks.2.attn.in_proj_weight"] == pytest.approx(0.025)
    assert lr["visual.transformer.resblocks.2.mlp.c_fc.weight"] == pytest.approx(3 * 0.25)  # pattern wins
    assert lr["transformer.resblocks.3.ln_1.weight"] == pytest.approx(0.5)   # CLIP's text tower
    assert lr["ln_final.weight"] == 1.0
    groups = build_groups(sels, base_lr=1e-3, weight_decay=0.0)
    assert {g.name: g.lr for g in groups}["vision.proj*10"] == pytest.approx(1e-2)


def test_differential_lr_changes_rates_only():
    from clipft.errors import ClipftUsageError
    m = build("tiny-rn")
    apply(m, "projections")
    base = trainable(m)
    apply(m, "projections", "differential-lr:visual=0.1,layer_decay=0.8")
    assert trainable(m) == base
    with pytest.raises(ClipftUsageError, match="text matches none of the parameters selected"):
        apply(m, "last-n:tower=vision,projection=false", "differential-lr:text=2")


@pytest.mark.parametrize("make", [lambda: build("tiny-vit"), lambda: build("tiny-rn"),
                                  lambda: build("tiny-timm"), lambda: custom_text_timm(None),
                                  hf_like, coca])
def test_reproject_new_dimension_on_every_projection_type(make):
    from clipft.anatomy import describe
    from clipft.encode import infer_embed_dim
    m = make()
    before = {n: p for n, p in m.named_parameters()}
    sels = apply(m, "reproject:dim=12")
    new = {n: p for s in sels for n, p in s.params}
    assert trainable(m) == set(new)
    a = describe(m)
    assert set(new) == set(a.vision.projection) | set(a.text.projection)
    fresh = []
    for n, p in new.items():
        if p is before.get(n):
            continue          # kept: the layers of an MLP projection before its last Linear
        fresh.append(n)
        if p.ndim == 2:
            width = p.shape[0] if n.endswith(("proj", "projection")) else p.shape[1]
            assert 12 in p.shape
            assert p.std().item() == pytest.approx(width ** -0.5, rel=0.35)
        else:
            assert torch.all(p == 0)            # a new Linear's bias starts at zero
    assert len(fresh) >= 2
    if isinstance(getattr(m, "text", None), HFLikeText):
        assert "text.proj.2.weight" in fresh and "text.proj.0.weight" not in fresh
    size = m.visual.image_size if isinstance(m.visual.image_size, int) else m.visual.image_size[0]
    with torch.no_grad():
        img = m.encode_image(torch.randn(2, 3, size, size))
        length = getattr(m, "context_length", None) or 16
        txt = m.encode_text(torch.randint(1, 99, (2, length)))
    assert img.shape == (2, 12) and txt.shape == (2, 12)
    assert infer_embed_dim(m) == 12   # what heads are built for

def test_reproject_is_seeded_by_the_run_seed():
    a, b, c = build("tiny-vit"), build("tiny-vit"), build("tiny-vit")
    from clipft.engine.compose import apply_strategies
    from clipft_reproject import Reproject, ReprojectOptions
    for m, seed in ((a, 3), (b, 3), (c, 4)):
        apply_strategies(m, [("reproject", Reproject(ReprojectOptions(dim=8)))], ctx(m, seed=seed))
    assert torch.equal(a.visual.proj, b.visual.proj)
    assert not torch.equal(a.visual.proj, c.visual.proj)


def test_plan_with_head_follows_reprojected_dimension(invoke):
    r = invoke("plan", "--model", "tiny-rn", "--data", DATA, "--strategy", "reproject:dim=16",
               "--head", "linear", "--json")
    assert r.exit_code == 0, r.stderr
    p = json.loads(r.stdout)
    head = [g for g in p["groups"] if g["name"].startswith("head")]
    assert sum(g["params"] for g in head) == 16 * 9 + 9   # 9 shapes classes
    vis = sum(g["params"] for g in p["groups"] if g["name"].startswith("vision.proj"))
    rn = build("tiny-rn")
    assert vis == rn.visual.attnpool.c_proj.in_features * 16 + 16


# -- runs ------------------------------------------------------------------------------------
def test_run_last_n_contrastive_works_as_documented(invoke, tmp_path):
    out = tmp_path / "run"
    r = invoke("run", "--strategy", "last-n", "--loss", "contrastive", "--data", DATA,
               "--batch-size", "16", "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    m = build("tiny-vit")  # the default model
    want = sum(p.numel() for blk in (m.visual.transformer.resblocks[-2:], m.transformer.resblocks[-2:])
               for p in blk.parameters())
    want += sum(p.numel() for p in (*m.visual.ln_post.parameters(), *m.ln_final.parameters(),
                                   m.visual.proj, m.text_projection))
    assert s["params"]["trainable"] == want
    assert s["strategies"] == [{"name": "last-n", "n": 2, "tower": "both", "projection": True}]
    assert 0.0 <= s["eval"]["after"]["top1"] <= 1.0 and s["train"]["steps"] == 2


def tensors(run_dir):
    return load_file(str(run_dir / "checkpoint" / "model.safetensors"))


@pytest.mark.numerics
@pytest.mark.parametrize("model,strategies", [
    ("tiny-vit", ["reproject:dim=16"]),
    ("tiny-rn", ["last-n:n=1", "differential-lr:visual=0.5"]),
])
def test_checkpoints_resume_and_evaluate_exactly(tmp_path, monkeypatch, model, strategies):
    """A 2-epoch run that dies after its first checkpoint, resumed, ends with
    the tensors and evaluation of the same run left uninterrupted."""
    from clipft.api import RunConfig

    conf = RunConfig(model=model, data=DATA, batch_size=16, lr=1e-3, epochs=2, strategies=strategies)
    r = crash_after_first_checkpoint_then_resume(conf, tmp_path, monkeypatch)
    straight, resumed, one = r.straight, r.crashed, r.first
    a, b = tensors(straight), tensors(resumed)
    assert a.keys() == b.keys()
    # exact: the resumed epoch replays from the checkpoint (weights, optimizer and
    # RNG state, BatchNorm statistics) what the uninterrupted run computed
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(one[k], b[k]) for k in one)        # the resumed epoch trained
    sa, sb = read_summary(straight), read_summary(resumed)
    assert sb["train"]["steps"] == sa["train"]["steps"] == 4
    assert sb["eval"]["after"] == sa["eval"]["after"]
    if "reproject" in strategies[0]:
        assert a["visual.proj"].shape == (64, 16) and a["text_projection"].shape == (64, 16)
        assert "visual.transformer.resblocks.0.attn.in_proj_weight" not in a   # frozen: not saved
    else:
        assert all(k.startswith(("visual.layer4.", "visual.attnpool.", "transformer.resblocks.3.",
                                 "ln_final.", "text_projection")) for k in a)
        assert "visual.layer4.0.bn1.running_mean" in a   # trained BatchNorm keeps its statistics


def test_strategies_from_toml_tables(invoke, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('model = "tiny-vit"\nlr = 0.001\n[data]\nname = "shapes"\nn = 32\nval_n = 16\n'
                   '[[strategy]]\nname = "last-n"\nn = 1\ntower = "vision"\n'
                   '[[strategy]]\nname = "differential-lr"\nrates = ["ln_post:2", "resblocks\\\\.3\\\\.mlp:0.5"]\n')
    r = invoke("plan", "--config", cfg, "--json")
    assert r.exit_code == 0, r.stderr
    lr = {g["name"]: g["lr"] for g in json.loads(r.stdout)["groups"]}
    assert lr["vision.last1*2/no_decay"] == pytest.approx(2e-3)
    assert lr["vision.last1*0.5"] == pytest.approx(5e-4)
    assert lr["vision.last1"] == pytest.approx(1e-3)
