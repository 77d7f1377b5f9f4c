"""Microbenchmarks: swiglu / geglu and the gated feed-forward block on the CPU, float32.

Baselines in the same run: ``F.silu(gate) * up`` (``F.gelu(gate, approximate="tanh") * up``) in
eager mode and under ``torch.compile``, and Hugging Face's formula
``down(act(gate(x)) * up(x))`` on the same ``nn.Linear`` modules. Run (the file is collected
when named):

    pytest benchmarks/bench_gated_act.py --benchmark-columns=median,iqr,rounds --benchmark-group-by=group

Sizes: the activation on the halves of one [8192, 2 * 2752] tensor (a fused projection's output,
Llama-ish d_hidden for d_model 1024); GatedFeedForward with 4096 tokens, 1024 -> 2752.
The GEMM layout question (one concatenated GEMM or two) is ``benchmarks/gated_gemm.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.nn import GatedFeedForward

ROWS, H = 8192, 2752
TOKENS, D_MODEL = 4096, 1024
ACTS = {
    "silu": (fastattn.swiglu, F.silu),
    "gelu_tanh": (
        lambda g, u: fastattn.geglu(g, u, approximate="tanh"),
        lambda t: F.gelu(t, approximate="tanh"),
    ),
}


def _impls(act: str):
    ours, torch_act = ACTS[act]

    def eager(g, u):
        return torch_act(g) * u

    return {"fastattn": ours, "eager": eager, "compile": torch.compile(eager)}


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    gu = torch.randn(ROWS, 2 * H, requires_grad=True)
    return gu, torch.randn(ROWS, H)


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("impl", ["fastattn", "eager", "compile"])
def test_gated_act_fwd(benchmark, data, impl, act):
    benchmark.group = f"gated_act fwd {ROWS}x{H} {act}"
    gu, _ = data
    fn = _impls(act)[impl]

    def run():
        with torch.no_grad():
            return fn(gu[:, :H], gu[:, H:])

    run()
    benchmark.pedantic(run, rounds=7, warmup_rounds=1)


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("impl", ["fastattn", "eager", "compile"])
def test_gated_act_fwd_bwd(benchmark, data, impl, act):
    benchmark.group = f"gated_act fwd+bwd {ROWS}x{H} {act}"
    gu, dh = data
    fn = _impls(act)[impl]

    def run():
        return torch.autograd.grad(fn(gu[:, :H], gu[:, H:]), (gu,), dh)

    run()
    benchmark.pedantic(run, rounds=7, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["fastattn", "hf"])
def test_gated_feed_forward_fwd_bwd(benchmark, impl):
    benchmark.group = f"GatedFeedForward fwd+bwd {TOKENS}x{D_MODEL}->{H} silu"
    torch.manual_seed(0)
    mod = GatedFeedForward(D_MODEL, H)

    def hf(x):
        return mod.down_proj(F.silu(mod.gate_proj(x)) * mod.up_proj(x))

    fn = mod if impl == "fastattn" else hf
    x = torch.randn(TOKENS, D_MODEL, requires_grad=True)
    dy = torch.randn(TOKENS, D_MODEL)
    params = (x, *mod.parameters())

    def run():
        return torch.autograd.grad(fn(x), params, dy)

    run()
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
