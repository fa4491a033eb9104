"""``--grad-accum K`` under a batch-coupled loss (contrastive, SigLIP): the loss
over all K·B pairs at once (engine/accumulate.py, GradCache), so the gradient
is the large batch's; a per-sample loss (cross-entropy) keeps plain
accumulation.

Tolerances (tests/numerics.py). The large-batch step and its reference run
the same forward kernels on the same micro-batches (same shapes, same dropout
draws) and the same loss on the same concatenated features; what differs is
where the K per-micro-batch contributions to a parameter's gradient are summed
(autograd's accumulation against the K backwards' ``.grad +=``): a K-term sum
in another order, so ``float_tol(reduction=K)``. Against a true single batch
of K·B (one forward of K·B rows), every weight gradient is also a sum over the
K·B·L rows (L tokens, at most the context length 32) taken in one reduction
instead of K partial ones, and the matmuls see another row count (another
blocking), through the tiny model's depth: ``float_tol(K·B·L, TINY_DEPTH)``,
about 1e-4 relative. The old per-micro-batch loss differs by O(1) relative
(other negatives, another softmax): the checks that it differs use 100× the
large tolerance.
"""
from __future__ import annotations

import math

import attrs
import pytest
import torch

import clipft
from numerics import TINY_DEPTH, assert_close_rel, float_tol

pytestmark = pytest.mark.usefixtures("one_thread")

K, B, L = 2, 8, 32            # micro-batches, their size, the tiny models' context length
DATA = f"shapes:n={K * B},val_n=8"
DROPOUT = 0.2
SEED = 5


def prepared(registry, strategies, *, batch_size=B, grad_accum=K, loss="contrastive", head=None, cache=False,
             model="tiny-vit", data=DATA, attention_dropout=0.0, precision="fp32"):
    from clipft.api import RunConfig
    from clipft.engine.prepare import prepare

    cfg = RunConfig(model=model, pretrained="none", data=data, strategies=strategies, loss=loss, head=head,
                    batch_size=batch_size, grad_accum=grad_accum, optimizer="sgd", lr=0.5, weight_decay=0.0,
                    warmup_steps=0, schedule="constant", grad_clip=0.0, seed=0, device="cpu", cache=cache,
                    epochs=1, precision=precision)
    run = prepare(cfg, registry)
    if attention_dropout:
        # attention dropout (open_clip reads the attribute in training), not in an
        # image tower served from the cache (the plan would have kept it live)
        for name, m in run.model.named_modules():
            if isinstance(m, torch.nn.MultiheadAttention) and not (cache and name.startswith("visual.")):
                m.dropout = attention_dropout
    run.trainer.set_train_mode()
    return run


def grads(t) -> dict:
    return {id(p): (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for p in t.params}


def large_batch_grads(t, batches) -> dict:
    t.optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(SEED)
    for b in batches:
        t.large.add(t, b)
    group = t.large.step(t)
    assert math.isfinite(group.value) and len(group.micro) == len(batches)
    return grads(t)


def merged(batches):
    from clipft.engine.features import Batch
    return Batch(torch.cat([b.index for b in batches]), None, [c for b in batches for c in b.captions],
                 torch.cat([b.labels for b in batches]))


def one_graph_grads(t, batches) -> dict:
    """The reference: the K micro-batches' forwards with grad (the same draws
    as the large-batch step's first pass), one loss over all of them, one backward."""
    from clipft.engine.loop import train_forward
    t.optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(SEED)
    outs = [train_forward(t.features, t.head, b, t.needs_text) for b in batches]
    cat = [torch.cat([o[k] for o in outs]) if outs[0][k] is not None else None for k in range(3)]
    total, _ = t.loss_of(t.record_from(merged(batches), *cat))
    total.backward()
    return grads(t)


def per_micro_batch_grads(t, batches) -> dict:
    """The old behaviour: each micro-batch's own loss, divided by K."""
    from clipft.engine.loop import train_forward
    t.optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(SEED)
    for b in batches:
        total, _ = t.loss_of(t.record_from(b, *train_forward(t.features, t.head, b, t.needs_text)))
        (total / len(batches)).backward()
    return grads(t)


def worst(a: dict, b: dict) -> float:
    """The largest norm-wise relative difference over the trained tensors."""
    return max(float((a[k] - b[k]).abs().max()) / max(float(b[k].abs().max()), 1e-30) for k in b)


def assert_grads_close(actual: dict, expected: dict, reduction: int, depth: int = 1):
    assert expected and any(float(g.abs().max()) > 0 for g in expected.values())
    for k in expected:
        assert_close_rel(actual[k], expected[k], reduction=reduction, depth=depth, what=f"grad {k}")


CASES = {
    # strategy, cache on, the frozen side the second pass must not run
    "full": (["full"], False, frozenset()),
    "lora": (["lora"], False, frozenset()),               # LoRA's own dropout (0.25 by default) too
    "prompt": (["prompt"], True, frozenset({"image"})),   # class prompts, labelled data; image cached
    "freeze-vision-cached": (["freeze-vision"], True, frozenset({"image"})),
    "vision-prompt": (["vision-prompt"], False, frozenset({"text"})),     # VPT: prompts in the image tower
    "cocoop": (["cocoop"], False, frozenset({"image"})),                  # class prompts conditioned on the image
    "deep-prompts": (["prompt:depth=2", "vision-prompt:depth=2"], False, frozenset()),   # IVLP: both towers
}


@pytest.mark.parametrize("case", list(CASES))
def test_large_batch_gradient_equals_one_graph_over_all_pairs_with_dropout(registry, case, monkeypatch):
    strategies, cache, frozen = CASES[case]
    run = prepared(registry, strategies, cache=cache, attention_dropout=DROPOUT)
    t = run.trainer
    assert t.large is not None
    batches = list(t.features.train_epoch(0))
    assert len(batches) == K and all(len(b) == B for b in batches)
    if cache:
        assert {b.at for b in batches} == {"cache"}
    large = large_batch_grads(t, batches)
    assert t.large.frozen == frozen
    reference = one_graph_grads(t, batches)
    assert_grads_close(large, reference, reduction=K)

    # the old per-micro-batch loss is another gradient (the test can fail)
    assert worst(per_micro_batch_grads(t, batches), reference) > 100 * float_tol(K * B * L, TINY_DEPTH)

    # dropout is on: without replaying the RNG the second pass draws other masks
    import clipft.engine.accumulate as acc
    monkeypatch.setattr(acc, "set_rng_state", lambda state: None)
    assert worst(large_batch_grads(t, batches), reference) > 100 * float_tol(K)


def test_siglip_and_its_own_parameters(registry):
    """SigLIP on a model without a logit bias: the loss's own trainable bias
    gets its gradient in step 2, directly."""
    run = prepared(registry, ["lora"], loss="siglip", attention_dropout=DROPOUT)
    t = run.trainer
    own = [id(p) for p in run.loss.parameters()]
    assert own and all(any(id(q) == i for q in t.params) for i in own)
    batches = list(t.features.train_epoch(0))
    large = large_batch_grads(t, batches)
    reference = one_graph_grads(t, batches)
    assert_grads_close(large, reference, reduction=K)
    assert all(float(reference[i].abs().max()) > 0 for i in own)
    assert worst(per_micro_batch_grads(t, batches), reference) > 100 * float_tol(K * B * L, TINY_DEPTH)


def test_fp16_loss_scaling(registry):
    """fp16 autocast with a grad scaler: the scaled loss's gradient, as one
    graph's scaled backward gives it (the second pass's output gradients are
    already scaled, nothing is scaled twice)."""
    run = prepared(registry, ["lora"], attention_dropout=DROPOUT, precision="fp16")
    t = run.trainer
    assert t.scaler is not None and t.scaler.get_scale() > 1
    batches = list(t.features.train_epoch(0))
    large = large_batch_grads(t, batches)
    from clipft.engine.loop import train_forward
    t.optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(SEED)
    with t.autocast():
        outs = [train_forward(t.features, t.head, b, t.needs_text) for b in batches]
        cat = [torch.cat([o[k] for o in outs]) if outs[0][k] is not None else None for k in range(3)]
        total, _ = t.loss_of(t.record_from(merged(batches), *cat))
    t.scaler.scale(total).backward()
    reference = grads(t)
    assert_grads_close(large, reference, reduction=K)
    # scaled: far larger than an fp32 gradient of this loss could be
    assert max(float(g.abs().max()) for g in reference.values()) > 100


@pytest.mark.parametrize("case", ["full", "lora:dropout=0", "freeze-vision-cached"])
def test_k_micro_batches_step_like_one_batch_of_k_times_b(registry, case):
    """No dropout: against a true single batch of K·B (its own forward), the
    gradients and the weights after one SGD step."""
    strategies, cache = (["freeze-vision"], True) if case == "freeze-vision-cached" else ([case], False)
    small = prepared(registry, strategies, cache=cache)
    one = prepared(registry, strategies, cache=cache, batch_size=K * B, grad_accum=1)
    assert one.trainer.large is None
    t1 = one.trainer
    [batch] = list(t1.features.train_epoch(0))
    t1.optimizer.zero_grad(set_to_none=True)
    total, _ = t1.loss_of(t1.record(batch))
    total.backward()
    expected = grads(t1)
    t1.optimizer_step()

    t = small.trainer
    actual = large_batch_grads(t, list(t.features.train_epoch(0)))
    # the parameters are the same tensors in the same order: compare by position
    pairs = list(zip(t.params, t1.params))
    tol = dict(reduction=K * B * L, depth=TINY_DEPTH)
    for p, q in pairs:
        assert p.shape == q.shape
        assert_close_rel(actual[id(p)], expected[id(q)], what="grad", **tol)
    t.optimizer_step()
    moved = 0.0
    for p, q in pairs:
        g = expected[id(q)]
        p, q = p.detach(), q.detach()
        # one SGD step (lr 0.5): the weights differ by lr x the gradients' difference,
        # plus their own rounding
        assert_close_rel(p, q, scale=0.5 * float(g.abs().max()) + float(q.abs().max()) * 1e-6,
                         what="weight", **tol)
        moved = max(moved, float(g.abs().max()))
    assert moved > 0


def test_the_frozen_tower_runs_once_per_micro_batch(registry):
    """freeze-vision without the cache: the image tower runs in the first pass
    only (K calls per step, not 2K); with the cache, only to fill it."""
    for cache in (False, True):
        run = prepared(registry, ["freeze-vision"], cache=cache)
        calls = []
        run.model.visual.register_forward_hook(lambda *a: calls.append(1))
        t = run.trainer
        batches = list(t.features.train_epoch(0))
        filled = len(calls)
        assert filled == (K if cache else 0)
        for step in range(2):
            large_batch_grads(t, batches)
        assert len(calls) - filled == (0 if cache else 2 * K)


def test_batchnorm_running_stats_are_updated_once_per_micro_batch(registry):
    """tiny-rn trained whole: its BatchNorm layers run in training mode, and the
    second pass must not update their running statistics again."""
    from clipft.engine.loop import train_forward
    run = prepared(registry, ["full"], model="tiny-rn")
    t = run.trainer
    bns = [m for m in run.model.modules() if isinstance(m, torch.nn.BatchNorm2d) and m.training]
    assert bns
    start = {k: v.clone() for k, v in run.model.state_dict().items() if "running" in k or "num_batches" in k}
    batches = list(t.features.train_epoch(0))
    large_batch_grads(t, batches)
    after = {k: v.clone() for k, v in run.model.state_dict().items() if k in start}
    run.model.load_state_dict(start, strict=False)
    torch.manual_seed(SEED)
    with torch.no_grad():
        for b in batches:
            train_forward(t.features, t.head, b, t.needs_text)
    once = {k: v for k, v in run.model.state_dict().items() if k in start}
    assert all(torch.equal(after[k], once[k]) for k in start)
    assert int(bns[0].num_batches_tracked) == K


def test_cross_entropy_keeps_plain_accumulation_bit_for_bit(registry, tmp_path):
    """Per-sample loss: the loop's plain path, each micro-batch's loss / K
    backwarded in turn, exactly (the same operations in the same order)."""
    from clipft.engine.session import train_run
    from clipft.progress import Silent

    kw = dict(loss="cross-entropy", head="linear")
    run = prepared(registry, ["last-n:n=1"], **kw)
    assert run.trainer.large is None
    seen = []
    run.trainer.optimizer.register_step_pre_hook(lambda opt, *a: seen.append(grads(run.trainer)))
    (tmp_path / "r").mkdir()
    train_run(run, tmp_path / "r", Silent())
    assert len(seen) == 1

    ref = prepared(registry, ["last-n:n=1"], **kw).trainer
    ref.set_train_mode()
    ref.optimizer.zero_grad(set_to_none=True)
    for b in ref.features.train_epoch(0):
        total, _ = ref.loss_of(ref.record(b))
        (total / K).backward()
    expected = grads(ref)
    for p, q in zip(run.trainer.params, ref.params):
        assert torch.equal(seen[0][id(p)], expected[id(q)])


def test_summary_plan_and_startup_say_which_accumulation_ran(registry, tmp_path, invoke):
    from clipft import testing
    s = testing.run_plugin(None, strategy="full", loss="contrastive", data=DATA, batch_size=B, grad_accum=K,
                           tmp_path=tmp_path, registry=registry)
    assert s["train"]["steps"] == 1 and s["train"]["samples"] == K * B
    assert s["train"]["accumulation"] == {"mode": "large-batch", "micro_batches": K, "effective_batch": K * B,
                                          "negatives": K * B - 1}
    s = testing.run_plugin(None, strategy="last-n:n=1", loss="cross-entropy", head="linear", data=DATA,
                           batch_size=B, grad_accum=K, tmp_path=tmp_path, registry=registry)
    assert s["train"]["accumulation"] == {"mode": "plain", "micro_batches": K, "effective_batch": K * B,
                                          "negatives": None}
    args = ["--model", "tiny-vit", "--data", DATA, "--strategy", "lora", "--batch-size", B, "--grad-accum", K]
    r = invoke("run", *args, "--epochs", "1", "--callback", "none", "--out", tmp_path / "cli")
    assert r.exit_code == 0, r.output
    assert f"large-batch loss over {K * B} samples ({K * B - 1} negatives each" in r.stderr
    r = invoke("plan", *args)
    assert r.exit_code == 0 and f"--grad-accum {K}: large-batch loss over {K * B} samples" in r.stdout
    r = invoke("plan", *args[:-2], "--json")
    import json
    assert json.loads(r.stdout)["accumulation"]["negatives"] == B - 1


class ProjectionsL2(clipft.Strategy):
    """The projections, held near zero by a loss term (one that may read anything in the record)."""

    def apply(self, model, ctx):
        self.params = [model.visual.proj, model.text_projection]
        return [clipft.Selection(group="proj", params=[(n, p) for n, p in model.named_parameters()
                                                       if p is self.params[0] or p is self.params[1]])]

    def loss_terms(self, record):
        return {"l2": 1e-3 * sum(p.pow(2).sum() for p in self.params)}


class L2Plugin:
    @clipft.hookimpl
    def clipft_register_strategies(self, register):
        register(clipft.StrategySpec(name="proj-l2", summary="test", build=lambda opts: ProjectionsL2()))


def test_loss_terms_count_in_a_large_batch(tmp_path):
    """A loss term on parameters runs once per step on the group's record: it is
    logged, and the run stays large-batch (the summary says what the trainer ran)."""
    import json

    from clipft import testing
    s = testing.run_plugin(L2Plugin(), strategy="proj-l2", loss="contrastive", data=DATA, batch_size=B,
                           grad_accum=K, tmp_path=tmp_path)
    assert s["train"]["accumulation"] == {"mode": "large-batch", "micro_batches": K, "effective_batch": K * B,
                                          "negatives": K * B - 1}
    from pathlib import Path
    rows = [json.loads(x) for x in (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("type") == "step"]
    assert steps and all(r["reg.l2"] > 0 for r in steps)


# -- non-finite and resume ------------------------------------------------------------
@attrs.frozen
class NanOptions:
    at: int = attrs.field(default=0, metadata={"help": "1-based call that returns NaN"})


class CoupledNan:
    """The contrastive loss, NaN on one call."""

    def __init__(self, opts):
        from clipft_losses import Contrastive, ContrastiveOptions
        self.at, self.n, self.inner = opts.at, 0, Contrastive(ContrastiveOptions())

    def __call__(self, rec):
        self.n += 1
        loss = self.inner(rec)
        return loss * float("nan") if self.n == self.at else loss


SEEN: list = []


class StepsSeen(clipft.Callback):
    def on_step_end(self, s):
        SEEN.append((s.batch, s.step, s.stepped, s.loss))


class NanPlugin:
    @clipft.hookimpl
    def clipft_register_losses(self, register):
        register(clipft.LossSpec(name="coupled-nan", summary="test", options=NanOptions, build=CoupledNan,
                                 needs={"text"}, batch_coupled=True))

    @clipft.hookimpl
    def clipft_register_callbacks(self, register):
        register(clipft.CallbackSpec(name="steps-seen", summary="test", build=lambda opts: StepsSeen()))


PLUGINS = [NanPlugin()]


def test_a_non_finite_large_batch_loss_skips_the_whole_step(registry, tmp_path):
    from clipft.api import RunConfig, run
    s = run(RunConfig(model="tiny-vit", data=f"shapes:n={2 * K * B},val_n=8", strategies=["full"],
                      loss="coupled-nan:at=1", batch_size=B, grad_accum=K, skip_nonfinite=1, epochs=1),
            registry=registry, out=tmp_path / "r")
    # the loss runs once per group: the first group's step is skipped whole, the second one steps
    assert s["train"]["skipped_nonfinite_steps"] == 1
    assert s["train"]["steps"] == 1 and s["train"]["samples"] == K * B


def test_the_last_group_of_an_epoch_uses_what_there_is(registry, tmp_path):
    """3 micro-batches with K = 2: a group of 2, then a group of 1 (its own step)."""
    from clipft.api import RunConfig, run
    SEEN.clear()
    s = run(RunConfig(model="tiny-vit", data=f"shapes:n={3 * B},val_n=8", strategies=["full"],
                      loss="contrastive", batch_size=B, grad_accum=K, epochs=1, callbacks=["steps-seen"]),
            registry=registry, out=tmp_path / "r")
    assert s["train"]["steps"] == 2 and s["train"]["samples"] == 3 * B
    # each micro-batch's event carries its group's loss; the step happens on the group's last
    assert [(b, st, stepped) for b, st, stepped, _ in SEEN] == [(1, 0, False), (2, 1, True), (3, 2, True)]
    assert SEEN[0][3] == SEEN[1][3] != SEEN[2][3]


@pytest.mark.numerics
def test_resume_mid_epoch_is_bit_exact(tmp_path, monkeypatch):
    """lora (dropout draws), 2 large-batch steps per epoch, a checkpoint after
    every step: crashed after the first (mid-epoch) and resumed, it ends
    bit-identical to the uninterrupted run."""
    from safetensors.torch import load_file

    from clipft.api import RunConfig
    from resume_check import crash_after_first_checkpoint_then_resume
    conf = RunConfig(model="tiny-vit", data=f"shapes:n={2 * K * B},val_n=8", strategies=["lora"],
                     loss="contrastive", batch_size=B, grad_accum=K, epochs=2, checkpoint_every="1",
                     callbacks=["none"])
    r = crash_after_first_checkpoint_then_resume(conf, tmp_path, monkeypatch)
    assert r.whole["train"]["steps"] == 4 and r.whole["train"]["accumulation"]["mode"] == "large-batch"
    a = load_file(str(r.straight / "checkpoint" / "model.safetensors"))
    b = load_file(str(r.crashed / "checkpoint" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], r.first[k]) for k in a)   # it trained after the crash
    assert r.resumed["eval"]["after"] == r.whole["eval"]["after"]
    assert r.resumed["train"]["final_loss"] == r.whole["train"]["final_loss"]


# -- two processes (gloo) --------------------------------------------------------------
def test_two_ranks_accumulate_the_same_large_batch_as_one_process(invoke, tmp_path, loss="contrastive"):
    """2 ranks × K micro-batches of B/2 against one process × K of B: the same
    K·B samples per step (rank shares of consecutive global batches), the loss
    on the gathered features, DDP reducing once per step; SGD, so the weights
    differ by lr × the gradients' difference. The trained ``logit_scale`` is
    read by the loss directly (its gradient comes from step 2, and the syncing
    backward carries it to DDP). (``loss="contrastive:fixed_scale=100"``, where
    DDP looks for unused parameters, passes too; left out for time.)"""
    from safetensors.torch import load_file
    from test_distributed import COMMON, torchrun

    args = [*COMMON, "--data", f"shapes:n={2 * K * B},val_n=8", "--epochs", "1", "--strategy", "full",
            "--loss", loss, "--grad-accum", K]
    res = invoke("run", *args, "--batch-size", B, "--out", tmp_path / "one", "--json")
    assert res.exit_code == 0, res.output
    r = torchrun("run", *args, "--batch-size", B // 2, "--out", tmp_path / "two", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    one, two = json.loads(res.stdout), json.loads(r.stdout)
    assert two["train"]["accumulation"] == {**one["train"]["accumulation"], "negatives": K * B - 1}
    assert two["train"]["steps"] == one["train"]["steps"] == 2
    assert two["distributed"]["unused_trained_tensors"] == (1 if "fixed" in loss else 0)
    ta = load_file(str(tmp_path / "one" / "checkpoint" / "model.safetensors"))
    tb = load_file(str(tmp_path / "two" / "checkpoint" / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert_close_rel(tb[k], ta[k], reduction=K * B * L, depth=TINY_DEPTH, what=k)
    assert two["train"]["final_loss"] == pytest.approx(one["train"]["final_loss"], rel=1e-5)
