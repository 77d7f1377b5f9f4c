"""A/B timing of the CPU attention kernel alone, for tuning it on a shared, loaded machine.

    python -m benchmarks.tune_attention [--reps 7] [--T 512 1024 2048] [--threads 2]

The metric is the process CPU time of one call divided by the thread count, minimum over
``--reps`` calls: time-sharing with other processes inflates it much less than wall time, so two
builds of the kernel can be compared while the machine is busy. It is not a speed claim (those
come from ``python -m benchmarks.run attention``, wall time beside SDPA in the same run). The
last line is a 2048^3 float32 ``torch.mm`` measured the same way: torch's matmul rate under the
same load, for scale (not the hardware's peak). Shapes: float32, B=4, H=12, D=64, causal;
FLOPs 2*B*H*T^2*D forward (causal half of 4*B*H*T^2*D), backward 2.5x that.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch

import fastattn

B, H, D = 4, 12, 64


def cpu_time(fn: Callable[[], object], reps: int, threads: int) -> float:
    """min over ``reps`` calls of the process CPU seconds of ``fn()``, per thread."""
    fn()  # warm-up: first-touch page faults, thread pool start
    best = math.inf
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best / threads


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=7, help="calls per measurement (default: 7)")
    ap.add_argument("--T", type=int, nargs="+", default=[512, 1024, 2048], help="sequence lengths")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.threads < 1 or min(args.T) < 1:
        ap.error("--reps, --threads and every --T must be >= 1")
    if "cpu" not in fastattn.available_backends("cpu"):
        ap.error("the cpu backend is not built (python setup.py build_ext --inplace)")
    torch.set_num_threads(args.threads)
    op = torch.ops.fastattn_C
    for T in args.T:
        q, k, v, do = (torch.randn(B, H, T, D) for _ in range(4))
        sc = 1 / math.sqrt(D)
        o, lse = op.attention_fwd(q, k, v, None, True, sc, 0.0, 0, 0)
        fwd = cpu_time(
            lambda q=q, k=k, v=v: op.attention_fwd(q, k, v, None, True, sc, 0.0, 0, 0),
            args.reps,
            args.threads,
        )
        bwd = cpu_time(
            lambda q=q, k=k, v=v, do=do, o=o, lse=lse: op.attention_bwd(
                do, q, k, v, o, lse, None, True, sc, 0.0, 0, 0
            ),
            args.reps,
            args.threads,
        )
        flop = 2 * B * H * T * T * D
        print(
            f"T={T}: fwd {flop / fwd / 1e9:6.1f} GF/s  bwd {2.5 * flop / bwd / 1e9:6.1f} GF/s  "
            f"fwd+bwd {3.5 * flop / (fwd + bwd) / 1e9:6.1f} GF/s"
        )
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    mm = cpu_time(lambda: a @ b, args.reps, args.threads)
    print(f"fp32 matmul 2048^3, same metric: {2 * 2048**3 / mm / 1e9:6.1f} GF/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
