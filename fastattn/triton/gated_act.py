"""Gated activations (SwiGLU, GeGLU) in Triton: forward and backward.

Maths (elementwise on ``g = gate``, ``u = up``, in float32 whatever the input dtype):
``h = act(g) * u``; backward ``dgate = dh * u * act'(g)``, ``dup = dh * act(g)`` (act recomputed).

- ``silu``: ``act(g) = g s``, ``s = 1 / (1 + e)``, ``e = exp(-g)``; ``act'(g) = s + g (e s) s``.
  ``e`` is evaluated on ``g`` clamped to >= -88 (never inf, so ``e * s`` is never ``inf * 0``),
  and ``act = act' = 0`` is selected below -88 (the true values are below 1e-36 there), as in
  ``csrc/cpu/gated_act.cpp``.
- ``gelu`` / ``gelu_tanh``: ``_gelu`` / ``_dgelu`` of :mod:`fastattn.triton.gelu` (shared).

Layouts: every operand is ``[N, H]`` with its own row stride and a unit column stride, so the two
halves of a packed ``[N, 2H]`` tensor are read (and the packed gradient written) in place.

Launch rules: the 2-D tiles of :mod:`fastattn.triton.gelu` (``block_cols``, ``block_rows``,
``num_warps``): columns are a grid axis, so there is no row-length limit. :func:`aot_launches`
lists every variant they give (7 tiles x 3 activations x 3 dtypes x 2 stages = 126 per target),
which ``scripts/triton_aot.py`` compiles for sm_80 and sm_90.

Test: ``TRITON_INTERPRET=1 pytest tests/test_gated_act.py`` (the interpreter, small shapes).
"""

from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

from fastattn.triton import Launch, record
from fastattn.triton.gelu import (
    DTYPES,
    MAX_BLOCK_COLS_M,
    _dgelu,
    _gelu,
    block_cols,
    block_rows,
    num_warps,
)

_ACT = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 0:
        gc = tl.maximum(g, -88.0)
        a = g / (1.0 + tl.exp(-gc))
        a = tl.where(g < -88.0, 0.0, a)
    else:
        a = _gelu(g, ACT == 2)
    return a


@triton.jit
def _dact(g, ACT: tl.constexpr):
    if ACT == 0:
        gc = tl.maximum(g, -88.0)
        e = tl.exp(-gc)
        s = 1.0 / (1.0 + e)
        d = s + gc * (e * s) * s
        d = tl.where(g < -88.0, 0.0, d)
    else:
        d = _dgelu(g, ACT == 2)
    return d


@triton.jit
def _gated_act_fwd(
    G,  # [N, H] gate, row stride stride_g
    U,  # [N, H] up, row stride stride_u
    Y,  # [N, H] output, contiguous
    N,
    H,
    stride_g,
    stride_u,
    ACT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (rows[:, None] < N) & (cols[None, :] < H)
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = _act(g, ACT) * u
    tl.store(Y + rows[:, None] * H + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gated_act_bwd(
    DH,  # [N, H] incoming gradient, row stride stride_d
    G,
    U,
    DG,  # [N, H] gate gradient, row stride stride_o (2H when packed with DU)
    DU,  # [N, H] up gradient, row stride stride_o
    N,
    H,
    stride_d,
    stride_g,
    stride_u,
    stride_o,
    ACT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (rows[:, None] < N) & (cols[None, :] < H)
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DH + rows[:, None] * stride_d + cols[None, :], mask=mask, other=0.0)
    dy = dy.to(tl.float32)
    dg = dy * u * _dact(g, ACT)
    du = dy * _act(g, ACT)
    out = rows[:, None] * stride_o + cols[None, :]
    tl.store(DG + out, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + out, du.to(DU.dtype.element_ty), mask=mask)


def _rows_ready(t: torch.Tensor) -> torch.Tensor:
    """[N, H] with unit column stride (the kernels take a row stride)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _operands(gate, up):
    if up is not None:
        return _rows_ready(gate), _rows_ready(up)
    gu = _rows_ready(gate)
    h = gu.shape[1] // 2
    return gu[:, :h], gu[:, h:]


def _grid(n: int, h: int):
    bn, bm = block_rows(h), block_cols(h)
    return (triton.cdiv(n, bn), triton.cdiv(h, bm)), bn, bm


class _Triton:
    """The ``triton`` backend for gated_act (contract: ``csrc/ops.cpp``)."""

    def fwd(self, gate, up, activation):
        g, u = _operands(gate, up)
        n, h = g.shape
        y = torch.empty((n, h), dtype=g.dtype, device=g.device)
        if y.numel() == 0:
            return y
        grid, bn, bm = _grid(n, h)
        _gated_act_fwd[grid](
            g, u, y, n, h, g.stride(0), u.stride(0),
            ACT=_ACT[activation], BLOCK_N=bn, BLOCK_M=bm, num_warps=num_warps(bn, bm),
        )  # fmt: skip
        return y

    def bwd(self, dh, gate, up, activation):
        g, u = _operands(gate, up)
        dh = _rows_ready(dh)
        n, h = g.shape
        if up is None:
            out1 = torch.empty((n, 2 * h), dtype=g.dtype, device=g.device)
            out2 = torch.empty(0, dtype=g.dtype, device=g.device)
            dg, du = out1[:, :h], out1[:, h:]
        else:
            out1 = dg = torch.empty((n, h), dtype=g.dtype, device=g.device)
            out2 = du = torch.empty((n, h), dtype=g.dtype, device=g.device)
        if n == 0 or h == 0:
            return out1, out2
        grid, bn, bm = _grid(n, h)
        _gated_act_bwd[grid](
            dh, g, u, dg, du, n, h, dh.stride(0), g.stride(0), u.stride(0), dg.stride(0),
            ACT=_ACT[activation], BLOCK_N=bn, BLOCK_M=bm, num_warps=num_warps(bn, bm),
        )  # fmt: skip
        return out1, out2


TRITON = _Triton()


def aot_launches(every_flag: bool = True) -> list[Launch]:
    """Every kernel variant the launcher can start (scripts/triton_aot.py): every tile the
    launch rules give (they depend on H only below 1024 columns), each activation and dtype
    (every operand of a call has the gate's dtype), both stages. ``every_flag=False``: the
    widest and the narrowest tile only."""
    tiles = sorted({(block_rows(h), block_cols(h)) for h in range(1, MAX_BLOCK_COLS_M)})
    if not every_flag:
        tiles = [tiles[0], tiles[-1]]
    out = []
    for (bn, bm), act, dt in itertools.product(tiles, _ACT.values(), DTYPES):
        meta = dict(ACT=act, BLOCK_N=bn, BLOCK_M=bm)
        fwd = dict(G=dt, U=dt, Y=dt)
        bwd = dict(DH=dt, G=dt, U=dt, DG=dt, DU=dt)
        out.append(_rec("_gated_act_fwd", fwd, meta, num_warps(bn, bm)))
        out.append(_rec("_gated_act_bwd", bwd, meta, num_warps(bn, bm)))
    return out


_rec = functools.partial(record, "gated_act")
