"""LoRA's training path with dropout (clipft_lora.layers.lowrank_dropout_linear):
the plain expression ``x W^T + b + s·B A drop(x)`` per adapter, computed with
one product for all output rows and a backward that keeps only ``x`` and the
rank-r activations (the masks are drawn again from their seeds). Checked
against autograd through the plain expression with the same masks, for outputs
and every gradient, in fp32 and under bf16 autocast; and for what it keeps."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from numerics import EPS32, assert_close_rel

pytestmark = pytest.mark.usefixtures("one_thread")

N, D_IN, D, R = 40, 24, 24, 3
OFFSETS = (0, 2 * D)           # adapters on the first and third row blocks (q and v)
SCALE, P = 0.5, 0.25


def pairs(seed=0):
    from clipft_lora.layers import LowRank
    torch.manual_seed(seed)
    out = []
    for _ in OFFSETS:
        pair = LowRank(D_IN, D, R)
        with torch.no_grad():
            pair.B.normal_()
        out.append(pair)
    return out


def inputs(seed=1, weight_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, N // 2, D_IN, generator=g, requires_grad=True)
    w = torch.randn(3 * D, D_IN, generator=g, requires_grad=weight_grad)
    b = torch.randn(3 * D, generator=g, requires_grad=weight_grad)
    return x, w, b


def the_masks(x, rng_seed):
    """The masks the function draws after ``torch.manual_seed(rng_seed)``."""
    from clipft_lora.layers import _mask
    torch.manual_seed(rng_seed)
    seed = int(torch.randint(0, 2 ** 62, (1,)))
    return [_mask(x, 1 - P, seed + i) for i in range(len(OFFSETS))]


def plain(x, w, b, ps, masks):
    y = F.linear(x, w, b)
    parts = list(y.split(D, dim=-1))
    for (o, pair), m in zip(zip(OFFSETS, ps), masks):
        parts[o // D] = parts[o // D] + SCALE * pair(x * m / (1 - P))
    return torch.cat(parts, dim=-1)


def grads(y, tensors, seed=3):
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((y * upstream.to(y.dtype)).sum(), tensors)


@pytest.mark.numerics
@pytest.mark.parametrize("weight_grad", [False, True])
def test_matches_the_plain_expression_with_the_same_masks(weight_grad):
    from clipft_lora.layers import lowrank_dropout_linear
    ps = pairs()
    x, w, b = inputs(weight_grad=weight_grad)
    factors = [t for pair in ps for t in (pair.A, pair.B)]
    wrt = [x, *factors] + ([w, b] if weight_grad else [])
    torch.manual_seed(7)
    ours = lowrank_dropout_linear(x, w, b, SCALE, P, list(zip(OFFSETS, ps)))
    g_ours = grads(ours, wrt)
    masks = the_masks(x, 7)
    kept = torch.stack(masks).float().mean().item()
    assert abs(kept - (1 - P)) < 4 * math.sqrt(P * (1 - P) / (len(masks) * x.numel()))
    ref = plain(x, w, b, ps, masks)
    g_ref = grads(ref, wrt)
    # the same sums in other groupings: the longest has N terms (the factors'
    # gradients), two products deep (A's gradient goes through B)
    assert_close_rel(ours, ref, reduction=D_IN, depth=2, what="lora dropout output")
    for name, a, r in zip(["x", "A_q", "B_q", "A_v", "B_v", "W", "b"], g_ours, g_ref):
        assert_close_rel(a, r, reduction=N, depth=3, what=f"lora dropout grad {name}")
    # rows without an adapter are the base product exactly
    assert torch.equal(ours[..., D:2 * D], F.linear(x, w, b)[..., D:2 * D])


def test_the_masks_are_drawn_again_not_kept():
    from clipft_lora.layers import lowrank_dropout_linear
    ps = pairs()
    x, w, b = inputs()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lowrank_dropout_linear(x, w, b, SCALE, P, list(zip(OFFSETS, ps)))
    shapes = sorted(tuple(t.shape) for t in saved)
    # x once (however many adapters), the frozen weight, the rank-3 activations,
    # the factors: no mask and no dropped copy of x
    assert shapes == sorted([tuple(x.shape), tuple(w.shape), (2, N // 2, R), (2, N // 2, R),
                             (R, D_IN), (D, R), (R, D_IN), (D, R)])
    assert not any(t.dtype == torch.bool for t in saved)


@pytest.mark.numerics
def test_bf16_autocast_computes_in_bf16_and_returns_fp32_gradients():
    from clipft_lora.layers import lowrank_dropout_linear
    ps = pairs()
    x, w, b = inputs()
    factors = [t for pair in ps for t in (pair.A, pair.B)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(7)
        ours = lowrank_dropout_linear(x, w, b, SCALE, P, list(zip(OFFSETS, ps)))
        ref = plain(x, w, b, ps, the_masks(x, 7))
    assert ours.dtype == ref.dtype == torch.bfloat16
    g_ours, g_ref = grads(ours, [x, *factors]), grads(ref, [x, *factors])
    assert all(g.dtype == torch.float32 for g in g_ours)
    # both round every product to bf16 (8 bits of mantissa), in other places
    bf16 = 2.0 ** -8 / EPS32
    assert_close_rel(ours.float(), ref.float(), reduction=D_IN, depth=2, safety=8 * bf16, what="bf16 output")
    for a, r in zip(g_ours, g_ref):
        assert_close_rel(a, r, reduction=N, depth=3, safety=8 * bf16, what="bf16 grad")
