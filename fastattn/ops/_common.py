"""What the ops share: input checks (each raises with what was wrong and what is expected), the
accumulation dtype, the native-kernel implementation object and fakes derived from the reference."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def check_tensor(op: str, what: str, t: object, *, floating: bool = True) -> None:
    """``t`` must be a tensor; with ``floating``, of a real floating dtype."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {what} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.dtype.is_floating_point:
        raise TypeError(
            f"{op}: {what} must be a floating-point tensor (float32, bfloat16, float16, "
            f"float64), got {t.dtype}"
        )


def check_same_device(op: str, *named: tuple[str, Tensor]) -> None:
    """All the named tensors must live on one device."""
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                f"all tensors must be on the same device"
            )


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of every kernel: float32, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class NativeKernels:
    """The ``cpu`` and ``cuda`` backends of one op: ``torch.ops.fastattn_C.<op>_fwd`` / ``_bwd``
    (C++ in ``csrc/cpu``, CUDA in ``csrc/cuda``), called with the implementation contract's
    arguments unchanged; torch's dispatcher picks the CPU or CUDA kernel by the tensors' device."""

    def __init__(self, op: str) -> None:
        self.op = op

    def fwd(self, *args: Any) -> Any:
        return getattr(torch.ops.fastattn_C, f"{self.op}_fwd")(*args)

    def bwd(self, *args: Any) -> Any:
        return getattr(torch.ops.fastattn_C, f"{self.op}_bwd")(*args)


def fake_from(
    reference: Any, stage: str, trailing: int = 0, fixed: dict[int, Any] | None = None
) -> Any:
    """A fake (meta) implementation derived from the reference backend: the same plain-PyTorch
    code run on fake tensors gives the output shapes, dtypes and strides of the contract.
    ``trailing``: how many last arguments of the op are not the implementation's (the
    backward's ``backend``); ``fixed``: argument positions replaced by constants that give the
    same shapes (a traced RNG seed cannot be read as a Python int)."""

    def fake(*args: Any) -> Any:
        args = list(args[: len(args) - trailing])
        for i, value in (fixed or {}).items():
            args[i] = value
        out = getattr(reference, stage)(*args)
        if isinstance(out, Tensor):
            return out.contiguous()
        return tuple(t.contiguous() for t in out)  # every kernel returns contiguous outputs

    return fake


def _tracing(args: tuple) -> bool:
    """Under dynamo, or with any tensor argument that is not a plain eager tensor (fake,
    functional or proxy tensors of AOTAutograd / export / opcheck)."""
    if torch.compiler.is_compiling():
        return True
    return any(
        isinstance(a, Tensor) and type(a) is not Tensor and type(a) is not torch.nn.Parameter
        for a in args
    )


def eager_cpu(t: Tensor, *others: Tensor | None) -> bool:
    """The call may take the C++ eager path (``csrc/autograd.cpp``): plain CPU tensors, outside
    ``torch.compile`` / export tracing and ``torch.func`` transforms (whose batched or wrapped
    tensors need the custom ops' own rules), the extension built. Whether the backend in force
    serves the call on ``cpu`` is the op's second question (:func:`fastattn._dispatch.cpu_serves`)."""
    return (
        t.device.type == "cpu"
        and _HAVE_EAGER
        and not _tracing((t, *others))
        and torch._C._functorch.peek_interpreter_stack() is None
    )


def _have_eager() -> bool:
    from fastattn import _dispatch

    mod, _ = _dispatch._extension()
    return mod is not None and hasattr(torch.ops.fastattn_C, "layer_norm_eager")


def needs_grad(args: tuple) -> bool:
    """Autograd is on and some tensor argument requires a gradient."""
    return torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)


def eager_fast_path(
    op: Any, body: Callable[..., Any], setup_context: Callable, backward: Callable
) -> Callable[..., Any]:
    """How the public functions call a differentiable custom op.

    Under ``torch.compile`` / ``torch.export`` tracing: the ``torch.library`` custom op ``op``
    itself (a graph leaf with its fake and registered autograd). In eager mode the same
    implementation without the dispatcher round-trips (Python -> C++ dispatcher -> autograd
    kernel -> Python body costs ~20-45 us a call, more than a small kernel): ``body`` (the op's
    Python function) directly when no gradient is needed, else inside an
    ``autograd.Function`` whose forward and backward are the op's own ``setup_context`` and
    ``backward``. Both paths run the same code on the same backend, so they compute the same.
    The kernels' backward is not differentiable: ``once_differentiable`` makes a second
    derivative through it raise instead of silently being zero.
    """

    class _Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            out = body(*args)
            setup_context(ctx, args, out)
            return out

        @staticmethod
        @once_differentiable
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    def call(*args: Any) -> Any:
        if _tracing(args):
            return op(*args)
        if needs_grad(args):
            return _Eager.apply(*args)
        return body(*args)

    return call


def eager_call(op: Any, body: Callable[..., Any]) -> Callable[..., Any]:
    """``op`` (a custom op) while tracing, its Python ``body`` in eager mode: for the backward
    ops, called from an autograd formula (see :func:`eager_fast_path`)."""

    def call(*args: Any) -> Any:
        return op(*args) if _tracing(args) else body(*args)

    return call


def draw_seed() -> Tensor:
    """A 62-bit Philox seed from torch's default CPU generator (``torch.manual_seed`` makes a
    run repeatable), as a 0-dim int64 tensor: under ``torch.compile`` the draw is part of the
    graph (no ``.item()`` break), a fresh seed every call."""
    return torch.randint(0, 2**62, (), dtype=torch.int64)


def seed_int(seed: Tensor | None) -> int:
    """The Philox seed a kernel takes: the value of :func:`draw_seed`'s tensor, 0 without one.
    Read inside a custom op's body, where the tensor is real even under ``torch.compile``."""
    return int(seed.item()) if seed is not None else 0


_HAVE_EAGER = _have_eager()
