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
uint32 counters (j >> 2, i, b*Hq + h, offset) and key (seed lo, seed hi); key j reads output
word ``w = r[j & 3]`` (a ``tl.where`` chain; each element still evaluates its own call), and
is kept iff ``(w >> 8) >= ceil(p * 2^24)`` (integer compare: identical on every backend).

Launch rules: one pure function, :func:`plan` (kernel -> constexprs, autotune configs), which
the launchers call and :func:`aot_launches` runs over every dtype, head dim 1..128 and flag, so
that ``scripts/triton_aot.py`` compiles for sm_80 and sm_90 exactly what can launch (registers,
spills, shared memory: ``make cuda-check``).

- Head dim padded to a power of two >= 16 (``_head_dim_block``: ``tl.dot`` needs >= 16 and
  power-of-two block shapes); padded columns are masked on load and store.
- Precision (``_precision``): fp16 / bf16 on the tensor cores. fp32 follows torch's TF32
  switch (``fastattn.triton.tf32_enabled``: ``torch.backends.cuda.matmul.fp32_precision`` /
  ``allow_tf32`` / ``torch.set_float32_matmul_precision("high")``): "tf32" when torch may use
  TF32 for its own fp32 matmuls, else exact "ieee" (torch's default), whose dots become scalar
  FMAs: small tiles (16-64 rows) keep them within the registers.
- Tiles (``_FWD``, ``_DKDV``, ``_DQ``, per precision and head-dim block): chosen from ptxas's
  numbers so that no fp16 / bf16 variant spills on sm_80 or sm_90 (fp32 ones spill at most a
  few bytes with TF32; exact fp32 more, see scripts/triton_aot.py) and every one fits the
  A100's 163 KB of shared memory. Forward: 128 query rows and 8 warps up to D = 64 (each
  warp owns 16 rows), 64 rows and 4 warps at 128. dK/dV keeps two fp32 [BLOCK_N, D]
  accumulators live across its whole query loop beside the dropout mask's Philox state: 8
  warps and 32-64 query rows. num_stages 2 (software pipelining depth of the loads), 1 for
  dK/dV at head dim 64, where the pipelined loads' registers spilled. ptxas's allocation is
  not monotonic in the flags (a variant with fewer flags can spill where the all-flags one does
  not), so every flag combination is checked, not only the heaviest.
- Autotuning: where a table lists several configs (the 16-bit forward: num_stages 2 and 3),
  ``triton.autotune`` times them once per (sequence-length bucket, flags, dtypes) and keeps the
  fastest (``_launch``); a single config launches directly. Under the interpreter: one config,
  32 x 32 blocks, which keeps numpy's per-op overhead low while still crossing block edges in
  small tests, and no autotuning.
- ``GROUP`` (Hq // Hkv) is a runtime argument, and seeds / offsets go in as int32 bit patterns:
  one binary per variant whatever the head grouping or seed.

Test: ``TRITON_INTERPRET=1 pytest tests/test_attention.py -k triton`` (the variable must be set
before Triton is imported). Time: ``pytest benchmarks/bench_attention.py`` on a GPU.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl
from triton.language.random import philox_impl

from fastattn.ops.attention import TRITON_MAX_HEAD_DIM, dropout_threshold
from fastattn.triton import TL_TYPES, Launch, tf32_enabled
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
    # Key j reads word j & 3 of the call with counter j >> 2 (one call per 4 adjacent keys).
    zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.uint32)
    j = zero + offs_n[None, :].to(tl.uint32)
    c1 = zero + offs_m[:, None].to(tl.uint32)
    c2 = zero + bh.to(tl.uint32)
    c3 = zero + offset.to(tl.uint32)
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    r0, r1, r2, r3 = philox_impl(j >> 2, c1, c2, c3, k0, k1)
    w = j & 3
    r = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
    return (r >> 8).to(tl.int64) >= threshold


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
@triton.jit(do_not_specialize=["GROUP", "seed_lo", "seed_hi", "offset", "threshold", "Tq", "Tk"])
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
    GROUP,  # Hq // Hkv (runtime: one binary serves MHA, GQA and MQA)
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


@triton.jit(do_not_specialize=["GROUP", "seed_lo", "seed_hi", "offset", "threshold", "Tq", "Tk"])
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
    GROUP,  # Hq // Hkv (runtime: one binary serves MHA, GQA and MQA)
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


@triton.jit(do_not_specialize=["GROUP", "seed_lo", "seed_hi", "offset", "threshold", "Tq", "Tk"])
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
    GROUP,  # Hq // Hkv (runtime: one binary serves MHA, GQA and MQA)
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
DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the declaration's (ops/attention.py)
HEAD_DIM_BLOCKS = (16, 32, 64, 128)  # _head_dim_block over 1..TRITON_MAX_HEAD_DIM
_POINTERS = {  # element type of each pointer argument: "x" = the input dtype
    "_attn_fwd": {"Q": "x", "K": "x", "V": "x", "KPM": "m", "O": "x", "LSE": "fp32"},
    "_attn_bwd_preprocess": {"O": "x", "DO": "x", "DELTA": "fp32"},
    "_attn_bwd_dkdv": {
        **{n: "x" for n in ("Q", "K", "V", "DO", "DK", "DV")},
        **{"KPM": "m", "LSE": "fp32", "DELTA": "fp32"},
    },
    "_attn_bwd_dq": {
        **{n: "x" for n in ("Q", "K", "V", "DO", "DQ")},
        **{"KPM": "m", "LSE": "fp32", "DELTA": "fp32"},
    },
}
_FLOATS = ("qk_scale", "scale", "rp_keep")


def _cfg(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages
    )


# Under the interpreter: one config (no autotuning), 32 x 32 blocks keep numpy's per-op
# overhead low while still crossing block edges in small tests.
_INTERPRETER = (_cfg(32, 32, 4, 1),)

# (precision class, BLOCK_D) -> autotune candidates; "16" = fp16/bf16 tensor cores, "tf32" =
# fp32 on tensor cores (torch's TF32 opt-in), "ieee" = exact fp32 (scalar FMAs). Every entry is
# compiled for sm_80 and sm_90 by scripts/triton_aot.py: no spills, shared memory within limits.
_FWD = {
    ("16", 16): (_cfg(128, 64, 8, 2), _cfg(128, 64, 8, 3)),
    # 8 warps spilled 8 B on sm_80 (causal + dropout without a mask; 3 stages with the mask too)
    ("16", 32): (_cfg(128, 64, 4, 2),),
    ("16", 64): (_cfg(128, 64, 8, 2), _cfg(128, 64, 8, 3)),
    ("16", 128): (_cfg(64, 64, 4, 2), _cfg(64, 64, 4, 3)),
    ("tf32", 16): (_cfg(128, 64, 8, 2),),
    ("tf32", 32): (_cfg(128, 64, 8, 2),),
    ("tf32", 64): (_cfg(64, 64, 4, 2),),
    ("tf32", 128): (_cfg(64, 32, 4, 2),),
    ("ieee", 16): (_cfg(64, 32, 4, 2),),
    ("ieee", 32): (_cfg(64, 32, 4, 2),),
    ("ieee", 64): (_cfg(32, 32, 4, 2),),
    ("ieee", 128): (_cfg(16, 32, 8, 2),),
}
# dK/dV: two [BLOCK_N, D] fp32 accumulators live across the whole query loop, beside the
# dropout mask's Philox state: smaller query blocks (BLOCK_M) and 8 warps than the forward.
_DKDV = {
    ("16", 16): (_cfg(64, 64, 8, 2),),
    ("16", 32): (_cfg(32, 64, 8, 2),),
    ("16", 64): (_cfg(32, 32, 8, 1),),
    ("16", 128): (_cfg(32, 64, 8, 2),),
    ("tf32", 16): (_cfg(32, 64, 8, 2),),
    ("tf32", 32): (_cfg(32, 64, 8, 2),),
    ("tf32", 64): (_cfg(32, 32, 8, 1),),
    ("tf32", 128): (_cfg(32, 64, 8, 2),),
    ("ieee", 16): (_cfg(32, 32, 8, 2),),
    ("ieee", 32): (_cfg(16, 16, 4, 2),),
    ("ieee", 64): (_cfg(16, 16, 4, 2),),
    ("ieee", 128): (_cfg(16, 16, 8, 1),),  # 16 x 16 x 4 warps x 2 stages spilled 1.3 KB
}
_DQ = {
    ("16", 16): (_cfg(64, 64, 4, 2),),
    ("16", 32): (_cfg(64, 64, 4, 2),),
    ("16", 64): (_cfg(64, 64, 8, 2),),
    ("16", 128): (_cfg(64, 32, 4, 2),),
    ("tf32", 16): (_cfg(64, 64, 4, 2),),
    ("tf32", 32): (_cfg(64, 64, 4, 2),),
    ("tf32", 64): (_cfg(64, 32, 4, 2),),
    ("tf32", 128): (_cfg(32, 32, 4, 2),),
    ("ieee", 16): (_cfg(32, 32, 8, 2),),
    ("ieee", 32): (_cfg(32, 32, 4, 2),),
    ("ieee", 64): (_cfg(32, 32, 4, 2),),
    ("ieee", 128): (_cfg(32, 16, 4, 2),),
}
_PREPROCESS_BLOCK_M = 64


def _head_dim_block(D: int) -> int:
    """Head dim padded to a power of two >= 16 (tl.dot's smallest tile side)."""
    return max(16, triton.next_power_of_2(D))


def _precision(dtype: torch.dtype, *, tf32: bool, interpreter: bool) -> str:
    """``tl.dot`` input precision. fp32 follows torch's TF32 switch (``tf32_enabled``): "tf32"
    when torch may use TF32 for fp32 matmuls, else exact "ieee"; 16-bit inputs use the tensor
    cores natively, or an fp32 upcast under the interpreter (see ``_dot``)."""
    if dtype == torch.float32:
        return "tf32" if tf32 else "ieee"
    return "upcast" if interpreter else "tf32"


def _precision_class(dtype: torch.dtype, precision: str) -> str:
    return precision if dtype == torch.float32 else "16"


def plan(
    dtype: torch.dtype,
    head_dim: int,
    *,
    causal: bool,
    has_mask: bool,
    dropout: bool,
    tf32: bool,
    interpreter: bool,
) -> dict[str, tuple[dict, tuple[triton.Config, ...]]]:
    """The launch rules: kernel name -> (constexprs, autotune configs) for one call's facts.

    Pure: the launchers call it, and so does ``aot_launches`` for scripts/triton_aot.py, so
    the ahead-of-time check compiles exactly what can be launched.
    """
    block_d = _head_dim_block(head_dim)
    prec = _precision(dtype, tf32=tf32, interpreter=interpreter)
    flags = dict(CAUSAL=causal, HAS_MASK=has_mask, DROPOUT=dropout, PRECISION=prec)
    key = (_precision_class(dtype, prec), block_d)
    pick = (lambda table: _INTERPRETER) if interpreter else (lambda table: table[key])
    pre_m = 32 if interpreter else _PREPROCESS_BLOCK_M
    return {
        "_attn_fwd": ({**flags, "BLOCK_D": block_d}, pick(_FWD)),
        "_attn_bwd_preprocess": (
            {"BLOCK_M": pre_m, "BLOCK_D": block_d},
            (triton.Config({}, num_warps=4, num_stages=1),),
        ),
        "_attn_bwd_dkdv": ({**flags, "BLOCK_D": block_d}, pick(_DKDV)),
        "_attn_bwd_dq": ({**flags, "BLOCK_D": block_d}, pick(_DQ)),
    }


def aot_launches(every_flag: bool = True) -> list[Launch]:
    """Every kernel variant the launchers can start on a GPU (scripts/triton_aot.py): every
    dtype (fp32 with TF32 on and off), head dim 1..TRITON_MAX_HEAD_DIM, flag and autotune
    config. ``every_flag=False``: only causal + key padding + dropout, the variants with the
    most live values (every flag adds work to the same loop)."""
    bools = (False, True) if every_flag else (True,)
    out = set()
    for dtype in DTYPES:
        for tf32 in (False, True) if dtype == torch.float32 else (False,):
            for head_dim in range(1, TRITON_MAX_HEAD_DIM + 1):
                for causal, has_mask, dropout in itertools.product(bools, repeat=3):
                    p = plan(
                        dtype, head_dim, causal=causal, has_mask=has_mask, dropout=dropout,
                        tf32=tf32, interpreter=False,
                    )  # fmt: skip
                    for kernel, (meta, configs) in p.items():
                        for cfg in configs:
                            out.add(_launch_record(kernel, dtype, has_mask, meta, cfg))
    return sorted(out, key=Launch.label)


def _launch_record(kernel, dtype, has_mask, meta, cfg) -> Launch:
    x = TL_TYPES[str(dtype)[6:]]
    types = {"x": x, "m": "u8" if has_mask else x}
    pointers = tuple((n, types.get(t, t)) for n, t in _POINTERS[kernel].items())
    fn = globals()[kernel]
    constexprs = {**meta, **cfg.kwargs}
    return Launch(
        module="attention",
        kernel=kernel,
        pointers=pointers,
        floats=tuple(f for f in _FLOATS if f in fn.arg_names),
        constexprs=tuple(sorted(constexprs.items())),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def _seq_bucket(t: int) -> int:
    """Autotune key for a sequence length: its power-of-two bucket, clamped to [128, 16384]
    (one tuning per bucket, not per length: variable-length batches do not retune each call)."""
    return min(max(triton.next_power_of_2(max(t, 1)), 128), 16384)


_TUNERS: dict = {}


def _launch(kernel, configs, grid, args, meta, seq_len: int) -> None:
    """Launch kernel with meta; one config runs as is, several through a triton.autotune that
    benchmarks them once per (sequence bucket, flags, dtypes) and keeps the fastest."""
    if len(configs) == 1:
        cfg = configs[0]
        g = grid(cfg.kwargs)
        kernel[g](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return
    tk = (kernel.__name__, configs, _seq_bucket(seq_len))
    tuner = _TUNERS.get(tk)
    if tuner is None:
        tuner = triton.autotune(configs=list(configs), key=["CAUSAL", "HAS_MASK", "DROPOUT"])(
            kernel
        )
        _TUNERS[tk] = tuner
    tuner[grid](*args, **meta)


def _int32(v: int) -> int:
    """A uint32 as the int32 with the same bits: every scalar stays an i32 kernel argument
    (Triton would type values >= 2^31 as i64 and compile another variant); the kernels read it
    back with ``.to(tl.uint32)``, which keeps the bits."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _dropout_args(dropout_p: float, seed: int, offset: int) -> tuple[float, int, int, int, int]:
    rp = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0
    return (
        rp,
        _int32(seed),
        _int32(seed >> 32),
        _int32(offset),
        dropout_threshold(dropout_p),
    )


def _mask_arg(key_padding_mask: torch.Tensor | None, q: torch.Tensor):
    if key_padding_mask is None:
        return q, 0  # never read (HAS_MASK is False)
    m = key_padding_mask.contiguous().view(torch.uint8)
    return m, m.stride(0)


def _plan_for(q: torch.Tensor, key_padding_mask, causal: bool, dropout_p: float):
    return plan(
        q.dtype,
        q.shape[-1],
        causal=causal,
        has_mask=key_padding_mask is not None,
        dropout=dropout_p > 0,
        tf32=tf32_enabled(),
        interpreter=_triton_interpreting(),
    )


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
        meta, configs = _plan_for(q, key_padding_mask, causal, dropout_p)["_attn_fwd"]
        kpm, smb = _mask_arg(key_padding_mask, q)
        rp, slo, shi, off, thr = _dropout_args(dropout_p, seed, offset)
        args = (
            q, k, v, kpm, out, lse,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            smb, Hq, Tq, Tk, D, scale * LOG2E, rp, slo, shi, off, thr, Hq // Hkv,
        )  # fmt: skip
        grid = lambda m: (triton.cdiv(Tq, m["BLOCK_M"]), B * Hq)  # noqa: E731
        _launch(_attn_fwd, configs, grid, args, meta, max(Tq, Tk))
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
        p = _plan_for(q, key_padding_mask, causal, dropout_p)
        kpm, smb = _mask_arg(key_padding_mask, q)
        rp, slo, shi, off, thr = _dropout_args(dropout_p, seed, offset)
        delta = torch.empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
        meta, configs = p["_attn_bwd_preprocess"]
        _launch(
            _attn_bwd_preprocess,
            configs,
            lambda m: (triton.cdiv(Tq, meta["BLOCK_M"]), B * Hq),
            (out, dout, delta, dout.stride(0), dout.stride(1), dout.stride(2), Hq, Tq, D),
            meta,
            Tq,
        )
        strides = (
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            smb,
        )  # fmt: skip
        tail = (scale, rp, slo, shi, off, thr, Hq // Hkv)
        meta, configs = p["_attn_bwd_dkdv"]
        _launch(
            _attn_bwd_dkdv,
            configs,
            lambda m: (triton.cdiv(Tk, m["BLOCK_N"]), B * Hkv),
            (q, k, v, dout, kpm, lse, delta, dk, dv, *strides, Hq, Hkv, Tq, Tk, D, *tail),
            meta,
            max(Tq, Tk),
        )
        meta, configs = p["_attn_bwd_dq"]
        _launch(
            _attn_bwd_dq,
            configs,
            lambda m: (triton.cdiv(Tq, m["BLOCK_M"]), B * Hq),
            (q, k, v, dout, kpm, lse, delta, dq, *strides, Hq, Tq, Tk, D, *tail),
            meta,
            max(Tq, Tk),
        )
        return dq, dk, dv, q.new_empty(0)


TRITON = _Triton()

__all__ = [
    "TRITON",
    "_attn_fwd",
    "_attn_bwd_preprocess",
    "_attn_bwd_dkdv",
    "_attn_bwd_dq",
    "aot_launches",
    "plan",
]
