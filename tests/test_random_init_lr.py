"""The default lr follows the weights: strategies recommend rates for
pretrained weights (1e-5 for full), which leave a randomly initialised model
near chance, so ``--pretrained none`` without ``--lr`` trains at
``RANDOM_INIT_LR`` (or a strategy's ``default_lr_scratch``); ``--lr`` wins."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from clipft.engine.prepare import HEAD_ONLY_LR, RANDOM_INIT_LR, _default_lr
from clipft.models import random_init
from clipft.specs import Stage, StrategySpec


def _spec(name, lr=None, scratch=None):
    return (StrategySpec(name=name, summary="", build=lambda o: None, default_lr=lr, default_lr_scratch=scratch),
            None)


def _lr(strategies, lr=None, scratch=False, stage=None):
    return _default_lr(SimpleNamespace(strategies=strategies, head=None), SimpleNamespace(lr=lr), stage=stage,
                       from_scratch=scratch)


def test_the_default_follows_whether_the_weights_are_pretrained():
    full = [_spec("full", 1e-5)]
    assert _lr(full) == (1e-5, "default of strategy 'full'")
    lr, why = _lr(full, scratch=True)
    assert lr == RANDOM_INIT_LR > 1e-5 and "random init (--pretrained none)" in why and "1e-05" in why
    assert _lr(full, lr=3e-5, scratch=True) == (3e-5, "given (--lr)")                 # --lr wins
    assert _lr(full, scratch=True, stage=Stage(name="s", lr=0.1))[0] == 0.1          # so does a stage's lr
    # a strategy's own scratch default, else a default already as high stays
    assert _lr([_spec("m"), _spec("x", 1e-5, 3e-3)], scratch=True)[0] == 3e-3
    assert _lr([_spec("prompt", 2e-3)], scratch=True) == (2e-3, "default of strategy 'prompt'")
    assert _lr([], scratch=True)[0] == max(HEAD_ONLY_LR, RANDOM_INIT_LR)


def test_which_models_start_from_random_weights():
    assert random_init("tiny-vit", "auto") and random_init("ViT-B-32", "none")
    assert not random_init("ViT-B-32", "/tmp/weights.safetensors")
    assert not random_init("hf-hub:org/model", "auto")          # brings its own weights


def test_plan_and_run_say_why(invoke, tmp_path):
    r = invoke("plan", "--model", "tiny-vit", "--pretrained", "none", "--strategy", "full",
               "--data", "shapes:n=16,val_n=8")
    assert r.exit_code == 0, r.stderr
    assert f"lr {RANDOM_INIT_LR:g}: default for random init (--pretrained none)" in r.stdout
    r = invoke("plan", "--model", "tiny-vit", "--strategy", "full", "--lr", "2e-5", "--data", "shapes:n=16,val_n=8",
               "--json")
    assert json.loads(r.stdout)["lr"] == 2e-5 and json.loads(r.stdout)["lr_reason"] == "given (--lr)"
    r = invoke("run", "--model", "tiny-vit", "--strategy", "full", "--data", "shapes:n=16,val_n=8",
               "--batch-size", "8", "--epochs", "1", "--callback", "none", "--out", tmp_path / "run", "--json")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["train"]["lr"] == pytest.approx(RANDOM_INIT_LR) and "random init" in s["train"]["lr_reason"]
    assert f"lr {RANDOM_INIT_LR:g}: default for random init" in r.stderr
