"""An evaluation encodes the class prompts once (clipft.encode.shared_class_text).

Zero-shot top-1 and a ``text`` head both need the class-prompt embeddings; with
a prompt learner each is a text-tower pass, and the engine evaluates before
training and after every epoch. Inside the block a call without gradient is
shared; a call with gradient, a different autocast state, other classes or a
conditional (per-image) encoder is not."""
from __future__ import annotations

import copy
import json

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["red circle", "blue square", "green triangle"]
TEMPLATES = ("a photo of a {}.",)


@pytest.fixture(scope="module")
def prompted():
    from clipft import testing
    from clipft.context import BuildContext
    from clipft_prompt import PromptOptions, PromptTuning
    model, tok, _ = testing.tiny_model()
    m = copy.deepcopy(model).eval()
    ctx = BuildContext(model=m, model_name="tiny-vit", tokenizer=tok, device=torch.device("cpu"),
                       classnames=list(CLASSES))
    PromptTuning(PromptOptions(init=None, n_ctx=4)).apply(m, ctx)
    return m, tok


def counting(monkeypatch):
    from clipft.prompt_kit import PromptLearner
    calls = []
    real = PromptLearner.forward

    def forward(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)
    monkeypatch.setattr(PromptLearner, "forward", forward)
    return calls


def test_one_pass_per_block_without_gradient(prompted, monkeypatch):
    from clipft.encode import class_text_features, shared_class_text
    m, tok = prompted
    calls = counting(monkeypatch)
    with torch.no_grad():
        alone = class_text_features(m, tok, CLASSES, TEMPLATES, "cpu")
        with shared_class_text():
            a = class_text_features(m, tok, CLASSES, TEMPLATES, "cpu")
            b = class_text_features(m, tok, CLASSES, TEMPLATES, "cpu", batch=7)
            other = class_text_features(m, tok, CLASSES[:2], TEMPLATES, "cpu")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = class_text_features(m, tok, CLASSES, TEMPLATES, "cpu")
        after = class_text_features(m, tok, CLASSES, TEMPLATES, "cpu")
    # alone, a (b shared with it), other, low, after: five passes for six calls
    assert len(calls) == 5
    assert b is a and torch.equal(a, alone) and torch.equal(after, alone)
    assert other.shape[0] == 2 and low is not a
    with shared_class_text():
        g1 = class_text_features(m, tok, CLASSES, TEMPLATES, "cpu")
        g2 = class_text_features(m, tok, CLASSES, TEMPLATES, "cpu")
    assert len(calls) == 7 and g1.requires_grad and g2 is not g1   # with gradient: never shared


def test_a_run_encodes_the_class_prompts_once_per_evaluation(invoke, tmp_path, monkeypatch):
    calls = counting(monkeypatch)
    r = invoke("run", "--model", "tiny-vit", "--data", "shapes:n=32,val_n=16", "--strategy", "prompt:init=none",
               "--head", "text", "--loss", "cross-entropy", "--epochs", "2", "--batch-size", "16",
               "--callback", "none", "--out", tmp_path / "r", "--json")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    evaluations = 1 + s["train"]["epochs"]                     # before training, then after each epoch
    # a training step encodes the prompts once (with gradient), an evaluation once, not twice
    assert len(calls) == s["train"]["steps"] + evaluations, (len(calls), s["train"]["steps"])
    after = s["eval"]["after"]
    assert after["top1"] == after["head_top1"]                  # the text head is the zero-shot classifier
