"""Run a config twice, once straight and once crashing right after its first
checkpoint is saved (the end of epoch 1), then resume the crashed one: what the
plugin tests use to show that a resume is bit-exact."""
from __future__ import annotations

import attrs
import pytest


@attrs.define
class Resumed:
    whole: dict          # summary of the uninterrupted run
    resumed: dict        # summary of the resumed run
    straight: object     # its run directory
    crashed: object      # the crashed-then-resumed run directory
    first: dict          # tensors of ``file`` in the crashed run's first checkpoint


def crash_after_first_checkpoint_then_resume(conf, tmp_path, monkeypatch, file: str = "model.safetensors",
                                             before_crash=None, after_crash=None, **run_kw) -> Resumed:
    """``before_crash(summary, straight_dir)`` may check the uninterrupted run
    before the crashed one starts; ``after_crash(crashed_dir)`` the crashed
    run's directory before it is resumed; ``run_kw`` go to every ``run`` call
    (``registry=`` for in-process plugins)."""
    from safetensors.torch import load_file

    from clipft.api import run
    from clipft.engine.checkpoint import Checkpointer

    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    whole = run(conf, out=straight, **run_kw)
    if before_crash is not None:
        before_crash(whole, straight)

    class Crash(Exception):
        pass

    real_save = Checkpointer.save

    def save_then_crash(self, *a, **k):
        real_save(self, *a, **k)
        raise Crash

    monkeypatch.setattr(Checkpointer, "save", save_then_crash)
    with pytest.raises(Crash):
        run(conf, out=crashed, **run_kw)
    monkeypatch.setattr(Checkpointer, "save", real_save)
    if after_crash is not None:
        after_crash(crashed)
    first = load_file(str(crashed / "checkpoint" / file))
    return Resumed(whole, run(resume=crashed, **run_kw), straight, crashed, first)


def assert_same_checkpoints(a_dir, b_dir, files=("model.safetensors", "optimizer.safetensors")) -> None:
    """The final checkpoints of two runs hold the same tensors, bit for bit."""
    import torch
    from safetensors.torch import load_file

    for name in files:
        a = load_file(str(a_dir / "checkpoint" / name))
        b = load_file(str(b_dir / "checkpoint" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
