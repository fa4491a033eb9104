"""A NaN loss stops the run with the last checkpoint intact, or, with
--skip-nonfinite N, skips up to N such steps and says so in summary.json."""
import json

import attrs
import pytest
import torch

import clipft
from clipft.api import RunConfig, run
from clipft.errors import ClipftError

pytestmark = pytest.mark.usefixtures("one_thread")


@attrs.frozen
class NanAtOptions:
    at: int = attrs.field(default=0, metadata={"help": "1-based call that returns NaN"})
    again: int = attrs.field(default=0, metadata={"help": "another one"})


class NanAt:
    """Contrastive-free test loss: mean image feature, NaN on chosen calls."""

    def __init__(self, opts):
        self.bad, self.n = {opts.at, opts.again}, 0

    def __call__(self, rec):
        self.n += 1
        loss = rec.image_features.pow(2).sum(-1).mean() * rec.logit_scale
        return loss * float("nan") if self.n in self.bad else loss


class NanPlugin:
    @clipft.hookimpl
    def clipft_register_losses(self, register):
        register(clipft.LossSpec(name="nan-at", summary="test", options=NanAtOptions, build=NanAt))


#: in-process plugins the conftest ``registry`` fixture adds to the installed ones
PLUGINS = [NanPlugin()]


def conf(**kw):
    base = dict(model="tiny-vit", data="shapes:n=32,val_n=8", epochs=2, batch_size=8, lr=1e-3,
                strategies=["full"], loss="nan-at:at=6")
    return RunConfig(**{**base, **kw})


def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(registry, tmp_path):
    out = tmp_path / "r"
    with pytest.raises(ClipftError, match=r"loss became nan at epoch 2, batch 2.*--skip-nonfinite"):
        run(conf(), registry=registry, out=out)
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1 and state["global_step"] == 4   # the end of epoch 1, untouched
    assert not (out / "summary.json").exists()


def test_skip_nonfinite_skips_and_counts(registry, tmp_path):
    s = run(conf(skip_nonfinite=1), registry=registry, out=tmp_path / "r")
    assert s["train"]["skipped_nonfinite_steps"] == 1
    assert s["train"]["steps"] == 7                              # 8 batches, one step dropped
    from safetensors.torch import load_file
    trained = load_file(str(tmp_path / "r" / "checkpoint" / "model.safetensors"))
    assert trained and all(torch.isfinite(v).all() for v in trained.values())
    with pytest.raises(ClipftError, match="after skipping 1 such steps"):
        run(conf(skip_nonfinite=1, loss="nan-at:at=3,again=6"), registry=registry, out=tmp_path / "r2")
