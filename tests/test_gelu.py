"""bias_gelu, feed_forward, nn.GELU and nn.FeedForward on every backend available here.

Error rule (tests/rule.py): against the float64 reference, a kernel in dtype X passes when its
max abs error is <= 2 x (PyTorch's own error in X, computed the same way) + a small floor, for the
output and every gradient. Triton runs through its interpreter on CPU tensors (small shapes)
where no CUDA GPU is visible, compiled on the GPU (full shapes) otherwise.

Run: pytest tests/test_gelu.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.nn import GELU, FeedForward
from fastattn.ops.gelu import bias_gelu_reference
from fastattn.triton import interpreting

CPU_BACKENDS = fastattn.available_backends("cpu")
# The triton backend runs on CPU tensors under Triton's interpreter (no GPU: conftest switches it
# on), compiled on the GPU otherwise.
TRITON_DEV = "cpu" if interpreting() else "cuda"
APPROX = ("none", "tanh")


def _floor(dtype: torch.dtype, scale: float) -> float:
    return 4 * torch.finfo(dtype).eps * max(1.0, scale)


def _check(name: str, got: torch.Tensor, ours_ref: torch.Tensor, torch_x: torch.Tensor) -> None:
    """got / torch_x: the kernel's and torch's results in dtype X; ours_ref: float64 reference."""
    assert got.shape == ours_ref.shape, name
    assert not torch.isnan(got).any(), f"{name}: NaN (an unwritten element?)"
    err = (got.double() - ours_ref).abs().max().item()
    torch_err = (torch_x.double() - ours_ref).abs().max().item()
    bound = 2 * torch_err + _floor(got.dtype, ours_ref.abs().max().item())
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (torch's own: {torch_err:.3g})"


def _interpreted(backend: str) -> bool:
    return backend == "triton" and interpreting()


def _shapes(backend: str):
    if _interpreted(backend):  # the interpreter is slow: small shapes, odd widths
        return [(1,), (7,), (3, 33), (2, 3, 1023), (2, 1, 3, 7)]
    return [(1,), (7,), (5, 1023), (2, 3, 3071), (2, 3, 4, 7), (67, 1)]


def _backend_params():
    out = [b for b in CPU_BACKENDS if b != "triton"]
    if "triton" in fastattn.available_backends(TRITON_DEV):
        out.append(pytest.param("triton", marks=pytest.mark.triton))
    return out


def _dtypes(backend: str):
    return [torch.float32] if _interpreted(backend) else [torch.float32, torch.bfloat16]


def _run_bias_gelu(backend, x, b, approximate, g):
    """The backend's (y, dx, dbias) on the CPU; triton runs on TRITON_DEV."""
    dev = TRITON_DEV if backend == "triton" else "cpu"
    x = x.detach().to(dev, copy=True).requires_grad_()
    b = b.detach().to(dev, copy=True).requires_grad_() if b is not None else None
    with fastattn.use_backend(backend):
        y = fastattn.bias_gelu(x, b, approximate)
        assert fastattn.last_backend("bias_gelu") == backend
        y.backward(g.to(dev))
    cpu = lambda t: t.cpu() if t is not None else None
    return cpu(y.detach()), cpu(x.grad), cpu(b.grad if b is not None else None)


def _torch_and_ref(x, b, approximate, g):
    """(torch's own results in x's dtype, float64 reference results): out, dx, db."""
    res = []
    for dt in (x.dtype, torch.float64):
        xx = x.detach().to(dt).requires_grad_()
        bb = b.detach().to(dt).requires_grad_() if b is not None else None
        y = F.gelu(xx + bb if bb is not None else xx, approximate=approximate)
        if dt == torch.float64:
            y = bias_gelu_reference(xx, bb, approximate)
        y.backward(g.to(dt))
        res.append((y.detach(), xx.grad, bb.grad if bb is not None else None))
    return res


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("approximate", APPROX)
def test_bias_gelu_matches_reference(backend, approximate):
    torch.manual_seed(0)
    for dtype in _dtypes(backend):
        for shape in _shapes(backend):
            for with_bias in (True, False):
                x = torch.randn(shape) * 3
                b = torch.randn(shape[-1]) if with_bias else None
                x, g = x.to(dtype), torch.randn(shape).to(dtype)
                b = b.to(dtype) if b is not None else None
                y, dx, db = _run_bias_gelu(backend, x, b, approximate, g)
                (ty, tdx, tdb), (ry, rdx, rdb) = _torch_and_ref(x, b, approximate, g)
                tag = f"{backend} {approximate} {dtype} {shape} bias={with_bias}"
                _check(f"out {tag}", y, ry, ty)
                _check(f"dx {tag}", dx, rdx, tdx)
                if with_bias:
                    _check(f"dbias {tag}", db, rdb, tdb)


@pytest.mark.parametrize("backend", _backend_params())
def test_bias_gelu_non_contiguous(backend):
    torch.manual_seed(1)
    base = torch.randn(2, 33, 10) * 3
    x = base.transpose(1, 2)  # (2, 10, 33), last-dim stride 10
    assert not x.is_contiguous()
    b = torch.randn(66)[::2]  # non-contiguous bias of 33
    g = torch.randn(2, 10, 33).transpose(0, 1).contiguous().transpose(0, 1)
    for approximate in APPROX:
        y, dx, db = _run_bias_gelu(backend, x, b, approximate, g)
        (ty, tdx, tdb), (ry, rdx, rdb) = _torch_and_ref(x, b, approximate, g)
        _check("out", y, ry, ty)
        _check("dx", dx, rdx, tdx)
        _check("dbias", db, rdb, tdb)


def test_backends_agree():
    torch.manual_seed(2)
    x, b, g = torch.randn(9, 130) * 3, torch.randn(130), torch.randn(9, 130)
    results = {be: _run_bias_gelu(be, x, b, "none", g) for be in CPU_BACKENDS}
    first = next(iter(results.values()))
    for be, res in results.items():
        for a, r in zip(res, first, strict=True):
            torch.testing.assert_close(
                a, r, rtol=1e-5, atol=1e-5, msg=lambda m, be=be: f"{be}: {m}"
            )


def test_dbias_deterministic():
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("cpu backend not built")
    torch.manual_seed(3)
    x, b, g = torch.randn(1031, 257), torch.randn(257), torch.randn(1031, 257)
    r1 = _run_bias_gelu("cpu", x, b, "tanh", g)
    r2 = _run_bias_gelu("cpu", x, b, "tanh", g)
    assert torch.equal(r1[2], r2[2])


@pytest.mark.parametrize("backend", _backend_params())
def test_large_inputs_no_nan(backend):
    vals = [1e4, -1e4, 80.0, -80.0, 0.0, 10.5, -10.5, 9.5, -9.5]
    if backend != "reference":  # plain PyTorch's tanh derivative overflows to NaN there
        vals += [3e38, -3e38]
    x = torch.tensor([vals])
    for approximate in APPROX:
        y, dx, _ = _run_bias_gelu(backend, x, None, approximate, torch.ones_like(x))
        assert torch.isfinite(y).all() and torch.isfinite(dx).all(), (approximate, y, dx)
        ref = bias_gelu_reference(x.double(), None, approximate)
        torch.testing.assert_close(y.double(), ref.nan_to_num(0.0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dx[0, :4], torch.tensor([1.0, 0.0, 1.0, 0.0]))


@pytest.mark.parametrize("approximate", APPROX)
def test_gradcheck_float64(approximate):
    torch.manual_seed(4)
    x = (torch.randn(5, 7, dtype=torch.float64) * 2).requires_grad_()
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: fastattn.bias_gelu(x, b, approximate), (x, b))
    w1 = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    b1 = torch.randn(6, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    b2 = torch.randn(7, dtype=torch.float64, requires_grad=True)
    fn = lambda *a: fastattn.feed_forward(*a, approximate=approximate)
    assert torch.autograd.gradcheck(fn, (x, w1, b1, w2, b2))


def test_opcheck():
    x, b = torch.randn(4, 9), torch.randn(9)
    for approximate in APPROX:
        torch.library.opcheck(torch.ops.fastattn.bias_gelu_fwd, (x, b, approximate))
        torch.library.opcheck(torch.ops.fastattn.bias_gelu_fwd, (x, None, approximate))
        torch.library.opcheck(
            torch.ops.fastattn.bias_gelu_bwd, (torch.randn(4, 9), x, b, approximate, True, "auto")
        )


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("approximate", APPROX)
def test_feed_forward_matches_reference(backend, approximate):
    torch.manual_seed(5)
    d, h = 31, 67
    params = [
        torch.randn(h, d) / d**0.5,
        torch.randn(h),
        torch.randn(d, h) / h**0.5,
        torch.randn(d),
    ]
    x, g = torch.randn(3, 5, d), torch.randn(3, 5, d)
    outs = {}
    for tag, dt in (("ours", torch.float32), ("torch", torch.float32), ("ref", torch.float64)):
        xx = x.to(dt).clone().requires_grad_()
        ps = [p.to(dt).clone().requires_grad_() for p in params]
        if tag == "ours":
            with fastattn.use_backend(backend):
                y = fastattn.feed_forward(xx, *ps, approximate=approximate)
                assert fastattn.last_backend("bias_gelu") == backend
                y.backward(g.to(dt))
        else:
            hh = F.linear(xx, ps[0], ps[1])
            act = (
                F.gelu(hh, approximate=approximate)
                if tag == "torch"
                else bias_gelu_reference(hh, None, approximate)
            )
            y = F.linear(act, ps[2], ps[3])
            y.backward(g.to(dt))
        outs[tag] = [y.detach(), xx.grad] + [p.grad for p in ps]
    for name, a, t, r in zip(
        ("out", "dx", "dw1", "db1", "dw2", "db2"),
        outs["ours"],
        outs["torch"],
        outs["ref"],
        strict=True,
    ):
        _check(f"{name} {backend} {approximate}", a, r, t)


def test_feed_forward_without_biases():
    torch.manual_seed(6)
    x, w1, w2 = torch.randn(4, 8), torch.randn(16, 8), torch.randn(8, 16)
    ref = F.linear(F.gelu(F.linear(x, w1)), w2)
    torch.testing.assert_close(fastattn.feed_forward(x, w1, None, w2, None), ref)


# ----------------------------------------------------------------------------- bad input
_x = torch.randn(4, 8)

BAD = [
    (lambda: fastattn.bias_gelu([1.0], None), TypeError, "must be a torch.Tensor"),
    (lambda: fastattn.bias_gelu(torch.ones(3, dtype=torch.int64)), TypeError, "floating-point"),
    (lambda: fastattn.bias_gelu(torch.tensor(1.0)), ValueError, "at least one dim"),
    (lambda: fastattn.bias_gelu(_x, torch.randn(7)), ValueError, r"1-D with 8 elements"),
    (lambda: fastattn.bias_gelu(_x, torch.randn(2, 8)), ValueError, r"1-D with 8 elements"),
    (lambda: fastattn.bias_gelu(_x, torch.randn(8, dtype=torch.float64)), TypeError, "dtype"),
    (lambda: fastattn.bias_gelu(_x, None, "erf"), ValueError, "approximate must be 'none' or 'tanh'"),
    (lambda: fastattn.bias_gelu(_x, None, None), ValueError, "approximate"),
    (lambda: fastattn.feed_forward(_x, torch.randn(16, 7), None, torch.randn(8, 16), None), ValueError, "w1.shape"),
    (lambda: fastattn.feed_forward(_x, torch.randn(16, 8), None, torch.randn(8, 15), None), ValueError, "d_hidden"),
    (lambda: fastattn.feed_forward(_x, torch.randn(16, 8), torch.randn(15), torch.randn(8, 16), None), ValueError, "b1"),
    (lambda: fastattn.feed_forward(_x, torch.randn(16, 8), None, torch.randn(8, 16), torch.randn(9)), ValueError, "b2"),
    (lambda: fastattn.feed_forward(_x, torch.randn(16, 8, 1), None, torch.randn(8, 16), None), ValueError, "2-D"),
    (lambda: fastattn.feed_forward(_x, torch.randn(16, 8).double(), None, torch.randn(8, 16), None), TypeError, "dtype"),
    (lambda: torch.ops.fastattn_C.bias_gelu_fwd(_x, None, "fast"), RuntimeError, 'approximate must be "none" or "tanh"'),
    (lambda: torch.ops.fastattn_C.bias_gelu_fwd(torch.randn(8), None, "none"), RuntimeError, "must be 2-D"),
    (lambda: torch.ops.fastattn_C.bias_gelu_fwd(_x, torch.randn(9), "none"), RuntimeError, r"bias must have shape \[8\]"),
    (lambda: torch.ops.fastattn_C.bias_gelu_fwd(_x.half(), None, "none"), RuntimeError, "float32, bfloat16 or float64"),
    (lambda: torch.ops.fastattn_C.bias_gelu_bwd(torch.randn(4, 7), _x, None, "none", False), RuntimeError, r"dout must have shape \[4, 8\]"),
    (lambda: torch.ops.fastattn_C.bias_gelu_bwd(_x, _x, None, "none", True), RuntimeError, "need_bias_grad without a bias"),
    (lambda: GELU("fast"), ValueError, "approximate"),
    (lambda: FeedForward(8, approximate="erf"), ValueError, "approximate"),
    (lambda: FeedForward(8, dropout=1.5), ValueError, "dropout"),
]  # fmt: skip


@pytest.mark.parametrize("fn,exc,match", BAD)
def test_bad_input(fn, exc, match):
    if "fastattn_C" in fn.__code__.co_names and "cpu" not in CPU_BACKENDS:
        pytest.skip("cpu extension not built")
    with pytest.raises(exc, match=match):
        fn()


def test_explicit_backend_unsupported_dtype():
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("cpu backend not built")
    with fastattn.use_backend("cpu"), pytest.raises(fastattn.BackendError, match="float16"):
        fastattn.bias_gelu(torch.randn(3, 4, dtype=torch.float16))
    # auto falls back to the reference
    y = fastattn.bias_gelu(torch.randn(3, 4, dtype=torch.float16))
    assert fastattn.last_backend("bias_gelu") == "reference" and y.dtype == torch.float16


# ----------------------------------------------------------------------------- modules
@pytest.mark.parametrize("approximate", APPROX)
def test_gelu_module(approximate):
    m, t = GELU(approximate), torch.nn.GELU(approximate)
    assert isinstance(m, torch.nn.GELU) and repr(m) == repr(t)
    x = torch.randn(2, 3, 5, requires_grad=True)
    torch.testing.assert_close(m(x), t(x))
    (gx,) = torch.autograd.grad(m(x).sum(), x)
    (tx,) = torch.autograd.grad(t(x).sum(), x)
    torch.testing.assert_close(gx, tx)


@pytest.mark.parametrize("approximate", APPROX)
def test_feed_forward_module(approximate):
    torch.manual_seed(7)
    ff = FeedForward(12, approximate=approximate)
    assert ff.fc1.weight.shape == (48, 12) and ff.fc2.weight.shape == (12, 48)
    assert list(ff.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    seq = torch.nn.Sequential(
        torch.nn.Linear(12, 48), torch.nn.GELU(approximate), torch.nn.Linear(48, 12)
    )
    seq.load_state_dict(
        {k.replace("fc1", "0").replace("fc2", "2"): v for k, v in ff.state_dict().items()}
    )
    x = torch.randn(3, 4, 12)
    torch.testing.assert_close(ff(x), seq(x))
    # state_dict round trip into a fresh module
    ff2 = FeedForward(12, approximate=approximate)
    ff2.load_state_dict(ff.state_dict())
    torch.testing.assert_close(ff2(x), ff(x))
    # no-bias, explicit hidden size, dtype
    ff3 = FeedForward(6, 10, bias=False, dtype=torch.float64)
    assert ff3.fc1.bias is None and ff3.fc1.weight.dtype == torch.float64
    assert list(ff3.state_dict()) == ["fc1.weight", "fc2.weight"]
    ff3(torch.randn(2, 6, dtype=torch.float64)).sum().backward()


def test_feed_forward_from_modules_shares_weights():
    l1, act, l2 = torch.nn.Linear(8, 20), torch.nn.GELU("tanh"), torch.nn.Linear(20, 8)
    ff = FeedForward.from_modules(l1, act, l2)
    assert ff.fc1.weight is l1.weight and ff.fc2.bias is l2.bias and ff.approximate == "tanh"
    x = torch.randn(5, 8)
    torch.testing.assert_close(ff(x), l2(act(l1(x))))
    with torch.no_grad():
        l1.weight.add_(1.0)
    torch.testing.assert_close(ff(x), l2(act(l1(x))))
    with pytest.raises(ValueError, match="in_features"):
        FeedForward.from_modules(l1, act, torch.nn.Linear(21, 8))
    with pytest.raises(ValueError, match="d_model"):
        FeedForward.from_modules(l1, act, torch.nn.Linear(20, 9))
    with pytest.raises(TypeError, match="torch.nn.GELU"):
        FeedForward.from_modules(l1, torch.nn.ReLU(), l2)
    with pytest.raises(ValueError, match="both have a bias"):
        FeedForward.from_modules(l1, act, torch.nn.Linear(20, 8, bias=False))


def test_feed_forward_dropout_train_eval():
    ff = FeedForward(8, dropout=0.5)
    x = torch.randn(64, 8)
    ff.eval()
    torch.testing.assert_close(ff(x), ff(x))
    ff.train()
    assert (ff(x) == 0).any()


def test_compile_fullgraph():
    torch.manual_seed(8)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ff = FeedForward(16, 24)
            self.act = GELU("tanh")

        def forward(self, x):
            return self.act(x + self.ff(x))

    m = Block()
    x = torch.randn(2, 5, 16, requires_grad=True)
    ref = m(x)
    (gref,) = torch.autograd.grad(ref.sum(), x)
    # aot_eager traces forward and backward through the fake impls and the registered
    # autograd (as inductor does) without a minute of C++ compilation.
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = cm(x)
    (g,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, gref)


@pytest.mark.parametrize("approximate", APPROX)
def test_cpu_kernel_dense_grid_accuracy(approximate):
    """The vectorised erf / sigmoid forms over a dense grid: no worse than torch's own float32."""
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("cpu backend not built")
    x = torch.linspace(-9, 9, 7 * 28573).reshape(7, -1)  # 28573 columns: a scalar tail per row
    y = torch.ops.fastattn_C.bias_gelu_fwd(x, None, approximate)
    dx, _ = torch.ops.fastattn_C.bias_gelu_bwd(torch.ones_like(x), x, None, approximate, False)
    xd = x.double()
    ref = bias_gelu_reference(xd, None, approximate)
    dref = fastattn.ops.gelu.bias_gelu_grad_reference(xd, approximate)
    xt = x.clone().requires_grad_()
    yt = F.gelu(xt, approximate=approximate)
    yt.backward(torch.ones_like(x))
    _check(f"out {approximate}", y, ref, yt.detach())
    _check(f"dx {approximate}", dx, dref, xt.grad)


# float32 outputs of 16 MiB and more are written with streaming stores (forward y, backward dx).
# Rows are independent, so the first rows of a streamed call equal a small call's bit for bit;
# the whole call against the float64 reference with the rule.
@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="cpu backend not built")
@pytest.mark.parametrize("approximate", APPROX)
def test_streamed_outputs_match_plain_stores(approximate):
    n, m, k = 1100, 4096, 64  # 1100 x 4096 x 4 B = 17.2 MiB: past the streaming threshold
    x, b, g = torch.randn(n, m) * 2, torch.randn(m), torch.randn(n, m)
    big = _run_bias_gelu("cpu", x, b, approximate, g)
    small = _run_bias_gelu("cpu", x[:k], b, approximate, g[:k])
    for name, a, c in zip(("out", "dx"), big[:2], small[:2], strict=True):
        assert torch.equal(a[:k], c), f"{name}: streamed rows differ from plainly stored ones"
    theirs, ref = _torch_and_ref(x, b, approximate, g)
    for name, a, t, r in zip(("out", "dx", "dbias"), big, theirs, ref, strict=True):
        _check(name, a, r, t)
