"""pytest-benchmark microbenchmarks of attention: ``pytest benchmarks/bench_attention.py``.

float32, B=4, H=12, D=64, causal, T in 512 / 1024 / 2048; forward and forward+backward of
``fastattn.attention`` (backend ``auto``) beside its baselines: PyTorch's fused
``F.scaled_dot_product_attention``, the plain reference (``attention_reference``, materialises
T x T) in eager mode, and ``torch.compile`` of that reference. FLOPs for a TFLOP/s figure:
forward ``4 * B * H * T^2 * D / 2`` (causal counts half), backward 2.5 x forward.
Select with ``-k``, e.g. ``-k "fwd and 1024"``; compare runs with ``--benchmark-compare``.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.ops.attention import attention_reference

B, H, D = 4, 12, 64
SEQ_LENS = (512, 1024, 2048)


def _fastattn(q, k, v):
    return fastattn.attention(q, k, v, causal=True)


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _reference(q, k, v):
    return attention_reference(q, k, v, causal=True)


@functools.cache
def _compiled_reference():
    return torch.compile(_reference, dynamic=False)


IMPLS = {
    "fastattn": lambda: _fastattn,
    "sdpa": lambda: _sdpa,
    "reference": lambda: _reference,
    "reference_compiled": _compiled_reference,
}


def _inputs(T: int, requires_grad: bool):
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def attention_flops(T: int, backward: bool) -> float:
    fwd = 4 * B * H * T * T * D / 2
    return fwd * (3.5 if backward else 1.0)


@pytest.mark.parametrize("T", SEQ_LENS)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_attention_fwd(benchmark, impl, T):
    fn = IMPLS[impl]()
    q, k, v = _inputs(T, requires_grad=False)
    benchmark.extra_info["flops"] = attention_flops(T, backward=False)
    with torch.no_grad():
        fn(q, k, v)  # compile / warm up outside the timing
        benchmark(fn, q, k, v)


@pytest.mark.parametrize("T", SEQ_LENS)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_attention_fwd_bwd(benchmark, impl, T):
    fn = IMPLS[impl]()
    q, k, v = _inputs(T, requires_grad=True)
    dout = torch.randn(B, H, T, D)
    benchmark.extra_info["flops"] = attention_flops(T, backward=True)

    def step():
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), dout)

    step()
    benchmark(step)
