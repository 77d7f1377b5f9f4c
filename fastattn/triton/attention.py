"""Flash attention (forward and backward) in Triton: the ``triton`` backend of ``attention``.

Maths (FlashAttention-2, Dao 2023), per (batch b, query head h), kv head ``h // GROUP``:

forward, one program per BLOCK_M query rows, streaming BLOCK_N keys at a time in base 2
(``exp2``, with ``log2(e)`` folded into the scale)::

    s   = (q k^T) * scale * log2e, hidden keys -> -inf
    m'  = max(m, rowmax(s));  a = 2^(m - m');  p = 2^(s - m')
    l   = l * a + rowsum(p);  acc = acc * a + (p * keep / (1-p_drop)) v
    out = acc / l (0 for a row that saw no key);  lse = (m + log2 l) * ln 2 (natural log,
          +inf for a row that saw no key)

backward, recomputing P = exp(S - lse) from the saved lse (no [Tq, Tk] tensor in memory):

    _attn_bwd_preprocess  Delta_i = rowsum(dO_i * O_i)
    _attn_bwd_dkdv        one program per BLOCK_N keys of a kv head; loops over the GROUP query
                          heads sharing it and over the query blocks that can see the keys:
                          dV += P_d^T dO;  dS = P * (dP_d - Delta);  dK += dS^T Q * scale
    _attn_bwd_dq          one program per BLOCK_M queries: dQ += dS K * scale
    (P_d, dP_d: with the dropout keep mask applied and scaled by 1/(1-p))

Masks: causal is bottom-right aligned (query i sees key j iff j <= i + Tk - Tq); causal
programs stop their key loop at the last visible block (and dK/dV programs start their query
loop at the first query that can see them). The key padding mask (bool, True = padding) is read
as uint8. Dropout draws the same Philox4x32-10 stream as
``fastattn.ops.attention.dropout_keep_mask`` via ``triton.language.random.philox_impl`` with
uint32 counters (j, i, b*Hq + h, offset) and key (seed lo, seed hi); an element is kept iff
``(c0 >> 8) >= ceil(p * 2^24)`` (integer compare: identical on every backend).

Launch rules (named functions below):

- ``_head_dim_block``: the head dim is padded to a power of two >= 16 (``tl.dot`` needs >= 16
  and power-of-two block shapes); padded columns are masked on load and store.
- ``_fwd_blocks``: BLOCK_M = 128 rows of queries for D <= 64 (enough work per program to hide
  the K/V loads), 64 above (the fp32 accumulator of BLOCK_M x D must stay in registers);
  BLOCK_N = 64 (32 for D = 128 with fp32 inputs, whose tiles are twice the bytes); 4 warps,
  8 at BLOCK_M = 128 so each warp owns 16 rows. Under the interpreter: 32 x 32, which keeps
  numpy's per-op overhead low while still crossing block edges in small tests.
- ``_bwd_blocks``: 64 x 64 for D <= 64 and 32 x 64 above (the dK, dV accumulators double the
  register footprint), 4 warps; interpreter 32 x 32.
- fp32 inputs use ``input_precision="ieee"`` in ``tl.dot`` (no TF32): the correctness rule
  compares against PyTorch's own fp32, which does not use TF32 by default.

Test: ``TRITON_INTERPRET=1 pytest tests/test_attention.py -k triton`` (the variable must be set
before Triton is imported). Time: ``pytest benchmarks/bench_attention.py`` on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.random import philox_impl

from fastattn.ops.attention import dropout_threshold
from fastattn.triton import interpreting as _triton_interpreting

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """tl.dot with fp32 accumulation. PRECISION "upcast" (the interpreter with 16-bit inputs,
    whose tl.dot on bfloat16 returns garbage in Triton 3.9) multiplies in float32 instead:
    the same result, as products of 16-bit floats are exact in float32."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _keep_mask(
    seed_lo,
    seed_hi,
    offset,
    bh,
    offs_m,
    offs_n,
    threshold,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Dropout keep mask [BLOCK_M, BLOCK_N] for query rows offs_m, keys offs_n, row bh=b*Hq+h."""
    zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.uint32)
    c0 = zero + offs_n[None, :].to(tl.uint32)
    c1 = zero + offs_m[:, None].to(tl.uint32)
    c2 = zero + bh.to(tl.uint32)
    c3 = zero + offset.to(tl.uint32)
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    r0, _, _, _ = philox_impl(c0, c1, c2, c3, k0, k1)
    return (r0 >> 8).to(tl.int64) >= threshold


@triton.jit
def _visible(
    offs_m, offs_n, Tq, Tk, kpm_ptr, stride_mb, b, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr
):
    """[BLOCK_M, BLOCK_N] bool: query offs_m may see key offs_n (in range, causal, unpadded)."""
    vis = (offs_m[:, None] < Tq) & (offs_n[None, :] < Tk)
    if CAUSAL:
        vis = vis & (offs_n[None, :] <= offs_m[:, None] + (Tk - Tq))
    if HAS_MASK:
        pad = tl.load(kpm_ptr + b * stride_mb + offs_n, mask=offs_n < Tk, other=1)
        vis = vis & (pad == 0)[None, :]
    return vis


# ----------------------------------------------------------------------------- forward
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "offset", "threshold", "Tq", "Tk"])
def _attn_fwd(
    Q,
    K,
    V,  # q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], any strides, unit last stride
    KPM,  # key padding mask [B, Tk] as uint8 (1 = padding); unused if not HAS_MASK
    O,
    LSE,  # out [B, Hq, Tq, D] contiguous, lse [B, Hq, Tq] fp32 contiguous
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_mb,
    Hq,
    Tq,
    Tk,
    D,
    qk_scale,  # scale * log2(e)
    rp_keep,  # 1 / (1 - dropout_p)
    seed_lo,
    seed_hi,
    offset,
    threshold,
    GROUP: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)  # b * Hq + h
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < Tq) & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    hi = Tk
    if CAUSAL:  # the last key any row of this block sees is (pid_m+1)*BLOCK_M - 1 + Tk - Tq
        hi = tl.minimum(Tk, tl.maximum((pid_m + 1) * BLOCK_M + Tk - Tq, 0))
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kv_ok = (offs_n[:, None] < Tk) & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_ok, other=0.0)
        s = _dot(q, tl.trans(k), PRECISION) * qk_scale
        vis = _visible(offs_m, offs_n, Tq, Tk, KPM, stride_mb, b, CAUSAL, HAS_MASK)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _keep_mask(
                seed_lo, seed_hi, offset, bh, offs_m, offs_n, threshold, BLOCK_M, BLOCK_N
            )
            p = tl.where(keep, p * rp_keep, 0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(
        seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("inf")
    )
    row_ok = offs_m < Tq
    o_ptrs = O + (bh * Tq + offs_m[:, None]) * D + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh * Tq + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------- backward
@triton.jit(do_not_specialize=["Tq"])
def _attn_bwd_preprocess(
    O,
    DO,  # out [B, Hq, Tq, D] contiguous; dout with strides below
    DELTA,  # [B, Hq, Tq] fp32: rowsum(dO * O)
    stride_dob,
    stride_doh,
    stride_dot,
    Hq,
    Tq,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < Tq) & (offs_d[None, :] < D)
    o = tl.load(O + (bh * Tq + offs_m[:, None]) * D + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
        mask=ok,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * Tq + offs_m, delta, mask=offs_m < Tq)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "offset", "threshold", "Tq", "Tk"])
def _attn_bwd_dkdv(
    Q,
    K,
    V,
    DO,  # as in the forward; dO [B, Hq, Tq, D] with strides below
    KPM,
    LSE,
    DELTA,  # lse, delta [B, Hq, Tq] fp32 contiguous
    DK,
    DV,  # [B, Hkv, Tk, D] contiguous, written once per element
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_mb,
    Hq,
    Hkv,
    Tq,
    Tk,
    D,
    scale,
    rp_keep,
    seed_lo,
    seed_hi,
    offset,
    threshold,
    GROUP: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)  # b * Hkv + hk
    b = bhk // Hkv
    hk = bhk % Hkv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_ok = (offs_n[:, None] < Tk) & d_ok[None, :]
    k = tl.load(
        K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
        mask=kv_ok,
        other=0.0,
    )
    v = tl.load(
        V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
        mask=kv_ok,
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634

    lo = 0
    if CAUSAL:  # first query that sees key pid_n*BLOCK_N is pid_n*BLOCK_N - (Tk - Tq)
        lo = tl.maximum(pid_n * BLOCK_N - (Tk - Tq), 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * Hq + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        for start_m in range(lo, Tq, BLOCK_M):
            offs_m = start_m + offs_m0
            q_ok = (offs_m[:, None] < Tq) & d_ok[None, :]
            q = tl.load(
                q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=q_ok, other=0.0
            )
            do = tl.load(
                do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=q_ok, other=0.0
            )
            lse = tl.load(LSE + bh * Tq + offs_m, mask=offs_m < Tq, other=float("inf"))
            delta = tl.load(DELTA + bh * Tq + offs_m, mask=offs_m < Tq, other=0.0)
            s = _dot(q, tl.trans(k), PRECISION) * qk_scale
            vis = _visible(offs_m, offs_n, Tq, Tk, KPM, stride_mb, b, CAUSAL, HAS_MASK)
            p = tl.where(vis, tl.math.exp2(s - lse[:, None] * 1.4426950408889634), 0.0)
            dp = _dot(do, tl.trans(v), PRECISION)
            if DROPOUT:
                keep = _keep_mask(
                    seed_lo, seed_hi, offset, bh, offs_m, offs_n, threshold, BLOCK_M, BLOCK_N
                )
                pd = tl.where(keep, p * rp_keep, 0.0)
                dp = tl.where(keep, dp * rp_keep, 0.0)
            else:
                pd = p
            dv += _dot(tl.trans(pd.to(do.dtype)), do, PRECISION)
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION)
    dk = dk * scale
    out = (bhk * Tk + offs_n[:, None]) * D + offs_d[None, :]
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "offset", "threshold", "Tq", "Tk"])
def _attn_bwd_dq(
    Q,
    K,
    V,
    DO,
    KPM,
    LSE,
    DELTA,
    DQ,  # [B, Hq, Tq, D] contiguous
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_mb,
    Hq,
    Tq,
    Tk,
    D,
    scale,
    rp_keep,
    seed_lo,
    seed_hi,
    offset,
    threshold,
    GROUP: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_ok = (offs_m[:, None] < Tq) & d_ok[None, :]
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
        mask=q_ok,
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
        mask=q_ok,
        other=0.0,
    )
    lse = tl.load(LSE + bh * Tq + offs_m, mask=offs_m < Tq, other=float("inf"))
    delta = tl.load(DELTA + bh * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634

    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, tl.maximum((pid_m + 1) * BLOCK_M + Tk - Tq, 0))
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kv_ok = (offs_n[:, None] < Tk) & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_ok, other=0.0)
        s = _dot(q, tl.trans(k), PRECISION) * qk_scale
        vis = _visible(offs_m, offs_n, Tq, Tk, KPM, stride_mb, b, CAUSAL, HAS_MASK)
        p = tl.where(vis, tl.math.exp2(s - lse[:, None] * 1.4426950408889634), 0.0)
        dp = _dot(do, tl.trans(v), PRECISION)
        if DROPOUT:
            keep = _keep_mask(
                seed_lo, seed_hi, offset, bh, offs_m, offs_n, threshold, BLOCK_M, BLOCK_N
            )
            dp = tl.where(keep, dp * rp_keep, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION)
    dq = dq * scale
    tl.store(
        DQ + (bh * Tq + offs_m[:, None]) * D + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=q_ok,
    )


# ----------------------------------------------------------------------------- launch rules


def _head_dim_block(D: int) -> int:
    """Head dim padded to a power of two >= 16 (tl.dot's smallest tile side)."""
    return max(16, triton.next_power_of_2(D))


def _fwd_blocks(block_d: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the forward; see the module header for why."""
    if _triton_interpreting():
        return 32, 32, 4
    block_m = 128 if block_d <= 64 else 64
    block_n = 32 if (block_d >= 128 and dtype == torch.float32) else 64
    return block_m, block_n, 8 if block_m == 128 else 4


def _bwd_blocks(block_d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the two backward kernels."""
    if _triton_interpreting():
        return 32, 32, 4
    return (64 if block_d <= 64 else 32), 64, 4


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 for fp32 inputs (no TF32); 16-bit inputs use the
    tensor cores natively, or an fp32 upcast under the interpreter (see ``_dot``)."""
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if _triton_interpreting() else "tf32"


def _dropout_args(dropout_p: float, seed: int, offset: int) -> tuple[float, int, int, int, int]:
    rp = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0
    return (
        rp,
        seed & 0xFFFFFFFF,
        (seed >> 32) & 0xFFFFFFFF,
        offset & 0xFFFFFFFF,
        dropout_threshold(dropout_p),
    )


def _mask_arg(key_padding_mask: torch.Tensor | None, q: torch.Tensor):
    if key_padding_mask is None:
        return q, 0  # never read (HAS_MASK is False)
    m = key_padding_mask.contiguous().view(torch.uint8)
    return m, m.stride(0)


class _Triton:
    """The ``triton`` backend object (see the module header)."""

    def fwd(
        self, q, k, v, key_padding_mask, bias, scale, softcap, wl, wr, off, dropout_p, seed, offset
    ):
        causal = wr == 0
        B, Hq, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        out = torch.empty((B, Hq, Tq, D), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
        if out.numel() == 0:
            return out, lse
        block_d = _head_dim_block(D)
        bm, bn, warps = _fwd_blocks(block_d, q.dtype)
        kpm, smb = _mask_arg(key_padding_mask, q)
        rp, slo, shi, off, thr = _dropout_args(dropout_p, seed, offset)
        grid = (triton.cdiv(Tq, bm), B * Hq)
        _attn_fwd[grid](
            q,
            k,
            v,
            kpm,
            out,
            lse,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            v.stride(0),
            v.stride(1),
            v.stride(2),
            smb,
            Hq,
            Tq,
            Tk,
            D,
            scale * LOG2E,
            rp,
            slo,
            shi,
            off,
            thr,
            GROUP=Hq // Hkv,
            CAUSAL=causal,
            HAS_MASK=key_padding_mask is not None,
            DROPOUT=dropout_p > 0,
            PRECISION=_precision(q.dtype),
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_D=block_d,
            num_warps=warps,
        )
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
        causal = wr == 0
        B, Hq, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        dq = torch.empty((B, Hq, Tq, D), dtype=q.dtype, device=q.device)
        dk = torch.empty((B, Hkv, Tk, D), dtype=k.dtype, device=q.device)
        dv = torch.empty((B, Hkv, Tk, D), dtype=v.dtype, device=q.device)
        if q.numel() == 0 or k.numel() == 0:
            return dq.zero_(), dk.zero_(), dv.zero_(), q.new_empty(0)
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        out = out.contiguous()
        lse = lse.contiguous()
        block_d = _head_dim_block(D)
        bm, bn, warps = _bwd_blocks(block_d)
        kpm, smb = _mask_arg(key_padding_mask, q)
        rp, slo, shi, off, thr = _dropout_args(dropout_p, seed, offset)
        delta = torch.empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
        _attn_bwd_preprocess[(triton.cdiv(Tq, bm), B * Hq)](
            out,
            dout,
            delta,
            dout.stride(0),
            dout.stride(1),
            dout.stride(2),
            Hq,
            Tq,
            D,
            BLOCK_M=bm,
            BLOCK_D=block_d,
        )
        strides = (
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            v.stride(0),
            v.stride(1),
            v.stride(2),
            dout.stride(0),
            dout.stride(1),
            dout.stride(2),
            smb,
        )
        meta = dict(
            GROUP=Hq // Hkv,
            CAUSAL=causal,
            HAS_MASK=key_padding_mask is not None,
            DROPOUT=dropout_p > 0,
            PRECISION=_precision(q.dtype),
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_D=block_d,
            num_warps=warps,
        )
        _attn_bwd_dkdv[(triton.cdiv(Tk, bn), B * Hkv)](
            q,
            k,
            v,
            dout,
            kpm,
            lse,
            delta,
            dk,
            dv,
            *strides,
            Hq,
            Hkv,
            Tq,
            Tk,
            D,
            scale,
            rp,
            slo,
            shi,
            off,
            thr,
            **meta,
        )
        _attn_bwd_dq[(triton.cdiv(Tq, bm), B * Hq)](
            q,
            k,
            v,
            dout,
            kpm,
            lse,
            delta,
            dq,
            *strides,
            Hq,
            Tq,
            Tk,
            D,
            scale,
            rp,
            slo,
            shi,
            off,
            thr,
            **meta,
        )
        return dq, dk, dv, q.new_empty(0)


TRITON = _Triton()

__all__ = ["TRITON", "_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"]
