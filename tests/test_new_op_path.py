"""The written path for a new op (docs/ARCHITECTURE.md, "Checklist: a new op") needs no edit
outside the op's own files and its declaration: a toy op, ``toy_scale`` (y = alpha * x), is
written here into its own ``fastattn/ops/toy_scale.py`` and ``fastattn/triton/toy_scale.py``
(in a temporary directory on those packages' search path, so the repository is untouched),
and the registry alone makes it dispatch, refuse, report, differentiate and trace."""

from __future__ import annotations

import importlib
import textwrap

import pytest
import torch

import fastattn
from fastattn import _dispatch

OPS_FILE = '''
"""toy_scale: y = alpha * x; dy/dx = alpha. A test op."""
from dataclasses import dataclass

import torch
from torch import Tensor

from fastattn import _dispatch
from fastattn.ops._common import eager_call, eager_fast_path, fake_from


@dataclass(frozen=True)
class ToyCase:
    device_type: str
    dtype: torch.dtype


class _Reference:
    def fwd(self, x, alpha):
        return x * alpha

    def bwd(self, dout, alpha):
        return dout * alpha


REFERENCE = _Reference()
DECL = _dispatch.declare(
    _dispatch.OpDecl(
        name="toy_scale",
        file="toy_scale",
        case=ToyCase,
        summary="alpha * x (the new-op path's test)",
        support={("triton", "cpu"): _dispatch.Support((torch.float32,))},
    )
)


def _case(x):
    return ToyCase(x.device.type, x.dtype)


def _toy_fwd(x: Tensor, alpha: float) -> Tensor:
    return _dispatch.run("toy_scale", "fwd", x.device, _case(x), None, x, alpha)


def _toy_bwd(dout: Tensor, alpha: float, backend: str) -> Tensor:
    return _dispatch.run("toy_scale", "bwd", dout.device, _case(dout), backend, dout, alpha)


toy_fwd = torch.library.custom_op("fastattn_toy::toy_scale_fwd", mutates_args=())(_toy_fwd)
toy_fwd.register_fake(fake_from(REFERENCE, "fwd"))
toy_bwd = torch.library.custom_op("fastattn_toy::toy_scale_bwd", mutates_args=())(_toy_bwd)
toy_bwd.register_fake(fake_from(REFERENCE, "bwd", trailing=1))
_bwd_call = eager_call(toy_bwd, _toy_bwd)


def _setup_context(ctx, inputs, output):
    ctx.alpha = inputs[1]
    ctx.backend = _dispatch.get_backend()


def _backward(ctx, dout):
    return _bwd_call(dout.contiguous(), ctx.alpha, ctx.backend), None


toy_fwd.register_autograd(_backward, setup_context=_setup_context)
_fwd_call = eager_fast_path(toy_fwd, _toy_fwd, _setup_context, _backward)


def toy_scale(x: Tensor, alpha: float) -> Tensor:
    return _fwd_call(x.contiguous(), float(alpha))
'''

TRITON_FILE = """
import torch
import triton
import triton.language as tl


@triton.jit
def _scale(x_ptr, y_ptr, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=m) * alpha, mask=m)


class _Triton:
    def fwd(self, x, alpha):
        y = torch.empty_like(x)
        n = x.numel()
        _scale[(triton.cdiv(n, 64),)](x, y, n, alpha, BLOCK=64)
        return y

    def bwd(self, dout, alpha):
        return self.fwd(dout, alpha)


TRITON = _Triton()
"""


@pytest.fixture
def toy(tmp_path, monkeypatch):
    import fastattn.ops
    import fastattn.triton

    (tmp_path / "ops").mkdir()
    (tmp_path / "ops" / "toy_scale.py").write_text(textwrap.dedent(OPS_FILE))
    monkeypatch.setattr(fastattn.ops, "__path__", [*fastattn.ops.__path__, str(tmp_path / "ops")])
    if fastattn.triton.interpreting():
        (tmp_path / "triton").mkdir()
        (tmp_path / "triton" / "toy_scale.py").write_text(textwrap.dedent(TRITON_FILE))
        monkeypatch.setattr(
            fastattn.triton, "__path__", [*fastattn.triton.__path__, str(tmp_path / "triton")]
        )
    mod = importlib.import_module("fastattn.ops.toy_scale")
    yield mod
    _dispatch.OPS.pop("toy_scale", None)
    _dispatch._impl_cache.clear()
    _dispatch._plan.cache_clear()
    import sys

    for name in ("fastattn.ops.toy_scale", "fastattn.triton.toy_scale"):
        sys.modules.pop(name, None)


def test_a_toy_op_needs_only_its_own_files(toy):
    x = torch.randn(5, 37, requires_grad=True)
    y = toy.toy_scale(x, 3.0)
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
    torch.testing.assert_close(y, x * 3.0)
    torch.testing.assert_close(g, torch.full_like(x, 3.0))
    assert fastattn.last_backend("toy_scale") == "reference"  # auto on a CPU: no cpu kernel
    if "triton" in fastattn.available_backends("cpu"):  # the interpreter: its Triton kernel
        with fastattn.use_backend("triton"):
            y2 = toy.toy_scale(x, 3.0)
            (g2,) = torch.autograd.grad(y2, x, torch.ones_like(y2))
        assert fastattn.last_backend("toy_scale") == "triton"
        torch.testing.assert_close(y2, y)
        torch.testing.assert_close(g2, g)
    # the report and the plan come from the declaration
    assert "toy_scale" in _dispatch.describe()
    # a backend without a kernel refuses by name; a dtype outside the Support falls back
    with fastattn.use_backend("cpu"), pytest.raises(fastattn.BackendError, match="toy_scale"):
        toy.toy_scale(x, 2.0)
    toy.toy_scale(x.double(), 2.0)
    assert fastattn.last_backend("toy_scale") == "reference"
    # the custom ops trace (fake from the reference) and their autograd is registered
    torch.library.opcheck(toy.toy_fwd, (torch.randn(3, 4, requires_grad=True), 2.0))
