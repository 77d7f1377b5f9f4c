"""Attention features on every backend: softcap, sliding / local windows, top-left vs
bottom-right causal alignment, additive bias (with its gradient) and boolean masks.

Two layers of checks:

- the float64 reference against independent constructions (PyTorch's SDPA with an explicit
  mask, or the eager formula written out), so the meaning itself is pinned down;
- every backend against the float64 reference under the error rule of ``tests/rule.py`` for the
  output and every gradient (dq, dk, dv, dbias). A backend either serves a feature correctly or,
  when chosen explicitly, refuses it with a :class:`fastattn.BackendError` naming the feature;
  ``SUPPORTS`` states which, so a backend that silently loses (or gains) a feature fails here.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.ops.attention import attention_reference
from tests.rule import assert_rule
from tests.test_attention import DEV, KERNEL_BACKENDS

# What each kernel backend serves; everything else must be refused by name.
SUPPORTS: dict[str, set[str]] = {
    "reference": {"softcap", "window", "top_left", "bias", "mask"},
    "cpu": {"window", "top_left", "softcap", "bias", "mask"},
    "triton": set(),
    "cuda": set(),
}


def _sdpa64(q, k, v, mask=None, **kw):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)


def _qkv(B, Hq, Hkv, Tq, Tk, D, dtype=torch.float64):
    return (
        torch.randn(B, Hq, Tq, D, dtype=dtype),
        torch.randn(B, Hkv, Tk, D, dtype=dtype),
        torch.randn(B, Hkv, Tk, D, dtype=dtype),
    )


# ----------------------------------------------------------------------------- the meaning
def test_reference_top_left_is_sdpa_is_causal():
    """SDPA's is_causal with Tq != Tk is top-left aligned: query i sees keys 0..i."""
    q, k, v = _qkv(2, 4, 2, 5, 9, 16)
    want = _sdpa64(q, k, v, is_causal=True)
    got = attention_reference(q, k, v, causal=True, alignment="top_left")
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("alignment", ["bottom_right", "top_left"])
@pytest.mark.parametrize("window", [(3, 0), (2, 1), (-1, 2), (0, 0), (4, -1)])
def test_reference_window_matches_explicit_mask(window, alignment):
    Tq, Tk = 7, 11
    q, k, v = _qkv(1, 2, 2, Tq, Tk, 8)
    off = Tk - Tq if alignment == "bottom_right" else 0
    i = torch.arange(Tq)[:, None] + off
    j = torch.arange(Tk)[None, :]
    wl, wr = window
    mask = torch.ones(Tq, Tk, dtype=torch.bool)
    if wl >= 0:
        mask &= j >= i - wl
    if wr >= 0:
        mask &= j <= i + wr
    got = attention_reference(q, k, v, window=window, alignment=alignment)
    # rows with no visible key are 0 in fastattn (SDPA gives NaN there)
    want = torch.nan_to_num(_sdpa64(q, k, v, mask)) * mask.any(-1)[:, None]
    torch.testing.assert_close(got, want)


def test_reference_sliding_window_is_mistral_mask():
    """A sliding window of W keys (Mistral): causal and ``j > i - W``."""
    T, W = 12, 4
    q, k, v = _qkv(1, 2, 1, T, T, 8)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    mask = (j <= i) & (j > i - W)
    got = attention_reference(q, k, v, causal=True, window=(W - 1, 0))
    torch.testing.assert_close(got, _sdpa64(q, k, v, mask))


def test_reference_softcap_and_bias_formula():
    q, k, v = _qkv(2, 2, 2, 6, 6, 8)
    bias = torch.randn(1, 2, 6, 6, dtype=torch.float64) * 3
    cap, scale = 2.5, 0.7
    s = q @ k.transpose(-2, -1) * scale
    s = cap * torch.tanh(s / cap) + bias
    s = s.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.softmax(s, -1) @ v
    got = attention_reference(q, k, v, causal=True, scale=scale, softcap=cap, attn_bias=bias)
    torch.testing.assert_close(got, want)


def test_reference_bool_mask_and_bias_match_sdpa():
    q, k, v = _qkv(2, 4, 4, 5, 7, 8)
    mask = torch.rand(2, 1, 5, 7) < 0.7
    mask[..., 0] = True
    bias = torch.randn(4, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(attention_reference(q, k, v, attn_mask=mask), _sdpa64(q, k, v, mask))
    torch.testing.assert_close(attention_reference(q, k, v, attn_bias=bias), _sdpa64(q, k, v, bias))


# ----------------------------------------------------------------------------- every backend
# (name, kwargs builder, needs): B, Hq, Hkv, Tq, Tk, D small enough for the Triton interpreter.
def _bias(shape, requires_grad=True):
    def make(B, Hq, Tq, Tk, dtype):
        full = {"bhqk": (B, Hq, Tq, Tk), "hqk": (Hq, Tq, Tk), "1h1k": (1, Hq, 1, Tk)}[shape]
        return torch.randn(full, dtype=dtype).mul(2).requires_grad_(requires_grad)

    return make


CASES = [
    ("softcap", dict(causal=True, softcap=3.0), {"softcap"}),
    ("softcap-noncausal-pad", dict(softcap=1.5, pad=True), {"softcap"}),
    ("sliding", dict(causal=True, window=(5, 0)), {"window"}),
    ("local-2side", dict(window=(4, 3)), {"window"}),
    ("top-left-causal", dict(causal=True, alignment="top_left"), {"top_left"}),
    (
        "top-left-window",
        dict(causal=True, window=(3, 0), alignment="top_left"),
        {"top_left", "window"},
    ),
    ("bias-full", dict(bias="bhqk"), {"bias"}),
    ("bias-heads", dict(bias="hqk", causal=True), {"bias"}),
    ("bias-alibi", dict(bias="1h1k", causal=True), {"bias"}),
    ("mask", dict(mask=True), {"mask"}),
    (
        "softcap-bias-window",
        dict(softcap=4.0, bias="hqk", causal=True, window=(6, 0)),
        {"softcap", "bias", "window"},
    ),
]
SHAPES = [(2, 4, 2, 13, 13, 16), (1, 2, 1, 7, 19, 32), (1, 2, 2, 19, 7, 16)]


def _run(fn, q, k, v, dout, kw, bias):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    leaves = [q, k, v]
    if bias is not None:
        bias = bias.detach().requires_grad_()
        leaves.append(bias)
        kw = dict(kw, attn_bias=bias)
    out = fn(q, k, v, **kw)
    return [out.detach(), *(g.detach() for g in torch.autograd.grad(out, leaves, dout))]


def _params():
    for name, kw, needs in CASES:
        for shape in SHAPES:
            names = [b.values[0] for b in KERNEL_BACKENDS]
            for b in KERNEL_BACKENDS + ([] if "reference" in names else ["reference"]):
                backend = b if isinstance(b, str) else b.values[0]
                marks = [] if isinstance(b, str) else list(b.marks)
                for dtype in (torch.float32, torch.bfloat16):
                    yield pytest.param(
                        backend,
                        dtype,
                        kw,
                        needs,
                        shape,
                        marks=marks,
                        id=f"{backend}-{name}-{str(dtype)[6:]}-{'x'.join(map(str, shape))}",
                    )


@pytest.mark.parametrize("backend,dtype,kw,needs,shape", list(_params()))
def test_feature_against_float64(backend, dtype, kw, needs, shape):
    B, Hq, Hkv, Tq, Tk, D = shape
    q, k, v = (t.to(dtype) for t in _qkv(B, Hq, Hkv, Tq, Tk, D, torch.float32))
    dout = torch.randn(B, Hq, Tq, D).to(dtype)
    kw = dict(kw)
    if Tq == Tk:  # both alignments put the diagonal in the same place
        needs = needs - {"top_left"}
    if kw.pop("pad", False):
        kpm = torch.rand(B, Tk) < 0.3
        kpm[0, :] = True  # a fully padded row
        kw["key_padding_mask"] = kpm
    bias = _bias(kw.pop("bias"))(B, Hq, Tq, Tk, dtype) if "bias" in kw else None
    if kw.pop("mask", False):
        mask = torch.rand(B, 1, Tq, Tk) < 0.6
        mask[:, :, 1] = False  # a query row that sees nothing
        kw["attn_mask"] = mask
    to = lambda t: t.to(DEV) if isinstance(t, torch.Tensor) else t  # noqa: E731
    dev_kw = {n: to(x) for n, x in kw.items()}
    args = [to(t) for t in (q, k, v, dout)]
    with fastattn.use_backend(backend):
        if not needs <= SUPPORTS[backend]:
            with pytest.raises(fastattn.BackendError) as e:
                _run(fastattn.attention, *args, dev_kw, to(bias))
            missing = needs - SUPPORTS[backend]
            words = {"softcap": "softcap", "window": "window", "top_left": "top-left"}
            words |= {"bias": "bias", "mask": "mask"}
            assert any(words[m] in str(e.value) for m in missing), str(e.value)
            return
        got = _run(fastattn.attention, *args, dev_kw, to(bias))
        assert fastattn.last_backend("attention") == backend
    got = [g.cpu() for g in got]
    d64 = [t.double() for t in (q, k, v, dout)]
    b64 = bias.double() if bias is not None else None
    ref = _run(attention_reference, *d64, kw, b64)
    own = _run(attention_reference, q, k, v, dout, kw, bias)
    big = max(1.0, *(r.abs().max().item() for r in ref))
    for name, g, t, r in zip(("out", "dq", "dk", "dv", "dbias"), got, own, ref, strict=False):
        assert_rule(f"{backend} {name}", g, t, r, scale=big)


def test_fully_masked_rows_by_bias_are_zero():
    """-inf bias on every key of a row: output 0 and zero gradients, not NaN."""
    q, k, v = _qkv(1, 2, 2, 4, 5, 8, torch.float32)
    bias = torch.zeros(1, 2, 4, 5)
    bias[:, :, 2] = float("-inf")
    q.requires_grad_()
    out = fastattn.attention(q, k, v, attn_bias=bias)
    out.sum().backward()
    assert (out[:, :, 2] == 0).all() and (q.grad[:, :, 2] == 0).all()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()


def test_bias_gradient_reduces_over_broadcast_dims():
    q, k, v = _qkv(2, 3, 3, 4, 6, 8)
    bias = torch.randn(1, 3, 1, 6, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda b: fastattn.attention(q, k, v, attn_bias=b, softcap=2.0), (bias,)
    )


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(softcap=-1.0), "softcap"),
        (dict(softcap=math.inf), "softcap"),
        (dict(window=(3,)), "window"),
        (dict(window=(-2, 0)), "window"),
        (dict(alignment="top"), "alignment"),
        (dict(attn_bias=torch.zeros(2, 5, 5)), "attn_bias must broadcast"),
        (dict(attn_bias=torch.zeros(1, 4, 5, dtype=torch.int64)), "floating"),
        (dict(attn_mask=torch.zeros(4, 5)), "attn_mask must be a bool"),
        (dict(attn_mask=torch.ones(1, 1, 1, 4, 6, dtype=torch.bool)), "attn_mask must broadcast"),
    ],
)
def test_bad_feature_arguments(kw, match):
    q = torch.randn(1, 4, 4, 8)
    k = torch.randn(1, 4, 5, 8)
    with pytest.raises((ValueError, TypeError), match=match):
        fastattn.attention(q, k, k, **kw)
