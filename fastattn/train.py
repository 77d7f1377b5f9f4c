"""Train the demo GPT on character-level text: ``python -m fastattn.train`` / ``fastattn-train``.

    python -m fastattn.train --preset cpu_small --max-iters 500            # a few minutes on a CPU
    python -m fastattn.train --preset cpu_small --compare --max-iters 300  # torch vs fastattn
    python -m fastattn.train --preset shakespeare_char --device cuda --dtype bfloat16
    torchrun --nproc-per-node 2 -m fastattn.train --preset cpu_small       # data parallel

The loop is nanoGPT's: AdamW, linear warm-up then cosine decay of the learning rate, gradient
clipping, periodic estimates of the train/val loss on fixed batches. Writes to ``--out-dir``:
``metrics.jsonl`` (one JSON object per line: ``"kind": "iter"`` lines every --log-interval
steps, ``"kind": "eval"`` lines at each evaluation), ``ckpt.pt`` (model, optimizer, every RNG
state, step; written atomically at each evaluation and at the end, so ``--resume`` continues
the run exactly) and ``sample.txt``.

Throughput (tokens/s) counts the training iterations only: evaluation time and the first
``TIMING_WARMUP_ITERS`` iterations after (re)starting (allocator warm-up, torch.compile) are left
out. Wall-clock time (``elapsed_s``) includes everything from the first step on.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from fastattn.data import DataError, load_text_dataset
from fastattn.models.gpt import GPT, GPTConfig

TIMING_WARMUP_ITERS = 3

# Model size, batch and learning-rate settings of each preset; flags override them.
PRESETS: dict[str, dict] = {
    # nanoGPT's config/train_shakespeare_char.py (a GPU recipe; on a CPU pass --batch-size 8)
    "shakespeare_char": dict(
        n_layer=6,
        n_head=6,
        n_embd=384,
        block_size=256,
        batch_size=64,
        dropout=0.2,
        lr=1e-3,
        min_lr=1e-4,
        max_iters=5000,
        warmup_iters=100,
        eval_interval=250,
        eval_iters=200,
    ),
    # small enough to learn something in minutes on two CPU cores
    "cpu_small": dict(
        n_layer=4,
        n_head=4,
        n_embd=128,
        block_size=64,
        batch_size=12,
        dropout=0.0,
        lr=1e-3,
        min_lr=1e-4,
        max_iters=2000,
        warmup_iters=100,
        eval_interval=100,
        eval_iters=20,
    ),
}
# Defaults shared by the presets (None in the parser means "from the preset or from here").
COMMON_DEFAULTS = dict(
    bias=True,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.99,
    grad_clip=1.0,
    seed=1337,
    kernels="fastattn",
    device="cpu",
    dtype="float32",
    sample_tokens=300,
    log_interval=10,
)


# ----------------------------------------------------------------------------- arguments
class _HelpFormatter(argparse.HelpFormatter):
    """Shows each flag's default: the preset values, a common default, or nothing."""

    def _get_help_string(self, action):
        key, text = action.dest, action.help or ""
        if key in PRESETS["cpu_small"]:
            vals = ", ".join(f"{name} {PRESETS[name][key]}" for name in sorted(PRESETS))
            return f"{text} (preset: {vals})"
        if key in COMMON_DEFAULTS and "default" not in text:
            return f"{text} (default: {COMMON_DEFAULTS[key]})"
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            return f"{text} (default: {action.default})"
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastattn-train",
        description="Train a small character-level GPT with fastattn's kernels (or plain torch).",
        formatter_class=_HelpFormatter,
    )
    a = p.add_argument
    a(
        "--preset",
        default="cpu_small",
        choices=sorted(PRESETS),
        help="model/optimiser settings to start from; the flags below override them. "
        "shakespeare_char is nanoGPT's GPU recipe (on a CPU add --batch-size 8)",
    )
    g = p.add_argument_group("model (ignored with --resume: the checkpoint has it)")
    g.add_argument("--n-layer", type=int, help="number of transformer blocks")
    g.add_argument("--n-head", type=int, help="attention heads per block (must divide --n-embd)")
    g.add_argument("--n-embd", type=int, help="model width")
    g.add_argument("--block-size", type=int, help="context length in tokens")
    g.add_argument("--dropout", type=float, help="dropout probability during training")
    g.add_argument(
        "--bias",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="biases in Linear and LayerNorm layers",
    )
    g.add_argument(
        "--kernels",
        choices=["fastattn", "torch"],
        help="fastattn modules or plain torch ones (--compare runs both)",
    )
    t = p.add_argument_group("optimisation")
    t.add_argument("--batch-size", type=int, help="sequences per step per process")
    t.add_argument("--max-iters", type=int, help="total optimiser steps")
    t.add_argument("--lr", type=float, help="peak learning rate")
    t.add_argument("--min-lr", type=float, help="final learning rate of the cosine decay")
    t.add_argument("--warmup-iters", type=int, help="steps of linear learning-rate warm-up")
    t.add_argument(
        "--lr-decay-iters",
        type=int,
        help="step at which the cosine decay reaches --min-lr (default: --max-iters)",
    )
    t.add_argument("--weight-decay", type=float, help="AdamW weight decay on 2-D weights")
    t.add_argument("--beta1", type=float, help="AdamW beta1")
    t.add_argument("--beta2", type=float, help="AdamW beta2")
    t.add_argument("--grad-clip", type=float, help="clip the gradient norm to this; 0 = off")
    r = p.add_argument_group("run")
    r.add_argument(
        "--eval-interval", type=int, help="evaluate and checkpoint every this many steps"
    )
    r.add_argument("--eval-iters", type=int, help="batches per split in each loss estimate")
    r.add_argument(
        "--log-interval",
        type=int,
        help="write an 'iter' metrics line every this many steps",
    )
    r.add_argument("--device", help="cpu, cuda or cuda:N")
    r.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="float32 or bfloat16 autocast for the forward pass",
    )
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    r.add_argument("--seed", type=int, help="random seed; rank r uses seed + r for its data")
    r.add_argument(
        "--out-dir", help="where metrics, checkpoints and samples go (default: out-<preset>)"
    )
    r.add_argument("--data", help="any UTF-8 text file (default: the bundled tinyshakespeare)")
    r.add_argument("--cache-dir", help="where prepared token files go (default: ~/.cache/fastattn)")
    r.add_argument(
        "--resume",
        action="store_true",
        help="continue from <out-dir>/ckpt.pt (model shape from the checkpoint)",
    )
    r.add_argument("--sample-tokens", type=int, help="characters to generate at the end")
    r.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    r.add_argument(
        "--compare",
        action="store_true",
        help="train twice, --kernels torch then fastattn (subdirs of --out-dir), and "
        "print/plot throughput and val loss (compare.json, compare.png)",
    )
    return p


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """Parse, fill unset flags from the preset and the common defaults, and check them."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for key, value in {**COMMON_DEFAULTS, **PRESETS[args.preset]}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.max_iters
    if args.out_dir is None:
        args.out_dir = f"out-{args.preset}"
    err = parser.error
    for name in (
        "n_layer",
        "n_head",
        "n_embd",
        "block_size",
        "batch_size",
        "eval_interval",
        "eval_iters",
        "log_interval",
    ):
        if getattr(args, name) < 1:
            err(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_iters", "warmup_iters", "lr_decay_iters", "sample_tokens"):
        if getattr(args, name) < 0:
            err(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.n_embd % args.n_head != 0:
        err(f"--n-embd ({args.n_embd}) must be divisible by --n-head ({args.n_head})")
    if not 0.0 <= args.dropout < 1.0:
        err(f"--dropout must be in [0, 1), got {args.dropout}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        err(f"--lr must be > 0, got {args.lr}")
    if not 0.0 <= args.min_lr <= args.lr:
        err(f"--min-lr must be in [0, --lr={args.lr}], got {args.min_lr}")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            err(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if args.weight_decay < 0 or args.grad_clip < 0:
        err("--weight-decay and --grad-clip must be >= 0")
    if args.threads is not None and args.threads < 1:
        err(f"--threads must be >= 1, got {args.threads}")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        err(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        err(f"--device {args.device}: torch sees no CUDA GPU (torch {torch.__version__})")
    if args.data is not None and not Path(args.data).is_file():
        err(f"--data: file not found: {args.data}")
    if args.compare and args.resume:
        err("--compare and --resume cannot be combined")
    if args.compare and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        err("--compare runs in one process; do not launch it with torchrun")
    if args.resume and not (Path(args.out_dir) / "ckpt.pt").is_file():
        err(f"--resume: no checkpoint at {Path(args.out_dir) / 'ckpt.pt'}")
    return args, parser


def get_lr(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up to --lr, cosine decay to --min-lr at --lr-decay-iters, then constant."""
    if step < args.warmup_iters:
        return args.lr * (step + 1) / (args.warmup_iters + 1)
    if step >= args.lr_decay_iters:
        return args.min_lr
    ratio = (step - args.warmup_iters) / (args.lr_decay_iters - args.warmup_iters)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)


# ----------------------------------------------------------------------------- distributed
class Dist:
    """Rank/world of this process; a process group is opened when WORLD_SIZE > 1."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False
        self.device = device
        if self.world > 1:
            import torch.distributed as dist

            if device.startswith("cuda"):
                self.device = f"cuda:{self.local_rank}"
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
                self.owns_group = True

    @property
    def master(self) -> bool:
        return self.rank == 0

    def mean(self, values: list[float]) -> list[float]:
        """Average floats over ranks."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def gather(self, obj):
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self):
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


# ----------------------------------------------------------------------------- helpers
def _rng_state(gen: torch.Generator, cuda: bool) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if cuda else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "data": gen.get_state(),
    }


def _set_rng_state(state: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    gen.set_state(state["data"])


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _trim_metrics(path: Path, step: int) -> None:
    """On resume, drop lines written after the checkpoint (a run that died after saving)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["step"] < step or (rec["kind"] == "eval" and rec["step"] == step):
            keep.append(line)
    path.write_text("".join(k + "\n" for k in keep))


def _progress(total: int, initial: int, disable: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional (the dev extra)
        return None
    return tqdm(total=total, initial=initial, disable=disable, dynamic_ncols=True, unit="it")


def _say(bar, msg: str) -> None:
    if bar is not None and not bar.disable:
        bar.write(msg)
    else:
        print(msg, flush=True)


# ----------------------------------------------------------------------------- training
def train(args: argparse.Namespace, dist: Dist | None = None) -> dict:
    """One training run as described by ``args``; returns a summary (rank 0's view)."""
    dist = dist or Dist(args.device)
    device, master = dist.device, dist.master
    cuda = device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
    data = load_text_dataset(args.data, args.cache_dir)  # DataError -> caught by run()

    ckpt = None
    if args.resume:
        ckpt = torch.load(out_dir / "ckpt.pt", map_location="cpu", weights_only=False)
        config = GPTConfig(**ckpt["config"])
        if config.vocab_size != data.vocab_size:
            raise DataError(
                f"--resume: the checkpoint's vocabulary has {config.vocab_size} tokens, the data "
                f"{data.vocab_size}; resume with the same --data"
            )
    else:
        config = GPTConfig(
            block_size=args.block_size,
            vocab_size=data.vocab_size,
            n_layer=args.n_layer,
            n_head=args.n_head,
            n_embd=args.n_embd,
            dropout=args.dropout,
            bias=args.bias,
        )
    data.check_block_size(config.block_size)
    B, T = args.batch_size, config.block_size

    torch.manual_seed(args.seed)  # same initial weights on every rank and for both kernel kinds
    model = GPT(config, kernels=args.kernels).to(device)
    optimizer = model.configure_optimizers(
        args.weight_decay, args.lr, (args.beta1, args.beta2), device_type="cuda" if cuda else "cpu"
    )
    gen = torch.Generator()  # this rank's stream of training batches
    step, elapsed0 = 0, 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, elapsed0 = ckpt["step"], ckpt["elapsed_s"]
        if len(ckpt["rng"]) != dist.world:
            raise SystemExit(
                f"fastattn-train: error: --resume: the checkpoint was written by "
                f"{len(ckpt['rng'])} process(es), this run has {dist.world}"
            )
        _set_rng_state(ckpt["rng"][dist.rank], gen)
    else:
        seed = args.seed + dist.rank
        torch.manual_seed(seed)  # dropout stream
        np.random.seed(seed)
        random.seed(seed)
        gen.manual_seed(seed)
    start_step = step

    fwd_model = torch.compile(model) if args.compile else model
    train_model = fwd_model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(fwd_model, device_ids=[dist.local_rank] if cuda else None)
    autocast = (
        torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16)
        if args.dtype == "bfloat16"
        else contextlib.nullcontext()
    )

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:
        """Mean loss over --eval-iters batches per split; the same batches at every evaluation."""
        model.eval()
        out = []
        for split in ("train", "val"):
            g = torch.Generator().manual_seed(args.seed + 1_000_003 + dist.rank)
            total = 0.0
            for _ in range(args.eval_iters):
                x, y = data.get_batch(split, B, T, g, device)
                with autocast:
                    total += fwd_model(x, y)[1].item()
            out.append(total / args.eval_iters)
        model.train()
        train_loss, val_loss = dist.mean(out)
        return {"train_loss": train_loss, "val_loss": val_loss}

    metrics_path = out_dir / "metrics.jsonl"
    metrics = None
    if master:
        if args.resume:
            _trim_metrics(metrics_path, step)
        metrics = open(metrics_path, "a" if args.resume else "w")  # noqa: SIM115

    def log(rec: dict) -> None:
        if metrics is not None:
            metrics.write(json.dumps(rec) + "\n")

    def save_checkpoint(step: int, elapsed: float) -> None:
        rngs = dist.gather(_rng_state(gen, cuda))
        if master:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": rngs,
                "step": step,
                "elapsed_s": elapsed,
                "config": asdict(config),
                "args": {k: v for k, v in vars(args).items()},
                "kernels": args.kernels,
            }
            _atomic_torch_save(state, out_dir / "ckpt.pt")

    tokens_per_iter = B * T * dist.world
    if master:
        print(
            f"fastattn-train: {args.kernels} kernels, {model.num_params() / 1e6:.2f}M params, "
            f"{config.n_layer} layers x {config.n_head} heads x {config.n_embd} wide, block "
            f"{T}, batch {B} x {dist.world} process(es), {args.max_iters} iters on {device} "
            f"({args.dtype}), data {data.directory}",
            flush=True,
        )
    bar = _progress(args.max_iters, step, disable=not master or args.no_progress)
    evals: list[dict] = []
    timed_s = timed_tokens = 0.0  # whole run, warm-up and evals excluded
    win_s = win_tokens = 0.0  # since the last evaluation
    last_loss = float("nan")
    t0 = time.perf_counter()

    def evaluate(step: int) -> None:
        nonlocal win_s, win_tokens
        losses = estimate_loss()
        elapsed = elapsed0 + time.perf_counter() - t0
        tps = win_tokens / win_s if win_s > 0 else None
        rec = {
            "kind": "eval",
            "step": step,
            **losses,
            "lr": get_lr(min(step, args.max_iters), args),
            "tokens_per_s": tps,
            "elapsed_s": elapsed,
            "train_time_s": timed_s,
        }
        evals.append(rec)
        log(rec)
        if master:
            tps_txt = f", {tps:,.0f} tok/s" if tps else ""
            _say(
                bar,
                f"step {step}: train loss {losses['train_loss']:.4f}, val loss "
                f"{losses['val_loss']:.4f}{tps_txt}, {elapsed:.1f} s",
            )
        save_checkpoint(step, elapsed)
        if metrics is not None:
            metrics.flush()
        win_s = win_tokens = 0.0

    try:
        for step in range(start_step, args.max_iters):
            if step % args.eval_interval == 0 and not (args.resume and step == start_step):
                evaluate(step)
            lr = get_lr(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            ts = time.perf_counter()
            x, y = data.get_batch("train", B, T, gen, device)
            with autocast:
                _, loss = train_model(x, y)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            last_loss = loss.item()  # also waits for the device
            dt = time.perf_counter() - ts
            if step - start_step >= TIMING_WARMUP_ITERS:
                timed_s, timed_tokens = timed_s + dt, timed_tokens + tokens_per_iter
                win_s, win_tokens = win_s + dt, win_tokens + tokens_per_iter
            if step % args.log_interval == 0 or step == args.max_iters - 1:
                log({"kind": "iter", "step": step, "loss": last_loss, "lr": lr})
            if bar is not None:
                post = {"loss": f"{last_loss:.4f}"}
                if win_s > 0:
                    post["tok/s"] = f"{win_tokens / win_s:,.0f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
        step = args.max_iters
        if step > start_step or not args.resume:
            evaluate(step)
    finally:
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()

    summary = {
        "kernels": args.kernels,
        "out_dir": str(out_dir),
        "steps": args.max_iters,
        "tokens_per_s": timed_tokens / timed_s if timed_s > 0 else None,
        "timed_iters": int(round(timed_tokens / tokens_per_iter)),
        "final_train_loss": evals[-1]["train_loss"] if evals else None,
        "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "last_step_loss": last_loss,
        "elapsed_s": elapsed0 + time.perf_counter() - t0,
        "evals": evals,
        "model": model,
    }
    if master and args.sample_tokens > 0:
        tok = data.tokenizer
        start = tok.encode("\n") if "\n" in tok.stoi else [0]
        idx = torch.tensor([start], dtype=torch.long, device=device)
        g = torch.Generator(device=device).manual_seed(args.seed)
        with autocast:
            out = model.generate(idx, args.sample_tokens, temperature=0.8, top_k=None, generator=g)
        text = tok.decode(out[0, len(start) :].tolist())
        (out_dir / "sample.txt").write_text(text, encoding="utf-8")
        summary["sample"] = text
        print(
            f"--- sample ({args.sample_tokens} tokens, temperature 0.8) ---\n{text}\n---",
            flush=True,
        )
    return summary


# ----------------------------------------------------------------------------- --compare
def compare(args: argparse.Namespace) -> dict:
    """Train with --kernels torch then fastattn (same seed and config); table, JSON and plot."""
    out_dir = Path(args.out_dir)
    results = {}
    for kernels in ("torch", "fastattn"):
        sub = copy.copy(args)
        sub.kernels, sub.out_dir, sub.compare = kernels, str(out_dir / kernels), False
        print(f"=== --kernels {kernels} ===", flush=True)
        results[kernels] = train(sub)
    base = results["torch"]["tokens_per_s"] or float("nan")
    rows = []
    for kernels, r in results.items():
        tps = r["tokens_per_s"] or float("nan")
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
    print(
        f"\ntraining throughput, {args.max_iters} iters (first {TIMING_WARMUP_ITERS} iters and "
        f"evaluations not timed):"
    )
    print(f"{'kernels':<10} {'tokens/s':>10} {'speed-up':>9} {'final val loss':>15} {'wall s':>8}")
    for r in rows:
        print(
            f"{r['kernels']:<10} {r['tokens_per_s']:>10,.0f} {r['speedup']:>8.2f}x "
            f"{r['final_val_loss']:>15.4f} {r['elapsed_s']:>8.1f}"
        )
    record = {
        "rows": rows,
        "curves": {
            k: [(e["elapsed_s"], e["val_loss"]) for e in r["evals"]] for k, r in results.items()
        },
        "args": {k: v for k, v in vars(args).items()},
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "timing": f"training iterations only; first {TIMING_WARMUP_ITERS} iters and evaluations excluded",
    }
    (out_dir / "compare.json").write_text(json.dumps(record, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no compare.png (pip install matplotlib)")
    else:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for r in rows:
            xs, ys = zip(*record["curves"][r["kernels"]], strict=True)
            ax.plot(
                xs, ys, marker="o", ms=3, label=f"{r['kernels']} ({r['tokens_per_s']:,.0f} tok/s)"
            )
        ax.set_xlabel("wall-clock time (s)")
        ax.set_ylabel("val loss")
        ax.set_title(f"GPT {args.preset}: fastattn vs torch ({rows[1]['speedup']:.2f}x tokens/s)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "compare.png", dpi=120)
        plt.close(fig)
    print(f"wrote {out_dir / 'compare.json'} and {out_dir / 'compare.png'}")
    return record


# ----------------------------------------------------------------------------- entry points
def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` and train (or compare); returns the summary. Errors exit with a message."""
    args, parser = parse_args(argv)
    if args.compare:
        try:
            return compare(args)
        except DataError as e:
            parser.error(str(e))
    dist = Dist(args.device)
    try:
        return train(args, dist)
    except DataError as e:
        parser.error(str(e))
    finally:
        dist.close()


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
