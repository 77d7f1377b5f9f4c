"""RMSNorm and residual-add + RMSNorm in Triton: forward and backward.

Maths, per row of M values (``s = x + residual`` rounded to x's dtype when a residual is given,
else ``s = x``; statistics in float32), with ``c = weight + weight_offset``:

- ``rstd = 1/sqrt(mean(s^2) + eps)``, ``xhat = s * rstd``, ``out = r(xhat) * c``, where ``r``
  rounds to x's dtype when ``CAST`` (LlamaRMSNorm's order) and is the identity otherwise.
- Backward with ``g = dout * c``: ``dx = rstd * (g - xhat * mean(g * xhat))`` (``+ dsum``);
  ``dweight = sum over rows of dout * r(xhat)``, deterministic: each program of
  ``_rms_norm_bwd_dx`` owns a contiguous range of rows and writes its partial sums to its own
  row of a ``[programs, M]`` float32 buffer; ``_rms_norm_bwd_dw`` adds those rows in order.

Launch rules: :func:`block_cols`: a whole row in one block, padded to a power of two of at
least ``MIN_BLOCK`` = 128 (one warp; shorter rows are masked), rows up to ``TRITON_MAX_COLS`` =
8192 (wider blocks spilled: see ``fastattn.ops.rms_norm``); :func:`num_warps` and
:func:`bwd_programs` of :mod:`fastattn.triton.layernorm`, reused, not copied. :func:`aot_launches`
lists every variant they give (7 tiles, every flag, weight in x's dtype or float32), which
``scripts/triton_aot.py`` compiles for sm_80 and sm_90.

Test: ``pytest tests/test_rms_norm.py -k triton`` (interpreter on a CPU, small shapes).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from fastattn.ops.rms_norm import TRITON_MAX_COLS
from fastattn.triton import Launch, record
from fastattn.triton.layernorm import MIN_BLOCK, _rows_ready, bwd_programs, num_warps


def block_cols(m: int) -> int:
    """BLOCK_M: the whole row in one block, padded to a power of two >= MIN_BLOCK (up to
    TRITON_MAX_COLS; layer_norm's looped long-row kernel has no RMSNorm twin yet)."""
    return max(triton.next_power_of_2(max(m, 1)), MIN_BLOCK)


@triton.jit
def _rms_norm_fwd(
    X,  # [N, M] input, row stride stride_x
    RES,  # [N, M] residual, row stride stride_r (unused without HAS_RES)
    W,  # [M] weight (unused without HAS_W)
    OUT,  # [N, M] output, contiguous
    SUM,  # [N, M] x + residual in x's dtype, contiguous (unused without HAS_RES)
    RSTD,  # [N] float32
    M,
    stride_x,
    stride_r,
    eps,
    offset,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    CAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_M)
    mask = cols < M
    s = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        # Added in float32, then rounded to the input dtype: the normalised value is the sum the
        # caller gets back. (Not a bfloat16 add: the interpreter gets those wrong.)
        r = tl.load(RES + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s_t = (s + r).to(SUM.dtype.element_ty)
        tl.store(SUM + row * M + cols, s_t, mask=mask)
        s = s_t.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / M + eps)
    y = s * rstd
    if CAST:
        y = y.to(OUT.dtype.element_ty).to(tl.float32)
    if HAS_W:
        y = y * (tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset)
    tl.store(OUT + row * M + cols, y.to(OUT.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_dx(
    DOUT,  # [N, M] incoming gradient, row stride stride_d
    X,  # [N, M] the normalised input (x, or x + residual), row stride stride_x
    W,  # [M] weight (unused without HAS_W)
    RSTD,  # [N] float32
    DSUM,  # [N, M] gradient reaching x + residual directly, row stride stride_s (HAS_DSUM)
    DX,  # [N, M] output, contiguous
    DW_PART,  # [programs, M] float32, this program's partial dweight (NEED_DW)
    N,
    M,
    rows_per_program,
    stride_d,
    stride_x,
    stride_s,
    offset,
    HAS_W: tl.constexpr,
    HAS_DSUM: tl.constexpr,
    NEED_DW: tl.constexpr,
    CAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_M)
    mask = cols < M
    if HAS_W:
        c = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros((BLOCK_M,), dtype=tl.float32)
    row0 = pid * rows_per_program
    row1 = tl.minimum(row0 + rows_per_program, N)
    for r in range(row0, row1):
        row = tl.cast(r, tl.int64)  # 64-bit offsets: N * M may exceed 2^31
        dy = tl.load(DOUT + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xh = x * rstd  # 0 in the masked columns
        g = dy * c if HAS_W else dy
        mgx = tl.sum(g * xh, axis=0) / M
        dx = (g - xh * mgx) * rstd
        if HAS_DSUM:
            dx += tl.load(DSUM + row * stride_s + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * M + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if NEED_DW:
            if CAST:
                dw += dy * xh.to(DX.dtype.element_ty).to(tl.float32)
            else:
                dw += dy * xh
    if NEED_DW:
        tl.store(DW_PART + pid * M + cols, dw, mask=mask)


@triton.jit
def _rms_norm_bwd_dw(
    DW_PART,  # [P, M] float32
    DW,  # [M] in the parameter dtype
    P,
    M,
    BLOCK_P: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_P, BLOCK_M), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        m = (ps[:, None] < P) & (cols[None, :] < M)
        acc += tl.load(DW_PART + ps[:, None] * M + cols[None, :], mask=m, other=0.0)
    tl.store(DW + cols, tl.sum(acc, axis=0).to(DW.dtype.element_ty), mask=cols < M)


class _Triton:
    """The ``triton`` backend for rms_norm (contract: ``csrc/ops.cpp``)."""

    def fwd(self, x, weight, residual, eps, weight_offset, cast_before_weight):
        x = _rows_ready(x)
        n, m = x.shape
        out = torch.empty((n, m), dtype=x.dtype, device=x.device)
        has_res = residual is not None
        res = _rows_ready(residual) if has_res else x
        s = torch.empty((n, m), dtype=x.dtype, device=x.device) if has_res else x.new_empty(0)
        rstd = torch.empty(n, dtype=torch.float32, device=x.device)
        if n == 0:
            return out, s, rstd
        bm = block_cols(m)
        cast = bool(cast_before_weight) and x.dtype != torch.float32
        _rms_norm_fwd[(n,)](
            x, res, weight if weight is not None else x, out, s if has_res else out, rstd, m,
            x.stride(0), res.stride(0), float(eps), float(weight_offset),
            HAS_RES=has_res, HAS_W=weight is not None, CAST=cast,
            BLOCK_M=bm, num_warps=num_warps(bm),
        )  # fmt: skip
        return out, s, rstd

    def bwd(self, dout, x, weight, rstd, dsum, weight_offset, cast_before_weight, need_weight_grad):
        x, dout = _rows_ready(x), _rows_ready(dout)
        ds = _rows_ready(dsum) if dsum is not None else None
        n, m = x.shape
        pdt = weight.dtype if weight is not None else x.dtype
        need_dw = bool(need_weight_grad and weight is not None)
        dx = torch.empty((n, m), dtype=x.dtype, device=x.device)
        dw = torch.zeros(m if need_dw else 0, dtype=pdt, device=x.device)
        if n == 0:
            return dx, dw
        bm = block_cols(m)
        p = bwd_programs(n, x.device)
        rows_per_program = triton.cdiv(n, p)
        p = triton.cdiv(n, rows_per_program)
        dw_part = torch.empty((p, m) if need_dw else (1,), dtype=torch.float32, device=x.device)
        cast = bool(cast_before_weight) and x.dtype != torch.float32
        _rms_norm_bwd_dx[(p,)](
            dout, x, weight if weight is not None else x, rstd, ds if ds is not None else x, dx,
            dw_part, n, m, rows_per_program, dout.stride(0), x.stride(0),
            ds.stride(0) if ds is not None else 0, float(weight_offset),
            HAS_W=weight is not None, HAS_DSUM=ds is not None, NEED_DW=need_dw, CAST=cast,
            BLOCK_M=bm, num_warps=num_warps(bm),
        )  # fmt: skip
        if need_dw:
            rbm = min(bm, 256)
            _rms_norm_bwd_dw[(triton.cdiv(m, rbm),)](
                dw_part, dw, p, m, BLOCK_P=16, BLOCK_M=rbm, num_warps=4
            )
        return dx, dw


TRITON = _Triton()

DTYPES = ("fp32", "fp16", "bf16")  # the declaration's for Triton (fastattn.ops.rms_norm)


def aot_launches(every_flag: bool = True) -> list[Launch]:
    """Every kernel variant the launchers can start (scripts/triton_aot.py): every block the
    launch rules give for 1..TRITON_MAX_COLS, every flag (CAST only for 16-bit x, as the
    launcher sets it), the weight in x's dtype or float32. ``every_flag=False``: only the
    variants with every optional operand present (a float32 weight)."""
    blocks = sorted({block_cols(m) for m in range(1, TRITON_MAX_COLS + 1)})
    bools = (False, True) if every_flag else (True,)
    out = []
    for x in DTYPES:
        wdts = ((None, x) if x == "fp32" else (None, x, "fp32")) if every_flag else ("fp32",)
        casts = (False,) if x == "fp32" else bools
        for bm in blocks:
            for res, wt, cast in itertools.product(bools, wdts, casts):
                ptr = dict(X=x, RES=x, W=wt or x, OUT=x, SUM=x, RSTD="fp32")
                meta = dict(HAS_RES=res, HAS_W=wt is not None, CAST=cast, BLOCK_M=bm)
                out.append(_rec("_rms_norm_fwd", ptr, meta, num_warps(bm)))
            for wt, dsum, dw, cast in itertools.product(wdts, bools, bools, casts):
                if dw and wt is None:
                    continue
                ptr = dict(DOUT=x, X=x, W=wt or x, RSTD="fp32", DSUM=x, DX=x, DW_PART="fp32")
                meta = dict(HAS_W=wt is not None, HAS_DSUM=dsum, NEED_DW=dw, CAST=cast, BLOCK_M=bm)
                out.append(_rec("_rms_norm_bwd_dx", ptr, meta, num_warps(bm)))
        for wt in sorted({x, "fp32"}) if every_flag else ("fp32",):
            for rbm in sorted({min(b, 256) for b in blocks}):
                ptr = dict(DW_PART="fp32", DW=wt)
                out.append(_rec("_rms_norm_bwd_dw", ptr, dict(BLOCK_P=16, BLOCK_M=rbm), 4))
    return out


def _rec(kernel: str, pointers: dict, constexprs: dict, warps: int) -> Launch:
    floats = {"_rms_norm_fwd": ("eps", "offset"), "_rms_norm_bwd_dx": ("offset",)}
    return record("rms_norm", kernel, pointers, constexprs, warps, floats.get(kernel, ()))
