"""LayerNorm and residual-add + LayerNorm: reference, validation, custom ops, autograd.

Maths (per row of the last ``len(normalized_shape)`` dims, flattened to M values):
``s = x (+ residual)``, ``y = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias`` with the
biased variance, exactly :func:`torch.nn.functional.layer_norm`.

Layers, top to bottom:

- :func:`layer_norm`, :func:`add_layer_norm`: the public functions. They validate, flatten to
  ``[rows, M]`` and call the differentiable custom op.
- ``torch.ops.fastattn.layer_norm_fwd`` / ``layer_norm_bwd``: ``torch.library`` custom ops with
  fakes derived from the reference (for ``torch.compile`` / ``torch.export``) and a registered
  autograd formula. Their bodies pick an implementation through :mod:`fastattn._dispatch` from
  the declaration ``DECL`` below (which backend serves which dtypes and sizes).
- ``NATIVE`` (C++ CPU / CUDA kernels via ``torch.ops.fastattn_C``), ``REFERENCE`` (below, plain
  PyTorch) and ``fastattn.triton.layernorm.TRITON``: the implementations, one contract
  (documented in ``csrc/ops.cpp``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fastattn import _dispatch
from fastattn.ops._common import (
    NativeKernels,
    acc_dtype,
    check_same_device,
    check_tensor,
    fake_from,
)

_SizeLike = int | Sequence[int] | torch.Size


# ----------------------------------------------------------------------------- reference
def layer_norm_reference(
    x: Tensor,
    normalized_shape: _SizeLike,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Plain-PyTorch LayerNorm: the ground truth for tests, docs and the ``reference`` backend."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    dims = tuple(range(-len(shape), 0))
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


class _Reference:
    """The ``reference`` backend: :func:`layer_norm_reference` in float32 (float64 for float64),
    with the backward written out (custom-op bodies run below autograd, so it cannot be
    derived by ``torch.autograd`` here)."""

    def fwd(self, x, weight, bias, residual, eps):
        acc = acc_dtype(x.dtype)
        s = x + residual if residual is not None else x
        sf = s.to(acc)
        mean = sf.mean(-1)
        rstd = torch.rsqrt(sf.var(-1, unbiased=False) + eps)
        w = weight.to(acc) if weight is not None else None
        b = bias.to(acc) if bias is not None else None
        out = layer_norm_reference(sf, (sf.shape[-1],), w, b, eps).to(x.dtype)
        return out, (s if residual is not None else x.new_empty(0)), mean, rstd

    def bwd(self, dout, x, weight, mean, rstd, dsum, need_weight_grad, need_bias_grad):
        acc = acc_dtype(x.dtype)
        xh = (x.to(acc) - mean[:, None]) * rstd[:, None]
        dy = dout.to(acc)
        g = dy * weight.to(acc) if weight is not None else dy
        dx = rstd[:, None] * (g - g.mean(-1, keepdim=True) - xh * (g * xh).mean(-1, keepdim=True))
        if dsum is not None:
            dx = dx + dsum.to(acc)
        pdt = weight.dtype if weight is not None else x.dtype
        dw = (dy * xh).sum(0).to(pdt) if need_weight_grad else x.new_empty(0, dtype=pdt)
        db = dy.sum(0).to(pdt) if need_bias_grad else x.new_empty(0, dtype=pdt)
        return dx.to(x.dtype), dw, db


REFERENCE = _Reference()
NATIVE = NativeKernels("layer_norm")


# ----------------------------------------------------------------------------- declaration
@dataclass(frozen=True)
class LayerNormCase:
    """The facts of one layer_norm call a backend decides on."""

    device_type: str
    dtype: torch.dtype
    cols: int  # the normalised row length M


TRITON_MAX_COLS = 65536  # one row per Triton program: a row must fit its block
_CPU = (torch.float32, torch.bfloat16, torch.float64)
_GPU = (torch.float32, torch.bfloat16, torch.float16)
DECL = _dispatch.declare(
    _dispatch.OpDecl(
        name="layer_norm",
        file="layernorm",
        case=LayerNormCase,
        summary="LayerNorm and residual-add + LayerNorm, forward and backward",
        support={
            ("cpu", "cpu"): _dispatch.Support(_CPU),
            ("cuda", "cuda"): _dispatch.Support(_GPU),
            ("triton", "cuda"): _dispatch.Support(_GPU, max_cols=TRITON_MAX_COLS),
            ("triton", "cpu"): _dispatch.Support(_GPU, max_cols=TRITON_MAX_COLS),
        },
    )
)


def _case(x: Tensor) -> LayerNormCase:
    return LayerNormCase(x.device.type, x.dtype, x.shape[-1])


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastattn::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x, residual: [N, M]; weight, bias: [M]. Returns (out, x+residual or [0], mean, rstd)."""
    return tuple(
        _dispatch.run("layer_norm", "fwd", x.device, _case(x), None, x, weight, bias, residual, eps)
    )


layer_norm_fwd.register_fake(fake_from(REFERENCE, "fwd"))


@torch.library.custom_op("fastattn::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(
    dout: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    dsum: Tensor | None,
    need_weight_grad: bool,
    need_bias_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx (+ dsum), dweight or [0], dbias or [0]); ``backend``: the one in force at
    the forward."""
    args = (dout, x, weight, mean, rstd, dsum, need_weight_grad, need_bias_grad)
    return tuple(_dispatch.run("layer_norm", "bwd", x.device, _case(x), backend, *args))


layer_norm_bwd.register_fake(fake_from(REFERENCE, "bwd", trailing=1))


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps = inputs
    _, s, mean, rstd = output
    # Unused outputs (mean, rstd, and often the sum) get None gradients instead of zeros.
    ctx.set_materialize_grads(False)
    ctx.has_residual = residual is not None
    ctx.backend = _dispatch.get_backend()
    ctx.save_for_backward(s if residual is not None else x, weight, mean, rstd)


def _backward(ctx, dout, dsum, _dmean, _drstd):
    xs, weight, mean, rstd = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(xs)
    need_w = weight is not None and ctx.needs_input_grad[1]
    need_b = ctx.needs_input_grad[2]
    dx, dw, db = layer_norm_bwd(
        dout.contiguous(),
        xs,
        weight,
        mean,
        rstd,
        dsum.contiguous() if ctx.has_residual and dsum is not None else None,
        need_w,
        need_b,
        ctx.backend,
    )
    return (
        dx,
        (dw if need_w else None),
        (db if need_b else None),
        (dx if ctx.has_residual else None),
        None,
    )


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API
def _validate(
    name: str,
    x: Tensor,
    normalized_shape: _SizeLike,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[int, ...]:
    check_tensor(name, "input", x, floating=True)
    if isinstance(normalized_shape, (bool, str, bytes)):
        raise TypeError(
            f"{name}: normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}"
        )
    if isinstance(normalized_shape, int):
        shape = (normalized_shape,)
    else:
        try:
            shape = tuple(int(d) for d in normalized_shape)
        except TypeError:
            raise TypeError(
                f"{name}: normalized_shape must be an int or a sequence of ints, "
                f"got {type(normalized_shape).__name__}"
            ) from None
    if len(shape) == 0 or any(d < 0 for d in shape):
        raise ValueError(
            f"{name}: normalized_shape must be non-empty and non-negative, got {shape}"
        )
    if x.dim() < len(shape) or tuple(x.shape[-len(shape) :]) != shape:
        raise ValueError(
            f"{name}: normalized_shape {shape} must equal the last {len(shape)} dims of the "
            f"input, which has shape {tuple(x.shape)}"
        )
    for pname, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        check_tensor(name, pname, p, floating=True)
        check_same_device(name, ("input", x), (pname, p))
        if tuple(p.shape) != shape:
            raise ValueError(
                f"{name}: {pname} must have shape normalized_shape={shape}, got {tuple(p.shape)}"
            )
        if p.dtype not in (x.dtype, torch.float32):
            raise TypeError(
                f"{name}: {pname} must have the input's dtype ({x.dtype}) or float32, got {p.dtype}"
            )
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{name}: eps must be a finite float >= 0, got {eps!r}")
    return shape


def layer_norm(
    x: Tensor,
    normalized_shape: _SizeLike,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Drop-in for :func:`torch.nn.functional.layer_norm`, served by the fastest backend."""
    shape = _validate("fastattn.layer_norm", x, normalized_shape, weight, bias, eps)
    if x.numel() == 0:
        return layer_norm_reference(x, shape, weight, bias, eps)
    m = math.prod(shape)
    w = weight.reshape(m) if weight is not None else None
    b = bias.reshape(m) if bias is not None else None
    out = layer_norm_fwd(x.reshape(-1, m), w, b, None, float(eps))[0]
    return out.view(x.shape)


def add_layer_norm(
    x: Tensor,
    residual: Tensor,
    normalized_shape: _SizeLike,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """``s = x + residual; return layer_norm(s, ...), s`` in one pass over memory.

    The sum is returned in the input's dtype (it is the new residual stream of a pre-LN
    transformer block); gradients flow to both ``x`` and ``residual``.
    """
    name = "fastattn.add_layer_norm"
    shape = _validate(name, x, normalized_shape, weight, bias, eps)
    check_tensor(name, "residual", residual, floating=True)
    check_same_device(name, ("input", x), ("residual", residual))
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"{name}: residual must match the input's shape and dtype {tuple(x.shape)}/{x.dtype}, "
            f"got {tuple(residual.shape)}/{residual.dtype}"
        )
    if x.numel() == 0:
        s = x + residual
        return layer_norm_reference(s, shape, weight, bias, eps), s
    m = math.prod(shape)
    w = weight.reshape(m) if weight is not None else None
    b = bias.reshape(m) if bias is not None else None
    out, s, _, _ = layer_norm_fwd(x.reshape(-1, m), w, b, residual.reshape(-1, m), float(eps))
    return out.view(x.shape), s.view(x.shape)
