"""Training-free runs: ``--epochs 0`` evaluates the model as built (before =
after, no optimizer step, a valid summary and a checkpoint that export, eval
and predict read), and components that fit themselves to the training split
(:class:`clipft.FitsTrainFeatures`) get one pass of it, through the
frozen-tower cache, before anything is evaluated."""
from __future__ import annotations

import json

import pytest
import torch

import clipft
from clipft.api import RunConfig, run

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = "shapes:n=48,val_n=16"


def _strict(text: str):
    """json.loads that refuses NaN/Infinity (not JSON)."""
    def bad(name):
        raise ValueError(f"{name} in JSON")
    return json.loads(text, parse_constant=bad)


def test_epochs_0_evaluates_without_training(invoke, tmp_path):
    out = tmp_path / "zs"
    r = invoke("run", "--model", "tiny-vit", "--data", DATA, "--head", "zero-shot", "--epochs", "0",
               "--callback", "none", "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    s = _strict(r.stdout)
    assert s == _strict((out / "summary.json").read_text())
    assert s["eval"]["before"] == s["eval"]["after"] and "head_top1" in s["eval"]["after"]
    assert len(s["eval"]["history"]) == 1
    assert (s["train"]["epochs"], s["train"]["steps"], s["train"]["samples"]) == (0, 0, 0)
    assert s["train"]["final_loss"] is None
    # the head that would train is counted, nothing moved, and a checkpoint exists
    # so that the run can be exported and evaluated like any other
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert (state["epoch"], state["global_step"]) == (0, 0)
    r = invoke("eval", out, "--data", DATA, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["metrics"]["top1"] == pytest.approx(s["eval"]["after"]["top1"])
    # nothing trains and no head: fine with --epochs 0, an error otherwise
    r = invoke("run", "--model", "tiny-vit", "--data", DATA, "--epochs", "0", "--callback", "none",
               "--out", tmp_path / "bare", "--json")
    assert r.exit_code == 0, r.stderr
    assert _strict(r.stdout)["params"]["trainable"] == 0
    r = invoke("run", "--model", "tiny-vit", "--data", DATA, "--head", "text", "--epochs", "1",
               "--out", tmp_path / "text")
    assert r.exit_code == 2 and "nothing would train" in r.stderr and "--epochs 0" in r.stderr
    # resuming a finished --epochs 0 run needs more epochs
    r = invoke("run", "--resume", out)
    assert r.exit_code == 2 and "already finished 0 epoch(s); pass --epochs N with N > 0" in r.stderr


# -- a component fitted to the training split ------------------------------------------
class MeanHead(clipft.FitsTrainFeatures, torch.nn.Module):
    """Nearest class mean of the training features (fitted, sized by the data)."""

    calls: list = []

    def __init__(self, n_classes, dim):
        super().__init__()
        self.register_buffer("means", torch.zeros(n_classes, dim))
        self.register_buffer("count", torch.zeros(()))

    def forward(self, f):
        return f @ self.means.t()

    def fit_train_features(self, data):
        MeanHead.calls.append(data)
        for c in range(self.means.shape[0]):
            self.means[c] = data.features[data.labels == c].mean(0)
        self.count.fill_(len(data))
        val_f, val_y = data.val_features()
        return {"n": len(data), "val": len(val_y)}


class MeanHeadPlugin:
    @clipft.hookimpl
    def clipft_register_heads(self, register):
        register(clipft.HeadSpec(name="class-means", summary="test: nearest class mean", needs_classes=True,
                                 build=lambda opts, ctx: MeanHead(len(ctx.classnames), ctx.embed_dim)))


#: in-process plugins the conftest ``registry`` fixture adds to the installed ones
PLUGINS = [MeanHeadPlugin()]


@pytest.mark.parametrize("cache", [True, False])
def test_a_fitter_gets_the_train_split_once_before_the_first_evaluation(registry, tmp_path, cache):
    from clipft.encode import encode_images
    from clipft.engine.loadrun import load_run

    MeanHead.calls.clear()
    s = run(RunConfig(model="tiny-vit", data=DATA, head="class-means", epochs=0, batch_size=16, cache=cache,
                      callbacks=["none"]), registry=registry, out=tmp_path / "run")
    (data,) = MeanHead.calls
    assert data.features.shape == (48, 64) and data.labels.shape == (48,)
    assert torch.allclose(data.features.norm(dim=-1), torch.ones(48))
    assert data.classnames == ["red circle", "red square", "red triangle", "green circle", "green square",
                               "green triangle", "blue circle", "blue square", "blue triangle"]
    assert s["fit"] == {"head": {"n": 48, "val": 16}}
    if cache:
        # one pass fills the train store and one the val store: each image encoded once
        assert s["cache"]["image_misses"] == 48 + 16
    # the features are the training images as evaluation embeds them, in index order
    loaded = load_run(tmp_path / "run", registry)
    from clipft.data import DataContext
    spec, opts = loaded.resolved.data
    bundle = spec.build(opts, DataContext(transform_train=loaded.preprocess, transform_val=loaded.preprocess,
                                          seed=0))
    with torch.no_grad():
        want = encode_images(loaded.model, torch.stack([bundle.train[i][1] for i in range(48)]))
    assert torch.equal(data.labels, torch.tensor([bundle.train[i][3] for i in range(48)]))
    # the same images in other batches (48 at once against 16 at a time): rounding only
    assert torch.allclose(data.features, want, atol=1e-5)
    # the fitted head came back from the checkpoint
    means = torch.stack([data.features[data.labels == c].mean(0) for c in range(9)])
    assert torch.equal(loaded.head.means, means)
    assert float(loaded.head.count) == 48


def test_a_fitter_is_not_refitted_on_resume_and_its_record_survives(registry, tmp_path, monkeypatch):
    MeanHead.calls.clear()
    conf = dict(model="tiny-vit", data=DATA, strategies=["logit-scale"], head="class-means", epochs=1,
                batch_size=16, loss="contrastive", callbacks=["none"])
    run(RunConfig(**conf), registry=registry, out=tmp_path / "run")
    assert len(MeanHead.calls) == 1
    s = run(RunConfig(**{**conf, "epochs": 2}), registry=registry, resume=tmp_path / "run")
    assert len(MeanHead.calls) == 1 and s["fit"] == {"head": {"n": 48, "val": 16}}
