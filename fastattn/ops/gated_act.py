"""Gated activations (SwiGLU, GeGLU) and the gated feed-forward block: reference, validation,
custom ops, autograd.

Maths (elementwise on ``g = gate``, ``u = up``), exactly ``act(gate) * up`` of PyTorch's own
activation:

- ``activation="silu"`` (SwiGLU, Llama / Mistral / Qwen2): ``act(g) = g * sigmoid(g)``
  (:func:`torch.nn.functional.silu`);
- ``"gelu"`` (GeGLU, erf): ``act(g) = g * (1 + erf(g / sqrt 2)) / 2``;
- ``"gelu_tanh"`` (GeGLU, Gemma's ``gelu_pytorch_tanh``):
  ``act(g) = g * (1 + tanh(sqrt(2/pi) * (g + 0.044715 g^3))) / 2``.

``h = act(g) * u``. Backward: ``dgate = dh * u * act'(g)``, ``dup = dh * act(g)``: one pass that
reads ``dh``, ``g`` and ``u`` and recomputes the activation (only the inputs are saved).
``act'`` is ``s * (1 + g * (1 - s))`` with ``s = sigmoid(g)`` for silu, and the GELU derivatives
of :mod:`fastattn.ops.gelu`.

Layouts: ``gate`` and ``up`` may be any views with a unit last-dim stride, e.g. the two halves of
one fused projection ``x @ [Wg; Wu].T`` chunked on the last dim (no copy). The packed form
(``up=None``: ``gate`` holds ``[gate | up]`` on its last dim, as Phi-3's ``gate_up_proj`` output)
also takes its backward in one packed gradient, which the fused projection's backward reads
without a concatenation.

Layers, top to bottom:

- :func:`swiglu`, :func:`geglu`, :func:`gated_act`, :func:`gated_feed_forward`: the public
  functions. They validate, flatten to ``[rows, H]`` (a view where the layout allows) and call
  the differentiable custom op. ``gated_feed_forward`` is ``linear -> gated activation ->
  linear``: the matmuls are torch's, the activation and its backward one pass each.
- ``torch.ops.fastattn.gated_act_fwd`` / ``gated_act_bwd``: ``torch.library`` custom ops with
  fakes derived from the reference and a registered autograd formula; their bodies pick an
  implementation through :mod:`fastattn._dispatch` from ``DECL`` below.
- ``NATIVE`` (C++ CPU / CUDA kernels via ``torch.ops.fastattn_C``), ``REFERENCE`` (below) and
  ``fastattn.triton.gated_act.TRITON``: the implementations, one contract (``csrc/ops.cpp``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastattn import _dispatch
from fastattn.ops import _gemm
from fastattn.ops._common import (
    NativeKernels,
    acc_dtype,
    check_same_device,
    check_tensor,
    eager_cpu,
    fake_from,
)
from fastattn.ops.gelu import bias_gelu_grad_reference, bias_gelu_reference

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
_GELU_APPROX = {"gelu": "none", "gelu_tanh": "tanh"}


# ----------------------------------------------------------------------------- reference
def act_reference(g: Tensor, activation: str) -> Tensor:
    """``act(g)``, plain PyTorch."""
    if activation == "silu":
        return g * torch.sigmoid(g)
    return bias_gelu_reference(g, None, _GELU_APPROX[activation])


def act_grad_reference(g: Tensor, activation: str) -> Tensor:
    """``act'(g)``, written out (custom-op bodies run below autograd)."""
    if activation == "silu":
        s = torch.sigmoid(g)
        return s * (1.0 + g * (1.0 - s))
    return bias_gelu_grad_reference(g, _GELU_APPROX[activation])


def gated_act_reference(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    """Plain-PyTorch ``act(gate) * up``: the ground truth for tests, docs and the ``reference``
    backend."""
    return act_reference(gate, activation) * up


def _split(gate: Tensor, up: Tensor | None) -> tuple[Tensor, Tensor]:
    """(gate, up) views: from the packed ``[N, 2H]`` gate when ``up`` is None."""
    if up is not None:
        return gate, up
    h = gate.shape[-1] // 2
    return gate[..., :h], gate[..., h:]


class _Reference:
    """The ``reference`` backend: the formulas above in float32 (float64 for float64)."""

    def fwd(self, gate, up, activation):
        g, u = _split(gate, up)
        acc = acc_dtype(g.dtype)
        return gated_act_reference(g.to(acc), u.to(acc), activation).to(g.dtype)

    def bwd(self, dh, gate, up, activation):
        g, u = _split(gate, up)
        acc = acc_dtype(g.dtype)
        g32, u32, d32 = g.to(acc), u.to(acc), dh.to(acc)
        dgate = (d32 * u32 * act_grad_reference(g32, activation)).to(g.dtype)
        dup = (d32 * act_reference(g32, activation)).to(g.dtype)
        if up is None:  # packed: one [N, 2H] gradient
            return torch.cat([dgate, dup], -1), g.new_empty(0)
        return dgate, dup


REFERENCE = _Reference()
NATIVE = NativeKernels("gated_act")


# ----------------------------------------------------------------------------- declaration
@dataclass(frozen=True)
class GatedActCase:
    """The facts of one gated_act call a backend decides on."""

    device_type: str
    dtype: torch.dtype
    cols: int  # H, the width of the activation
    activation: str
    packed: bool


_CPU = (torch.float32, torch.bfloat16, torch.float64)
_GPU = (torch.float32, torch.bfloat16, torch.float16)
# No limits: elementwise kernels with rows and columns on grid axes (any H, any row stride).
DECL = _dispatch.declare(
    _dispatch.OpDecl(
        name="gated_act",
        file="gated_act",
        case=GatedActCase,
        summary="act(gate) * up (SwiGLU, GeGLU erf / tanh), forward and backward",
        support={
            ("cpu", "cpu"): _dispatch.Support(_CPU),
            ("cuda", "cuda"): _dispatch.Support(_GPU),
            ("triton", "cuda"): _dispatch.Support(_GPU),
            ("triton", "cpu"): _dispatch.Support(_GPU),
        },
    )
)


def _case(gate: Tensor, up: Tensor | None, activation: str) -> GatedActCase:
    cols = gate.shape[-1] if up is not None else gate.shape[-1] // 2
    return GatedActCase(gate.device.type, gate.dtype, cols, activation, up is None)


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fastattn::gated_act_fwd", mutates_args=())
def gated_act_fwd(gate: Tensor, up: Tensor | None, activation: str) -> Tensor:
    """gate, up: [N, H] (or gate [N, 2H] packed, up None). Returns act(gate) * up: [N, H]."""
    case = _case(gate, up, activation)
    return _dispatch.run("gated_act", "fwd", gate.device, case, None, gate, up, activation)


gated_act_fwd.register_fake(fake_from(REFERENCE, "fwd"))


@torch.library.custom_op("fastattn::gated_act_bwd", mutates_args=())
def gated_act_bwd(
    dh: Tensor, gate: Tensor, up: Tensor | None, activation: str, backend: str
) -> tuple[Tensor, Tensor]:
    """Returns (dgate [N, H], dup [N, H]), or packed (no up): (dgate|dup [N, 2H], [0]);
    ``backend``: the one in force at the forward."""
    case = _case(gate, up, activation)
    return tuple(
        _dispatch.run("gated_act", "bwd", gate.device, case, backend, dh, gate, up, activation)
    )


gated_act_bwd.register_fake(fake_from(REFERENCE, "bwd", trailing=1))


def _setup_context(ctx, inputs, output):
    gate, up, activation = inputs
    # The inputs (views, no copies) are all the backward needs: it recomputes act(gate).
    ctx.activation = activation
    ctx.backend = _dispatch.get_backend()
    ctx.save_for_backward(gate, up)


def _backward(ctx, dh):
    gate, up = ctx.saved_tensors
    if up is None:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        dgu, _ = gated_act_bwd(dh, gate, None, ctx.activation, ctx.backend)
        return dgu, None, None
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return None, None, None
    dgate, dup = gated_act_bwd(dh, gate, up, ctx.activation, ctx.backend)
    return (
        dgate if ctx.needs_input_grad[0] else None,
        dup if ctx.needs_input_grad[1] else None,
        None,
    )


gated_act_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API
def _check_activation(name: str, activation: object) -> str:
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(
            f"{name}: activation must be one of {', '.join(map(repr, ACTIVATIONS))}, "
            f"got {activation!r}"
        )
    return activation


def _cpp_path(gate: Tensor, up: Tensor | None, h: int, activation: str) -> bool:
    """The call takes the C++ eager path (``torch.ops.fastattn_C.gated_act_eager``: the same
    kernels and autograd formula as the custom ops above, one C++ autograd node)."""
    return eager_cpu(gate, up) and _dispatch.cpu_serves(
        "gated_act",
        (gate.dtype, h, activation, up is None),
        lambda: GatedActCase(gate.device.type, gate.dtype, h, activation, up is None),
    )


def _rows(t: Tensor, h: int) -> Tensor:
    """``t`` as ``[rows, h]``: a view where the layout allows (chunked halves included)."""
    return t.reshape(-1, h)


def gated_act(gate: Tensor, up: Tensor | None = None, activation: str = "silu") -> Tensor:
    """``act(gate) * up`` in one pass (and one pass backward), served by the fastest backend.

    ``gate``, ``up``: the same shape ``(..., H)`` and dtype, any strides (a unit last-dim stride
    avoids a copy); ``up=None``: ``gate`` is ``(..., 2H)`` holding ``[gate | up]`` on its last
    dim (its gradient then comes back in one tensor). ``activation``: ``"silu"``, ``"gelu"``
    (erf) or ``"gelu_tanh"``. Differentiable in both.
    """
    name = "fastattn.gated_act"
    check_tensor(name, "gate", gate, floating=True)
    activation = _check_activation(name, activation)
    if gate.dim() == 0:
        raise ValueError(f"{name}: gate must have at least one dim (the feature dim), got a scalar")
    if up is None:
        if gate.shape[-1] % 2:
            raise ValueError(
                f"{name}: without up, gate holds [gate | up] on its last dim, which must be even, "
                f"got shape {tuple(gate.shape)}"
            )
        h = gate.shape[-1] // 2
        out_shape = (*gate.shape[:-1], h)
        if gate.numel() == 0:
            g, u = _split(gate, None)
            return gated_act_reference(g, u, activation)
        if _cpp_path(gate, None, h, activation):
            return torch.ops.fastattn_C.gated_act_eager(gate, None, activation)
        return gated_act_fwd(_rows(gate, 2 * h), None, activation).view(out_shape)
    check_tensor(name, "up", up, floating=True)
    check_same_device(name, ("gate", gate), ("up", up))
    if up.shape != gate.shape:
        raise ValueError(
            f"{name}: gate and up must have the same shape, got {tuple(gate.shape)} and "
            f"{tuple(up.shape)}"
        )
    if up.dtype != gate.dtype:
        raise TypeError(
            f"{name}: gate and up must have the same dtype, got {gate.dtype} and {up.dtype}"
        )
    if gate.numel() == 0:
        return gated_act_reference(gate, up, activation)
    h = gate.shape[-1]
    if _cpp_path(gate, up, h, activation):
        return torch.ops.fastattn_C.gated_act_eager(gate, up, activation)
    return gated_act_fwd(_rows(gate, h), _rows(up, h), activation).view(gate.shape)


def swiglu(gate: Tensor, up: Tensor | None = None) -> Tensor:
    """``F.silu(gate) * up`` (SwiGLU) in one fused pass; see :func:`gated_act` for layouts."""
    return gated_act(gate, up, "silu")


def geglu(gate: Tensor, up: Tensor | None = None, approximate: str = "none") -> Tensor:
    """``F.gelu(gate, approximate=approximate) * up`` (GeGLU) in one fused pass;
    ``approximate="tanh"`` is Gemma's ``gelu_pytorch_tanh``. See :func:`gated_act`."""
    if not isinstance(approximate, str) or approximate not in ("none", "tanh"):
        raise ValueError(
            f"fastattn.geglu: approximate must be 'none' or 'tanh', got {approximate!r}"
        )
    return gated_act(gate, up, "gelu" if approximate == "none" else "gelu_tanh")


def _autocast(x: Tensor) -> bool:
    """Under autocast F.linear casts its operands itself, as it does for nn.Linear."""
    return torch.is_autocast_enabled(x.device.type)


def _check_linear(name: str, what: str, x: Tensor, w: Tensor, in_features: int) -> None:
    check_tensor(name, what, w, floating=True)
    check_same_device(name, ("input", x), (what, w))
    if w.dim() != 2:
        raise ValueError(f"{name}: {what} must be 2-D (out_features, in_features), got {w.dim()}-D")
    if w.dtype != x.dtype and not _autocast(x):
        raise TypeError(f"{name}: {what} must have the input's dtype ({x.dtype}), got {w.dtype}")
    if w.shape[1] != in_features:
        raise ValueError(
            f"{name}: {what}.shape[1] must be {in_features}, got {what} of shape {tuple(w.shape)}"
        )


def _check_bias(name: str, what: str, x: Tensor, b: Tensor | None, n: int) -> None:
    if b is None:
        return
    check_tensor(name, what, b, floating=True)
    check_same_device(name, ("input", x), (what, b))
    if b.dim() != 1 or b.shape[0] != n:
        raise ValueError(f"{name}: {what} must be 1-D with {n} elements, got {tuple(b.shape)}")
    if b.dtype != x.dtype and not _autocast(x):
        raise TypeError(f"{name}: {what} must have the input's dtype ({x.dtype}), got {b.dtype}")


def gated_feed_forward(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor | None,
    w_down: Tensor,
    b_gate: Tensor | None = None,
    b_up: Tensor | None = None,
    b_down: Tensor | None = None,
    activation: str = "silu",
) -> Tensor:
    """The gated MLP of Llama / Mistral / Qwen2 (``"silu"``) and Gemma (``"gelu_tanh"``):
    ``down(act(gate(x)) * up(x))``, i.e.
    ``F.linear(act(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up), w_down, b_down)``.

    ``x``: ``(..., d_model)``; ``w_gate``, ``w_up``: ``(d_hidden, d_model)``; ``w_down``:
    ``(d_out, d_hidden)``; biases ``(d_hidden,)`` / ``(d_out,)`` or ``None`` (the layout of
    :class:`torch.nn.Linear`). ``w_up=None``: ``w_gate`` is the packed ``(2 d_hidden, d_model)``
    weight ``[w_gate; w_up]`` (and ``b_gate`` its ``(2 d_hidden,)`` bias): one GEMM, and the
    activation reads its two halves in place.

    The projections run on :func:`fastattn.ops._gemm.linear` (``F.linear``'s maths on oneDNN or
    MKL, whichever measured faster for the shape). With two weights they are two GEMMs. One GEMM over
    ``torch.cat([w_gate, w_up])`` was measured on the CPU (``benchmarks/gated_gemm.py``,
    ``benchmarks/results/gated-gemm-20261206.md``): no faster forward, at most a few percent
    forward+backward within the noise, and in training the concatenated copy would be saved for
    the backward (a second copy of both weights per layer).
    """
    name = "fastattn.gated_feed_forward"
    check_tensor(name, "input", x, floating=True)
    activation = _check_activation(name, activation)
    if x.dim() == 0:
        raise ValueError(f"{name}: input must have at least one dim (d_model), got a scalar")
    d = x.shape[-1]
    _check_linear(name, "w_gate", x, w_gate, d)
    if w_up is None:
        if b_up is not None:
            raise ValueError(f"{name}: with a packed w_gate (w_up=None), pass its bias as b_gate")
        if w_gate.shape[0] % 2:
            raise ValueError(
                f"{name}: a packed w_gate (w_up=None) is [w_gate; w_up] and needs an even number "
                f"of rows, got shape {tuple(w_gate.shape)}"
            )
        hidden = w_gate.shape[0] // 2
        _check_bias(name, "b_gate", x, b_gate, 2 * hidden)
    else:
        hidden = w_gate.shape[0]
        _check_linear(name, "w_up", x, w_up, d)
        if w_up.shape[0] != hidden:
            raise ValueError(
                f"{name}: w_gate and w_up must have the same shape, got {tuple(w_gate.shape)} "
                f"and {tuple(w_up.shape)}"
            )
        _check_bias(name, "b_gate", x, b_gate, hidden)
        _check_bias(name, "b_up", x, b_up, hidden)
    _check_linear(name, "w_down", x, w_down, hidden)
    _check_bias(name, "b_down", x, b_down, w_down.shape[0])
    if w_up is None:
        h = gated_act(_gemm.linear(x, w_gate, b_gate), None, activation)
    else:
        h = gated_act(_gemm.linear(x, w_gate, b_gate), _gemm.linear(x, w_up, b_up), activation)
    return _gemm.linear(h, w_down, b_down)
