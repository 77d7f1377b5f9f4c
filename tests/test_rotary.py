"""fastattn.rotary / apply_rotary_pos_emb (rotary position embedding) on every backend available
here, and the rotary swap of patch() in transformers models.

Error rule (tests/rule.py): against the float64 reference, a kernel in dtype X passes when its
max abs error is <= 2 x (PyTorch's own error in X: transformers' formula ``x * cos +
rotate_half(x) * sin`` in X) + a small floor, for the output and the gradient of x. Triton runs
through its interpreter on CPU tensors (small shapes) where no CUDA GPU is visible.

Run: pytest tests/test_rotary.py
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

import fastattn
from fastattn.ops.rotary import apply_rotary_pos_emb, rotary, rotary_reference
from fastattn.triton import interpreting
from tests.rule import assert_rule

CPU_BACKENDS = fastattn.available_backends("cpu")
TRITON_DEV = "cpu" if interpreting() else "cuda"
BF, F32, F64 = torch.bfloat16, torch.float32, torch.float64


def _backend_params():
    out = [b for b in CPU_BACKENDS if b != "triton"]
    if "triton" in fastattn.available_backends(TRITON_DEV):
        out.append(pytest.param("triton", marks=pytest.mark.triton))
    return out


def _interpreted(backend: str) -> bool:
    return backend == "triton" and interpreting()


# (B, H, T, D, R): one of everything, primes, a partial rotary dim, head dims past a vector.
def _shapes(backend: str):
    if _interpreted(backend):
        return [(1, 1, 1, 2, 2), (2, 3, 5, 6, 6), (1, 2, 3, 10, 4)]
    return [
        (1, 1, 1, 2, 2),
        (2, 3, 5, 64, 64),
        (1, 2, 13, 6, 6),
        (2, 3, 7, 66, 32),
        (1, 1, 3, 256, 256),
        (3, 2, 4, 40, 40),
    ]


# (x dtype, cos / sin dtype): plain, 16-bit, autocast's mix (bf16 q, fp32 cos), float64.
def _dtypes(backend: str):
    if backend == "triton":
        out = [(F32, F32), (BF, BF), (BF, F32)]
        return out if _interpreted(backend) else out + [(torch.float16, torch.float16)]
    return [(F32, F32), (BF, BF), (BF, F32), (F64, F64)]


def _angles(bc: int, t: int, r: int, equal_halves: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [bc, t, r] in float64: transformers' cat(freqs, freqs) form, or unequal halves
    (so the index of each sin term matters)."""
    a = torch.randn(bc, t, r // 2 if equal_halves else r, dtype=F64) * 3
    if equal_halves:
        a = torch.cat((a, a), -1)
    return a.cos(), a.sin()


def _x(b, h, t, d, layout: str, dtype) -> torch.Tensor:
    """x as the layout names it, [B, H, T, D] (or [B, T, H, D] for "heads_last")."""
    if layout == "projection":  # q = proj(x).view(B, T, H, D).transpose(1, 2)
        return torch.randn(b, t, h, d).to(dtype).transpose(1, 2)
    if layout == "heads_last":  # unsqueeze_dim=2 callers
        return torch.randn(b, t, h, d).to(dtype)
    if layout == "strided":  # a unit last stride but gaps: a slice of a wider tensor
        return torch.randn(b, h, t, d + 3).to(dtype)[..., :d]
    return torch.randn(b, h, t, d).to(dtype)


LAYOUTS = ("contiguous", "projection", "heads_last", "strided")


def _run(backend, x, cos, sin, ud, dy):
    dev = TRITON_DEV if backend == "triton" else "cpu"
    leaf = x.detach().to(dev, copy=True).requires_grad_()
    with fastattn.use_backend(backend):
        y = rotary(leaf, cos.to(dev), sin.to(dev), unsqueeze_dim=ud)
        assert fastattn.last_backend("rotary") == backend
        y.backward(dy.to(dev))
    return y.detach().cpu(), leaf.grad.cpu()


def _torch_and_ref(x, cos, sin, ud, dy):
    """(transformers' formula in the inputs' dtypes, the float64 reference): (y, dx) each."""
    res = []
    for xd, cd in ((x.dtype, cos.dtype), (F64, F64)):
        leaf = x.detach().to(xd).requires_grad_()
        y = rotary_reference(leaf, cos.to(cd), sin.to(cd), ud)
        y.backward(dy.to(y.dtype))
        res.append((y.detach(), leaf.grad))
    return res


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rotary_matches_reference(backend, layout):
    for xd, cd in _dtypes(backend):
        for b, h, t, d, r in _shapes(backend):
            for bc, equal in ((b, False), (1, True)):
                x = _x(b, h, t, d, layout, xd)
                ud = 2 if layout == "heads_last" else 1
                c64, s64 = _angles(bc, t, r, equal)
                cos, sin = c64.to(cd), s64.to(cd)
                out_dtype = torch.promote_types(xd, cd)
                dy = torch.randn(x.shape).to(out_dtype)
                y, dx = _run(backend, x, cos, sin, ud, dy)
                assert y.dtype == out_dtype and dx.dtype == xd
                (ty, tdx), (ry, rdx) = _torch_and_ref(x, cos, sin, ud, dy)
                tag = f"{backend} {layout} x {xd} cos {cd} B{b} H{h} T{t} D{d} R{r} Bc{bc}"
                assert_rule(f"y {tag}", y, ty, ry)
                assert_rule(f"dx {tag}", dx, tdx, rdx)


def test_backends_agree():
    """Every CPU backend gives the same result for the same float32 call (one rounding each)."""
    x = _x(2, 3, 9, 64, "projection", F32)
    cos, sin = (t.float() for t in _angles(2, 9, 64, False))
    outs = {}
    for backend in [b for b in CPU_BACKENDS if b != "triton"]:
        with fastattn.use_backend(backend):
            outs[backend] = rotary(x, cos, sin)
    first = next(iter(outs.values()))
    for b, y in outs.items():
        torch.testing.assert_close(y, first, rtol=1e-6, atol=1e-6, msg=b)


def test_output_keeps_the_projection_layout():
    """q as the transpose of a projection output: the rotated q has its strides, so the
    gradient flowing back through the transpose and view needs no copy."""
    b, t, h, d = 2, 5, 3, 8
    proj = torch.randn(b, t, h * d, requires_grad=True)
    q = proj.view(b, t, h, d).transpose(1, 2)
    cos, sin = (c.float() for c in _angles(b, t, d, True))
    y = rotary(q, cos, sin)
    assert y.stride() == q.stride()
    y.sum().backward()
    assert proj.grad is not None and proj.grad.is_contiguous()


def test_apply_rotary_pos_emb_is_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as theirs

    q, k = _x(2, 4, 6, 16, "projection", F32), _x(2, 2, 6, 16, "projection", F32)
    cos, sin = (c.float() for c in _angles(2, 6, 16, True))
    for a, b in zip(apply_rotary_pos_emb(q, k, cos, sin), theirs(q, k, cos, sin), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert transformers is not None


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_gradcheck_and_double_backward_float64(backend):
    """The backward is a rotary pass itself: differentiable twice (and more)."""
    x = _x(2, 2, 3, 6, "projection", F64).requires_grad_()
    cos, sin = _angles(2, 3, 4, False)  # partial: R = 4 < D = 6
    with fastattn.use_backend(backend):
        assert torch.autograd.gradcheck(lambda t: rotary(t, cos, sin), (x,))
        assert torch.autograd.gradgradcheck(lambda t: rotary(t, cos, sin), (x,))


def test_cos_sin_with_gradients_are_honoured():
    """cos / sin that require a gradient take the reference formula (torch's autograd): their
    gradients are transformers' own."""
    x = _x(2, 3, 4, 8, "projection", F32).requires_grad_()
    c64, s64 = _angles(2, 4, 8, False)
    grads = []
    for fn in (rotary, rotary_reference):
        cos, sin = c64.float().requires_grad_(), s64.float().requires_grad_()
        fn(x, cos, sin).square().sum().backward()
        grads.append((cos.grad, sin.grad))
        x.grad = None
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "cos_shape,ud,x_shape",
    [
        ((5, 8), 0, (5, 8)),  # 2-D x and cos: broadcast as the formula broadcasts
        ((1, 1, 5, 8), 1, (2, 3, 5, 8)),  # 4-D cos (already unsqueezed, unsqueeze adds one)
        ((2, 5, 8), -3, (2, 3, 5, 8)),  # negative unsqueeze_dim: the head axis of x
        ((2, 5, 8), 1, (2, 3, 5, 8, 1)[:4]),
    ],
)
def test_other_broadcasts_follow_the_formula(cos_shape, ud, x_shape):
    x = torch.randn(x_shape)
    cos, sin = torch.randn(cos_shape), torch.randn(cos_shape)
    want = rotary_reference(x, cos, sin, ud)
    torch.testing.assert_close(rotary(x, cos, sin, ud), want)


def test_opcheck():
    x = _x(2, 3, 5, 8, "projection", F32).requires_grad_()
    cos, sin = (c.float() for c in _angles(2, 5, 8, False))
    torch.library.opcheck(torch.ops.fastattn.rotary_fwd, (x, cos, sin, F32))
    dy = torch.randn(2, 3, 5, 8)
    backend = fastattn.get_backend()
    torch.library.opcheck(torch.ops.fastattn.rotary_bwd, (dy, cos, sin, BF, backend))


def test_compile_fullgraph():
    x = _x(2, 3, 5, 8, "projection", F32).requires_grad_()
    cos, sin = (c.float() for c in _angles(2, 5, 8, False))
    f = torch.compile(lambda t: rotary(t, cos, sin), fullgraph=True, backend="aot_eager")
    y = f(x)
    y.sum().backward()
    torch.testing.assert_close(y, rotary_reference(x, cos, sin))
    g = x.grad.clone()
    x.grad = None
    rotary_reference(x, cos, sin).sum().backward()
    torch.testing.assert_close(g, x.grad)


def test_empty():
    x = torch.randn(2, 0, 5, 8)
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    assert rotary(x, cos, sin).shape == x.shape


def test_explicit_backend_unsupported_dtype():
    x = torch.randn(1, 2, 3, 8, dtype=torch.float16)
    cos, sin = torch.randn(1, 3, 8, dtype=torch.float16), torch.randn(1, 3, 8, dtype=torch.float16)
    with fastattn.use_backend("cpu"), pytest.raises(fastattn.BackendError, match="rotary"):
        rotary(x, cos, sin)
    with fastattn.use_backend("auto"):  # auto: the reference serves it
        want = rotary_reference(x.double(), cos.double(), sin.double()).half()
        torch.testing.assert_close(rotary(x, cos, sin), want)  # one rounding


def _bad_cos():
    return torch.randn(2, 5, 8)


BAD = [
    (lambda: rotary([1.0], _bad_cos(), _bad_cos()), TypeError, "x must be a torch.Tensor"),
    (lambda: rotary(torch.ones(2, 3, 5, 8, dtype=torch.int64), _bad_cos(), _bad_cos()), TypeError,
     "floating-point"),
    (lambda: rotary(torch.randn(2, 3, 5, 8), _bad_cos(), torch.randn(2, 5, 6)), ValueError,
     "same shape"),
    (lambda: rotary(torch.randn(2, 3, 5, 8), torch.randn(2, 5, 7), torch.randn(2, 5, 7)),
     ValueError, "must be even"),
    (lambda: rotary(torch.randn(2, 3, 5, 8), torch.randn(2, 5, 10), torch.randn(2, 5, 10)),
     ValueError, "<= x.shape"),
    (lambda: rotary(torch.randn(2, 3, 5, 8), torch.randn(3, 5, 8), torch.randn(3, 5, 8)),
     ValueError, "do not broadcast"),
    (lambda: rotary(torch.randn(2, 3, 5, 8), _bad_cos(), _bad_cos(), unsqueeze_dim=True),
     TypeError, "unsqueeze_dim must be an int"),
    (lambda: rotary(torch.randn(2, 3, 5, 8), _bad_cos(), _bad_cos(), unsqueeze_dim=7), ValueError,
     "unsqueeze_dim must be in"),
    (lambda: rotary(torch.randn(2, 3, 5, 8), torch.tensor(1.0), torch.tensor(1.0)), ValueError,
     "scalar"),
]  # fmt: skip


@pytest.mark.parametrize("fn,exc,match", BAD)
def test_bad_input(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_kernel_refuses_outside_its_contract():
    """The C++ kernels' own checks (the last line behind the Python validation)."""
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("the C++ extension is not built")
    op = torch.ops.fastattn_C.rotary_fwd
    x, cos = torch.randn(2, 3, 5, 8), torch.randn(2, 5, 8)
    with pytest.raises(RuntimeError, match="4-D"):
        op(x[0], cos, cos, F32)
    with pytest.raises(RuntimeError, match="must be 1 or B"):
        op(x, torch.randn(3, 5, 8), torch.randn(3, 5, 8), F32)
    with pytest.raises(RuntimeError, match="even"):
        op(x, cos[..., :3], cos[..., :3], F32)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        op(x.half(), cos, cos, F32)


# ----------------------------------------------------------------------------- patch()
def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=101,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _has_hook(model) -> bool:
    return any("_kernel_funcs" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_patch_swaps_llama_rotary_and_keeps_its_maths(autocast):
    model = _tiny_llama()
    if not _has_hook(model):
        pytest.skip("this transformers has no per-module kernel-function hook (kernels)")
    patched = copy.deepcopy(model)
    report = fastattn.patch(patched, attention=False, rms_norm=False, gated_mlp=False, linear=False)
    entries = report.layers("rotary", "replaced")
    assert [e.name for e in entries] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    ids = torch.randint(0, 101, (2, 9))
    calls = []
    real = fastattn.ops.rotary._kernel

    def spy(*a):
        calls.append(a[0].dtype)
        return real(*a)

    fastattn.ops.rotary._kernel = spy
    try:
        outs = []
        for m in (model, patched):
            m.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=BF, enabled=autocast):
                logits = m(ids).logits
            logits.float().square().mean().backward()
            outs.append((logits.float(), m.model.layers[0].self_attn.q_proj.weight.grad))
    finally:
        fastattn.ops.rotary._kernel = real
    assert len(calls) == 4  # q and k of two layers, on the kernel path
    tol = 3e-2 if autocast else 1e-5
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_patch_twice_unpatch_restores_rotary():
    model = _tiny_llama()
    if not _has_hook(model):
        pytest.skip("this transformers has no per-module kernel-function hook (kernels)")
    fastattn.patch(model)
    again = fastattn.patch(model)
    assert {e.action for e in again.layers("rotary")} == {"unchanged"}
    restored = fastattn.unpatch(model)
    assert len(restored.layers("rotary", "restored")) == 2
    for m in model.modules():
        for w in (m.__dict__.get("_kernel_funcs") or {}).values():
            assert "forward" not in w.__dict__
    off = fastattn.patch(copy.deepcopy(_tiny_llama()), rotary=False)
    assert not off.layers("rotary")


def test_a_different_rotary_formula_is_left_with_the_reason():
    """A model whose apply_rotary_pos_emb computes something else (here: interleaved pairs, as
    GPT-J / Cohere) keeps it, and the report says why."""
    patch_mod = importlib.import_module("fastattn.patch")  # the module: fastattn.patch is patch()

    def interleaved(q, k, cos, sin, unsqueeze_dim=1):
        def rot(x):
            x1, x2 = x[..., ::2], x[..., 1::2]
            return torch.stack((-x2, x1), -1).flatten(-2)

        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rot(q) * sin, k * cos + rot(k) * sin

    def casts_back(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        dt = q.dtype
        qe = rotary_reference(q.float(), cos, sin, unsqueeze_dim)
        ke = rotary_reference(k.float(), cos, sin, unsqueeze_dim)
        return qe.to(dt), ke.to(dt)

    assert "computes other values" in patch_mod._rotary_unsupported(interleaved)
    assert "bfloat16 q with float32 cos" in patch_mod._rotary_unsupported(casts_back)
    assert "signature" in patch_mod._rotary_unsupported(lambda a, b: (a, b))
    assert patch_mod._rotary_unsupported(apply_rotary_pos_emb) is None


def test_torch_func_transforms():
    """vmap / grad (per-sample gradients) run on torch's own ops, with the same values."""
    x = torch.randn(4, 2, 3, 5, 8)
    cos, sin = (c.float() for c in _angles(2, 5, 8, False))
    got = torch.func.vmap(lambda t: rotary(t, cos, sin))(x)
    torch.testing.assert_close(got, rotary_reference(x, cos[None], sin[None], 2))
    g = torch.func.grad(lambda t: rotary(t, cos, sin).square().sum())(x[0])
    x0 = x[0].clone().requires_grad_()
    rotary_reference(x0, cos, sin).square().sum().backward()
    torch.testing.assert_close(g, x0.grad)
