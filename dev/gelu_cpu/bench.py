"""Check-then-time for the CPU bias+GELU kernel and the FeedForward block (float32).

Run: PYTHONPATH=. python dev/gelu_cpu/bench.py [--reps 7]
Every variant is timed in the same run, interleaved, medians of --reps repetitions.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fastattn
from fastattn.nn import FeedForward


def median_ms(fns: dict, reps: int) -> dict:
    times = {k: [] for k in fns}
    for fn in fns.values():  # warm-up (and compile)
        fn()
        fn()
    for _ in range(reps):
        for k, fn in fns.items():  # interleaved, so load from other processes hits all alike
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def eager_bias_gelu(x, b, approximate):
    return F.gelu(x + b, approximate=approximate)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--cols", type=int, default=3072)
    ap.add_argument("--d-model", type=int, default=768)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")

    n, m = args.rows, args.cols
    x = torch.randn(n, m, requires_grad=True)
    b = torch.randn(m, requires_grad=True)
    g = torch.randn(n, m)
    for approximate in ("none", "tanh"):
        # check first
        y = fastattn.bias_gelu(x, b, approximate)
        ref = eager_bias_gelu(x, b, approximate)
        assert (y - ref).abs().max().item() < 1e-5, "fused output differs"
        compiled = torch.compile(eager_bias_gelu)

        def fb(f):
            def run():
                x.grad = b.grad = None
                f(x, b, approximate).backward(g)

            return run

        def fw(f):
            def run():
                with torch.no_grad():
                    f(x, b, approximate)

            return run

        t = median_ms(
            {
                "fastattn fwd": fw(fastattn.bias_gelu),
                "eager fwd": fw(eager_bias_gelu),
                "compile fwd": fw(compiled),
                "fastattn fwd+bwd": fb(fastattn.bias_gelu),
                "eager fwd+bwd": fb(eager_bias_gelu),
                "compile fwd+bwd": fb(compiled),
            },
            args.reps,
        )
        print(f"\nbias_gelu {n}x{m} float32, approximate={approximate!r} (median ms)")
        for k, v in t.items():
            print(f"  {k:<18} {v:8.2f}")
        for d in ("fwd", "fwd+bwd"):
            print(
                f"  {d}: {t['eager ' + d] / t['fastattn ' + d]:.2f}x eager, "
                f"{t['compile ' + d] / t['fastattn ' + d]:.2f}x torch.compile"
            )

    dm = args.d_model
    xf = torch.randn(n, dm, requires_grad=True)
    gf = torch.randn(n, dm)
    for approximate in ("none", "tanh"):
        ff = FeedForward(dm, 4 * dm, approximate=approximate)
        seq = torch.nn.Sequential(
            torch.nn.Linear(dm, 4 * dm), torch.nn.GELU(approximate), torch.nn.Linear(4 * dm, dm)
        )
        seq.load_state_dict({k.replace("fc1", "0").replace("fc2", "2"): v for k, v in ff.state_dict().items()})
        assert (ff(xf) - seq(xf)).abs().max().item() < 1e-4

        def run(mod):
            def f():
                xf.grad = None
                mod.zero_grad(set_to_none=True)
                mod(xf).backward(gf)

            return f

        t = median_ms({"FeedForward": run(ff), "Sequential": run(seq)}, args.reps)
        print(f"\nFeedForward fwd+bwd tokens {n}, d_model {dm}, d_hidden {4 * dm}, approximate={approximate!r}")
        for k, v in t.items():
            print(f"  {k:<18} {v:8.2f} ms")
        print(f"  speed-up vs Sequential(Linear, GELU, Linear): {t['Sequential'] / t['FeedForward']:.2f}x")


if __name__ == "__main__":
    main()
