"""LayerNorm and add_layer_norm on every available backend against the float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.ops.layernorm import layer_norm_reference
from tests.rule import assert_rule, max_err

CPU_BACKENDS = [b for b in fastattn.available_backends("cpu") if b != "triton"]
# (rows shape, normalized_shape): last dims from 1 to 10000, 1 to many rows, 3-D/4-D inputs,
# normalized_shape of more than one dim.
SHAPES = [
    ((1,), (1,)),
    ((5,), (7,)),
    ((3, 17), (768,)),
    ((2, 3, 5), (1023,)),
    ((4, 11), (1500,)),
    ((3,), (4096,)),
    ((2,), (10000,)),
    ((257,), (64,)),
    ((3,), (5, 7)),
    ((2, 2), (3, 4, 5)),
]
DTYPES = [torch.float32, torch.bfloat16]


def _inputs(lead, norm, dtype, affine=True, bias=True, noncontig=False):
    shape = (*lead, *norm)
    if noncontig:
        # A transposed view of a bigger tensor: neither contiguous nor dense.
        x = (torch.randn(*reversed(shape), 2) * 3 + 1.5)[..., 0].permute(
            *reversed(range(len(shape)))
        )
    else:
        x = torch.randn(shape) * 3 + 1.5
    w = torch.randn(norm) if affine else None
    b = torch.randn(norm) if (affine and bias) else None
    return (
        x.to(dtype),
        (w.to(dtype) if w is not None else None),
        (b.to(dtype) if b is not None else None),
    )


def _grads(fn, tensors, dout):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    live = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, live, dout)
    return out.detach(), grads


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,norm", SHAPES)
def test_layer_norm_matches_reference(backend, dtype, lead, norm):
    x, w, b = _inputs(lead, norm, dtype)
    dout = torch.randn(x.shape).to(dtype)

    with fastattn.use_backend(backend):
        out, grads = _grads(
            lambda x, w, b: fastattn.layer_norm(x, norm, w, b, 1e-5), (x, w, b), dout
        )
    assert fastattn.last_backend("layer_norm") == backend
    t_out, t_grads = _grads(lambda x, w, b: F.layer_norm(x, norm, w, b, 1e-5), (x, w, b), dout)
    r_out, r_grads = _grads(
        lambda x, w, b: layer_norm_reference(x, norm, w, b, 1e-5),
        (x.double(), w.double(), b.double()),
        dout.double(),
    )
    assert out.dtype == dtype and out.shape == x.shape
    assert_rule("out", out, t_out, r_out)
    for name, g, tg, rg in zip(("dx", "dweight", "dbias"), grads, t_grads, r_grads, strict=True):
        assert g.dtype == dtype
        assert_rule(name, g, tg, rg)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("affine,bias", [(False, False), (True, False)])
@pytest.mark.parametrize("noncontig", [False, True])
def test_layer_norm_variants(backend, affine, bias, noncontig):
    norm = (333,)
    x, w, b = _inputs((7, 5), norm, torch.float32, affine, bias, noncontig)
    if noncontig:
        assert not x.is_contiguous()
    dout = torch.randn(x.shape)
    tensors = [t for t in (x, w, b) if t is not None]

    def call(fn, dt):
        def f(*ts):
            it = iter(ts)
            xx = next(it)
            ww = next(it) if w is not None else None
            bb = next(it) if b is not None else None
            return fn(xx, norm, ww, bb, 1e-5)

        return _grads(f, [t.to(dt) for t in tensors], dout.to(dt))

    with fastattn.use_backend(backend):
        out, grads = call(fastattn.layer_norm, torch.float32)
    t_out, t_grads = call(F.layer_norm, torch.float32)
    r_out, r_grads = call(layer_norm_reference, torch.float64)
    assert_rule("out", out, t_out, r_out)
    for g, tg, rg in zip(grads, t_grads, r_grads, strict=True):
        assert_rule("grad", g, tg, rg)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,m", [((1,), 1), ((3, 5), 769), ((64,), 1024)])
def test_add_layer_norm(backend, dtype, lead, m):
    x, w, b = _inputs(lead, (m,), dtype)
    r = (torch.randn(x.shape) * 2).to(dtype)
    dout, dsum = torch.randn(x.shape).to(dtype), torch.randn(x.shape).to(dtype)

    def run(fn, x, r, w, b):
        leaves = [t.detach().requires_grad_() for t in (x, r, w, b)]
        out, s = fn(*leaves)
        grads = torch.autograd.grad((out, s), leaves, (dout.to(x.dtype), dsum.to(x.dtype)))
        return out.detach(), s.detach(), grads

    def torch_add_ln(x, r, w, b):
        s = x + r
        return F.layer_norm(s, (m,), w, b), s

    def ref_add_ln(x, r, w, b):
        s = x + r
        return layer_norm_reference(s, (m,), w, b), s

    with fastattn.use_backend(backend):
        out, s, grads = run(
            lambda x, r, w, b: fastattn.add_layer_norm(x, r, (m,), w, b), x, r, w, b
        )
    t = run(torch_add_ln, x, r, w, b)
    ref = run(ref_add_ln, *(u.double() for u in (x, r, w, b)))
    assert_rule("out", out, t[0], ref[0])
    assert_rule("sum", s, t[1], ref[1])
    for name, g, tg, rg in zip(("dx", "dres", "dw", "db"), grads, t[2], ref[2], strict=True):
        assert_rule(name, g, tg, rg)


# Rows whose spread is small next to their mean: the row mean rounds to float, off by the same
# amount in every column, a relative error of ulp(mu) / spread in xhat (so in the output and
# dweight), amplified in dx by a formula that assumes sum(xhat) == 0. PyTorch's own error here
# is that of its rounded mean; the kernels correct for it and are 10-100x more accurate (0.00-0.12x
# PyTorch's error over 4096 rows, measured); the bound, 1/4 of PyTorch's error, fails the
# uncorrected formulas (0.4-1.8x). Triton runs it through the interpreter with fewer rows.
@pytest.mark.parametrize("backend", [*CPU_BACKENDS, "triton"])
@pytest.mark.parametrize("m", [2, 3, 37])
def test_rows_near_their_mean(backend, m):
    if backend not in fastattn.available_backends("cpu"):
        pytest.skip(f"{backend} not available")
    if backend == "reference":
        pytest.skip("the reference is PyTorch's own formula")
    n = 256 if backend == "triton" else 4096
    x = 2.5 + 0.02 * torch.randn(n, m)
    w = torch.randn(m)
    dout = torch.randn(n, m)

    def run(fn, dt):
        xx, ww = (t.to(dt).detach().requires_grad_() for t in (x, w))
        out = fn(xx, (m,), ww, None, 1e-5)
        return (out.detach(), *torch.autograd.grad(out, (xx, ww), dout.to(dt)))

    with fastattn.use_backend(backend):
        ours = run(fastattn.layer_norm, torch.float32)
    theirs = run(F.layer_norm, torch.float32)
    ref = run(layer_norm_reference, torch.float64)
    for name, a, t, r in zip(("out", "dx", "dweight"), ours, theirs, ref, strict=True):
        err, base = max_err(a, r), max_err(t, r)
        floor = 4 * torch.finfo(torch.float32).eps * r.abs().max().item()
        assert err <= 0.25 * base + floor, f"{name}: error {err:.3g}, PyTorch's {base:.3g}"


def test_backends_agree():
    x, w, b = _inputs((9, 4), (771,), torch.float32)
    outs = {}
    for backend in CPU_BACKENDS:
        with fastattn.use_backend(backend):
            outs[backend] = fastattn.layer_norm(x, (771,), w, b)
    ref = outs.pop("reference")
    for name, o in outs.items():
        torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5, msg=f"{name} vs reference")


def test_repeatable_bitwise():
    x, w, b = _inputs((513,), (768,), torch.float32)
    xs = x.detach().requires_grad_()
    ws = w.detach().requires_grad_()
    runs = []
    for _ in range(2):
        out = fastattn.layer_norm(xs, (768,), ws, b)
        runs.append((out, *torch.autograd.grad(out.sum(), (xs, ws))))
    for a, c in zip(*runs, strict=True):
        assert torch.equal(a, c)


def test_gradcheck_float64():
    x, w, b = (t.double().requires_grad_() for t in _inputs((3,), (6,), torch.float32))
    assert torch.autograd.gradcheck(lambda x, w, b: fastattn.layer_norm(x, (6,), w, b), (x, w, b))
    r = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, r, w, b: fastattn.add_layer_norm(x, r, (6,), w, b), (x, r, w, b)
    )


def test_opcheck():
    from fastattn.ops import layernorm as ln

    x, w, b = _inputs((5,), (37,), torch.float32)
    r = torch.randn_like(x)
    torch.library.opcheck(ln.layer_norm_fwd, (x, w, b, None, 1e-5, None, 0.0, None))
    torch.library.opcheck(ln.layer_norm_fwd, (x.requires_grad_(), w, b, r, 1e-5, None, 0.0, None))
    # mixed dtypes, a bfloat16 output and row dropout (the fused residual path of the GPT)
    xb = x.detach().bfloat16().requires_grad_()
    rr = r.clone().requires_grad_()
    torch.library.opcheck(
        ln.layer_norm_fwd, (xb, w, b, rr, 1e-5, torch.bfloat16, 0.25, torch.tensor(1234))
    )
    out = ln.layer_norm_fwd(x.detach(), w, b, None, 1e-5, None, 0.0, None)
    torch.library.opcheck(
        ln.layer_norm_bwd,
        (
            torch.randn_like(x),
            x.detach(),
            w,
            out[2],
            out[3],
            None,
            True,
            True,
            False,
            None,
            0.0,
            None,
            "auto",
        ),  # fmt: skip
    )


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), fastattn.nn.LayerNorm(48), torch.nn.ReLU())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 32, requires_grad=True)
    torch.testing.assert_close(compiled(x), model(x))
    compiled(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_module_is_drop_in():
    for kwargs in ({}, {"eps": 1e-6}, {"elementwise_affine": False}, {"bias": False}):
        ours, theirs = fastattn.nn.LayerNorm((4, 6), **kwargs), torch.nn.LayerNorm((4, 6), **kwargs)
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        assert repr(ours).replace("fastattn.nn.", "") == repr(theirs)
        theirs.load_state_dict({k: torch.randn_like(v) for k, v in theirs.state_dict().items()})
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(3, 4, 6)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        theirs.load_state_dict(ours.state_dict())
    assert isinstance(fastattn.nn.LayerNorm(3), torch.nn.LayerNorm)


def test_empty_inputs():
    for shape in [(0, 8), (2, 0, 8)]:
        x = torch.randn(shape, requires_grad=True)
        w = torch.randn(8, requires_grad=True)
        out = fastattn.layer_norm(x, (8,), w)
        assert out.shape == x.shape
        out.sum().backward()
        assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(8))
        o, s = fastattn.add_layer_norm(x, torch.randn(shape), (8,), w)
        assert o.shape == s.shape == x.shape


BAD = [
    (
        lambda: fastattn.layer_norm(torch.randn(3, 5), (4,)),
        ValueError,
        "must equal the last 1 dims",
    ),
    (lambda: fastattn.layer_norm(torch.randn(5), (2, 5)), ValueError, "must equal the last 2 dims"),
    (lambda: fastattn.layer_norm(torch.randn(3, 5), ()), ValueError, "non-empty"),
    (lambda: fastattn.layer_norm(torch.randn(3, 5), "5"), TypeError, "int or a sequence"),
    (lambda: fastattn.layer_norm(torch.randn(3, 5), 5.5), TypeError, "int or a sequence"),
    (
        lambda: fastattn.layer_norm(torch.randn(3, 5), (5,), torch.randn(4)),
        ValueError,
        "weight must have shape",
    ),
    (
        lambda: fastattn.layer_norm(torch.randn(3, 5), (5,), None, torch.randn(5, 1)),
        ValueError,
        "bias must have shape",
    ),
    (
        lambda: fastattn.layer_norm(torch.randn(3, 5), (5,), torch.randn(5).double()),
        TypeError,
        "dtype",
    ),
    (
        lambda: fastattn.layer_norm(torch.randn(3, 5), (5,), torch.randint(0, 3, (5,))),
        TypeError,
        "floating-point",
    ),
    (lambda: fastattn.layer_norm(torch.randint(0, 5, (3, 5)), (5,)), TypeError, "floating-point"),
    (
        lambda: fastattn.layer_norm(torch.randn(3, 5, dtype=torch.complex64), (5,)),
        TypeError,
        "floating-point",
    ),
    (lambda: fastattn.layer_norm([1.0, 2.0], (2,)), TypeError, "torch.Tensor"),
    (lambda: fastattn.layer_norm(torch.randn(3, 5), (5,), eps=-1.0), ValueError, "eps"),
    (lambda: fastattn.layer_norm(torch.randn(3, 5), (5,), eps=float("nan")), ValueError, "eps"),
    (
        lambda: fastattn.layer_norm(torch.randn(3, 5), (5,), torch.randn(5, device="meta")),
        ValueError,
        "same device",
    ),
    (
        lambda: fastattn.add_layer_norm(torch.randn(3, 5), torch.randn(3, 4), (5,)),
        ValueError,
        "residual must have the input's shape",
    ),
    (
        lambda: fastattn.add_layer_norm(torch.randn(3, 5), torch.randn(3, 5).double(), (5,)),
        TypeError,
        "float64 is not mixed",
    ),
    (lambda: fastattn.set_backend("gpu"), ValueError, "unknown backend"),
]


@pytest.mark.parametrize("call,exc,match", BAD)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_kernel_op_checks_its_inputs():
    # The C++ op is reachable directly (torch.ops.fastattn_C); it must refuse, not crash.
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("extension not built")
    op = torch.ops.fastattn_C.layer_norm_fwd
    with pytest.raises(RuntimeError, match="must be 2-D"):
        op(torch.randn(3), None, None, None, 1e-5, None, 0.0, 0)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        op(torch.randn(3, 4), torch.randn(5), None, None, 1e-5, None, 0.0, 0)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float64"):
        op(torch.randn(3, 4).half(), None, None, None, 1e-5, None, 0.0, 0)
    with pytest.raises(RuntimeError, match="residual must have shape"):
        op(torch.randn(3, 4), None, None, torch.randn(4, 3), 1e-5, None, 0.0, 0)


def test_explicit_backend_refuses_unsupported_case():
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("extension not built")
    x = torch.randn(4, 8, dtype=torch.float16)
    with fastattn.use_backend("cpu"), pytest.raises(fastattn.BackendError, match="float16"):
        fastattn.layer_norm(x, (8,))
    # auto falls back to the reference instead
    out = fastattn.layer_norm(x, (8,))
    assert fastattn.last_backend("layer_norm") == "reference"
    torch.testing.assert_close(out, F.layer_norm(x.float(), (8,)).half(), rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------ mixed dtypes and fused dropout
# The GPT's residual path under autocast: s = dropout(x) + residual with x a bfloat16 sublayer
# output and residual the float32 stream, the normalised output written in bfloat16 for the
# next matmul. Compared with torch doing the same steps (mask from the contract's Philox).
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "xdt,rdt,odt",
    [
        (torch.bfloat16, torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float32, None),
        (torch.float32, torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.bfloat16, torch.float32),
        (torch.float32, None, None),
        (torch.bfloat16, None, torch.float32),
    ],
)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("rows,m", [(1, 1), (7, 37), (13, 64), (5, 100), (3, 384)])
def test_add_layer_norm_mixed_dropout(backend, xdt, rdt, odt, p, rows, m):
    from fastattn.ops.layernorm import draw_seed, row_dropout_keep

    if rdt is None and p == 0.0:
        pytest.skip("no residual and no dropout: plain layer_norm")
    x = (torch.randn(rows, m) * 2).to(xdt)
    r = (torch.randn(rows, m) + 1).to(rdt) if rdt is not None else None
    w, b = torch.randn(m), torch.randn(m)
    sdt = torch.promote_types(xdt, rdt) if rdt is not None else xdt
    dout = torch.randn(rows, m).to(odt or sdt)
    dsum = torch.randn(rows, m).to(sdt)
    torch.manual_seed(1234)
    seed = int(draw_seed())
    keep = row_dropout_keep(seed, rows, m, p) if p > 0 else torch.ones(rows, m, dtype=torch.bool)

    def run(fn, dt=None):
        leaves = [
            t.detach().to(dt or t.dtype).requires_grad_() if t is not None else None
            for t in (x, r, w, b)
        ]
        out, s = fn(*leaves)
        live = [t for t in leaves if t is not None]
        cast = (lambda t: t.to(dt)) if dt else (lambda t: t.to(out.dtype))
        grads = torch.autograd.grad((out, s), live, (cast(dout), dsum.to(s.dtype)))
        return out.detach(), s.detach(), grads

    def by_hand(x, r, w, b, out_dtype=odt):
        s = x * keep.to(x.dtype) / (1 - p) if p > 0 else x
        s = s + r if r is not None else s
        out = F.layer_norm(s, (m,), w, b)
        return (out.to(out_dtype) if out_dtype is not None else out), s

    torch.manual_seed(1234)
    with fastattn.use_backend(backend):
        out, s, grads = run(
            lambda x, r, w, b: fastattn.add_layer_norm(x, r, (m,), w, b, dropout_p=p, out_dtype=odt)
        )
    assert out.dtype == (odt or sdt) and s.dtype == sdt
    t = run(by_hand)
    ref = run(lambda x, r, w, b: by_hand(x, r, w, b, None), torch.float64)
    assert_rule("out", out, t[0], ref[0])
    assert_rule("sum", s, t[1], ref[1])
    if p > 0 and rdt is None:  # the kept elements are exactly those of the contract's mask
        assert torch.equal(s != 0, keep & (x != 0))
    names = ("dx", "dres", "dw", "db") if r is not None else ("dx", "dw", "db")
    for name, g, tg, rg in zip(names, grads, t[2], ref[2], strict=True):
        assert g.dtype == tg.dtype, name
        assert_rule(name, g, tg, rg)


def test_row_dropout_mask_statistics():
    # The contract's mask keeps ~(1 - p) of the elements, differently per seed and per row.
    from fastattn.ops.layernorm import row_dropout_keep

    a, b = row_dropout_keep(1, 64, 384, 0.2), row_dropout_keep(2, 64, 384, 0.2)
    assert abs(a.float().mean().item() - 0.8) < 0.01
    assert not torch.equal(a, b) and not torch.equal(a[0], a[1])


def test_add_layer_norm_bad_dropout_and_dtype():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        fastattn.add_layer_norm(x, x, (8,), dropout_p=1.0)
    with pytest.raises(TypeError, match="float64 is not mixed"):
        fastattn.add_layer_norm(x, x.double(), (8,))
    with pytest.raises(TypeError, match="out_dtype must be a floating"):
        fastattn.layer_norm(x, (8,), out_dtype=torch.int32)


def test_eager_fast_path_equals_the_custom_op():
    # Eager calls skip the dispatcher (ops/_common.eager_fast_path); the custom op (what
    # torch.compile sees) must compute exactly the same, forward and backward.
    from fastattn.ops import layernorm as ln

    x, w, b = (t.requires_grad_() for t in _inputs((9,), (130,), torch.float32))
    r = torch.randn(9, 130, requires_grad=True)
    dout = torch.randn(9, 130)
    args = (x, w, b, r, 1e-5, torch.bfloat16, 0.2, ln.draw_seed())
    runs = []
    for fn in (ln._fwd_call, ln.layer_norm_fwd):
        out, s, _, _ = fn(*args)
        grads = torch.autograd.grad((out, s), (x, w, b, r), (dout.bfloat16(), dout))
        runs.append((out, s, *grads))
    for a, c in zip(*runs, strict=True):
        assert torch.equal(a, c)


# Outputs of 16 MiB and more (float32, rows a multiple of 16 wide) are written with streaming
# stores: y in the forward (also beside add_layer_norm's sum, which is stored plainly), dx and ds
# in the backward. Rows are computed independently, so the first rows of a streamed call must
# equal, bit for bit, a small (plainly stored) call on the same rows; the whole against the
# float64 reference with the rule.
@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="cpu backend not built")
@pytest.mark.parametrize("residual", [False, True])
def test_streamed_outputs_match_plain_stores(residual):
    n, m, k = 4160, 1024, 96  # 4160 x 1024 x 4 B = 16.25 MiB: past the streaming threshold
    x = torch.randn(n, m) * 2 + 0.5
    r = torch.randn(n, m) if residual else None
    w, b = torch.randn(m), torch.randn(m)
    dy = torch.randn(n, m)
    dsum = torch.randn(n, m) if residual else None

    def run(rows, dt=torch.float32):
        leaves = [t[:rows].to(dt).requires_grad_() for t in (x, *([r] if residual else []))]
        ww, bb = w.to(dt).requires_grad_(), b.to(dt).requires_grad_()
        if residual:
            if dt == torch.float64:
                s = leaves[0] + leaves[1]
                y = layer_norm_reference(s, (m,), ww, bb)
            else:
                with fastattn.use_backend("cpu"):
                    y, s = fastattn.add_layer_norm(leaves[0], leaves[1], (m,), ww, bb)
            outs, grads = (y, s), (dy[:rows].to(dt), dsum[:rows].to(dt))
        else:
            with fastattn.use_backend("cpu" if dt != torch.float64 else "reference"):
                y = fastattn.layer_norm(leaves[0], (m,), ww, bb)
            outs, grads = (y,), (dy[:rows].to(dt),)
        dxs = torch.autograd.grad(outs, [*leaves, ww, bb], grads)
        return [o.detach() for o in outs], list(dxs)

    big_out, big_grads = run(n)
    small_out, small_grads = run(k)
    for name, a, c in zip(("y", "s")[: len(big_out)], big_out, small_out, strict=True):
        assert torch.equal(a[:k], c), f"{name}: streamed rows differ from plainly stored ones"
    names = ["dx", *(["dresidual"] if residual else []), "dweight", "dbias"]
    for name, a, c in zip(names, big_grads, small_grads, strict=True):
        if a.dim() == 2:  # dweight / dbias sum over all the rows: checked by the rule below
            assert torch.equal(a[:k], c), f"{name}: streamed rows differ from plainly stored ones"
    ref_out, ref_grads = run(n, torch.float64)
    xt, wt, bt = (t.clone().requires_grad_() for t in (x, w, b))
    t_out = F.layer_norm(xt + (r if residual else 0), (m,), wt, bt)
    t_dx, t_dw = torch.autograd.grad(t_out, (xt, wt), dy)
    assert_rule("y", big_out[0], t_out.detach(), ref_out[0])
    # dx against the reference's gradient of x through y alone: dsum adds to it unchanged.
    dx_y = big_grads[0] - (dsum if residual else 0)
    assert_rule("dx", dx_y, t_dx, ref_grads[0] - (dsum.double() if residual else 0))
    assert_rule("dweight", big_grads[-2], t_dw, ref_grads[-2])
