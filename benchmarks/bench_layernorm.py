"""pytest-benchmark microbenchmarks of LayerNorm: ``pytest benchmarks/bench_layernorm.py``.

The same callables as ``python -m benchmarks.run layernorm`` (which adds the ceilings, the
ratios and the recorded tables); use this file for pytest-benchmark's own comparisons
(``--benchmark-compare``, histograms).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.run import layernorm_cases

CASES = [
    (shape, name, fn)
    for shape, impls in layernorm_cases([(8192, 768)])
    for name, fn in impls.items()
]


@pytest.mark.parametrize("shape,name,fn", CASES, ids=[f"{s[0]}x{s[1]}-{n}" for s, n, _ in CASES])
def test_layernorm_fwd(benchmark, shape, name, fn):
    n, m = shape
    x, w, b = torch.randn(n, m), torch.randn(m), torch.randn(m)
    with torch.no_grad():
        benchmark(fn, x, w, b)


@pytest.mark.parametrize("shape,name,fn", CASES, ids=[f"{s[0]}x{s[1]}-{n}" for s, n, _ in CASES])
def test_layernorm_fwd_bwd(benchmark, shape, name, fn):
    n, m = shape
    x, w, b = (t.requires_grad_() for t in (torch.randn(n, m), torch.randn(m), torch.randn(m)))
    dy = torch.randn(n, m)
    benchmark(lambda: fn(x, w, b).backward(dy))
