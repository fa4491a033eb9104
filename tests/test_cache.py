"""Frozen-tower caching: cached and live runs train the same parameters, the
cache is used where (and only where) a tower or prefix is frozen, hits are
counted, the on-disk cache is reused and keyed, and --no-cache runs live."""
import contextlib
import json
from unittest import mock

import attrs
import pytest
import torch

import clipft
from clipft.config import RunConfig
from clipft.options import ComponentRef
from clipft.specs import Selection, StrategySpec

# Exact, not a tolerance: a cached run is a replay. The first epoch computes the
# frozen prefix with the kernels, mode, precision and batches of a live run and
# stores it; the live suffix runs the same operations on the same values. So
# cached and live runs agree bit for bit (checked on AVX-512, AVX2 and scalar
# ATen kernels and MKL's AVX2 path by make test-numerics).
EXACT = 0.0
N_TRAIN, N_VAL = 32, 16
DATA = f"shapes:n={N_TRAIN},val_n={N_VAL}"


pytestmark = pytest.mark.usefixtures("one_thread")


@attrs.frozen
class PickOptions:
    prefixes: tuple = attrs.field(default=(), metadata={"help": "parameter-name prefixes that train"})
    live: tuple = attrs.field(default=(), metadata={"help": "towers kept out of the cache"})


class Pick(clipft.Strategy):
    """Test strategy: trains exactly the parameters whose names start with one of
    ``prefixes`` (so these tests need no strategy plugin)."""

    def __init__(self, opts):
        self.prefixes = tuple(opts.prefixes)
        self.live = tuple(opts.live)

    def live_towers(self, model, ctx):
        return self.live

    def apply(self, model, ctx):
        params = [(n, p) for n, p in model.named_parameters() if n.startswith(self.prefixes)]
        assert params, f"no parameter matches {self.prefixes}"
        return [Selection("picked", params)]


class ClassBias(clipft.ClassTextEncoder, torch.nn.Module):
    """A minimal class-prompt encoder (what prompt tuning installs): class
    prompts through the frozen text tower, plus a trainable offset."""

    def __init__(self, dim):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(dim))

    def forward(self, model, tokenizer, classnames, templates):
        tokens = tokenizer([templates[0].format(c) for c in classnames]).to(self.bias.device)
        return model.encode_text(tokens) + self.bias


class InstallClassBias(clipft.Strategy):
    def __init__(self, opts):
        pass

    def apply(self, model, ctx):
        encoder = ClassBias(ctx.embed_dim)
        slot = clipft.install(model, encoder)
        return [Selection("class-bias", [(f"{slot}.bias", encoder.bias)])]


class NoisyFrozenBlock(clipft.Strategy):
    """Trains the ViT projection and puts dropout (no parameters) at the end of
    the frozen block 0's MLP: random in train mode, the identity in eval mode."""

    def __init__(self, opts):
        pass

    def apply(self, model, ctx):
        model.visual.transformer.resblocks[0].mlp.add_module("drop", torch.nn.Dropout(0.5))
        return [Selection("proj", [("visual.proj", model.visual.proj)])]


class PickPlugin:
    @clipft.hookimpl
    def clipft_register_strategies(self, register):
        register(StrategySpec(name="pick", summary="test: train named parameters", options=PickOptions,
                              build=Pick, default_lr=1e-3))
        register(StrategySpec(name="class-bias", summary="test: a trainable class-prompt encoder",
                              build=InstallClassBias, default_lr=1e-2))
        register(StrategySpec(name="noisy-block", summary="test: dropout in a frozen block",
                              build=NoisyFrozenBlock, default_lr=1e-3))


#: in-process plugins the conftest ``registry`` fixture adds to the installed ones
PLUGINS = [PickPlugin()]


def pick(*prefixes):
    return ComponentRef("pick", {"prefixes": list(prefixes)})


def train_run(registry, tmp_path, name, cache=True, memory_budget=None, **kw):
    """Prepare and train in-process; returns (run, summary, trained tensors)."""
    from clipft.engine.prepare import prepare
    from clipft.engine.session import build_summary, train_run as train
    from clipft.progress import Silent

    cfg = RunConfig(**{"model": "tiny-vit", "data": DATA, "epochs": 2, "batch_size": 16,
                       "loss": "contrastive", **kw}, cache=cache)
    budget = (mock.patch("clipft.engine.prepare.memory_budget_bytes", return_value=memory_budget)
              if memory_budget is not None else contextlib.nullcontext())
    with budget:
        run = prepare(cfg, registry)
    out = tmp_path / name
    out.mkdir()
    stats = train(run, out, Silent())
    summary = build_summary(run, stats, out)
    trained = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    if run.head is not None:
        trained.update({f"head.{n}": p.detach().clone() for n, p in run.head.named_parameters()})
    return run, summary, trained


def max_diff(a, b):
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


CASES = {
    # name: (run options, expected image cut, text cached?)
    "linear-head": (dict(loss="cross-entropy", head="linear"), "output", True),
    "vit-proj": (dict(strategies=[pick("visual.proj")]), "pre-proj", True),
    "vit-last-block": (dict(strategies=[pick("visual.transformer.resblocks.3", "visual.ln_post",
                                             "visual.proj")]), "blocks:3", True),
    "rn-proj": (dict(model="tiny-rn", strategies=[pick("visual.attnpool.c_proj")]), "pre-proj", True),
    "logit-scale": (dict(strategies=[pick("logit_scale")]), "output", True),
    "vit-proj-bf16": (dict(strategies=[pick("visual.proj")], precision="bf16"), "pre-proj", True),
    # the text side trains (live text, cached image prefix), captions trimmed
    "text-trimmed": (dict(strategies=[pick("visual.proj", "transformer.resblocks.3")], trim_text=True),
                     "pre-proj", False),
}


@pytest.mark.numerics
@pytest.mark.parametrize("case", list(CASES))
def test_cached_and_live_runs_train_the_same_parameters(registry, tmp_path, case):
    from clipft.engine.cache.provider import CachedFeatures
    from clipft.engine.features import LiveFeatures

    kw, cut, text = CASES[case]
    run_c, sum_c, cached = train_run(registry, tmp_path, "cached", **kw)
    run_l, sum_l, live = train_run(registry, tmp_path, "live", cache=False, **kw)
    assert isinstance(run_c.features, CachedFeatures) and type(run_l.features) is LiveFeatures
    assert run_c.features.stats["image"].startswith(cut + " ")
    assert run_c.features.stats["text"].startswith("on" if text else "off")
    assert run_c.features.stats["image_hits"] > 0
    assert max_diff(cached, live) == EXACT
    assert sum_c["train"]["final_loss"] == sum_l["train"]["final_loss"]      # replay: exact
    assert sum_c["eval"]["after"] == sum_l["eval"]["after"]
    assert "cache" in sum_c and "cache" not in sum_l


@pytest.mark.numerics
def test_class_prompt_encoder_keeps_class_prompts_live_but_caches_captions(registry, tmp_path):
    kw = dict(strategies=[ComponentRef("class-bias")])
    run_c, sum_c, cached = train_run(registry, tmp_path, "cached", **kw)
    _, sum_l, live = train_run(registry, tmp_path, "live", cache=False, **kw)
    stats = run_c.features.stats
    assert stats["text"].startswith("on") and stats["class_prompts"].startswith("off")
    assert stats["image"].startswith("output ")
    assert max_diff(cached, live) == EXACT and float(cached["clipft_class_text.bias"].abs().max()) > 0
    assert sum_c["eval"]["after"] == sum_l["eval"]["after"]


def test_trained_parameters_change(registry, tmp_path):
    """Guards the equivalence test: training moves what it trains."""
    from clipft.engine.prepare import prepare
    run0 = prepare(RunConfig(model="tiny-vit", data=DATA, strategies=[pick("visual.proj")]), registry)
    before = run0.model.visual.proj.detach().clone()
    _, _, after = train_run(registry, tmp_path, "moved", strategies=[pick("visual.proj")])
    # AdamW moves each weight by ~lr (1e-3) per step, 4 steps; rounding is ~1e-8
    assert float((after["visual.proj"] - before).abs().max()) > 1e-4


def test_cache_hits_and_misses_are_counted(registry, tmp_path):
    run, summary, _ = train_run(registry, tmp_path, "hits", loss="cross-entropy", head="linear")
    c = summary["cache"]
    n_train, n_val, epochs, evals = N_TRAIN, N_VAL, 2, 3    # eval before training and after each epoch
    assert c["image_misses"] == n_train + n_val      # each image embedded once
    # the first epoch fills the train cache as it goes; later epochs replay it
    assert c["image_hits"] == (epochs - 1) * n_train + evals * n_val
    classes = len(run.bundle.classnames)
    captions = len(set(run.bundle.val[i][2] for i in range(n_val)))
    assert c["text_misses"] == classes + captions    # class prompts and val captions, once
    assert c["text_hits"] == (evals - 1) * (classes + captions)
    assert c["hits"] == c["image_hits"] + c["text_hits"]
    assert c["build_seconds"] > 0
    assert summary["train"]["samples_per_s"] > 0 and summary["train"]["peak_rss_mb"] > 0


def test_eval_reuses_cached_features_without_running_the_towers(registry, tmp_path):
    run, _, _ = train_run(registry, tmp_path, "eval", loss="cross-entropy", head="linear", epochs=1)
    calls = []
    hooks = [run.model.visual.register_forward_hook(lambda *a: calls.append("image")),
             run.model.transformer.register_forward_hook(lambda *a: calls.append("text"))]
    try:
        metrics = run.evaluate()
    finally:
        for h in hooks:
            h.remove()
    assert calls == [] and "top1" in metrics and "recall@1" in metrics


@pytest.mark.numerics
def test_on_disk_cache_is_reused_and_keyed(registry, tmp_path):
    cache_dir = tmp_path / "cache"
    kw = dict(loss="cross-entropy", head="linear", cache_dir=str(cache_dir))
    _, first, p1 = train_run(registry, tmp_path, "disk1", **kw)
    _, second, p2 = train_run(registry, tmp_path, "disk2", **kw)
    assert first["cache"]["loaded_from_disk"] == 0 and first["cache"]["image_misses"] == N_TRAIN + N_VAL
    assert second["cache"]["loaded_from_disk"] == N_TRAIN + N_VAL and second["cache"]["image_misses"] == 0
    assert max_diff(p1, p2) == EXACT       # the second run replays the first's stored features
    assert sorted(d.name.split("-")[0] for d in cache_dir.iterdir()) == ["train", "val"]
    meta = json.loads(next(cache_dir.glob("train-*/meta.json")).read_text())
    assert meta["key"]["cut"] == "output" and meta["n"] == N_TRAIN
    # other data (a different generator seed) is a different key, never a stale hit
    _, third, _ = train_run(registry, tmp_path, "disk3", **{**kw, "data": DATA + ",seed=1"})
    assert third["cache"]["loaded_from_disk"] == 0
    assert len(list(cache_dir.iterdir())) == 4


@pytest.mark.numerics
@pytest.mark.parametrize("damage", ["zeroed", "truncated"])
def test_damaged_disk_cache_is_detected_and_rebuilt(registry, tmp_path, damage):
    """A cache shard that no longer matches its checksum is never trained on:
    it is reported, rebuilt from the images, and the run trains as on a clean cache."""
    cache_dir = tmp_path / "cache"
    kw = dict(loss="cross-entropy", head="linear", cache_dir=str(cache_dir))
    _, first, p1 = train_run(registry, tmp_path, "clean", **kw)
    values = next(cache_dir.glob("train-*/values.bin"))
    size = values.stat().st_size
    values.write_bytes(bytes(size) if damage == "zeroed" else values.read_bytes()[: size // 2])
    _, second, p2 = train_run(registry, tmp_path, "damaged", **kw)
    assert any("damaged" in w and damage in ("zeroed", "truncated") for w in second["cache"]["warnings"])
    assert second["cache"]["loaded_from_disk"] == N_VAL and second["cache"]["image_misses"] == N_TRAIN
    assert max_diff(p1, p2) == 0.0   # rebuilt by the same kernels on the same inputs
    assert second["eval"]["after"] == first["eval"]["after"]
    _, third, _ = train_run(registry, tmp_path, "again", **kw)   # the rebuilt shard is good
    assert third["cache"]["loaded_from_disk"] == N_TRAIN + N_VAL and "warnings" not in third["cache"]


@pytest.mark.numerics
def test_store_over_the_memory_limit_falls_back_to_live(registry, tmp_path):
    kw = dict(strategies=[pick("visual.proj")])
    run, summary, cached = train_run(registry, tmp_path, "small", memory_budget=1024, **kw)
    _, _, live = train_run(registry, tmp_path, "live", cache=False, **kw)
    assert "in-memory limit" in summary["cache"]["train_image"]
    assert summary["cache"]["image_hits"] == 0
    assert max_diff(cached, live) == EXACT


@pytest.mark.numerics
def test_dropout_in_the_frozen_part_keeps_train_images_live_but_caches_val(registry, tmp_path):
    kw = dict(strategies=[ComponentRef("noisy-block")])
    _, summary, cached = train_run(registry, tmp_path, "noisy", **kw)
    _, _, live = train_run(registry, tmp_path, "live", cache=False, **kw)
    c = summary["cache"]
    assert c["train_image"] == "live (Dropout is active in the frozen part)" and "val_image" not in c
    assert c["image_misses"] == N_VAL and c["image_hits"] == 3 * N_VAL
    assert max_diff(cached, live) == EXACT     # the dropout draws are the live run's


def test_a_fill_cut_short_leaves_no_store_and_the_next_epoch_fills_again(registry, tmp_path):
    from clipft.engine.prepare import prepare

    cache_dir = tmp_path / "cache"
    run = prepare(RunConfig(model="tiny-vit", data=DATA, loss="cross-entropy", head="linear", batch_size=16,
                            cache_dir=str(cache_dir)), registry)
    run.model.train()
    epoch = run.features.train_epoch(0)
    assert next(epoch).at == "cache"
    epoch.close()                                    # a run stopped inside its first epoch
    assert list(cache_dir.iterdir()) == []           # neither a committed nor a half-written store
    assert [b.at for b in run.features.train_epoch(0)] == ["cache", "cache"]
    assert [d.name.split("-")[0] for d in cache_dir.iterdir()] == ["train"]
    hits = run.features.stats["image_hits"]
    assert len(list(run.features.train_epoch(1))) == 2
    assert run.features.stats["image_hits"] == hits + N_TRAIN
    assert run.features.stats["image_misses"] == 16 + N_TRAIN


def test_random_augmentation_keeps_train_images_live_but_caches_val(registry, tmp_path):
    _, summary, _ = train_run(registry, tmp_path, "aug", augment=True, strategies=[pick("visual.proj")])
    c = summary["cache"]
    assert "augmentation" in c["train_image"]
    assert c["image_misses"] == N_VAL and c["image_hits"] == 3 * N_VAL


@pytest.mark.numerics
def test_no_cache_flag_runs_live(invoke, tmp_path, small_shapes):
    res = invoke("run", "--model", "tiny-vit", "--data", small_shapes, "--loss", "cross-entropy",
                 "--head", "linear", "--epochs", "1", "--no-cache", "--out", tmp_path / "r", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert "cache" not in summary
    assert "cache = false" in (tmp_path / "r" / "config.toml").read_text()
    res = invoke("run", "--model", "tiny-vit", "--data", small_shapes, "--loss", "cross-entropy",
                 "--head", "linear", "--epochs", "1", "--out", tmp_path / "c", "--json")
    assert res.exit_code == 0, res.output
    cached = json.loads(res.stdout)
    assert cached["cache"]["hits"] > 0
    assert cached["eval"]["after"] == summary["eval"]["after"]      # replay: exact


# -- where the image tower is cut ---------------------------------------------
def _model(name="tiny-vit"):
    from clipft.models import load_model
    model = load_model(name, "none").model
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _train(model, *prefixes):
    for n, p in model.named_parameters():
        if n.startswith(prefixes):
            p.requires_grad_(True)


def test_image_cut_points():
    from clipft.engine.cache.plan import plan_image_cut

    m = _model()
    assert plan_image_cut(m)[0].describe() == "output"
    _train(m, "visual.proj")
    assert plan_image_cut(m)[0].describe() == "pre-proj"
    _train(m, "visual.transformer.resblocks.2")
    assert plan_image_cut(m)[0].describe() == "blocks:2"
    _train(m, "visual.transformer.resblocks.0")
    cut, why = plan_image_cut(m)
    assert cut is None and "block 0" in why
    m = _model()
    _train(m, "visual.conv1")
    assert plan_image_cut(m)[0] is None
    m = _model("tiny-rn")
    _train(m, "visual.attnpool.c_proj")
    assert plan_image_cut(m)[0].describe() == "pre-proj"
    _train(m, "visual.layer4")
    assert plan_image_cut(m)[0] is None


@pytest.mark.numerics
def test_cut_replay_matches_the_tower():
    """prefix + suffix of every cut reproduce encode_image exactly."""
    from clipft.engine.cache.replay import ImageCut, ResNetProjCut, VitBlocksCut, VitProjCut

    torch.manual_seed(0)
    for name, cuts in (("tiny-vit", [ImageCut(), VitProjCut(), VitBlocksCut(1), VitBlocksCut(4)]),
                       ("tiny-rn", [ImageCut(), ResNetProjCut()])):
        m = _model(name).eval()
        x = torch.randn(5, 3, *m.visual.image_size) if name == "tiny-vit" else \
            torch.randn(5, 3, m.visual.image_size, m.visual.image_size)
        with torch.no_grad():
            ref = m.encode_image(x)
            for cut in cuts:
                out = cut.suffix(m, cut.prefix(m, x))
                # exact: the replay calls the tower's own modules on the same values
                # (ResNet: the identity out-projection is one product by 1 plus zeros)
                assert torch.equal(out, ref), (name, cut.describe(), float((out - ref).abs().max()))


def test_anything_that_could_change_a_frozen_tower_disables_its_cache():
    from clipft.engine.cache.plan import plan_image_cut, stochastic_module, text_tower_frozen

    m = _model()
    h = m.visual.transformer.resblocks[0].register_forward_hook(lambda *a: None)
    cut, why = plan_image_cut(m)
    assert cut is None and "hooks" in why
    h.remove()
    m.visual.ln_post.forward = lambda x: x
    assert plan_image_cut(m)[0] is None
    m = _model()
    m.encode_image = lambda images, normalize=False: images
    assert plan_image_cut(m)[0] is None

    m = _model()
    assert text_tower_frozen(m)[0]
    # a parameter that trains outside the image tower (a prompt learner, say)
    m.extra = torch.nn.Linear(2, 2)
    ok, why = text_tower_frozen(m)
    assert not ok and "extra.weight" in why
    m = _model()
    _train(m, "logit_scale", "visual.proj")
    assert text_tower_frozen(m)[0]

    m = _model().train()
    assert stochastic_module([m.visual]) is None
    m.visual.transformer.resblocks[1].mlp.add_module("drop", torch.nn.Dropout(0.1))
    assert stochastic_module([m.visual]) == "Dropout"
    rn = _model("tiny-rn").train()
    assert stochastic_module([rn.visual]) == "BatchNorm2d"
    assert stochastic_module([rn.visual.eval()]) is None


def test_strategy_can_keep_a_tower_live(registry, tmp_path):
    from clipft.engine.cache.provider import CachedFeatures
    from clipft.engine.features import LiveFeatures
    from clipft.engine.prepare import prepare

    def features(live):
        ref = ComponentRef("pick", {"prefixes": ["logit_scale"], "live": live})
        return prepare(RunConfig(model="tiny-vit", data=DATA, strategies=[ref]), registry).features

    both_cached = features([])
    assert both_cached.cut is not None and both_cached.plan.text
    image_live = features(["image"])
    assert isinstance(image_live, CachedFeatures) and image_live.cut is None and image_live.plan.text
    assert "a strategy keeps the image tower live" in image_live.stats["image"]
    assert type(features(["image", "text"])) is LiveFeatures
