"""LayerNorm and residual-add + LayerNorm in Triton: forward and backward.

Maths, per row of M values (``s = x + residual`` when a residual is given, else ``s = x``;
statistics in float32):

- ``mu = mean(s)``, ``var = mean((s - mu)^2)`` (two-pass, in registers), ``rstd = 1/sqrt(var+eps)``,
  ``xhat = (s - mu) * rstd``, ``out = xhat * weight + bias``.
- Backward with ``g = dout * weight``:
  ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` (``+ dsum``, the gradient reaching ``s``
  directly); ``dweight = sum over rows of dout * xhat``, ``dbias = sum over rows of dout``.
- The mean's rounding: ``mu`` in float32 is off by up to ``ulp(mu) / 2`` in every column, which
  on a row whose spread is small next to its mean (2 columns, a near-constant row) is a relative
  error of ``ulp(mu) / spread`` in ``xhat``, the output and ``dweight``, amplified further in
  ``dx`` (its formula assumes ``sum(xhat) == 0``). The forward subtracts that error too,
  ``c = mean(s - mu)`` (``var = mean((s - mu)^2) - c^2``, ``xhat = (s - mu - c) * rstd``); the
  backward centres the recomputed ``xhat`` on its own row mean (``xc = xhat - mean(xhat)``, with
  ``mean(g * xc)``) and sums ``dout * xc`` for ``dweight``: as the CPU and CUDA kernels.
  The column sums are deterministic: each program of ``_layer_norm_bwd_dx`` owns a contiguous
  range of rows and writes its partial sums to its own row of ``[programs, M]`` float32
  buffers; ``_layer_norm_bwd_dwdb`` adds those rows in order.

Launch rules (named functions below; :func:`aot_launches` lists every variant they give, which
``scripts/triton_aot.py`` compiles for sm_80 and sm_90 in ``make test``: 794 variants, none
spills, at most 64 registers per thread outside the 96 of ``bwd_dwdb``. A looped row's backward
keeps ``sum(xhat)`` as a scalar per chunk: a third ``[BLOCK_M]`` accumulator spilled 8-16 B in
two 16-bit variants on sm_90):

- :func:`block_cols` / :func:`one_block`: a row of up to ``ONE_BLOCK_MAX`` = 8192 columns is
  one block held in registers, ``BLOCK_M = next_pow2(M)`` (at least 128: one warp); a longer
  row (up to `TRITON_MAX_COLS` = 65536 in the op declaration) is read in 2048-column chunks, in
  three passes forward (sum, variance around the mean, output) and two backward (the two row
  means, then dx): a whole 16384+-column row spilled registers (16 warps cap a thread at 128).
- :func:`num_warps`: ``BLOCK_M / 256`` (at least 1) up to 1024 columns: 8 values per thread
  per operand (4 at 128), one 16-byte load of 16-bit data; ``BLOCK_M / 128`` from 2048 on, at
  most 32 warps (1024 threads, CUDA's limit): 4 values per thread at 2048 / 4096 columns and in
  a looped chunk, 8 at 8192. With 8 per thread at 2048 (8 warps) and 4096 (16 warps, one block
  and the former 4096-column looped chunk) ptxas spilled 8-16 B in 7 16-bit variants on sm_80,
  holding them at an occupancy step (32-64 registers) far below the 128-255 a thread may have
  there. The chunk is 2048 columns (16 warps), not 4096 (32 warps): at 4096 the fp32 forward
  with a residual spilled 68 B on sm_80, at 2048 no dtype spills. 16 warps at 8192 columns
  (124 registers) do not spill in fp32 either, but halve the warps an SM holds.
- :func:`bwd_programs`: 4 programs per SM on a GPU (enough to hide latency while keeping the
  ``[programs, M]`` partial buffers small); 4 under the interpreter (it runs programs serially).

Test: ``TRITON_INTERPRET=1 pytest tests/test_layernorm_triton.py`` (interpreter, small shapes).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from fastattn.ops.layernorm import TRITON_MAX_COLS
from fastattn.triton import Launch, record


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
    ONE_BLOCK: tl.constexpr,  # the row fits one BLOCK_M block (else: looped, three passes)
    BLOCK_M: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_M)
    if ONE_BLOCK:
        mask = cols < M
        s = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RES:
            # Added in fp32 and rounded to the input dtype (as torch does; the interpreter's
            # bfloat16 add overflows): the normalised value is the sum the caller gets back.
            r = tl.load(RES + row * stride_r + cols, mask=mask, other=0.0)
            s = (s.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
            tl.store(SUM + row * M + cols, s, mask=mask)
        s = s.to(tl.float32)
        mean = tl.sum(s, axis=0) / M
        d = tl.where(mask, s - mean, 0.0)
        c = tl.sum(d, axis=0) / M  # the rounding error of mean (module docstring)
        var = tl.maximum(tl.sum(d * d, axis=0) / M - c * c, 0.0)
        rstd = 1.0 / tl.sqrt(var + eps)
        y = (d - c) * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + row * M + cols, y.to(OUT.dtype.element_ty), mask=mask)
    else:
        # A long row in BLOCK_M chunks: the sum (stored, then re-read: the same rounded values),
        # the mean, the variance around it (two-pass, as above), then the output.
        src = SUM + row * M if HAS_RES else X + row * stride_x
        acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c0 in range(0, M, BLOCK_M):
            mask = c0 + cols < M
            s = tl.load(X + row * stride_x + c0 + cols, mask=mask, other=0.0)
            if HAS_RES:
                r = tl.load(RES + row * stride_r + c0 + cols, mask=mask, other=0.0)
                s = (s.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
                tl.store(SUM + row * M + c0 + cols, s, mask=mask)
            acc += s.to(tl.float32)
        mean = tl.sum(acc, axis=0) / M
        acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc_d = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c0 in range(0, M, BLOCK_M):
            mask = c0 + cols < M
            s = tl.load(src + c0 + cols, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, s - mean, 0.0)
            acc += d * d
            acc_d += d
        c = tl.sum(acc_d, axis=0) / M
        rstd = 1.0 / tl.sqrt(tl.maximum(tl.sum(acc, axis=0) / M - c * c, 0.0) + eps)
        for c0 in range(0, M, BLOCK_M):
            mask = c0 + cols < M
            s = tl.load(src + c0 + cols, mask=mask, other=0.0).to(tl.float32)
            y = (s - mean - c) * rstd
            if HAS_W:
                y = y * tl.load(W + c0 + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_B:
                y = y + tl.load(B + c0 + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(OUT + row * M + c0 + cols, y.to(OUT.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean + c)
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
    ONE_BLOCK: tl.constexpr,  # the row fits one BLOCK_M block (else: looped, two passes)
    BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_M)
    row0 = pid * rows_per_program
    row1 = tl.minimum(row0 + rows_per_program, N)
    if ONE_BLOCK:
        mask = cols < M
        if HAS_W:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_M,), dtype=tl.float32)
        db = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for r in range(row0, row1):
            row = tl.cast(r, tl.int64)  # 64-bit offsets: N * M may exceed 2^31
            dy = tl.load(DOUT + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            xh = tl.where(mask, (x - mean) * rstd, 0.0)
            g = dy * w if HAS_W else dy
            # xhat centred on its own row mean (module docstring): mean(g * xc) =
            # mean(g * xhat) - mean(xhat) mean(g).
            mg = tl.sum(g, axis=0) / M
            mx = tl.sum(xh, axis=0) / M
            mgx = tl.sum(g * xh, axis=0) / M - mx * mg
            xc = xh - mx
            dx = (g - mg - xc * mgx) * rstd
            if HAS_DSUM:
                dx += tl.load(DSUM + row * stride_s + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + row * M + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if NEED_DW:
                dw += dy * xc
            if NEED_DB:
                db += dy
        if NEED_DW:
            tl.store(DW_PART + pid * M + cols, dw, mask=mask)
        if NEED_DB:
            tl.store(DB_PART + pid * M + cols, db, mask=mask)
    else:
        # A long row in BLOCK_M chunks: pass 1 the two row means, pass 2 dx and the partial
        # dweight / dbias, added in place into this program's own (zeroed) partial rows.
        for r in range(row0, row1):
            row = tl.cast(r, tl.int64)
            mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            acc_g = tl.zeros((BLOCK_M,), dtype=tl.float32)
            acc_gx = tl.zeros((BLOCK_M,), dtype=tl.float32)
            sx = 0.0  # a scalar: a third [BLOCK_M] accumulator spilled 16-bit rows on sm_90
            for c0 in range(0, M, BLOCK_M):
                mask = c0 + cols < M
                dy = tl.load(DOUT + row * stride_d + c0 + cols, mask=mask, other=0.0)
                x = tl.load(X + row * stride_x + c0 + cols, mask=mask, other=0.0)
                xh = tl.where(mask, (x.to(tl.float32) - mean) * rstd, 0.0)
                g = dy.to(tl.float32)
                if HAS_W:
                    g = g * tl.load(W + c0 + cols, mask=mask, other=0.0).to(tl.float32)
                acc_g += g
                sx += tl.sum(xh, axis=0)
                acc_gx += g * xh
            mg = tl.sum(acc_g, axis=0) / M
            mx = sx / M
            mgx = tl.sum(acc_gx, axis=0) / M - mx * mg
            for c0 in range(0, M, BLOCK_M):
                mask = c0 + cols < M
                dy = tl.load(DOUT + row * stride_d + c0 + cols, mask=mask, other=0.0)
                x = tl.load(X + row * stride_x + c0 + cols, mask=mask, other=0.0)
                dy = dy.to(tl.float32)
                xh = tl.where(mask, (x.to(tl.float32) - mean) * rstd, 0.0)
                g = dy
                if HAS_W:
                    g = g * tl.load(W + c0 + cols, mask=mask, other=0.0).to(tl.float32)
                dx = (g - mg - (xh - mx) * mgx) * rstd
                if HAS_DSUM:
                    dx += tl.load(DSUM + row * stride_s + c0 + cols, mask=mask, other=0.0).to(
                        tl.float32
                    )
                tl.store(DX + row * M + c0 + cols, dx.to(DX.dtype.element_ty), mask=mask)
                if NEED_DW:
                    part = DW_PART + pid * M + c0 + cols
                    tl.store(part, tl.load(part, mask=mask, other=0.0) + dy * (xh - mx), mask=mask)
                if NEED_DB:
                    part = DB_PART + pid * M + c0 + cols
                    tl.store(part, tl.load(part, mask=mask, other=0.0) + dy, mask=mask)


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
ONE_BLOCK_MAX = 8192  # longest row held in registers whole (32 warps: 8 floats per operand)
LOOP_BLOCK = 2048  # chunk of a longer row (16 warps: 4 floats per operand per pass)
MIN_BLOCK = 128  # one warp, 4 values per thread: shorter rows are masked
DTYPES = ("fp32", "fp16", "bf16")  # the declaration's (fastattn.ops.layernorm)


def block_cols(m: int) -> int:
    """BLOCK_M: the whole row padded to a power of two (>= MIN_BLOCK) up to ONE_BLOCK_MAX
    columns, else LOOP_BLOCK-column chunks of it (``one_block(m)`` False)."""
    if not one_block(m):
        return LOOP_BLOCK
    return max(triton.next_power_of_2(max(m, 1)), MIN_BLOCK)


def one_block(m: int) -> bool:
    return m <= ONE_BLOCK_MAX


def num_warps(block_m: int) -> int:
    """8 values per thread up to 1024 columns, 4 from 2048 on (8 at 8192: 32 warps at most);
    with 8 at 2048 / 4096 columns ptxas spilled 16-bit variants on sm_80 (module docstring)."""
    if block_m <= 1024:
        return max(block_m // 256, 1)
    return min(block_m // 128, 32)


def dwdb_block(block_m: int) -> int:
    return min(block_m, 256)


def bwd_programs(n: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n, 4 * sms))
    return max(1, min(n, 4))


def aot_launches(every_flag: bool = True) -> list[Launch]:
    """Every kernel variant the launchers can start (scripts/triton_aot.py): every (block,
    one-block) pair the launch rules give for 1..TRITON_MAX_COLS, every flag, weight / bias in
    x's dtype or fp32. ``every_flag=False``: only the variants with every optional operand
    present (fp32 parameters), the ones with the most live values."""
    rows = sorted({(block_cols(m), one_block(m)) for m in range(1, TRITON_MAX_COLS + 1)})
    bools = (False, True) if every_flag else (True,)
    out = []
    for x in DTYPES:
        pdts = (None, x) if x == "fp32" else (None, x, "fp32")  # None: no such parameter
        if not every_flag:
            pdts = ("fp32",)
        for bm, one in rows:
            common = dict(ONE_BLOCK=one, BLOCK_M=bm)
            for res, wt, bt in itertools.product(bools, pdts, pdts):
                ptr = dict(X=x, RES=x, W=wt or x, B=bt or x, OUT=x, SUM=x, MEAN="fp32", RSTD="fp32")
                meta = dict(HAS_RES=res, HAS_W=wt is not None, HAS_B=bt is not None, **common)
                out.append(_rec("_layer_norm_fwd", ptr, meta, num_warps(bm)))
            for wt, dsum, dw, db in itertools.product(pdts, bools, bools, bools):
                if dw and wt is None:
                    continue
                ptr = dict(DOUT=x, X=x, W=wt or x, MEAN="fp32", RSTD="fp32", DSUM=x, DX=x)
                ptr.update(DW_PART="fp32", DB_PART="fp32")
                meta = dict(HAS_W=wt is not None, HAS_DSUM=dsum, NEED_DW=dw, NEED_DB=db, **common)
                out.append(_rec("_layer_norm_bwd_dx", ptr, meta, num_warps(bm)))
    for x in DTYPES:
        for pdt in sorted({x, "fp32"}) if every_flag else ("fp32",):
            for bm in sorted({dwdb_block(b) for b, _ in rows}):
                for dw, db in ((True, True), (True, False), (False, True))[
                    : 3 if every_flag else 1
                ]:
                    # an output that is not needed gets dx's pointer: never written
                    ptr = dict(DW=pdt if dw else x, DB=pdt if db else x)
                    ptr.update(DW_PART="fp32", DB_PART="fp32")
                    meta = dict(NEED_DW=dw, NEED_DB=db, BLOCK_P=16, BLOCK_M=bm)
                    out.append(_rec("_layer_norm_bwd_dwdb", ptr, meta, 4))
    return out


def _rec(kernel: str, pointers: dict, constexprs: dict, warps: int) -> Launch:
    floats = ("eps",) if kernel == "_layer_norm_fwd" else ()
    return record("layernorm", kernel, pointers, constexprs, warps, floats)


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
            ONE_BLOCK=one_block(m), BLOCK_M=bm, num_warps=num_warps(bm),
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
        one = one_block(m)
        new = torch.empty if one else torch.zeros  # the looped kernel adds into its partials
        dw_part = new((p, m) if need_dw else (1,), dtype=torch.float32, device=x.device)
        db_part = new((p, m) if need_db else (1,), dtype=torch.float32, device=x.device)
        _layer_norm_bwd_dx[(p,)](
            dout, x, weight if weight is not None else x, mean, rstd, ds if ds is not None else x,
            dx, dw_part, db_part, n, m, rows_per_program, dout.stride(0), x.stride(0),
            ds.stride(0) if ds is not None else 0,
            HAS_W=weight is not None, HAS_DSUM=ds is not None, NEED_DW=need_dw, NEED_DB=need_db,
            ONE_BLOCK=one, BLOCK_M=bm, num_warps=num_warps(bm),
        )  # fmt: skip
        if need_dw or need_db:
            rbm = dwdb_block(bm)
            _layer_norm_bwd_dwdb[(triton.cdiv(m, rbm),)](
                dw_part, db_part, dw if need_dw else dx, db if need_db else dx, p, m,
                NEED_DW=need_dw, NEED_DB=need_db, BLOCK_P=16, BLOCK_M=rbm, num_warps=4,
            )  # fmt: skip
        return dx, dw, db


TRITON = _Triton()
