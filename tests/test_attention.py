"""Tests of fastattn.attention on every backend, its custom ops, and the attention modules.

Correctness rule (tests/rule.py): against the float64 reference, a backend in dtype X may err by at
most 2 x (PyTorch's own error in X, the plain reference run in X) + a small floor, for the
output and every gradient. Triton runs through its interpreter on the CPU (small shapes).
Run: ``pytest tests/test_attention.py`` (``-k triton`` for the Triton cases only).
"""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.nn import CausalSelfAttention, MultiheadAttention
from fastattn.ops.attention import (
    _draw_seed,
    attention_reference,
    dropout_keep_mask,
    dropout_threshold,
    philox4x32,
)
from fastattn.triton import interpreting

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Fresh random inputs each run (README, "How correctness is checked"); a failure message names the seed, and
# FASTATTN_TEST_SEED=<seed> replays it.
RUN_SEED = int(os.environ.get("FASTATTN_TEST_SEED") or random.SystemRandom().randrange(2**31))


def _cpu_kernel_status() -> str | None:
    """None if the C++ cpu attention kernel runs, else why it is skipped."""
    why = fastattn._dispatch.unavailable_reason("cpu", "cpu")
    if why is not None:
        return why
    x = torch.zeros(1, 1, 1, 16)
    try:
        torch.ops.fastattn_C.attention_fwd(x, x, x, None, False, 1.0, 0.0, 0, 0)
    except RuntimeError as e:
        return f"cpu attention kernel unusable: {e}".splitlines()[0]
    return None


CPU_SKIP = _cpu_kernel_status()
BACKENDS = [b for b in fastattn.available_backends(DEV) if b != "cuda" or DEV == "cuda"]
KERNEL_BACKENDS = [
    pytest.param(
        b,
        marks=[pytest.mark.skipif(b == "cpu" and CPU_SKIP is not None, reason=str(CPU_SKIP))]
        + ([pytest.mark.triton] if b == "triton" else []),
    )
    for b in BACKENDS
]


@pytest.fixture(autouse=True)
def _default_backend():
    """Tests that do not pick a backend use auto, or the reference while the cpu kernel is a
    placeholder (auto would pick it on CPU)."""
    if DEV == "cpu" and CPU_SKIP is not None:
        with fastattn.use_backend("reference"):
            yield
    else:
        yield


# ----------------------------------------------------------------------------- helpers
def make_inputs(B, Hq, Hkv, Tq, Tk, D, dtype, *, noncontig=False, pad=False, seed=0):
    g = torch.Generator().manual_seed(RUN_SEED + seed)
    if noncontig:  # (B, T, H, D) storage, seen as (B, H, T, D); k, v interleaved in one buffer
        q = torch.randn(B, Tq, Hq, D, generator=g).transpose(1, 2)
        kv = torch.randn(B, Tk, 2, Hkv, D, generator=g)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    else:
        q = torch.randn(B, Hq, Tq, D, generator=g)
        k = torch.randn(B, Hkv, Tk, D, generator=g)
        v = torch.randn(B, Hkv, Tk, D, generator=g)
    kpm = None
    if pad:
        kpm = torch.rand(B, Tk, generator=g) < 0.3
        kpm[-1] = True  # a fully padded batch row: its outputs must be 0, not NaN
    dout = torch.randn(B, Hq, Tq, D, generator=g)
    conv = lambda t: t.to(DEV, dtype) if t is not None else None
    return conv(q), conv(k), conv(v), (kpm.to(DEV) if kpm is not None else None), conv(dout)


def fwd_bwd(fn, q, k, v, dout, **kw):
    """fn's output and (dq, dk, dv) for upstream gradient dout; inputs keep their strides."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), dout) if out.numel() else (q, k, v)
    return (out.detach(), *(g.detach() for g in grads))


# tol = 2 x torch's error + one rounding of the largest value to the dtype (eps * max|ref|:
# a result stored in X cannot do better; torch's own error can be luckier on one element)
# + a floor relative to the largest of out/dq/dk/dv (Tk = 1 makes dq, dk exactly 0 in torch,
# while a kernel computing P * (dP - Delta) keeps a rounding residue of the terms that cancel).
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-4, torch.float64: 1e-10}


def assert_within_rule(got, q, k, v, dout, label="", **kw):
    """got = (out, dq, dk, dv) of a kernel in q.dtype: within 2 x torch's error + floor."""
    d64 = [t.double() for t in (q, k, v, dout)]
    ref = fwd_bwd(attention_reference, *d64, **kw)
    own = fwd_bwd(attention_reference, q, k, v, dout, **kw)
    big = max([1.0] + [r.abs().max().item() for r in ref if r.numel()])
    for name, g, r, o in zip(("out", "dq", "dk", "dv"), got, ref, own, strict=True):
        assert g.shape == r.shape, f"{label} {name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        assert torch.isfinite(g).all(), f"{label} {name}: non-finite values"
        err = (g.double() - r).abs().max().item() if g.numel() else 0.0
        base = (o.double() - r).abs().max().item() if o.numel() else 0.0
        scale = r.abs().max().item() if r.numel() else 0.0
        tol = 2 * base + torch.finfo(q.dtype).eps * scale + FLOOR[q.dtype] * big
        assert err <= tol, (
            f"{label} {name}: max err {err:.3g} > {tol:.3g} (torch's {base:.3g}); "
            f"replay with FASTATTN_TEST_SEED={RUN_SEED}"
        )


def ref_kwargs(kw):
    kw = dict(kw)
    if kw.get("key_padding_mask") is not None:
        kw["key_padding_mask"] = kw["key_padding_mask"].cpu()
    return kw


# ----------------------------------------------------------------------------- the grid
# (B, Hq, Hkv, Tq, Tk, D, causal, pad, noncontig, triton?) -- triton: small enough for the
# interpreter. Every value of the grid in the brief appears at least once.
GRID = [
    (2, 1, 1, 17, 17, 16, False, False, False, True),
    (2, 1, 1, 17, 17, 16, True, True, True, True),
    (1, 4, 4, 113, 113, 32, True, False, False, True),
    (1, 8, 2, 1, 17, 40, True, True, False, True),
    (2, 8, 1, 17, 113, 64, False, True, True, True),
    (1, 8, 1, 113, 17, 64, True, False, False, True),  # Tq > Tk causal: leading rows see nothing
    (1, 4, 4, 256, 256, 80, True, True, False, False),
    (1, 2, 2, 40, 33, 80, False, True, True, True),
    (2, 8, 2, 113, 1, 96, False, False, False, True),
    (1, 4, 4, 17, 256, 128, True, False, True, False),
    (1, 2, 1, 33, 20, 128, True, True, False, True),
    (1, 4, 2, 256, 17, 256, True, True, False, False),  # head dim 256: cpu / reference only
    (1, 1, 1, 1, 1, 16, True, False, False, True),
    (2, 4, 2, 256, 113, 32, False, True, True, False),
]


def _grid_params():
    for case in GRID:
        for dtype in (torch.float32, torch.bfloat16):
            for b in KERNEL_BACKENDS:
                backend = b.values[0]
                marks = list(b.marks)
                if backend == "triton" and interpreting() and not case[-1]:
                    continue
                if backend == "triton" and case[5] > 128:
                    continue
                tag = "x".join(str(c) for c in case[:6])
                flags = "".join(f for f, on in zip(("c", "p", "s"), case[6:9], strict=True) if on)
                yield pytest.param(
                    backend,
                    dtype,
                    case,
                    marks=marks,
                    id=f"{backend}-{str(dtype)[6:]}-{tag}-{flags}",
                )


@pytest.mark.parametrize("backend,dtype,case", list(_grid_params()))
def test_grid_against_float64_reference(backend, dtype, case):
    # every allocation is NaN-filled (conftest), so an element a kernel forgets to write fails
    B, Hq, Hkv, Tq, Tk, D, causal, pad, noncontig, _ = case
    q, k, v, kpm, dout = make_inputs(
        B, Hq, Hkv, Tq, Tk, D, dtype, noncontig=noncontig, pad=pad, seed=hash(case) % 1000
    )
    kw = dict(causal=causal, key_padding_mask=kpm)
    with fastattn.use_backend(backend):
        got = fwd_bwd(fastattn.attention, q, k, v, dout, **kw)
        assert fastattn.last_backend("attention") == backend
    got = [t.cpu() for t in got]
    assert_within_rule(got, *(t.cpu() for t in (q, k, v, dout)), label=backend, **ref_kwargs(kw))
    if pad:  # the fully padded batch row gives exactly 0 and zero gradients
        assert (got[0][-1] == 0).all() and (got[1][-1] == 0).all()


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b.values[0] != "triton"])
@pytest.mark.parametrize("T", [1000, 2048])
def test_long_sequences(backend, T):
    """Long T on the CPU kernels (one head, kept small in work: B=1, Hq=2/1)."""
    Hq = 2 if T == 1000 else 1
    q, k, v, _, dout = make_inputs(1, Hq, 1, T, T, 32, torch.float32, noncontig=True)
    with fastattn.use_backend(backend):
        got = fwd_bwd(fastattn.attention, q, k, v, dout, causal=True)
        assert fastattn.last_backend("attention") == backend
    assert_within_rule([t.cpu() for t in got], q.cpu(), k.cpu(), v.cpu(), dout.cpu(), causal=True)


def test_backends_agree():
    """Every backend gives the same answer on the same inputs (dropout included)."""
    q, k, v, kpm, dout = make_inputs(2, 4, 2, 37, 45, 32, torch.float32, pad=True)
    results = {}
    for b in BACKENDS:
        if b == "cpu" and CPU_SKIP is not None:
            continue
        with fastattn.use_backend(b):
            torch.manual_seed(7)
            results[b] = fwd_bwd(
                fastattn.attention, q, k, v, dout, causal=True, key_padding_mask=kpm, dropout_p=0.2
            )
    ref = results["reference"]
    for b, got in results.items():
        for name, x, y in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
            err = (x - y).abs().max().item()
            assert err < 1e-4, f"{b} vs reference, {name}: {err:.3g}"


def test_reference_matches_sdpa():
    """The reference's causal alignment and GQA agree with torch where they coincide."""
    q, k, v, _, _ = make_inputs(2, 8, 2, 19, 19, 16, torch.float64)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(attention_reference(q, k, v, causal=True), want)
    q1 = q[:, :, -1:]  # one query row at the end sees every key (bottom-right alignment)
    torch.testing.assert_close(
        attention_reference(q1, k, v, causal=True), want[:, :, -1:], rtol=1e-12, atol=1e-12
    )
    kpm = torch.zeros(2, 19, dtype=torch.bool)
    kpm[0, 5:] = True
    mask = (~kpm)[:, None, None, :]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(attention_reference(q, k, v, key_padding_mask=kpm), want)


def test_explicit_backend_unsupported_case_raises():
    if "triton" not in BACKENDS:
        pytest.skip("triton not usable here")
    q = torch.randn(1, 1, 4, 256, device=DEV)
    with fastattn.use_backend("triton"), pytest.raises(fastattn.BackendError, match="head dim 256"):
        fastattn.attention(q, q, q)


# ----------------------------------------------------------------------------- empties
@pytest.mark.parametrize(
    "shape_q,shape_kv",
    [
        ((0, 2, 5, 16), (0, 2, 7, 16)),
        ((2, 2, 0, 16), (2, 2, 7, 16)),
        ((2, 2, 5, 16), (2, 2, 0, 16)),
    ],
)
def test_empty_inputs(shape_q, shape_kv):
    q = torch.randn(shape_q, requires_grad=True)
    k = torch.randn(shape_kv, requires_grad=True)
    v = torch.randn(shape_kv, requires_grad=True)
    out = fastattn.attention(q, k, v, causal=True)
    assert out.shape == shape_q and (out == 0).all()
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == t.shape and (t.grad == 0).all()


# ----------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_fraction(p):
    keep = dropout_keep_mask(RUN_SEED, 0, 2, 4, 64, 64, p)
    assert abs((1 - keep.float().mean().item()) - p) < 0.01


def test_philox_known_answer():
    """Philox4x32-10 test vector (Random123 kat_vectors: counter 0, key 0)."""
    z = torch.zeros(1, dtype=torch.int64)
    got = [int(x) for x in philox4x32(z, z, z, z, 0)]
    assert got == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_dropout_mask_mapping_four_words_per_call():
    """Pins the mapping: key j reads word j & 3 of the Philox call on counter (j >> 2, i,
    b*Hq + h, offset), so keys 4k .. 4k+3 share one call (Tk = 10: a partial last group)."""
    B, Hq, Tq, Tk, p, off = 2, 3, 5, 10, 0.5, 7
    seed = 0x0123_4567_89AB_CDEF & (2**62 - 1)
    got = dropout_keep_mask(seed, off, B, Hq, Tq, Tk, p)
    thr = dropout_threshold(p)
    for b in range(B):
        for h in range(Hq):
            for i in range(Tq):
                for k in range((Tk + 3) // 4):
                    c = [torch.tensor([v]) for v in (k, i, b * Hq + h, off)]
                    words = [int(w) for w in philox4x32(*c, seed)]
                    for j in range(4 * k, min(4 * k + 4, Tk)):
                        want = (words[j & 3] >> 8) >= thr
                        assert bool(got[b, h, i, j]) == want, (b, h, i, j)
    # The old mapping (counter j, word 0) gives a different mask for this seed.
    j = torch.arange(Tk).view(1, 1, 1, Tk)
    i = torch.arange(Tq).view(1, 1, Tq, 1)
    bh = torch.arange(B * Hq).view(B, Hq, 1, 1)
    shape = (B, Hq, Tq, Tk)
    c = [t.expand(shape) for t in (j, i, bh, torch.full((1, 1, 1, 1), off))]
    old = (philox4x32(*c, seed)[0] >> 8) >= thr
    assert not torch.equal(got, old)


try:
    import triton
    import triton.language as tl
    from triton.language.random import philox_impl
except ImportError:  # pragma: no cover - triton is optional
    triton = None

if triton is not None:

    @triton.jit
    def _philox_kernel(out_ptr, seed_lo, seed_hi, c2v, c3v, N: tl.constexpr, M: tl.constexpr):
        i = tl.arange(0, M)[:, None]
        j = tl.arange(0, N)[None, :]
        zero = tl.zeros([M, N], dtype=tl.uint32)
        c0 = zero + j.to(tl.uint32)
        c1 = zero + i.to(tl.uint32)
        c2 = zero + tl.full([1], c2v, tl.int64).to(tl.uint32)[:, None]
        c3 = zero + tl.full([1], c3v, tl.int64).to(tl.uint32)[:, None]
        r0, _, _, _ = philox_impl(c0, c1, c2, c3, seed_lo.to(tl.uint32), seed_hi.to(tl.uint32))
        tl.store(out_ptr + i * N + j, r0.to(tl.int64))


@pytest.mark.triton
def test_philox_matches_triton():
    """dropout_keep_mask's Philox equals triton.language.random.philox_impl bit for bit."""
    if "triton" not in BACKENDS:
        pytest.skip("triton not usable here")
    seed = 0x1234_5678_9ABC_DEF0 & (2**62 - 1)
    for c2v, c3v in ((0, 0), (5, 7), (123456, 0xFFFFFFFF)):
        out = torch.empty(16, 32, dtype=torch.int64, device=DEV)
        _philox_kernel[(1,)](out, seed & 0xFFFFFFFF, seed >> 32, c2v, c3v, N=32, M=16)
        i = torch.arange(16).view(16, 1).expand(16, 32)
        j = torch.arange(32).view(1, 32).expand(16, 32)
        want = philox4x32(j, i, torch.full_like(i, c2v), torch.full_like(i, c3v), seed)[0]
        assert torch.equal(out.cpu() & 0xFFFFFFFF, want)


def test_dropout_same_seed_same_output():
    q, k, v, _, _ = make_inputs(1, 2, 2, 23, 23, 16, torch.float32)
    torch.manual_seed(11)
    a = fastattn.attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(11)
    b = fastattn.attention(q, k, v, dropout_p=0.3)
    c = fastattn.attention(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dropout_mask_and_gradients_match_reference(backend):
    """The kernel draws exactly dropout_keep_mask (seed from torch's default generator): its
    output and gradients equal the float64 reference run with that mask."""
    B, Hq, Hkv, Tq, Tk, D, p = 2, 4, 2, 33, 41, 16, 0.25
    q, k, v, kpm, dout = make_inputs(B, Hq, Hkv, Tq, Tk, D, torch.float32, pad=True)
    torch.manual_seed(99)
    seed = int(_draw_seed())
    mask = dropout_keep_mask(seed, 0, B, Hq, Tq, Tk, p)
    kw = dict(causal=True, key_padding_mask=kpm)
    with fastattn.use_backend(backend):
        torch.manual_seed(99)
        got = fwd_bwd(fastattn.attention, q, k, v, dout, dropout_p=p, **kw)
    d64 = [t.double().cpu() for t in (q, k, v, dout)]
    want = fwd_bwd(attention_reference, *d64, dropout_p=p, dropout_mask=mask, **ref_kwargs(kw))
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        err = (g.cpu().double() - w).abs().max().item()
        assert err < 1e-4, f"{backend} {name}: {err:.3g}"


# ----------------------------------------------------------------------------- op machinery
def _op_args(requires_grad=True, pad=True, causal=True, dropout_p=0.0, bias=False, softcap=0.0):
    q, k, v, kpm, _ = make_inputs(2, 4, 2, 9, 11, 16, torch.float32, pad=pad)
    q, k, v = (t.requires_grad_(requires_grad) for t in (q, k, v))
    b = torch.randn(1, 4, 9, 11).requires_grad_(requires_grad) if bias else None
    wr = 0 if causal else -1
    return (q, k, v, kpm, b, 0.25, softcap, -1, wr, 11 - 9, dropout_p, torch.tensor(12345), 0)


@pytest.mark.parametrize(
    "kw", [dict(dropout_p=0.0), dict(dropout_p=0.3), dict(bias=True, softcap=5.0)]
)
def test_opcheck_custom_ops(kw):
    args = _op_args(**kw)
    torch.library.opcheck(torch.ops.fastattn.attention_fwd.default, args)
    args = _op_args(requires_grad=False, **kw)
    out, lse = torch.ops.fastattn.attention_fwd(*args)
    dout = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.fastattn.attention_bwd.default,
        (dout, *args[:3], out, lse, *args[3:], args[4] is not None, "auto"),
    )


def test_lse_and_empty_rows_contract():
    """lse is the natural-log logsumexp of the scaled scores, +inf for a row that sees nothing
    (served by auto: the cpu kernel where built, else the reference)."""
    q, k, v, kpm, _ = make_inputs(2, 2, 2, 6, 4, 16, torch.float64, pad=True)
    out, lse = torch.ops.fastattn.attention_fwd(
        q, k, v, kpm, None, 0.25, 0.0, -1, 0, -2, 0.0, None, 0
    )
    s = (q @ k.transpose(-2, -1)) * 0.25
    vis = torch.ones(6, 4, dtype=torch.bool).tril(4 - 6)[None, None] & ~kpm[:, None, None, :]
    want = torch.logsumexp(s.masked_fill(~vis, float("-inf")), -1)
    want = torch.where(torch.isneginf(want), float("inf"), want)
    assert lse.dtype == torch.float64  # float32 for every other input dtype
    torch.testing.assert_close(lse, want)
    assert torch.isinf(lse[-1]).all() and (out[-1] == 0).all()


def test_gradcheck_float64():
    q, k, v, kpm, _ = make_inputs(1, 2, 1, 5, 6, 4, torch.float64, pad=False)
    kpm = torch.tensor([[False, True, False, False, True, False]])
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    for causal in (False, True):
        f = lambda q, k, v, c=causal: fastattn.attention(q, k, v, causal=c, key_padding_mask=kpm)
        assert torch.autograd.gradcheck(f, inputs, atol=1e-5, rtol=1e-3)


class _TinyBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = CausalSelfAttention(32, 4, n_kv_head=2)

    def forward(self, x):
        return self.attn(x).sum(-1)


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    m = _TinyBlock().eval()
    x = torch.randn(2, 9, 32)
    want = m(x)
    got = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, want)
    # With dropout the seed draw (torch.randint(...).item()) is traced too: no graph break.
    f = torch.compile(
        lambda q: fastattn.attention(q, q, q, dropout_p=0.5), fullgraph=True, backend="aot_eager"
    )
    q = torch.randn(1, 2, 8, 16)
    assert not torch.equal(f(q), f(q))  # a fresh seed per call, not one baked into the graph


# ----------------------------------------------------------------------------- modules
def _mha_pair(batch_first, **kw):
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(48, 4, batch_first=batch_first, **kw)
    ours = MultiheadAttention(48, 4, batch_first=batch_first, **kw)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    return ref, ours


def _grads(module, out):
    return [p.grad.clone() for p in module.parameters() if p.grad is not None]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize(
    "mode", ["plain", "padding", "causal", "causal_hint", "cross", "cross_sep", "unbatched"]
)
def test_multihead_attention_matches_torch(batch_first, mode):
    ref, ours = _mha_pair(batch_first)
    cross = mode.startswith("cross")
    N, L, S, E = 3, 7, 10 if cross else 7, 48
    g = torch.Generator().manual_seed(1)
    shape = lambda T: (N, T, E) if batch_first else (T, N, E)
    x = torch.randn(shape(L), generator=g)
    mem = torch.randn(shape(S), generator=g)
    kw: dict = {}
    if mode == "padding":
        kpm = torch.zeros(N, S, dtype=torch.bool)
        kpm[0, 4:] = True
        kpm[2, :2] = True
        kw["key_padding_mask"] = kpm
    if mode == "causal":
        kw["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(L)
        kw["is_causal"] = True
    if mode == "causal_hint":
        kw["attn_mask"] = torch.ones(L, L, dtype=torch.bool).triu(1)
    if mode == "unbatched":
        x = x[:, 0] if not batch_first else x[0]
        mem = x
    key = mem if cross else x
    outs = []
    for m in (ref, ours):
        xx = x.clone().requires_grad_()
        kk = key.clone().requires_grad_() if cross else xx  # self-attention: query is key
        vv = kk * 1.0 if mode == "cross_sep" else kk  # key is value, or a separate tensor
        fastattn._dispatch._last.pop("attention", None)
        out, w = m(xx, kk, vv, need_weights=False, **kw)
        assert w is None
        if m is ours:  # the fused path served it
            assert fastattn.last_backend("attention") is not None
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        out.backward(dout)
        outs.append((out.detach(), (xx.grad, kk.grad), _grads(m, out)))
    (o1, gx1, gp1), (o2, gx2, gp2) = outs
    torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx2, gx1, rtol=1e-4, atol=1e-5)
    for a, b in zip(gp2, gp1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_multihead_attention_fallbacks_and_fused_path():
    ref, ours = _mha_pair(True)
    x = torch.randn(2, 5, 48)
    # need_weights=True (the default) goes to torch and returns its weights.
    o1, w1 = ref(x, x, x)
    o2, w2 = ours(x, x, x)
    torch.testing.assert_close(o2, o1)
    torch.testing.assert_close(w2, w1)
    fastattn._dispatch._last.pop("attention", None)
    ours(x, x, x, need_weights=False, attn_mask=torch.randn(5, 5))  # arbitrary float mask
    assert fastattn.last_backend("attention") is None
    ours(x, x, x, need_weights=False)
    assert fastattn.last_backend("attention") is not None
    # a float key_padding_mask of 0 / -inf takes the fused path and equals the bool one
    kpm = torch.tensor([[False, False, True, False, True], [False] * 5])
    fk = torch.zeros(2, 5).masked_fill(kpm, float("-inf"))
    torch.testing.assert_close(
        ours(x, x, x, need_weights=False, key_padding_mask=fk)[0],
        ours(x, x, x, need_weights=False, key_padding_mask=kpm)[0],
    )


def test_multihead_attention_dropout_training():
    _, ours = _mha_pair(True, dropout=0.3)
    x = torch.randn(2, 6, 48, requires_grad=True)
    ours.train()
    torch.manual_seed(3)
    a = ours(x, x, x, need_weights=False)[0]
    torch.manual_seed(3)
    b = ours(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(a, b)
    ours.eval()
    assert not torch.allclose(a, ours(x, x, x, need_weights=False)[0])
    a.sum().backward()
    assert torch.isfinite(x.grad).all()


def _causal_self_attention_plain(m: CausalSelfAttention, x):
    B, T, C = x.shape
    hd, nh, nkv = m.head_dim, m.n_head, m.n_kv_head
    q, k, v = m.c_attn(x).split([nh * hd, nkv * hd, nkv * hd], dim=2)
    q = q.reshape(B, T, nh, hd).transpose(1, 2)
    k = k.reshape(B, T, nkv, hd).transpose(1, 2)
    v = v.reshape(B, T, nkv, hd).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return m.c_proj(y.transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("n_kv_head", [None, 2, 1])
def test_causal_self_attention_and_kv_cache(n_kv_head):
    torch.manual_seed(0)
    m = CausalSelfAttention(64, 4, dropout=0.1, n_kv_head=n_kv_head).eval()
    names = [n for n, _ in m.named_parameters()]
    assert names == ["c_attn.weight", "c_attn.bias", "c_proj.weight", "c_proj.bias"]
    x = torch.randn(2, 11, 64)
    full = m(x)
    torch.testing.assert_close(full, _causal_self_attention_plain(m, x), rtol=1e-5, atol=1e-5)
    y, kv = m(x[:, :6], use_cache=True)
    ys = [y]
    for t in range(6, 11):
        y, kv = m(x[:, t : t + 1], past_kv=kv, use_cache=True)
        ys.append(y)
    assert kv[0].shape == (2, n_kv_head or 4, 11, 16)
    torch.testing.assert_close(torch.cat(ys, 1), full, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- bad input
def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


BAD = [
    (lambda: (_t(2, 8, 16), _t(2, 8, 16), _t(2, 8, 16)), {}, ValueError, "must be 4-D"),
    (
        lambda: (_t(2, 4, 8, 16), _t(3, 4, 8, 16), _t(3, 4, 8, 16)),
        {},
        ValueError,
        "batch size mismatch",
    ),
    (
        lambda: (_t(2, 4, 8, 16), _t(2, 4, 8, 32), _t(2, 4, 8, 32)),
        {},
        ValueError,
        "head dim mismatch",
    ),
    (
        lambda: (_t(2, 4, 8, 16), _t(2, 4, 8, 16), _t(2, 4, 9, 16)),
        {},
        ValueError,
        "k and v must have the same shape",
    ),
    (
        lambda: (_t(2, 4, 8, 16), _t(2, 3, 8, 16), _t(2, 3, 8, 16)),
        {},
        ValueError,
        "multiple of the number of key/value heads",
    ),
    (
        lambda: (_t(2, 4, 8, 16), _t(2, 4, 8, 16, dtype=torch.float64), _t(2, 4, 8, 16)),
        {},
        TypeError,
        "same dtype",
    ),
    (lambda: (torch.ones(2, 4, 8, 16, dtype=torch.int32),) * 3, {}, TypeError, "floating-point"),
    (lambda: (_t(2, 4, 8, 0), _t(2, 4, 8, 0), _t(2, 4, 8, 0)), {}, ValueError, "head dim must"),
    (
        lambda: (_t(2, 4, 8, 16), _t(2, 4, 8, 16), _t(2, 4, 8, 16)),
        {"key_padding_mask": torch.zeros(2, 9, dtype=torch.bool)},
        ValueError,
        r"shape \(batch",
    ),
    (
        lambda: (_t(2, 4, 8, 16), _t(2, 4, 8, 16), _t(2, 4, 8, 16)),
        {"key_padding_mask": torch.zeros(2, 8)},
        TypeError,
        "must be a bool tensor",
    ),
    (
        lambda: (_t(2, 4, 8, 16), _t(2, 4, 8, 16), _t(2, 4, 8, 16)),
        {"dropout_p": 1.0},
        ValueError,
        r"dropout_p must be in \[0, 1\)",
    ),
    (
        lambda: (_t(2, 4, 8, 16), _t(2, 4, 8, 16), _t(2, 4, 8, 16)),
        {"dropout_p": -0.1},
        ValueError,
        "dropout_p",
    ),
    (
        lambda: (_t(2, 4, 8, 16), _t(2, 4, 8, 16), _t(2, 4, 8, 16)),
        {"scale": float("nan")},
        ValueError,
        "scale must be a finite",
    ),
    (lambda: ([1.0], _t(2, 4, 8, 16), _t(2, 4, 8, 16)), {}, TypeError, "q must be a torch.Tensor"),
]


@pytest.mark.parametrize("make,kw,exc,match", BAD, ids=[b[3][:24] for b in BAD])
def test_bad_input(make, kw, exc, match):
    with pytest.raises(exc, match=match):
        fastattn.attention(*make(), **kw)


def test_bad_input_devices():
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="same device"):
        fastattn.attention(q, q.to("meta"), q.to("meta"))
    with pytest.raises(ValueError, match="same device"):
        fastattn.attention(q, q, q, key_padding_mask=torch.zeros(1, 4, dtype=torch.bool).to("meta"))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_large_logits_do_not_overflow(backend):
    """Scores of +-1e4 (exp overflows float32 without the running max) stay finite and right."""
    q, k, v, kpm, dout = make_inputs(1, 2, 1, 37, 29, 16, torch.float32, pad=True, seed=5)
    q = q * 300.0
    kw = dict(causal=True, key_padding_mask=kpm)
    with fastattn.use_backend(backend):
        got = fwd_bwd(fastattn.attention, q, k, v, dout, **kw)
    assert_within_rule(
        [t.cpu() for t in got],
        *(t.cpu() for t in (q, k, v, dout)),
        label=backend,
        **ref_kwargs(kw),
    )


def test_module_bad_config():
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        CausalSelfAttention(64, 4, n_kv_head=3)
    with pytest.raises(ValueError, match="multiple of n_head"):
        CausalSelfAttention(30, 4)


def test_scale_argument():
    q, k, v, _, _ = make_inputs(1, 2, 2, 9, 9, 16, torch.float64)
    got = fastattn.attention(q, k, v, scale=0.1)
    torch.testing.assert_close(got, attention_reference(q, k, v, scale=0.1))


def test_autocast_casts_like_sdpa():
    # Under autocast, SDPA takes q/k/v in the autocast dtype whatever they arrive in (a float32
    # q/k after a float32 rotary embedding, a bfloat16 v from the projection): so does attention.
    q, k, v, _, dout = make_inputs(2, 4, 2, 17, 17, 16, torch.float32)
    v = v.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fastattn.attention(q, k, v, causal=True)
        want = F.scaled_dot_product_attention(
            q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True
        )
    assert got.dtype == want.dtype == torch.bfloat16
    ref = attention_reference(q.double(), k.double(), v.double(), causal=True)
    from tests.rule import assert_rule

    assert_rule("out", got, want, ref)
