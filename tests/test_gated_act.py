"""swiglu / geglu / gated_act, gated_feed_forward, nn.GatedFeedForward and the gated-MLP swap of
patch() on every backend available here.

Error rule (tests/rule.py): against the float64 reference, a kernel in dtype X passes when its
max abs error is <= 2 x (PyTorch's own error in X, ``act(gate) * up`` with torch's activation in
X) + a small floor, for the output and both gradients. Triton runs through its interpreter on
CPU tensors (small shapes) where no CUDA GPU is visible.

Run: pytest tests/test_gated_act.py
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.nn import GatedFeedForward
from fastattn.ops.gated_act import ACTIVATIONS, gated_act, gated_act_reference
from fastattn.triton import interpreting
from tests.rule import assert_rule

CPU_BACKENDS = fastattn.available_backends("cpu")
TRITON_DEV = "cpu" if interpreting() else "cuda"
TORCH_ACT = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
}
LAYOUTS = ("contiguous", "chunked", "packed", "transposed")


def _interpreted(backend: str) -> bool:
    return backend == "triton" and interpreting()


def _backend_params():
    out = [b for b in CPU_BACKENDS if b != "triton"]
    if "triton" in fastattn.available_backends(TRITON_DEV):
        out.append(pytest.param("triton", marks=pytest.mark.triton))
    return out


def _shapes(backend: str):
    if _interpreted(backend):  # the interpreter is slow: small shapes, odd widths
        return [(1,), (7,), (3, 33), (2, 1, 3, 7)]
    return [(1,), (7,), (5, 1023), (2, 3, 67), (2, 3, 4, 7), (67, 1)]


def _dtypes(backend: str):
    if _interpreted(backend):
        return [torch.float32]
    if backend == "triton":
        return [torch.float32, torch.bfloat16, torch.float16]
    return [torch.float32, torch.bfloat16, torch.float64]


def _operands(layout: str, gu: torch.Tensor):
    """(gate, up) of one layout from a [..., 2H] tensor; up is None for the packed layout."""
    h = gu.shape[-1] // 2
    if layout == "packed":
        return gu, None
    if layout == "chunked":  # the halves of one fused projection: row-strided views
        return gu[..., :h], gu[..., h:]
    g, u = gu[..., :h].contiguous(), gu[..., h:].contiguous()
    if layout == "transposed":  # last-dim stride != 1 (copied once, then the same kernel)
        g = g.mT.contiguous().mT if g.dim() >= 2 else g
        u = u.mT.contiguous().mT if u.dim() >= 2 else u
    return g, u


def _run(backend, layout, gu, activation, dh):
    """The backend's (h, d(gu)) on the CPU: the gradient of both halves as one tensor."""
    dev = TRITON_DEV if backend == "triton" else "cpu"
    leaf = gu.detach().to(dev, copy=True).requires_grad_()
    g, u = _operands(layout, leaf)
    with fastattn.use_backend(backend):
        h = gated_act(g, u, activation)
        assert fastattn.last_backend("gated_act") == backend
        h.backward(dh.to(dev))
    return h.detach().cpu(), leaf.grad.cpu()


def _torch_and_ref(gu, activation, dh):
    """(torch's (h, d(gu)) in gu's dtype, the float64 reference's)."""
    res = []
    for dt in (gu.dtype, torch.float64):
        leaf = gu.detach().to(dt).requires_grad_()
        g, u = leaf.chunk(2, -1)
        h = (
            TORCH_ACT[activation](g) * u
            if dt != torch.float64
            else gated_act_reference(g, u, activation)
        )
        h.backward(dh.to(dt))
        res.append((h.detach(), leaf.grad))
    return res


def _check_all(tag, gu, activation, dh, h, dgu):
    (th, tdgu), (rh, rdgu) = _torch_and_ref(gu, activation, dh)
    k = gu.shape[-1] // 2
    assert_rule(f"out {tag}", h, th, rh)
    assert_rule(f"dgate {tag}", dgu[..., :k], tdgu[..., :k], rdgu[..., :k])
    assert_rule(f"dup {tag}", dgu[..., k:], tdgu[..., k:], rdgu[..., k:])


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gated_act_matches_reference(backend, activation):
    for dtype in _dtypes(backend):
        for shape in _shapes(backend):
            for layout in LAYOUTS:
                gu = (torch.randn(*shape[:-1], 2 * shape[-1]) * 3).to(dtype)
                dh = torch.randn(shape).to(dtype)
                h, dgu = _run(backend, layout, gu, activation, dh)
                _check_all(
                    f"{backend} {activation} {dtype} {shape} {layout}", gu, activation, dh, h, dgu
                )


@pytest.mark.parametrize("backend", _backend_params())
def test_strided_rows_and_expanded(backend):
    """Row strides that are not 2H (a slice of rows) and a broadcast (stride-0) up."""
    dev = TRITON_DEV if backend == "triton" else "cpu"
    base = torch.randn(9, 2, 40) * 3
    g = base[::2, 0, 3:36]  # (5, 33): row stride 160, offset 3
    u0 = torch.randn(33)
    u = u0.expand(5, 33)  # row stride 0
    dh = torch.randn(5, 33)
    for activation in ACTIVATIONS:
        # Fresh leaves with those strides each round (not the last round's accumulated .grad).
        gg = base.to(dev, copy=True)[::2, 0, 3:36].requires_grad_()
        uu = u0.to(dev, copy=True).expand(5, 33).requires_grad_()
        assert gg.stride() == (160, 1) and uu.stride() == (0, 1)
        with fastattn.use_backend(backend):
            h = gated_act(gg, uu, activation)
            h.backward(dh.to(dev))
        leaves = [t.detach().double().requires_grad_() for t in (g, u)]
        ref = gated_act_reference(*leaves, activation)
        ref.backward(dh.double())
        torch.testing.assert_close(h.detach().cpu().double(), ref.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gg.grad.cpu().double(), leaves[0].grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(uu.grad.cpu().double(), leaves[1].grad, rtol=1e-5, atol=1e-5)


def test_backends_agree():
    gu, dh = torch.randn(9, 2 * 130) * 3, torch.randn(9, 130)
    for activation in ACTIVATIONS:
        results = {be: _run(be, "chunked", gu, activation, dh) for be in CPU_BACKENDS}
        first = next(iter(results.values()))
        for be, res in results.items():
            for a, r in zip(res, first, strict=True):
                torch.testing.assert_close(
                    a, r, rtol=1e-5, atol=1e-5, msg=lambda m, be=be: f"{be} {activation}: {m}"
                )


@pytest.mark.parametrize("backend", _backend_params())
def test_large_inputs_no_nan(backend):
    vals = [1e4, -1e4, 80.0, -80.0, 87.9, -87.9, 88.5, -88.5, -90.0, -200.0, 0.0, 10.5, -10.5]
    if backend != "reference":  # plain PyTorch's derivatives overflow to NaN there
        vals += [3e38, -3e38]
    g = torch.tensor([vals])
    u = torch.ones_like(g)
    for activation in ACTIVATIONS:
        dev = TRITON_DEV if backend == "triton" else "cpu"
        gg = g.to(dev, copy=True).requires_grad_()
        uu = u.to(dev, copy=True).requires_grad_()
        with fastattn.use_backend(backend):
            h = gated_act(gg, uu, activation)
            h.backward(torch.ones_like(h))
        h, dg, du = h.detach().cpu(), gg.grad.cpu(), uu.grad.cpu()
        assert torch.isfinite(h).all() and torch.isfinite(dg).all() and torch.isfinite(du).all()
        ref = gated_act_reference(g.double(), u.double(), activation).nan_to_num(0.0)
        torch.testing.assert_close(h.double(), ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(du.double(), ref, rtol=1e-6, atol=1e-6)  # dup = act(g)
        torch.testing.assert_close(dg[0, :2], torch.tensor([1.0, 0.0]))  # act'(+-1e4)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_float64(activation):
    gu = (torch.randn(5, 14, dtype=torch.float64) * 2).requires_grad_()
    g, u = (t.detach().clone().requires_grad_() for t in gu.chunk(2, -1))
    assert torch.autograd.gradcheck(lambda a, b: gated_act(a, b, activation), (g, u))
    assert torch.autograd.gradcheck(lambda t: gated_act(t, None, activation), (gu,))
    assert torch.autograd.gradcheck(lambda t: gated_act(*t.chunk(2, -1), activation), (gu,))
    d, h = 7, 6
    x = torch.randn(3, d, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(h, d), torch.randn(h, d), torch.randn(d, h)]
    bs = [torch.randn(h), torch.randn(h), torch.randn(d)]
    ps = [t.double().requires_grad_() for t in ws + bs]

    def ff(x, wg, wu, wd, bg, bu, bd):
        return fastattn.gated_feed_forward(x, wg, wu, wd, bg, bu, bd, activation=activation)

    assert torch.autograd.gradcheck(ff, (x, *ps))
    packed = torch.cat(ws[:2]).double().requires_grad_()
    wd = ws[2].double().requires_grad_()
    fn = lambda x, w, wd: fastattn.gated_feed_forward(x, w, None, wd, activation=activation)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, packed, wd))


def test_opcheck():
    gu = torch.randn(4, 18)
    g, u = gu[:, :9], gu[:, 9:]
    dh = torch.randn(4, 9)
    for activation in ACTIVATIONS:
        op_f, op_b = torch.ops.fastattn.gated_act_fwd, torch.ops.fastattn.gated_act_bwd
        torch.library.opcheck(op_f, (g.contiguous(), u.contiguous(), activation))
        torch.library.opcheck(op_f, (g, u, activation))
        torch.library.opcheck(op_f, (gu, None, activation))
        torch.library.opcheck(op_b, (dh, g, u, activation, "auto"))
        torch.library.opcheck(op_b, (dh, gu, None, activation, "auto"))


def test_empty_and_one_element():
    for shape in [(0, 5), (3, 0), (1, 1)]:
        g = torch.randn(shape, requires_grad=True)
        u = torch.randn(shape, requires_grad=True)
        h = fastattn.swiglu(g, u)
        assert h.shape == shape
        h.sum().backward()
        assert g.grad.shape == shape and u.grad.shape == shape
    gu = torch.randn(2, 0, 6)
    assert fastattn.swiglu(gu).shape == (2, 0, 3)


def test_swiglu_geglu_are_torch():
    gu = torch.randn(3, 5, 22)
    g, u = gu.chunk(2, -1)
    torch.testing.assert_close(fastattn.swiglu(g, u), F.silu(g) * u)
    torch.testing.assert_close(fastattn.swiglu(gu), F.silu(g) * u)
    torch.testing.assert_close(fastattn.geglu(g, u), F.gelu(g) * u)
    torch.testing.assert_close(
        fastattn.geglu(g, u, approximate="tanh"), F.gelu(g, approximate="tanh") * u
    )


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cpu_kernel_dense_grid_accuracy(activation):
    """The vectorised forms over a dense grid: no worse than torch's own float32."""
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("cpu backend not built")
    g = torch.linspace(-30, 30, 7 * 28573).reshape(7, -1)  # 28573 columns: a scalar tail per row
    u = torch.ones_like(g)
    h = torch.ops.fastattn_C.gated_act_fwd(g, u, activation)
    dg, du = torch.ops.fastattn_C.gated_act_bwd(torch.ones_like(g), g, u, activation)
    g64 = g.double().requires_grad_()
    ref = gated_act_reference(g64, u.double(), activation)
    (dref,) = torch.autograd.grad(ref.sum(), g64)
    gt = g.clone().requires_grad_()
    ht = TORCH_ACT[activation](gt)
    ht.backward(torch.ones_like(g))
    assert_rule(f"out {activation}", h, ht.detach(), ref.detach())
    assert_rule(f"dup {activation}", du, ht.detach(), ref.detach())
    assert_rule(f"dgate {activation}", dg, gt.grad, dref)


def test_explicit_backend_unsupported_dtype():
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("cpu backend not built")
    g = torch.randn(3, 4, dtype=torch.float16)
    with fastattn.use_backend("cpu"), pytest.raises(fastattn.BackendError, match="float16"):
        fastattn.swiglu(g, g)
    h = fastattn.swiglu(g, g)  # auto falls back to the reference
    assert fastattn.last_backend("gated_act") == "reference" and h.dtype == torch.float16


# ----------------------------------------------------------------------------- gated_feed_forward
@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("form", ["separate", "biases", "packed"])
def test_gated_feed_forward_matches_reference(backend, activation, form):
    d, h = 31, 67
    ws = [torch.randn(h, d) / d**0.5, torch.randn(h, d) / d**0.5, torch.randn(d, h) / h**0.5]
    bs = [torch.randn(h), torch.randn(h), torch.randn(d)] if form == "biases" else [None] * 3
    x, dy = torch.randn(3, 5, d), torch.randn(3, 5, d)
    dev = TRITON_DEV if backend == "triton" else "cpu"
    outs = {}
    for tag, dt in (("ours", torch.float32), ("torch", torch.float32), ("ref", torch.float64)):
        on = dev if tag == "ours" else "cpu"
        leaf = lambda t: t.to(on, dt, copy=True).requires_grad_()  # noqa: E731
        xx = leaf(x)
        wg, wu, wd = (leaf(w) for w in ws)
        bg, bu, bd = (leaf(b) if b is not None else None for b in bs)
        if tag == "ours":
            with fastattn.use_backend(backend):
                if form == "packed":
                    wgu = torch.cat([wg, wu])  # differentiable: the gradients reach wg and wu
                    y = fastattn.gated_feed_forward(xx, wgu, None, wd, activation=activation)
                else:
                    y = fastattn.gated_feed_forward(xx, wg, wu, wd, bg, bu, bd, activation)
                assert fastattn.last_backend("gated_act") == backend
        else:
            act = TORCH_ACT[activation] if tag == "torch" else None
            a, b = F.linear(xx, wg, bg), F.linear(xx, wu, bu)
            hh = act(a) * b if act else gated_act_reference(a, b, activation)
            y = F.linear(hh, wd, bd)
        y.backward(dy.to(on, dt))
        leaves = [xx, wg, wu, wd] + [b for b in (bg, bu, bd) if b is not None]
        outs[tag] = [y.detach().cpu()] + [t.grad.cpu() for t in leaves]
    names = ["out", "dx", "dw_gate", "dw_up", "dw_down", "db_gate", "db_up", "db_down"]
    for name, a, t, r in zip(names, outs["ours"], outs["torch"], outs["ref"], strict=False):
        assert_rule(f"{name} {backend} {activation} {form}", a, t, r)


def test_gated_feed_forward_under_autocast_casts_like_linear():
    """Under autocast a bf16 input meets float32 weights, as nn.Linear allows there."""
    m = GatedFeedForward(16, 40, bias=True)
    x = torch.randn(3, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        ref = m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x))
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)
    with pytest.raises(TypeError, match="input's dtype"):  # outside autocast: refused by name
        m(x)


# ----------------------------------------------------------------------------- bad input
_g = torch.randn(4, 8)

BAD = [
    (lambda: fastattn.swiglu([1.0], _g), TypeError, "must be a torch.Tensor"),
    (lambda: fastattn.swiglu(_g, [1.0]), TypeError, "up must be a torch.Tensor"),
    (lambda: fastattn.swiglu(torch.ones(3, dtype=torch.int64)), TypeError, "floating-point"),
    (lambda: fastattn.swiglu(torch.tensor(1.0), torch.tensor(1.0)), ValueError, "at least one dim"),
    (lambda: fastattn.swiglu(_g, torch.randn(4, 7)), ValueError, r"same shape, got \(4, 8\) and \(4, 7\)"),
    (lambda: fastattn.swiglu(_g, torch.randn(8)), ValueError, "same shape"),
    (lambda: fastattn.swiglu(_g, _g.double()), TypeError, "same dtype, got torch.float32 and torch.float64"),
    (lambda: fastattn.swiglu(torch.randn(4, 7)), ValueError, "must be even"),
    (lambda: fastattn.geglu(_g, _g, approximate="erf"), ValueError, "approximate must be 'none' or 'tanh'"),
    (lambda: gated_act(_g, _g, "relu"), ValueError, "activation must be one of 'silu', 'gelu', 'gelu_tanh'"),
    (lambda: gated_act(_g, _g, None), ValueError, "activation"),
    (lambda: fastattn.gated_feed_forward(_g, torch.randn(16, 7), torch.randn(16, 8), torch.randn(8, 16)), ValueError, r"w_gate.shape\[1\] must be 8"),
    (lambda: fastattn.gated_feed_forward(_g, torch.randn(16, 8), torch.randn(15, 8), torch.randn(8, 16)), ValueError, "w_gate and w_up must have the same shape"),
    (lambda: fastattn.gated_feed_forward(_g, torch.randn(16, 8), torch.randn(16, 8), torch.randn(8, 15)), ValueError, r"w_down.shape\[1\] must be 16"),
    (lambda: fastattn.gated_feed_forward(_g, torch.randn(16, 8), torch.randn(16, 8), torch.randn(8, 16), torch.randn(15)), ValueError, "b_gate"),
    (lambda: fastattn.gated_feed_forward(_g, torch.randn(16, 8), torch.randn(16, 8), torch.randn(8, 16), b_down=torch.randn(9)), ValueError, "b_down"),
    (lambda: fastattn.gated_feed_forward(_g, torch.randn(16, 8).double(), torch.randn(16, 8), torch.randn(8, 16)), TypeError, "w_gate must have the input's dtype"),
    (lambda: fastattn.gated_feed_forward(_g, torch.randn(16, 8, 1), torch.randn(16, 8), torch.randn(8, 16)), ValueError, "2-D"),
    (lambda: fastattn.gated_feed_forward(_g, torch.randn(15, 8), None, torch.randn(8, 7)), ValueError, "even number of rows"),
    (lambda: fastattn.gated_feed_forward(_g, torch.randn(16, 8), None, torch.randn(8, 8), b_up=torch.randn(8)), ValueError, "pass its bias as b_gate"),
    (lambda: fastattn.gated_feed_forward(_g, torch.randn(16, 8), torch.randn(16, 8), torch.randn(8, 16), activation="gelu_new"), ValueError, "activation"),
    (lambda: torch.ops.fastattn_C.gated_act_fwd(_g, _g, "swish"), RuntimeError, 'activation must be "silu", "gelu" or "gelu_tanh"'),
    (lambda: torch.ops.fastattn_C.gated_act_fwd(torch.randn(8), None, "silu"), RuntimeError, "gate must be 2-D"),
    (lambda: torch.ops.fastattn_C.gated_act_fwd(_g, torch.randn(4, 9), "silu"), RuntimeError, "up must have the shape of gate"),
    (lambda: torch.ops.fastattn_C.gated_act_fwd(_g, _g.bfloat16(), "silu"), RuntimeError, "up must have the dtype of gate"),
    (lambda: torch.ops.fastattn_C.gated_act_fwd(_g.half(), None, "silu"), RuntimeError, "float32, bfloat16 or float64"),
    (lambda: torch.ops.fastattn_C.gated_act_fwd(torch.randn(4, 7), None, "silu"), RuntimeError, "even number of columns"),
    (lambda: torch.ops.fastattn_C.gated_act_bwd(torch.randn(4, 7), _g, _g, "silu"), RuntimeError, r"dh must have shape \[4, 8\]"),
    (lambda: torch.ops.fastattn_C.gated_act_bwd(torch.randn(4, 3), _g, None, "silu"), RuntimeError, r"dh must have shape \[4, 4\]"),
    (lambda: GatedFeedForward(8, 16, activation="relu"), ValueError, "activation"),
    (lambda: GatedFeedForward.from_modules(torch.nn.Linear(8, 16), torch.nn.Linear(8, 16), torch.nn.Linear(16, 8), torch.nn.ReLU()), TypeError, "ReLU is not SiLU or GELU"),
    (lambda: GatedFeedForward.from_modules(torch.nn.Linear(8, 16), torch.nn.Linear(8, 15), torch.nn.Linear(16, 8), "silu"), ValueError, "same shape"),
    (lambda: GatedFeedForward.from_modules(torch.nn.Linear(8, 16), torch.nn.Linear(8, 16), torch.nn.Linear(15, 8), "silu"), ValueError, "down_proj.in_features"),
    (lambda: GatedFeedForward.from_modules(torch.nn.Linear(8, 16), torch.nn.Identity(), torch.nn.Linear(16, 8), "silu"), TypeError, "up_proj must be a torch.nn.Linear"),
    (lambda: GatedFeedForward.from_packed(torch.nn.Linear(8, 15), torch.nn.Linear(7, 8), "silu"), ValueError, r"gate_up_proj.out_features \(15\) must be twice"),
    (lambda: GatedFeedForward.from_packed(torch.nn.Linear(8, 16), torch.nn.Linear(7, 8), "silu"), ValueError, r"down_proj.in_features \(7\)"),
    (lambda: GatedFeedForward.from_packed(torch.nn.Linear(8, 16), torch.nn.Linear(8, 8).double(), "silu"), TypeError, "share a dtype"),
    (lambda: GatedFeedForward.from_packed(torch.nn.Identity(), torch.nn.Linear(8, 8), "silu"), TypeError, "gate_up_proj must be a torch.nn.Linear"),
    (lambda: GatedFeedForward.from_packed(torch.nn.Linear(8, 16), torch.nn.Linear(8, 8), torch.nn.ReLU()), TypeError, "ReLU is not SiLU or GELU"),
]  # fmt: skip


@pytest.mark.parametrize("fn,exc,match", BAD)
def test_bad_input(fn, exc, match):
    if "fastattn_C" in fn.__code__.co_names and "cpu" not in CPU_BACKENDS:
        pytest.skip("cpu extension not built")
    with pytest.raises(exc, match=match):
        fn()


# ----------------------------------------------------------------------------- the module
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_module_matches_torch_and_state_dict(activation):
    m = GatedFeedForward(12, 34, activation=activation)
    assert list(m.state_dict()) == ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]
    assert m.gate_proj.weight.shape == (34, 12) and m.down_proj.weight.shape == (12, 34)
    x = torch.randn(3, 4, 12, requires_grad=True)
    act = TORCH_ACT[activation]
    ref = m.down_proj(act(m.gate_proj(x)) * m.up_proj(x))
    torch.testing.assert_close(m(x), ref)
    (gx,) = torch.autograd.grad(m(x).sum(), x)
    (rx,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(gx, rx)
    m2 = GatedFeedForward(12, 34, activation=activation)
    m2.load_state_dict(m.state_dict())
    torch.testing.assert_close(m2(x), m(x))
    mb = GatedFeedForward(6, 10, bias=True, dtype=torch.float64)
    assert mb.gate_proj.bias is not None and mb.down_proj.weight.dtype == torch.float64
    assert len(mb.state_dict()) == 6
    mb(torch.randn(2, 6, dtype=torch.float64)).sum().backward()
    assert repr(activation) in repr(m)


def test_from_modules_shares_parameters():
    g, u, d = (
        torch.nn.Linear(8, 20, bias=False),
        torch.nn.Linear(8, 20, bias=False),
        torch.nn.Linear(20, 8, bias=False),
    )
    m = GatedFeedForward.from_modules(g, u, d, torch.nn.GELU("tanh"))
    assert m.gate_proj is g and m.up_proj.weight is u.weight and m.activation == "gelu_tanh"
    x = torch.randn(5, 8)
    ref = lambda: d(F.gelu(g(x), approximate="tanh") * u(x))  # noqa: E731
    torch.testing.assert_close(m(x), ref())
    with torch.no_grad():
        g.weight.add_(1.0)
    torch.testing.assert_close(m(x), ref())
    assert GatedFeedForward.from_modules(g, u, d, torch.nn.SiLU()).activation == "silu"
    assert GatedFeedForward.from_modules(g, u, d, "gelu").activation == "gelu"


@pytest.mark.parametrize("bias", [False, True])
def test_from_packed_is_phi3s_mlp(bias):
    """Phi-3's packed MLP: h = gate_up_proj(x), gate / up its halves; the Linears are shared,
    the state_dict keys are the model's, values and gradients are its formula's."""
    gu, d = torch.nn.Linear(8, 2 * 13, bias=bias), torch.nn.Linear(13, 8, bias=bias)
    m = GatedFeedForward.from_packed(gu, d, torch.nn.SiLU())
    assert m.gate_up_proj is gu and m.down_proj is d and m.activation == "silu"
    assert [k.split(".")[0] for k in m.state_dict()] == ["gate_up_proj"] * (1 + bias) + [
        "down_proj"
    ] * (1 + bias)
    x = torch.randn(2, 7, 8, requires_grad=True)

    def ref():
        gate, up = gu(x).chunk(2, dim=-1)
        return d(up * F.silu(gate))

    out, expect = m(x), ref()
    torch.testing.assert_close(out, expect)
    dout = torch.randn_like(out)
    params = [x, *gu.parameters(), *d.parameters()]
    got = torch.autograd.grad(out, params, dout)
    want = torch.autograd.grad(expect, params, dout)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_compile_fullgraph():
    m = GatedFeedForward(16, 24)
    x = torch.randn(2, 5, 16, requires_grad=True)
    ref = m(x)
    (gref,) = torch.autograd.grad(ref.sum(), x)
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = cm(x)
    (g,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, gref)
    packed = torch.compile(lambda t: fastattn.swiglu(t), fullgraph=True, backend="aot_eager")
    gu = torch.randn(3, 10, requires_grad=True)
    torch.testing.assert_close(packed(gu), fastattn.swiglu(gu))


# ----------------------------------------------------------------------------- Hugging Face
V = 64


def _transformers():
    return pytest.importorskip("transformers")


def _tiny(kind: str, **kw):
    tr = _transformers()
    torch.manual_seed(0)
    common = dict(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if kind == "llama":
        model = tr.LlamaForCausalLM(tr.LlamaConfig(**common, **kw))
    elif kind == "qwen2":
        model = tr.Qwen2ForCausalLM(tr.Qwen2Config(**common, **kw))
    elif kind == "gemma":
        model = tr.GemmaForCausalLM(tr.GemmaConfig(**common, head_dim=8, **kw))
    elif kind == "gemma2":
        model = tr.Gemma2ForCausalLM(tr.Gemma2Config(**common, head_dim=8, **kw))
    else:
        raise ValueError(kind)
    model.set_attn_implementation("eager")
    return model


def _fwd_bwd(model, ids, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_hf_patched_mlp_logits_and_grads(kind, autocast):
    original = _tiny(kind, **({"mlp_bias": True} if kind == "llama" else {})).train()
    patched = copy.deepcopy(original)
    report = fastattn.patch(patched, attention=False, layer_norm=False, gelu=False)
    act = "gelu_tanh" if kind == "gemma" else "silu"
    entries = report.layers("gated_mlp", "replaced")
    assert [e.name for e in entries] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(e.after == f"fastattn.nn.GatedFeedForward({act!r})" for e in entries)
    assert isinstance(patched.model.layers[0].mlp, GatedFeedForward)
    assert patched.state_dict().keys() == original.state_dict().keys()
    ref64 = copy.deepcopy(original).double()
    ids = torch.randint(3, V, (2, 11))
    fastattn._dispatch._last.pop("gated_act", None)
    out, grads = _fwd_bwd(patched, ids, autocast)
    assert fastattn.last_backend("gated_act") is not None  # the patched MLPs ran the op
    t_out, t_grads = _fwd_bwd(original, ids, autocast)
    r_out, r_grads = _fwd_bwd(ref64, ids, False)
    assert_rule(f"logits {kind}", out, t_out, r_out)
    assert grads.keys() == t_grads.keys() == r_grads.keys()
    for name in grads:
        assert_rule(f"grad {name}", grads[name], t_grads[name], r_grads[name])


def test_hf_patch_twice_unpatch_restores():
    model = _tiny("qwen2").eval()
    ids = torch.randint(3, V, (1, 8))
    with torch.no_grad():
        before = model(ids).logits
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    first = fastattn.patch(model)
    again = fastattn.patch(model)
    assert len(first.layers("gated_mlp", "replaced")) == 2
    assert not again.layers("gated_mlp", "replaced")
    assert len(again.layers("gated_mlp", "unchanged")) == 2
    undone = fastattn.unpatch(model)
    assert len(undone.layers("gated_mlp", "restored")) == 2
    assert type(model.model.layers[0].mlp).__name__ == "Qwen2MLP"
    assert model.model.layers[0].mlp.gate_proj is model.model.layers[0].mlp.gate_proj
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_hf_report_lists_what_is_left_and_why():
    tr = _transformers()
    relu = _tiny("llama", hidden_act="relu")
    report = fastattn.patch(relu)
    left = report.layers("gated_mlp", "left")
    assert len(left) == 2 and "ReLU is not SiLU or GELU" in left[0].reason
    assert "left model.layers.0.mlp (LlamaMLP)" in str(report)

    class OddMLP(tr.models.llama.modeling_llama.LlamaMLP):
        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))

    model = _tiny("llama")
    model.model.layers[0].mlp.__class__ = OddMLP
    model.model.layers[1].mlp.down_proj.register_forward_hook(lambda *a: None)
    report = fastattn.patch(model)
    reasons = {e.name: e.reason for e in report.layers("gated_mlp", "left")}
    assert "not the standard down_proj" in reasons["model.layers.0.mlp"]
    assert "forward hooks" in reasons["model.layers.1.mlp"]
    assert type(model.model.layers[0].mlp) is OddMLP  # left alone
    # Gemma 2 reads hidden_activation; its GELU-tanh MLP is swapped.
    report = fastattn.patch(_tiny("gemma2"))
    assert [e.after for e in report.layers("gated_mlp", "replaced")] == [
        "fastattn.nn.GatedFeedForward('gelu_tanh')"
    ] * 2
    # gated_mlp=False leaves the MLPs (the GELU activation inside may still be swapped).
    report = fastattn.patch(_tiny("gemma"), gated_mlp=False)
    assert not report.layers("gated_mlp")


def test_hf_phi3_packed_mlp_swapped_or_left_and_why():
    tr = _transformers()
    cfg = tr.Phi3Config(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        pad_token_id=0,
    )
    model = tr.Phi3ForCausalLM(cfg).eval()
    ids = torch.randint(3, V, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
    report = fastattn.patch(model)
    entries = report.layers("gated_mlp", "replaced")
    assert [e.before for e in entries] == ["Phi3MLP"] * 2
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp, GatedFeedForward) and "gate_up_proj" in mlp._modules
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)
    fastattn.unpatch(model)
    assert type(model.model.layers[0].mlp).__name__ == "Phi3MLP"

    class OddPhi3MLP(tr.models.phi3.modeling_phi3.Phi3MLP):
        def forward(self, hidden_states):
            gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
            return self.down_proj(gate * self.activation_fn(up))  # the halves swapped

    odd = tr.Phi3ForCausalLM(cfg).eval()
    odd.model.layers[0].mlp.__class__ = OddPhi3MLP
    odd.model.layers[1].mlp.activation_fn = torch.nn.ReLU()
    report = fastattn.patch(odd)
    reasons = {e.name: e.reason for e in report.layers("gated_mlp", "left")}
    assert "not Phi-3's packed form" in reasons["model.layers.0.mlp"]
    assert "ReLU is not SiLU or GELU" in reasons["model.layers.1.mlp"]
    assert type(odd.model.layers[0].mlp) is OddPhi3MLP
