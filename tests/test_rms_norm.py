"""rms_norm and add_rms_norm on every available backend against the float64 reference.

"PyTorch's own error in dtype X" (tests/rule.py) is that of the formula each mode reproduces,
run in X: F.rms_norm (plain), GemmaRMSNorm's ``(norm(x.float()) * (1 + w.float())).type_as(x)``
(weight_offset=1) and LlamaRMSNorm's ``w * norm(x.float()).to(x.dtype)`` (cast_before_weight).
The reference is the exact maths in float64 (where the cast is a no-op).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.ops.rms_norm import rms_norm_reference
from fastattn.triton import interpreting
from tests.rule import assert_rule

BACKENDS = fastattn.available_backends("cpu")  # triton through its interpreter, if usable
EPS = 1e-6
# (rows shape, normalized_shape): 1, primes, sizes that are not multiples of the vector width
# (16 floats / 32 bfloat16 on AVX-512) or of a Triton block, many rows (several dweight chunks),
# 3-D inputs, normalized_shape of more than one dim.
SHAPES = [
    ((1,), (1,)),
    ((5,), (7,)),
    ((3, 17), (33,)),
    ((2, 3), (1023,)),
    ((4,), (1500,)),
    ((3,), (5, 7)),
    ((67,), (64,)),
]
# Wider rows and more rows for the C++ kernel only (the Triton interpreter is slow).
SHAPES_CPU = [((2,), (10000,)), ((257,), (768,))]
# (weight, weight_offset, cast_before_weight)
MODES = [(True, 0.0, False), (True, 1.0, False), (True, 0.0, True), (False, 0.0, False)]


def _dtypes(backend):
    if backend == "triton":
        return [torch.float32, torch.bfloat16]
    return [torch.float32, torch.bfloat16, torch.float64]


CASES = [(b, d) for b in BACKENDS for d in _dtypes(b)]


def _torch_x(x, norm, w, offset, cast, eps=EPS):
    """The formula the mode reproduces, in x's dtype (the baseline of the error rule)."""
    if w is not None and offset == 0.0 and not cast:
        return F.rms_norm(x, norm, w, eps)
    dims = tuple(range(-len(norm), 0))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(acc)
    h = h * torch.rsqrt(h.pow(2).mean(dims, keepdim=True) + eps)
    if w is None:
        return h.to(x.dtype)
    if cast:  # LlamaRMSNorm
        return (w + offset) * h.to(x.dtype) if offset else w * h.to(x.dtype)
    return (h * (w.to(acc) + offset)).to(x.dtype)  # GemmaRMSNorm


def _ref(x, norm, w, offset, cast, eps=EPS):
    return rms_norm_reference(x, norm, w, eps, weight_offset=offset)


def _inputs(lead, norm, dtype, affine=True, noncontig=False):
    shape = (*lead, *norm)
    if noncontig:
        # A transposed view of a bigger tensor: neither contiguous nor dense.
        x = (torch.randn(*reversed(shape), 2) * 3 + 1.5)[..., 0].permute(
            *reversed(range(len(shape)))
        )
    else:
        x = torch.randn(shape) * 3 + 1.5
    w = torch.randn(norm) if affine else None
    return x.to(dtype), (w.to(dtype) if w is not None else None)


def _run(fn, tensors, couts):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    live = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(outs, live, couts[: len(outs)])
    return [o.detach() for o in outs], list(grads)


def _check(backend, dtype, lead, norm, affine, offset, cast, noncontig=False):
    x, w = _inputs(lead, norm, dtype, affine, noncontig)
    dout = torch.randn(x.shape).to(dtype)

    with fastattn.use_backend(backend):
        out, grads = _run(
            lambda x, w: fastattn.rms_norm(
                x, norm, w, EPS, weight_offset=offset, cast_before_weight=cast
            ),
            (x, w),
            (dout,),
        )
    assert fastattn.last_backend("rms_norm") == backend
    t_out, t_grads = _run(lambda x, w: _torch_x(x, norm, w, offset, cast), (x, w), (dout,))
    r_out, r_grads = _run(
        lambda x, w: _ref(x, norm, w, offset, cast),
        (x.double(), w.double() if w is not None else None),
        (dout.double(),),
    )
    assert out[0].dtype == dtype and out[0].shape == x.shape
    assert_rule("out", out[0], t_out[0], r_out[0])
    for name, g, tg, rg in zip(("dx", "dweight"), grads, t_grads, r_grads, strict=False):
        assert g.dtype == dtype
        assert_rule(name, g, tg, rg)


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("lead,norm", SHAPES)
def test_rms_norm_matches_reference(backend, dtype, lead, norm):
    _check(backend, dtype, lead, norm, True, 0.0, False)


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("affine,offset,cast", MODES[1:])
@pytest.mark.parametrize("lead,norm", [((5,), (7,)), ((3, 2), (129,))])
def test_rms_norm_modes(backend, dtype, affine, offset, cast, lead, norm):
    _check(backend, dtype, lead, norm, affine, offset, cast)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,norm", SHAPES_CPU)
def test_rms_norm_cpu_large_rows(dtype, lead, norm):
    _check("cpu", dtype, lead, norm, True, 1.0, True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine,offset,cast", MODES)
def test_rms_norm_non_contiguous(backend, affine, offset, cast):
    x, _ = _inputs((7, 5), (33,), torch.float32, noncontig=True)
    assert not x.is_contiguous()
    _check(backend, torch.bfloat16, (7, 5), (33,), affine, offset, cast, noncontig=True)


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("affine,offset,cast", MODES)
@pytest.mark.parametrize("lead,m", [((1,), 1), ((3, 5), 97)])
def test_add_rms_norm(backend, dtype, affine, offset, cast, lead, m):
    x, w = _inputs(lead, (m,), dtype, affine)
    r = (torch.randn(x.shape) * 2).to(dtype)
    dout, dsum = torch.randn(x.shape).to(dtype), torch.randn(x.shape).to(dtype)

    def ours(x, r, w):
        return fastattn.add_rms_norm(
            x, r, (m,), w, EPS, weight_offset=offset, cast_before_weight=cast
        )

    def theirs(x, r, w):
        s = x + r
        return _torch_x(s, (m,), w, offset, cast), s

    def ref(x, r, w):
        s = x + r
        return _ref(s, (m,), w, offset, cast), s

    with fastattn.use_backend(backend):
        out, grads = _run(ours, (x, r, w), (dout, dsum))
    assert fastattn.last_backend("rms_norm") == backend
    t_out, t_grads = _run(theirs, (x, r, w), (dout, dsum))
    d = [t.double() if t is not None else None for t in (x, r, w)]
    r_out, r_grads = _run(ref, d, (dout.double(), dsum.double()))
    for name, a, t, rr in zip(("out", "sum"), out, t_out, r_out, strict=True):
        assert_rule(name, a, t, rr)
    for name, g, tg, rg in zip(("dx", "dres", "dw"), grads, t_grads, r_grads, strict=False):
        assert_rule(name, g, tg, rg)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_rms_norm_float64_gradcheck(backend):
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    with fastattn.use_backend(backend):
        for offset, cast in ((0.0, False), (1.0, True)):
            kw = {"weight_offset": offset, "cast_before_weight": cast}
            assert torch.autograd.gradcheck(
                lambda x, w: fastattn.rms_norm(x, 6, w, 1e-5, **kw), (x, w)
            )
            assert torch.autograd.gradcheck(
                lambda x, r, w: fastattn.add_rms_norm(x, r, (6,), w, 1e-5, **kw), (x, r, w)
            )
        assert torch.autograd.gradcheck(lambda x: fastattn.rms_norm(x, (3, 6)), (x,))


def test_eps_none_is_torchs_default():
    # torch takes finfo(float32).eps for half types (not finfo(bfloat16).eps = 2^-7, which would
    # move the result of small inputs a lot) and finfo(float64).eps for float64.
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        x = (torch.randn(4, 16) * 0.05).to(dtype)
        w = torch.randn(16).to(dtype)
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
        out = fastattn.rms_norm(x, 16, w)
        torch.testing.assert_close(out, F.rms_norm(x, (16,), w), rtol=tol, atol=tol)
        wrong = F.rms_norm(x, (16,), w, torch.finfo(torch.bfloat16).eps)
        assert (out.double() - wrong.double()).abs().max() > 0.1


def test_mixed_weight_dtype_gives_the_input_dtype():
    x = torch.randn(3, 8)
    w = torch.randn(8).bfloat16().requires_grad_()
    y = fastattn.rms_norm(x, 8, w)
    assert y.dtype == torch.float32 == F.rms_norm(x, (8,), w).dtype
    y.sum().backward()
    assert w.grad.dtype == torch.bfloat16
    yb = fastattn.rms_norm(x.bfloat16(), 8, w.detach().float())
    assert yb.dtype == torch.bfloat16


def test_repeatable_bitwise():
    x, w = _inputs((513,), (768,), torch.float32)
    xs, ws = x.requires_grad_(), w.requires_grad_()
    runs = []
    for _ in range(2):
        out = fastattn.rms_norm(xs, (768,), ws, weight_offset=1.0)
        runs.append((out, *torch.autograd.grad(out.sum(), (xs, ws))))
    for a, c in zip(*runs, strict=True):
        assert torch.equal(a, c)


def test_opcheck():
    from fastattn.ops import rms_norm as rn

    x, w = _inputs((5,), (37,), torch.float32)
    r = torch.randn_like(x)
    torch.library.opcheck(rn.rms_norm_fwd, (x, w, None, 1e-5, 0.0, False))
    torch.library.opcheck(rn.rms_norm_fwd, (x.requires_grad_(), w, r, 1e-5, 1.0, True))
    out = rn.rms_norm_fwd(x.detach(), w, None, 1e-5, 0.0, False)
    torch.library.opcheck(
        rn.rms_norm_bwd, (torch.randn_like(x), x.detach(), w, out[2], None, 0.0, True, True, "auto")
    )


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), fastattn.nn.RMSNorm(48), torch.nn.ReLU())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 32, requires_grad=True)
    torch.testing.assert_close(compiled(x), model(x))
    compiled(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_module_is_drop_in():
    for kwargs in ({}, {"eps": 1e-6}, {"elementwise_affine": False}):
        ours, theirs = fastattn.nn.RMSNorm((4, 6), **kwargs), torch.nn.RMSNorm((4, 6), **kwargs)
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        assert repr(ours).replace("fastattn.nn.", "") == repr(theirs)
        theirs.load_state_dict({k: torch.randn_like(v) for k, v in theirs.state_dict().items()})
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(3, 4, 6)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    assert isinstance(fastattn.nn.RMSNorm(3), torch.nn.RMSNorm)


def test_empty_inputs():
    for shape in [(0, 8), (2, 0, 8)]:
        x = torch.randn(shape, requires_grad=True)
        w = torch.randn(8, requires_grad=True)
        out = fastattn.rms_norm(x, (8,), w)
        assert out.shape == x.shape
        out.sum().backward()
        assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(8))
        o, s = fastattn.add_rms_norm(x, torch.randn(shape), (8,), w, weight_offset=1.0)
        assert o.shape == s.shape == x.shape


BAD = [
    (lambda: fastattn.rms_norm(torch.randn(3, 5), (4,)), ValueError, "must equal the last 1 dims"),
    (lambda: fastattn.rms_norm(torch.randn(3, 5), ()), ValueError, "non-empty"),
    (lambda: fastattn.rms_norm(torch.randn(3, 5), "5"), TypeError, "int or a sequence"),
    (
        lambda: fastattn.rms_norm(torch.randn(3, 5), (5,), torch.randn(4)),
        ValueError,
        "weight must have shape",
    ),
    (
        lambda: fastattn.rms_norm(torch.randn(3, 5), (5,), torch.randint(0, 3, (5,))),
        TypeError,
        "floating-point",
    ),
    (lambda: fastattn.rms_norm(torch.randint(0, 5, (3, 5)), (5,)), TypeError, "floating-point"),
    (lambda: fastattn.rms_norm([1.0, 2.0], (2,)), TypeError, "torch.Tensor"),
    (lambda: fastattn.rms_norm(torch.randn(3, 5), (5,), eps=-1.0), ValueError, "eps"),
    (lambda: fastattn.rms_norm(torch.randn(3, 5), (5,), eps=float("inf")), ValueError, "eps"),
    (
        lambda: fastattn.rms_norm(torch.randn(3, 5), (5,), weight_offset=1.0),
        ValueError,
        "needs a weight",
    ),
    (
        lambda: fastattn.rms_norm(torch.randn(3, 5), 5, torch.randn(5), weight_offset=float("nan")),
        ValueError,
        "weight_offset must be finite",
    ),
    (
        lambda: fastattn.rms_norm(torch.randn(3, 5), 5, torch.randn(5), weight_offset="1"),
        TypeError,
        "weight_offset must be a float",
    ),
    (
        lambda: fastattn.rms_norm(torch.randn(3, 5), 5, cast_before_weight=1),
        TypeError,
        "cast_before_weight must be a bool",
    ),
    (
        lambda: fastattn.rms_norm(torch.randn(3, 5), (5,), torch.randn(5, device="meta")),
        ValueError,
        "same device",
    ),
    (
        lambda: fastattn.add_rms_norm(torch.randn(3, 5), torch.randn(3, 4), (5,)),
        ValueError,
        "residual must match",
    ),
    (
        lambda: fastattn.add_rms_norm(torch.randn(3, 5), torch.randn(3, 5).double(), (5,)),
        ValueError,
        "residual must match",
    ),
]


@pytest.mark.parametrize("call,exc,match", BAD)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_kernel_op_checks_its_inputs():
    # The C++ op is reachable directly (torch.ops.fastattn_C); it must refuse, not crash.
    if "cpu" not in BACKENDS:
        pytest.skip("extension not built")
    fwd, bwd = torch.ops.fastattn_C.rms_norm_fwd, torch.ops.fastattn_C.rms_norm_bwd
    with pytest.raises(RuntimeError, match="must be 2-D"):
        fwd(torch.randn(3), None, None, 1e-5, 0.0, False)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        fwd(torch.randn(3, 4), torch.randn(5), None, 1e-5, 0.0, False)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float64"):
        fwd(torch.randn(3, 4).half(), None, None, 1e-5, 0.0, False)
    with pytest.raises(RuntimeError, match="residual must have shape"):
        fwd(torch.randn(3, 4), None, torch.randn(4, 3), 1e-5, 0.0, False)
    with pytest.raises(RuntimeError, match="eps"):
        fwd(torch.randn(3, 4), None, None, float("nan"), 0.0, False)
    with pytest.raises(RuntimeError, match="rstd must hold 3"):
        bwd(torch.randn(3, 4), torch.randn(3, 4), None, torch.ones(2), None, 0.0, False, False)
    with pytest.raises(RuntimeError, match="need_weight_grad without a weight"):
        bwd(torch.randn(3, 4), torch.randn(3, 4), None, torch.ones(3), None, 0.0, False, True)


def test_registry_plans():
    from fastattn import _dispatch
    from fastattn.ops.rms_norm import RMSNormCase

    def plan(backend, dtype, cols):
        return _dispatch.plan("rms_norm", "cpu", RMSNormCase("cpu", dtype, cols), backend)

    if "cpu" in BACKENDS:
        assert plan("auto", torch.float32, 4096) == ("cpu", [])
        with pytest.raises(fastattn.BackendError, match="float16"):
            plan("cpu", torch.float16, 8)
        backend, skipped = plan("auto", torch.float16, 8)
        assert backend == "reference" and skipped[0][0] == "cpu"
    if "triton" in BACKENDS:
        with pytest.raises(fastattn.BackendError, match="row length 8193 > 8192"):
            plan("triton", torch.float32, 8193)
        assert plan("triton", torch.float32, 8192) == ("triton", [])


def test_float16_falls_back_to_the_reference_on_cpu():
    x = torch.randn(4, 8, dtype=torch.float16)
    w = torch.randn(8, dtype=torch.float16)
    out = fastattn.rms_norm(x, (8,), w, 1e-6)
    if "cpu" in BACKENDS:
        assert fastattn.last_backend("rms_norm") == "reference"
    torch.testing.assert_close(out, F.rms_norm(x, (8,), w, 1e-6), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cast_before_weight_rounds_as_llama_does(backend):
    if backend == "triton" and interpreting():
        pytest.skip("Triton's interpreter truncates float32 -> bfloat16 (no round to nearest)")
    # The error rule cannot tell the two orders apart (the single rounding is the more accurate
    # one); what a patched Llama must keep is its own rounding, so compare elementwise: each mode
    # equals its formula in almost every element (the rest: summation order), and the two
    # formulas differ in many.
    x, w = _inputs((64,), (96,), torch.bfloat16)
    with fastattn.use_backend(backend):
        llama = fastattn.rms_norm(x, 96, w, EPS, cast_before_weight=True)
        plain = fastattn.rms_norm(x, 96, w, EPS)
    llama_t, plain_t = _torch_x(x, (96,), w, 0.0, True), _torch_x(x, (96,), w, 0.0, False)

    def same(a, b):
        return (a == b).float().mean().item()

    assert same(llama_t, plain_t) < 0.9
    assert same(llama, llama_t) > 0.97
    assert same(plain, plain_t) > 0.97


# float32 outputs of 16 MiB and more are written with streaming stores (the forward's output, the
# backward's dx; the residual sum stays plain). Rows are independent: the first rows of a streamed
# call equal a small call's bit for bit; the whole call against the float64 reference (the rule).
@pytest.mark.skipif("cpu" not in fastattn.available_backends("cpu"), reason="cpu backend not built")
@pytest.mark.parametrize("residual", [False, True])
def test_streamed_outputs_match_plain_stores(residual):
    n, m, k = 4160, 1024, 80  # 4160 x 1024 x 4 B = 16.25 MiB: past the streaming threshold
    x, w = _inputs((n,), (m,), torch.float32)
    r = torch.randn(n, m) if residual else None
    couts = (torch.randn(n, m), torch.randn(n, m))

    def fn(x, w, r=None):
        if r is None:
            return fastattn.rms_norm(x, (m,), w, EPS)
        return fastattn.add_rms_norm(x, r, (m,), w, EPS)

    def run(rows):
        tensors = (x[:rows], w, *([r[:rows]] if residual else []))
        with fastattn.use_backend("cpu"):
            return _run(fn, tensors, tuple(c[:rows] for c in couts))

    (big_out, big_grads), (small_out, small_grads) = run(n), run(k)
    for name, a, c in zip(("out", "sum")[: len(big_out)], big_out, small_out, strict=True):
        assert torch.equal(a[:k], c), f"{name}: streamed rows differ from plainly stored ones"
    assert torch.equal(big_grads[0][:k], small_grads[0]), "dx: streamed rows differ"
    t_out, t_grads = _run(lambda x, w: _torch_x(x, (m,), w, 0.0, False), (x, w), couts)
    r_out, r_grads = _run(lambda x, w: _ref(x, (m,), w, 0.0, False), (x.double(), w.double()),
                          tuple(c.double() for c in couts))  # fmt: skip
    if not residual:
        assert_rule("out", big_out[0], t_out[0], r_out[0])
        assert_rule("dx", big_grads[0], t_grads[0], r_grads[0])
