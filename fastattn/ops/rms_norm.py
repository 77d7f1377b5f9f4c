"""RMSNorm and residual-add + RMSNorm: reference, validation, custom ops, autograd.

Maths (per row of the last ``len(normalized_shape)`` dims, flattened to M values), in float32
(float64 for float64 inputs), the output in the input's dtype:

- ``s = x (+ residual)`` (the sum rounded to the input's dtype: it is the caller's new residual
  stream), ``rstd = 1 / sqrt(mean(s^2) + eps)``, ``xhat = s * rstd``,
  ``y = xhat * (weight + weight_offset)``; exactly :func:`torch.nn.functional.rms_norm` for
  ``weight_offset=0`` (``eps=None``: the eps of the accumulation dtype, as torch does:
  ``torch.finfo(torch.float32).eps`` for float16 / bfloat16 / float32 inputs, float64's for
  float64).
- ``weight_offset=1.0`` is Gemma's ``(1 + weight)`` scaling (``GemmaRMSNorm``).
- ``cast_before_weight=True`` rounds ``xhat`` to the input's dtype before the weight multiply,
  as ``LlamaRMSNorm`` does (``weight * xhat.to(input_dtype)``): in bfloat16 that rounds twice.
  A no-op for float32 / float64.
- Backward with ``g = dout * (weight + weight_offset)`` (``g = dout`` without a weight):
  ``dx = rstd * (g - xhat * mean(g * xhat))`` (``+ dsum``, the gradient reaching ``s``
  directly); ``dweight = sum over rows of dout * xhat`` (``xhat`` rounded as the forward used
  it), deterministic (per-chunk partial sums added in a fixed order, as layer_norm).

Layers, as in :mod:`fastattn.ops.layernorm`: :func:`rms_norm` / :func:`add_rms_norm` validate
and flatten to ``[rows, M]``; ``torch.ops.fastattn.rms_norm_fwd`` / ``rms_norm_bwd`` are the
custom ops (fakes from the reference, registered autograd) whose bodies dispatch on ``DECL``;
``NATIVE`` (C++ / CUDA), ``REFERENCE`` (below) and ``fastattn.triton.rms_norm.TRITON`` implement
the one contract documented in ``csrc/ops.cpp``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fastattn import _dispatch
from fastattn.ops._common import (
    NativeKernels,
    acc_dtype,
    check_same_device,
    check_tensor,
    eager_cpu,
    fake_from,
)
from fastattn.ops.layernorm import _SizeLike
from fastattn.ops.layernorm import _validate as _validate_shape


# ----------------------------------------------------------------------------- reference
def rms_norm_reference(
    x: Tensor,
    normalized_shape: _SizeLike,
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    weight_offset: float = 0.0,
    cast_before_weight: bool = False,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Plain-PyTorch RMSNorm: the ground truth for tests, docs and the ``reference`` backend.

    Computes in ``x``'s dtype; ``cast_before_weight`` rounds ``xhat`` to ``dtype`` (the caller's
    input dtype, when ``x`` was upcast) before the weight multiply."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    dims = tuple(range(-len(shape), 0))
    if eps is None:
        eps = torch.finfo(acc_dtype(dtype or x.dtype)).eps
    y = x * torch.rsqrt((x * x).mean(dims, keepdim=True) + eps)
    if cast_before_weight and dtype is not None:
        y = y.to(dtype).to(x.dtype)
    if weight is not None:
        y = y * (weight + weight_offset) if weight_offset else y * weight
    return y


class _Reference:
    """The ``reference`` backend: :func:`rms_norm_reference` in float32 (float64 for float64),
    with the backward written out (custom-op bodies run below autograd)."""

    def fwd(self, x, weight, residual, eps, weight_offset, cast_before_weight):
        acc = acc_dtype(x.dtype)
        s = x + residual if residual is not None else x
        sf = s.to(acc)
        rstd = torch.rsqrt((sf * sf).mean(-1) + eps)
        w = weight.to(acc) if weight is not None else None
        out = rms_norm_reference(
            sf,
            (sf.shape[-1],),
            w,
            eps,
            weight_offset=weight_offset,
            cast_before_weight=cast_before_weight,
            dtype=x.dtype,
        ).to(x.dtype)
        return out, (s if residual is not None else x.new_empty(0)), rstd

    def bwd(self, dout, x, weight, rstd, dsum, weight_offset, cast_before_weight, need_weight_grad):
        acc = acc_dtype(x.dtype)
        xh = x.to(acc) * rstd[:, None]
        dy = dout.to(acc)
        g = dy * (weight.to(acc) + weight_offset) if weight is not None else dy
        dx = rstd[:, None] * (g - xh * (g * xh).mean(-1, keepdim=True))
        if dsum is not None:
            dx = dx + dsum.to(acc)
        pdt = weight.dtype if weight is not None else x.dtype
        if need_weight_grad:
            xw = xh.to(x.dtype).to(acc) if cast_before_weight else xh
            dw = (dy * xw).sum(0).to(pdt)
        else:
            dw = x.new_empty(0, dtype=pdt)
        return dx.to(x.dtype), dw


REFERENCE = _Reference()
NATIVE = NativeKernels("rms_norm")


# ----------------------------------------------------------------------------- declaration
@dataclass(frozen=True)
class RMSNormCase:
    """The facts of one rms_norm call a backend decides on (every kernel serves the offset,
    the cast mode and the residual, so they are not part of the case)."""

    device_type: str
    dtype: torch.dtype
    cols: int  # the normalised row length M


# One row per Triton program, held whole in its block: at 16384+ columns ptxas spilled the
# backward (212 B to 8 KB on sm_80, scripts/triton_aot.py) and at 65536 the forward; longer
# rows go to the CUDA kernel (no limit) under `auto`.
TRITON_MAX_COLS = 8192
_CPU = (torch.float32, torch.bfloat16, torch.float64)
_GPU = (torch.float32, torch.bfloat16, torch.float16)
DECL = _dispatch.declare(
    _dispatch.OpDecl(
        name="rms_norm",
        file="rms_norm",
        case=RMSNormCase,
        summary="RMSNorm and residual-add + RMSNorm (weight offset, Llama cast), fwd and bwd",
        support={
            ("cpu", "cpu"): _dispatch.Support(_CPU),
            ("cuda", "cuda"): _dispatch.Support(_GPU),
            ("triton", "cuda"): _dispatch.Support(_GPU, max_cols=TRITON_MAX_COLS),
            ("triton", "cpu"): _dispatch.Support(_GPU, max_cols=TRITON_MAX_COLS),
        },
    )
)


def _case(x: Tensor) -> RMSNormCase:
    return RMSNormCase(x.device.type, x.dtype, x.shape[-1])


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fastattn::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(
    x: Tensor,
    weight: Tensor | None,
    residual: Tensor | None,
    eps: float,
    weight_offset: float,
    cast_before_weight: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """x, residual: [N, M]; weight: [M]. Returns (out, x+residual or [0], rstd)."""
    args = (x, weight, residual, eps, weight_offset, cast_before_weight)
    return tuple(_dispatch.run("rms_norm", "fwd", x.device, _case(x), None, *args))


rms_norm_fwd.register_fake(fake_from(REFERENCE, "fwd"))


@torch.library.custom_op("fastattn::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(
    dout: Tensor,
    x: Tensor,
    weight: Tensor | None,
    rstd: Tensor,
    dsum: Tensor | None,
    weight_offset: float,
    cast_before_weight: bool,
    need_weight_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Returns (dx (+ dsum), dweight or [0]); ``backend``: the one in force at the forward."""
    args = (dout, x, weight, rstd, dsum, weight_offset, cast_before_weight, need_weight_grad)
    return tuple(_dispatch.run("rms_norm", "bwd", x.device, _case(x), backend, *args))


rms_norm_bwd.register_fake(fake_from(REFERENCE, "bwd", trailing=1))


def _setup_context(ctx, inputs, output):
    x, weight, residual, eps, weight_offset, cast_before_weight = inputs
    _, s, rstd = output
    ctx.set_materialize_grads(False)  # rstd (and often the sum) get None gradients
    ctx.has_residual = residual is not None
    ctx.weight_offset = weight_offset
    ctx.cast_before_weight = cast_before_weight
    ctx.backend = _dispatch.get_backend()
    ctx.save_for_backward(s if residual is not None else x, weight, rstd)


def _backward(ctx, dout, dsum, _drstd):
    xs, weight, rstd = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(xs)
    need_w = weight is not None and ctx.needs_input_grad[1]
    dx, dw = rms_norm_bwd(
        dout.contiguous(),
        xs,
        weight,
        rstd,
        dsum.contiguous() if ctx.has_residual and dsum is not None else None,
        ctx.weight_offset,
        ctx.cast_before_weight,
        need_w,
        ctx.backend,
    )
    return dx, (dw if need_w else None), (dx if ctx.has_residual else None), None, None, None


rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API
def _cpp_path(x: Tensor, m: int, *others: Tensor | None) -> bool:
    """The call takes the C++ eager path (``torch.ops.fastattn_C.rms_norm_eager``: the same
    kernels and autograd formula as the custom ops above, one C++ autograd node)."""
    return eager_cpu(x, *others) and _dispatch.cpu_serves(
        "rms_norm", (x.dtype, m), lambda: RMSNormCase(x.device.type, x.dtype, m)
    )


def _validate(
    name: str,
    x: Tensor,
    normalized_shape: _SizeLike,
    weight: Tensor | None,
    eps: float | None,
    weight_offset: float,
    cast_before_weight: bool,
) -> tuple[tuple[int, ...], float]:
    """The shape checks of layer_norm (one wording for both norms), then RMSNorm's own."""
    check_tensor(name, "input", x, floating=True)
    if eps is None:  # torch's default: the accumulation dtype's eps (float32 for half types)
        eps = torch.finfo(acc_dtype(x.dtype)).eps
    if weight is not None:
        check_tensor(name, "weight", weight, floating=True)
        weight = _weight(weight, x)
    shape = _validate_shape(name, x, normalized_shape, weight, None, eps)
    if isinstance(weight_offset, bool) or not isinstance(weight_offset, (int, float)):
        raise TypeError(f"{name}: weight_offset must be a float, got {weight_offset!r}")
    if not math.isfinite(weight_offset):
        raise ValueError(f"{name}: weight_offset must be finite, got {weight_offset!r}")
    if weight_offset != 0 and weight is None:
        raise ValueError(f"{name}: weight_offset={weight_offset} needs a weight (got None)")
    if not isinstance(cast_before_weight, bool):
        raise TypeError(f"{name}: cast_before_weight must be a bool, got {cast_before_weight!r}")
    return shape, float(eps)


def rms_norm(
    x: Tensor,
    normalized_shape: _SizeLike,
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    weight_offset: float = 0.0,
    cast_before_weight: bool = False,
) -> Tensor:
    """Drop-in for :func:`torch.nn.functional.rms_norm`, served by the fastest backend.

    ``weight_offset``: scale by ``weight + weight_offset`` (1.0: Gemma's ``1 + weight``).
    ``cast_before_weight``: round the normalised value to ``x``'s dtype before the weight
    multiply (``LlamaRMSNorm``'s ``weight * xhat.to(input_dtype)``). The output is in ``x``'s
    dtype; the weight may be of ``x``'s dtype or float32 (others are converted to ``x``'s).
    """
    name = "fastattn.rms_norm"
    shape, eps = _validate(
        name, x, normalized_shape, weight, eps, weight_offset, cast_before_weight
    )
    if x.numel() == 0:
        return _empty_reference(x, shape, weight, eps, weight_offset, cast_before_weight)
    m = math.prod(shape)
    if _cpp_path(x, m, weight):
        w = _weight(weight, x)
        return torch.ops.fastattn_C.rms_norm_eager(
            x, w, None, m, eps, float(weight_offset), cast_before_weight
        )[0]
    w = _weight(weight, x, m)
    out = rms_norm_fwd(x.reshape(-1, m), w, None, eps, float(weight_offset), cast_before_weight)[0]
    return out.view(x.shape)


def add_rms_norm(
    x: Tensor,
    residual: Tensor,
    normalized_shape: _SizeLike,
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    weight_offset: float = 0.0,
    cast_before_weight: bool = False,
) -> tuple[Tensor, Tensor]:
    """``s = x + residual; return rms_norm(s, ...), s`` in one pass over memory.

    The sum is returned in the input's dtype (the new residual stream of a pre-norm block);
    gradients flow to both ``x`` and ``residual``.
    """
    name = "fastattn.add_rms_norm"
    shape, eps = _validate(
        name, x, normalized_shape, weight, eps, weight_offset, cast_before_weight
    )
    check_tensor(name, "residual", residual, floating=True)
    check_same_device(name, ("input", x), ("residual", residual))
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"{name}: residual must match the input's shape and dtype {tuple(x.shape)}/{x.dtype}, "
            f"got {tuple(residual.shape)}/{residual.dtype}"
        )
    if x.numel() == 0:
        s = x + residual
        return _empty_reference(s, shape, weight, eps, weight_offset, cast_before_weight), s
    m = math.prod(shape)
    if _cpp_path(x, m, weight, residual):
        return torch.ops.fastattn_C.rms_norm_eager(
            x, _weight(weight, x), residual, m, eps, float(weight_offset), cast_before_weight
        )
    w = _weight(weight, x, m)
    out, s, _ = rms_norm_fwd(
        x.reshape(-1, m), w, residual.reshape(-1, m), eps, float(weight_offset), cast_before_weight
    )
    return out.view(x.shape), s.view(x.shape)


def _weight(weight: Tensor | None, x: Tensor, m: int | None = None) -> Tensor | None:
    """The weight as the kernels take it: x's dtype or float32 (float64 for float64 inputs).
    torch allows any mix and gives the output x's dtype; the kernels read the weight in the
    accumulation dtype anyway, so another dtype is converted (exactly, for the half types)."""
    if weight is None:
        return None
    if weight.dtype not in (x.dtype, torch.float32):
        weight = weight.to(acc_dtype(x.dtype))  # differentiable: dweight in the caller's dtype
    return weight.reshape(m) if m is not None else weight


def _empty_reference(x, shape, weight, eps, weight_offset, cast_before_weight):
    w = _weight(weight, x)
    return rms_norm_reference(
        x, shape, w, eps, weight_offset=weight_offset, cast_before_weight=cast_before_weight
    )
