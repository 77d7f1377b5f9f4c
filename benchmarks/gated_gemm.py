"""Is one GEMM for gate and up together worth the weight concatenation it costs per call?

``gated_feed_forward`` holds two weights, ``w_gate`` and ``w_up`` (``(h, d)`` each, HF's
``gate_proj`` / ``up_proj``). One GEMM over both needs ``torch.cat([w_gate, w_up])`` first: a copy
of ``2 h d`` elements per call, and a packed ``[N, 2h]`` output whose halves the fused activation
reads in place (and whose gradient it writes in one buffer). Two ``F.linear`` calls need no copy.

Measured here, float32, torch's threads, forward and forward+backward of the two projections
only (the activation is the same in both): variant ``two`` = ``F.linear(x, wg)``,
``F.linear(x, wu)``, backward from two gradients; ``cat`` = ``F.linear(x, cat([wg, wu]))``,
backward from one packed gradient. Variants interleaved round by round (a busy machine drifts),
medians of ``--rounds`` rounds.

    python -m benchmarks.gated_gemm [--rounds 7] [--out benchmarks/results/gated-gemm.md]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [(d, h, n) for d, h in ((256, 688), (512, 1376), (1024, 2752)) for n in (1024, 8192)]


def _two(x, wg, wu, grads):
    g, u = F.linear(x, wg), F.linear(x, wu)
    if grads is not None:
        torch.autograd.backward([g, u], [grads[0], grads[1]])


def _cat(x, wg, wu, grads):
    gu = F.linear(x, torch.cat([wg, wu]))
    if grads is not None:
        gu.backward(grads[2])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    lines = [
        f"threads {torch.get_num_threads()}, float32, medians of {args.rounds} interleaved rounds "
        "(ms); ratio = two / cat (> 1: the concatenated GEMM is faster)",
        "",
        "| d | h | tokens | fwd two | fwd cat | ratio | fwd+bwd two | fwd+bwd cat | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for d, h, n in SHAPES:
        x = torch.randn(n, d, requires_grad=True)
        wg = (torch.randn(h, d) / d**0.5).requires_grad_()
        wu = (torch.randn(h, d) / d**0.5).requires_grad_()
        dg, du = torch.randn(n, h), torch.randn(n, h)
        grads = (dg, du, torch.cat([dg, du], -1))
        res: dict[tuple[str, bool], list[float]] = {}
        for r in range(args.rounds + 1):  # round 0 warms up
            for bwd in (False, True):
                order = (("two", _two), ("cat", _cat))
                for name, fn in order if r % 2 else order[::-1]:
                    x.grad = wg.grad = wu.grad = None
                    ctx = torch.enable_grad() if bwd else torch.no_grad()
                    with ctx:
                        t0 = time.perf_counter()
                        fn(x, wg, wu, grads if bwd else None)
                        dt = time.perf_counter() - t0
                    if r:
                        res.setdefault((name, bwd), []).append(dt * 1e3)
        med = {k: statistics.median(v) for k, v in res.items()}
        lines.append(
            f"| {d} | {h} | {n} | {med['two', False]:.2f} | {med['cat', False]:.2f} | "
            f"{med['two', False] / med['cat', False]:.2f} | {med['two', True]:.2f} | "
            f"{med['cat', True]:.2f} | {med['two', True] / med['cat', True]:.2f} |"
        )
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
