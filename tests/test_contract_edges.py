"""A plugin that breaks the contract at its edges fails naming itself: a head
of the wrong width, a loss that reads a record field it did not declare, a
loss whose dict has no 'total' (each a runtime error, exit 1: a plugin bug)."""
import pytest
import torch

import clipft
from clipft.api import RunConfig, run
from clipft.errors import ClipftError

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = "shapes:n=16,val_n=8,colours=red,green,blue,shapes=circle,square"   # 6 classes


class Narrow(torch.nn.Module):
    """Three logits whatever the data's classes."""

    def __init__(self, ctx):
        super().__init__()
        self.fc = torch.nn.Linear(ctx.embed_dim, 3)

    def forward(self, x):
        return self.fc(x)


def reads_text_undeclared(opts):
    return lambda rec: (rec.image_features * rec.logit_scale).mean() + rec.text_features.sum()


def returns_no_total(opts):
    return lambda rec: {"loss": rec.image_features.pow(2).mean() * rec.logit_scale, "aux": 1.0}


def reads_text_elsewhere(opts):
    def loss(rec):
        txt = rec.text_features
        return torch.matmul(rec.image_features, txt.T).mean()
    return loss


def fails_on_its_own(opts):
    def loss(rec):
        raise TypeError("a bug of its own")
    return loss


class EdgePlugin:
    @clipft.hookimpl
    def clipft_register_heads(self, register):
        register(clipft.HeadSpec(name="narrow", summary="test: 3 logits", build=lambda o, ctx: Narrow(ctx)))

    @clipft.hookimpl
    def clipft_register_losses(self, register):
        register(clipft.LossSpec(name="reads-text", summary="test", build=reads_text_undeclared))
        register(clipft.LossSpec(name="no-total", summary="test", build=returns_no_total))
        register(clipft.LossSpec(name="reads-text-elsewhere", summary="test", build=reads_text_elsewhere))
        register(clipft.LossSpec(name="own-bug", summary="test", build=fails_on_its_own,
                                 needs={"head"}))


PLUGINS = [EdgePlugin()]


def conf(**kw):
    base = dict(model="tiny-vit", data=DATA, epochs=1, batch_size=8, strategies=["logit-scale"])
    return RunConfig(**{**base, **kw})


def fails(registry, tmp_path, **kw) -> str:
    with pytest.raises(ClipftError) as exc:
        run(conf(**kw), registry=registry, out=tmp_path / "r")
    assert exc.value.exit_code == 1     # a plugin's bug, not the user's command line
    return str(exc.value)


@pytest.mark.parametrize("epochs", [1, 0])
def test_a_head_of_the_wrong_width_is_named_with_both_shapes(registry, tmp_path, epochs):
    # the first forward is the evaluation before training (also with --epochs 0,
    # where the metrics would otherwise come out quietly wrong)
    msg = fails(registry, tmp_path, head="narrow", strategies=[], epochs=epochs)
    assert "head 'narrow'" in msg and "(8, 3)" in msg and "(8, 6)" in msg and "6 classes" in msg


def test_a_right_head_is_checked_once_and_trains(registry, tmp_path):
    s = run(conf(head="linear", strategies=[]), registry=registry, out=tmp_path / "r")
    assert s["train"]["steps"] == 2 and "head_top1" in s["eval"]["after"]
    # the check is a hook on the first call only: later calls cost nothing
    from clipft.engine.assemble import check_head_width
    head = torch.nn.Linear(4, 6)
    check_head_width(head, "linear", 6)
    assert head._forward_hooks
    head(torch.zeros(2, 4))
    assert not head._forward_hooks


def test_a_loss_reading_an_undeclared_field_names_it_and_the_need(registry, tmp_path):
    msg = fails(registry, tmp_path, loss="reads-text")
    assert "loss 'reads-text'" in msg and "ForwardRecord.text_features" in msg and "'text'" in msg
    assert "NoneType" in msg            # what actually failed, kept
    # read on another line than the one that fails: named as the likely cause
    msg = fails(registry, tmp_path, loss="reads-text-elsewhere")
    assert "loss 'reads-text-elsewhere'" in msg and "if it reads ForwardRecord.text_features" in msg


def test_a_loss_failing_for_its_own_reasons_is_not_blamed_on_needs(registry, tmp_path):
    with pytest.raises(TypeError, match="a bug of its own"):
        run(conf(loss="own-bug", head="linear", strategies=[]), registry=registry, out=tmp_path / "r")


def test_a_dict_without_total_names_the_loss_and_its_keys(registry, tmp_path):
    msg = fails(registry, tmp_path, loss="no-total")
    assert "loss 'no-total'" in msg and "'total'" in msg and "'loss', 'aux'" in msg
