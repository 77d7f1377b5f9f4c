"""``--dtype auto``: bfloat16 autocast where this machine's bf16 matmul is faster than float32.

On a CPU the answer depends on the chip: AVX512_BF16 (Zen 4, Sapphire Rapids) runs bf16 dot
products at about twice the fp32 FMA rate, while a CPU without them emulates bf16 matmuls and is
slower than fp32. So the trainer measures instead of guessing: one matmul of the model's
largest shape (tokens x n_embd times n_embd x 4 n_embd, the MLP's fc1) in each dtype, interleaved,
wall-clock, median of a few rounds. (Process CPU time was tried: spin-waiting threads and small
GEMMs that MKL runs on one thread made its rates meaningless.) On CUDA, bf16 where
the GPU supports it.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

ROUNDS = 5


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def probe_cpu(tokens: int, n_embd: int) -> dict[str, float]:
    """GFLOP/s of ``F.linear`` at (tokens, n_embd) x (4 n_embd, n_embd) in float32 and bf16."""
    m, k, n = max(1, tokens), n_embd, 4 * n_embd
    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(m, k, generator=g)
    w32 = torch.randn(n, k, generator=g)
    ops = {
        "float32": (x32, w32),
        "bfloat16": (x32.bfloat16(), w32.bfloat16()),
    }
    times: dict[str, list[float]] = {k_: [] for k_ in ops}
    with torch.no_grad():
        for x, w in ops.values():  # warm-up: packing, page faults, thread pool
            F.linear(x, w)
        reps = max(1, int(2e8 // (2 * m * k * n)))  # ~0.2 GFLOP per timing
        for _ in range(ROUNDS):
            for name, (x, w) in ops.items():
                t0 = time.perf_counter()
                for _ in range(reps):
                    F.linear(x, w)
                times[name].append((time.perf_counter() - t0) / reps)
    flop = 2.0 * m * k * n
    return {name: flop / _median(ts) / 1e9 for name, ts in times.items()}


def resolve(device: str, tokens: int, n_embd: int) -> tuple[str, str]:
    """(dtype, one line saying why) for ``--dtype auto``."""
    if device.startswith("cuda"):
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return (
            "bfloat16" if ok else "float32"
        ), f"--dtype auto: {'bf16' if ok else 'no bf16'} on this GPU"
    rates = probe_cpu(tokens, n_embd)
    pick = "bfloat16" if rates["bfloat16"] > rates["float32"] else "float32"
    shape = f"{tokens}x{n_embd}x{4 * n_embd}"
    return pick, (
        f"--dtype auto: {pick} (matmul {shape}: bf16 {rates['bfloat16']:.0f} GFLOP/s, "
        f"fp32 {rates['float32']:.0f} GFLOP/s on {torch.get_num_threads()} threads)"
    )
