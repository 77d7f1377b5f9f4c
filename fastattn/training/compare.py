"""``--compare``: torch eager, torch + ``torch.compile`` and fastattn, trained side by side.

Same seed, config, dtype and data, so every run starts from the same weights and sees the same
batches. The runs advance in alternating blocks of ``--compare-block`` steps (torch, compiled
torch, fastattn, torch, ...), so a machine that slows down for a while (other processes, memory
reclaim) slows every run alike, instead of whichever ran at that time. The table gives each
run's training throughput (tokens/s and the median step, see :mod:`.meter`) and final val loss;
``compare.json`` / ``compare.png`` record them with the val loss against training time.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastattn.training.checkpoint import atomic_write, atomic_write_text
from fastattn.training.meter import TIMING_WARMUP_ITERS

KERNELS = ("torch", "fastattn")
BASELINE = "torch"  # speed-ups are relative to torch eager


def settings(args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    """(label, --kernels, --compile) of each run, the baseline first."""
    rows = [("torch", "torch", False)]
    if args.compare_compile:
        rows.append(("torch+compile", "torch", True))
    rows.append(("fastattn", "fastattn", False))
    return rows


def compare(args: argparse.Namespace, make_trainer: Callable[[argparse.Namespace], Any]) -> dict:
    """Train one run per :func:`settings` row (subdirectories of ``--out-dir``), interleaved in
    blocks of ``--compare-block`` steps; print the table, write compare.json and, where
    matplotlib is installed, compare.png. ``make_trainer(args)`` returns an object with
    ``step``, ``done``, ``run_until(step)`` and ``finish() -> summary`` (a
    :class:`fastattn.train.Trainer`). Returns the record."""
    out_dir = Path(args.out_dir)
    trainers = {}
    for label, kernels, compiled in settings(args):
        sub = copy.copy(args)
        sub.kernels, sub.compile, sub.compare = kernels, compiled, False
        sub.out_dir, sub.run_label = str(out_dir / label), label
        sub.no_progress = True  # one bar for all, below
        sub.sample_tokens = args.sample_tokens if label == "fastattn" else 0
        print(f"=== {label} ===", flush=True)
        trainers[label] = make_trainer(sub)
    bar = _bar(args, len(trainers))
    try:
        while not all(t.done for t in trainers.values()):
            for label, t in trainers.items():
                if not t.done:
                    before = t.step
                    t.run_until(t.step + args.compare_block)
                    if bar is not None:
                        bar.set_postfix_str(label, refresh=False)
                        bar.update(t.step - before)
    finally:
        if bar is not None:
            bar.close()
    results = {label: t.finish() for label, t in trainers.items()}
    rows = table_rows(results)
    print_table(rows, args)
    record = {
        "rows": rows,
        "curves": {
            k: [(e["train_time_s"], e["val_loss"]) for e in r["evals"]] for k, r in results.items()
        },
        "args": {k: v for k, v in vars(args).items() if _jsonable(v)},
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "timing": f"training iterations only; first {TIMING_WARMUP_ITERS} iters and "
        f"evaluations excluded; runs interleaved in blocks of {args.compare_block} steps",
    }
    json_path, png_path = out_dir / "compare.json", out_dir / "compare.png"
    atomic_write_text(json_path, json.dumps(record, indent=1))
    fa = next(r for r in rows if r["kernels"] == "fastattn")
    title = f"GPT {args.preset} ({args.dtype}): fastattn {fa['speedup']:.2f}x torch eager"
    if write_plot(png_path, rows, record["curves"], title):
        print(f"wrote {json_path} and {png_path}")
    else:
        print(f"wrote {json_path}; no plot: matplotlib is not installed (pip install matplotlib)")
    return record


def _jsonable(v: object) -> bool:
    try:
        json.dumps(v)
    except TypeError:
        return False
    return True


def _bar(args: argparse.Namespace, runs: int):
    if args.no_progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=args.max_iters * runs, dynamic_ncols=True, unit="it", desc="compare")


def table_rows(results: dict[str, dict]) -> list[dict]:
    """One row per run (summaries of :meth:`fastattn.train.Trainer.finish`); speed-up vs the
    torch eager row (the first when there is none)."""
    base_row = results.get(BASELINE) or next(iter(results.values()))
    base = base_row["tokens_per_s"] or float("nan")
    rows = []
    for label, r in results.items():
        tps = r["tokens_per_s"] or float("nan")  # None: no iteration was timed
        rows.append(
            {
                "run": label,
                "kernels": r.get("kernels", label),
                "compile": r.get("compile", False),
                "dtype": r.get("dtype"),
                "tokens_per_s": tps,
                "speedup": tps / base,
                "step_ms_median": r.get("step_ms_median"),
                "final_val_loss": r["final_val_loss"],
                "elapsed_s": r["elapsed_s"],
                "timed_iters": r["timed_iters"],
            }
        )
    return rows


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(
        f"\ntraining throughput, {args.max_iters} iters, {args.dtype}, interleaved in blocks of "
        f"{args.compare_block} (first {TIMING_WARMUP_ITERS} iters and evaluations not timed):"
    )
    print(
        f"{'run':<14} {'tokens/s':>10} {'speed-up':>9} {'median step ms':>15} "
        f"{'final val loss':>15} {'wall s':>8}"
    )
    for r in rows:
        loss = r["final_val_loss"] if r["final_val_loss"] is not None else float("nan")
        med = r["step_ms_median"] if r.get("step_ms_median") is not None else float("nan")
        print(
            f"{r['run']:<14} {r['tokens_per_s']:>10,.0f} {r['speedup']:>8.2f}x {med:>15.1f} "
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
            key = r.get("run", r["kernels"])
            if not curves[key]:
                continue
            xs, ys = zip(*curves[key], strict=True)
            label = f"{key} ({r['tokens_per_s']:,.0f} tok/s)"
            ax.plot(xs, ys, marker="o", ms=3, label=label)
        ax.set_xlabel("training time (s, evaluations excluded)")
        ax.set_ylabel("val loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        plt.close(fig)
    return True
