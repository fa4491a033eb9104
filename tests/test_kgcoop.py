"""A strategy adds a loss term (``Strategy.loss_terms``), written as a third
party would: KgCoOp (Yao et al., CVPR 2023) is CoOp's prompt learner
(``clipft.prompt_kit``) plus ``weight * ||w_learned - w_clip||^2`` between the
learned and the hand-crafted class-prompt embeddings, read from the step's
``ForwardRecord.class_text_features`` (no second encoding of the prompts). The
engine adds the term to the loss and logs it as ``reg.kgcoop``; weight 0 is
CoOp bit for bit; a weight pulls the prompts towards CLIP's; a resume is
bit-exact."""
from __future__ import annotations

import json
from typing import Optional

import attrs
import pytest
import torch
from safetensors.torch import load_file

import clipft
from clipft import testing
from resume_check import assert_same_checkpoints, crash_after_first_checkpoint_then_resume

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = "shapes:n=64,val_n=32"


# -- the plugin, public clipft API only ------------------------------------------
@attrs.frozen
class KgCoOpOptions:
    weight: float = attrs.field(default=8.0, metadata={"help": "weight of the distance to CLIP's prompts"})
    init: str = attrs.field(default="none", metadata={"help": "context init text; none: random"})
    n_ctx: Optional[int] = attrs.field(default=None, metadata={"help": "context tokens"})


class KgCoOp(clipft.Strategy):
    def __init__(self, opts):
        self.opts = opts
        self.distances: list = []    # what the test reads back

    def apply(self, model, ctx):
        from clipft.options import options_to_dict
        from clipft.prompt_kit import install_prompt_learner

        # CLIP's own class embeddings, before the learner replaces the templates
        was = model.training
        model.eval()
        with torch.no_grad():
            self.w_clip = ctx.class_text_features(model).float()
        model.train(was)
        init = None if self.opts.init == "none" else self.opts.init
        _, selections = install_prompt_learner(model, ctx, "kgcoop", init=init, n_ctx=self.opts.n_ctx,
                                               options=options_to_dict(self.opts))
        return selections

    def loss_terms(self, record):
        w = record.class_text_features
        if w is None:
            raise clipft.ClipftUsageError("kgcoop needs the class prompts in the forward: use --head text")
        distance = (w.float() - self.w_clip).pow(2).sum(-1).mean()
        self.distances.append(float(distance.detach()))
        return {"kgcoop": self.opts.weight * distance}


BUILT: list = []


def build(opts):
    BUILT.append(KgCoOp(opts))
    return BUILT[-1]


class KgCoOpPlugin:
    __name__ = "kgcoop_plugin"

    @clipft.hookimpl
    def clipft_register_strategies(self, register):
        register(clipft.StrategySpec(name="kgcoop", summary="KgCoOp (test)", options=KgCoOpOptions,
                                     build=build, default_lr=2e-3))


# -- the tests --------------------------------------------------------------------
@pytest.fixture(scope="module")
def registry():
    return testing.plugin_registry(KgCoOpPlugin())


def train(registry, tmp_path, strategy, **kw):
    BUILT.clear()
    s = testing.run_plugin(None, strategy=strategy, head="text", loss="cross-entropy", data=DATA,
                           batch_size=16, epochs=2, lr=5e-3, tmp_path=tmp_path, registry=registry,
                           callbacks=["none"], **kw)
    return s, (BUILT[-1] if BUILT else None)


def steps(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["type"] == "step"]


def weights(run_dir):
    return load_file(str(run_dir / "checkpoint" / "model.safetensors"))


def test_the_term_is_logged_trains_and_weight_zero_is_coop(registry, tmp_path):
    from pathlib import Path
    coop, _ = train(registry, tmp_path / "coop", "prompt:init=none")
    zero, k0 = train(registry, tmp_path / "zero", "kgcoop:weight=0")
    kg, k8 = train(registry, tmp_path / "kg", "kgcoop:weight=8")
    coop_dir, zero_dir, kg_dir = (Path(s["run_dir"]) for s in (coop, zero, kg))

    # weight 0: the hook runs every step, and the run is CoOp's bit for bit
    assert len(k0.distances) == zero["train"]["steps"] == 8
    a, b = weights(coop_dir), weights(zero_dir)
    assert a.keys() == b.keys() == {"clipft_class_text.ctx"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in steps(coop_dir)] == [r["loss"] for r in steps(zero_dir)]
    assert coop["eval"]["after"] == zero["eval"]["after"]

    # the weighted term is in metrics.jsonl by name, and in the loss
    rows = steps(kg_dir)
    assert all("reg.kgcoop" in r for r in rows) and all(r["reg.kgcoop"] == 0 for r in steps(zero_dir))
    for r in rows:
        assert r["reg.kgcoop"] == pytest.approx(8 * k8.distances[r["step"] - 1], rel=1e-6)
    assert 8 * k8.distances[0] > 1.0                        # random context: far from CLIP's prompts
    # it pulls the learned prompts towards CLIP's: the same start, a far smaller distance
    assert k8.distances[0] == pytest.approx(k0.distances[0], rel=1e-6)
    assert k8.distances[-1] < 0.5 * k0.distances[-1], (k8.distances, k0.distances)
    assert not torch.equal(weights(kg_dir)["clipft_class_text.ctx"], b["clipft_class_text.ctx"])


def test_a_resume_is_bit_exact(registry, tmp_path, monkeypatch):
    from clipft.api import RunConfig, run

    cfg = RunConfig(model="tiny-vit", pretrained="none", data=DATA, strategies=["kgcoop:weight=8"], head="text",
                    loss="cross-entropy", epochs=2, batch_size=16, lr=5e-3, device="cpu", callbacks=["none"])
    r = crash_after_first_checkpoint_then_resume(cfg, tmp_path, monkeypatch, registry=registry)
    straight, resumed = r.whole, r.resumed

    assert_same_checkpoints(tmp_path / "straight", tmp_path / "crashed")
    assert resumed["eval"]["after"] == straight["eval"]["after"]
    tail = [r["reg.kgcoop"] for r in steps(tmp_path / "crashed")][-4:]
    assert tail == [r["reg.kgcoop"] for r in steps(tmp_path / "straight")][-4:]


def test_a_term_must_be_a_scalar(registry, tmp_path, monkeypatch):
    monkeypatch.setattr(KgCoOp, "loss_terms", lambda self, record: {"bad": record.class_text_features})
    with pytest.raises(clipft.ClipftError, match=r"strategy 'kgcoop': loss_terms\(\) returned 'bad' as \(9, 64\)"):
        train(registry, tmp_path, "kgcoop")


# -- an inserted module's terms, and a loss that needs the class text ----------------
class Anchor(clipft.InsertedModule, torch.nn.Module):
    """A parameter beside the model that only its own term reaches."""

    enters = "none"

    def __init__(self, value: float):
        super().__init__()
        self.p = torch.nn.Parameter(torch.full((4,), value))

    def loss_terms(self, record):
        return {"anchor": self.p.pow(2).sum()}


class TwoAnchors(clipft.Strategy):
    def __init__(self, opts):
        pass

    def apply(self, model, ctx):
        model.add_module("anchor_a", Anchor(1.0))
        model.add_module("anchor_b", Anchor(2.0))
        return [clipft.Selection("anchors", [("anchor_a.p", model.anchor_a.p), ("anchor_b.p", model.anchor_b.p)],
                                 weight_decay=False)]


SEEN: list = []


class PeekLoss:
    """Cross-entropy on the head's logits that keeps what it was handed."""

    def __call__(self, record):
        SEEN.append(record.class_text_features)
        return torch.nn.functional.cross_entropy(record.logits, record.labels)


class MorePlugin:
    __name__ = "more_plugin"

    @clipft.hookimpl
    def clipft_register_strategies(self, register):
        register(clipft.StrategySpec(name="two-anchors", summary="test", build=TwoAnchors, default_lr=0.1))

    @clipft.hookimpl
    def clipft_register_losses(self, register):
        register(clipft.LossSpec(name="peek", summary="test", build=lambda opts: PeekLoss(),
                                 needs={"head", "labels"}))
        register(clipft.LossSpec(name="peek-class-text", summary="test", build=lambda opts: PeekLoss(),
                                 needs={"head", "labels", "class-text"}))


@pytest.fixture(scope="module")
def more():
    return testing.plugin_registry(MorePlugin())


def test_inserted_modules_terms_add_up_under_one_name_and_train(more, tmp_path):
    from pathlib import Path
    s = testing.run_plugin(None, strategy="two-anchors", loss="contrastive", steps=2, tmp_path=tmp_path,
                           registry=more, callbacks=["none"], log_every=1)
    rows = steps(Path(s["run_dir"]))
    assert rows[0]["step"] == 1 and rows[0]["reg.anchor"] == pytest.approx(4 * 1.0 + 4 * 4.0)
    trained = weights(Path(s["run_dir"]))
    assert trained["anchor_a.p"].abs().max() < 1.0 and trained["anchor_b.p"].abs().max() < 2.0


def test_a_loss_that_needs_the_class_text_gets_it(more, tmp_path):
    SEEN.clear()
    testing.run_plugin(None, head="linear", loss="peek", steps=1, tmp_path=tmp_path, registry=more,
                       callbacks=["none"])
    assert SEEN == [None]      # nothing encoded the class prompts, nothing asked for them
    SEEN.clear()
    testing.run_plugin(None, head="linear", loss="peek-class-text", steps=1, tmp_path=tmp_path, registry=more,
                       callbacks=["none"])
    (cls,) = SEEN
    assert cls.shape == (9, 64)
    assert torch.allclose(cls.norm(dim=-1), torch.ones(9), atol=1e-5)
    SEEN.clear()
    testing.run_plugin(None, strategy="prompt", head="text", loss="peek", steps=1, tmp_path=tmp_path,
                       registry=more, callbacks=["none"])
    (cls,) = SEEN               # the text head's own class prompts, with their gradient
    assert cls.shape == (9, 64) and cls.requires_grad


def test_the_prompt_kit_errors_name_the_calling_strategy(registry, tmp_path):
    with pytest.raises(clipft.ClipftUsageError, match="strategy 'kgcoop' trains through the class prompts"):
        testing.run_plugin(None, strategy="kgcoop", head="linear", loss="cross-entropy", tmp_path=tmp_path,
                           registry=registry)
    with pytest.raises(clipft.ClipftUsageError, match="strategy 'kgcoop': n_ctx=8, but init 'a photo of a' is 4 tokens"):
        testing.run_plugin(None, strategy="kgcoop:init=a photo of a,n_ctx=8", head="text", loss="cross-entropy",
                           tmp_path=tmp_path, registry=registry, data=DATA)
