"""Bias + GELU and the GELU feed-forward block: reference, validation, custom ops, autograd.

Maths (elementwise, ``u = x + bias`` with the bias broadcast over the last dim), exactly
:func:`torch.nn.functional.gelu` of ``x + bias``:

- ``approximate="none"``: ``gelu(u) = u * (1 + erf(u / sqrt(2))) / 2``
- ``approximate="tanh"``: ``gelu(u) = u * (1 + tanh(sqrt(2/pi) * (u + 0.044715 u^3))) / 2``

Backward: ``dx = dout * gelu'(u)`` and ``dbias = dx`` summed over every dim but the last, in the
same pass over memory.

Layers, top to bottom:

- :func:`bias_gelu`, :func:`feed_forward`: the public functions. ``bias_gelu`` validates,
  flattens to ``[rows, M]`` and calls the differentiable custom op. ``feed_forward`` is
  ``linear (no bias) -> bias_gelu -> linear``: the matmuls are torch's (best BLAS), the first
  bias and the GELU are one fused pass forward and one backward (which also gives the bias
  gradient), and autograd composes the three through their registered formulas.
- ``torch.ops.fastattn.bias_gelu_fwd`` / ``bias_gelu_bwd``: ``torch.library`` custom ops with
  fakes derived from the reference (for ``torch.compile`` / ``torch.export``) and a registered
  autograd formula. Their bodies pick an implementation through :mod:`fastattn._dispatch` from
  the declaration ``DECL`` below.
- ``NATIVE`` (C++ CPU / CUDA kernels via ``torch.ops.fastattn_C``), ``REFERENCE`` (below, plain
  PyTorch) and ``fastattn.triton.gelu.TRITON``: the implementations, one contract (documented
  in ``csrc/ops.cpp``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn import _dispatch
from fastattn.ops import _gemm
from fastattn.ops._common import (
    NativeKernels,
    acc_dtype,
    check_same_device,
    check_tensor,
    eager_call,
    eager_cpu,
    eager_fast_path,
    fake_from,
)

APPROXIMATIONS = ("none", "tanh")
_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_K = math.sqrt(2.0 / math.pi)
_C = 0.044715


# ----------------------------------------------------------------------------- reference
def bias_gelu_reference(x: Tensor, bias: Tensor | None = None, approximate: str = "none") -> Tensor:
    """Plain-PyTorch ``gelu(x + bias)``: the ground truth for tests, docs and the ``reference``
    backend."""
    u = x + bias if bias is not None else x
    if approximate == "tanh":
        return 0.5 * u * (1.0 + torch.tanh(_K * (u + _C * u * u * u)))
    return 0.5 * u * (1.0 + torch.erf(u * _SQRT_HALF))


def bias_gelu_grad_reference(u: Tensor, approximate: str = "none") -> Tensor:
    """``gelu'(u)``, written out (custom-op bodies run below autograd)."""
    if approximate == "tanh":
        t = torch.tanh(_K * (u + _C * u * u * u))
        return 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * _K * (1.0 + 3.0 * _C * u * u)
    return 0.5 * (1.0 + torch.erf(u * _SQRT_HALF)) + u * torch.exp(-0.5 * u * u) * _INV_SQRT_2PI


class _Reference:
    """The ``reference`` backend: the formulas above in float32 (float64 for float64)."""

    def fwd(self, x, bias, approximate):
        acc = acc_dtype(x.dtype)
        b = bias.to(acc) if bias is not None else None
        return bias_gelu_reference(x.to(acc), b, approximate).to(x.dtype)

    def bwd(self, dout, x, bias, approximate, need_bias_grad):
        acc = acc_dtype(x.dtype)
        u = x.to(acc) + bias.to(acc) if bias is not None else x.to(acc)
        dx = dout.to(acc) * bias_gelu_grad_reference(u, approximate)
        pdt = bias.dtype if bias is not None else x.dtype
        db = dx.sum(0).to(pdt) if need_bias_grad else x.new_empty(0, dtype=pdt)
        return dx.to(x.dtype), db


REFERENCE = _Reference()
NATIVE = NativeKernels("bias_gelu")


# ----------------------------------------------------------------------------- declaration
@dataclass(frozen=True)
class GeluCase:
    """The facts of one bias_gelu call a backend decides on."""

    device_type: str
    dtype: torch.dtype
    cols: int
    approximate: str


_CPU = (torch.float32, torch.bfloat16, torch.float64)
_GPU = (torch.float32, torch.bfloat16, torch.float16)
DECL = _dispatch.declare(
    _dispatch.OpDecl(
        name="bias_gelu",
        file="gelu",
        case=GeluCase,
        summary="bias + GELU (erf or tanh), forward and backward (+ the bias gradient)",
        support={
            ("cpu", "cpu"): _dispatch.Support(_CPU),
            ("cuda", "cuda"): _dispatch.Support(_GPU),
            ("triton", "cuda"): _dispatch.Support(_GPU),
            ("triton", "cpu"): _dispatch.Support(_GPU),
        },
    )
)


def _case(x: Tensor, approximate: str) -> GeluCase:
    return GeluCase(x.device.type, x.dtype, x.shape[-1], approximate)


# ----------------------------------------------------------------------------- custom ops


def _bias_gelu_fwd(x: Tensor, bias: Tensor | None, approximate: str) -> Tensor:
    """x: [N, M]; bias: [M]. Returns gelu(x + bias): [N, M] in x's dtype."""
    return _dispatch.run(
        "bias_gelu", "fwd", x.device, _case(x, approximate), None, x, bias, approximate
    )


bias_gelu_fwd = torch.library.custom_op("fastattn::bias_gelu_fwd", mutates_args=())(_bias_gelu_fwd)
bias_gelu_fwd.register_fake(fake_from(REFERENCE, "fwd"))


def _bias_gelu_bwd(
    dout: Tensor,
    x: Tensor,
    bias: Tensor | None,
    approximate: str,
    need_bias_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Returns (dx [N, M], dbias [M] in the bias's dtype, or [0] when not needed);
    ``backend``: the one in force at the forward."""
    case = _case(x, approximate)
    args = (dout, x, bias, approximate, need_bias_grad)
    return tuple(_dispatch.run("bias_gelu", "bwd", x.device, case, backend, *args))


bias_gelu_bwd = torch.library.custom_op("fastattn::bias_gelu_bwd", mutates_args=())(_bias_gelu_bwd)
bias_gelu_bwd.register_fake(fake_from(REFERENCE, "bwd", trailing=1))
_bwd_call = eager_call(bias_gelu_bwd, _bias_gelu_bwd)


def _setup_context(ctx, inputs, output):
    x, bias, approximate = inputs
    # x (the pre-activation without the bias) is saved, not x + bias: the backward re-adds
    # the bias in registers, so no [N, M] sum is ever stored.
    ctx.approximate = approximate
    ctx.backend = _dispatch.get_backend()
    ctx.save_for_backward(x, bias)


def _backward(ctx, dout):
    x, bias = ctx.saved_tensors
    need_b = bias is not None and ctx.needs_input_grad[1]
    if not (ctx.needs_input_grad[0] or need_b):
        return None, None, None
    dx, db = _bwd_call(dout.contiguous(), x, bias, ctx.approximate, need_b, ctx.backend)
    return (dx if ctx.needs_input_grad[0] else None), (db if need_b else None), None


bias_gelu_fwd.register_autograd(_backward, setup_context=_setup_context)
_fwd_call = eager_fast_path(bias_gelu_fwd, _bias_gelu_fwd, _setup_context, _backward)


# ----------------------------------------------------------------------------- public API
def _check_approximate(name: str, approximate: object) -> str:
    if not isinstance(approximate, str) or approximate not in APPROXIMATIONS:
        raise ValueError(f"{name}: approximate must be 'none' or 'tanh', got {approximate!r}")
    return approximate


def _validate_bias(name: str, what: str, x: Tensor, bias: Tensor | None, m: int) -> None:
    if bias is None:
        return
    check_tensor(name, what, bias, floating=True)
    check_same_device(name, ("input", x), (what, bias))
    if bias.dim() != 1 or bias.shape[0] != m:
        raise ValueError(
            f"{name}: {what} must be 1-D with {m} elements (the input's last dim), "
            f"got shape {tuple(bias.shape)}"
        )
    if bias.dtype not in (x.dtype, torch.float32):
        raise TypeError(
            f"{name}: {what} must have the input's dtype ({x.dtype}) or float32, got {bias.dtype}"
        )


def bias_gelu(x: Tensor, bias: Tensor | None = None, approximate: str = "none") -> Tensor:
    """``F.gelu(x + bias, approximate=approximate)`` in one pass, served by the fastest backend.

    ``x``: any shape ``(..., M)`` with at least one dim; ``bias``: ``(M,)`` or ``None``, of
    ``x``'s dtype or float32. Differentiable in ``x`` and ``bias``; the backward is one pass too.
    """
    name = "fastattn.bias_gelu"
    check_tensor(name, "input", x, floating=True)
    approximate = _check_approximate(name, approximate)
    if x.dim() == 0:
        raise ValueError(f"{name}: input must have at least one dim (the bias dim), got a scalar")
    m = x.shape[-1]
    _validate_bias(name, "bias", x, bias, m)
    if x.numel() == 0:
        return bias_gelu_reference(x, bias, approximate).to(x.dtype)
    if eager_cpu(x, bias) and _dispatch.cpu_serves(
        "bias_gelu", (x.dtype, m, approximate), lambda: _case(x, approximate)
    ):
        # The C++ eager path: the same kernels and autograd formula, one C++ autograd node.
        return torch.ops.fastattn_C.bias_gelu_eager(x, bias, approximate)
    return _fwd_call(x.reshape(-1, m), bias, approximate).view(x.shape)


def feed_forward(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    approximate: str = "none",
) -> Tensor:
    """The GELU MLP of a transformer block: ``gelu(x @ w1.T + b1) @ w2.T + b2``.

    ``x``: ``(..., d_model)``; ``w1``: ``(d_hidden, d_model)``; ``b1``: ``(d_hidden,)``;
    ``w2``: ``(d_model_out, d_hidden)``; ``b2``: ``(d_model_out,)`` (biases may be ``None``);
    the layout of :class:`torch.nn.Linear` weights. The matmuls run on the faster of torch's two
    CPU GEMM paths (:mod:`fastattn.ops._gemm`: oneDNN or MKL, measured per shape); ``+ b1`` and
    the GELU are one fused pass, and so is their backward (``dh = dout * gelu'`` and ``db1``),
    which reads the saved pre-activation ``x @ w1.T``. Without a gradient to keep (inference),
    fc1, its bias and the GELU are one oneDNN call with a GELU epilogue. Under autocast the
    weights are cast as ``F.linear`` casts them; otherwise they must have the input's dtype.
    """
    name = "fastattn.feed_forward"
    check_tensor(name, "input", x, floating=True)
    approximate = _check_approximate(name, approximate)
    autocast = torch.is_autocast_enabled(x.device.type)
    for what, w in (("w1", w1), ("w2", w2)):
        check_tensor(name, what, w, floating=True)
        check_same_device(name, ("input", x), (what, w))
        if w.dim() != 2:
            raise ValueError(
                f"{name}: {what} must be 2-D (out_features, in_features), got {w.dim()}-D"
            )
        if w.dtype != x.dtype and not autocast:
            raise TypeError(
                f"{name}: {what} must have the input's dtype ({x.dtype}), got {w.dtype}"
            )
    if x.dim() == 0 or x.shape[-1] != w1.shape[1]:
        raise ValueError(
            f"{name}: input's last dim must equal w1.shape[1] = {w1.shape[1]} (d_model), "
            f"got input of shape {tuple(x.shape)}"
        )
    if w2.shape[1] != w1.shape[0]:
        raise ValueError(
            f"{name}: w2.shape[1] must equal w1.shape[0] = {w1.shape[0]} (d_hidden), "
            f"got w2 of shape {tuple(w2.shape)}"
        )
    _validate_bias(name, "b1", x, b1, w1.shape[0])
    _validate_bias(name, "b2", x, b2, w2.shape[0])
    if x.numel() == 0:
        return F.linear(bias_gelu_reference(F.linear(x, w1, b1), None, approximate), w2, b2)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w1, b1)
    )
    h = None if needs_grad else _gemm.linear_gelu(x, w1, b1, approximate)
    if h is None:
        u = _gemm.linear(x, w1)  # (..., d_hidden), the pre-activation without its bias
        h = bias_gelu(u, b1, approximate)  # a float32 b1 is read as is under autocast
    return _gemm.linear(h, w2, b2)
