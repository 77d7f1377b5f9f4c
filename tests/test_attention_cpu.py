"""The C++ CPU attention kernel on cases the backend-generic tests (test_attention.py,
test_properties.py, test_reliability.py) do not reach, kept from the kernel's development check:
head dims above 128 that are not a multiple of the vector width (padding and micro-kernel
column tails) and below 16, with dropout too; inputs whose last dim is strided (the kernel must
copy them); bitwise repeatability with dropout and a grouped-query backward; bfloat16 on both
of its paths (AVX512_BF16 dot products, and the fp32 FMA path that FASTATTN_CPU_BF16_DOT=0
forces). Error rule: tests/rule.py, against the float64 reference run with the same dropout
mask.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import fastattn
from fastattn.ops.attention import attention_reference, dropout_keep_mask
from tests.rule import assert_rule

pytestmark = pytest.mark.skipif(
    "cpu" not in fastattn.available_backends("cpu"), reason="cpu backend not built"
)


def _fwd_bwd(fn, q, k, v, dout, **kw):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, **kw)
    return (out.detach(), *torch.autograd.grad(out, leaves, dout))


def _check(q, k, v, dout, *, causal, p=0.0, seed=99, key_padding_mask=None):
    """fastattn's cpu kernel vs the reference in q's dtype and in float64, same dropout mask."""
    B, Hq, Tq, _ = q.shape
    Tk = k.shape[2]
    torch.manual_seed(seed)  # the kernel draws its dropout seed from torch's generator
    drop_seed = int(torch.randint(0, 2**62, (1,)).item())
    mask = dropout_keep_mask(drop_seed, 0, B, Hq, Tq, Tk, p) if p > 0 else None
    with fastattn.use_backend("cpu"):
        torch.manual_seed(seed)
        got = _fwd_bwd(
            fastattn.attention, q, k, v, dout, causal=causal, dropout_p=p,
            key_padding_mask=key_padding_mask,
        )  # fmt: skip
        assert fastattn.last_backend("attention") == "cpu"
    kw = dict(causal=causal, dropout_p=p, dropout_mask=mask, key_padding_mask=key_padding_mask)
    own = _fwd_bwd(attention_reference, q, k, v, dout, **kw)
    ref = _fwd_bwd(attention_reference, *(t.double() for t in (q, k, v, dout)), **kw)
    scale = max(r.abs().max().item() for r in ref)
    for name, g, o, r in zip(("out", "dq", "dk", "dv"), got, own, ref, strict=True):
        assert_rule(f"{name} {tuple(q.shape)} D={q.shape[-1]} p={p}", g, o, r, scale)


@pytest.mark.parametrize("D", [3, 200, 255])
@pytest.mark.parametrize("causal", [False, True])
def test_odd_head_dims(D, causal):
    q, k, v = torch.randn(2, 4, 70, D), torch.randn(2, 2, 131, D), torch.randn(2, 2, 131, D)
    _check(q, k, v, torch.randn(2, 4, 70, D), causal=causal)
    q, k, v = torch.randn(1, 2, 50, D), torch.randn(1, 1, 33, D), torch.randn(1, 1, 33, D)
    _check(q, k, v, torch.randn(1, 2, 50, D), causal=causal, p=0.25)


@pytest.mark.parametrize(
    "dtype, causal", list(itertools.product((torch.float32, torch.bfloat16), (False, True)))
)
def test_last_dim_strided_inputs(dtype, causal):
    """q and k with stride(-1) != 1 (a (B, H, D, T) tensor seen as (B, H, T, D))."""
    q = torch.randn(2, 4, 64, 70).transpose(-1, -2).to(dtype)
    k = torch.randn(2, 2, 64, 113).transpose(-1, -2).to(dtype)
    v = torch.randn(2, 2, 113, 64).to(dtype)
    assert q.stride(-1) != 1 and k.stride(-1) != 1
    _check(q, k, v, torch.randn(2, 4, 70, 64).to(dtype), causal=causal)


@pytest.mark.parametrize("Hq, Hkv", [(8, 1), (4, 4)])
def test_bitwise_repeatable_with_dropout(Hq, Hkv):
    """Same inputs and seed, same bits: also with 8 query heads on one KV head, where the
    backward may split a KV head's work across threads (its partial sums are reduced in a fixed
    order, never by atomics)."""
    q, dout = torch.randn(1, Hq, 300, 64), torch.randn(1, Hq, 300, 64)
    k, v = torch.randn(1, Hkv, 300, 64), torch.randn(1, Hkv, 300, 64)
    runs = []
    with fastattn.use_backend("cpu"):
        for _ in range(2):
            torch.manual_seed(3)
            runs.append(_fwd_bwd(fastattn.attention, q, k, v, dout, causal=True, dropout_p=0.1))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


# ----------------------------------------------------------------------------- bfloat16 paths
BF16_DOT = bool(getattr(fastattn._dispatch._extension()[0], "cpu_bf16_dot", False))


@pytest.fixture(params=["dot", "fma"])
def bf16_path(request, monkeypatch):
    """Runs a test on the AVX512_BF16 dot-product path and on the fp32 FMA path."""
    if request.param == "dot" and not BF16_DOT:
        pytest.skip("this CPU or build has no AVX512_BF16")
    monkeypatch.setenv("FASTATTN_CPU_BF16_DOT", "1" if request.param == "dot" else "0")
    return request.param


@pytest.fixture(params=["float32", "bf16-dot", "bf16-fma"])
def dtype_path(request, monkeypatch):
    """float32, and bfloat16 on each of its paths: the dtype to test in."""
    if request.param == "bf16-dot" and not BF16_DOT:
        pytest.skip("this CPU or build has no AVX512_BF16")
    monkeypatch.setenv("FASTATTN_CPU_BF16_DOT", "0" if request.param == "bf16-fma" else "1")
    return torch.float32 if request.param == "float32" else torch.bfloat16


# (B, Hq, Hkv, Tq, Tk, D, causal, dropout_p, key padding): odd lengths (1, primes, past a tile
# of 64 queries / 128 keys), GQA, head dims from 3 to 255 (odd ones pad a bf16 pair).
BF16_CASES = [
    (2, 6, 6, 67, 67, 64, True, 0.0, False),
    (1, 4, 2, 131, 257, 128, False, 0.0, True),
    (2, 4, 1, 1, 37, 16, True, 0.0, False),
    (1, 2, 1, 1, 1, 80, False, 0.0, False),
    (1, 3, 3, 97, 53, 80, True, 0.2, False),
    (1, 2, 2, 29, 131, 255, False, 0.1, True),
    (1, 4, 2, 70, 70, 3, True, 0.0, True),
    (1, 2, 1, 190, 190, 33, True, 0.0, False),
]


@pytest.mark.parametrize(
    "case",
    BF16_CASES,
    ids=lambda c: "x".join(map(str, c[:6])) + f"-c{int(c[6])}-p{c[7]}-m{int(c[8])}",
)
def test_bf16_paths_against_float64(bf16_path, case):
    B, Hq, Hkv, Tq, Tk, D, causal, p, pad = case
    bf = torch.bfloat16
    q, k, v = torch.randn(B, Hq, Tq, D), torch.randn(B, Hkv, Tk, D), torch.randn(B, Hkv, Tk, D)
    kpm = None
    if pad:
        kpm = torch.rand(B, Tk) < 0.3
        kpm[0, :2] = False
        kpm[-1, :] = True  # a batch whose queries see nothing
    _check(q.to(bf), k.to(bf), v.to(bf), torch.randn(B, Hq, Tq, D).to(bf), causal=causal, p=p,
           key_padding_mask=kpm)  # fmt: skip


def test_bf16_noncontiguous_both_paths(bf16_path):
    """Transposed / sliced views in every stride position the kernel reads through."""
    base = torch.randn(2, 70, 8, 48).to(torch.bfloat16)  # (B, T, H, D) viewed as (B, H, T, D)
    q = base.transpose(1, 2)[:, :4]
    k = base.transpose(1, 2)[:, 4:6, 3:]
    v = torch.randn(2, 2, 48, 67).to(torch.bfloat16).transpose(-1, -2)[..., :48]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _check(q, k, v, torch.randn(2, 4, 70, 48).to(torch.bfloat16), causal=True)


@pytest.mark.skipif(not BF16_DOT, reason="this CPU or build has no AVX512_BF16")
def test_bf16_switch_selects_the_path(monkeypatch):
    """FASTATTN_CPU_BF16_DOT picks the path per call: the two round P differently, so their
    bits differ (a test of the switch, so the dot-path tests above cannot silently run the
    other path), and the report says which runs."""
    q, k, v = (torch.randn(1, 2, 100, 64).to(torch.bfloat16) for _ in range(3))
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("FASTATTN_CPU_BF16_DOT", flag)
        with fastattn.use_backend("cpu"):
            outs[flag] = fastattn.attention(q, k, v, causal=True)
        text = fastattn._dispatch.describe()
        assert ("AVX512_BF16 dot products" in text) == (flag == "1"), text
    assert not torch.equal(outs["1"], outs["0"])


# ----------------------------------------------------------------------------- features, tiled
def _check_kw(q, k, v, dout, bias=None, **kw):
    """fastattn's cpu kernel vs the reference (q's dtype and float64) with feature arguments;
    a bias gets its gradient checked too."""

    def run(fn, *xs, b):
        leaves = [t.detach().requires_grad_() for t in xs[:3]]
        extra = {}
        if b is not None:
            leaves.append(b.detach().requires_grad_())
            extra["attn_bias"] = leaves[-1]
        out = fn(*leaves[:3], **kw, **extra)  # xs[3] is dout
        return [out.detach(), *torch.autograd.grad(out, leaves, xs[3])]

    with fastattn.use_backend("cpu"):
        got = run(fastattn.attention, q, k, v, dout, b=bias)
        assert fastattn.last_backend("attention") == "cpu"
    own = run(attention_reference, q, k, v, dout, b=bias)
    b64 = bias.double() if bias is not None else None
    ref = run(attention_reference, *(t.double() for t in (q, k, v, dout)), b=b64)
    scale = max(r.abs().max().item() for r in ref)
    for name, g, o, r in zip(("out", "dq", "dk", "dv", "dbias"), got, own, ref, strict=False):
        assert_rule(f"{name} {tuple(q.shape)} {tuple(k.shape)} {kw}", g, o, r, scale)


# Windows and alignments over several key blocks (128 keys) and query blocks (64 rows), so
# whole tiles are skipped on both sides of the band: (Tq, Tk, window, causal, alignment).
WINDOW_CASES = [
    (300, 300, (50, 0), True, "bottom_right"),
    (200, 333, (37, 70), False, "bottom_right"),
    (333, 200, (-1, 5), False, "top_left"),
    (150, 400, None, True, "top_left"),
    (257, 131, (129, -1), False, "top_left"),
    (97, 290, (0, 0), False, "bottom_right"),
]


@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}-{c[4]}")
def test_window_alignment_tiles(dtype_path, case):
    dtype = dtype_path
    Tq, Tk, window, causal, alignment = case
    q, k, v = torch.randn(1, 4, Tq, 32), torch.randn(1, 2, Tk, 32), torch.randn(1, 2, Tk, 32)
    dout = torch.randn(1, 4, Tq, 32)
    q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    _check_kw(q, k, v, dout, causal=causal, window=window, alignment=alignment)


# (name, kwargs, bias shape or None): softcap, bias (full, per head, ALiBi-like) and boolean
# masks, alone and with windows and key padding, over several tiles (Tq=150, Tk=290).
SCORE_CASES = [
    ("softcap-causal", dict(softcap=2.0, causal=True), None),
    ("softcap-window", dict(softcap=5.0, window=(60, 20)), None),
    ("bias-full-causal", dict(causal=True), (2, 4, 150, 290)),
    ("bias-alibi-sliding", dict(causal=True, window=(100, 0)), (1, 4, 1, 290)),
    ("bias-heads-softcap-pad", dict(softcap=3.0, pad=True), (4, 150, 290)),
    ("mask", dict(mask=True), None),
]


@pytest.mark.parametrize("name, kw, bias_shape", SCORE_CASES, ids=[c[0] for c in SCORE_CASES])
def test_softcap_bias_tiles(dtype_path, name, kw, bias_shape):
    dtype = dtype_path
    B, Hq, Hkv, Tq, Tk, D = 2, 4, 2, 150, 290, 40
    q, k, v = torch.randn(B, Hq, Tq, D), torch.randn(B, Hkv, Tk, D), torch.randn(B, Hkv, Tk, D)
    dout = torch.randn(B, Hq, Tq, D)
    q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    kw = dict(kw)
    if kw.pop("pad", False):
        kpm = torch.rand(B, Tk) < 0.3
        kpm[1] = True  # a batch whose queries see nothing
        kw["key_padding_mask"] = kpm
    if kw.pop("mask", False):
        mask = torch.rand(B, 1, Tq, Tk) < 0.5
        mask[:, :, 3] = False  # a query row that sees nothing
        kw["attn_mask"] = mask
    bias = torch.randn(bias_shape).mul(2).to(dtype) if bias_shape is not None else None
    if bias is not None:
        bias[..., 7] = float("-inf")  # a key hidden by the bias
    _check_kw(q, k, v, dout, bias=bias, **kw)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(bias=torch.zeros(1, 2, 5, 7)), "bias must have shape"),
        (dict(bias=torch.zeros(2, 2, 5, 7, dtype=torch.float64)), "bias must be Float"),
        (dict(bias=torch.zeros(2, 2, 7, 5).transpose(-1, -2)), "unit stride"),
        (dict(softcap=-1.0), "softcap"),
        (dict(softcap=float("nan")), "softcap"),
        (dict(window_left=-2), "window_left"),
        (dict(scale=float("inf")), "scale"),
    ],
)
def test_features_schema_refuses_bad_arguments(change, match):
    """The kernel-level op checks what the public function would never send it."""
    q, k = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 7, 8)
    args = dict(bias=None, scale=0.3, softcap=0.0, window_left=-1, window_right=-1)
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastattn_C.attention_fwd_features(
            q, k, k, None, args["bias"], args["scale"], args["softcap"], args["window_left"],
            args["window_right"], 2, 0.0, 0, 0,
        )  # fmt: skip


def test_bias_grad_needs_a_bias():
    q = torch.randn(1, 1, 3, 8)
    out, lse = torch.ops.fastattn_C.attention_fwd_features(
        q, q, q, None, None, 0.3, 0.0, -1, -1, 0, 0.0, 0, 0
    )
    with pytest.raises(RuntimeError, match="need_bias_grad without a bias"):
        torch.ops.fastattn_C.attention_bwd_features(
            out, q, q, q, out, lse, None, None, 0.3, 0.0, -1, -1, 0, 0.0, 0, 0, True
        )
