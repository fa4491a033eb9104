"""Float tolerances for the tests, derived from the computation instead of guessed.

Two float32 evaluations of the same maths that take different kernel paths
(another summation order or blocking, FMA or not, a fused attention kernel
against the explicit one, another ISA) differ by rounding only. For one dot
product of length ``n`` the rounding error is about ``eps * sqrt(n)`` relative
to the magnitude of the terms (errors of a long sum add like a random walk; the
worst case is ``eps * n``), and a stack of layers passes its input error on
and adds its own, so the error grows about linearly with depth. Hence

    float_tol(reduction, depth) = safety * eps32 * sqrt(reduction) * depth

as a *norm-wise relative* tolerance: ``max|a - b| <= float_tol * max|b|``.
Elementwise relative error is meaningless for entries that happen to be near
zero, and a fixed ``atol`` ignores the size of the values. ``safety`` (8 by
default) covers what the random-walk model leaves out: LayerNorm and softmax
amplifying input errors by small factors, and several reductions per layer.

Exact equality (``torch.equal``) is right only where both sides run the same
operations on the same inputs (a replay of a cache or a checkpoint, the same
function called twice, a copy). Those checks do not use this module.

Set ``CLIPFT_NUMERICS_REPORT=<file>`` to append one line per checked comparison
(observed, allowed, ratio) to ``<file>``; that is how the safety factor was
checked against the kernel paths ``make test-numerics`` exercises.
"""
from __future__ import annotations

import math
import os

import torch

EPS32 = torch.finfo(torch.float32).eps          # 2**-23 = 1.19e-7
SAFETY = 8.0

# tiny-vit / tiny-rn text tower (tests' default model): width 64, MLP 4 x 64, 4
# blocks per tower. The longest dot product in a block is the MLP's c_proj
# (256 terms); depth counts the blocks plus the output projection.
TINY_REDUCTION = 256
TINY_DEPTH = 4 + 1


def float_tol(reduction: int = 1, depth: int = 1, *, safety: float = SAFETY) -> float:
    """Relative tolerance for float32 results that went through ``depth``
    layers whose longest dot product has ``reduction`` terms."""
    return safety * EPS32 * math.sqrt(max(1, reduction)) * max(1, depth)


def _report(what: str, observed: float, allowed: float) -> None:
    path = os.environ.get("CLIPFT_NUMERICS_REPORT")
    if path:
        ratio = observed / allowed if allowed else (0.0 if observed == 0 else float("inf"))
        with open(path, "a") as f:
            f.write(f"{what}\t{observed:.3g}\t{allowed:.3g}\t{ratio:.3f}\n")


def assert_close_rel(actual, expected, *, reduction: int = 1, depth: int = 1, safety: float = SAFETY,
                     scale=None, what: str = "") -> None:
    """``max|actual - expected| <= float_tol(reduction, depth) * scale``.

    ``scale`` is the magnitude of the values compared: ``max|expected|`` unless
    given (give it where the compared values are themselves sums with
    cancellation, or parameters whose change matters more than their size)."""
    actual, expected = torch.as_tensor(actual).detach(), torch.as_tensor(expected).detach()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    diff = float((actual.double() - expected.double()).abs().max()) if actual.numel() else 0.0
    if scale is None:
        scale = float(expected.double().abs().max()) if expected.numel() else 0.0
    allowed = float_tol(reduction, depth, safety=safety) * float(scale)
    _report(what or "?", diff, allowed)
    assert diff <= allowed, (f"{what}: max |diff| {diff:.3g} > {allowed:.3g} "
                             f"(float_tol(reduction={reduction}, depth={depth}, safety={safety}) "
                             f"x scale {float(scale):.3g})")
