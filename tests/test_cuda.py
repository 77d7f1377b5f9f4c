"""Numeric tests of the CUDA backend (csrc/cuda) against float64 references computed inline.

They call the kernel ops torch.ops.fastattn_C.* directly on CUDA tensors and apply the error
rule of tests/rule.py: error vs the float64 reference <= 2 x PyTorch's own error in the same
dtype (the same formula run in that dtype on the GPU) + a small floor. Skipped (with the reason)
unless a GPU is visible and fastattn._C was built with the CUDA kernels.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastattn.ops.attention import dropout_threshold
from tests.rule import assert_rule

try:
    from fastattn import _C
except ImportError as e:  # pragma: no cover - depends on the build
    _C, _why = None, f"fastattn._C not importable ({e})"
else:
    _why = None if getattr(_C, "with_cuda", False) else "fastattn._C built without CUDA kernels"
if _why is None and not torch.cuda.is_available():
    _why = "no CUDA device"
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")

OPS = torch.ops.fastattn_C
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to("cuda", dtype)


# ---------------------------------------------------------------- layer norm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (13, 768), (5, 1500), (3, 4104)])
@pytest.mark.parametrize("affine,residual", [(True, False), (False, False), (True, True)])
def test_layer_norm(dtype, shape, affine, residual):
    N, M = shape
    x = _rand(N, M, dtype=dtype, scale=2.0) + 0.5
    res = _rand(N, M, dtype=dtype) if residual else None
    w = _rand(M, dtype=torch.float32) if affine else None
    b = _rand(M, dtype=torch.float32) if affine else None
    eps = 1e-5
    out, s, mean, rstd = OPS.layer_norm_fwd(x, w, b, res, eps, None, 0.0, 0)
    # Reference from the rounded sum the kernel returns (the contract: sum in x's dtype).
    s_in = s if residual else x
    if residual:
        assert_rule("sum", s, (x + res), x.double() + res.double())
    w64 = w.double() if w is not None else None
    b64 = b.double() if b is not None else None
    s64 = s_in.double().requires_grad_(True)
    w64r = w64.clone().requires_grad_(True) if w64 is not None else None
    b64r = b64.clone().requires_grad_(True) if b64 is not None else None
    ref = F.layer_norm(s64, (M,), w64r, b64r, eps)
    sx = s_in.detach().clone().requires_grad_(True)
    wx = w.to(dtype).requires_grad_(True) if w is not None else None
    bx = b.to(dtype).requires_grad_(True) if b is not None else None
    tx = F.layer_norm(sx, (M,), wx, bx, eps)
    assert_rule("out", out, tx, ref)
    torch.testing.assert_close(mean.double(), s64.detach().mean(-1), rtol=1e-4, atol=1e-4)
    var = s64.detach().var(-1, unbiased=False)
    torch.testing.assert_close(rstd.double(), 1 / torch.sqrt(var + eps), rtol=1e-3, atol=1e-4)

    dout = _rand(N, M, dtype=dtype)
    dsum = _rand(N, M, dtype=dtype) if residual else None
    _, dx, dw, db = OPS.layer_norm_bwd(
        dout, s_in, w, mean, rstd, dsum, affine, affine, False, None, 0.0, 0
    )
    gr = torch.autograd.grad(ref, [t for t in (s64, w64r, b64r) if t is not None], dout.double())
    gx = torch.autograd.grad(tx, [t for t in (sx, wx, bx) if t is not None], dout)
    dx_ref = gr[0] + (dsum.double() if residual else 0)
    dx_tx = gx[0] + (dsum if residual else 0)
    assert_rule("dx", dx, dx_tx, dx_ref)
    if affine:
        assert_rule("dweight", dw.to(dtype), gx[1], gr[1])
        assert_rule("dbias", db.to(dtype), gx[2], gr[2])
    else:
        assert dw.numel() == 0 and db.numel() == 0


def test_layer_norm_rejects_bad_input():
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        OPS.layer_norm_fwd(x.double(), None, None, None, 1e-5, None, 0.0, 0)
    with pytest.raises(RuntimeError, match="shape"):
        OPS.layer_norm_fwd(x, torch.ones(7, device="cuda"), None, None, 1e-5, None, 0.0, 0)
    with pytest.raises(RuntimeError, match="CUDA"):
        OPS.layer_norm_fwd(x, torch.ones(8), None, None, 1e-5, None, 0.0, 0)


# ---------------------------------------------------------------- rms norm
def _rms_math(s, w, offset, cast, eps):
    """RMSNorm as a model computes it in s's dtype: statistics in float32 (float64 for float64),
    LlamaRMSNorm's order with ``cast`` (xhat rounded to s's dtype, then the weight), else one
    rounding at the end (F.rms_norm, GemmaRMSNorm). Differentiable in s and w."""
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    h = s.to(acc)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if cast:
        h = h.to(s.dtype)
        return h * (w.to(s.dtype) + offset) if w is not None else h
    return (h * (w.to(acc) + offset) if w is not None else h).to(s.dtype)


# (weight, weight_offset, cast_before_weight): plain, Gemma's 1 + w, Llama's order, no weight.
RMS_MODES = [(True, 0.0, False), (True, 1.0, False), (True, 0.0, True), (False, 0.0, False)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (13, 768), (5, 1500), (3, 4104)])
@pytest.mark.parametrize("affine,offset,cast", RMS_MODES)
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm(dtype, shape, affine, offset, cast, residual):
    N, M = shape
    x = _rand(N, M, dtype=dtype, scale=2.0) + 0.5
    res = _rand(N, M, dtype=dtype) if residual else None
    w = _rand(M, dtype=dtype) if affine else None
    eps = 1e-6
    out, s, rstd = OPS.rms_norm_fwd(x, w, res, eps, offset, cast)
    s_in = s if residual else x
    if residual:
        assert_rule("sum", s, (x + res), x.double() + res.double())
    s64 = s_in.double().requires_grad_(True)
    w64 = w.double().requires_grad_(True) if affine else None
    ref = _rms_math(s64, w64, offset, False, eps)
    sx = s_in.detach().clone().requires_grad_(True)
    wx = w.clone().requires_grad_(True) if affine else None
    tx = _rms_math(sx, wx, offset, cast, eps)
    assert_rule("out", out, tx, ref)
    ms = s64.detach().pow(2).mean(-1)
    torch.testing.assert_close(rstd.double(), 1 / torch.sqrt(ms + eps), rtol=1e-3, atol=1e-4)
    dout = _rand(N, M, dtype=dtype)
    dsum = _rand(N, M, dtype=dtype) if residual else None
    dx, dw = OPS.rms_norm_bwd(dout, s_in, w, rstd, dsum, offset, cast, affine)
    gr = torch.autograd.grad(ref, [t for t in (s64, w64) if t is not None], dout.double())
    gx = torch.autograd.grad(tx, [t for t in (sx, wx) if t is not None], dout)
    extra = (dsum.double(), dsum) if residual else (0, 0)
    assert_rule("dx", dx, gx[0] + extra[1], gr[0] + extra[0])
    if affine:
        assert dw.dtype == dtype
        assert_rule("dweight", dw, gx[1], gr[1])
    else:
        assert dw.numel() == 0


def test_rms_norm_rejects_bad_input():
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        OPS.rms_norm_fwd(x.double(), None, None, 1e-6, 0.0, False)
    with pytest.raises(RuntimeError, match="shape"):
        OPS.rms_norm_fwd(x, torch.ones(7, device="cuda"), None, 1e-6, 0.0, False)
    with pytest.raises(RuntimeError, match="CUDA"):
        OPS.rms_norm_fwd(x, torch.ones(8), None, 1e-6, 0.0, False)
    with pytest.raises(RuntimeError, match="need_weight_grad without a weight"):
        OPS.rms_norm_bwd(x, x, None, torch.ones(4, device="cuda"), None, 0.0, False, True)


# ---------------------------------------------------------------- bias + GELU
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (129, 256), (3, 1001)])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_gelu(dtype, shape, approximate, with_bias):
    N, M = shape
    x = _rand(N, M, dtype=dtype, scale=3.0)
    bias = _rand(M, dtype=dtype) if with_bias else None
    out = OPS.bias_gelu_fwd(x, bias, approximate)
    x64 = x.double().requires_grad_(True)
    b64 = bias.double().requires_grad_(True) if with_bias else None
    ref = F.gelu(x64 + b64 if with_bias else x64, approximate=approximate)
    xx = x.clone().requires_grad_(True)
    bx = bias.clone().requires_grad_(True) if with_bias else None
    tx = F.gelu(xx + bx if with_bias else xx, approximate=approximate)
    assert_rule("out", out, tx, ref)
    dout = _rand(N, M, dtype=dtype)
    dx, db = OPS.bias_gelu_bwd(dout, x, bias, approximate, with_bias)
    gr = torch.autograd.grad(ref, [t for t in (x64, b64) if t is not None], dout.double())
    gx = torch.autograd.grad(tx, [t for t in (xx, bx) if t is not None], dout)
    assert_rule("dx", dx, gx[0], gr[0])
    if with_bias:
        assert db.dtype == bias.dtype
        assert_rule("dbias", db, gx[1], gr[1])


# ---------------------------------------------------------------- gated activations
GATED_ACTS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
}
GATED_SHAPES = [(1, 1), (7, 33), (129, 256), (3, 1001)]
GATED_LAYOUTS = ["separate", "chunked", "packed"]


def gated_case(dtype, shape, activation, layout, fwd, bwd, dev):
    """One gated_act case through ``fwd(gate, up, act)`` / ``bwd(dh, gate, up, act)`` (the real
    kernel ops here, the host emulation in tests/cuda_emu/drive.py), checked by the rule."""
    N, H = shape
    gu = (torch.randn(N, 2 * H, dtype=torch.float64) * 3).to(dev, dtype)
    g, u = gu[:, :H], gu[:, H:]  # the chunked halves: row stride 2H
    if layout == "separate":
        g, u = g.contiguous(), u.contiguous()
    packed = layout == "packed"
    h = fwd(gu, None, activation) if packed else fwd(g, u, activation)
    act = GATED_ACTS[activation]
    g64, u64 = (t.detach().double().requires_grad_(True) for t in (g, u))
    ref = act(g64) * u64
    gx, ux = (t.detach().clone().requires_grad_(True) for t in (g, u))
    tx = act(gx) * ux
    assert_rule(f"out {activation} {layout}", h, tx, ref)
    dh = (torch.randn(N, H, dtype=torch.float64)).to(dev, dtype)
    if packed:
        dgu, empty = bwd(dh, gu, None, activation)
        assert dgu.shape == (N, 2 * H) and empty.numel() == 0
        dg, du = dgu[:, :H], dgu[:, H:]
    else:
        dg, du = bwd(dh, g, u, activation)
    gr = torch.autograd.grad(ref, (g64, u64), dh.double())
    gt = torch.autograd.grad(tx, (gx, ux), dh)
    assert_rule(f"dgate {activation} {layout}", dg, gt[0], gr[0])
    assert_rule(f"dup {activation} {layout}", du, gt[1], gr[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GATED_SHAPES)
@pytest.mark.parametrize("activation", list(GATED_ACTS))
@pytest.mark.parametrize("layout", GATED_LAYOUTS)
def test_gated_act(dtype, shape, activation, layout):
    gated_case(dtype, shape, activation, layout, OPS.gated_act_fwd, OPS.gated_act_bwd, "cuda")


def test_gated_act_rejects_bad_input():
    g = torch.randn(4, 8, device="cuda")
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        OPS.gated_act_fwd(g.double(), None, "silu")
    with pytest.raises(RuntimeError, match="shape of gate"):
        OPS.gated_act_fwd(g, torch.randn(4, 7, device="cuda"), "silu")
    with pytest.raises(RuntimeError, match="CUDA"):
        OPS.gated_act_fwd(g, torch.randn(4, 8), "silu")
    with pytest.raises(RuntimeError, match="activation"):
        OPS.gated_act_fwd(g, g, "relu")


# ---------------------------------------------------------------- attention
def _philox_keep(seed, offset, B, Hq, Tq, Tk, p):
    """keep[b, h, i, j] exactly as the kernels draw it (csrc/ops.cpp, fastattn/ops/attention.py)."""
    M32 = np.uint64(0xFFFFFFFF)
    b, h, i, j = np.meshgrid(
        np.arange(B), np.arange(Hq), np.arange(Tq), np.arange(Tk), indexing="ij"
    )
    c0 = (j >> 2).astype(np.uint64)  # one call per 4 keys; key j reads word j & 3
    c1 = i.astype(np.uint64)
    c2 = (b * Hq + h).astype(np.uint64)
    c3 = np.full_like(c0, offset & 0xFFFFFFFF)
    k0 = np.uint64(seed & 0xFFFFFFFF)
    k1 = np.uint64((seed >> 32) & 0xFFFFFFFF)
    A, Bm = np.uint64(0xCD9E8D57), np.uint64(0xD2511F53)
    for _ in range(10):
        _c0, _c2 = c0, c2
        c0 = ((A * _c2) >> np.uint64(32)) ^ c1 ^ k0
        c2 = ((Bm * _c0) >> np.uint64(32)) ^ c3 ^ k1
        c1 = (A * _c2) & M32
        c3 = (Bm * _c0) & M32
        k0 = (k0 + np.uint64(0x9E3779B9)) & M32
        k1 = (k1 + np.uint64(0xBB67AE85)) & M32
    word = np.choose(j & 3, [c0, c1, c2, c3])
    return torch.from_numpy((word >> np.uint64(8)) >= np.uint64(dropout_threshold(p)))


def _attn_math(q, k, v, kpm, causal, scale, keep, p):
    """out, lse in q's dtype with plain torch ops (float64 inputs: the reference)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    vis = torch.ones(B, 1, Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(Tq, device=q.device)[:, None]
        j = torch.arange(Tk, device=q.device)[None, :]
        vis = vis & (j <= i + Tk - Tq)
    if kpm is not None:
        vis = vis & ~kpm[:, None, None, :]
    any_vis = vis.any(-1, keepdim=True)
    s = torch.where(vis, s, float("-inf"))
    s = torch.where(any_vis, s, 0.0)
    lse = torch.where(
        any_vis.squeeze(-1),
        torch.logsumexp(s.float() if s.dtype != torch.float64 else s, -1).to(s.dtype),
        float("inf"),
    )
    pm = torch.softmax(s, -1) * any_vis
    if keep is not None:
        pm = pm * keep.to(q.device) / (1 - p)
    return pm @ v, lse


CASES = [
    # B, Hq, Hkv, Tq, Tk, D, causal, padding
    # Tq = 1 with 3 keys, not 1 key: with a single visible key PyTorch's softmax gradient is
    # exactly 0 (its error too), while the flash backward's Delta = rowsum(dO * O) identity
    # leaves rounding noise of order eps |dO| |V| in dq, above the rule's floor.
    (1, 1, 1, 1, 3, 16, False, False),
    (2, 4, 2, 17, 23, 64, False, True),
    (1, 2, 1, 65, 130, 32, True, False),
    (2, 2, 2, 130, 65, 128, True, True),  # Tq > Tk: the first rows see no key
    (1, 3, 1, 33, 33, 80, True, False),  # padded head dim, MQA
    (1, 2, 2, 40, 70, 24, False, False),
    # Several key and query blocks of the FA2 kernels with causal + padding (mask-free tiles
    # next to cut ones), GQA; and a head dim that is not a multiple of 8 (no 16-byte copies).
    (1, 4, 2, 150, 200, 64, True, True),
    (1, 2, 2, 37, 45, 20, False, True),
]
# Head dims above 128: fp16 / bf16 only (the FA2 kernels pad to 256; fp32 stops at 128).
WIDE_CASES = [
    (1, 2, 1, 70, 140, 256, True, False),
    (2, 4, 2, 45, 67, 200, False, True),
]
WIDE_DTYPES = [d for d in DTYPES if d != torch.float32]


@pytest.mark.parametrize(
    "dtype, case",
    [(d, c) for d in DTYPES for c in CASES] + [(d, c) for d in WIDE_DTYPES for c in WIDE_CASES],
)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("layout", ["contiguous", "bthd"])
def test_attention(dtype, case, dropout_p, layout):
    B, Hq, Hkv, Tq, Tk, D, causal, padding = case
    if layout == "bthd":  # non-contiguous [B, H, T, D] views of [B, T, H, D] storage
        q = _rand(B, Tq, Hq, D, dtype=dtype).transpose(1, 2)
        k = _rand(B, Tk, Hkv, D, dtype=dtype).transpose(1, 2)
        v = _rand(B, Tk, Hkv, D, dtype=dtype).transpose(1, 2)
    else:
        q, k, v = (_rand(B, H, T, D, dtype=dtype) for H, T in ((Hq, Tq), (Hkv, Tk), (Hkv, Tk)))
    kpm = None
    if padding:
        kpm = torch.rand(B, Tk, device="cuda") < 0.3
        kpm[0] = True  # batch 0 sees no key at all: out 0, lse +inf, zero gradients
    scale = 1.0 / math.sqrt(D)
    seed, offset = 0x1234_5678_9ABC, 7
    keep = _philox_keep(seed, offset, B, Hq, Tq, Tk, dropout_p) if dropout_p > 0 else None

    out, lse = OPS.attention_fwd(q, k, v, kpm, causal, scale, dropout_p, seed, offset)
    assert out.is_contiguous() and lse.dtype == torch.float32
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref, lse_ref = _attn_math(q64, k64, v64, kpm, causal, scale, keep, dropout_p)
    qx, kx, vx = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    tx, _ = _attn_math(qx, kx, vx, kpm, causal, scale, keep, dropout_p)
    assert_rule("out", out, tx, ref)
    fin = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), fin) and (lse[~fin] > 0).all()
    torch.testing.assert_close(lse[fin].double(), lse_ref[fin].detach(), rtol=1e-4, atol=1e-4)

    dout = _rand(B, Hq, Tq, D, dtype=dtype)
    dq, dk, dv = OPS.attention_bwd(
        dout, q, k, v, out, lse, kpm, causal, scale, dropout_p, seed, offset
    )
    gr = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    gx = torch.autograd.grad(tx, (qx, kx, vx), dout)
    for name, a, t, r in zip(("dq", "dk", "dv"), (dq, dk, dv), gx, gr, strict=True):
        assert_rule(name, a, t, r)


def test_attention_rejects_bad_input():
    q = torch.randn(1, 2, 8, 257, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="head dim 257 not supported for Half"):
        OPS.attention_fwd(q, q, q, None, False, 1.0, 0.0, 0, 0)
    q = torch.randn(1, 2, 8, 136, device="cuda", dtype=torch.float32)  # fp32: up to 128
    with pytest.raises(RuntimeError, match="head dim 136 not supported for Float"):
        OPS.attention_fwd(q, q, q, None, False, 1.0, 0.0, 0, 0)
    q = torch.randn(1, 3, 8, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(1, 2, 8, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="multiple of key/value heads"):
        OPS.attention_fwd(q, k, k, None, False, 1.0, 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="stride 1"):
        OPS.attention_fwd(
            q.transpose(2, 3), q.transpose(2, 3), q.transpose(2, 3), None, False, 1.0, 0.0, 0, 0
        )


# ---------------------------------------------------------------- rotary
def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rotate_half_t(x):
    """The transpose of rotate_half: cat(x[..., h:], -x[..., :h])."""
    h = x.shape[-1] // 2
    return torch.cat((x[..., h:], -x[..., :h]), dim=-1)


def _rotary_math(x, cos, sin, backward):
    """The contract's formulas with plain torch ops, in the promoted dtype of x and cos (float64
    inputs: the reference): forward x c + rotate_half(x) s on the first R columns, backward
    dy c + rotate_half^T(dy s); columns R.. pass through. cos, sin: [Bc, T, R]."""
    R = cos.shape[-1]
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    xr = x[..., :R]
    yr = xr * c + (_rotate_half_t(xr * s) if backward else _rotate_half(xr) * s)
    return torch.cat((yr, x[..., R:].to(yr.dtype)), dim=-1)


# B, H, T, D, R, Bc: head dims 2 to 256, R = D and partial rotary (R < D), T = 1 and primes,
# h = R / 2 odd / not a multiple of the vector width, D - R not a multiple of it.
ROTARY_SHAPES = [
    (1, 1, 1, 2, 2, 1),
    (2, 3, 7, 6, 6, 2),
    (2, 3, 7, 6, 4, 1),
    (2, 2, 13, 64, 64, 1),
    (2, 3, 5, 64, 32, 2),
    (2, 2, 1, 66, 66, 2),
    (2, 2, 11, 66, 64, 1),
    (1, 4, 17, 128, 128, 1),
    (2, 2, 13, 128, 32, 2),
    (2, 2, 7, 256, 256, 2),
    (2, 1, 3, 256, 128, 1),
]
# (x layout, cos / sin layout). x: contiguous, "bthd" (the transpose of a [B, T, H, D] tensor,
# as q after the projection: the output keeps those strides), "sliced" (the first D columns of
# a wider tensor: not dense, so the output is contiguous). cos / sin: contiguous, "expanded"
# (batch stride 0), "strided" (cos: the first R columns and T rows of a wider, longer cache; sin
# contiguous, so the two have different strides).
ROTARY_LAYOUTS = [
    ("contiguous", "contiguous"),
    ("bthd", "contiguous"),
    ("bthd", "strided"),
    ("sliced", "expanded"),
]
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (x, cos / sin, out) dtypes: the uniform ones and the mixes autocast produces (forward: 16-bit
# q, float32 cos, float32 out; backward: float32 dy and cos, 16-bit dx).
ROTARY_MIXES = {
    False: [
        (F32, F32, F32),
        (BF16, BF16, BF16),
        (BF16, F32, F32),
        (F16, F16, F16),
        (F16, F32, F32),
    ],
    True: [(F32, F32, F32), (BF16, BF16, BF16), (F32, F32, BF16), (F16, F16, F16), (F32, F32, F16)],
}
# Every mix of float32 with one 16-bit type (the full matrix of the host emulation).
ROTARY_ALL_MIXES = sorted(
    {(a, b, c) for h in (BF16, F16) for a in (F32, h) for b in (F32, h) for c in (F32, h)},
    key=str,
)


def rotary_inputs(shape, layout, x_dtype, cs_dtype, dev):
    """x [B, H, T, D] and cos, sin [Bc, T, R] in the given layouts (random cos / sin: the halves
    c[:h], c[h:] differ, so an index mix-up between them shows)."""
    B, H, T, D, R, Bc = shape
    x_layout, cs_layout = layout
    if x_layout == "bthd":
        x = torch.randn(B, T, H, D, dtype=torch.float64).to(dev, x_dtype).transpose(1, 2)
    elif x_layout == "sliced":
        x = torch.randn(B, H, T, D + 3, dtype=torch.float64).to(dev, x_dtype)[..., :D]
    else:
        x = torch.randn(B, H, T, D, dtype=torch.float64).to(dev, x_dtype)
    if cs_layout == "strided":
        cos = torch.randn(Bc, T + 2, R + 2, dtype=torch.float64).to(dev, cs_dtype)[:, :T, :R]
        sin = torch.randn(Bc, T, R, dtype=torch.float64).to(dev, cs_dtype)
    elif cs_layout == "expanded":  # batch stride 0 (Bc == 1: a size-1 dim of stride 0)
        cos, sin = (
            torch.randn(1, T, R, dtype=torch.float64).to(dev, cs_dtype).expand(Bc, T, R)
            for _ in range(2)
        )
        if Bc == 1:
            cos, sin = (t.as_strided((1, T, R), (0, R, 1)) for t in (cos, sin))
    else:
        cos, sin = (torch.randn(Bc, T, R, dtype=torch.float64).to(dev, cs_dtype) for _ in range(2))
    return x, cos, sin


def rotary_case(shape, layout, mix, backward, op, dev):
    """One rotary case through ``op(x, cos, sin, out_dtype)`` (the kernel op rotary_fwd /
    rotary_bwd here, the host emulation in tests/cuda_emu/drive.py), checked against the
    contract's formulas in float64 with the error rule; pass-through columns exactly."""
    x_dtype, cs_dtype, out_dtype = mix
    R = shape[4]
    x, cos, sin = rotary_inputs(shape, layout, x_dtype, cs_dtype, dev)
    y = op(x, cos, sin, out_dtype)
    tag = f"rotary {'bwd' if backward else 'fwd'} {shape} {layout} {mix}"
    assert y.dtype == out_dtype and y.shape == x.shape, f"{tag}: {y.dtype} {tuple(y.shape)}"
    like = torch.empty_like(x, dtype=out_dtype)
    assert y.stride() == like.stride(), f"{tag}: strides {y.stride()} != {like.stride()}"
    x64, c64, s64 = (t.double() for t in (x, cos, sin))
    ref = _rotary_math(x64, c64, s64, backward)
    if backward:  # the formula is the transpose of the forward: check the reference itself
        xg = torch.randn_like(x64).requires_grad_(True)
        (g,) = torch.autograd.grad(_rotary_math(xg, c64, s64, False), xg, x64)
        torch.testing.assert_close(ref, g, rtol=1e-12, atol=1e-12)
    tx = _rotary_math(x, cos, sin, backward).to(out_dtype)
    assert_rule(tag, y, tx, ref)
    pass_ok = torch.equal(y[..., R:], x[..., R:].to(out_dtype))
    assert pass_ok, f"{tag}: pass-through columns differ from x"


@pytest.mark.parametrize("shape", ROTARY_SHAPES)
@pytest.mark.parametrize("layout", ROTARY_LAYOUTS)
@pytest.mark.parametrize("backward, mix", [(b, m) for b in (False, True) for m in ROTARY_MIXES[b]])
def test_rotary(shape, layout, backward, mix):
    op = OPS.rotary_bwd if backward else OPS.rotary_fwd
    rotary_case(shape, layout, mix, backward, op, "cuda")


@pytest.mark.parametrize("mix", ROTARY_ALL_MIXES)
@pytest.mark.parametrize("backward", [False, True])
def test_rotary_all_mixes(mix, backward):
    op = OPS.rotary_bwd if backward else OPS.rotary_fwd
    rotary_case((2, 3, 13, 128, 96, 2), ("bthd", "contiguous"), mix, backward, op, "cuda")


def test_rotary_many_rows():
    """More rows than one grid of the capped launch covers (4096 blocks of 128 rows at D = 2):
    the grid-stride loop."""
    rotary_case((1, 8, 65537, 2, 2, 1), ("contiguous", "contiguous"), (F32,) * 3, False,
                OPS.rotary_fwd, "cuda")  # fmt: skip


def test_rotary_empty():
    for shape in [(0, 2, 3, 8), (2, 0, 3, 8), (2, 2, 0, 8)]:
        x = torch.randn(*shape, device="cuda")
        cs = torch.randn(1, shape[2], 8, device="cuda")
        y = OPS.rotary_fwd(x, cs, cs, torch.bfloat16)
        assert y.shape == x.shape and y.dtype == torch.bfloat16


def test_rotary_rejects_bad_input():
    x = torch.randn(2, 3, 5, 8, device="cuda")
    cs = torch.randn(1, 5, 8, device="cuda")
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        OPS.rotary_fwd(x.double(), cs.double(), cs.double(), torch.float64)
    with pytest.raises(RuntimeError, match="one 16-bit dtype"):
        OPS.rotary_fwd(x.half(), cs.bfloat16(), cs.bfloat16(), torch.float32)
    with pytest.raises(RuntimeError, match="one 16-bit dtype"):
        OPS.rotary_bwd(x.half(), cs, cs, torch.bfloat16)
    with pytest.raises(RuntimeError, match="must be even"):
        OPS.rotary_fwd(x, cs[..., :5], cs[..., :5], torch.float32)
    with pytest.raises(RuntimeError, match="must be even"):
        OPS.rotary_fwd(x[..., :6], cs, cs, torch.float32)  # R = 8 > D = 6
    with pytest.raises(RuntimeError, match="must be T"):
        OPS.rotary_fwd(x, cs[:, :4], cs[:, :4], torch.float32)
    with pytest.raises(RuntimeError, match="1 or B"):
        OPS.rotary_fwd(x, cs.expand(3, 5, 8), cs.expand(3, 5, 8), torch.float32)
    with pytest.raises(RuntimeError, match="one shape"):
        OPS.rotary_fwd(x, cs, cs[..., :6], torch.float32)
    with pytest.raises(RuntimeError, match="one dtype"):
        OPS.rotary_fwd(x, cs, cs.bfloat16(), torch.float32)
    with pytest.raises(RuntimeError, match="stride 1 along D"):
        xt = torch.randn(2, 3, 8, 5, device="cuda").transpose(2, 3)  # [2, 3, 5, 8], stride 5
        OPS.rotary_fwd(xt, cs, cs, torch.float32)
    with pytest.raises(RuntimeError, match="stride 1 along R"):
        bad = torch.randn(1, 8, 5, device="cuda").transpose(1, 2)
        OPS.rotary_fwd(x, bad, bad, torch.float32)
    with pytest.raises(RuntimeError, match="CUDA"):
        OPS.rotary_fwd(x, cs.cpu(), cs.cpu(), torch.float32)
    with pytest.raises(RuntimeError, match="4-D"):
        OPS.rotary_fwd(x[0], cs, cs, torch.float32)
