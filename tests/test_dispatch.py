"""The registry and the backend choice (fastattn/_dispatch.py): thread safety, the backward
served by the forward's choice, limits read from the extension, the report."""

from __future__ import annotations

import threading

import pytest
import torch

import fastattn
from fastattn import _dispatch
from fastattn.ops.attention import AttentionCase

HAVE_CPU = _dispatch.unavailable_reason("cpu", "cpu") is None


def test_use_backend_is_per_thread_and_nests():
    """Two threads nesting use_backend in interleaved order each see their own choice, and
    nothing is left behind (it used to leave the process on the last thread's 'reference')."""
    seen: dict[str, list[str]] = {"a": [], "b": []}
    a_in, b_out = threading.Event(), threading.Event()

    def a():
        with fastattn.use_backend("reference"):
            a_in.set()
            b_out.wait(5)
            seen["a"].append(fastattn.get_backend())
        seen["a"].append(fastattn.get_backend())

    def b():
        a_in.wait(5)
        with fastattn.use_backend("cpu"):
            seen["b"].append(fastattn.get_backend())
            with fastattn.use_backend("reference"):
                seen["b"].append(fastattn.get_backend())
            seen["b"].append(fastattn.get_backend())
        b_out.set()

    ts = [threading.Thread(target=f) for f in (a, b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    assert seen == {"a": ["reference", "auto"], "b": ["cpu", "reference", "cpu"]}
    assert fastattn.get_backend() == "auto"


def test_set_backend_is_the_process_default():
    try:
        fastattn.set_backend("reference")
        got = []
        t = threading.Thread(target=lambda: got.append(fastattn.get_backend()))
        t.start()
        t.join()
        assert got == ["reference"]
        with fastattn.use_backend("auto"):
            assert fastattn.get_backend() == "auto"
        assert fastattn.get_backend() == "reference"
    finally:
        fastattn.set_backend("auto")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        fastattn.set_backend("gpu")


@pytest.mark.skipif(not HAVE_CPU, reason="cpu kernels not built")
@pytest.mark.parametrize("op", ["layer_norm", "bias_gelu", "attention", "gated_act"])
def test_backward_runs_on_the_forwards_backend(op):
    """A backend chosen around the forward serves the backward, even when the backward runs
    after the block has exited (and on autograd's own thread)."""
    x = torch.randn(2, 4, 5, 8, requires_grad=True)
    calls = {
        "layer_norm": lambda: fastattn.layer_norm(x, (8,)),
        "bias_gelu": lambda: fastattn.bias_gelu(x),
        "attention": lambda: fastattn.attention(x, x, x, causal=True),
        "gated_act": lambda: fastattn.swiglu(x, x * 2),
    }
    with fastattn.use_backend("reference"):
        out = calls[op]()
    assert fastattn.last_backend(op) == "reference"
    _dispatch._last.pop(op, None)
    out.sum().backward()
    assert fastattn.last_backend(op) == "reference"
    with fastattn.use_backend("cpu"):
        out = calls[op]()
    out.sum().backward()
    assert fastattn.last_backend(op) == "cpu"


def _case(**kw):
    base = dict(
        device_type="cpu",
        dtype=torch.float32,
        head_dim=64,
        q_len=8,
        kv_len=8,
        causal=True,
        window=False,
        top_left=False,
        softcap=False,
        bias=False,
        bias_grad=False,
        dropout=False,
        key_padding_mask=False,
    )
    return AttentionCase(**(base | kw))


@pytest.mark.skipif(not HAVE_CPU, reason="cpu kernels not built")
def test_limits_come_from_the_extension():
    limit = _dispatch.native_limit("attention_max_head_dim_cpu")
    assert isinstance(limit, int) and limit >= 64
    assert _dispatch.plan("attention", "cpu", _case(head_dim=limit))[0] == "cpu"
    backend, skipped = _dispatch.plan("attention", "cpu", _case(head_dim=limit + 1))
    assert backend == "reference"
    assert skipped == [("cpu", f"head dim {limit + 1} > {limit}")]
    with pytest.raises(fastattn.BackendError, match=f"head dim {limit + 1} > {limit}"):
        _dispatch.plan("attention", "cpu", _case(head_dim=limit + 1), backend="cpu")
    # the same limit through the public function
    q = torch.randn(1, 1, 3, limit + 1)
    with fastattn.use_backend("cpu"), pytest.raises(fastattn.BackendError, match="head dim"):
        fastattn.attention(q, q, q)


@pytest.mark.skipif(not HAVE_CPU, reason="extension not built")
def test_cuda_attention_head_dim_limit_depends_on_dtype():
    # fp16 / bf16 run the FlashAttention-2 kernels (head dims up to 256), fp32 the simple
    # kernels (up to 128): auto must not send an fp32 head dim 256 to the CUDA backend.
    from fastattn.ops.attention import DECL

    cuda = DECL.support[("cuda", "cuda")]
    wide = _dispatch.native_limit("attention_max_head_dim_cuda")
    fp32 = _dispatch.native_limit("attention_max_head_dim_cuda_fp32")
    assert (wide, fp32) == (256, 128)
    for dtype in (torch.float16, torch.bfloat16):
        assert cuda.unsupported(_case(device_type="cuda", dtype=dtype, head_dim=256)) is None
        assert cuda.unsupported(_case(device_type="cuda", dtype=dtype, head_dim=257)) == (
            f"head dim 257 > 256 in {dtype}"
        )
    assert cuda.unsupported(_case(device_type="cuda", head_dim=128)) is None
    assert cuda.unsupported(_case(device_type="cuda", head_dim=129)) == (
        "head dim 129 > 128 in torch.float32"
    )
    assert "float32: head dim <= 128" in cuda.describe()


def test_every_declared_op_has_every_implementation_it_claims():
    import importlib

    for decl in _dispatch.OPS.values():
        for backend, _dev in decl.support:
            mod, attr = decl.impl_path(backend).split(":")
            if backend == "triton":
                pytest.importorskip("triton")
            impl = getattr(importlib.import_module(mod), attr)
            assert callable(impl.fwd) and callable(impl.bwd), (decl.name, backend)


def test_report_lists_backends_and_ops():
    text = _dispatch.describe()
    for name in list(_dispatch.BACKENDS) + list(_dispatch.OPS):
        assert name in text
