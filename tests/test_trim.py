"""Class prompts run the causal text tower only up to the last end-of-text
token of the batch (the default for CLIP's template ensemble, the ``prompt``
learner, CoCoOp's direct path and so the ``text`` head). Padding after that
token never reaches the pooled output, so the result is the full-length one up
to float rounding: bounded here by ``float_tol`` over the tower's depth, for the
embeddings and for the gradient a prompt learner trains on. (CoCoOp's own
trimmed-vs-hooked check is in test_cocoop.py; the prompt learner against an
independent full-length re-implementation in test_prompt.py.)"""
from __future__ import annotations

import copy

import pytest
import torch

from numerics import TINY_DEPTH, TINY_REDUCTION, assert_close_rel

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]

CLASSES = ["red circle", "blue square", "green dodecahedron", "a rather long purple cross"]
TEMPLATES = ("a photo of a {}.", "a {} in a picture of many shapes and colours.")


@pytest.fixture(scope="module")
def tiny():
    from clipft import testing
    model, tok, _ = testing.tiny_model()
    return model.eval().requires_grad_(False), tok


def full_length(monkeypatch):
    """Make every trimmed call take open_clip's full-length ``encode_text``."""
    import clipft.encode as enc
    monkeypatch.setattr(enc, "text_trim_length", lambda model, tokens: None)


def test_the_template_ensemble_is_cut_and_matches_the_full_length(tiny, monkeypatch):
    from clipft.encode import class_text_features, text_trim_length
    model, tok = tiny
    tokens = tok([t.format(c) for c in CLASSES for t in TEMPLATES])
    assert text_trim_length(model, tokens) < tokens.shape[1]          # there is padding to skip
    calls = []
    real = model.transformer.forward
    model.transformer.forward = lambda x, *a, **k: calls.append(x.shape[1]) or real(x, *a, **k)
    try:
        with torch.no_grad():
            trimmed = class_text_features(model, tok, CLASSES, TEMPLATES, "cpu")
            full_length(monkeypatch)
            full = class_text_features(model, tok, CLASSES, TEMPLATES, "cpu")
    finally:
        del model.transformer.forward
    assert calls[0] < calls[1] == tokens.shape[1]                       # the cut ran, then the full tower
    assert_close_rel(trimmed, full, reduction=TINY_REDUCTION, depth=TINY_DEPTH, what="template ensemble")


def test_the_prompt_learner_is_cut_and_its_gradient_matches(tiny, monkeypatch):
    from clipft.context import BuildContext
    from clipft_prompt import PromptOptions, PromptTuning
    model, tok = tiny
    m = copy.deepcopy(model)
    ctx = BuildContext(model=m, model_name="tiny-vit", tokenizer=tok, device=torch.device("cpu"),
                       classnames=list(CLASSES))
    PromptTuning(PromptOptions(init=None, n_ctx=6)).apply(m, ctx)
    learner = m.clipft_class_text
    with torch.no_grad():
        learner.ctx.copy_(torch.randn(learner.ctx.shape, generator=torch.Generator().manual_seed(4)) * 0.1)
    target = torch.randn(len(CLASSES), 64, generator=torch.Generator().manual_seed(5))

    def forward_backward():
        learner.ctx.grad = None
        out = learner(m, tok, CLASSES)
        (out * target).sum().backward()
        return out.detach(), learner.ctx.grad.clone()

    out_t, grad_t = forward_backward()
    full_length(monkeypatch)
    out_f, grad_f = forward_backward()
    assert_close_rel(out_t, out_f, reduction=TINY_REDUCTION, depth=TINY_DEPTH, what="prompt learner")
    # backward goes down the same depth again
    assert_close_rel(grad_t, grad_f, reduction=TINY_REDUCTION, depth=2 * TINY_DEPTH, what="prompt gradient")
    assert grad_f.abs().max() > 0


def test_captions_are_cut_by_default_and_their_gradients_match(tiny, monkeypatch):
    """Captions (``--trim-text``, on by default): a trained text tower gets the
    full-length gradients up to rounding."""
    from clipft.config import RunConfig
    from clipft.engine.features import Encoders
    model, tok = tiny
    assert RunConfig().trim_text is True
    m = copy.deepcopy(model).requires_grad_(True)
    enc = Encoders(m, tok, torch.device("cpu"), [], (), trim_text=True)
    captions = ["a red circle", "a large blue square on a white background", "green"]
    target = torch.randn(len(captions), 64, generator=torch.Generator().manual_seed(6))
    params = [p for _, p in m.named_parameters() if p.requires_grad]

    def forward_backward():
        out = enc.texts(captions)
        return out.detach(), torch.autograd.grad((out * target).sum(), params, allow_unused=True)

    out_t, grads_t = forward_backward()
    full_length(monkeypatch)
    out_f, grads_f = forward_backward()
    assert_close_rel(out_t, out_f, reduction=TINY_REDUCTION, depth=TINY_DEPTH, what="captions")
    checked = 0
    for (name, _), a, b in zip(m.named_parameters(), grads_t, grads_f):
        if b is None:
            assert a is None, name
            continue
        assert_close_rel(a, b, reduction=TINY_REDUCTION, depth=2 * TINY_DEPTH, what=f"caption grad {name}")
        checked += 1
    assert checked > 10


def test_a_text_tower_without_a_causal_mask_runs_full_length_not_crash():
    """open_clip builds a text tower with ``no_causal_mask`` (``attn_mask`` None,
    e.g. last-token pooling): nothing may be cut, and the token-embedding path
    (CoCoOp's direct path, the prompt learner) runs it at full length."""
    import open_clip

    from clipft.encode import causal_text_length, encode_text_trimmed, encode_token_embeddings

    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=32, vision_cfg={"image_size": 32, "patch_size": 16, "width": 32,
                                                    "layers": 1, "head_width": 16},
                           text_cfg={"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2,
                                     "layers": 2, "no_causal_mask": True, "pool_type": "last"}).eval()
    assert model.attn_mask is None
    tokens = torch.randint(1, 100, (3, 16))
    with torch.no_grad():
        expected = model.encode_text(tokens)
        assert causal_text_length(model, tokens) is None
        assert_close_rel(encode_text_trimmed(model, tokens), expected, reduction=32, depth=2)
        got = encode_token_embeddings(model, model.token_embedding(tokens), tokens)
    assert_close_rel(got, expected, reduction=32, depth=2, what="token embeddings, no causal mask")
