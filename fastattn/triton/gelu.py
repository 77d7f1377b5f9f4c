"""Bias + GELU in Triton: forward, and backward with the bias gradient.

Maths (elementwise, ``u = x + bias``, computed in float32 whatever the input dtype):

- ``approximate="none"``: ``gelu(u) = u * Phi(u)``, ``Phi(u) = (1 + erf(u / sqrt 2)) / 2``;
  ``gelu'(u) = Phi(u) + u * exp(-u^2 / 2) / sqrt(2 pi)``. erf is ``tl.math.erf`` (libdevice
  ``erff`` on NVIDIA, numpy's under the interpreter).
- ``approximate="tanh"``: ``gelu(u) = u * s`` with ``s = sigmoid(2y) = 1 / (1 + e)``,
  ``e = exp(-2y)``, ``y = sqrt(2/pi) (u + 0.044715 u^3)`` (equal to ``u (1 + tanh y) / 2``
  without its cancellation); ``gelu'(u) = s + u (e s) s 2 sqrt(2/pi) (1 + 3 * 0.044715 u^2)``.
  The cubic is evaluated on ``u`` clamped to [-10, 10] (so ``e`` never overflows) and the
  saturated values (``gelu = 0, gelu' = 0`` below -10; ``gelu' = 1`` above 10) are selected
  explicitly, as in ``csrc/cpu/gelu.cpp``.
- Backward: ``dx = dout * gelu'(u)``; ``dbias = sum over rows of dx``, in two deterministic
  stages: each (row block, column block) program writes its column sums to a
  ``[row_blocks, M]`` float32 buffer, then ``_bias_gelu_bwd_dbias`` adds the row blocks in order.

Launch rules (named functions below; :func:`aot_launches` lists every variant they give, which
``scripts/triton_aot.py`` compiles for sm_80 and sm_90: no spills, ``make cuda-check``):

- :func:`block_cols`: 2-D tiles ``[BLOCK_N, BLOCK_M]`` with ``BLOCK_M = next_pow2(M)`` clamped
  to [16, 1024]: wide enough for 128-bit accesses per thread, small enough that any M works
  (columns are a grid axis, so there is no row-length limit); at least 16 (a one-column
  [4096, 1] tile spilled registers on sm_80).
- :func:`block_rows`: ``BLOCK_N`` such that a tile holds ~4096 elements (>= 1 row): ~16 values
  per thread at 8 warps keeps registers low and gives enough tiles to fill the GPU.
- :func:`num_warps`: 4 below 2048 elements per tile, else 8.

Test: ``TRITON_INTERPRET=1 pytest tests/test_gelu.py`` (the interpreter, small shapes, on the
CPU); on a GPU the same tests run natively.
"""

from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

from fastattn.triton import Launch, record

# Constants inlined in the kernels: 2 sqrt(2/pi) = 1.5957691216057308, 1/sqrt(2) =
# 0.7071067811865476, 1/sqrt(2 pi) = 0.3989422804014327; clamp of the tanh form: 10.


@triton.jit
def _gelu(u, TANH: tl.constexpr):
    if TANH:
        uc = tl.minimum(tl.maximum(u, -10.0), 10.0)
        e = tl.exp(-1.5957691216057308 * uc * (1.0 + 0.044715 * uc * uc))
        y = u / (1.0 + e)
        y = tl.where(u < -10.0, 0.0, y)
    else:
        y = u * (0.5 + 0.5 * tl.math.erf(u * 0.7071067811865476))
    return y


@triton.jit
def _dgelu(u, TANH: tl.constexpr):
    if TANH:
        uc = tl.minimum(tl.maximum(u, -10.0), 10.0)
        e = tl.exp(-1.5957691216057308 * uc * (1.0 + 0.044715 * uc * uc))
        s = 1.0 / (1.0 + e)
        p = 1.5957691216057308 * (1.0 + 3.0 * 0.044715 * uc * uc)
        d = s + (e * s) * s * uc * p
        d = tl.where(u < -10.0, 0.0, d)
        d = tl.where(u > 10.0, 1.0, d)
    else:
        cdf = 0.5 + 0.5 * tl.math.erf(u * 0.7071067811865476)
        d = cdf + u * tl.exp(-0.5 * u * u) * 0.3989422804014327
    return d


@triton.jit
def _bias_gelu_fwd(
    X,  # [N, M] input, row stride stride_x, unit column stride
    B,  # [M] bias (any float dtype; unused when HAS_BIAS is False)
    Y,  # [N, M] output, contiguous
    N,
    M,
    stride_x,
    HAS_BIAS: tl.constexpr,
    TANH: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (rows[:, None] < N) & (cols[None, :] < M)
    u = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        u += tl.load(B + cols, mask=cols < M, other=0.0).to(tl.float32)[None, :]
    y = _gelu(u, TANH)
    tl.store(Y + rows[:, None] * M + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd(
    DOUT,  # [N, M] incoming gradient, row stride stride_d
    X,  # [N, M] the forward's input (without bias), row stride stride_x
    B,  # [M] bias
    DX,  # [N, M] output gradient, contiguous
    DB_PART,  # [cdiv(N, BLOCK_N), M] float32: this row block's column sums of dx
    N,
    M,
    stride_d,
    stride_x,
    HAS_BIAS: tl.constexpr,
    NEED_DB: tl.constexpr,
    TANH: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_n = tl.program_id(0)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (rows[:, None] < N) & (cols[None, :] < M)
    u = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        u += tl.load(B + cols, mask=cols < M, other=0.0).to(tl.float32)[None, :]
    dy = tl.load(DOUT + rows[:, None] * stride_d + cols[None, :], mask=mask, other=0.0)
    dx = dy.to(tl.float32) * _dgelu(u, TANH)
    dx = tl.where(mask, dx, 0.0)
    tl.store(DX + rows[:, None] * M + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if NEED_DB:
        tl.store(DB_PART + pid_n * M + cols, tl.sum(dx, axis=0), mask=cols < M)


@triton.jit
def _bias_gelu_bwd_dbias(
    DB_PART,  # [P, M] float32 partial sums
    DB,  # [M] bias gradient, in the bias's dtype
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
        acc += tl.load(DB_PART + ps[:, None] * M + cols[None, :], mask=m, other=0.0)
    tl.store(DB + cols, tl.sum(acc, axis=0).to(DB.dtype.element_ty), mask=cols < M)


# ------------------------------------------------------------------ launch rules
MIN_BLOCK_COLS = 16  # a [4096, 1] tile (M = 1) spilled on sm_80; narrower rows are masked


def block_cols(m: int) -> int:
    return min(max(triton.next_power_of_2(max(m, 1)), MIN_BLOCK_COLS), 1024)


def block_rows(m: int) -> int:
    return max(1, 4096 // block_cols(m))


def num_warps(block_n: int, block_m: int) -> int:
    return 4 if block_n * block_m < 2048 else 8


def dbias_block(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 256)


DTYPES = ("fp32", "fp16", "bf16")  # the declaration's (fastattn.ops.gelu)
MAX_BLOCK_COLS_M = 1 << 11  # every block size the rules give appears for some m below this


def aot_launches(every_flag: bool = True) -> list[Launch]:
    """Every kernel variant the launchers can start (scripts/triton_aot.py): every tile the
    launch rules give (they depend on m only below 1024 columns), both GELU forms, bias absent,
    in x's dtype or fp32. ``every_flag=False``: only the variants with a bias (fp32) and its
    gradient, the ones with the most live values."""
    out = []
    for x in DTYPES:
        bdts = (None, x) if x == "fp32" else (None, x, "fp32")  # None: no bias
        if not every_flag:
            bdts = ("fp32",)
        tiles = sorted({(block_rows(m), block_cols(m)) for m in range(1, MAX_BLOCK_COLS_M)})
        for (bn, bm), bdt, tanh in itertools.product(tiles, bdts, (False, True)):
            tile = dict(TANH=tanh, BLOCK_N=bn, BLOCK_M=bm)
            ptr = dict(X=x, B=bdt or x, Y=x)
            meta = dict(HAS_BIAS=bdt is not None, **tile)
            out.append(_rec("_bias_gelu_fwd", ptr, meta, num_warps(bn, bm)))
            for need_db in (False, True) if every_flag else (True,):
                if need_db and bdt is None:
                    continue
                ptr = dict(DOUT=x, X=x, B=bdt or x, DX=x, DB_PART="fp32")
                meta = dict(HAS_BIAS=bdt is not None, NEED_DB=need_db, **tile)
                out.append(_rec("_bias_gelu_bwd", ptr, meta, num_warps(bn, bm)))
    for pdt in DTYPES:
        for bm in sorted({dbias_block(m) for m in range(1, MAX_BLOCK_COLS_M)}):
            ptr = dict(DB=pdt, DB_PART="fp32")
            out.append(_rec("_bias_gelu_bwd_dbias", ptr, dict(BLOCK_P=16, BLOCK_M=bm), 4))
    return out


_rec = functools.partial(record, "gelu")


def _rows_ready(t: torch.Tensor) -> torch.Tensor:
    """[N, M] with unit column stride (the kernels take a row stride)."""
    return t if t.stride(-1) == 1 else t.contiguous()


class _Triton:
    """The ``triton`` backend for bias_gelu (contract: ``csrc/ops.cpp``)."""

    def fwd(self, x, bias, approximate):
        x = _rows_ready(x)
        n, m = x.shape
        y = torch.empty((n, m), dtype=x.dtype, device=x.device)
        if x.numel() == 0:
            return y
        bn, bm = block_rows(m), block_cols(m)
        grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
        _bias_gelu_fwd[grid](
            x, bias if bias is not None else x, y, n, m, x.stride(0),
            HAS_BIAS=bias is not None, TANH=approximate == "tanh",
            BLOCK_N=bn, BLOCK_M=bm, num_warps=num_warps(bn, bm),
        )  # fmt: skip
        return y

    def bwd(self, dout, x, bias, approximate, need_bias_grad):
        x, dout = _rows_ready(x), _rows_ready(dout)
        n, m = x.shape
        pdt = bias.dtype if bias is not None else x.dtype
        dx = torch.empty((n, m), dtype=x.dtype, device=x.device)
        need_db = bool(need_bias_grad and bias is not None)
        db = torch.zeros(m if need_db else 0, dtype=pdt, device=x.device)
        if x.numel() == 0:
            return dx, db
        bn, bm = block_rows(m), block_cols(m)
        p = triton.cdiv(n, bn)
        part = torch.empty((p, m) if need_db else (1,), dtype=torch.float32, device=x.device)
        _bias_gelu_bwd[(p, triton.cdiv(m, bm))](
            dout, x, bias if bias is not None else x, dx, part, n, m, dout.stride(0), x.stride(0),
            HAS_BIAS=bias is not None, NEED_DB=need_db, TANH=approximate == "tanh",
            BLOCK_N=bn, BLOCK_M=bm, num_warps=num_warps(bn, bm),
        )  # fmt: skip
        if need_db:
            rbm = dbias_block(m)
            _bias_gelu_bwd_dbias[(triton.cdiv(m, rbm),)](
                part, db, p, m, BLOCK_P=16, BLOCK_M=rbm, num_warps=4
            )
        return dx, db


TRITON = _Triton()
