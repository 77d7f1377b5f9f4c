"""``--compare``: the same run with ``--kernels torch`` then ``--kernels fastattn``.

Same seed, config and data, so both start from the same weights and see the same batches; the
table gives each one's training throughput (tokens/s, see :mod:`.meter`) and final val loss, and
``compare.json`` / ``compare.png`` record them with the val loss against wall-clock time.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from pathlib import Path

import torch

from fastattn.training.checkpoint import atomic_write, atomic_write_text
from fastattn.training.meter import TIMING_WARMUP_ITERS

KERNELS = ("torch", "fastattn")  # the baseline first: speed-ups are relative to it


def compare(args: argparse.Namespace, train: Callable[[argparse.Namespace], dict]) -> dict:
    """Run ``train`` once per kernel kind (in subdirectories of ``--out-dir``); print the table,
    write compare.json and, where matplotlib is installed, compare.png. Returns the record."""
    out_dir = Path(args.out_dir)
    results = {}
    for kernels in KERNELS:
        sub = copy.copy(args)
        sub.kernels, sub.out_dir, sub.compare = kernels, str(out_dir / kernels), False
        print(f"=== --kernels {kernels} ===", flush=True)
        results[kernels] = train(sub)
    rows = table_rows(results)
    print_table(rows, args.max_iters)
    record = {
        "rows": rows,
        "curves": {
            k: [(e["elapsed_s"], e["val_loss"]) for e in r["evals"]] for k, r in results.items()
        },
        "args": dict(vars(args)),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "timing": f"training iterations only; first {TIMING_WARMUP_ITERS} iters and "
        "evaluations excluded",
    }
    json_path, png_path = out_dir / "compare.json", out_dir / "compare.png"
    atomic_write_text(json_path, json.dumps(record, indent=1))
    title = f"GPT {args.preset}: fastattn vs torch ({rows[-1]['speedup']:.2f}x tokens/s)"
    if write_plot(png_path, rows, record["curves"], title):
        print(f"wrote {json_path} and {png_path}")
    else:
        print(f"wrote {json_path}; no plot: matplotlib is not installed (pip install matplotlib)")
    return record


def table_rows(results: dict[str, dict]) -> list[dict]:
    """One row per run (from :func:`fastattn.train.train`'s summaries); speed-up vs the first."""
    base = results[KERNELS[0]]["tokens_per_s"] or float("nan")
    rows = []
    for kernels, r in results.items():
        tps = r["tokens_per_s"] or float("nan")  # None: no iteration was timed
        rows.append(
            {
                "kernels": kernels,
                "tokens_per_s": tps,
                "speedup": tps / base,
                "final_val_loss": r["final_val_loss"],
                "elapsed_s": r["elapsed_s"],
                "timed_iters": r["timed_iters"],
            }
        )
    return rows


def print_table(rows: list[dict], max_iters: int) -> None:
    print(
        f"\ntraining throughput, {max_iters} iters (first {TIMING_WARMUP_ITERS} iters and "
        f"evaluations not timed):"
    )
    print(f"{'kernels':<10} {'tokens/s':>10} {'speed-up':>9} {'final val loss':>15} {'wall s':>8}")
    for r in rows:
        loss = r["final_val_loss"] if r["final_val_loss"] is not None else float("nan")
        print(
            f"{r['kernels']:<10} {r['tokens_per_s']:>10,.0f} {r['speedup']:>8.2f}x "
            f"{loss:>15.4f} {r['elapsed_s']:>8.1f}"
        )


def write_plot(path: str | Path, rows: list[dict], curves: dict[str, list], title: str) -> bool:
    """Val loss against wall-clock time, one line per run, to ``path`` (PNG, atomically).
    Returns False, writing nothing, when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    try:
        for r in rows:
            if not curves[r["kernels"]]:
                continue
            xs, ys = zip(*curves[r["kernels"]], strict=True)
            label = f"{r['kernels']} ({r['tokens_per_s']:,.0f} tok/s)"
            ax.plot(xs, ys, marker="o", ms=3, label=label)
        ax.set_xlabel("wall-clock time (s)")
        ax.set_ylabel("val loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        plt.close(fig)
    return True
