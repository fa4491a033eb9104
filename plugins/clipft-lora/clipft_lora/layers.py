"""LoRA layers for open_clip's blocks: ``nn.MultiheadAttention`` (q, k, v on the
packed ``in_proj_weight``, and ``out_proj``) and ``nn.Linear`` (the MLP), and DoRA.
docs/prompt-and-lora.md explains the design; in short:

- an adapted layer keeps its identity: the instance is given a subclass of its own
  class and a child ``lora`` holding the factors, so the base weights keep their
  names and :meth:`fold_into_base` gives back a plain open_clip layer;
- with dropout inactive, LoRA is a weight delta and the layer runs PyTorch's own
  forward (fused kernels, the fast path) on ``W + s·BA`` (DoRA: ``W'``), substituted
  for the call; with dropout active each projection is computed explicitly, since
  LoRA dropout acts on the low-rank path's input and has no weight-space form;
- DoRA's ``W' = m * (W + s·BA) / ||W + s·BA||`` takes the norm of each row of the
  ``[out, in]`` weight (one magnitude per output feature), detached; ``m`` starts
  at ``||W||``, so with ``B = 0`` it is ``W`` bit for bit. ``unmerge`` restores the
  weight saved at merge time (``W`` cannot be recovered from ``W'``).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from clipft import InsertedModule

QKV = ("q", "k", "v")


class LowRank(nn.Module):
    """One low-rank pair: ``delta W = B @ A`` with ``A [r, d_in]`` drawn
    Kaiming-uniform and ``B [d_out, r]`` zero, so the adapter starts as the
    identity change. For DoRA, ``base`` is the adapted weight ``[d_out, d_in]``
    and the pair also holds the magnitude ``m [d_out]``, initialised to the
    norms of its rows (:func:`row_norms`)."""

    def __init__(self, d_in: int, d_out: int, r: int, device=None, dtype=None, base=None):
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, d_in, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(d_out, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        if base is not None:
            if tuple(base.shape) != (d_out, d_in):
                raise ValueError(f"DoRA base weight is {tuple(base.shape)}, expected {(d_out, d_in)}")
            with torch.no_grad():
                self.m = nn.Parameter(row_norms(base.detach()).to(device=device, dtype=dtype))

    def delta(self) -> torch.Tensor:
        return self.B @ self.A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype))


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each row of a ``[out, in]`` weight (over the input
    dimension): DoRA's magnitude, one per output feature."""
    return torch.linalg.vector_norm(weight, dim=1)


def dora_weight(weight: torch.Tensor, delta: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``m * (W + delta) / ||W + delta||`` per row, the norm detached (DoRA
    section 4.3): gradients reach ``m`` and, through ``W + delta``, the factors."""
    v = weight + delta
    return v * (m / row_norms(v).detach()).unsqueeze(1)


def dora_scale(weight: torch.Tensor, delta: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``m / ||W + delta||`` per row (the norm detached): what the explicit path
    multiplies each output feature by."""
    with torch.no_grad():
        norm = row_norms(weight + delta)
    return m / norm


@contextlib.contextmanager
def substituted(module: nn.Module, name: str, tensor: torch.Tensor):
    """Make ``module.<name>`` read ``tensor`` (a plain tensor that may carry
    grad) for the duration of the block; the registered Parameter comes back
    afterwards, also on error."""
    original = module._parameters[name]
    module._parameters[name] = tensor
    try:
        yield
    finally:
        module._parameters[name] = original


def _flagged_like(eff: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``eff``, flagged like ``weight`` when it carries no graph.

    PyTorch chooses among its linear kernels partly by whether the weight
    requires grad (also under no-grad), and the kernels round differently. A
    graph-free effective weight gets the base weight's flag, so untrained
    adapters (B = 0) reproduce the base model bit for bit in eval."""
    if eff.is_leaf and eff.requires_grad != weight.requires_grad:
        eff.requires_grad_(weight.requires_grad)
    return eff


def _plus(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``weight + delta``, flagged like ``weight`` (:func:`_flagged_like`)."""
    return _flagged_like(weight + delta, weight)


class _LowRankDropoutLinear(torch.autograd.Function):
    """``x W^T + b`` plus, for each adapter ``t`` on the output rows
    ``[o_t, o_t + d_t)``, ``s · B_t A_t drop_t(x)``: LoRA's training path with
    dropout, written out so that backward keeps only what it needs.

    Autograd through the plain expression would keep, per adapter, the float
    mask and the dropped copy of ``x``. Here one product computes all output rows,
    and backward keeps ``x`` once and the rank-r activations ``h_t``; each mask is
    drawn from a generator seeded from the global RNG in forward and drawn again
    in backward (gradient checkpointing replays forward with the global RNG
    restored, so it draws the same seeds).

    Under autocast, everything runs in the autocast dtype (what the plain
    expression's linear layers would do), and the gradients come back in the
    inputs' own dtypes."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, keep, rows, *factors):
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            xc, w = x.to(dtype), weight.to(dtype)
            y = F.linear(xc, w, bias.to(dtype) if bias is not None else None)
            seed = int(torch.randint(0, 2 ** 62, (1,)))
            hs = []
            for i, (o, d) in enumerate(rows):
                a, b = factors[2 * i].to(dtype), factors[2 * i + 1].to(dtype)
                h = F.linear((xc * _mask(xc, keep, seed + i)).div_(keep), a)
                y[..., o:o + d] += scale * F.linear(h, b)
                hs.append(h)
        ctx.save_for_backward(xc, weight, *hs, *factors)
        ctx.meta = (scale, keep, seed, tuple(rows), dtype, x.dtype, bias is not None,
                    bias.dtype if bias is not None else None)
        return y

    @staticmethod
    def backward(ctx, g):
        scale, keep, seed, rows, dtype, x_dtype, has_bias, bias_dtype = ctx.meta
        n = len(rows)
        saved = ctx.saved_tensors
        xc, weight = saved[0], saved[1]
        hs, factors = saved[2:2 + n], saved[2 + n:]
        g = g.to(dtype)
        flat_g, flat_x = g.reshape(-1, g.shape[-1]), xc.reshape(-1, xc.shape[-1])
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = g @ weight.to(dtype) if need_x else None
        grad_w = (flat_g.t() @ flat_x).to(weight.dtype) if need_w else None
        grad_b = flat_g.sum(0).to(bias_dtype) if need_b and has_bias else None
        grads = []
        for i, (o, d) in enumerate(rows):
            a, b = factors[2 * i], factors[2 * i + 1]
            g_t = scale * g[..., o:o + d]
            h = hs[i]
            grad_b_t = (g_t.reshape(-1, d).t() @ h.reshape(-1, h.shape[-1])).to(b.dtype)
            g_h = g_t @ b.to(dtype)
            mask = _mask(xc, keep, seed + i)
            dropped = (xc * mask).div_(keep).reshape(-1, xc.shape[-1])
            grad_a_t = (g_h.reshape(-1, g_h.shape[-1]).t() @ dropped).to(a.dtype)
            if need_x:
                grad_x.add_((g_h @ a.to(dtype)).mul_(mask).div_(keep))
            grads += [grad_a_t, grad_b_t]
        if grad_x is not None:
            grad_x = grad_x.to(x_dtype)
        return (grad_x, grad_w, grad_b, None, None, None, *grads)


def _mask(x: torch.Tensor, keep: float, seed: int) -> torch.Tensor:
    """The dropout mask (True: kept, with probability ``keep``) drawn by a
    generator seeded with ``seed``: the same mask every time it is drawn."""
    if keep >= 1.0:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    # uniform < keep: the same distribution as bernoulli_, 2-3x cheaper on the CPU
    return torch.rand(x.shape, generator=gen, device=x.device) < keep


def lowrank_dropout_linear(x, weight, bias, scale: float, p: float, adapters) -> torch.Tensor:
    """``x W^T + b + s · Σ_t B_t A_t drop(x)`` on each adapter's output rows;
    ``adapters`` is ``[(row offset, LowRank)]`` (see :class:`_LowRankDropoutLinear`)."""
    rows = [(o, pair.B.shape[0]) for o, pair in adapters]
    factors = [t for _, pair in adapters for t in (pair.A, pair.B)]
    return _LowRankDropoutLinear.apply(x, weight, bias, float(scale), 1.0 - float(p), rows, *factors)


class _LoRAMixin(InsertedModule):
    """State shared by the adapted layer classes (set by :meth:`_attach`).
    As inserted modules they are layers of the tower that fold into it."""

    enters = "layer"
    folds_into_base = True

    lora: nn.ModuleDict
    lora_scale: float
    lora_merged: bool
    #: DoRA: every factor pair holds a magnitude ``m`` (see the module docstring)
    lora_dora: bool

    def _attach(self, factors: dict, alpha: float, r: int, dropout: float, dora: bool = False) -> None:
        self.lora = nn.ModuleDict(factors)
        self.lora_scale = float(alpha) / float(r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_merged = False
        self.lora_dora = bool(dora)
        #: DoRA: the base weights as they were before a merge (W is not recoverable from W')
        self._dora_saved: dict = {}

    def _dropout_active(self) -> bool:
        return self.training and isinstance(self.lora_dropout, nn.Dropout)


# -- nn.MultiheadAttention -----------------------------------------------------------
class LoRAMultiheadAttention(_LoRAMixin, nn.MultiheadAttention):
    """An ``nn.MultiheadAttention`` with LoRA on any of q, k, v (row blocks of
    ``in_proj_weight``) and ``out`` (``out_proj``). Created by
    :func:`adapt_attention` from an existing instance, never constructed."""

    def __init__(self, *args, **kwargs):  # pragma: no cover - guard
        raise TypeError("use clipft_lora.layers.adapt_attention(existing_mha, ...)")

    # the adapters as weight deltas (differentiable); None where untargeted
    def _in_proj_delta(self):
        if not any(t in self.lora for t in QKV):
            return None
        w, d = self.in_proj_weight, self.embed_dim
        blocks = [self.lora[t].delta() if t in self.lora else w.new_zeros(d, d) for t in QKV]
        return (self.lora_scale * torch.cat(blocks)).to(w.dtype)

    def _out_proj_delta(self):
        if "out" not in self.lora:
            return None
        return (self.lora_scale * self.lora["out"].delta()).to(self.out_proj.weight.dtype)

    def _target_delta(self, name: str, like: torch.Tensor) -> torch.Tensor:
        return (self.lora_scale * self.lora[name].delta()).to(like.dtype)

    def _in_proj_effective(self):
        """The adapted ``in_proj_weight`` (``W + s·BA``, or DoRA's ``W'`` per
        targeted row block; untargeted blocks are ``W``'s rows), or None."""
        if not any(t in self.lora for t in QKV):
            return None
        w = self.in_proj_weight
        if not self.lora_dora:
            return _plus(w, self._in_proj_delta())
        d = self.embed_dim
        blocks = []
        for i, t in enumerate(QKV):
            wb = w[i * d:(i + 1) * d]
            blocks.append(dora_weight(wb, self._target_delta(t, wb), self.lora[t].m.to(w.dtype))
                          if t in self.lora else wb)
        return _flagged_like(torch.cat(blocks), w)

    def _out_proj_effective(self):
        if "out" not in self.lora:
            return None
        w = self.out_proj.weight
        if not self.lora_dora:
            return _plus(w, self._out_proj_delta())
        return _flagged_like(dora_weight(w, self._target_delta("out", w), self.lora["out"].m.to(w.dtype)), w)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        if self.lora_merged:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)
        if self._dropout_active():
            return self._forward_explicit(query, key, value, key_padding_mask, need_weights,
                                          attn_mask, average_attn_weights, is_causal)
        return self._forward_weight_delta(query, key, value, key_padding_mask, need_weights,
                                          attn_mask, average_attn_weights, is_causal)

    def _forward_weight_delta(self, query, key, value, key_padding_mask, need_weights,
                              attn_mask, average_attn_weights, is_causal):
        """PyTorch's own forward (fused kernels, fast path) on ``W + s·BA`` (DoRA: ``W'``)."""
        with contextlib.ExitStack() as stack:
            w_in, w_out = self._in_proj_effective(), self._out_proj_effective()
            if w_in is not None:
                stack.enter_context(substituted(self, "in_proj_weight", w_in))
            if w_out is not None:
                stack.enter_context(substituted(self.out_proj, "weight", w_out))
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)

    def _project(self, x, i: int, name: str):
        d = self.embed_dim
        w = self.in_proj_weight[i * d:(i + 1) * d]
        b = self.in_proj_bias[i * d:(i + 1) * d] if self.in_proj_bias is not None else None
        return self._linear_adapted(x, w, b, name)

    def _linear_adapted(self, x, w, b, name: str):
        """``x W^T + b`` with target ``name``'s adapter on it, LoRA dropout on
        the low-rank path's input; DoRA rescales each output feature by
        ``m / ||W + s·BA||`` before the bias."""
        if name not in self.lora:
            return F.linear(x, w.to(x.dtype), b.to(x.dtype) if b is not None else None)
        if not self.lora_dora:
            return lowrank_dropout_linear(x, w, b, self.lora_scale, self.lora_dropout.p, [(0, self.lora[name])])
        low = self.lora_scale * self.lora[name](self.lora_dropout(x))
        scale = dora_scale(w, self._target_delta(name, w), self.lora[name].m.to(w.dtype)).to(x.dtype)
        y = scale * (F.linear(x, w.to(x.dtype)) + low)
        return y + b.to(x.dtype) if b is not None else y

    def _forward_explicit(self, query, key, value, key_padding_mask, need_weights,
                          attn_mask, average_attn_weights, is_causal):
        """Attention with LoRA dropout on the inputs of the low-rank paths."""
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        bsz, tgt, d = query.shape
        src = key.shape[1]
        heads, hd = self.num_heads, self.head_dim

        if query is key and key is value and not self.lora_dora:
            # self-attention (open_clip's blocks): q, k and v in one product, as
            # PyTorch's MHA does, with the adapters on their row blocks
            adapters = [(i * d, self.lora[t]) for i, t in enumerate(QKV) if t in self.lora]
            qkv = lowrank_dropout_linear(query, self.in_proj_weight, self.in_proj_bias, self.lora_scale,
                                         self.lora_dropout.p, adapters)
            q, k, v = (t.reshape(bsz, tgt, heads, hd).transpose(1, 2) for t in qkv.split(d, dim=-1))
        else:
            q = self._project(query, 0, "q").view(bsz, tgt, heads, hd).transpose(1, 2)
            k = self._project(key, 1, "k").view(bsz, src, heads, hd).transpose(1, 2)
            v = self._project(value, 2, "v").view(bsz, src, heads, hd).transpose(1, 2)

        mask = _additive_mask(attn_mask, key_padding_mask, bsz, heads, tgt, src, q.dtype, q.device)
        if mask is None and is_causal:
            mask = torch.full((tgt, src), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * hd ** -0.5) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            if p > 0:
                weights = F.dropout(weights, p)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = out.transpose(1, 2).reshape(bsz, tgt, d)
        o = self._linear_adapted(out, self.out_proj.weight, self.out_proj.bias, "out")
        if unbatched:
            o = o.squeeze(0)
            weights = weights.squeeze(0) if weights is not None else None
        elif not self.batch_first:
            o = o.transpose(0, 1)
        return o, weights

    # -- merge / unmerge / fold ------------------------------------------------------
    @torch.no_grad()
    def lora_merge(self) -> None:
        if self.lora_merged:
            return
        if self.lora_dora:
            w_in, w_out = self._in_proj_effective(), self._out_proj_effective()
            for key, param, eff in (("in_proj_weight", self.in_proj_weight, w_in),
                                    ("out_proj.weight", self.out_proj.weight, w_out)):
                if eff is not None:
                    self._dora_saved[key] = param.detach().clone()
                    param.copy_(eff)
        else:
            self._add_deltas(+1.0)
        self.lora_merged = True

    @torch.no_grad()
    def lora_unmerge(self) -> None:
        if not self.lora_merged:
            return
        if self.lora_dora:
            for key, param in (("in_proj_weight", self.in_proj_weight), ("out_proj.weight", self.out_proj.weight)):
                if key in self._dora_saved:
                    param.copy_(self._dora_saved.pop(key))
        else:
            self._add_deltas(-1.0)
        self.lora_merged = False

    def _add_deltas(self, sign: float) -> None:
        d_in, d_out = self._in_proj_delta(), self._out_proj_delta()
        if d_in is not None:
            self.in_proj_weight.add_(d_in, alpha=sign)
        if d_out is not None:
            self.out_proj.weight.add_(d_out, alpha=sign)

    def fold_into_base(self) -> None:
        """Merge and become a plain ``nn.MultiheadAttention`` again."""
        self.lora_merge()
        _strip(self, nn.MultiheadAttention)


def _additive_mask(attn_mask, key_padding_mask, bsz, heads, tgt, src, dtype, device):
    """One float mask broadcastable to ``[bsz, heads, tgt, src]`` from
    MultiheadAttention's ``attn_mask`` (2-d or ``[bsz*heads, tgt, src]``; bool
    True = masked, or additive float) and ``key_padding_mask`` (``[bsz, src]``)."""
    def additive(m):
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        if mask.dim() == 3:
            mask = mask.view(bsz, heads, tgt, src)
    if key_padding_mask is not None:
        kpm = additive(key_padding_mask).view(bsz, 1, 1, src)
        mask = kpm if mask is None else mask + kpm
    return mask


# -- nn.Linear ---------------------------------------------------------------------
class LoRALinear(_LoRAMixin, nn.Linear):
    """An ``nn.Linear`` with one LoRA pair (key ``lora.w``). Created by
    :func:`adapt_linear` from an existing instance."""

    def __init__(self, *args, **kwargs):  # pragma: no cover - guard
        raise TypeError("use clipft_lora.layers.adapt_linear(existing_linear, ...)")

    def _delta(self) -> torch.Tensor:
        return (self.lora_scale * self.lora["w"].delta()).to(self.weight.dtype)

    def _dora_effective(self) -> torch.Tensor:
        w = self.weight
        return _flagged_like(dora_weight(w, self._delta(), self.lora["w"].m.to(w.dtype)), w)

    def forward(self, x):
        if self.lora_merged:
            return super().forward(x)
        if self.lora_dora:
            if not self._dropout_active():     # exactly x W'^T + b: bit for bit the base at B = 0
                b = self.bias.to(x.dtype) if self.bias is not None else None
                return F.linear(x, self._dora_effective().to(x.dtype), b)
            w = self.weight
            scale = dora_scale(w, self._delta(), self.lora["w"].m.to(w.dtype)).to(x.dtype)
            y = scale * (F.linear(x, w.to(x.dtype)) + self.lora_scale * self.lora["w"](self.lora_dropout(x)))
            return y + self.bias.to(x.dtype) if self.bias is not None else y
        if self._dropout_active():
            return lowrank_dropout_linear(x, self.weight, self.bias, self.lora_scale, self.lora_dropout.p,
                                          [(0, self.lora["w"])])
        y = super().forward(x)
        return y + self.lora_scale * self.lora["w"](x)

    @torch.no_grad()
    def lora_merge(self) -> None:
        if self.lora_merged:
            return
        if self.lora_dora:
            eff = self._dora_effective()
            self._dora_saved["weight"] = self.weight.detach().clone()
            self.weight.copy_(eff)
        else:
            self.weight.add_(self._delta())
        self.lora_merged = True

    @torch.no_grad()
    def lora_unmerge(self) -> None:
        if not self.lora_merged:
            return
        if self.lora_dora:
            self.weight.copy_(self._dora_saved.pop("weight"))
        else:
            self.weight.sub_(self._delta())
        self.lora_merged = False

    def fold_into_base(self) -> None:
        """Merge and become a plain ``nn.Linear`` again."""
        self.lora_merge()
        _strip(self, nn.Linear)


def _strip(module: nn.Module, plain: type) -> None:
    for name in ("lora", "lora_dropout"):
        if name in module._modules:
            del module._modules[name]
    for name in ("lora_scale", "lora_merged", "lora_dora", "_dora_saved"):
        module.__dict__.pop(name, None)
    module.__class__ = plain


# -- attaching -----------------------------------------------------------------------
def adapt_attention(mha: nn.Module, targets, r: int, alpha: float, dropout: float,
                    dora: bool = False) -> None:
    """Give an ``nn.MultiheadAttention`` LoRA (``dora``: DoRA) on ``targets``
    (subset of q, k, v, out)."""
    if type(mha) is not nn.MultiheadAttention:
        raise TypeError(f"expected nn.MultiheadAttention, got {type(mha).__name__}")
    if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
        raise TypeError("nn.MultiheadAttention with separate q/k/v weights (kdim/vdim) is not supported")
    if mha.bias_k is not None or mha.add_zero_attn:
        raise TypeError("nn.MultiheadAttention with bias_k/bias_v or add_zero_attn is not supported")
    w = mha.in_proj_weight
    d = mha.embed_dim

    def base(t):   # the weight DoRA decomposes: a row block of in_proj_weight, or out_proj's
        if not dora:
            return None
        return mha.out_proj.weight if t == "out" else w[QKV.index(t) * d:(QKV.index(t) + 1) * d]

    factors = {t: LowRank(d, d, r, device=w.device, dtype=w.dtype, base=base(t)) for t in targets}
    mha.__class__ = LoRAMultiheadAttention
    mha._attach(factors, alpha, r, dropout, dora)


def adapt_linear(linear: nn.Module, r: int, alpha: float, dropout: float, dora: bool = False) -> None:
    if type(linear) is not nn.Linear:
        raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
    w = linear.weight
    factors = {"w": LowRank(linear.in_features, linear.out_features, r, device=w.device, dtype=w.dtype,
                            base=w if dora else None)}
    linear.__class__ = LoRALinear
    linear._attach(factors, alpha, r, dropout, dora)


def adapted_layers(model: nn.Module):
    """``[(qualified name, layer)]`` of every LoRA-adapted layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _LoRAMixin)]


def _each_layer(model: nn.Module, method: str) -> int:
    layers = adapted_layers(model)
    for _, m in layers:
        getattr(m, method)()
    return len(layers)


def merge(model: nn.Module) -> int:
    """Fold every adapter into its base weight (outputs unchanged, adapters
    bypassed); returns how many layers were merged."""
    return _each_layer(model, "lora_merge")


def unmerge(model: nn.Module) -> int:
    """Undo :func:`merge` (subtracts the same deltas; exact up to float rounding)."""
    return _each_layer(model, "lora_unmerge")


def fold(model: nn.Module) -> int:
    """Merge and remove every adapter: ``model`` becomes a plain open_clip model
    whose state dict has open_clip's keys only."""
    return _each_layer(model, "fold_into_base")
