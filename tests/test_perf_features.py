"""No needless compute: the text tower is skipped when nothing needs it, frozen
prefixes carry no autograd graph, and the speed switches (grad checkpointing,
compile, DataLoader workers, precision) do what they say without changing what
trains."""
import json

import pytest
import torch

from clipft.config import RunConfig
from numerics import TINY_DEPTH, TINY_REDUCTION, assert_close_rel

DATA = "shapes:n=32,val_n=16"


pytestmark = pytest.mark.usefixtures("one_thread")




def _run(registry, tmp_path, name, **kw):
    from clipft.engine.prepare import prepare
    from clipft.engine.session import build_summary, train_run as train
    from clipft.progress import Silent

    cfg = RunConfig(**{"model": "tiny-vit", "data": DATA, "epochs": 2, "batch_size": 16,
                       "strategies": ["full"], "lr": 1e-3, **kw})
    run = prepare(cfg, registry)
    out = tmp_path / name
    out.mkdir()
    stats = train(run, out, Silent())
    params = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    return run, build_summary(run, stats, out), params


def _max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("strategies", [["full"], []], ids=["full", "frozen-encoder"])
def test_text_tower_not_run_for_cross_entropy_with_a_linear_head(registry, strategies):
    from clipft.engine.prepare import prepare

    cfg = RunConfig(model="tiny-vit", data=DATA, loss="cross-entropy", head="linear",
                    strategies=strategies, batch_size=16)
    run = prepare(cfg, registry)
    calls = {"text": 0, "image": 0}
    run.model.transformer.register_forward_pre_hook(lambda *a: calls.__setitem__("text", calls["text"] + 1))
    run.model.visual.register_forward_pre_hook(lambda *a: calls.__setitem__("image", calls["image"] + 1))
    run.trainer.set_train_mode()
    for batch in run.features.train_epoch(0):
        rec = run.trainer.record(batch)
        run.loss(rec).backward()
    # two batches through the image tower (live, or once into the cache); no text
    assert calls == {"text": 0, "image": 2}
    assert rec.text_features is None and rec.logits is not None


def test_contrastive_does_run_the_text_tower(registry):
    """The counter above can see text-tower calls."""
    from clipft.engine.prepare import prepare

    run = prepare(RunConfig(model="tiny-vit", data=DATA, strategies=["full"], batch_size=16), registry)
    calls = []
    run.model.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    run.trainer.set_train_mode()
    rec = run.trainer.record(next(iter(run.features.train_epoch(0))))
    assert len(calls) == 1 and rec.text_features is not None


def test_autograd_stops_at_the_first_trainable_block(registry):
    """Blocks before the first trainable one run without a graph (open_clip runs
    blocks in sequence): their outputs do not require grad."""
    from clipft.engine.cache.plan import trainable as _trainable
    from clipft.engine.prepare import prepare

    run = prepare(RunConfig(model="tiny-vit", data=DATA, loss="cross-entropy", head="linear",
                            batch_size=16, cache=False), registry)
    blocks = run.model.visual.transformer.resblocks
    for p in blocks[2].parameters():
        p.requires_grad_(True)
    assert [_trainable(b) for b in blocks] == [False, False, True, False]
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad)) for b in blocks]
    run.trainer.set_train_mode()
    batch = next(iter(run.loaders.train(0)))
    run.model.encode_image(batch["images"]).sum().backward()
    for h in hooks:
        h.remove()
    assert seen == [False, False, True, True]
    assert blocks[0].mlp.c_fc.weight.grad is None and blocks[2].mlp.c_fc.weight.grad is not None


@pytest.mark.numerics
def test_grad_checkpointing_flag(invoke, registry, tmp_path, small_shapes):
    res = invoke("run", "--model", "tiny-vit", "--data", small_shapes, "--strategy", "full",
                 "--epochs", "1", "--grad-checkpointing", "--out", tmp_path / "gc", "--json")
    assert res.exit_code == 0, res.output
    assert "grad_checkpointing = true" in (tmp_path / "gc" / "config.toml").read_text()

    run, _, with_gc = _run(registry, tmp_path, "with", grad_checkpointing=True, epochs=1)
    assert run.model.visual.transformer.grad_checkpointing and run.model.transformer.grad_checkpointing
    assert run.speed == {"grad_checkpointing": True}
    plain_run, _, plain = _run(registry, tmp_path, "without", epochs=1)
    assert not plain_run.model.visual.transformer.grad_checkpointing
    # recomputing activations changes memory, not results: backward recomputes
    # each block's forward with the same kernels on the same inputs, so exact
    assert _max_diff(with_gc, plain) == 0.0


def test_compile_is_opt_in_and_regional(registry):
    from clipft.engine.prepare import prepare

    def compiled(run):
        return [m._compiled_call_impl is not None for m in run.model.modules()
                if type(m).__name__ == "ResidualAttentionBlock"]

    off = prepare(RunConfig(model="tiny-vit", data=DATA, strategies=["full"]), registry, build_optimizer=False)
    on = prepare(RunConfig(model="tiny-vit", data=DATA, strategies=["full"], compile=True), registry,
                 build_optimizer=False)
    assert compiled(off) and not any(compiled(off))
    assert compiled(on) and all(compiled(on))     # 4 image + 4 text blocks
    assert on.speed["compiled_modules"] == 8
    # parameter names (checkpoints, caches) are unchanged by compiling
    assert [n for n, _ in on.model.named_parameters()] == [n for n, _ in off.model.named_parameters()]


@pytest.mark.numerics
def test_workers_persist_across_epochs_and_do_not_change_results(registry, tmp_path):
    run, _, with_workers = _run(registry, tmp_path, "w1", num_workers=1, cache=False)
    _, _, in_process = _run(registry, tmp_path, "w0", num_workers=0, cache=False)
    # a worker process decodes the same images into the same tensors: exact
    assert _max_diff(with_workers, in_process) == 0.0
    loader = run.loaders._loaders[(id(run.bundle.train), True)]
    assert loader.persistent_workers and loader._iterator is not None   # one worker pool, kept


def test_summary_and_final_table_show_speed_and_cache(invoke, tmp_path, small_shapes):
    res = invoke("run", "--model", "tiny-vit", "--data", small_shapes, "--loss", "cross-entropy",
                 "--head", "linear", "--epochs", "2", "--out", tmp_path / "s", "--json")
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["train"]["samples_per_s"] > 0 and s["train"]["peak_rss_mb"] > 50
    assert s["cache"]["hits"] > 0 and s["cache"]["build_seconds"] > 0
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["cache"] == s["cache"]
    assert "cache hits" in res.stderr and "samples/s" in res.stderr and "peak RSS" in res.stderr


def test_precision_runs_and_is_recorded(invoke, tmp_path, small_shapes):
    res = invoke("run", "--model", "tiny-vit", "--data", small_shapes, "--strategy", "full",
                 "--epochs", "1", "--precision", "bf16", "--out", tmp_path / "bf16", "--json")
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["precision"] == "bf16" and s["train"]["final_loss"] == s["train"]["final_loss"]


@pytest.mark.numerics
def test_trimmed_text_encoding_matches_encode_text():
    from clipft.encode import encode_text_trimmed, text_trim_length
    from clipft.models import load_model

    lm = load_model("tiny-vit", "none")
    model, tokens = lm.model.eval(), lm.tokenizer(["a photo of a red circle.", "a blue square", "x"])
    assert text_trim_length(model, tokens) == int(tokens.argmax(-1).max()) + 1 < tokens.shape[1]
    with torch.no_grad():
        full, trimmed = model.encode_text(tokens), encode_text_trimmed(model, tokens)
    # the padding is causally masked, so the maths is the same, but products and
    # softmax run over shorter rows (other blocking) in each text block
    assert_close_rel(trimmed, full, reduction=TINY_REDUCTION, depth=TINY_DEPTH, what="trimmed text")
    # hooks on the token embedding (prompt learners) still see full rows
    seen = []
    h = model.token_embedding.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    with torch.no_grad():
        encode_text_trimmed(model, tokens)
    h.remove()
    assert seen == [tokens.shape[1]]
    # a non-causal mask, or a replaced encode_text, means the full rows run
    model.attn_mask = torch.zeros_like(model.attn_mask)
    assert text_trim_length(model, tokens) is None
    model = load_model("tiny-vit", "none").model
    model.encode_text = lambda text, normalize=False: text
    assert text_trim_length(model, tokens) is None


@pytest.mark.parametrize("scale", [1e-3, 10.0], ids=["below-max-norm", "clipped"])
def test_clip_gradients_matches_torch_bit_for_bit(scale):
    from clipft.engine.loop import clip_gradients

    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(40, 30)) for _ in range(3)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for p, q in zip(ours, ref):
        p.grad = torch.randn_like(p) * scale
        q.grad = p.grad.clone()
    before = [p.grad.clone() for p in ours]
    clip_gradients(ours, 1.0)
    torch.nn.utils.clip_grad_norm_(ref, 1.0)
    # exact: clip_gradients is torch's norm and scaling (the same ops on the same
    # tensors), minus the multiply by exactly 1 when nothing needs clipping
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ours, ref))
    changed = any(not torch.equal(p.grad, b) for p, b in zip(ours, before))
    assert changed == (scale > 1)


def test_peak_rss_is_this_process_not_its_parent():
    """summary.json's train.peak_rss_mb: a run started from a large process (a
    notebook, a benchmark harness) must not report the parent's memory."""
    import subprocess
    import sys

    from clipft.engine.session import peak_rss_mb as _peak_rss_mb

    ballast = bytearray(600 * 2**20)
    ballast[::4096] = b"\x01" * len(ballast[::4096])        # touch every page
    parent = _peak_rss_mb()
    code = "from clipft.engine.session import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True).stdout)
    assert 50 < child < parent - 400
    del ballast
