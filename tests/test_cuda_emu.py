"""The CUDA attention kernels (csrc/cuda/attention.cu) run through the host emulation
(tests/cuda_emu/run.sh: g++ builds the .cu against tests/cuda_emu/shim.h, lanes as fibers,
mma.sync / ldmatrix / cp.async with the PTX ISA's per-lane layouts) and checked against float64
with the error rule of tests/rule.py: the FA2 forward and backward for fp16 / bf16 (each case of
drive.py's FA2_CASES once per dtype, fp16 also against the simple kernels), and the fp32 path.

A numeric check of indexing, fragment layouts, masking, tiling and reductions; not of real
hardware (timing, memory model beyond the barriers). Skipped where g++ or CUDA's headers are
missing. The full matrix: `bash tests/cuda_emu/run.sh fa2` (and ln, gelu, attn).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda_include() -> str | None:
    nvcc = shutil.which("nvcc")
    cands = [os.path.join(os.path.dirname(os.path.dirname(nvcc)), "include")] if nvcc else []
    cands.append("/usr/local/cuda/include")
    return next((c for c in cands if os.path.exists(os.path.join(c, "cuda_fp16.h"))), None)


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
@pytest.mark.skipif(_cuda_include() is None, reason="CUDA headers (cuda_fp16.h) not found")
def test_cuda_attention_host_emulation():
    env = dict(os.environ, PY=sys.executable, CUDA_INC=_cuda_include())
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    seed = str(int.from_bytes(os.urandom(2), "little"))
    with tempfile.TemporaryDirectory(prefix="fastattn_cuda_emu_") as build:
        env["BUILD"] = build
        res = subprocess.run(
            ["bash", os.path.join(HERE, "run.sh"), "quick", seed],
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
    tail = (res.stdout + res.stderr)[-6000:]
    assert res.returncode == 0, f"host emulation failed (seed {seed}):\n{tail}"
    assert "FAILURES: 0" in res.stdout, f"seed {seed}:\n{tail}"
