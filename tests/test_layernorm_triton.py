"""The Triton LayerNorm and add_layer_norm against the float64 reference.

On a CPU the kernels run through the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py
before fastattn.triton.layernorm is imported), with small shapes; on a GPU they run compiled,
with larger shapes too.
Error rule as in tests/rule.py: max abs error <= 2 x torch's own error in the dtype + a small floor,
for the output, the returned sum and every gradient.

Run: pytest tests/test_layernorm_triton.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.ops.layernorm import layer_norm_reference
from fastattn.triton import interpreting

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        "triton" not in fastattn.available_backends(), reason="triton not usable here"
    ),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _check(name, got, ref, torch_x):
    assert got is not None and not torch.isnan(got).any(), f"{name}: missing or NaN"
    err = (got.double() - ref).abs().max().item()
    torch_err = (torch_x.double() - ref).abs().max().item()
    bound = 2 * torch_err + 4 * torch.finfo(got.dtype).eps * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (torch's own {torch_err:.3g})"


def _leaves(ts, dt):
    return [
        t.detach().to(DEVICE, dt).clone().requires_grad_() if t is not None else None for t in ts
    ]


# Small shapes for the interpreter (it runs programs one by one, in numpy); on a GPU also real
# widths and enough rows for many programs per weight-gradient partial sum.
SHAPES = [(1, 1), (3, 7), (5, 33), (2, 3, 1023), (4, 130), (2, 10007)]  # 10007: looped rows
if not interpreting():
    SHAPES += [(4096, 768), (1000, 4099), (3, 65536)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
@pytest.mark.parametrize("residual", [False, True])
def test_triton_layer_norm(shape, affine, residual):
    torch.manual_seed(0)
    m = shape[-1]
    x, r, g, gs = (torch.randn(shape) for _ in range(4))
    x = x * 2 + 0.5
    w = torch.randn(m) if affine in ("both", "weight") else None
    b = torch.randn(m) if affine in ("both", "bias") else None
    results = {}
    for tag, dt in (("ours", torch.float32), ("torch", torch.float32), ("ref", torch.float64)):
        xx, rr, ww, bb = _leaves([x, r if residual else None, w, b], dt)
        if tag == "ours":
            with fastattn.use_backend("triton"):
                if residual:
                    y, s = fastattn.add_layer_norm(xx, rr, m, ww, bb)
                else:
                    y, s = fastattn.layer_norm(xx, m, ww, bb), None
                assert fastattn.last_backend("layer_norm") == "triton"
        else:
            s = xx + rr if residual else None
            inp = s if residual else xx
            y = (
                F.layer_norm(inp, (m,), ww, bb)
                if tag == "torch"
                else layer_norm_reference(inp, m, ww, bb)
            )
        outs, grads = [y], [g.to(DEVICE, dt)]
        if residual:
            outs.append(s)
            grads.append(gs.to(DEVICE, dt))
        torch.autograd.backward(outs, grads)
        results[tag] = [y.detach(), s.detach() if residual else None] + [
            t.grad if t is not None else None for t in (xx, rr, ww, bb)
        ]
    names = ("out", "sum", "dx", "dresidual", "dweight", "dbias")
    for i, name in enumerate(names):
        ref = results["ref"][i]
        if ref is None:
            continue
        _check(
            f"{name} {shape} {affine} res={residual}", results["ours"][i], ref, results["torch"][i]
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [8191, 10007])  # one block / the looped kernel
def test_triton_add_layer_norm_16bit(dtype, m):
    """16-bit input, fp32 weight and 16-bit bias, with a residual: both row kernels."""
    torch.manual_seed(2)
    x, r, g, gs = (torch.randn(2, m) for _ in range(4))
    w, b = torch.randn(m), torch.randn(m)
    results = {}
    for tag, dt in (("ours", dtype), ("torch", dtype), ("ref", torch.float64)):
        xx, rr, bb = _leaves([x, r, b], dt)
        (ww,) = _leaves([w], torch.float32 if tag != "ref" else dt)
        if tag == "ours":
            with fastattn.use_backend("triton"):
                y, s = fastattn.add_layer_norm(xx, rr, m, ww, bb)
        else:
            s = xx + rr
            y = (
                F.layer_norm(s.float(), (m,), ww, bb.float()).to(dt)
                if tag == "torch"
                else layer_norm_reference(s, m, ww, bb)
            )
        torch.autograd.backward([y, s], [g.to(DEVICE, dt), gs.to(DEVICE, dt)])
        results[tag] = [y.detach(), s.detach(), xx.grad, rr.grad, ww.grad, bb.grad]
    for i, name in enumerate(("out", "sum", "dx", "dresidual", "dweight", "dbias")):
        got, ref, own = (results[t][i] for t in ("ours", "ref", "torch"))
        assert got.dtype == own.dtype, f"{name}: dtype {got.dtype} != {own.dtype}"
        _check(f"{name} {dtype} m={m}", got, ref, own)


def test_triton_layer_norm_non_contiguous():
    torch.manual_seed(1)
    x = torch.randn(33, 6).t()  # (6, 33), row stride 1, column stride 6
    w, b = torch.randn(33), torch.randn(33)
    with fastattn.use_backend("triton"):
        y = fastattn.layer_norm(x.to(DEVICE), 33, w.to(DEVICE), b.to(DEVICE))
    torch.testing.assert_close(y.cpu(), F.layer_norm(x, (33,), w, b), rtol=1e-5, atol=1e-5)


def test_triton_layer_norm_unsupported_row_length():
    from fastattn import _dispatch
    from fastattn.ops.layernorm import LayerNormCase

    def plan(dtype, cols):
        return _dispatch.plan("layer_norm", "cpu", LayerNormCase("cpu", dtype, cols), "triton")

    with pytest.raises(fastattn.BackendError, match="row length 70000 > 65536"):
        plan(torch.float32, 70000)
    assert plan(torch.float32, 65536) == ("triton", [])
    with pytest.raises(fastattn.BackendError, match="dtype torch.float64"):
        plan(torch.float64, 8)


def test_triton_layer_norm_launch_rules():
    """The tiles `make cuda-check` (scripts/triton_aot.py) found spill-free in fp16 / bf16 on
    sm_80 and sm_90: 8 values per thread up to 1024 columns, 4 from 2048 on (8 at 8192, 32 warps
    at most); longer rows looped in 2048-column chunks. With 8 per thread at 2048 (8 warps) and
    4096 (16 warps) ptxas spilled; a change here needs that check re-run."""
    from fastattn.triton import layernorm as L

    got = {m: (L.block_cols(m), L.one_block(m), L.num_warps(L.block_cols(m))) for m in
           (1, 129, 256, 512, 1000, 1025, 2048, 2049, 4096, 8192, 8193, 65536)}  # fmt: skip
    assert got == {
        1: (128, True, 1),
        129: (256, True, 1),
        256: (256, True, 1),
        512: (512, True, 2),
        1000: (1024, True, 4),
        1025: (2048, True, 16),
        2048: (2048, True, 16),
        2049: (4096, True, 32),
        4096: (4096, True, 32),
        8192: (8192, True, 32),
        8193: (2048, False, 16),
        65536: (2048, False, 16),
    }
