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
    draw_seed,
    eager_call,
    eager_cpu,
    eager_fast_path,
    fake_from,
    seed_int,
)
from fastattn.ops.attention import dropout_threshold, philox4x32

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


ROW_TAG = 0x4C4E4F52  # the third Philox counter word of row dropout (csrc/cpu/philox.h)


def row_dropout_keep(seed: int, rows: int, cols: int, p: float, device=None) -> Tensor:
    """The keep mask ``[rows, cols]`` (bool) of ``s = dropout(x) + residual``, as every kernel
    draws it: element ``(i, j)`` is word ``(j % 64) // 16`` of Philox4x32-10 (key from ``seed``)
    on the counter ``(i, 16 * (j // 64) + j % 16, ROW_TAG, 0)``; kept iff ``word >> 8 >=
    ceil(p * 2^24)``. One call yields the words of 64 consecutive columns, 16 per word."""
    dev = torch.device("cpu") if device is None else torch.device(device)
    i64 = dict(dtype=torch.int64, device=dev)
    j = torch.arange(cols, **i64)
    c0 = torch.arange(rows, **i64).view(rows, 1).expand(rows, cols)
    c1 = (16 * (j // 64) + j % 16).view(1, cols).expand(rows, cols)
    c2 = torch.full((1, 1), ROW_TAG, **i64).expand(rows, cols)
    c3 = torch.zeros((1, 1), **i64).expand(rows, cols)
    words = torch.stack(philox4x32(c0, c1, c2, c3, int(seed)))  # [4, rows, cols]
    word = torch.gather(words, 0, ((j % 64) // 16).view(1, 1, cols).expand(1, rows, cols))[0]
    return (word >> 8) >= dropout_threshold(p)


class _Reference:
    """The ``reference`` backend: :func:`layer_norm_reference` in float32 (float64 for float64),
    with the backward written out (custom-op bodies run below autograd, so it cannot be
    derived by ``torch.autograd`` here). Follows the kernel contract of ``csrc/ops.cpp``: mixed
    float32 / bfloat16 inputs, ``out_dtype``, row dropout."""

    def fwd(self, x, weight, bias, residual, eps, out_dtype, dropout_p, seed):
        acc = acc_dtype(x.dtype)
        has_sum = residual is not None or dropout_p > 0
        sdt = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
        if has_sum:
            sf = x.to(acc)
            if dropout_p > 0:
                keep = row_dropout_keep(seed, x.shape[0], x.shape[1], dropout_p, x.device)
                sf = torch.where(keep, sf * (1.0 / (1.0 - dropout_p)), 0.0)
            if residual is not None:
                sf = sf + residual.to(acc)
            s = sf.to(sdt)
        else:
            s = x
        sf = s.to(acc)
        mean = sf.mean(-1)
        rstd = torch.rsqrt(sf.var(-1, unbiased=False) + eps)
        w = weight.to(acc) if weight is not None else None
        b = bias.to(acc) if bias is not None else None
        out = layer_norm_reference(sf, (sf.shape[-1],), w, b, eps).to(out_dtype or sdt)
        return out, (s if has_sum else x.new_empty(0)), mean, rstd

    def bwd(
        self, dout, x, weight, mean, rstd, dsum, need_weight_grad, need_bias_grad, need_ds,
        x_dtype, dropout_p, seed,
    ):  # fmt: skip
        acc = acc_dtype(x.dtype)
        xh = (x.to(acc) - mean[:, None]) * rstd[:, None]
        dy = dout.to(acc)
        g = dy * weight.to(acc) if weight is not None else dy
        d = rstd[:, None] * (g - g.mean(-1, keepdim=True) - xh * (g * xh).mean(-1, keepdim=True))
        if dsum is not None:
            d = d + dsum.to(acc)
        xdt = x_dtype or x.dtype
        ds = d.to(x.dtype) if need_ds else x.new_empty(0)
        if need_ds and dropout_p == 0 and xdt == x.dtype:
            dx = x.new_empty(0, dtype=xdt)  # x's gradient is ds
        else:
            if dropout_p > 0:
                keep = row_dropout_keep(seed, x.shape[0], x.shape[1], dropout_p, x.device)
                d = torch.where(keep, d * (1.0 / (1.0 - dropout_p)), 0.0)
            dx = d.to(xdt)
        pdt = weight.dtype if weight is not None else x.dtype
        dw = (dy * xh).sum(0).to(pdt) if need_weight_grad else x.new_empty(0, dtype=pdt)
        db = dy.sum(0).to(pdt) if need_bias_grad else x.new_empty(0, dtype=pdt)
        return ds, dx, dw, db


REFERENCE = _Reference()
NATIVE = NativeKernels("layer_norm")


# ----------------------------------------------------------------------------- declaration
@dataclass(frozen=True)
class LayerNormCase:
    """The facts of one layer_norm call a backend decides on."""

    device_type: str
    dtype: torch.dtype
    cols: int  # the normalised row length M
    mixed: bool = False  # residual, output (or, backward, x's gradient) in another dtype than x
    dropout: bool = False  # s = dropout(x) + residual

    FEATURE_WORDS = {  # for error messages and reports
        "mixed_dtypes": "mixed float32 / bfloat16 inputs and outputs",
        "dropout": "dropout fused into the residual add",
    }

    def features(self) -> set[str]:
        return {n for n, on in (("mixed_dtypes", self.mixed), ("dropout", self.dropout)) if on}


TRITON_MAX_COLS = 65536  # one row per Triton program: a row must fit its block
_CPU = (torch.float32, torch.bfloat16, torch.float64)
_GPU = (torch.float32, torch.bfloat16, torch.float16)
_CPU_FEATURES = frozenset({"mixed_dtypes", "dropout"})
DECL = _dispatch.declare(
    _dispatch.OpDecl(
        name="layer_norm",
        file="layernorm",
        case=LayerNormCase,
        summary="LayerNorm and residual-add + LayerNorm, forward and backward",
        support={
            ("cpu", "cpu"): _dispatch.Support(_CPU, features=_CPU_FEATURES),
            ("cuda", "cuda"): _dispatch.Support(_GPU),
            ("triton", "cuda"): _dispatch.Support(_GPU, max_cols=TRITON_MAX_COLS),
            ("triton", "cpu"): _dispatch.Support(_GPU, max_cols=TRITON_MAX_COLS),
        },
    )
)


def _cpp_path(x: Tensor, m: int, mixed: bool, dropout: bool, *others: Tensor | None) -> bool:
    """The call takes the C++ eager path (``torch.ops.fastattn_C.layer_norm_eager``, the same
    kernels and autograd formula as the custom ops below, one C++ autograd node)."""
    return eager_cpu(x, *others) and _dispatch.cpu_serves(
        "layer_norm",
        (x.dtype, m, mixed, dropout),
        lambda: LayerNormCase(x.device.type, x.dtype, m, mixed, dropout),
    )


def _case(x: Tensor, *others: torch.dtype | None, dropout: bool = False) -> LayerNormCase:
    mixed = any(d is not None and d != x.dtype for d in others)
    return LayerNormCase(x.device.type, x.dtype, x.shape[-1], mixed, dropout)


# ----------------------------------------------------------------------------- custom ops


def _layer_norm_fwd(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    eps: float,
    out_dtype: torch.dtype | None,
    dropout_p: float,
    seed: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x, residual: [N, M]; weight, bias: [M]. Returns (out, dropout(x) + residual or [0],
    mean, rstd); see the contract in ``csrc/ops.cpp``. ``seed``: a 0-dim int64 CPU tensor (so
    that under ``torch.compile`` a fresh seed is drawn inside the graph, without a break), or
    None without dropout."""
    case = _case(
        x, residual.dtype if residual is not None else None, out_dtype, dropout=dropout_p > 0
    )
    args = (x, weight, bias, residual, eps, out_dtype, dropout_p, seed_int(seed))
    return tuple(_dispatch.run("layer_norm", "fwd", x.device, case, None, *args))


layer_norm_fwd = torch.library.custom_op("fastattn::layer_norm_fwd", mutates_args=())(
    _layer_norm_fwd
)


# The dropout mask changes values, not shapes: the fake draws it with seed 0 (a traced seed
# cannot be read); dropout_p itself decides whether the sum is returned.
layer_norm_fwd.register_fake(fake_from(REFERENCE, "fwd", fixed={7: 0}))


def _layer_norm_bwd(
    dout: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    dsum: Tensor | None,
    need_weight_grad: bool,
    need_bias_grad: bool,
    need_ds: bool,
    x_dtype: torch.dtype | None,
    dropout_p: float,
    seed: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (ds (+ dsum) or [0], dx or [0] (= ds), dweight or [0], dbias or [0]);
    ``backend``: the one in force at the forward."""
    args = (dout, x, weight, mean, rstd, dsum, need_weight_grad, need_bias_grad, need_ds,
            x_dtype, dropout_p, seed_int(seed))  # fmt: skip
    case = _case(x, dout.dtype, x_dtype, dropout=dropout_p > 0)
    return tuple(_dispatch.run("layer_norm", "bwd", x.device, case, backend, *args))


layer_norm_bwd = torch.library.custom_op("fastattn::layer_norm_bwd", mutates_args=())(
    _layer_norm_bwd
)
layer_norm_bwd.register_fake(fake_from(REFERENCE, "bwd", trailing=1, fixed={11: 0}))
_bwd_call = eager_call(layer_norm_bwd, _layer_norm_bwd)


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, out_dtype, dropout_p, seed = inputs
    _, s, mean, rstd = output
    # Unused outputs (mean, rstd, and often the sum) get None gradients instead of zeros.
    ctx.set_materialize_grads(False)
    ctx.has_residual = residual is not None
    ctx.has_sum = residual is not None or dropout_p > 0
    ctx.x_dtype, ctx.dropout_p, ctx.seed = x.dtype, dropout_p, seed
    ctx.backend = _dispatch.get_backend()
    ctx.save_for_backward(s if ctx.has_sum else x, weight, mean, rstd)


def _backward(ctx, dout, dsum, _dmean, _drstd):
    xs, weight, mean, rstd = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(xs)
    need_w = weight is not None and ctx.needs_input_grad[1]
    need_b = ctx.needs_input_grad[2]
    need_ds = ctx.has_residual and ctx.needs_input_grad[3]
    ds, dx, dw, db = _bwd_call(
        dout.contiguous(),
        xs,
        weight,
        mean,
        rstd,
        dsum.contiguous() if ctx.has_sum and dsum is not None else None,
        need_w,
        need_b,
        need_ds,
        ctx.x_dtype,
        ctx.dropout_p,
        ctx.seed,
        ctx.backend,
    )
    if need_ds and dx.numel() == 0 and ds.numel() != 0:
        dx = ds  # no mask or dtype change between s and x
    return (
        dx if ctx.needs_input_grad[0] else None,
        (dw if need_w else None),
        (db if need_b else None),
        (ds if need_ds else None),
        None,
        None,
        None,
        None,
    )


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)
_fwd_call = eager_fast_path(layer_norm_fwd, _layer_norm_fwd, _setup_context, _backward)


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


def _check_out_dtype(name: str, x: Tensor, out_dtype: torch.dtype | None) -> None:
    if out_dtype is None:
        return
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        raise TypeError(
            f"{name}: out_dtype must be a floating torch.dtype or None, got {out_dtype!r}"
        )
    if (out_dtype == torch.float64) != (x.dtype == torch.float64):
        raise TypeError(
            f"{name}: out_dtype {out_dtype} with a {x.dtype} input: float64 is not mixed with "
            f"other dtypes"
        )


def layer_norm(
    x: Tensor,
    normalized_shape: _SizeLike,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Drop-in for :func:`torch.nn.functional.layer_norm`, served by the fastest backend.

    ``out_dtype``: the output's dtype (default: the input's), e.g. ``torch.bfloat16`` for a
    float32 residual stream feeding an autocast matmul: the kernel writes it directly, no
    separate cast pass.
    """
    name = "fastattn.layer_norm"
    shape = _validate(name, x, normalized_shape, weight, bias, eps)
    _check_out_dtype(name, x, out_dtype)
    if out_dtype == x.dtype:
        out_dtype = None
    if x.numel() == 0:
        y = layer_norm_reference(x, shape, weight, bias, eps)
        return y.to(out_dtype) if out_dtype is not None else y
    m = math.prod(shape)
    if _cpp_path(x, m, out_dtype is not None, False, weight, bias):
        return torch.ops.fastattn_C.layer_norm_eager(
            x, weight, bias, None, m, float(eps), out_dtype, 0.0, 0
        )[0]
    w = weight.reshape(m) if weight is not None else None
    b = bias.reshape(m) if bias is not None else None
    out = _fwd_call(x.reshape(-1, m), w, b, None, float(eps), out_dtype, 0.0, None)[0]
    return out.view(x.shape)


def add_layer_norm(
    x: Tensor,
    residual: Tensor | None,
    normalized_shape: _SizeLike,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    dropout_p: float = 0.0,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """``s = dropout(x) + residual; return layer_norm(s, ...), s`` in one pass over memory.

    The residual add of a pre-LN transformer block fused with the next LayerNorm (and with the
    sublayer's output dropout: ``dropout_p``, applied to ``x`` only, as
    ``residual + nn.Dropout(p)(x)`` does; pass 0 in evaluation). The mask is Philox4x32-10
    seeded from torch's default generator and regenerated in the backward (nothing stored).

    ``x`` and ``residual`` may differ in dtype (float32 / bfloat16: an autocast sublayer output
    added to a float32 residual stream): ``s`` takes torch's promoted dtype. ``residual=None``
    gives ``s = dropout(x)``. ``out_dtype``: the normalised output's dtype (default: ``s``'s).
    Gradients flow to ``x``, ``residual``, ``weight`` and ``bias``.
    """
    name = "fastattn.add_layer_norm"
    shape = _validate(name, x, normalized_shape, weight, bias, eps)
    if residual is not None:
        check_tensor(name, "residual", residual, floating=True)
        check_same_device(name, ("input", x), ("residual", residual))
        if residual.shape != x.shape:
            raise ValueError(
                f"{name}: residual must have the input's shape {tuple(x.shape)}, "
                f"got {tuple(residual.shape)}"
            )
        if (residual.dtype == torch.float64) != (x.dtype == torch.float64):
            raise TypeError(
                f"{name}: residual is {residual.dtype} and the input {x.dtype}: float64 is not "
                f"mixed with other dtypes"
            )
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"{name}: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name}: dropout_p must be in [0, 1), got {dropout_p}")
    _check_out_dtype(name, x, out_dtype)
    sdt = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    if out_dtype == sdt:
        out_dtype = None
    if x.numel() == 0:
        s = (x + residual) if residual is not None else x.clone()
        y = layer_norm_reference(s, shape, weight, bias, eps)
        return (y.to(out_dtype) if out_dtype is not None else y), s
    m = math.prod(shape)
    p = float(dropout_p)
    mixed = out_dtype is not None or (residual is not None and residual.dtype != x.dtype)
    if _cpp_path(x, m, mixed, p > 0, weight, bias, residual):
        seed = seed_int(draw_seed()) if p > 0 else 0
        out, s = torch.ops.fastattn_C.layer_norm_eager(
            x, weight, bias, residual, m, float(eps), out_dtype, p, seed
        )
        return out, (x if residual is None and p == 0 else s)
    w = weight.reshape(m) if weight is not None else None
    b = bias.reshape(m) if bias is not None else None
    res = residual.reshape(-1, m) if residual is not None else None
    seed = draw_seed() if p > 0 else None
    out, s, _, _ = _fwd_call(x.reshape(-1, m), w, b, res, float(eps), out_dtype, p, seed)
    if residual is None and p == 0:  # the kernel returns no sum: s is x itself
        return out.view(x.shape), x
    return out.view(x.shape), s.view(x.shape)
