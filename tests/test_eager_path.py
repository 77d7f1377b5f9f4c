"""The C++ eager path (csrc/autograd.cpp) against the custom-op path it stands in for.

In eager mode on the CPU, layer_norm / add_layer_norm, rms_norm / add_rms_norm, attention,
bias_gelu and gated_act record one C++ autograd node that calls the CPU kernels itself. Its
meaning is the custom ops' (the same kernels, the same autograd formula), so both paths must
agree bit for bit: outputs and every
gradient, on odd shapes, strided inputs, mixed dtypes and dropout. Accuracy against float64 is
the op tests' job (they run through this path); this file pins the equivalence, the routing
(that the path is taken where it should be, and only there) and the autograd behaviour
(in-place use of outputs, no-grad and inference mode, double backward: refused by the kernels,
differentiable through the oneDNN linear).
"""

from __future__ import annotations

import pytest
import torch

import fastattn
import fastattn.ops._common as common
from fastattn import _dispatch
from fastattn.ops import _gemm
from fastattn.ops.gated_act import gated_act

pytestmark = pytest.mark.skipif(
    not common._HAVE_EAGER or _dispatch.unavailable_reason("cpu", "cpu") is not None,
    reason="the C++ extension (cpu backend) is not usable here",
)


def _node(t: torch.Tensor) -> str:
    return t.grad_fn.name() if t.grad_fn is not None else ""


def _run(fn, inputs, seed=0):
    """Output(s) and the gradients of every input requiring one, for a random cotangent."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    torch.manual_seed(seed)
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(1)
    cot = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
    need = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(outs, need, cot, allow_unused=True)
    return outs, grads


def _both(fn, inputs, node: str):
    """Run ``fn`` on the C++ path and on the custom-op path; assert bitwise equality."""
    torch.manual_seed(0)
    probe = fn(*[t.detach().clone().requires_grad_(t.requires_grad) for t in inputs])
    probe = probe[0] if isinstance(probe, tuple) else probe
    assert node in _node(probe), f"expected the C++ node {node}, got {_node(probe)!r}"
    cpp = _run(fn, inputs)
    common._HAVE_EAGER = False
    try:
        torch.manual_seed(0)
        probe = fn(*[t.detach().clone().requires_grad_(t.requires_grad) for t in inputs])
        probe = probe[0] if isinstance(probe, tuple) else probe
        assert node not in _node(probe)
        py = _run(fn, inputs)
    finally:
        common._HAVE_EAGER = True
    for a, b in zip(cpp[0] + cpp[1], py[0] + py[1], strict=True):
        if a is None or b is None:
            assert a is None and b is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), (a - b).abs().max()


def _rand(*shape, dtype=torch.float32, grad=True):
    return torch.randn(*shape).to(dtype).requires_grad_(grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "shape,norm", [((1, 1), (1,)), ((3, 7, 129), (129,)), ((2, 5, 7, 3), (7, 3))]
)
def test_layer_norm_same_bits(dtype, shape, norm):
    x, w, b = _rand(*shape, dtype=dtype), _rand(*norm, dtype=dtype), _rand(*norm, dtype=dtype)
    _both(lambda x, w, b: fastattn.layer_norm(x, norm, w, b), (x, w, b), "LayerNormFn")
    _both(lambda x: fastattn.layer_norm(x, norm), (x,), "LayerNormFn")  # no affine


def test_layer_norm_strided_and_out_dtype():
    x = _rand(9, 40).t()  # non-contiguous [40, 9]
    w = _rand(9)
    _both(lambda x, w: fastattn.layer_norm(x, (9,), w, None), (x, w), "LayerNormFn")
    _both(
        lambda x, w: fastattn.layer_norm(x, (9,), w, None, out_dtype=torch.bfloat16),
        (x, w),
        "LayerNormFn",
    )


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize(
    "xdt,rdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (None, None)]
)
def test_add_layer_norm_same_bits(p, xdt, rdt):
    x = _rand(4, 13, 67, dtype=xdt or torch.float32)
    r = _rand(4, 13, 67, dtype=rdt) if rdt is not None else None
    w, b = _rand(67), _rand(67, grad=False)
    inputs = (x, w, b) if r is None else (x, r, w, b)

    def fn(*t):
        if r is None:
            x, w, b = t
            return fastattn.add_layer_norm(x, None, (67,), w, b, dropout_p=p)
        x, r_, w, b = t
        return fastattn.add_layer_norm(x, r_, (67,), w, b, dropout_p=p)

    if r is None and p == 0:
        pytest.skip("no residual and no dropout: plain layer_norm, covered above")
    _both(fn, inputs, "LayerNormFn")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "kw",
    [
        dict(causal=True),
        dict(causal=False),
        dict(causal=True, window=(5, 0)),
        dict(causal=True, softcap=7.0),
        dict(causal=True, alignment="top_left"),
        dict(causal=True, dropout_p=0.25),
    ],
    ids=["causal", "full", "window", "softcap", "top_left", "dropout"],
)
def test_attention_same_bits(dtype, kw):
    B, Hq, Hkv, Tq, Tk, D = 2, 4, 2, 13, 17, 24  # GQA, Tq != Tk, odd lengths
    q = _rand(B, Tq, Hq, D, dtype=dtype).transpose(1, 2)  # strided, as after a projection
    k = _rand(B, Hkv, Tk, D, dtype=dtype)
    v = _rand(B, Hkv, Tk, D, dtype=dtype)
    _both(lambda q, k, v: fastattn.attention(q, k, v, **kw), (q, k, v), "AttentionFn")


def test_attention_key_padding_mask_same_bits():
    q, k, v = (_rand(2, 3, 11, 16) for _ in range(3))
    kpm = torch.zeros(2, 11, dtype=torch.bool)
    kpm[0, 7:] = True
    _both(
        lambda q, k, v: fastattn.attention(q, k, v, causal=True, key_padding_mask=kpm),
        (q, k, v),
        "AttentionFn",
    )


def test_attention_with_bias_stays_on_the_custom_ops():
    q, k, v = (_rand(1, 2, 5, 8) for _ in range(3))
    bias = _rand(1, 2, 5, 5)
    out = fastattn.attention(q, k, v, attn_bias=bias)
    assert "AttentionFn" not in _node(out)
    out.sum().backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize(
    "xdt,bdt",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, None)],
)
def test_bias_gelu_same_bits(approximate, xdt, bdt):
    x = _rand(3, 5, 131, dtype=xdt)
    if bdt is None:
        _both(lambda x: fastattn.bias_gelu(x, None, approximate), (x,), "BiasGeluFn")
    else:
        b = _rand(131, dtype=bdt)
        _both(lambda x, b: fastattn.bias_gelu(x, b, approximate), (x, b), "BiasGeluFn")


def test_routing_follows_the_backend_in_force():
    x = _rand(4, 8)
    assert "LayerNormFn" in _node(fastattn.layer_norm(x, (8,)))
    assert fastattn.last_backend("layer_norm") == "cpu"
    with fastattn.use_backend("reference"):
        y = fastattn.layer_norm(x, (8,))
        assert "LayerNormFn" not in _node(y)
        assert fastattn.last_backend("layer_norm") == "reference"
    y.sum().backward()  # the reference served the backward too
    with fastattn.use_backend("cpu"):
        assert "AttentionFn" in _node(fastattn.attention(*(_rand(1, 1, 3, 4) for _ in range(3))))


def test_outputs_are_plain_tensors():
    """In-place updates of an output that is not saved (the normalised output) work as after
    F.layer_norm."""
    x, r, w = _rand(3, 16), _rand(3, 16), _rand(16)
    out, s = fastattn.add_layer_norm(x, r, (16,), w)
    out.mul_(2)
    (out.sum() + (s * s).sum()).backward()
    ref = [t.detach().clone().requires_grad_() for t in (x, r, w)]
    ref_s = ref[0] + ref[1]
    ref_out = torch.nn.functional.layer_norm(ref_s, (16,), ref[2]) * 2
    (ref_out.sum() + (ref_s * ref_s).sum()).backward()
    for a, b in zip((x, r, w), ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_no_grad_and_inference_mode():
    x, w = _rand(5, 32), _rand(32)
    ref = fastattn.layer_norm(x, (32,), w).detach()
    with torch.no_grad():
        a = fastattn.layer_norm(x, (32,), w)
    with torch.inference_mode():
        b = fastattn.layer_norm(x.detach(), (32,), w.detach())
        c = fastattn.bias_gelu(x.detach())
        d = fastattn.attention(*(x.detach().view(1, 1, 5, 32),) * 3, causal=True)
    assert a.grad_fn is None and not a.requires_grad
    assert torch.equal(a, ref) and torch.equal(b, ref)
    assert c.shape == x.shape and d.shape == (1, 1, 5, 32)


@pytest.mark.parametrize("eager", [True, False], ids=["cpp", "custom_op"])
@pytest.mark.parametrize("op", ["layer_norm", "bias_gelu", "attention"])
def test_double_backward_refused_first_derivative_right(eager, op, monkeypatch):
    monkeypatch.setattr(common, "_HAVE_EAGER", eager)
    f = {
        "layer_norm": (lambda x: fastattn.layer_norm(x, (8,)), (3, 8)),
        "bias_gelu": (lambda x: fastattn.bias_gelu(x), (3, 8)),
        "attention": (lambda x: fastattn.attention(x, x, x, causal=True), (1, 2, 5, 8)),
    }[op]
    fn, shape = f
    x = _rand(*shape)
    (g,) = torch.autograd.grad((fn(x) ** 3).sum(), x, create_graph=True)
    (g1,) = torch.autograd.grad((fn(x) ** 3).sum(), x)
    assert torch.equal(g.detach(), g1)  # create_graph does not change the first derivative
    with pytest.raises(RuntimeError, match="differentiate twice|double backward"):
        (g.sum() + x.sum()).backward()


@pytest.mark.parametrize("eager", [True, False], ids=["cpp", "custom_op"])
def test_in_place_change_of_a_saved_output_is_caught(eager, monkeypatch):
    """The sum of add_layer_norm is saved for the backward: modifying it in place before the
    backward must raise (autograd's version check), never give a wrong gradient."""
    monkeypatch.setattr(common, "_HAVE_EAGER", eager)
    x, r = _rand(3, 16), _rand(3, 16)
    out, s = fastattn.add_layer_norm(x, r, (16,))
    s.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "kw",
    [{}, dict(weight_offset=1.0), dict(cast_before_weight=True)],
    ids=["plain", "gemma", "llama"],
)
def test_rms_norm_same_bits(dtype, kw):
    x, r, w = _rand(3, 7, 129, dtype=dtype), _rand(3, 7, 129, dtype=dtype), _rand(129)
    _both(lambda x, w: fastattn.rms_norm(x, (129,), w, 1e-6, **kw), (x, w), "RMSNormFn")
    _both(lambda x, r, w: fastattn.add_rms_norm(x, r, (129,), w, **kw), (x, r, w), "RMSNormFn")
    if not kw:
        _both(lambda x: fastattn.rms_norm(x, (7, 129)), (x,), "RMSNormFn")  # no weight, 2-D shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_gated_act_same_bits(dtype, activation):
    gu = _rand(2, 9, 2 * 67, dtype=dtype)
    _both(lambda gu: gated_act(gu, None, activation), (gu,), "GatedActFn")  # packed

    def halves(gu):  # the chunked halves of one projection: row-strided views
        g, u = gu.chunk(2, dim=-1)
        return gated_act(g, u, activation)

    _both(halves, (gu,), "GatedActFn")
    g, u = _rand(5, 31, dtype=dtype), _rand(5, 31, dtype=dtype, grad=False)
    _both(lambda g, u: gated_act(g, u, activation), (g, u), "GatedActFn")


@pytest.mark.skipif(not _gemm._HAVE_ONEDNN, reason="torch without oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_same_bits(dtype, bias, monkeypatch):
    """fastattn/ops/_gemm.py's oneDNN path: the C++ node against the Python _OneDNNLinear."""
    monkeypatch.setenv("FASTATTN_GEMM", "onednn")
    x = _rand(3, 7, 40, dtype=dtype)[:, :, :33]  # strided rows
    w, b = _rand(29, 33, dtype=dtype), (_rand(29, dtype=dtype) if bias else None)
    inputs = (x, w, b) if bias else (x, w)
    _both(lambda *t: _gemm.linear(*t), inputs, "OneDNNLinearFn")


def test_onednn_linear_under_autocast(monkeypatch):
    if not _gemm._HAVE_ONEDNN:
        pytest.skip("torch without oneDNN")
    monkeypatch.setenv("FASTATTN_GEMM", "onednn")
    x, w, b = _rand(5, 16), _rand(8, 16), _rand(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = _gemm.linear(x, w, b)
        ref = torch.nn.functional.linear(x, w, b)
    assert "OneDNNLinearFn" in _node(y) and y.dtype == ref.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("eager", [True, False], ids=["cpp", "python"])
@pytest.mark.parametrize("path", ["onednn", "torch"])
def test_linear_double_backward_matches_f_linear(path, eager, monkeypatch):
    """A gradient of a gradient through fastattn.nn.Linear's GEMM path (a gradient penalty)
    equals F.linear's: the oneDNN linear's backward (C++ node, or the Python _OneDNNLinear
    without the extension) runs on differentiable ops under create_graph=True."""
    if path == "onednn" and not _gemm._HAVE_ONEDNN:
        pytest.skip("torch without oneDNN")
    monkeypatch.setenv("FASTATTN_GEMM", path)
    monkeypatch.setattr(common, "_HAVE_EAGER", eager)
    results = []
    for fn in (_gemm.linear, torch.nn.functional.linear):
        torch.manual_seed(3)
        x, w, b = (t.detach().requires_grad_() for t in (_rand(4, 5, 12), _rand(7, 12), _rand(7)))
        y = fn(x, w, b)
        if fn is _gemm.linear and path == "onednn":
            assert ("OneDNNLinearFn" in _node(y)) == eager
        (gx,) = torch.autograd.grad((torch.tanh(y) ** 2).sum(), x, create_graph=True)
        (gx.pow(2).sum() + gx.sum()).backward()
        results.append((x.grad, w.grad, b.grad))
    for a, c in zip(*results, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
