"""Shared test setup: the Triton interpreter switch, NaN-poisoned allocations, the error rule."""

from __future__ import annotations

import os

import torch

# Without a CUDA GPU, the Triton kernels run on CPU tensors through Triton's interpreter (small
# shapes: see fastattn.triton.interpreting()); with one they run compiled, on the GPU, with the
# launchers' real tiles (the tests do not depend on the interpreter's block sizes).
# FASTATTN_TRITON_INTERPRET=1 forces the interpreter even on a GPU machine (GPU tensors are
# copied to the host and back), =0 forbids it (without a GPU the Triton tests then skip).
# Triton reads TRITON_INTERPRET when a @triton.jit kernel is defined, so this must happen before
# anything imports fastattn.triton.<op> (conftest is imported before the test modules).
# fastattn's `auto` never picks Triton on a CPU; tests choose it explicitly.
_FORCE_INTERPRET = os.environ.get("FASTATTN_TRITON_INTERPRET", "")
if _FORCE_INTERPRET in ("0", "1"):
    os.environ["TRITON_INTERPRET"] = _FORCE_INTERPRET
elif _FORCE_INTERPRET:
    raise RuntimeError(f"FASTATTN_TRITON_INTERPRET must be 0 or 1, got {_FORCE_INTERPRET!r}")
elif not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests: a few hundred examples per op by default, many more with --slow.
settings.register_profile("default", max_examples=200)
settings.register_profile("slow", max_examples=2000)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
    settings.load_profile("slow" if config.getoption("--slow") else "default")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_poison():
    """Fresh random inputs each run, and every allocation (torch.empty / at::empty in the C++
    kernels alike) filled with NaN, so an output element a kernel forgets to write fails."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield seed
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill
