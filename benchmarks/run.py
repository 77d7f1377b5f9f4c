"""Benchmark runner: ``python -m benchmarks.run [layernorm|attention|gelu|all] [--quick]``.

Each suite measures fastattn beside its baselines in the same run (PyTorch eager, PyTorch's
own fused op, ``torch.compile`` of the reference) together with the machine's ceilings (copy
GB/s, fp32 matmul GFLOP/s), prints a table and records it in ``benchmarks/results/``
(Markdown + JSON, and a plot where one helps). Medians of repeated runs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys

import torch
import torch.nn.functional as F

import fastattn
from benchmarks.common import Report, copy_gbps, median_time


def _compiled(fn):
    # Inductor on CPU; compile time is excluded by the warm-up calls of median_time.
    return torch.compile(fn, dynamic=False)


# ----------------------------------------------------------------------------- layernorm
def layernorm_cases(shapes):
    """(label, shape, callables) for LayerNorm: fastattn cpu, F.layer_norm eager and compiled."""
    compiled = _compiled(lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b))
    for n, m in shapes:
        impls = {
            "fastattn": lambda x, w, b: fastattn.layer_norm(x, (x.shape[-1],), w, b),
            "torch eager": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b),
            "torch.compile": compiled,
        }
        yield (n, m), impls


def suite_layernorm(quick: bool) -> Report:
    shapes = [(8192, 768), (32768, 1024)] if not quick else [(8192, 768)]
    gbps = copy_gbps()
    rep = Report(
        "LayerNorm (float32, CPU)",
        ["shape", "pass", "impl", "ms", "GB/s", "of copy BW", "speed-up vs eager", "vs compile"],
        ceilings={"copy GB/s": gbps},
        notes=[
            "Bytes counted: forward reads x and writes y (2 N M 4); forward+backward adds reading "
            "dy and x and writing dx (5 N M 4 in all). Parameters and mean/rstd are negligible.",
            "torch eager = F.layer_norm (ATen's fused CPU kernel, the PyTorch fused op); "
            "torch.compile = Inductor on the same call.",
        ],
    )
    print(f"copy bandwidth: {gbps:.1f} GB/s")
    for (n, m), impls in layernorm_cases(shapes):
        x = torch.randn(n, m)
        w, b = torch.randn(m), torch.randn(m)
        dy = torch.randn(n, m)
        xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
        for pas, nbytes in (("fwd", 2 * n * m * 4), ("fwd+bwd", 5 * n * m * 4)):
            times = {}
            for name, fn in impls.items():
                if pas == "fwd":
                    with torch.no_grad():
                        times[name] = median_time(lambda fn=fn: fn(x, w, b))
                else:

                    def step(fn=fn):
                        xg.grad = wg.grad = bg.grad = None
                        fn(xg, wg, bg).backward(dy)

                    times[name] = median_time(step)
            for name, t in times.items():
                rate = nbytes / t / 1e9
                rep.add(
                    f"{n}x{m}",
                    pas,
                    name,
                    t * 1e3,
                    rate,
                    rate / gbps,
                    times["torch eager"] / t,
                    times["torch.compile"] / t,
                )
    return rep


SUITES = {"layernorm": suite_layernorm}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "suite",
        nargs="?",
        default="all",
        choices=[*SUITES, "all"],
        help="which op to benchmark (default: all)",
    )
    p.add_argument("--quick", action="store_true", help="fewer shapes, for a smoke run")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: torch's default, all cores)",
    )
    p.add_argument("--no-save", action="store_true", help="print only; do not write results/")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M")
    for name in SUITES if args.suite == "all" else [args.suite]:
        print(f"== {name}")
        rep = SUITES[name](args.quick)
        if not args.no_save:
            print(f"saved {rep.save(f'{name}-{stamp}')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
