"""The C++ CPU attention kernel on cases the backend-generic tests (test_attention.py,
test_properties.py, test_reliability.py) do not reach, kept from the kernel's development check:
head dims above 128 that are not a multiple of the vector width (padding and micro-kernel
column tails) and below 16, with dropout too; inputs whose last dim is strided (the kernel must
copy them); bitwise repeatability with dropout and a grouped-query backward. Error rule:
tests/rule.py, against the float64 reference run with the same dropout mask.
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


def _check(q, k, v, dout, *, causal, p=0.0, seed=99):
    """fastattn's cpu kernel vs the reference in q's dtype and in float64, same dropout mask."""
    B, Hq, Tq, _ = q.shape
    Tk = k.shape[2]
    torch.manual_seed(seed)  # the kernel draws its dropout seed from torch's generator
    drop_seed = int(torch.randint(0, 2**62, (1,)).item())
    mask = dropout_keep_mask(drop_seed, 0, B, Hq, Tq, Tk, p) if p > 0 else None
    with fastattn.use_backend("cpu"):
        torch.manual_seed(seed)
        got = _fwd_bwd(fastattn.attention, q, k, v, dout, causal=causal, dropout_p=p)
        assert fastattn.last_backend("attention") == "cpu"
    kw = dict(causal=causal, dropout_p=p, dropout_mask=mask)
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
