"""The GEMM path of the fused modules: torch's oneDNN linear or ``F.linear`` (MKL), whichever is
faster on this machine for the dtype and shape, forward and backward.

fastattn writes no GEMM of its own: torch ships two CPU GEMM libraries and picks neither by
speed. ``F.linear`` on float32 is MKL's sgemm; ``torch.ops.mkldnn._linear_pointwise`` is
oneDNN's matmul (the path ``torch.compile`` takes on the CPU), which on AVX-512 machines often
reaches more of the FMA peak at transformer shapes and can fuse a GELU epilogue. Which one wins
depends on the CPU, the dtype and the shape, so :func:`linear` measures both the first time it
sees a ``(dtype, M, K, N, bias, grad)`` key, M rounded up to a power of two (interleaved
rounds, forward + backward where a gradient is needed, else the forward; outside
``torch.compile`` tracing) and keeps the winner (oneDNN only where it wins by 3% or more);
``FASTATTN_GEMM=onednn`` / ``=torch`` forces a path and ``choices()`` shows what was picked.
Anything oneDNN cannot take (non-CPU tensors, float64, float16, a missing op) goes to
``F.linear``, as do calls inside ``torch.func`` transforms and on tensor subclasses.

Backward (``_OneDNNLinear``): ``dx = dy @ W`` on oneDNN, ``dW = dy^T @ x`` as ``torch.mm``
(faster there, measured: one core, CPU time, 2048 tokens at d=384: oneDNN forward 96-103 vs
MKL 88-95 GFLOP/s in float32, ~200 vs ~190 in bfloat16; dW 89-96 on ``mm`` vs 82-92 on
oneDNN), ``db = dy.sum(0)``. Under autocast the inputs are cast to the autocast dtype
first (as autocast does for ``F.linear``), so the backward's casts are autograd's. With the
extension built, the same formula runs as one C++ autograd node
(``torch.ops.fastattn_C.linear_onednn_eager``, ``csrc/autograd.cpp``), whose backward under
``create_graph=True`` runs on differentiable ops (a Linear is twice differentiable).
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn.ops import _common
from fastattn.ops._common import _tracing, needs_grad

_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
_CHOICE: dict[tuple, str] = {}  # (dtype, M bucket, K, N, has_bias, grad) -> "onednn" | "torch"
_PROBE_ROUNDS = 3
_ONEDNN_MARGIN = 0.03  # oneDNN is picked only when >= 3% faster than F.linear in the probe


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_HAVE_ONEDNN = _onednn_available()


def _onednn(x: Tensor, w: Tensor, b: Tensor | None, gelu: str | None = None) -> Tensor:
    """oneDNN's ``x @ w.T + b`` on 2-D operands; ``gelu``: ``"none"`` (erf) or ``"tanh"`` fuses
    that GELU as the GEMM's epilogue."""
    if gelu is None:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], gelu)


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _onednn(x, w, b)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, w = ctx.saved_tensors
        # dx = dy @ W on oneDNN too (W.T as its [K, N] weight, read strided: no copy); dW on
        # torch.mm, which measured faster than oneDNN for the [N, M] x [M, K] product.
        dy = dy.contiguous()
        if not ctx.needs_input_grad[0]:
            dx = None
        elif torch.is_grad_enabled():  # create_graph=True: torch.mm is differentiable, oneDNN not
            dx = torch.mm(dy, w)
        else:
            dx = _onednn(dy, w.t(), None)
        dw = torch.mm(dy.t(), x) if ctx.needs_input_grad[1] else None
        db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def choices() -> dict[tuple, str]:
    """The path picked per ``(dtype, M rounded up to a power of two, K, N, has_bias, grad)``."""
    return dict(_CHOICE)


def _median(ts: list[float]) -> float:
    return sorted(ts)[len(ts) // 2]


def _probe(x: Tensor, w: Tensor, b: Tensor | None, grad: bool) -> str:
    """Time both paths on these operands, interleaved, in process CPU time (robust to other
    processes on a busy machine); returns the faster (oneDNN by a margin). ``grad``: time
    forward + backward (dx, dW, db), the work of a training step: oneDNN's forward can win
    while its backward loses (at 768 x 128 -> 65 / 128 in float32, 2 threads: 6-17% slower
    fwd+bwd, 0-7% faster forward)."""
    x, w = x.detach(), w.detach()
    b = None if b is None else b.detach()
    if grad:
        x, w = x.requires_grad_(), w.requires_grad_()
        b = None if b is None else b.requires_grad_()
        leaves = [t for t in (x, w, b) if t is not None]
        dy = torch.ones(x.shape[0], w.shape[0], dtype=x.dtype)

        def timed(f):
            return lambda: torch.autograd.grad(f(x, w, b), leaves, dy)

        fns = {"onednn": timed(_OneDNNLinear.apply), "torch": timed(F.linear)}
    else:
        fns = {"onednn": lambda: _onednn(x, w, b), "torch": lambda: F.linear(x, w, b)}
    # Small products vary more from call to call: more rounds where they are cheap.
    rounds = _PROBE_ROUNDS if x.shape[0] * x.shape[1] * w.shape[0] > 2**28 else 3 * _PROBE_ROUNDS
    with torch.enable_grad() if grad else torch.no_grad():
        for f in fns.values():
            f()
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for k, f in fns.items():
                t0 = time.process_time()
                f()
                times[k].append(time.process_time() - t0)
    # oneDNN must win clearly: where the two are within noise of each other (small shapes:
    # 768 x 128 projections measured within 1-2% inside a training step) a probe's pick flips
    # from run to run, and F.linear is torch's own default.
    return (
        "onednn"
        if _median(times["onednn"]) < (1 - _ONEDNN_MARGIN) * _median(times["torch"])
        else "torch"
    )


def _path(x2: Tensor, w: Tensor, b: Tensor | None) -> str:
    forced = os.environ.get("FASTATTN_GEMM", "auto")
    if forced not in ("auto", "onednn", "torch"):
        raise ValueError(f"FASTATTN_GEMM must be auto, onednn or torch, got {forced!r}")
    if (
        forced == "torch"
        # Under torch.compile Inductor picks (and packs) its own GEMMs; tensor subclasses and
        # torch.func transforms (vmap, grad, jacrev: per-sample gradients) need F.linear's own
        # rules (the autograd.Function here has no vmap rule).
        or _tracing((x2, w, b))
        or torch._C._functorch.peek_interpreter_stack() is not None
        or not _HAVE_ONEDNN
        or x2.device.type != "cpu"
        or x2.dtype not in _ONEDNN_DTYPES
        or w.dtype != x2.dtype
        or (b is not None and b.dtype != x2.dtype)
    ):
        return "torch"
    if forced == "onednn":
        return "onednn"
    grad = needs_grad((x2, w, b))
    # Rows bucketed to a power of two: inference sees a new row count per prompt length, and
    # the winner does not change between neighbouring counts (nor does a probe per length pay).
    rows = 1 << max(0, x2.shape[0] - 1).bit_length()
    key = (x2.dtype, rows, x2.shape[1], w.shape[0], b is not None, grad)
    choice = _CHOICE.get(key)
    if choice is None:
        choice = _CHOICE[key] = _probe(x2, w, b, grad)
    return choice


def _autocast(x: Tensor, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """The operands as CPU autocast hands them to ``F.linear``: floating tensors other than
    float64 in the autocast dtype (float64 is not eligible and stays as it is)."""
    dev = x.device.type
    if dev != "cpu" or not torch.is_autocast_enabled(dev):
        return x, w, b
    dt = torch.get_autocast_dtype(dev)

    def cast(t: Tensor | None) -> Tensor | None:
        ok = t is not None and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dt) if ok else t

    return cast(x), cast(w), cast(b)


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """``F.linear(x, w, b)`` (x ``(..., K)``, w ``(N, K)``, b ``(N,)``) on the faster GEMM path;
    honours autocast as ``F.linear`` does."""
    dev = x.device.type
    x, w, b = _autocast(x, w, b)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if _path(x2, w, b) == "torch":
        return F.linear(x, w, b)
    if _common._HAVE_EAGER:  # the same autograd formula as _OneDNNLinear, one C++ node
        return torch.ops.fastattn_C.linear_onednn_eager(x, w, b)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    with torch.autocast(dev, enabled=False):
        y = _OneDNNLinear.apply(x2, w, b)
    return y.view(*lead, w.shape[0])


def linear_gelu(x: Tensor, w: Tensor, b: Tensor | None, approximate: str) -> Tensor | None:
    """``gelu(x @ w.T + b)`` as one oneDNN call with a GELU epilogue, for calls that need no
    gradient (inference: nothing to save for a backward). None where oneDNN cannot serve it
    (the caller takes the unfused path)."""
    dev = x.device.type
    x, w, b = _autocast(x, w, b)
    x2 = x.reshape(-1, x.shape[-1])
    if _path(x2, w, b) != "onednn":
        return None
    with torch.autocast(dev, enabled=False):
        y = _onednn(x2.contiguous(), w, b, approximate)
    return y.view(*x.shape[:-1], w.shape[0])
