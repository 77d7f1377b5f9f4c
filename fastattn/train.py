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

This file is the command line and the loop; the parts live in :mod:`fastattn.training`
(checkpoint, evaluate, meter, log, compare, dist, argtypes, malloc).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fastattn.data import DataError, TextDataset, load_text_dataset
from fastattn.models.gpt import GPT, GPTConfig
from fastattn.training import argtypes as t
from fastattn.training import autodtype, checkpoint
from fastattn.training.checkpoint import CKPT_NAME, CheckpointError
from fastattn.training.compare import compare
from fastattn.training.dist import Dist
from fastattn.training.evaluate import estimate_loss
from fastattn.training.log import MetricsLog, Progress
from fastattn.training.malloc import steady_malloc
from fastattn.training.meter import TIMING_WARMUP_ITERS, ThroughputMeter

__all__ = [
    "PRESETS", "TIMING_WARMUP_ITERS", "Dist", "Trainer", "build_parser", "main", "run", "train",
]  # fmt: skip

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
    dtype="auto",
    sample_tokens=300,
    log_interval=10,
    malloc="steady",
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
    p.add_argument(
        "--preset",
        default="cpu_small",
        choices=sorted(PRESETS),
        help="model/optimiser settings to start from; the flags below override them. "
        "shakespeare_char is nanoGPT's GPU recipe (on a CPU add --batch-size 8)",
    )
    g = p.add_argument_group("model (ignored with --resume: the checkpoint has it)")
    g.add_argument("--n-layer", type=t.positive_int, help="number of transformer blocks")
    g.add_argument(
        "--n-head", type=t.positive_int, help="attention heads per block (must divide --n-embd)"
    )
    g.add_argument("--n-embd", type=t.positive_int, help="model width")
    g.add_argument("--block-size", type=t.positive_int, help="context length in tokens")
    g.add_argument("--dropout", type=t.probability, help="dropout probability during training")
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
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=t.positive_int, help="sequences per step per process")
    o.add_argument("--max-iters", type=t.nonneg_int, help="total optimiser steps")
    o.add_argument("--lr", type=t.positive_float, help="peak learning rate")
    o.add_argument(
        "--min-lr", type=t.nonneg_float, help="final learning rate of the cosine decay (<= --lr)"
    )
    o.add_argument(
        "--warmup-iters", type=t.nonneg_int, help="steps of linear learning-rate warm-up"
    )
    o.add_argument(
        "--lr-decay-iters",
        type=t.nonneg_int,
        help="step at which the cosine decay reaches --min-lr (default: --max-iters)",
    )
    o.add_argument("--weight-decay", type=t.nonneg_float, help="AdamW weight decay on 2-D weights")
    o.add_argument("--beta1", type=t.probability, help="AdamW beta1")
    o.add_argument("--beta2", type=t.probability, help="AdamW beta2")
    o.add_argument(
        "--grad-clip", type=t.nonneg_float, help="clip the gradient norm to this; 0 = off"
    )
    r = p.add_argument_group("run")
    r.add_argument(
        "--eval-interval", type=t.positive_int, help="evaluate and checkpoint every this many steps"
    )
    r.add_argument(
        "--eval-iters", type=t.positive_int, help="batches per split in each loss estimate"
    )
    r.add_argument(
        "--log-interval",
        type=t.positive_int,
        help="write an 'iter' metrics line every this many steps",
    )
    r.add_argument("--device", type=t.device, help="cpu, cuda or cuda:N")
    r.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        help="float32, bfloat16 autocast for the forward pass, or auto: bfloat16 where this "
        "machine's bf16 matmul is faster than its fp32 one (a short probe at start-up, printed)",
    )
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument(
        "--threads", type=t.positive_int, help="torch.set_num_threads (default: torch's choice)"
    )
    r.add_argument(
        "--malloc",
        choices=["steady", "system"],
        help="steady: glibc malloc keeps freed memory for the next step (mmap threshold 32 MiB, "
        "no trimming), so fresh tensors do not page-fault (~1100 faults a step at cpu_small "
        "otherwise); system: the C library's defaults. Process-wide; a no-op off glibc",
    )
    r.add_argument("--seed", type=int, help="random seed; rank r uses seed + r for its data")
    r.add_argument(
        "--out-dir", help="where metrics, checkpoints and samples go (default: out-<preset>)"
    )
    r.add_argument(
        "--data",
        type=t.existing_file,
        help="any UTF-8 text file (default: the bundled tinyshakespeare)",
    )
    r.add_argument("--cache-dir", help="where prepared token files go (default: ~/.cache/fastattn)")
    r.add_argument(
        "--resume",
        action="store_true",
        help=f"continue from <out-dir>/{CKPT_NAME} (model shape from the checkpoint)",
    )
    r.add_argument("--sample-tokens", type=t.nonneg_int, help="characters to generate at the end")
    r.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    r.add_argument(
        "--compare",
        action="store_true",
        help="train torch eager, torch + torch.compile and fastattn at the same --dtype, "
        "interleaved in blocks of --compare-block steps (subdirs of --out-dir), and print/plot "
        "throughput and val loss (compare.json, compare.png)",
    )
    r.add_argument(
        "--compare-block",
        type=t.positive_int,
        default=10,
        help="--compare: steps each run takes before the next one's turn",
    )
    r.add_argument(
        "--compare-compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--compare: include the torch + torch.compile run",
    )
    return p


def model_config(args: argparse.Namespace, vocab_size: int) -> GPTConfig:
    """The model the flags describe (GPTConfig raises ValueError on a bad combination)."""
    return GPTConfig(
        block_size=args.block_size,
        vocab_size=vocab_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        dropout=args.dropout,
        bias=args.bias,
    )


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """Parse, fill unset flags from the preset and the common defaults, check what no single
    flag's type can: combinations."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for key, value in {**COMMON_DEFAULTS, **PRESETS[args.preset]}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.max_iters
    if args.out_dir is None:
        args.out_dir = f"out-{args.preset}"
    if args.min_lr > args.lr:
        parser.error(f"--min-lr ({args.min_lr}) must be <= --lr ({args.lr})")
    if args.compare and args.resume:
        parser.error("--compare and --resume cannot be combined")
    if args.compare and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        parser.error("--compare runs in one process; do not launch it with torchrun")
    if args.resume and not (Path(args.out_dir) / CKPT_NAME).is_file():
        parser.error(f"--resume: no checkpoint at {Path(args.out_dir) / CKPT_NAME}")
    if not args.resume:  # the model flags; with --resume the checkpoint's config is used
        try:
            model_config(args, vocab_size=1)
        except ValueError as e:
            parser.error(f"model flags: {e}")
    return args, parser


def get_lr(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up to --lr, cosine decay to --min-lr at --lr-decay-iters, then constant."""
    if step < args.warmup_iters:
        return args.lr * (step + 1) / (args.warmup_iters + 1)
    if step >= args.lr_decay_iters:
        return args.min_lr
    ratio = (step - args.warmup_iters) / (args.lr_decay_iters - args.warmup_iters)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)


# ----------------------------------------------------------------------------- setup
def resolve_dtype(args: argparse.Namespace, dist: Dist | None = None) -> None:
    """``--dtype auto`` -> float32 or bfloat16 (:mod:`fastattn.training.autodtype`), in place;
    every rank takes rank 0's answer. The probe's numbers are printed (rank 0)."""
    if args.dtype != "auto":
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    pick, why = autodtype.resolve(args.device, args.batch_size * args.block_size, args.n_embd)
    if dist is not None and dist.world > 1:
        pick = dist.gather(pick)[0]
    args.dtype = pick
    if dist is None or dist.master:
        print(why, flush=True)


@dataclass
class Run:
    """One training run's state, made by :func:`setup`; read by the loop and its helpers."""

    args: argparse.Namespace
    dist: Dist
    data: TextDataset
    config: GPTConfig
    model: GPT  # the plain module: state_dict, clipping, generate
    forward: torch.nn.Module  # model or torch.compile(model): evaluation
    train_forward: torch.nn.Module  # forward, in DDP when world > 1: the training steps
    optimizer: torch.optim.Optimizer
    gen: torch.Generator  # this rank's stream of training batches
    autocast: contextlib.AbstractContextManager
    out_dir: Path
    start_step: int
    elapsed0: float  # wall-clock seconds of the earlier sessions (--resume)
    malloc_note: str | None = None  # what --malloc steady set (None: nothing)
    t0: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.t0


def setup(args: argparse.Namespace, dist: Dist) -> Run:
    """Data, model, optimizer and RNG states: fresh, or from the checkpoint with --resume."""
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc_note = steady_malloc() if args.malloc == "steady" else None  # None: not glibc
    resolve_dtype(args, dist)
    out_dir = Path(args.out_dir)
    if dist.master:
        out_dir.mkdir(parents=True, exist_ok=True)
    data = load_text_dataset(args.data, args.cache_dir)
    ckpt = checkpoint.load(out_dir / CKPT_NAME) if args.resume else None
    config = GPTConfig(**ckpt["config"]) if ckpt else model_config(args, data.vocab_size)
    if config.vocab_size != data.vocab_size:
        raise DataError(
            f"--resume: the checkpoint's vocabulary has {config.vocab_size} tokens, the data "
            f"{data.vocab_size}; resume with the same --data"
        )
    data.check_block_size(config.block_size)

    torch.manual_seed(args.seed)  # same initial weights on every rank and for both kernel kinds
    model = GPT(config, kernels=args.kernels).to(dist.device)
    optimizer = model.configure_optimizers(args.weight_decay, args.lr, (args.beta1, args.beta2))
    gen = torch.Generator()
    if ckpt:
        step, elapsed0 = checkpoint.restore(ckpt, model, optimizer, gen, dist.rank, dist.world)
    else:
        checkpoint.seed_all(args.seed + dist.rank, gen)  # dropout and data differ per rank
        step, elapsed0 = 0, 0.0

    cuda = dist.device.startswith("cuda")
    forward = torch.compile(model) if args.compile else model
    train_forward = forward
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_forward = DDP(forward, device_ids=[dist.local_rank] if cuda else None)
    autocast = (
        torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16)
        if args.dtype == "bfloat16"
        else contextlib.nullcontext()
    )
    return Run(
        args=args, dist=dist, data=data, config=config, model=model, forward=forward,
        train_forward=train_forward, optimizer=optimizer, gen=gen, autocast=autocast,
        out_dir=out_dir, start_step=step, elapsed0=elapsed0, malloc_note=malloc_note,
    )  # fmt: skip


# ----------------------------------------------------------------------------- the loop
class Trainer:
    """One training run as described by ``args``, advanced in pieces: :meth:`run_until` trains
    (evaluating and checkpointing every --eval-interval steps), :meth:`finish` evaluates the
    last step and returns the summary. :func:`train` runs it in one go; ``--compare`` advances
    several in alternating blocks of steps (:mod:`fastattn.training.compare`)."""

    def __init__(self, args: argparse.Namespace, dist: Dist | None = None, show: bool = True):
        self.args, self.dist = args, dist or Dist(args.device)
        self.run = setup(args, self.dist)
        self.B, self.T = args.batch_size, self.run.config.block_size
        self.meter = ThroughputMeter(tokens_per_iter=self.B * self.T * self.dist.world)
        resume = self.run.start_step if args.resume else None
        self.log = MetricsLog(self.run.out_dir / "metrics.jsonl", enabled=self.dist.master,
                              resume_step=resume)  # fmt: skip
        announce(self.run)
        show = show and self.dist.master and not args.no_progress
        self.bar = Progress(args.max_iters, self.run.start_step, show=show)
        self.step, self.evals, self.loss = self.run.start_step, [], float("nan")

    def run_until(self, stop: int) -> None:
        """Train steps ``self.step .. stop - 1``; evaluate (and checkpoint) before a step at
        each --eval-interval (a resumed run did so before it stopped)."""
        args, run = self.args, self.run
        for step in range(self.step, min(stop, args.max_iters)):
            if step % args.eval_interval == 0 and not (args.resume and step == run.start_step):
                self.evals.append(
                    evaluate_and_checkpoint(run, step, self.meter, self.log, self.bar)
                )
            lr = get_lr(step, args)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            self.loss = train_step(run, self.B, self.T)
            self.meter.add(time.perf_counter() - t0)
            if step % args.log_interval == 0 or step == args.max_iters - 1:
                self.log.write({"kind": "iter", "step": step, "loss": self.loss, "lr": lr})
            self.bar.update(self.loss, self.meter.window_rate)
            self.step = step + 1

    @property
    def done(self) -> bool:
        return self.step >= self.args.max_iters

    def finish(self) -> dict:
        """The last evaluation and checkpoint, the sample; returns the summary (rank 0's)."""
        args, run = self.args, self.run
        try:
            if args.max_iters > run.start_step or not args.resume:
                self.evals.append(
                    evaluate_and_checkpoint(run, args.max_iters, self.meter, self.log, self.bar)
                )
        finally:
            self.close()
        summary = {
            "kernels": args.kernels,
            "compile": bool(args.compile),
            "dtype": args.dtype,
            "out_dir": str(run.out_dir),
            "steps": args.max_iters,
            "tokens_per_s": self.meter.rate,
            "timed_iters": self.meter.timed_iters,
            "step_ms_median": self.meter.median_ms,
            "final_train_loss": self.evals[-1]["train_loss"] if self.evals else None,
            "final_val_loss": self.evals[-1]["val_loss"] if self.evals else None,
            "last_step_loss": self.loss,
            "elapsed_s": run.elapsed(),
            "evals": self.evals,
            "model": run.model,
        }
        if self.dist.master and args.sample_tokens > 0:
            summary["sample"] = write_sample(run)
        return summary

    def close(self) -> None:
        self.bar.close()
        self.log.close()


def train(args: argparse.Namespace, dist: Dist | None = None) -> dict:
    """One training run as described by ``args``; returns a summary (rank 0's view)."""
    trainer = Trainer(args, dist)
    try:
        trainer.run_until(args.max_iters)
    except BaseException:
        trainer.close()
        raise
    return trainer.finish()


def train_step(run: Run, B: int, T: int) -> float:
    """One optimiser step on a fresh batch; returns its loss."""
    x, y = run.data.get_batch("train", B, T, run.gen, run.dist.device)
    with run.autocast:
        _, loss = run.train_forward(x, y)
    loss.backward()
    if run.args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.args.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss.item()  # also waits for the device, so the step's time is all in


def evaluate_and_checkpoint(
    run: Run, step: int, meter: ThroughputMeter, log: MetricsLog, bar: Progress
) -> dict:
    """Estimate the losses, log them, save the checkpoint; returns the 'eval' record."""
    args = run.args
    losses = estimate_loss(
        run.forward, run.data, batch_size=args.batch_size, block_size=run.config.block_size,
        eval_iters=args.eval_iters, seed=args.seed + 1_000_003 + run.dist.rank,
        autocast=run.autocast, dist=run.dist,
    )  # fmt: skip
    elapsed = run.elapsed()
    tps = meter.window_rate
    rec = {
        "kind": "eval",
        "step": step,
        **losses,
        "lr": get_lr(min(step, args.max_iters), args),
        "tokens_per_s": tps,
        "elapsed_s": elapsed,
        "train_time_s": meter.total_s,
    }
    log.write(rec)
    if run.dist.master:
        tps_txt = f", {tps:,.0f} tok/s" if tps else ""
        label = getattr(args, "run_label", None)
        bar.say(
            f"{f'[{label}] ' if label else ''}step {step}: train loss {losses['train_loss']:.4f}, val loss "
            f"{losses['val_loss']:.4f}{tps_txt}, {elapsed:.1f} s"
        )
    save_checkpoint(run, step, elapsed)
    log.flush()  # the metrics are complete up to the checkpoint just written
    meter.reset_window()
    return rec


def save_checkpoint(run: Run, step: int, elapsed: float) -> None:
    """Every rank hands in its RNG states; rank 0 writes <out-dir>/ckpt.pt atomically."""
    cuda = run.dist.device.startswith("cuda")
    rngs = run.dist.gather(checkpoint.rng_state(run.gen, cuda))
    if run.dist.master:
        checkpoint.save(
            run.out_dir / CKPT_NAME, model=run.model, optimizer=run.optimizer, rngs=rngs,
            step=step, elapsed_s=elapsed, config=asdict(run.config), args=dict(vars(run.args)),
        )  # fmt: skip


def announce(run: Run) -> None:
    """One line on what is about to train (rank 0)."""
    if not run.dist.master:
        return
    a, c = run.args, run.config
    print(
        f"fastattn-train: {a.kernels} kernels, {run.model.num_params() / 1e6:.2f}M params, "
        f"{c.n_layer} layers x {c.n_head} heads x {c.n_embd} wide, block {c.block_size}, batch "
        f"{a.batch_size} x {run.dist.world} process(es), {a.max_iters} iters on "
        f"{run.dist.device} ({a.dtype}), data {run.data.directory}",
        flush=True,
    )
    if run.malloc_note:
        print(f"fastattn-train: {run.malloc_note} (--malloc system for the defaults)", flush=True)
    elif a.malloc == "steady":
        print("fastattn-train: --malloc steady has no effect here (not glibc)", flush=True)


def write_sample(run: Run) -> str:
    """Generate --sample-tokens characters after a newline; print them, write sample.txt."""
    args, tok = run.args, run.data.tokenizer
    start = tok.encode("\n") if "\n" in tok.stoi else [0]
    idx = torch.tensor([start], dtype=torch.long, device=run.dist.device)
    g = torch.Generator(device=run.dist.device).manual_seed(args.seed)
    with run.autocast:
        out = run.model.generate(idx, args.sample_tokens, temperature=0.8, top_k=None, generator=g)
    text = tok.decode(out[0, len(start) :].tolist())
    checkpoint.atomic_write_text(run.out_dir / "sample.txt", text)
    print(f"--- sample ({args.sample_tokens} tokens, temperature 0.8) ---\n{text}\n---", flush=True)
    return text


# ----------------------------------------------------------------------------- entry points
def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` and train (or compare); returns the summary. Errors exit with a message."""
    args, parser = parse_args(argv)
    try:
        if args.compare:
            resolve_dtype(args)  # once: every run of the comparison trains in the same dtype
            return compare(args, Trainer)
        dist = Dist(args.device)
        try:
            return train(args, dist)
        finally:
            dist.close()
    except (DataError, CheckpointError) as e:
        parser.error(str(e))


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
