"""The optimizer implementation switch (``--optimizer-impl``): fused AdamW by
default where torch has the kernel, torch's for-loop AdamW as the reference,
and the difference between the two bounded by what their rounding allows."""
from __future__ import annotations

import types

import pytest
import torch

from clipft.engine.optim import IMPL_FLAGS, make_optimizer, resolve_impl
from clipft.errors import ClipftUsageError

EPS32 = torch.finfo(torch.float32).eps


def _params(seed=0, shapes=((64, 32), (32,), (7, 5, 3))):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def test_auto_is_fused_on_the_cpu_and_explicit_choices_are_kept():
    ps = _params()
    assert resolve_impl("auto", ps) == "fused"
    assert resolve_impl("for-loop", ps) == "for-loop"
    assert resolve_impl("foreach", ps) == "foreach"
    assert resolve_impl("auto", []) == "fused"          # --epochs 0: nothing trains


def test_fused_without_a_kernel_is_a_usage_error():
    meta = [torch.nn.Parameter(torch.empty(3, device="meta"))]
    assert resolve_impl("auto", meta) == "for-loop"
    with pytest.raises(ClipftUsageError, match="for-loop"):
        resolve_impl("fused", meta)


def test_auto_is_fused_only_where_adamw_has_a_fused_kernel(monkeypatch):
    """torch's list of fused-capable devices is generic (mps, xpu, hpu, ...);
    ``auto`` stays on the for-loop there, and ``fused`` remains the user's choice."""
    import clipft.engine.optim as optim
    monkeypatch.setattr(optim, "_fused_devices", lambda: {"cpu", "cuda", "meta"})
    meta = [torch.nn.Parameter(torch.empty(3, device="meta"))]
    assert resolve_impl("auto", meta) == "for-loop"
    assert resolve_impl("fused", meta) == "fused"


def _group(params):
    return types.SimpleNamespace(params=[(str(i), p) for i, p in enumerate(params)], lr=1e-3,
                                 weight_decay=0.1, name="g")


@pytest.mark.numerics
def test_fused_and_for_loop_adamw_agree_within_their_rounding():
    """The same gradients, K steps: the two implementations compute the same
    update ``lr * m_hat / (sqrt(v_hat) + eps)`` and decay, each op rounded to
    float32 in its own order. Per element and step, the update (|u| <= lr *
    |m_hat| / sqrt(v_hat), which is <= lr / sqrt(1 - beta2) here) differs by a
    few rounding errors of itself, and the decayed, updated weight by at most two
    rounding steps of the weight: |d| <= 2 ulp(|p|) + 16 eps lr / sqrt(1 - b2),
    accumulated over K steps (the gradients do not depend on the weights)."""
    K, lr, b2 = 5, 1e-3, 0.98
    ref, fused = _params(1), _params(1)
    cfg = {impl: types.SimpleNamespace(optimizer="adamw", optimizer_impl=impl, momentum=0.9)
           for impl in ("for-loop", "fused")}
    opt_ref, impl_ref = make_optimizer([_group(ref)], cfg["for-loop"])
    opt_fused, impl_fused = make_optimizer([_group(fused)], cfg["fused"])
    assert impl_ref == "for-loop" and impl_fused == "fused"
    g = torch.Generator().manual_seed(2)
    for _ in range(K):
        for a, b in zip(ref, fused):
            grad = torch.randn(a.shape, generator=g) * 10 ** float(torch.randint(-4, 1, (), generator=g))
            a.grad, b.grad = grad.clone(), grad.clone()
        opt_ref.step()
        opt_fused.step()
    for a, b in zip(ref, fused):
        ulp = torch.finfo(torch.float32).eps * a.detach().abs()
        bound = K * (2 * ulp + 16 * EPS32 * lr / (1 - b2) ** 0.5)
        diff = (a.detach() - b.detach()).abs()
        assert (diff <= bound).all(), (diff - bound).max()
    # and they did not just agree by doing nothing
    assert max((a.detach() - p0).abs().max().item() for a, p0 in zip(ref, _params(1))) > 1e-3


def test_a_checkpoint_resumes_on_this_runs_implementation():
    """torch's load_state_dict would bring back the writer's fused/foreach flags."""
    from clipft.engine.checkpoint import _optimizer_tensors, _restore_optimizer

    cfg = types.SimpleNamespace(optimizer="adamw", optimizer_impl="for-loop", momentum=0.9)
    ps = _params()
    writer, _ = make_optimizer([_group(ps)], cfg)
    for p in ps:
        p.grad = torch.ones_like(p)
    writer.step()
    tensors, meta = _optimizer_tensors(writer)
    reader, _ = make_optimizer([_group(ps)], types.SimpleNamespace(**{**vars(cfg), "optimizer_impl": "fused"}))
    _restore_optimizer(reader, tensors, meta)
    assert all(g["fused"] is True and g["foreach"] is False for g in reader.param_groups)
    assert torch.equal(reader.state[ps[0]]["exp_avg"], writer.state[ps[0]]["exp_avg"])
    reader.step()                                            # the fused kernel takes that state


@pytest.mark.parametrize("impl", sorted(IMPL_FLAGS))
def test_sgd_takes_the_switch_too(impl):
    ps = _params()
    opt, chosen = make_optimizer([_group(ps)], types.SimpleNamespace(optimizer="sgd", optimizer_impl=impl,
                                                                     momentum=0.9))
    assert chosen == impl
    assert isinstance(opt, torch.optim.SGD)
    assert all(opt.param_groups[0][k] == v for k, v in IMPL_FLAGS[impl].items())


def test_the_run_records_its_implementation(invoke, tmp_path, small_shapes):
    import json
    out = tmp_path / "r"
    res = invoke("run", "--model", "tiny-vit", "--data", small_shapes, "--epochs", "1", "--batch-size", "32",
                 "--strategy", "projections", "--optimizer-impl", "for-loop", "--callback", "none", "--out", out, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["optimizer"] == {"name": "adamw", "impl": "for-loop"}
    bad = invoke("run", "--model", "tiny-vit", "--optimizer-impl", "fastest", "--out", tmp_path / "b")
    assert bad.exit_code == 2 and not (tmp_path / "b").exists()
