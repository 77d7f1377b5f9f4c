"""The GEMM path of the fused modules (fastattn/ops/_gemm.py): oneDNN or F.linear, forward and
backward, against the float64 reference with the error rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.ops import _gemm
from tests.rule import assert_rule

PATHS = ["onednn", "torch"] if _gemm._HAVE_ONEDNN else ["torch"]


def _grads(fn, tensors, dout):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], dout)
    return out.detach(), grads


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,k,n", [((1,), 1, 1), ((3, 7), 13, 29), ((97,), 64, 130)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_reference(monkeypatch, path, dtype, lead, k, n, bias):
    monkeypatch.setenv("FASTATTN_GEMM", path)
    x = torch.randn(*lead, k).to(dtype)
    w = (torch.randn(n, k) / k**0.5).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    dout = torch.randn(*lead, n).to(dtype)
    out, g = _grads(_gemm.linear, (x, w, b), dout)
    t_out, t_g = _grads(F.linear, (x, w, b), dout)
    r_out, r_g = _grads(F.linear, [u.double() if u is not None else None for u in (x, w, b)],
                        dout.double())  # fmt: skip
    assert out.dtype == dtype and out.shape == t_out.shape
    assert_rule("out", out, t_out, r_out)
    for name, a, tb, rc in zip(("dx", "dw", "db"), g, t_g, r_g, strict=False):
        assert_rule(name, a, tb, rc)


@pytest.mark.parametrize("path", PATHS)
def test_linear_autocast_and_strided_input(monkeypatch, path):
    monkeypatch.setenv("FASTATTN_GEMM", path)
    x = torch.randn(40, 2, 24)[:, 0, :]  # rows 48 apart: not contiguous
    w, b = torch.randn(17, 24), torch.randn(17)
    dout = torch.randn(40, 17).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, g = _grads(_gemm.linear, (x, w, b), dout)
        t_out, t_g = _grads(F.linear, (x, w, b), dout)
    r_out, r_g = _grads(F.linear, (x.double(), w.double(), b.double()), dout.double())
    assert out.dtype == t_out.dtype == torch.bfloat16
    assert_rule("out", out, t_out, r_out)
    for a, tb, rc in zip(g, t_g, r_g, strict=True):
        assert a.dtype == tb.dtype  # float32 parameters get float32 gradients, as with autocast
        assert_rule("grad", a, tb, rc)


def test_probe_picks_a_path_once(monkeypatch):
    monkeypatch.setenv("FASTATTN_GEMM", "auto")
    x, w = torch.randn(31, 8), torch.randn(5, 8)
    _gemm.linear(x, w)
    assert _gemm.choices()[(torch.float32, 32, 8, 5, False, False)] in PATHS  # rows: 31 -> 32
    # Training (a gradient needed) is its own key, probed forward + backward.
    w.requires_grad_()
    _gemm.linear(x, w).sum().backward()
    assert _gemm.choices()[(torch.float32, 32, 8, 5, False, True)] in PATHS
    n = len(_gemm.choices())
    _gemm.linear(torch.randn(17, 8), w.detach())  # 17..32 rows: the same bucket, no new probe
    assert len(_gemm.choices()) == n
    assert w.grad is not None
    monkeypatch.setenv("FASTATTN_GEMM", "cublas")
    with pytest.raises(ValueError, match="FASTATTN_GEMM must be auto, onednn or torch"):
        _gemm.linear(x, w)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_feed_forward_inference_epilogue(approximate, dtype):
    # Without gradients feed_forward takes one oneDNN call with a GELU epilogue for fc1.
    x = torch.randn(37, 48).to(dtype)
    w1, b1 = (torch.randn(96, 48) / 7).to(dtype), torch.randn(96).to(dtype)
    w2, b2 = (torch.randn(48, 96) / 10).to(dtype), torch.randn(48).to(dtype)
    with torch.no_grad():
        out = fastattn.feed_forward(x, w1, b1, w2, b2, approximate)

    def torch_ff(x, w1, b1, w2, b2):
        return F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)

    t = torch_ff(x, w1, b1, w2, b2)
    r = torch_ff(*(u.double() for u in (x, w1, b1, w2, b2)))
    assert_rule("out", out, t, r)


def test_linear_autocast_leaves_float64_alone():
    # CPU autocast does not cast float64 operands of F.linear; neither does the GEMM path.
    x, w = torch.randn(5, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _gemm.linear(x, w).dtype == F.linear(x, w).dtype == torch.float64


@pytest.mark.parametrize("path", PATHS)
def test_nn_linear_is_a_drop_in(monkeypatch, path):
    """fastattn.nn.Linear: torch.nn.Linear's constructor, parameters and state_dict; its output
    and gradients within the rule (float32 and under bf16 autocast), on either GEMM path."""
    monkeypatch.setenv("FASTATTN_GEMM", path)
    torch.manual_seed(0)
    ref = torch.nn.Linear(37, 19)
    ours = fastattn.nn.Linear(37, 19)
    ours.load_state_dict(ref.state_dict())
    assert isinstance(ours, torch.nn.Linear) and ours.state_dict().keys() == ref.state_dict().keys()
    ref64 = torch.nn.Linear(37, 19).double()
    ref64.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 37)
    dout = torch.randn(5, 3, 19)
    for autocast in (False, True):
        results = []
        for m, ac in ((ours, autocast), (ref, autocast), (ref64, False)):
            m.zero_grad(set_to_none=True)
            xi = x.double() if m is ref64 else x
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ac):
                out = m(xi)
            out.backward(dout.to(out.dtype))
            results.append((out, m.weight.grad, m.bias.grad))
        for what, a, t, r in zip(("out", "dw", "db"), *results, strict=True):
            assert a.dtype == t.dtype
            assert_rule(f"{what} autocast={autocast}", a, t, r)


def test_patch_swaps_plain_linears_only():
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 8), torch.nn.Sequential(torch.nn.Linear(8, 4)), torch.nn.Identity()
    )
    attn = torch.nn.MultiheadAttention(8, 2)  # its out_proj is a Linear subclass: left alone
    model.append(attn)
    x = torch.randn(3, 8)
    before = model[:2](x)
    report = fastattn.patch(model, attention=False)
    assert [e.name for e in report.layers("linear", "replaced")] == ["0", "1.0"]
    assert type(model[0]) is fastattn.nn.Linear and type(attn.out_proj) is not fastattn.nn.Linear
    torch.testing.assert_close(model[:2](x), before)
    fastattn.unpatch(model)
    assert type(model[0]) is torch.nn.Linear and type(model[1][0]) is torch.nn.Linear
    assert not fastattn.patch(model, linear=False).layers("linear")


def test_nn_linear_under_torch_func_transforms():
    """Per-sample gradients (torch.func vmap over grad) work on fastattn.nn.Linear as on
    torch.nn.Linear: inside a transform the call is F.linear."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    ours, ref = fastattn.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 8)

    def per_sample(m):
        params = {k: v.detach() for k, v in m.named_parameters()}
        loss = lambda p, xi: functional_call(m, p, (xi,)).square().sum()  # noqa: E731
        return vmap(grad(loss), in_dims=(None, 0))(params, x)

    got, want = per_sample(ours), per_sample(ref)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k])
