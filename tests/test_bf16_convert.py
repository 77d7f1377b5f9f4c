"""float -> bfloat16 stores of the CPU kernels (csrc/cpu/vec.h's store_f).

On a CPU with AVX512_BF16 the kernels round with `vcvtneps2bf16`; elsewhere, or with
FASTATTN_CPU_BF16_CVT=0 set before the extension loads, with ATen's emulated rounding. Both
round to nearest even; the instruction flushes denormal inputs to zero and writes a NaN with its
own payload. These tests pin that: every finite normal value and infinity rounds exactly as
torch's `.to(torch.bfloat16)`, and the two paths give the same bits on every op that stores
bfloat16.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastattn
from fastattn import _dispatch

CPU = "cpu" in fastattn.available_backends("cpu")
pytestmark = pytest.mark.skipif(not CPU, reason="the CPU extension is not built")
ROOT = Path(__file__).resolve().parents[1]


def _hw_convert() -> bool:
    return bool(getattr(_dispatch._extension()[0], "cpu_bf16_cvt", False))


def _crafted_floats() -> torch.Tensor:
    """Floats that probe the rounding: ties to even (both parities), values just either side
    of a tie, overflow to infinity, infinities, NaN, the smallest normals, denormals and random
    values over the whole exponent range."""
    g = torch.Generator().manual_seed(1234)
    rand_bits = torch.randint(0, 2**31 - 1, (4096,), generator=g, dtype=torch.int64)
    rand_bits = rand_bits | (torch.randint(0, 2, (4096,), generator=g) << 31)
    hi = torch.randint(0, 0x7F7F, (512,), generator=g, dtype=torch.int64) << 16
    specials = [
        0x7F7FFFFF,  # largest float: rounds to +inf in bfloat16
        0x7F7F7FFF,  # just below the tie under the largest bfloat16
        0x7F7F8000,  # tie at the top, odd mantissa: rounds up to inf
        0xFF7FFFFF,
        0x7F800000,  # +inf
        0xFF800000,  # -inf
        0x00800000,  # smallest normal
        0x80800000,
        0x3F808000,  # tie, even lower half: stays
        0x3F818000,  # tie, odd lower half: rounds up
        0x3F807FFF,
        0x3F808001,
    ]
    bits = torch.cat(
        [
            rand_bits,
            hi | 0x8000,  # exact ties
            hi | 0x7FFF,
            hi | 0x8001,
            torch.tensor(specials, dtype=torch.int64),
        ]
    )
    return (bits.to(torch.int64) & 0xFFFFFFFF).to(torch.int32).view(torch.float32).clone()


def _store_through_layer_norm(values: torch.Tensor) -> torch.Tensor:
    """The kernel's vector store of `values`: LayerNorm with weight 0 writes exactly its bias,
    rounded to the input's dtype (rows of 64 elements: every element goes through the vector
    path)."""
    m = 64
    n = -(-values.numel() // m)
    b = torch.zeros(n * m)
    b[: values.numel()] = values
    b = b.view(n, m)
    x = torch.randn(n, m).to(torch.bfloat16)
    with fastattn.use_backend("cpu"):
        # One row per call: a row's own bias is the whole row's output.
        rows = [fastattn.layer_norm(x[i : i + 1], (m,), torch.zeros(m), b[i]) for i in range(n)]
    return torch.cat(rows).reshape(-1)[: values.numel()]


def test_vector_bfloat16_stores_round_like_torch():
    vals = _crafted_floats()
    # Bias values of any magnitude: a NaN or infinity bias makes only its own element NaN / inf.
    got = _store_through_layer_norm(vals)
    want = vals.to(torch.bfloat16)
    got_bits = got.view(torch.int16).to(torch.int32) & 0xFFFF
    want_bits = want.view(torch.int16).to(torch.int32) & 0xFFFF
    nan = torch.isnan(vals)
    denormal = (vals != 0) & (vals.abs() < torch.finfo(torch.float32).tiny)
    normal = ~nan & ~denormal & (vals != 0)
    assert int(normal.sum()) > 5000
    bad = normal & (got_bits != want_bits)
    assert not bad.any(), (
        f"{int(bad.sum())} values rounded unlike torch, e.g. float bits "
        f"{hex(int(vals[bad][0].view(torch.int32)) & 0xFFFFFFFF)}: got "
        f"{hex(int(got_bits[bad][0]))}, torch {hex(int(want_bits[bad][0]))}"
    )
    assert torch.isnan(got[nan]).all()
    # Denormals: torch's bfloat16 denormal, or a signed zero where the hardware flushes them.
    d_ok = (got_bits[denormal] == want_bits[denormal]) | (got[denormal] == 0)
    assert d_ok.all()
    if not _hw_convert():
        assert (got_bits[denormal] == want_bits[denormal]).all()


_CHILD = textwrap.dedent(
    """
    import sys, torch, fastattn
    from fastattn import _dispatch
    sys.path.insert(0, {root!r})
    from tests.test_bf16_convert import bf16_outputs
    assert not _dispatch._extension()[0].cpu_bf16_cvt, "FASTATTN_CPU_BF16_CVT=0 was ignored"
    torch.save(bf16_outputs(), {path!r})
    """
)


def bf16_outputs() -> dict[str, torch.Tensor]:
    """Every CPU op's bfloat16 outputs and gradients on fixed random inputs (shapes whose rows
    are multiples of 16 and large enough to take the vector paths)."""
    torch.manual_seed(0)
    out: dict[str, torch.Tensor] = {}

    def run(name, fn, *inputs):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        y = fn(*leaves)
        ys = y if isinstance(y, tuple) else (y,)
        torch.autograd.backward(list(ys), [torch.randn_like(t) for t in ys])
        for k, t in enumerate(ys):
            out[f"{name}.out{k}"] = t.detach()
        for k, t in enumerate(leaves):
            if t.grad is not None:
                out[f"{name}.grad{k}"] = t.grad

    bf = torch.bfloat16
    x = torch.randn(37, 256).to(bf) * 3
    r = torch.randn(37, 256).to(bf)
    w = torch.randn(256)
    b = torch.randn(256)
    with fastattn.use_backend("cpu"):
        run("layer_norm", lambda x, w, b: fastattn.layer_norm(x, (256,), w, b), x, w, b)
        run(
            "add_layer_norm",
            lambda x, r, w, b: fastattn.add_layer_norm(x, r, (256,), w, b),
            x,
            r,
            w,
            b,
        )
        run("rms_norm", lambda x, w: fastattn.rms_norm(x, (256,), w), x, w)
        run("add_rms_norm", lambda x, r, w: fastattn.add_rms_norm(x, r, (256,), w), x, r, w)
        run("bias_gelu", lambda x, b: fastattn.bias_gelu(x, b.to(bf)), x, b)
        run("bias_gelu_tanh", lambda x, b: fastattn.bias_gelu(x, b.to(bf), "tanh"), x, b)
        run("swiglu", lambda g, u: fastattn.swiglu(g, u), x, r)
        run("geglu", lambda g, u: fastattn.geglu(g, u), x, r)
        q, k, v = (torch.randn(2, 3, 67, 64).to(bf) for _ in range(3))
        run("attention", lambda q, k, v: fastattn.attention(q, k, v, causal=True), q, k, v)
    return out


@pytest.mark.skipif(not _hw_convert(), reason="this CPU has no AVX512_BF16: one rounding path")
def test_emulated_rounding_gives_the_same_bits(tmp_path):
    """FASTATTN_CPU_BF16_CVT=0 (the path of a CPU without AVX512_BF16) against the hardware
    rounding: finite inputs, so every output and gradient must agree bit for bit."""
    path = tmp_path / "emulated.pt"
    env = dict(os.environ, FASTATTN_CPU_BF16_CVT="0")
    res = subprocess.run(
        [sys.executable, "-c", _CHILD.format(root=str(ROOT), path=str(path))],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    emulated = torch.load(path)
    hardware = bf16_outputs()
    assert emulated.keys() == hardware.keys()
    tiny = torch.finfo(torch.float32).tiny
    for name, t in hardware.items():
        e = emulated[name]
        assert t.dtype == e.dtype, name
        if t.dtype != torch.bfloat16:
            assert torch.equal(t, e), f"{name}: the two roundings differ"
            continue
        differ = t.view(torch.int16) != e.view(torch.int16)
        # The one allowed difference: a denormal result that the instruction flushes to zero
        # (GELU's gradient far out in the tail is one).
        flushed = (t == 0) & (e != 0) & (e.float().abs() < tiny)
        assert not (differ & ~flushed).any(), (
            f"{name}: {int((differ & ~flushed).sum())} elements differ between the roundings"
        )
