"""Check, then time the CPU attention kernel against F.scaled_dot_product_attention.

    PYTHONPATH=. python dev/attention_cpu/bench.py [--reps 7] [--T 512 1024 2048]

Shapes: float32, B=4, H=12, D=64, causal (the issue's target). Both run in the same process,
interleaved, torch.set_num_threads(2); medians of --reps repetitions. FLOPs: forward
4*B*H*Tq*Tk*D, halved when causal; forward+backward 3.5x forward (backward = 2.5x).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import fastattn._C  # noqa: F401  (registers torch.ops.fastattn_C)
import torch
import torch.nn.functional as F

OP = torch.ops.fastattn_C


def fa_fwd(q, k, v, causal):
    return OP.attention_fwd(q, k, v, None, causal, 1.0 / math.sqrt(q.shape[-1]), 0.0, 0, 0)


def fa_fwd_bwd(q, k, v, do, causal):
    sc = 1.0 / math.sqrt(q.shape[-1])
    o, lse = OP.attention_fwd(q, k, v, None, causal, sc, 0.0, 0, 0)
    return OP.attention_bwd(do, q, k, v, o, lse, None, causal, sc, 0.0, 0, 0)


def sdpa_fwd(q, k, v, causal):
    with torch.no_grad():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def sdpa_fwd_bwd(q, k, v, do, causal):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    o.backward(do)
    return q.grad, k.grad, v.grad


def check(q, k, v, do, causal):
    """Max abs error of fastattn and of SDPA (float32) against float64 SDPA."""
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    ref = F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal)
    ref.backward(do.double())
    refs = (ref, qd.grad, kd.grad, vd.grad)
    o, _ = fa_fwd(q, k, v, causal)
    mine = (o, *fa_fwd_bwd(q, k, v, do, causal))
    so = sdpa_fwd(q, k, v, causal)
    theirs = (so, *sdpa_fwd_bwd(q, k, v, do, causal))
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), mine, theirs, refs, strict=True):
        ea, eb = (a.double() - r).abs().max().item(), (b.double() - r).abs().max().item()
        ok = ea <= 2 * eb + 1e-5
        print(f"  check {name}: fastattn err {ea:.2e}  sdpa err {eb:.2e}  {'ok' if ok else 'FAIL'}")
        assert ok, name


def median_time(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--T", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--H", type=int, default=12)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--no-causal", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    causal = not args.no_causal
    torch.manual_seed(0)
    B, H, D = args.B, args.H, args.D
    if not args.skip_check:
        q, k, v, do = (torch.randn(2, 3, 300, D) for _ in range(4))
        print("correctness vs float64 SDPA (B=2, H=3, T=300):")
        check(q, k, v, do, causal)
    print(f"float32 B={B} H={H} D={D} causal={causal} threads=2, median of {args.reps}")
    print(
        f"{'T':>6} {'pass':>8} {'fastattn ms':>12} {'sdpa ms':>10} {'fa GF/s':>8} "
        f"{'sdpa GF/s':>9} {'speed-up':>8}"
    )
    ratios = {"fwd": [], "fwd+bwd": []}
    for T in args.T:
        q, k, v, do = (torch.randn(B, H, T, D) for _ in range(4))
        flop = 4 * B * H * T * T * D / (2 if causal else 1)
        args4 = (q, k, v, do, causal)
        for name, mult, fa, sd in (
            (
                "fwd",
                1.0,
                lambda a=args4: fa_fwd(*a[:3], a[4]),
                lambda a=args4: sdpa_fwd(*a[:3], a[4]),
            ),
            ("fwd+bwd", 3.5, lambda a=args4: fa_fwd_bwd(*a), lambda a=args4: sdpa_fwd_bwd(*a)),
        ):
            # Interleave the two so machine noise hits both alike.
            ta, tb = [], []
            for _ in range(args.reps):
                ta.append(median_time(fa, 1))
                tb.append(median_time(sd, 1))
            ta, tb = statistics.median(ta), statistics.median(tb)
            ratios[name].append(tb / ta)
            print(
                f"{T:>6} {name:>8} {ta * 1e3:>12.2f} {tb * 1e3:>10.2f} "
                f"{flop * mult / ta / 1e9:>8.1f} {flop * mult / tb / 1e9:>9.1f} {tb / ta:>7.2f}x"
            )
    for name, r in ratios.items():
        gm = math.exp(sum(math.log(x) for x in r) / len(r))
        print(f"geomean speed-up {name}: {gm:.2f}x  (min {min(r):.2f}x)")


if __name__ == "__main__":
    main()
