"""LayerNorm and residual-add + LayerNorm in Triton: forward and backward.

Maths, per row of M values (``s = x + residual`` when a residual is given, else ``s = x``;
statistics in float32):

- ``mu = mean(s)``, ``var = mean((s - mu)^2)`` (two-pass, in registers), ``rstd = 1/sqrt(var+eps)``,
  ``xhat = (s - mu) * rstd``, ``out = xhat * weight + bias``.
- Backward with ``g = dout * weight``:
  ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` (``+ dsum``, the gradient reaching ``s``
  directly); ``dweight = sum over rows of dout * xhat``, ``dbias = sum over rows of dout``.
  The column sums are deterministic: each program of ``_layer_norm_bwd_dx`` owns a contiguous
  range of rows and writes its partial sums to its own row of ``[programs, M]`` float32
  buffers; ``_layer_norm_bwd_dwdb`` adds those rows in order.

Launch rules (named functions below):

- :func:`block_cols`: a whole row in one block, ``BLOCK_M = next_pow2(M)``; rows longer than
  65536 are not covered (`TRITON_MAX_COLS` in the op declaration): the row must fit in registers.
- :func:`num_warps`: ``BLOCK_M / 256`` clamped to [1, 16]: ~8 floats per thread per operand.
- :func:`bwd_programs`: 4 programs per SM on a GPU (enough to hide latency while keeping the
  ``[programs, M]`` partial buffers small); 4 under the interpreter (it runs programs serially).

Test: ``TRITON_INTERPRET=1 pytest tests/test_layernorm_triton.py`` (interpreter, small shapes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _layer_norm_fwd(
    X,  # [N, M] input, row stride stride_x
    RES,  # [N, M] residual, row stride stride_r (unused without HAS_RES)
    W,  # [M] weight (unused without HAS_W)
    B,  # [M] bias (unused without HAS_B)
    OUT,  # [N, M] output, contiguous
    SUM,  # [N, M] x + residual in x's dtype, contiguous (unused without HAS_RES)
    MEAN,  # [N] float32
    RSTD,  # [N] float32
    M,
    stride_x,
    stride_r,
    eps,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_M)
    mask = cols < M
    s = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        s = s + tl.load(RES + row * stride_r + cols, mask=mask, other=0.0)
        # Rounded to the input dtype: the normalised value is the sum the caller gets back.
        tl.store(SUM + row * M + cols, s, mask=mask)
    s = s.to(tl.float32)
    mean = tl.sum(s, axis=0) / M
    d = tl.where(mask, s - mean, 0.0)
    var = tl.sum(d * d, axis=0) / M
    rstd = 1.0 / tl.sqrt(var + eps)
    y = d * rstd
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * M + cols, y.to(OUT.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _layer_norm_bwd_dx(
    DOUT,  # [N, M] incoming gradient, row stride stride_d
    X,  # [N, M] the normalised input (x, or x + residual), row stride stride_x
    W,  # [M] weight (unused without HAS_W)
    MEAN,  # [N] float32
    RSTD,  # [N] float32
    DSUM,  # [N, M] gradient reaching x + residual directly, row stride stride_s (HAS_DSUM)
    DX,  # [N, M] output, contiguous
    DW_PART,  # [programs, M] float32, this program's partial dweight (NEED_DW)
    DB_PART,  # [programs, M] float32, this program's partial dbias (NEED_DB)
    N,
    M,
    rows_per_program,
    stride_d,
    stride_x,
    stride_s,
    HAS_W: tl.constexpr,
    HAS_DSUM: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_M)
    mask = cols < M
    if HAS_W:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_M,), dtype=tl.float32)
    db = tl.zeros((BLOCK_M,), dtype=tl.float32)
    row0 = pid * rows_per_program
    row1 = tl.minimum(row0 + rows_per_program, N)
    for r in range(row0, row1):
        row = tl.cast(r, tl.int64)  # 64-bit offsets: N * M may exceed 2^31
        dy = tl.load(DOUT + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xh = tl.where(mask, (x - mean) * rstd, 0.0)
        g = dy * w if HAS_W else dy
        mg = tl.sum(g, axis=0) / M
        mgx = tl.sum(g * xh, axis=0) / M
        dx = (g - mg - xh * mgx) * rstd
        if HAS_DSUM:
            dx += tl.load(DSUM + row * stride_s + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * M + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw += dy * xh
        if NEED_DB:
            db += dy
    if NEED_DW:
        tl.store(DW_PART + pid * M + cols, dw, mask=mask)
    if NEED_DB:
        tl.store(DB_PART + pid * M + cols, db, mask=mask)


@triton.jit
def _layer_norm_bwd_dwdb(
    DW_PART,  # [P, M] float32 (NEED_DW)
    DB_PART,  # [P, M] float32 (NEED_DB)
    DW,  # [M] in the parameter dtype
    DB,  # [M] in the parameter dtype
    P,
    M,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    acc_w = tl.zeros((BLOCK_P, BLOCK_M), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_P, BLOCK_M), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        m = (ps[:, None] < P) & (cols[None, :] < M)
        offs = ps[:, None] * M + cols[None, :]
        if NEED_DW:
            acc_w += tl.load(DW_PART + offs, mask=m, other=0.0)
        if NEED_DB:
            acc_b += tl.load(DB_PART + offs, mask=m, other=0.0)
    if NEED_DW:
        tl.store(DW + cols, tl.sum(acc_w, axis=0).to(DW.dtype.element_ty), mask=cols < M)
    if NEED_DB:
        tl.store(DB + cols, tl.sum(acc_b, axis=0).to(DB.dtype.element_ty), mask=cols < M)


# ------------------------------------------------------------------ launch rules
def block_cols(m: int) -> int:
    return triton.next_power_of_2(max(m, 1))


def num_warps(block_m: int) -> int:
    return min(max(block_m // 256, 1), 16)


def bwd_programs(n: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n, 4 * sms))
    return max(1, min(n, 4))


def _rows_ready(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _Triton:
    """The ``triton`` backend for layer_norm (contract: ``csrc/ops.cpp``)."""

    def fwd(self, x, weight, bias, residual, eps, out_dtype=None, dropout_p=0.0, seed=0):
        # Mixed dtypes and row dropout are not declared for Triton: the registry sends them to
        # a backend that serves them.
        assert dropout_p == 0 and out_dtype in (None, x.dtype), "not in Triton's Support"
        x = _rows_ready(x)
        n, m = x.shape
        out = torch.empty((n, m), dtype=x.dtype, device=x.device)
        has_res = residual is not None
        res = _rows_ready(residual) if has_res else x
        s = torch.empty((n, m), dtype=x.dtype, device=x.device) if has_res else x.new_empty(0)
        mean = torch.empty(n, dtype=torch.float32, device=x.device)
        rstd = torch.empty(n, dtype=torch.float32, device=x.device)
        if n == 0:
            return out, s, mean, rstd
        bm = block_cols(m)
        _layer_norm_fwd[(n,)](
            x, res, weight if weight is not None else x, bias if bias is not None else x,
            out, s if has_res else out, mean, rstd, m, x.stride(0), res.stride(0), float(eps),
            HAS_RES=has_res, HAS_W=weight is not None, HAS_B=bias is not None,
            BLOCK_M=bm, num_warps=num_warps(bm),
        )  # fmt: skip
        return out, s, mean, rstd

    def bwd(
        self, dout, x, weight, mean, rstd, dsum, need_weight_grad, need_bias_grad,
        need_ds=False, x_dtype=None, dropout_p=0.0, seed=0,
    ):  # fmt: skip
        assert dropout_p == 0 and x_dtype in (None, x.dtype), "not in Triton's Support"
        dx_, dw_, db_ = self._bwd(dout, x, weight, mean, rstd, dsum, need_weight_grad,
                                  need_bias_grad)  # fmt: skip
        empty = x.new_empty(0)
        return (dx_, empty, dw_, db_) if need_ds else (empty, dx_, dw_, db_)

    def _bwd(self, dout, x, weight, mean, rstd, dsum, need_weight_grad, need_bias_grad):
        x, dout = _rows_ready(x), _rows_ready(dout)
        ds = _rows_ready(dsum) if dsum is not None else None
        n, m = x.shape
        pdt = weight.dtype if weight is not None else x.dtype
        need_dw = bool(need_weight_grad and weight is not None)
        need_db = bool(need_bias_grad)
        dx = torch.empty((n, m), dtype=x.dtype, device=x.device)
        dw = torch.zeros(m if need_dw else 0, dtype=pdt, device=x.device)
        db = torch.zeros(m if need_db else 0, dtype=pdt, device=x.device)
        if n == 0:
            return dx, dw, db
        bm = block_cols(m)
        p = bwd_programs(n, x.device)
        rows_per_program = triton.cdiv(n, p)
        p = triton.cdiv(n, rows_per_program)
        shape = (p, m)
        dw_part = torch.empty(shape if need_dw else (1,), dtype=torch.float32, device=x.device)
        db_part = torch.empty(shape if need_db else (1,), dtype=torch.float32, device=x.device)
        _layer_norm_bwd_dx[(p,)](
            dout, x, weight if weight is not None else x, mean, rstd, ds if ds is not None else x,
            dx, dw_part, db_part, n, m, rows_per_program, dout.stride(0), x.stride(0),
            ds.stride(0) if ds is not None else 0,
            HAS_W=weight is not None, HAS_DSUM=ds is not None, NEED_DW=need_dw, NEED_DB=need_db,
            BLOCK_M=bm, num_warps=num_warps(bm),
        )  # fmt: skip
        if need_dw or need_db:
            rbm = min(bm, 256)
            _layer_norm_bwd_dwdb[(triton.cdiv(m, rbm),)](
                dw_part, db_part, dw if need_dw else dx, db if need_db else dx, p, m,
                NEED_DW=need_dw, NEED_DB=need_db, BLOCK_P=16, BLOCK_M=rbm, num_warps=4,
            )  # fmt: skip
        return dx, dw, db


TRITON = _Triton()
