"""Prompt tuning (CoOp) and VPT-shallow: the encoding reproduces open_clip's
encode_text (EOT pooling by argmax included), only the prompt vectors train,
evaluation sees the learned prompts, options and errors, and a tuning run with
``--head text`` improves zero-shot top-1 on a task the base never saw."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from numerics import TINY_DEPTH, TINY_REDUCTION, assert_close_rel
from peft_base import NOVEL_DATA, SMALL_NOVEL, base_checkpoint, wanted

CLASSES = ["red circle", "blue square", "green dodecahedron", "orange"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    from clipft.models import load_model
    torch.manual_seed(0)
    lm = load_model("tiny-vit", "none")
    model = lm.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, lm.tokenizer


def install(model, classnames=CLASSES, **kw):
    from clipft.context import BuildContext
    from clipft_prompt import PromptOptions, PromptTuning
    m = copy.deepcopy(model)
    ctx = BuildContext(model=m, model_name="tiny-vit", tokenizer=TOKENIZER[0], device=torch.device("cpu"),
                       classnames=list(classnames))
    sel = PromptTuning(PromptOptions(**kw)).apply(m, ctx)
    return m, sel


TOKENIZER = []


@pytest.fixture(autouse=True)
def _tok(tiny):
    TOKENIZER[:] = [tiny[1]]


def manual_encode(model, rows, index, ctx):
    """An independent re-implementation of open_clip's CLIP.encode_text with the
    context spliced in: embeddings, positions, causal transformer, ln_final,
    pooling at the EOT token (argmax id), projection."""
    x = model.token_embedding(rows)
    for c in range(rows.shape[0]):
        for pos in range(rows.shape[1]):
            i = int(index[c, pos])
            if i >= 0:
                x[c, pos] = ctx[c, i] if ctx.ndim == 3 else ctx[i]
    x = x + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    eot = rows.argmax(dim=-1)
    assert (rows[torch.arange(len(rows)), eot] == 49407).all()
    return x[torch.arange(x.shape[0]), eot] @ model.text_projection


@pytest.mark.numerics
def test_init_from_text_reproduces_the_zero_shot_prompt_exactly(tiny):
    """Context initialised from "a photo of a" at the end = CLIP's template
    "a photo of a {}." token for token, so the encodings are identical."""
    model, tok = tiny
    from clipft.encode import class_text_features, encode_text_trimmed
    m, _ = install(model)
    assert m.clipft_class_text.n_ctx == 4
    with torch.no_grad():
        learned = class_text_features(m, tok, CLASSES, ("ignored {}",), "cpu")
        plain = F.normalize(encode_text_trimmed(model, tok([f"a photo of a {c}." for c in CLASSES])), dim=-1)
    # exact: the context vectors are copies of the template's token embeddings, so
    # both sides feed the same rows, cut at the same length, through the same
    # text-tower kernels
    assert torch.equal(learned, plain)


@pytest.mark.numerics
@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("class_specific", [False, True])
def test_encoding_matches_open_clip_pipeline(tiny, position, class_specific):
    model, tok = tiny
    m, _ = install(model, init=None, n_ctx=5, position=position, class_specific=class_specific)
    learner = m.clipft_class_text
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        learner.ctx.copy_(torch.randn(learner.ctx.shape, generator=g) * 0.1)
        got = learner(m, tok, CLASSES)
        rows, index = learner.rows_for(tok, tuple(CLASSES), torch.device("cpu"))
        want = manual_encode(m, rows, index, learner.ctx)
    # an independent re-implementation (per-row splicing, open_clip's
    # Transformer called directly): the same maths, possibly other kernel calls
    # in each of the text tower's blocks
    assert_close_rel(got, want, reduction=TINY_REDUCTION, depth=TINY_DEPTH, what="prompt encoding")
    # the layout CoOp describes: 5 context slots, the class tokens where asked
    name = tok.encode("green dodecahedron")
    row, idx = rows[2].tolist(), index[2].tolist()
    assert sum(i >= 0 for i in idx) == 5
    start = {"end": 6, "middle": 3, "front": 1}[position]
    assert row[start:start + len(name)] == name
    eot = row.index(49407)
    assert row[eot - 1] == tok.encode(".")[0] and row[0] == 49406


def test_gradients_reach_only_the_context(tiny):
    model, tok = tiny
    from clipft.encode import class_text_features
    m, sel = install(model, class_specific=True)
    (name, ctx), = sel[0].params
    assert name == "clipft_class_text.ctx" and ctx.shape == (len(CLASSES), 4, 64)
    m.train()
    class_text_features(m, tok, CLASSES, ("{}",), "cpu")[1].sum().backward()
    assert ctx.grad[1].abs().sum() > 0
    assert ctx.grad[[0, 2, 3]].abs().sum() == 0          # class-specific: only class 1's context
    assert all(p.grad is None for n, p in m.named_parameters() if n != name)


def test_shared_context_encodes_new_classes_class_specific_does_not(tiny):
    model, tok = tiny
    from clipft.encode import class_text_features
    from clipft.errors import ClipftError
    m, _ = install(model)
    with torch.no_grad():
        feats = class_text_features(m, tok, ["purple cross", "yellow star"], (), "cpu")
    assert feats.shape == (2, 64)
    m, _ = install(model, class_specific=True)
    with pytest.raises(ClipftError, match="learned for 4 classes"):
        class_text_features(m, tok, ["purple cross"], (), "cpu")


def test_options_and_errors(invoke):
    cases = [
        ("prompt:n_ctx=8", "n_ctx=8, but init 'a photo of a' is 4 tokens"),
        ("prompt:n_ctx=0", "n_ctx must be at least 1"),
        ("prompt:position=left", "must be one of end, middle, front"),
        ("prompt:init=none,n_ctx=40", "needs 45 tokens with 40 context tokens, but the text encoder takes 32"),
        ("prompt:ctx=4", "Valid options: n_ctx, init, class_specific, position"),
    ]
    for strategy, message in cases:
        r = invoke("plan", "--model", "tiny-vit", "--data", "shapes:n=8,val_n=8", "--strategy", strategy)
        assert r.exit_code == 2, (strategy, r.output)
        assert message in r.stderr, (strategy, r.stderr)
    r = invoke("plan", "--model", "tiny-vit", "--data", "shapes:n=8,val_n=8", "--strategy", "prompt",
               "--head", "zero-shot", "--loss", "cross-entropy")
    assert r.exit_code == 2 and "use --head text" in r.stderr
    r = invoke("plan", "--model", "tiny-vit", "--data", "shapes:n=8,val_n=8",
               "--strategy", "prompt:init=none", "--head", "text", "--json")
    assert r.exit_code == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["params"]["trainable"] == 16 * 64          # CoOp's 16 random context vectors


def test_prompt_needs_classes(invoke, tmp_path):
    (tmp_path / "c.csv").write_text("image,caption\n")
    r = invoke("plan", "--model", "tiny-vit", "--data", f"captions:file={tmp_path / 'c.csv'}",
               "--strategy", "prompt")
    assert r.exit_code == 2


def test_vision_prompt(tiny, invoke):
    model, tok = tiny
    from clipft_vision_prompt import VisionPrompt, VisionPromptOptions
    m = copy.deepcopy(model)
    (sel,) = VisionPrompt(VisionPromptOptions(n_tokens=3)).apply(m, None)
    (name, prompts), = sel.params
    assert name == "visual.clipft_vision_prompts.prompts" and prompts.shape == (3, 64)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    seen = []
    h = m.visual.transformer.resblocks[0].register_forward_hook(lambda mod, a, o: seen.append(o.shape))
    with torch.no_grad():
        out = m.encode_image(images)
        base = model.encode_image(images)
    h.remove()
    assert seen == [torch.Size([2, 1 + 3 + 16, 64])]      # class token, prompts, patches
    # the prompt tokens (randn init) change what every token attends to: O(1), not rounding
    assert out.shape == base.shape and not torch.allclose(out, base)
    with torch.no_grad():
        prompts.zero_()
    # zero prompts are still tokens the others attend to: outputs differ from base,
    # but removing the module's hooks gives the base back exactly
    m.visual.clipft_vision_prompts.uninstall()
    with torch.no_grad():   # exact: without the hooks it is the base model's own forward
        assert torch.equal(m.encode_image(images), base)
    r = invoke("plan", "--model", "tiny-rn", "--data", "shapes:n=8,val_n=8", "--strategy", "vision-prompt")
    assert r.exit_code == 2 and "no token sequence" in r.stderr


# The novel task at half NOVEL_DATA's size: the runs below are 4 instead of 2
PROMPT_DATA = NOVEL_DATA.replace("n=512,", "n=256,")
SEEDS = (0, 1, 2)


@pytest.mark.numerics
def test_prompt_tuning_improves_zero_shot_on_a_new_task(invoke, tmp_path_factory, tmp_path):
    """The issue's command, defaults: context from "a photo of a", so the
    summary's ``before`` is exactly the base model's zero-shot top-1 (the data's
    template). CoOp's 16 random context vectors learn the new task.

    What is robust and what is not (12 bases, peft_base.wanted). A shared
    context initialised from the template cannot always remap two untrained
    colour words: on some bases it ends at zero-shot (0.00 -> 0.00,
    0.35 -> 0.36), so the defaults are checked for training (the loss falls, on
    all 12), not for a gain. 16 random context vectors with lr 5e-3 for 10
    epochs reach 0.55-0.73 (mean of 3 seeds) on eleven bases, at least 0.19 above
    their zero-shot; single seeds dip to 0.52, hence the mean. On the twelfth,
    whose zero-shot is 0.65 and whose features barely separate the new colours,
    the mean is 0.51 (0.71, 0.43, 0.39). Asked: +0.05 over zero-shot, or 0.45
    (chance is 1/6). Which variant wins is not asserted: it flips from base to base."""
    base = base_checkpoint(tmp_path_factory)

    def tune(tag, strategy, seed, *args):
        out = tmp_path / tag
        r = invoke("run", "--model", "tiny-vit", "--pretrained", base["weights"], "--data", PROMPT_DATA,
                   "--strategy", strategy, "--head", "text", "--batch-size", "32", "--seed", seed, *args,
                   "--out", out, "--json")
        assert r.exit_code == 0, r.stderr
        s = json.loads(r.stdout)
        assert s["eval"]["after"]["head_top1"] == s["eval"]["after"]["top1"]  # text head = zero-shot classifier
        saved = load_file(str(out / "checkpoint" / "model.safetensors"))
        assert list(saved) == ["clipft_class_text.ctx"]
        assert s["params"]["trainable"] == saved["clipft_class_text.ctx"].numel()
        return s

    default = tune("default", "prompt", 0, "--epochs", "3")
    zero_shot = default["eval"]["before"]["top1"]
    losses = [h["train_loss"] for h in default["eval"]["history"][1:]]
    # on every base above the epoch-mean loss falls, by 0.24 or more (2.7% at worst)
    assert losses[-1] < losses[0], losses
    random16 = [tune(f"random16-{seed}", "prompt:init=none", seed, "--epochs", "10", "--lr", "5e-3")
                ["eval"]["after"]["top1"] for seed in SEEDS]
    mean16 = sum(random16) / len(random16)
    print(f"base top-1 on its own task {base['top1']:.3f}; on unseen colours: zero-shot {zero_shot:.3f}, "
          f"prompt (defaults) {default['eval']['after']['top1']:.3f}, prompt init=none (16 ctx) "
          f"{' '.join(f'{a:.3f}' for a in random16)} (mean {mean16:.3f})")
    assert mean16 >= wanted(zero_shot, 0.05, 0.45), (zero_shot, random16)
    assert mean16 >= 0.4, random16
    # the learned prompts are what a rebuilt run evaluates with
    from clipft.engine.loadrun import load_run
    run = load_run(tmp_path / "default")
    saved = load_file(str(tmp_path / "default" / "checkpoint" / "model.safetensors"))
    assert torch.equal(run.model.clipft_class_text.ctx, saved["clipft_class_text.ctx"])


def test_prompt_with_logit_scale_and_cross_entropy(invoke, tmp_path_factory, tmp_path):
    base = base_checkpoint(tmp_path_factory)
    out = tmp_path / "combo"
    r = invoke("run", "--model", "tiny-vit", "--pretrained", base["weights"], "--data", SMALL_NOVEL,
               "--strategy", "prompt", "--strategy", "logit-scale", "--head", "text",
               "--loss", "cross-entropy", "--epochs", "1", "--batch-size", "16", "--lr", "1e-2",
               "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    trainable = json.loads((out / "checkpoint" / "state.json").read_text())["trainable"]
    assert trainable == ["clipft_class_text.ctx", "logit_scale"]
    saved = load_file(str(out / "checkpoint" / "model.safetensors"))
    assert set(saved) == {"clipft_class_text.ctx", "logit_scale"}
    base_sd = load_file(str(base["weights"]))
    assert not torch.equal(saved["logit_scale"], base_sd["logit_scale"])
