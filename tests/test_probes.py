"""The training-light probes of plugin clipft-probes: heads ``taskres`` (TaskRes)
and ``clap`` (CLAP). Their equations against independent computations, what
trains, CLAP's multipliers and penalty, the head's loss terms in a run, export
round trips through clipft.load, bit-exact resume and option errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import clipft_probes
from clipft import testing
from clipft.errors import ClipftUsageError, RunInterrupted

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = "shapes:n=48,val_n=16"
NAMES = ["red circle", "blue square", "green triangle"]


@pytest.fixture(scope="module")
def registry():
    return testing.plugin_registry(clipft_probes)


def build_ctx(templates=("a photo of a {}.",)):
    from clipft.context import BuildContext
    model, tok, _ = testing.tiny_model()
    model.eval()
    return BuildContext(model=model, model_name="tiny-vit", tokenizer=tok, device=torch.device("cpu"),
                        classnames=NAMES, templates=templates)


def probe_features(n=5, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g), dim=-1)


def run(registry, out, head, epochs=1, **config):
    from clipft.api import RunConfig, run as api_run
    cfg = dict(model="tiny-vit", data=DATA, head=head, loss="cross-entropy", epochs=epochs, batch_size=16,
               callbacks=["none"])
    cfg.update(config)
    return api_run(RunConfig(**cfg), registry=registry, out=out)


# -- equations ---------------------------------------------------------------------------
def test_the_base_points_as_zero_shot_and_is_as_long_as_the_raw_text_embedding():
    from clipft_heads import ZeroShotOptions, build_zero_shot
    ctx = build_ctx()
    base = clipft_probes.zero_shot_base(ctx)
    with torch.no_grad():
        raw = ctx.model.encode_text(ctx.tokenizer([f"a photo of a {c}." for c in NAMES]))
    assert torch.allclose(base, raw, atol=1e-5)          # one template: the raw embedding itself
    zs = build_zero_shot(ZeroShotOptions(bias=False), ctx)
    assert torch.allclose(F.normalize(base, dim=-1), zs.weight, atol=1e-6)
    # several templates: the zero-shot head's direction, the raw template-mean's length
    ctx2 = build_ctx(("a photo of a {}.", "a drawing of a {}."))
    base2 = clipft_probes.zero_shot_base(ctx2)
    with torch.no_grad():
        raw2 = torch.stack([ctx2.model.encode_text(ctx2.tokenizer([t.format(c) for t in ctx2.templates])).mean(0)
                            for c in NAMES])
    assert torch.allclose(base2.norm(dim=-1), raw2.norm(dim=-1), atol=1e-5)
    assert torch.allclose(F.normalize(base2, dim=-1), ctx2.class_text_features(), atol=1e-6)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_taskres_starts_as_the_zero_shot_head_and_alpha_0_stays_there(alpha):
    from clipft_heads import ZeroShotOptions, build_zero_shot
    ctx = build_ctx()
    zs = build_zero_shot(ZeroShotOptions(bias=False), ctx)
    head = clipft_probes.build_taskres(clipft_probes.TaskResOptions(alpha=alpha), ctx)
    f = probe_features()
    with torch.no_grad():
        assert torch.allclose(head(f), zs(f), atol=1e-5, rtol=0)           # R = 0 at the start
        head.residual.normal_()
        w = F.normalize(head.base + alpha * head.residual, dim=-1)
        assert torch.allclose(head(f), head.scale * f @ w.t(), atol=1e-5)   # the combined classifier, normalised
        assert not torch.allclose(head(f), zs(f), atol=1e-2)
        frozen = clipft_probes.build_taskres(clipft_probes.TaskResOptions(alpha=0.0), ctx)
        frozen.residual.normal_()
        assert torch.allclose(frozen(f), zs(f), atol=1e-5, rtol=0)
    assert [n for n, p in head.named_parameters()] == ["residual"]


def test_clap_penalty_is_zero_at_the_prototypes_and_its_gradient_is_2_lambda_delta_over_C():
    ctx = build_ctx()
    head = clipft_probes.build_clap(clipft_probes.ClapOptions(), ctx)
    lam = torch.tensor([0.2, 0.5, 0.9])
    head.multipliers.copy_(lam)
    assert float(head.penalty().detach()) == 0.0
    delta = torch.tensor([[1.0] + [0.0] * 63, [0.0, 2.0] + [0.0] * 62, [0.5] * 64])
    with torch.no_grad():
        head.weight.add_(delta)
    value = head.loss_terms(None)["clap"]
    # mean over the classes of lambda_c * |delta_c|^2 = (0.2*1 + 0.5*4 + 0.9*16) / 3
    assert abs(float(value.detach()) - (0.2 * 1 + 0.5 * 4 + 0.9 * 0.25 * 64) / 3) < 1e-5
    value.backward()
    assert torch.allclose(head.weight.grad, 2 * lam[:, None] * delta / 3, atol=1e-6)
    # the logits use the direction of W only
    f = probe_features()
    with torch.no_grad():
        assert torch.allclose(head(f), head.scale * f @ F.normalize(head.weight, dim=-1).t(), atol=1e-5)
    assert clipft_probes.build_clap(clipft_probes.ClapOptions(constraint="none"), ctx).loss_terms(None) == {}


def test_clap_multipliers_are_the_zero_shot_probability_of_each_class_on_its_images():
    from clipft.context import TrainFeatures
    ctx = build_ctx()
    head = clipft_probes.build_clap(clipft_probes.ClapOptions(), ctx)
    feats = probe_features(7)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    record = head.fit_train_features(TrainFeatures(feats, labels, NAMES))
    with torch.no_grad():
        logits = head.scale * feats @ F.normalize(head.prototypes, dim=-1).t()
    expected = []
    for c in range(3):
        rows = [i for i in range(7) if int(labels[i]) == c]
        expected.append(sum(float(torch.softmax(logits[i], -1)[c]) for i in rows) / len(rows))
    assert torch.allclose(head.multipliers, torch.tensor(expected), atol=1e-6)
    assert record["constraint"] == "adaptive" and record["shots_min"] == 2 and record["shots_max"] == 3
    assert abs(record["multipliers"]["mean"] - sum(expected) / 3) < 1e-6
    balanced = clipft_probes.build_clap(clipft_probes.ClapOptions(constraint="balanced"), ctx)
    balanced.fit_train_features(TrainFeatures(feats, labels, NAMES))
    assert torch.equal(balanced.multipliers, torch.ones(3))
    with pytest.raises(ClipftUsageError, match="unlabelled"):
        head.fit_train_features(TrainFeatures(feats, torch.tensor([0, -1, 1, 2, 2, 2, 1]), NAMES))


def test_clap_penalty_and_its_gradient_are_zero_at_the_prototypes_in_every_mode():
    ctx = build_ctx()
    for constraint in ("adaptive", "alm", "balanced"):
        head = clipft_probes.build_clap(clipft_probes.ClapOptions(constraint=constraint), ctx)
        head.multipliers.copy_(torch.tensor([0.2, 0.5, 0.9]))
        value = head.loss_terms(None)["clap"]
        value.backward()
        assert float(value.detach()) == 0.0 and torch.equal(head.weight.grad, torch.zeros_like(head.weight))


def test_alm_outer_step_against_a_hand_computation():
    from clipft_probes.heads import alm_outer_step
    lam, rho = alm_outer_step(torch.tensor([1.0, 4.0, 16.0]), torch.tensor([0.2, 0.5, 0.9]), torch.zeros(3))
    assert torch.equal(lam, torch.tensor([0.2, 0.5, 0.9])) and torch.equal(rho, torch.tensor([1.0, 4.0, 16.0]))
    # lambda' = max(0, lambda + rho * h): 0.2 + 1*4, 0.5 + 4*1, 0.9 + 16*0, and max(0, -3 + 2*1)
    lam, rho = alm_outer_step(torch.tensor([4.0, 1.0, 0.0, 1.0]), torch.tensor([0.2, 0.5, 0.9, -3.0]),
                              torch.tensor([1.0, 4.0, 16.0, 2.0]))
    assert torch.allclose(lam, torch.tensor([4.2, 4.5, 0.9, 0.0]), atol=1e-6, rtol=0)
    assert torch.equal(rho, torch.tensor([4.0, 1.0, 0.0, 1.0]))


def test_clap_alm_moves_its_multipliers_at_each_epochs_end_and_other_modes_do_not():
    from clipft.context import TrainFeatures
    ctx = build_ctx()
    feats, labels = probe_features(6), torch.tensor([0, 0, 1, 1, 2, 2])
    head = clipft_probes.build_clap(clipft_probes.ClapOptions(constraint="alm"), ctx)
    head.fit_train_features(TrainFeatures(feats, labels, NAMES))
    lam0 = head.multipliers.clone()
    assert torch.equal(head.rho, torch.zeros(3))
    d1 = torch.tensor([[1.0] + [0.0] * 63, [0.0, 2.0] + [0.0] * 62, [0.5] * 64])     # |d|^2 = 1, 4, 16
    d2 = torch.tensor([[0.0] * 63 + [2.0], [0.0] * 64, [0.0] * 64])                   # |d|^2 = 4, 0, 0 from W0
    with torch.no_grad():
        head.weight.add_(d1)
        head.end_epoch(1)
        assert torch.equal(head.multipliers, lam0)                                  # rho was 0
        assert torch.allclose(head.rho, torch.tensor([1.0, 4.0, 16.0]), atol=1e-5)
        head.weight.copy_(head.prototypes + d2)
        head.end_epoch(2)
    assert torch.allclose(head.multipliers, lam0 + torch.tensor([1.0 * 4, 0.0, 0.0]), atol=1e-5)
    assert torch.allclose(head.rho, torch.tensor([4.0, 0.0, 0.0]), atol=1e-5)
    fixed = clipft_probes.build_clap(clipft_probes.ClapOptions(), ctx)
    fixed.fit_train_features(TrainFeatures(feats, labels, NAMES))
    before = fixed.multipliers.clone()
    with torch.no_grad():
        fixed.weight.add_(d1)
        fixed.end_epoch(1)
    assert torch.equal(fixed.multipliers, before) and "rho" not in fixed.state_dict()


# -- runs ----------------------------------------------------------------------------------
def test_taskres_trains_only_the_residual_at_its_own_default_lr(registry, tmp_path):
    s = run(registry, tmp_path / "t", "taskres")
    model_t, head_t = testing.checkpoint_tensors(s["run_dir"])
    assert model_t == {} and set(head_t) == {"base", "residual"}
    assert float(head_t["residual"].abs().max()) > 0
    # W0 stayed what the untrained model gives for the run's classes
    from clipft.context import BuildContext
    loaded = testing.load_trained(s["run_dir"], registry)
    model, tok, _ = testing.tiny_model()
    ctx = BuildContext(model=model.eval(), model_name="tiny-vit", tokenizer=tok, device=torch.device("cpu"),
                       classnames=loaded.classnames, templates=loaded.templates)
    assert torch.allclose(head_t["base"], clipft_probes.zero_shot_base(ctx), atol=1e-5)
    assert s["train"]["lr"] == clipft_probes.TASKRES_LR and s["train"]["lr_reason"] == "default of head 'taskres'"
    assert s["eval"]["before"]["head_top1"] == s["eval"]["before"]["top1"]   # starts at zero-shot


def test_clap_adds_its_penalty_to_the_loss_and_records_its_multipliers(registry, tmp_path):
    s = run(registry, tmp_path / "c", "clap", lr=0.05)
    fit = s["fit"]["head"]
    assert fit["constraint"] == "adaptive" and 0 < fit["multipliers"]["min"] <= fit["multipliers"]["max"] < 1
    rows = [json.loads(x) for x in (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["type"] == "step"]
    assert steps and all("reg.clap" in r for r in steps)
    assert steps[0]["reg.clap"] >= 0 and any(r["reg.clap"] > 0 for r in steps)
    _, head_t = testing.checkpoint_tensors(s["run_dir"])
    assert set(head_t) == {"prototypes", "weight", "multipliers"}
    assert float((head_t["weight"] - head_t["prototypes"]).abs().max()) > 0
    plain = run(registry, tmp_path / "n", "clap:constraint=none", lr=0.05)
    rows = (Path(plain["run_dir"]) / "metrics.jsonl").read_text()
    assert "reg.clap" not in rows and "multipliers" not in plain["fit"]["head"]


def test_clap_alm_run_updates_once_per_epoch_before_the_epochs_checkpoint(registry, tmp_path, monkeypatch):
    from clipft_probes.heads import ClapHead
    calls = []
    real = ClapHead.end_epoch

    def end_epoch(self, epoch):
        calls.append((epoch, torch.is_grad_enabled()))
        real(self, epoch)
    monkeypatch.setattr(ClapHead, "end_epoch", end_epoch)
    s = run(registry, tmp_path / "alm", "clap:constraint=alm", epochs=2, lr=0.05)
    assert calls == [(1, False), (2, False)]
    assert s["fit"]["head"]["constraint"] == "alm"
    _, head_t = testing.checkpoint_tensors(s["run_dir"])
    assert set(head_t) == {"prototypes", "weight", "multipliers", "rho"}
    # the last update saw the trained weights: rho is their squared distance to W0
    distance = (head_t["weight"] - head_t["prototypes"]).pow(2).sum(-1)
    assert float(distance.min()) > 0 and torch.equal(head_t["rho"], distance)
    # and it raised the multipliers above their zero-shot start
    assert float(head_t["multipliers"].mean()) > s["fit"]["head"]["multipliers"]["mean"]


@pytest.mark.parametrize("head", ["taskres", "clap", "clap:constraint=alm"])
def test_export_and_reload_give_the_same_predictions(registry, tmp_path, head):
    import clipft
    s = run(registry, tmp_path / "run", head, lr=0.05)
    manifest = testing.assert_export_roundtrip(s["run_dir"], tmp_path / "export", registry)
    assert manifest["head"]["name"] == head.split(":")[0]
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    from_run = clipft.load(s["run_dir"], device="cpu", registry=registry)
    from_export = clipft.load(tmp_path / "export", device="cpu", registry=registry)
    a, b = from_run.classify(images), from_export.classify(images)
    assert torch.allclose(torch.as_tensor(a), torch.as_tensor(b), atol=1e-5)


@pytest.mark.parametrize("head,stop", [
    ("clap", 2),
    ("clap:constraint=alm", 3),     # epoch 1's last step: stops after its update and checkpoint
    ("clap:constraint=alm", 4),     # inside epoch 2, after epoch 1's update
])
def test_clap_resumes_bit_exactly(registry, tmp_path, monkeypatch, head, stop):
    from test_clip_adapter import stop_after_step
    straight = run(registry, tmp_path / "straight", head, epochs=2, lr=0.05)
    with monkeypatch.context() as m:
        stop_after_step(m, stop)
        with pytest.raises(RunInterrupted, match=f"stopped after optimizer step {stop}"):
            run(registry, tmp_path / "resumed", head, epochs=2, lr=0.05)
    resumed = testing.resume_run(tmp_path / "resumed", registry=registry)
    a, b = (Path(x) / "checkpoint" for x in (straight["run_dir"], resumed["run_dir"]))
    from safetensors.torch import load_file
    for name in ("head.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (name, k)
    assert straight["fit"] == resumed["fit"]


@pytest.mark.parametrize("head,message", [
    ("taskres:alpha=-1", "alpha must be >= 0"),
    ("taskres:scale=0", "scale must be > 0"),
    ("clap:constraint=maybe", "constraint"),
    ("clap:constraint=ALM", "constraint"),
    ("clap:lam=3", "Valid options"),
])
def test_bad_options_are_usage_errors(registry, head, message):
    from clipft.api import RunConfig, plan
    with pytest.raises(ClipftUsageError, match=message):
        plan(RunConfig(model="tiny-vit", data=DATA, head=head, loss="cross-entropy"), registry=registry)


@pytest.mark.parametrize("head,message", [
    ("taskres:alpha=-1", "alpha must be >= 0"),
    ("clap:constraint=lagrange", "constraint"),
])
def test_bad_options_exit_2_on_the_command_line(invoke, head, message):
    from importlib.metadata import entry_points
    if not any(ep.value == "clipft_probes" for ep in entry_points(group="clipft")):
        pytest.skip("clipft-probes is not installed (pip install -e plugins/clipft-probes)")
    r = invoke("plan", "--model", "tiny-vit", "--data", DATA, "--head", head)
    assert r.exit_code == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_a_strategys_default_lr_wins_over_the_heads_and_lr_over_both(registry):
    from clipft.api import RunConfig, plan

    def lr(**kw):
        p = plan(RunConfig(model="tiny-vit", data=DATA, head="taskres", loss="cross-entropy", **kw),
                 registry=registry)
        return p["lr"], p["lr_reason"]
    assert lr() == (clipft_probes.TASKRES_LR, "default of head 'taskres'")
    assert "strategy 'projections'" in lr(strategies=["projections"], pretrained="none")[1]
    assert lr(lr=0.3) == (0.3, "given (--lr)")
    assert registry.get("head", "clap").default_lr is None


def test_the_engine_asks_a_head_for_loss_terms_and_epoch_updates_only_while_it_trains():
    from types import SimpleNamespace

    from clipft.engine.prepare import epoch_updaters, regularisers
    head = clipft_probes.build_clap(clipft_probes.ClapOptions(), build_ctx())
    assembly = SimpleNamespace(strategies=[], model=torch.nn.Linear(2, 2), head=head)
    assert [source for _, source in regularisers(assembly)] == [head]
    assert epoch_updaters(head) == [head]
    head.requires_grad_(False)           # a stage that keeps the head as it is
    assert regularisers(assembly) == [] and epoch_updaters(head) == []
    plain = clipft_probes.build_taskres(clipft_probes.TaskResOptions(), build_ctx())
    assert regularisers(SimpleNamespace(strategies=[], model=torch.nn.Linear(2, 2), head=plain)) == []
    assert epoch_updaters(plain) == [] and epoch_updaters(None) == []
