"""Microbenchmarks: bias_gelu and the GELU feed-forward block on the CPU, float32.

Baselines in the same run: ``F.gelu(x + b)`` in eager mode and under ``torch.compile``, and
``torch.nn.Sequential(Linear, GELU, Linear)``. Run (the file is collected when named):

    pytest benchmarks/bench_gelu.py --benchmark-columns=median,iqr,rounds --benchmark-group-by=group

Sizes: bias_gelu on [8192, 3072] (a d_hidden=3072 activation of 8192 tokens); FeedForward with
8192 tokens, d_model 768, d_hidden 3072.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.nn import FeedForward

ROWS, COLS = 8192, 3072
TOKENS, D_MODEL = 8192, 768
APPROX = ("none", "tanh")


def _eager(x, b, approximate):
    return F.gelu(x + b, approximate=approximate)


_compiled = torch.compile(_eager)
IMPLS = {"fastattn": fastattn.bias_gelu, "eager": _eager, "compile": _compiled}


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    x = torch.randn(ROWS, COLS, requires_grad=True)
    b = torch.randn(COLS, requires_grad=True)
    return x, b, torch.randn(ROWS, COLS)


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_bias_gelu_fwd(benchmark, data, impl, approximate):
    benchmark.group = f"bias_gelu fwd {ROWS}x{COLS} {approximate}"
    x, b, _ = data
    fn = IMPLS[impl]

    def run():
        with torch.no_grad():
            return fn(x, b, approximate)

    run()
    benchmark.pedantic(run, rounds=7, warmup_rounds=1)


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_bias_gelu_fwd_bwd(benchmark, data, impl, approximate):
    benchmark.group = f"bias_gelu fwd+bwd {ROWS}x{COLS} {approximate}"
    x, b, g = data
    fn = IMPLS[impl]

    def run():
        x.grad = b.grad = None
        fn(x, b, approximate).backward(g)

    run()
    benchmark.pedantic(run, rounds=7, warmup_rounds=1)


def _sequential(approximate):
    return torch.nn.Sequential(
        torch.nn.Linear(D_MODEL, 4 * D_MODEL),
        torch.nn.GELU(approximate),
        torch.nn.Linear(4 * D_MODEL, D_MODEL),
    )


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("impl", ["fastattn", "torch"])
def test_feed_forward_fwd_bwd(benchmark, impl, approximate):
    benchmark.group = f"FeedForward fwd+bwd {TOKENS}x{D_MODEL}->{4 * D_MODEL} {approximate}"
    torch.manual_seed(0)
    mod = (
        FeedForward(D_MODEL, approximate=approximate)
        if impl == "fastattn"
        else _sequential(approximate)
    )
    x = torch.randn(TOKENS, D_MODEL, requires_grad=True)
    g = torch.randn(TOKENS, D_MODEL)

    def run():
        x.grad = None
        mod.zero_grad(set_to_none=True)
        mod(x).backward(g)

    run()
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
