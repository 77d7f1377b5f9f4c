"""Rotary position embedding (RoPE) in Triton: forward and backward, one kernel.

Maths (the kernel contract in ``csrc/ops.cpp``, the same for every backend), per row
``(b, head, t)`` of ``x [B, H, T, D]`` with ``c = cos[b', t]``, ``s = sin[b', t]`` (``b' = 0``
when ``cos`` has one batch row), ``h = R / 2``, and for ``j < h`` ``a = x[j]``, ``bb = x[j + h]``,
in float32 with one rounding to the output dtype:

- forward:  ``y[j] = a c[j] - bb s[j]``,  ``y[j + h] = bb c[j + h] + a s[j + h]``
  (``x * cos + rotate_half(x) * sin`` on the first ``R`` columns);
- backward (the transpose, ``x`` = ``dy``, ``y`` = ``dx``): ``y[j] = a c[j] + bb s[j + h]``,
  ``y[j + h] = bb c[j + h] - a s[j]``;
- ``y[j] = x[j]`` for ``R <= j < D`` (partial rotary: the columns pass through, converted).

One ``@triton.jit`` kernel, :func:`_rotary`, serves both stages (``BACKWARD`` picks which sine
index each product takes). The two multiplies of a pair may be fused into one FMA (Triton's
default): still one rounding to the output, one fp32 rounding fewer inside.

Layouts: ``x`` has any strides with a unit last one (``q = proj(x).view(B, T, H, D)
.transpose(1, 2)`` is read in place); ``cos`` / ``sin`` ``[Bc, T, R]`` have any strides with a
unit last one, a batch stride of 0 standing in for ``Bc == 1`` (the launcher passes 0 there), and
are the same for every head. The output is ``torch.empty_like(x, dtype=out_dtype)`` (``x``'s
strides when ``x`` is dense, contiguous otherwise) and is written through its own strides. dtypes:
``x``, ``cos`` / ``sin`` and the output are each float32 or the call's one 16-bit type, in any
mix (autocast's bf16 ``q`` with fp32 ``cos``): every variant reads and writes them directly.

Tiling: the ``B * H * T`` rows are flattened and cut into blocks of ``BLOCK_N`` rows, one
program each (a 1-D grid: any B, H, T with ``B * H * T < 2^31``, the int32 row index). A row index is split as ``(b, p, q)``,
``q`` fastest, where ``(p, q)`` is ``(t, head)`` or ``(head, t)``: the launcher makes ``q`` the
axis with the smaller stride in ``x`` (the head axis for the transposed projection, whose rows of
one token are adjacent in memory and share one ``cos`` row; ``t`` for a contiguous ``[B, H, T,
D]``, whose consecutive rows are adjacent and read consecutive ``cos`` rows), so a block is one
run of memory in the common layouts. The kernel sees only sizes and strides of the two axes
(``cos``'s head stride is 0), row offsets in int64. Each program then walks the rotated half
columns in ``[BLOCK_N, BLOCK_C]`` tiles (``x`` at ``j`` and ``j + h``, ``cos`` / ``sin`` at
``j`` and ``j + h``: six loads, two stores per tile), then the pass-through columns ``R..D`` in
tiles of the same shape (a load and a store): loops with run-time bounds, so any ``D`` and ``R``
run on the few variants below, the pass-through loop making zero trips when ``R == D``. Every
output element belongs to exactly one tile of one program.

Launch rules (named functions below; :func:`aot_launches` lists every variant they give, which
``scripts/triton_aot.py`` compiles for sm_80 and sm_90: 180 variants per target, at most 48
registers, no spills, no shared memory):

- :func:`block_cols`: ``BLOCK_C = next_pow2(h)`` clamped to [4, 128]: one tile spans the half
  row of every head dim up to 256 (a longer half row loops); at least 4 (``h < 4`` is ``D < 8``).
- :func:`block_rows`: ``BLOCK_N = 1024 / BLOCK_C``: 1024 pairs, 2048 values of ``x`` read and
  written per tile, 4 pairs per thread at 8 warps. At 2048 pairs (8 per thread) ptxas used up
  to 98 registers and spilled 8-24 B in three 16-bit variants, and a mix of fp32 and 16-bit
  operands was loaded in two layouts (8 16-bit values per 16-byte access against 4 fp32 values),
  converted through 8 KB of shared memory; at 4 per thread every operand has one layout (16-byte
  fp32 / 8-byte 16-bit accesses). The pass-through tile has the rotation tile's shape for the
  same reason (at twice its width its row offsets needed a second layout).
- :func:`num_warps`: 8 (every tile is 1024 pairs).

So 6 tiles x 2 stages x 15 dtype mixes (all fp32; per 16-bit type T, the 7 mixes of fp32 / T
over ``x``, ``cos`` and the output with at least one T) = 180 variants per target.

Test: ``TRITON_INTERPRET=1 pytest tests/test_rotary.py`` (the interpreter, small shapes, on the
CPU); on a GPU the same tests run natively.
"""

from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

from fastattn.triton import Launch, record


@triton.jit
def _rotary(
    X,  # [B, H, T, D] input (dy for the backward), unit column stride
    COS,  # [Bc, T, R] cosines, unit column stride
    SIN,  # [Bc, T, R] sines, unit column stride
    Y,  # [B, H, T, D] output (dx for the backward), unit column stride
    N,  # rows: B * P * Q
    P,  # size of the slower row axis (T or H)
    Q,  # size of the fastest row axis (H or T)
    HALF,  # h = R / 2
    R,
    D,
    stride_xb,
    stride_xp,
    stride_xq,
    stride_yb,
    stride_yp,
    stride_yq,
    stride_cb,  # 0 for one batch row of cos / sin
    stride_cp,
    stride_cq,  # 0 on the head axis
    stride_sb,
    stride_sp,
    stride_sq,
    BACKWARD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    q = (rows % Q).to(tl.int64)
    bp = rows // Q
    p = (bp % P).to(tl.int64)
    b = (bp // P).to(tl.int64)
    xo = (b * stride_xb + p * stride_xp + q * stride_xq)[:, None]
    yo = (b * stride_yb + p * stride_yp + q * stride_yq)[:, None]
    co = (b * stride_cb + p * stride_cp + q * stride_cq)[:, None]
    so = (b * stride_sb + p * stride_sp + q * stride_sq)[:, None]
    cols = tl.arange(0, BLOCK_C)
    for j0 in range(0, HALF, BLOCK_C):
        j = (j0 + cols)[None, :]
        m = rmask[:, None] & (j < HALF)
        a = tl.load(X + xo + j, mask=m, other=0.0).to(tl.float32)
        bb = tl.load(X + xo + HALF + j, mask=m, other=0.0).to(tl.float32)
        c_lo = tl.load(COS + co + j, mask=m, other=0.0).to(tl.float32)
        c_hi = tl.load(COS + co + HALF + j, mask=m, other=0.0).to(tl.float32)
        s_lo = tl.load(SIN + so + j, mask=m, other=0.0).to(tl.float32)
        s_hi = tl.load(SIN + so + HALF + j, mask=m, other=0.0).to(tl.float32)
        if BACKWARD:
            y_lo = a * c_lo + bb * s_hi
            y_hi = bb * c_hi - a * s_lo
        else:
            y_lo = a * c_lo - bb * s_lo
            y_hi = bb * c_hi + a * s_hi
        tl.store(Y + yo + j, y_lo.to(Y.dtype.element_ty), mask=m)
        tl.store(Y + yo + HALF + j, y_hi.to(Y.dtype.element_ty), mask=m)
    for k0 in range(R, D, BLOCK_C):
        k = (k0 + cols)[None, :]
        m = rmask[:, None] & (k < D)
        v = tl.load(X + xo + k, mask=m, other=0.0)
        tl.store(Y + yo + k, v.to(Y.dtype.element_ty), mask=m)


# ------------------------------------------------------------------ launch rules
MIN_BLOCK_COLS = 4
MAX_BLOCK_COLS = 128  # a half row of up to 128 pairs (D <= 256) is one tile; longer ones loop
PAIRS_PER_TILE = 1024


def block_cols(half: int) -> int:
    return min(max(triton.next_power_of_2(max(half, 1)), MIN_BLOCK_COLS), MAX_BLOCK_COLS)


def block_rows(half: int) -> int:
    return PAIRS_PER_TILE // block_cols(half)


def num_warps(block_n: int, block_c: int) -> int:
    return 8


DTYPES = ("fp32", "bf16", "fp16")  # the declaration's for Triton (fastattn.ops.rotary)
_TL = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
MAX_HALF = 2 * MAX_BLOCK_COLS  # every block size the rules give appears for some h below this


def dtype_mixes(every_flag: bool = True) -> list[tuple[str, str, str]]:
    """(x, cos / sin, out) element types the launcher accepts: each fp32 or the call's one
    16-bit type. ``every_flag=False``: autocast's two mixes (bf16 x / fp32 cos / fp32 out
    forward, fp32 dy / fp32 cos / bf16 dx backward)."""
    if not every_flag:
        return [("bf16", "fp32", "fp32"), ("fp32", "fp32", "bf16")]
    out = {("fp32", "fp32", "fp32")}
    for half in DTYPES[1:]:
        out |= set(itertools.product(("fp32", half), repeat=3))
    return sorted(out)


def aot_launches(every_flag: bool = True) -> list[Launch]:
    """Every kernel variant the launcher can start (scripts/triton_aot.py): every tile the
    launch rules give (they depend on h = R / 2 only below 256 pairs: every head dim, every
    rotary dim), both stages, every dtype mix. ``every_flag=False``: autocast's two mixes only,
    both stages, every tile."""
    tiles = sorted({(block_rows(h), block_cols(h)) for h in range(1, MAX_HALF + 1)})
    out = []
    for (bn, bc), (x, c, o), bwd in itertools.product(tiles, dtype_mixes(every_flag), (0, 1)):
        ptr = dict(X=x, COS=c, SIN=c, Y=o)
        meta = dict(BACKWARD=bool(bwd), BLOCK_N=bn, BLOCK_C=bc)
        out.append(_rec("_rotary", ptr, meta, num_warps(bn, bc)))
    return out


_rec = functools.partial(record, "rotary")


# ------------------------------------------------------------------ launcher
def _check(op: str, what: str, x, cos, sin, out_dtype) -> None:
    """The contract's checks (the last line behind fastattn.ops.rotary's validation)."""
    name = f"fastattn.triton.{op}"
    if not all(isinstance(t, torch.Tensor) for t in (x, cos, sin)):
        raise ValueError(f"{name}: {what}, cos and sin must be tensors")
    if x.dim() != 4:
        raise ValueError(f"{name}: {what} must be 4-D [B, H, T, D], got {x.dim()}-D")
    if cos.dim() != 3 or sin.shape != cos.shape:
        raise ValueError(
            f"{name}: cos and sin must be 3-D [Bc, T, R] of one shape, got {tuple(cos.shape)} "
            f"and {tuple(sin.shape)}"
        )
    if cos.dtype != sin.dtype:
        raise ValueError(f"{name}: cos and sin must have one dtype, got {cos.dtype}, {sin.dtype}")
    B, _, T, D = x.shape
    bc, tc, r = cos.shape
    if bc not in (1, B):
        raise ValueError(f"{name}: cos.size(0) must be 1 or B ({B}), got {bc}")
    if tc != T:
        raise ValueError(f"{name}: cos.size(1) must be T ({T}), got {tc}")
    if r % 2 or r < 2 or r > D:
        raise ValueError(
            f"{name}: the rotary dim R = cos.size(2) must be even, >= 2 and <= D ({D}), got {r}"
        )
    dts = (x.dtype, cos.dtype, out_dtype)
    halves = {d for d in dts if d in (torch.bfloat16, torch.float16)}
    if not all(d in _TL for d in dts) or len(halves) > 1:
        raise ValueError(
            f"{name}: {what}, cos / sin and the output must each be float32 or the call's one "
            f"16-bit type (bfloat16 or float16; float64 is not a Triton dtype), got "
            f"{x.dtype}, {cos.dtype} and {out_dtype}"
        )
    if not (x.device == cos.device == sin.device):
        raise ValueError(
            f"{name}: {what}, cos and sin must be on one device, got {x.device}, {cos.device} "
            f"and {sin.device}"
        )
    if x.numel() and (x.stride(3) != 1 or cos.stride(2) != 1 or sin.stride(2) != 1):
        raise ValueError(f"{name}: {what}, cos and sin need a unit last-dim stride")


def _launch(x, cos, sin, out_dtype, backward: bool):
    op, what = ("rotary_bwd", "dy") if backward else ("rotary_fwd", "x")
    _check(op, what, x, cos, sin, out_dtype)
    y = torch.empty_like(x, dtype=out_dtype)
    if y.numel() == 0:
        return y
    B, H, T, D = x.shape
    r = cos.shape[2]
    half = r // 2
    # Row axes (p, q), q fastest: the one x steps through with the smaller stride (a size-1
    # axis is never the fastest: a block then runs over the other one).
    heads_fast = T == 1 or (H > 1 and x.stride(1) <= x.stride(2))
    ax_p, ax_q = (2, 1) if heads_fast else (1, 2)
    size = (B, H, T)

    def strides(t):  # (b, p, q) strides of x / y, or of cos / sin (head stride 0)
        if t.dim() == 3:  # [Bc, T, R]: batch stride 0 for one batch row
            st = (t.stride(0) if t.shape[0] > 1 else 0, 0, t.stride(1))
        else:
            st = t.stride()[:3]
        return st[0], st[ax_p], st[ax_q]

    sx, sy, sc, ss = strides(x), strides(y), strides(cos), strides(sin)
    n = B * H * T
    if n >= 2**31:
        raise ValueError(
            f"fastattn.triton.{op}: B * H * T must be < 2^31 rows (the kernel's int32 row "
            f"index), got {n}"
        )
    bn, bc = block_rows(half), block_cols(half)
    _rotary[(triton.cdiv(n, bn),)](
        x, cos, sin, y, n, size[ax_p], size[ax_q], half, r, D, *sx, *sy, *sc, *ss,
        BACKWARD=backward, BLOCK_N=bn, BLOCK_C=bc, num_warps=num_warps(bn, bc),
    )  # fmt: skip
    return y


class _Triton:
    """The ``triton`` backend for rotary (contract: ``csrc/ops.cpp``)."""

    def fwd(self, x, cos, sin, out_dtype):
        return _launch(x, cos, sin, out_dtype, backward=False)

    def bwd(self, dy, cos, sin, out_dtype):
        return _launch(dy, cos, sin, out_dtype, backward=True)


TRITON = _Triton()
