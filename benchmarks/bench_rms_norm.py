"""pytest-benchmark microbenchmarks of RMSNorm: ``pytest benchmarks/bench_rms_norm.py``.

The same callables as ``python -m benchmarks.run rms_norm`` (which adds the ceilings, the ratios
and the recorded tables); use this file for pytest-benchmark's own comparisons.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.run import rms_norm_cases

CASES = [
    (shape, name, fn)
    for shape, impls in rms_norm_cases([(8192, 768)])
    for name, fn in impls.items()
]


@pytest.mark.parametrize("shape,name,fn", CASES, ids=[f"{s[0]}x{s[1]}-{n}" for s, n, _ in CASES])
def test_rms_norm_fwd(benchmark, shape, name, fn):
    n, m = shape
    x, w = torch.randn(n, m), torch.randn(m)
    with torch.no_grad():
        benchmark(fn, x, w)


@pytest.mark.parametrize("shape,name,fn", CASES, ids=[f"{s[0]}x{s[1]}-{n}" for s, n, _ in CASES])
def test_rms_norm_fwd_bwd(benchmark, shape, name, fn):
    n, m = shape
    x, w = (t.requires_grad_() for t in (torch.randn(n, m), torch.randn(m)))
    dy = torch.randn(n, m)
    benchmark(lambda: fn(x, w).backward(dy))
