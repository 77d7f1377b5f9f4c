"""Rotary position embedding (RoPE) in one pass: reference, validation, custom ops, autograd.

Maths: transformers' ``apply_rotary_pos_emb`` (Llama, Mistral, Qwen2 / 3, Gemma, ...), i.e.
``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x[..., h:], x[..., :h])``, on
the first ``R = cos.shape[-1]`` columns of ``x`` (``R = D`` in those models; ``R < D`` is the
partial rotary of GPT-NeoX / Phi: the other columns pass through). Per row, for ``j < h = R/2``
with ``a = x[j]``, ``b = x[j + h]``:

- forward:  ``y[j] = a c[j] - b s[j]``,  ``y[j + h] = b c[j + h] + a s[j + h]``;
- backward (the transpose, ``x`` = ``dy``): ``dx[j] = a c[j] + b s[j + h]``,
  ``dx[j + h] = b c[j + h] - a s[j]``.

The backward is itself a rotary pass (its transpose is the forward), so the op is twice (and
any number of times) differentiable in ``x``. ``cos`` / ``sin`` are inputs the models compute
without a gradient; where they require one, the call runs on the reference formula (autograd
through torch's own ops), which honours it. The maths runs in float32 (float64 for float64) with
one rounding; transformers' eager formula rounds three times in a 16-bit dtype.

dtypes as transformers' own maths has them: the output is ``promote(x, cos)``. Under CPU
autocast a Llama hands bfloat16 ``q`` / ``k`` (a Linear's output) with float32 ``cos`` /
``sin`` (computed from the float32 hidden states), so the output is float32, as eager's; the
backward then reads float32 ``dy`` and writes the bfloat16 ``dx``. The kernels read and write
those mixed dtypes directly: no cast pass.

Layouts: ``x`` is ``[B, H, T, D]`` with any strides and a unit last stride (``q`` is the
transpose of a ``[B, T, H, D]`` projection output: no copy); the output has ``x``'s layout
(``empty_like``), so the gradient flowing back through that transpose and view is a view too.

Layers, top to bottom:

- :func:`rotary` (one tensor) and :func:`apply_rotary_pos_emb` (q and k, transformers'
  signature): validate, move the head axis to dim 1 (a view), and call the differentiable custom
  op where the kernels' contract covers the call (4-D ``x``, ``cos`` ``[B or 1, T or 1, R]``,
  float32 / one 16-bit dtype / all float64, ``cos`` without a gradient, outside ``torch.func``
  transforms); any other broadcastable call runs :func:`rotary_reference` (the same maths in
  torch ops).
- ``torch.ops.fastattn.rotary_fwd`` / ``rotary_bwd``: ``torch.library`` custom ops; bodies pick an
  implementation through :mod:`fastattn._dispatch` from ``DECL`` below.
- ``NATIVE`` (C++ CPU / CUDA kernels via ``torch.ops.fastattn_C``), ``REFERENCE`` (below) and
  ``fastattn.triton.rotary.TRITON``: the implementations, one contract (``csrc/ops.cpp``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastattn import _dispatch
from fastattn.ops._common import (
    NativeKernels,
    _tracing,
    acc_dtype,
    check_same_device,
    check_tensor,
    needs_grad,
)

_HALF = (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- reference
def rotate_half(x: Tensor) -> Tensor:
    """``cat(-x[..., h:], x[..., :h])``, ``h = x.shape[-1] // 2`` (transformers' helper)."""
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rotary_reference(x: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> Tensor:
    """Plain-PyTorch rotary embedding: the ground truth for tests and the route for calls the
    kernels do not cover. ``cos`` / ``sin`` are unsqueezed at ``unsqueeze_dim`` (the head axis of
    ``x``) and broadcast; their last dim ``R`` rotates the first ``R`` columns of ``x``."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :r], x[..., r:]
    y = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat((y, x_pass.to(y.dtype)), dim=-1)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, out_dtype: torch.dtype, transpose: bool):
    """The contract's formulas on ``x [B, H, T, D]``, ``cos / sin [Bc, T, R]``, in the
    accumulation dtype; output like ``x`` (its strides) in ``out_dtype``."""
    acc = acc_dtype(x.dtype)
    r = cos.shape[-1]
    h = r // 2
    c, s = cos.to(acc)[:, None], sin.to(acc)[:, None]
    xf = x.to(acc)
    a, b = xf[..., :h], xf[..., h:r]
    if transpose:
        y1 = a * c[..., :h] + b * s[..., h:]
        y2 = b * c[..., h:] - a * s[..., :h]
    else:
        y1 = a * c[..., :h] - b * s[..., :h]
        y2 = b * c[..., h:] + a * s[..., h:]
    out = torch.empty_like(x, dtype=out_dtype)
    out[..., :h] = y1
    out[..., h:r] = y2
    out[..., r:] = x[..., r:]
    return out


class _Reference:
    """The ``reference`` backend: the contract's formulas in float32 (float64 for float64)."""

    def fwd(self, x, cos, sin, out_dtype):
        return _rotate(x, cos, sin, out_dtype, transpose=False)

    def bwd(self, dy, cos, sin, out_dtype):
        return _rotate(dy, cos, sin, out_dtype, transpose=True)


REFERENCE = _Reference()
NATIVE = NativeKernels("rotary")


# ----------------------------------------------------------------------------- declaration
@dataclass(frozen=True)
class RotaryCase:
    """The facts of one rotary call a backend decides on."""

    device_type: str
    dtype: torch.dtype  # the call's narrow dtype: its 16-bit type if any, else float32 / float64
    head_dim: int  # D
    rot_dim: int  # R


_CPU = (torch.float32, torch.bfloat16, torch.float64)
_GPU = (torch.float32, torch.bfloat16, torch.float16)
# No limits: rows on a grid axis, any head dim (columns in a loop).
DECL = _dispatch.declare(
    _dispatch.OpDecl(
        name="rotary",
        file="rotary",
        case=RotaryCase,
        summary="x * cos + rotate_half(x) * sin (RoPE, partial rotary), forward and backward",
        support={
            ("cpu", "cpu"): _dispatch.Support(_CPU),
            ("cuda", "cuda"): _dispatch.Support(_GPU),
            ("triton", "cuda"): _dispatch.Support(_GPU),
            ("triton", "cpu"): _dispatch.Support(_GPU),
        },
    )
)


def _call_dtype(*dtypes: torch.dtype) -> torch.dtype:
    half = [d for d in dtypes if d in _HALF]
    return half[0] if half else dtypes[0]


def _case(x: Tensor, cos: Tensor, out_dtype: torch.dtype) -> RotaryCase:
    dtype = _call_dtype(x.dtype, cos.dtype, out_dtype)
    return RotaryCase(x.device.type, dtype, x.shape[-1], cos.shape[-1])


# ----------------------------------------------------------------------------- custom ops
def _run(stage: str, x: Tensor, cos: Tensor, sin: Tensor, out_dtype: torch.dtype, backend):
    case = _case(x, cos, out_dtype)
    return _dispatch.run("rotary", stage, x.device, case, backend, x, cos, sin, out_dtype)


@torch.library.custom_op("fastattn::rotary_fwd", mutates_args=())
def rotary_fwd(x: Tensor, cos: Tensor, sin: Tensor, out_dtype: torch.dtype) -> Tensor:
    """x: [B, H, T, D]; cos, sin: [Bc, T, R]. Returns the rotated x, x's layout, out_dtype."""
    return _run("fwd", x, cos, sin, out_dtype, None)


@torch.library.custom_op("fastattn::rotary_bwd", mutates_args=())
def rotary_bwd(
    dy: Tensor, cos: Tensor, sin: Tensor, out_dtype: torch.dtype, backend: str
) -> Tensor:
    """The transposed rotation of dy (the gradient of x); ``backend``: the forward's."""
    return _run("bwd", dy, cos, sin, out_dtype, backend)


# Outputs have x's layout (empty_like), not the contiguous one of fake_from.
@rotary_fwd.register_fake
def _(x, cos, sin, out_dtype):
    return torch.empty_like(x, dtype=out_dtype)


@rotary_bwd.register_fake
def _(dy, cos, sin, out_dtype, backend):
    return torch.empty_like(dy, dtype=out_dtype)


def _unit_last(t: Tensor) -> Tensor:
    """A gradient as the kernels read it: a unit last stride (``sum().backward()`` hands an
    expanded one, all strides 0)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _setup_fwd(ctx, inputs, output):
    x, cos, sin, _ = inputs
    ctx.in_dtype = x.dtype
    ctx.backend = _dispatch.get_backend()
    ctx.save_for_backward(cos, sin)


def _backward_fwd(ctx, dy):
    cos, sin = ctx.saved_tensors
    return rotary_bwd(_unit_last(dy), cos, sin, ctx.in_dtype, ctx.backend), None, None, None


def _setup_bwd(ctx, inputs, output):
    dy, cos, sin, _, backend = inputs
    ctx.in_dtype = dy.dtype
    ctx.backend = backend
    ctx.save_for_backward(cos, sin)


def _backward_bwd(ctx, ddx):
    # The backward is linear in dy, and its transpose is the forward rotation: double backward.
    cos, sin = ctx.saved_tensors
    with _dispatch.use_backend(ctx.backend):
        return rotary_fwd(_unit_last(ddx), cos, sin, ctx.in_dtype), None, None, None, None


rotary_fwd.register_autograd(_backward_fwd, setup_context=_setup_fwd)
rotary_bwd.register_autograd(_backward_bwd, setup_context=_setup_bwd)


class _Eager(torch.autograd.Function):
    """The eager-mode autograd node (no dispatcher round trips, see
    :func:`fastattn.ops._common.eager_fast_path`). Its backward is another ``_Eager`` call, the
    transposed rotation, so it is differentiable to any order (``create_graph=True``)."""

    @staticmethod
    def forward(ctx, x, cos, sin, out_dtype, transpose, backend):
        ctx.save_for_backward(cos, sin)
        ctx.in_dtype, ctx.transpose, ctx.backend = x.dtype, transpose, backend
        return _run("bwd" if transpose else "fwd", x, cos, sin, out_dtype, backend)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        dx = _Eager.apply(_unit_last(dy), cos, sin, ctx.in_dtype, not ctx.transpose, ctx.backend)
        return dx, None, None, None, None, None


def _kernel(x: Tensor, cos: Tensor, sin: Tensor, out_dtype: torch.dtype) -> Tensor:
    """x [B, H, T, D], cos / sin [Bc, T, R] (the kernels' contract): the custom op while
    tracing, else the eager node (with a gradient) or the body (without)."""
    if _tracing((x, cos, sin)):
        return rotary_fwd(x, cos, sin, out_dtype)
    if needs_grad((x,)):
        return _Eager.apply(x, cos, sin, out_dtype, False, _dispatch.get_backend())
    return _run("fwd", x, cos, sin, out_dtype, None)


# ----------------------------------------------------------------------------- public API
def _kernel_dtypes(x: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """float32 / one 16-bit dtype in any mix, or all float64: what the kernels read."""
    dts = {x.dtype, cos.dtype, sin.dtype}
    if cos.dtype != sin.dtype:
        return False
    if torch.float64 in dts:
        return dts == {torch.float64}
    return len(dts & set(_HALF)) <= 1 and dts <= {torch.float32, *_HALF}


def rotary(x: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> Tensor:
    """Rotary position embedding of one tensor, as transformers' ``apply_rotary_pos_emb`` does
    it to ``q`` or ``k``: ``x * cos + rotate_half(x) * sin`` with ``cos`` / ``sin`` unsqueezed at
    ``unsqueeze_dim`` (the head axis of ``x``), fused into one pass forward and one backward.

    ``x``: ``[B, H, T, D]`` (``unsqueeze_dim=1``) or ``[B, T, H, D]`` (``unsqueeze_dim=2``), any
    strides. ``cos``, ``sin``: ``[B or 1, T, R]`` (transformers' rotary embedding output), ``R``
    even and ``<= D``: the first ``R`` columns rotate, the rest pass through (partial rotary).
    Other shapes that broadcast as transformers' formula broadcasts them run on
    :func:`rotary_reference`, as do ``cos`` / ``sin`` that require a gradient. The output dtype
    is ``promote(x, cos)``, as the formula's; differentiable in ``x`` to any order.
    """
    name = "fastattn.rotary"
    check_tensor(name, "x", x, floating=True)
    check_tensor(name, "cos", cos, floating=True)
    check_tensor(name, "sin", sin, floating=True)
    check_same_device(name, ("x", x), ("cos", cos), ("sin", sin))
    if isinstance(unsqueeze_dim, bool) or not isinstance(unsqueeze_dim, int):
        raise TypeError(f"{name}: unsqueeze_dim must be an int, got {unsqueeze_dim!r}")
    if cos.shape != sin.shape:
        raise ValueError(
            f"{name}: cos and sin must have the same shape, got {tuple(cos.shape)} and "
            f"{tuple(sin.shape)}"
        )
    if x.dim() == 0 or cos.dim() == 0:
        raise ValueError(f"{name}: x and cos need a last (feature) dim, got a scalar")
    r, d = cos.shape[-1], x.shape[-1]
    if r % 2 or r == 0 or r > d:
        raise ValueError(
            f"{name}: cos.shape[-1] (the rotary dim R) must be even, > 0 and <= x.shape[-1] "
            f"({d}), got {r}"
        )
    if not -cos.dim() - 1 <= unsqueeze_dim <= cos.dim():
        raise ValueError(
            f"{name}: unsqueeze_dim must be in [{-cos.dim() - 1}, {cos.dim()}] for cos of "
            f"{cos.dim()} dims, got {unsqueeze_dim}"
        )
    if x.dim() == 4 and cos.dim() == 3 and unsqueeze_dim % 4 in (1, 2):
        # The kernels' case (transformers' q / k): [B, H, T, D] (or [B, T, H, D] at
        # unsqueeze_dim=2) against cos [B or 1, T or 1, R]; checked by hand, as
        # torch.broadcast_shapes costs more than a small kernel.
        ud = unsqueeze_dim % 4
        xk = x if ud == 1 else x.transpose(1, 2)  # [B, H, T, D]
        b, _, t, _ = xk.shape
        if cos.shape[0] in (1, b) and cos.shape[1] in (1, t):
            if (
                x.numel() == 0
                or not _kernel_dtypes(x, cos, sin)
                or needs_grad((cos, sin))
                # torch.func transforms (vmap, grad, jacrev): torch's own ops carry their rules
                or torch._C._functorch.peek_interpreter_stack() is not None
            ):
                return rotary_reference(x, cos, sin, unsqueeze_dim)
            if xk.stride(-1) != 1:
                xk = xk.contiguous()
            if cos.shape[1] != t:  # one position for all: a stride-0 time axis
                cos, sin = cos.expand(cos.shape[0], t, r), sin.expand(cos.shape[0], t, r)
            if cos.stride(-1) != 1 or sin.stride(-1) != 1:
                cos, sin = cos.contiguous(), sin.contiguous()
            y = _kernel(xk, cos, sin, torch.promote_types(x.dtype, cos.dtype))
            return y if ud == 1 else y.transpose(1, 2)
    c_shape = cos.unsqueeze(unsqueeze_dim).shape
    try:
        torch.broadcast_shapes((*x.shape[:-1], r), c_shape)
    except RuntimeError:
        raise ValueError(
            f"{name}: cos / sin of shape {tuple(cos.shape)} unsqueezed at dim {unsqueeze_dim} "
            f"({tuple(c_shape)}) do not broadcast against x {tuple(x.shape)}"
        ) from None
    return rotary_reference(x, cos, sin, unsqueeze_dim)


def apply_rotary_pos_emb(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    position_ids: Tensor | None = None,
    unsqueeze_dim: int = 1,
) -> tuple[Tensor, Tensor]:
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin, position_ids=None,
    unsqueeze_dim=1)``, fused: ``(rotary(q, cos, sin), rotary(k, cos, sin))``. ``position_ids`` is
    unused, as in transformers (the positions are already in ``cos`` / ``sin``)."""
    return rotary(q, cos, sin, unsqueeze_dim), rotary(k, cos, sin, unsqueeze_dim)
