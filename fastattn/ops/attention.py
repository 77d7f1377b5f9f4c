"""Softmax attention (flash-attention semantics): reference, validation, custom ops, autograd.

Maths, per batch b and query head h (kv head ``h // (Hq // Hkv)``: GQA / MQA)::

    T = scale * Q K^T                       [Tq, Tk], scale = 1/sqrt(D) by default
    S = c * tanh(T / c) + bias              softcap c (None: S = T + bias); bias optional,
                                            broadcast to [B, Hq, Tq, Tk], may hold -inf
    S[i, j] = -inf where key j is hidden:   key_padding_mask[b, j] True (padding), or outside
                                            the window around the diagonal d_i = i + off:
                                            visible iff (wl < 0 or j >= d_i - wl) and
                                                        (wr < 0 or j <= d_i + wr)
                                            causal: wr = 0; off = Tk - Tq (bottom-right
                                            aligned, the default) or 0 (top-left)
    lse_i = log sum_j exp(S[i, j])          natural log, +inf for a row that sees no key
    P = exp(S - lse)                        (a row that sees no key is all zeros, not NaN)
    O = (P * M / (1 - p)) V                 M: dropout keep mask, see dropout_keep_mask

Backward (what every backend computes; Delta_i = sum_j P_ij dP_ij = rowsum(dO * O))::

    dV = (P * M / (1-p))^T dO      dP = (dO V^T) * M / (1-p)      dS = P * (dP - Delta)
    dbias = dS (summed over the bias's broadcast dims)
    dT = dS * (1 - tanh(T / c)^2)  (dT = dS without softcap)
    dQ = scale * dT K              dK = scale * dT^T Q            (dK, dV summed over the
                                                                   query heads of a group)

Dropout mask: Philox4x32-10 keyed by (seed, offset) with counter (j >> 2, i, b*Hq + h, offset);
element (b, h, i, j) reads output word j & 3, so one call serves 4 adjacent keys and every
backend draws the same mask for the same seed without storing it. The seed comes from
torch's default CPU generator (``torch.manual_seed`` makes a run repeatable).

Layers, top to bottom:

- :func:`attention`: the public function. Validates and calls the differentiable custom op.
- ``torch.ops.fastattn.attention_fwd`` / ``attention_bwd``: ``torch.library`` custom ops with
  fake implementations and a registered autograd formula; their bodies pick an implementation
  through :mod:`fastattn._dispatch`.
- ``NATIVE`` (C++ / CUDA via ``torch.ops.fastattn_C``), ``REFERENCE`` (below) and
  ``fastattn.triton.attention.TRITON``: the implementations, one contract (``csrc/ops.cpp``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fastattn import _dispatch
from fastattn.ops._common import (
    acc_dtype,
    check_same_device,
    check_tensor,
    draw_seed,
    eager_call,
    eager_cpu,
    eager_fast_path,
    fake_from,
    seed_int,
)

_MASK32 = 0xFFFFFFFF
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85


# ----------------------------------------------------------------------------- dropout mask
def _umulhi32(a: int, b: Tensor) -> Tensor:
    """High 32 bits of the 64-bit product of the uint32 constant ``a`` and uint32 values ``b``
    (held in int64). ``b`` is split into 16-bit limbs so no partial product exceeds 2^48."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    return (a * b_hi + ((a * b_lo) >> 16)) >> 16


def _mullo32(a: int, b: Tensor) -> Tensor:
    """``a * b mod 2^32`` for a uint32 constant ``a`` and uint32 values ``b`` held in int64."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    return ((((a * b_hi) & 0xFFFF) << 16) + a * b_lo) & _MASK32


def philox4x32(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, seed: int) -> tuple[Tensor, ...]:
    """Philox4x32-10 on uint32 counters held in int64 tensors (broadcastable), key from ``seed``.

    Bit-identical to ``triton.language.random.philox_impl`` on uint32 counters with key
    ``(seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)``.
    """
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        _c0, _c2 = c0, c2
        c0 = _umulhi32(_PHILOX_ROUND_B, _c2) ^ c1 ^ k0
        c2 = _umulhi32(_PHILOX_ROUND_A, _c0) ^ c3 ^ k1
        c1 = _mullo32(_PHILOX_ROUND_B, _c2)
        c3 = _mullo32(_PHILOX_ROUND_A, _c0)
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """Keep an element iff its 24-bit uniform integer ``w >> 8`` is >= this (``w``: the
    element's Philox output word).

    ``u = (w >> 8) * 2^-24 >= p``  <=>  ``(w >> 8) >= ceil(p * 2^24)`` (exact: the product is
    a power-of-two scaling). Comparing integers keeps every backend identical even where ``p``
    has no exact float32 form.
    """
    return math.ceil(p * 2**24)


def dropout_keep_mask(
    seed: int, offset: int, B: int, Hq: int, Tq: int, Tk: int, p: float, device=None
) -> Tensor:
    """The dropout keep mask ``[B, Hq, Tq, Tk]`` (bool, True = kept) every backend uses.

    Element (b, h, i, j) takes output word ``w = r[j & 3]`` of Philox4x32-10 with key
    ``(seed lo, seed hi)`` on the counter ``(j >> 2, i, b*Hq + h, offset & 0xFFFFFFFF)`` (one
    call serves keys 4k .. 4k+3); ``u = (w >> 8) * 2^-24``; kept iff ``u >= p``.
    """
    dev = torch.device("cpu") if device is None else torch.device(device)
    i64 = dict(dtype=torch.int64, device=dev)
    n4 = (Tk + 3) // 4  # Philox calls per row: call k serves keys 4k .. 4k+3
    c0 = torch.arange(n4, **i64).view(1, 1, 1, n4)
    c1 = torch.arange(Tq, **i64).view(1, 1, Tq, 1)
    c2 = torch.arange(B * Hq, **i64).view(B, Hq, 1, 1)
    c3 = torch.full((1, 1, 1, 1), offset & _MASK32, **i64)
    shape = (B, Hq, Tq, n4)
    c0, c1, c2, c3 = (c.expand(shape) for c in (c0, c1, c2, c3))
    words = torch.stack(philox4x32(c0, c1, c2, c3, int(seed)), dim=-1)  # [B, Hq, Tq, n4, 4]
    w = words.reshape(B, Hq, Tq, 4 * n4)[..., :Tk]  # key j: word j & 3 of call j >> 2
    return (w >> 8) >= dropout_threshold(p)


# ----------------------------------------------------------------------------- the case
ALIGNMENTS = ("bottom_right", "top_left")
# Optional features a kernel backend may or may not serve (see AttentionCase.features).
FEATURES = frozenset({"window", "top_left", "softcap", "bias", "bias_grad"})


@dataclass(frozen=True)
class AttentionCase:
    """The facts of one attention call a backend's ``unsupported(case)`` decides on."""

    device_type: str
    dtype: torch.dtype
    head_dim: int
    q_len: int
    kv_len: int
    causal: bool  # window_right == 0 (and no left window)
    window: bool  # a left window, or a right window > 0 (sliding / local attention)
    top_left: bool  # diagonal offset != kv_len - q_len
    softcap: bool
    bias: bool  # an additive bias (or a boolean mask turned into one)
    bias_grad: bool  # the bias needs a gradient
    dropout: bool
    key_padding_mask: bool

    FEATURE_WORDS = {  # for error messages and reports
        "window": "sliding window",
        "top_left": "top-left causal alignment",
        "softcap": "softcap",
        "bias": "additive bias / boolean mask",
        "bias_grad": "a bias that needs a gradient",
    }

    def features(self) -> set[str]:
        """The optional features this call uses: a subset of :data:`FEATURES`."""
        flags = (
            ("window", self.window),
            ("top_left", self.top_left),
            ("softcap", self.softcap),
            ("bias", self.bias),
            ("bias_grad", self.bias_grad),
        )
        return {name for name, on in flags if on}


def diag_offset(q_len: int, kv_len: int, alignment: str) -> int:
    """Key index of query 0's diagonal: ``kv_len - q_len`` bottom-right, 0 top-left."""
    return kv_len - q_len if alignment == "bottom_right" else 0


# ----------------------------------------------------------------------------- reference
def visible_mask(
    Tq: int,
    Tk: int,
    window_left: int,
    window_right: int,
    offset: int,
    key_padding_mask: Tensor | None,
    device,
) -> Tensor | None:
    """Bool [B or 1, 1, Tq, Tk]: True where query i may see key j (None: everything visible).

    With ``d = i + offset``: visible iff ``(window_left < 0 or j >= d - window_left)`` and
    ``(window_right < 0 or j <= d + window_right)`` and key j is not padding.
    """
    vis = None
    if window_left >= 0 or window_right >= 0:
        i = torch.arange(Tq, device=device).view(Tq, 1)
        j = torch.arange(Tk, device=device).view(1, Tk)
        d = i + offset
        vis = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
        if window_left >= 0:
            vis &= j >= d - window_left
        if window_right >= 0:
            vis &= j <= d + window_right
        vis = vis.view(1, 1, Tq, Tk)
    if key_padding_mask is not None:
        keep = (~key_padding_mask).view(-1, 1, 1, Tk)
        vis = keep if vis is None else vis & keep
    return vis


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_mask: Tensor | None = None,
    softcap: float | None = None,
    window: tuple[int, int] | None = None,
    alignment: str = "bottom_right",
    attn_bias: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """Plain-PyTorch attention materialising the ``[Tq, Tk]`` scores, in the inputs' dtype.

    The ground truth for tests (run it in float64), docs and the ``reference`` backend; the
    arguments mean what they mean in :func:`attention`. Rows that see no key give 0. Dropout
    (only with a ``dropout_mask`` [B, Hq, Tq, Tk], True = kept) scales kept probabilities by
    1/(1-p). Differentiable by autograd (also with respect to ``attn_bias``).
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if Hkv != Hq:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    wl, wr = _window(causal, window)
    s = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, Hq, Tq, Tk)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if attn_bias is not None:
        s = s + attn_bias
    vis = visible_mask(Tq, Tk, wl, wr, diag_offset(Tq, Tk, alignment), key_padding_mask, q.device)
    if attn_mask is not None:
        vis = attn_mask if vis is None else vis & attn_mask
    if attn_bias is not None:
        finite = ~torch.isneginf(s)
        vis = finite if vis is None else vis & finite
    if vis is not None:
        # Hidden scores -> -inf; rows that see nothing -> all zero scores (finite softmax),
        # then their probabilities are zeroed: no NaN forward or backward.
        any_vis = vis.any(-1, keepdim=True)
        s = torch.where(vis, s, float("-inf"))
        s = torch.where(any_vis, s, 0.0)
        p = torch.softmax(s, dim=-1) * vis
    else:
        p = torch.softmax(s, dim=-1)
    if dropout_mask is not None and dropout_p > 0:
        p = p * dropout_mask / (1.0 - dropout_p)
    return torch.matmul(p, v)


def _window(causal: bool, window: tuple[int, int] | None) -> tuple[int, int]:
    """(window_left, window_right) with -1 = unbounded; ``causal`` sets the right side to 0."""
    wl, wr = (-1, -1) if window is None else (int(window[0]), int(window[1]))
    if causal:
        wr = 0
    return wl, wr


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """lse is float32, float64 for float64 inputs (so float64 gradients stay exact for
    gradcheck); the cpu kernel does the same."""
    return acc_dtype(dtype)


class _Reference:
    """The ``reference`` backend: materialises ``[Tq, Tk]`` in float32 (float64 for float64).

    The backward is written out (custom-op bodies run below autograd). It is the fallback for
    every case the kernels do not cover, so it favours clarity over memory.
    """

    @staticmethod
    def _scores(q, k, key_padding_mask, bias, scale, softcap, wl, wr, off):
        """(S, T): the final scores with hidden entries -inf, and T = scale Q K^T before the
        softcap (None without one); k already repeated to Hq heads."""
        acc = acc_dtype(q.dtype)
        t = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale
        s = softcap * torch.tanh(t / softcap) if softcap else t
        if bias is not None:
            s = s + bias.to(acc)
        vis = visible_mask(q.shape[2], k.shape[2], wl, wr, off, key_padding_mask, q.device)
        if vis is not None:
            s = s.masked_fill(~vis, float("-inf"))
        return s, (t if softcap else None)

    def fwd(self, q, k, v, key_padding_mask, bias, scale, softcap, wl, wr, off, p, seed, offset):
        B, Hq, Tq, D = q.shape
        acc = acc_dtype(q.dtype)
        group = Hq // k.shape[1]
        kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        s, _ = self._scores(q, kr, key_padding_mask, bias, scale, softcap, wl, wr, off)
        lse = torch.logsumexp(s, dim=-1)  # -inf for rows that see no key
        empty = torch.isneginf(lse)
        pr = torch.exp(s - torch.where(empty, 0.0, lse)[..., None])
        if p > 0:
            keep = dropout_keep_mask(seed, offset, B, Hq, Tq, k.shape[2], p, q.device)
            pr = pr * keep / (1.0 - p)
        out = torch.matmul(pr, vr.to(acc)).to(q.dtype).contiguous()
        lse = torch.where(empty, float("inf"), lse).to(_lse_dtype(q.dtype)).contiguous()
        return out, lse

    def bwd(
        self,
        dout,
        q,
        k,
        v,
        out,
        lse,
        key_padding_mask,
        bias,
        scale,
        softcap,
        wl,
        wr,
        off,
        dropout_p,
        seed,
        offset,
        need_bias_grad,
    ):
        B, Hq, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        acc = acc_dtype(q.dtype)
        group = Hq // Hkv
        kr, vr = k.repeat_interleave(group, 1).to(acc), v.repeat_interleave(group, 1).to(acc)
        s, t = self._scores(q, kr, key_padding_mask, bias, scale, softcap, wl, wr, off)
        p = torch.exp(s - lse.to(acc)[..., None])  # lse = +inf -> row of zeros
        do = dout.to(acc)
        dp = torch.matmul(do, vr.transpose(-2, -1))
        pd = p
        if dropout_p > 0:
            keep = dropout_keep_mask(seed, offset, B, Hq, Tq, Tk, dropout_p, q.device)
            pd = p * keep / (1.0 - dropout_p)
            dp = dp * keep / (1.0 - dropout_p)
        delta = (do * out.to(acc)).sum(-1, keepdim=True)
        ds = p * (dp - delta)
        dbias = ds.contiguous() if need_bias_grad else ds.new_empty(0)
        dt = ds * (1.0 - torch.tanh(t / softcap) ** 2) if softcap else ds
        dq = torch.matmul(dt, kr) * scale
        dk = (torch.matmul(dt.transpose(-2, -1), q.to(acc)) * scale).view(B, Hkv, group, Tk, D)
        dv = torch.matmul(pd.transpose(-2, -1), do).view(B, Hkv, group, Tk, D)
        return dq.to(q.dtype), dk.sum(2).to(k.dtype), dv.sum(2).to(v.dtype), dbias


def _acc_bias(bias: Tensor | None, q: Tensor, k: Tensor) -> Tensor | None:
    """The bias as the CPU kernel reads it: [B, Hq, Tq, Tk] in the accumulation dtype (float32;
    float64 for float64 inputs) with unit stride on the key dim. Only the stored elements are
    converted (broadcast dims, size 1 or stride 0, stay broadcast), and only a broadcast key
    dim is materialised."""
    if bias is None:
        return None
    B, Hq, Tq, _ = q.shape
    Tk = k.shape[2]
    acc = acc_dtype(q.dtype)
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    index = tuple(slice(0, 1) if st == 0 else slice(None) for st in bias.stride()[:3])
    base = bias[index]
    if base.shape[-1] != Tk or base.stride(-1) != 1 or base.dtype != acc:
        base = base.to(acc).expand(*base.shape[:3], Tk).contiguous()
    return base.expand(B, Hq, Tq, Tk)


class _Native:
    """The ``cpu`` and ``cuda`` backends: C++ / CUDA kernels behind ``torch.ops.fastattn_C``.

    The CPU kernel takes the whole contract (``attention_fwd_features``: window, alignment,
    softcap, bias and its gradient); the CUDA one the original schema (causal, no features)."""

    def fwd(self, q, k, v, key_padding_mask, bias, scale, softcap, wl, wr, off, p, seed, offset):
        if q.device.type == "cpu":
            return torch.ops.fastattn_C.attention_fwd_features(
                q, k, v, key_padding_mask, _acc_bias(bias, q, k), scale, softcap, wl, wr,
                off, p, seed, offset,
            )  # fmt: skip
        return torch.ops.fastattn_C.attention_fwd(
            q, k, v, key_padding_mask, wr == 0, scale, p, seed, offset
        )

    def bwd(
        self,
        dout,
        q,
        k,
        v,
        out,
        lse,
        key_padding_mask,
        bias,
        scale,
        softcap,
        wl,
        wr,
        off,
        dropout_p,
        seed,
        offset,
        need_bias_grad,
    ):
        if q.device.type == "cpu":
            return torch.ops.fastattn_C.attention_bwd_features(
                dout, q, k, v, out, lse, key_padding_mask, _acc_bias(bias, q, k), scale,
                softcap, wl, wr, off, dropout_p, seed, offset, need_bias_grad,
            )  # fmt: skip
        dq, dk, dv = torch.ops.fastattn_C.attention_bwd(
            dout, q, k, v, out, lse, key_padding_mask, wr == 0, scale, dropout_p, seed, offset
        )
        return dq, dk, dv, q.new_empty(0)


REFERENCE = _Reference()
NATIVE = _Native()


# ----------------------------------------------------------------------------- declaration
TRITON_MAX_HEAD_DIM = 128  # tl.dot tiles of the head dim must fit the Triton kernels' blocks
DECL = _dispatch.declare(
    _dispatch.OpDecl(
        name="attention",
        file="attention",
        case=AttentionCase,
        summary="softmax attention (flash-attention style), forward and backward",
        support={
            ("cpu", "cpu"): _dispatch.Support(
                (torch.float32, torch.bfloat16, torch.float64),
                max_head_dim="attention_max_head_dim_cpu",
                features=frozenset({"window", "top_left", "softcap", "bias", "bias_grad"}),
            ),
            ("cuda", "cuda"): _dispatch.Support(
                (torch.float16, torch.bfloat16, torch.float32),
                max_head_dim="attention_max_head_dim_cuda",  # fp16 / bf16: the FA2 kernels
                features=frozenset(),
                dtype_max_head_dim=((torch.float32, "attention_max_head_dim_cuda_fp32"),),
            ),
            **{
                ("triton", dev): _dispatch.Support(
                    (torch.float16, torch.bfloat16, torch.float32),
                    max_head_dim=TRITON_MAX_HEAD_DIM,
                    features=frozenset(),
                )
                for dev in ("cuda", "cpu")
            },
        },
    )
)


# ----------------------------------------------------------------------------- custom ops
def _case(q, k, key_padding_mask, bias, softcap, wl, wr, off, dropout_p, bias_grad):
    Tq, Tk = q.shape[2], k.shape[2]
    return AttentionCase(
        device_type=q.device.type,
        dtype=q.dtype,
        head_dim=q.shape[-1],
        q_len=Tq,
        kv_len=Tk,
        causal=wr == 0 and wl < 0,
        window=wl >= 0 or wr > 0,
        top_left=(wl >= 0 or wr >= 0) and off != Tk - Tq,
        softcap=softcap > 0,
        bias=bias is not None,
        bias_grad=bias_grad,
        dropout=dropout_p > 0,
        key_padding_mask=key_padding_mask is not None,
    )


def _attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    bias: Tensor | None,
    scale: float,
    softcap: float,
    window_left: int,
    window_right: int,
    diag_offset: int,
    dropout_p: float,
    seed: Tensor | None,
    offset: int,
) -> tuple[Tensor, Tensor]:
    """q [B,Hq,Tq,D], k/v [B,Hkv,Tk,D], bias None or [B,Hq,Tq,Tk] (broadcast by stride 0,
    unit last stride) -> (out [B,Hq,Tq,D], lse [B,Hq,Tq] float32, float64 for float64)."""
    case = _case(q, k, key_padding_mask, bias, softcap, window_left, window_right, diag_offset,
                 dropout_p, False)  # fmt: skip
    args = (q, k, v, key_padding_mask, bias, scale, softcap, window_left, window_right,
            diag_offset, dropout_p, seed_int(seed), offset)  # fmt: skip
    out, lse = _dispatch.run("attention", "fwd", q.device, case, None, *args)
    return out.contiguous(), lse.contiguous()


attention_fwd = torch.library.custom_op("fastattn::attention_fwd", mutates_args=())(_attention_fwd)
# Dropout (p, seed, offset) changes values, not shapes: the fake runs without it.
attention_fwd.register_fake(fake_from(REFERENCE, "fwd", fixed={10: 0.0, 11: 0, 12: 0}))


def _attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    key_padding_mask: Tensor | None,
    bias: Tensor | None,
    scale: float,
    softcap: float,
    window_left: int,
    window_right: int,
    diag_offset: int,
    dropout_p: float,
    seed: Tensor | None,
    offset: int,
    need_bias_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dbias), contiguous, dq/dk/dv shaped like q, k, v; dbias is dS
    [B,Hq,Tq,Tk] in float32 (float64 for float64) when ``need_bias_grad``, else empty.
    ``backend``: the one in force at the forward."""
    case = _case(q, k, key_padding_mask, bias, softcap, window_left, window_right, diag_offset,
                 dropout_p, need_bias_grad)  # fmt: skip
    args = (dout, q, k, v, out, lse, key_padding_mask, bias, scale, softcap, window_left,
            window_right, diag_offset, dropout_p, seed_int(seed), offset,
            need_bias_grad)  # fmt: skip
    dq, dk, dv, dbias = _dispatch.run("attention", "bwd", q.device, case, backend, *args)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dbias.contiguous()


attention_bwd = torch.library.custom_op("fastattn::attention_bwd", mutates_args=())(_attention_bwd)
attention_bwd.register_fake(fake_from(REFERENCE, "bwd", trailing=1, fixed={13: 0.0, 14: 0, 15: 0}))
_bwd_call = eager_call(attention_bwd, _attention_bwd)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, bias, *args = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, bias)
    ctx.args = tuple(args)
    ctx.backend = _dispatch.get_backend()


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, key_padding_mask, bias = ctx.saved_tensors
    need_bias_grad = bias is not None and ctx.needs_input_grad[4]
    dq, dk, dv, dbias = _bwd_call(
        dout.contiguous(),
        q,
        k,
        v,
        out,
        lse,
        key_padding_mask,
        bias,
        *ctx.args,
        need_bias_grad,
        ctx.backend,
    )
    return dq, dk, dv, None, (dbias if need_bias_grad else None), *([None] * len(ctx.args))


attention_fwd.register_autograd(_backward, setup_context=_setup_context)
_fwd_call = eager_fast_path(attention_fwd, _attention_fwd, _setup_context, _backward)


# ----------------------------------------------------------------------------- public API
def _cpp_path(q, k, v, key_padding_mask, softcap, wl, wr, off, dropout_p) -> bool:
    """The call takes the C++ eager path (``torch.ops.fastattn_C.attention_eager``: the same
    kernels and autograd formula as the custom ops above, one C++ autograd node). Calls with
    an additive bias stay on the custom ops (the bias gradient is theirs alone)."""
    if not eager_cpu(q, k, v, key_padding_mask):
        return False
    Tq, Tk = q.shape[2], k.shape[2]
    key = (q.dtype, q.shape[-1], wl, wr, off == Tk - Tq, softcap > 0, dropout_p > 0,
           key_padding_mask is not None)  # fmt: skip
    return _dispatch.cpu_serves(
        "attention",
        key,
        lambda: _case(q, k, key_padding_mask, None, softcap, wl, wr, off, dropout_p, False),
    )


def _validate(
    q, k, v, key_padding_mask, scale, dropout_p, softcap, window, alignment, attn_bias, attn_mask
) -> None:
    name = "fastattn.attention"
    for what, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, what, t, floating=True)
        if t.dim() != 4:
            raise ValueError(
                f"{name}: {what} must be 4-D (batch, heads, seq, head_dim), got shape "
                f"{tuple(t.shape)}"
            )
    check_same_device(name, ("q", q), ("k", k), ("v", v))
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"{name}: q, k, v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    B, Hq, Tq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"{name}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    Bk, Hkv, Tk, Dk = k.shape
    if Bk != B:
        raise ValueError(f"{name}: batch size mismatch: q has {B}, k/v have {Bk}")
    if Dk != D:
        raise ValueError(f"{name}: head dim mismatch: q has {D}, k/v have {Dk}")
    if D == 0:
        raise ValueError(f"{name}: head dim must be >= 1, got 0")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(
            f"{name}: the number of query heads ({Hq}) must be a multiple of the number of "
            f"key/value heads ({Hkv})"
        )
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor):
            raise TypeError(
                f"{name}: key_padding_mask must be a torch.Tensor, got "
                f"{type(key_padding_mask).__name__}"
            )
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(
                f"{name}: key_padding_mask must be a bool tensor (True = padding), got "
                f"{key_padding_mask.dtype}"
            )
        if tuple(key_padding_mask.shape) != (B, Tk):
            raise ValueError(
                f"{name}: key_padding_mask must have shape (batch, kv_len) = ({B}, {Tk}), got "
                f"{tuple(key_padding_mask.shape)}"
            )
        check_same_device(name, ("q", q), ("key_padding_mask", key_padding_mask))
    if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise ValueError(f"{name}: scale must be a finite float or None, got {scale!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name}: dropout_p must be in [0, 1), got {dropout_p!r}")
    if softcap is not None and (
        not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap < 0
    ):
        raise ValueError(f"{name}: softcap must be a finite float >= 0 or None, got {softcap!r}")
    if window is not None:
        ok = (
            isinstance(window, (tuple, list))
            and len(window) == 2
            and all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window)
        )
        if not ok:
            raise ValueError(
                f"{name}: window must be (left, right), two ints >= -1 (-1 = unbounded), "
                f"got {window!r}"
            )
    if alignment not in ALIGNMENTS:
        raise ValueError(f"{name}: alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    for what, t, want in (("attn_bias", attn_bias, "floating"), ("attn_mask", attn_mask, "bool")):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: {what} must be a torch.Tensor, got {type(t).__name__}")
        if want == "bool" and t.dtype != torch.bool:
            raise TypeError(
                f"{name}: attn_mask must be a bool tensor (True = attend, as in "
                f"F.scaled_dot_product_attention), got {t.dtype}; pass a float mask as attn_bias"
            )
        if want == "floating" and not t.dtype.is_floating_point:
            raise TypeError(f"{name}: attn_bias must be a floating-point tensor, got {t.dtype}")
        check_same_device(name, ("q", q), (what, t))
        try:
            torch.broadcast_shapes(t.shape, (B, Hq, Tq, Tk))
            ok = t.dim() <= 4
        except RuntimeError:
            ok = False
        if not ok or torch.broadcast_shapes(t.shape, (B, Hq, Tq, Tk)) != (B, Hq, Tq, Tk):
            raise ValueError(
                f"{name}: {what} must broadcast to (batch, q_heads, q_len, kv_len) = "
                f"({B}, {Hq}, {Tq}, {Tk}), got {tuple(t.shape)}"
            )


_draw_seed = draw_seed  # the one seed draw of every op with dropout (ops/_common.py)


def _kernel_bias(
    attn_bias: Tensor | None, attn_mask: Tensor | None, shape: tuple[int, int, int, int], q: Tensor
) -> Tensor | None:
    """One additive bias for the kernels: ``attn_bias`` with ``-inf`` where ``attn_mask`` is
    False, as a [B, Hq, Tq, Tk] view whose broadcast dims have stride 0 and whose last dim has
    unit stride (only a broadcast key dim is materialised)."""
    if attn_bias is None and attn_mask is None:
        return None
    acc = acc_dtype(q.dtype)
    if attn_bias is None:
        bias = torch.zeros((), dtype=acc, device=q.device).masked_fill(~attn_mask, float("-inf"))
    else:
        bias = attn_bias if attn_bias.dtype in (acc, q.dtype) else attn_bias.to(acc)
        if attn_mask is not None:
            bias = bias.masked_fill(~attn_mask, float("-inf"))
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    if bias.shape[-1] != shape[-1] or bias.stride(-1) != 1:
        bias = bias.expand(*bias.shape[:-1], shape[-1]).contiguous()
    return bias.expand(shape)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    softcap: float | None = None,
    window: tuple[int, int] | None = None,
    alignment: str = "bottom_right",
    attn_bias: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """Fused softmax attention, served by the fastest backend that honours every argument.

    q: (B, Hq, Tq, D); k, v: (B, Hkv, Tk, D) with ``Hq % Hkv == 0`` (GQA / MQA); returns
    (B, Hq, Tq, D).

    - ``causal``: query i sees key j iff ``j <= i + off``; ``alignment="bottom_right"`` (the
      default, flash-attn's) puts ``off = Tk - Tq`` (a query row against a KV cache sees every
      cached key; for Tq == Tk this is ``F.scaled_dot_product_attention(is_causal=True)``),
      ``"top_left"`` puts ``off = 0`` (SDPA's ``is_causal`` when Tq != Tk, e.g. a prefill into
      a larger static cache).
    - ``window=(left, right)``: local attention, query i sees keys ``i + off - left .. i + off
      + right`` (-1 = unbounded; flash-attn's ``window_size``). ``causal`` sets ``right = 0``;
      a sliding window of W keys (Mistral) is ``causal=True, window=(W - 1, 0)``.
    - ``softcap``: scores become ``softcap * tanh(scores / softcap)`` (Gemma 2), before the bias.
    - ``attn_bias``: float tensor broadcastable to (B, Hq, Tq, Tk), added to the scores (T5's
      position bias, ALiBi); ``-inf`` hides a key. It gets a gradient when it requires one.
    - ``attn_mask``: bool tensor broadcastable to (B, Hq, Tq, Tk), True = attend
      (``F.scaled_dot_product_attention``'s meaning).
    - ``key_padding_mask``: (B, Tk) bool, True = padding (``torch.nn.MultiheadAttention``'s).
    - ``dropout_p``: drops attention probabilities (Philox mask seeded from torch's default
      generator); pass 0 in evaluation. Under ``torch.compile`` the seed draw is traced (no
      graph break, a fresh seed per call); it then comes from the compiled program's RNG.

    A query that sees no key gives 0 (and zero gradients). A backend whose kernel lacks a
    feature is skipped by ``auto`` (the reference serves the call, logged at debug level); an
    explicitly chosen one raises :class:`fastattn.BackendError` naming the feature.

    Under autocast, q, k and v are cast to the autocast dtype first, as autocast does for
    ``F.scaled_dot_product_attention`` (so a float32 q/k after a float32 rotary embedding meets
    a bfloat16 v as SDPA would take them).
    """
    if isinstance(q, Tensor) and torch.is_autocast_enabled(q.device.type):
        adt = torch.get_autocast_dtype(q.device.type)
        q, k, v = (
            t.to(adt) if isinstance(t, Tensor) and t.dtype in (torch.float32, adt) else t
            for t in (q, k, v)
        )
    _validate(
        q,
        k,
        v,
        key_padding_mask,
        scale,
        dropout_p,
        softcap,
        window,
        alignment,
        attn_bias,
        attn_mask,
    )
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if q.numel() == 0 or Tk == 0:
        # Nothing to attend: an exact, differentiable empty / zero result.
        return attention_reference(
            q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask
        )
    wl, wr = _window(bool(causal), window)
    off = diag_offset(Tq, Tk, alignment)
    # Kernels need unit stride on the head dim; other strides are passed through as they are.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.contiguous()
    bias = _kernel_bias(attn_bias, attn_mask, (B, Hq, Tq, Tk), q)
    dropout_p = float(dropout_p)
    softcap = float(softcap or 0.0)
    if bias is None and _cpp_path(q, k, v, key_padding_mask, softcap, wl, wr, off, dropout_p):
        seed = seed_int(_draw_seed()) if dropout_p > 0 else 0
        return torch.ops.fastattn_C.attention_eager(
            q, k, v, key_padding_mask, scale, softcap, wl, wr, off, dropout_p, seed, 0
        )
    seed = _draw_seed() if dropout_p > 0 else None
    out, _ = _fwd_call(
        q,
        k,
        v,
        key_padding_mask,
        bias,
        scale,
        softcap,
        wl,
        wr,
        off,
        dropout_p,
        seed,
        0,
    )
    return out
