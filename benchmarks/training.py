"""The demo GPT's training step, whole: torch eager, torch.compile and fastattn, and its budget.

``python -m benchmarks.run training``. A step is what the trainer times (``fastattn.train``):
forward (under bf16 autocast for bf16), backward, gradient clipping, AdamW (fused where torch
has it, for every run alike). Runs are interleaved round by round (``common.interleaved``) and
reported as medians with the per-round speed-ups.

The **step budget** says what the step could cost on this machine, from rates measured in the
same run:

- the GEMM floor: the step's matmul FLOPs (forward and both backward products of every Linear,
  the tied lm_head included) at the best rate torch's GEMMs reach at each of the model's shapes
  in that dtype (MKL ``F.linear`` or oneDNN, whichever is faster there);
- attention at the arithmetic peak: the causal attention FLOPs (2 matmuls forward, 5 backward,
  half the scores masked) at the fp32 FMA peak (bf16 dot peak for bf16);
- the memory-bound ops (LayerNorm, bias + GELU, dropout, AdamW) at copy bandwidth, from the
  bytes each must read and write;

beside the measured step and the share of each kernel family in it (torch.profiler self time of
the fastattn run, a separate pass after timing).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks.common import Report, comparison_columns, interleaved
from fastattn.models.gpt import GPT, GPTConfig
from fastattn.ops import _gemm


@dataclass(frozen=True)
class Config:
    label: str
    gpt: GPTConfig
    batch: int


def configs(quick: bool) -> list[Config]:
    big = dict(block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384)
    small = dict(block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=128)
    if quick:
        return [Config("cpu_small 4x128, B12, T64", GPTConfig(**small), 12)]
    return [
        Config("6L/6H/384, B8, T256, dropout 0.2", GPTConfig(**big, dropout=0.2), 8),
        Config("6L/6H/384, B8, T256, dropout 0", GPTConfig(**big, dropout=0.0), 8),
        Config("cpu_small 4x128, B12, T64", GPTConfig(**small), 12),
    ]


def make_step(cfg: Config, kernels: str, dtype: torch.dtype, compiled: bool) -> Callable:
    torch.manual_seed(0)
    model = GPT(cfg.gpt, kernels=kernels).train()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99))
    fwd = torch.compile(model, dynamic=False) if compiled else model
    g = torch.Generator().manual_seed(0)
    T, V = cfg.gpt.block_size, cfg.gpt.vocab_size
    x = torch.randint(0, V, (cfg.batch, T), generator=g)
    y = torch.randint(0, V, (cfg.batch, T), generator=g)
    ac = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if dtype == torch.bfloat16
        else contextlib.nullcontext()
    )

    def step():
        with ac:
            _, loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


# ----------------------------------------------------------------------------- the budget
def gemm_shapes(cfg: Config) -> list[tuple[int, int, int, int]]:
    """(M, K, N, count) of the forward matmuls of one step (each also has dx and dW)."""
    c, m = cfg.gpt.n_embd, cfg.batch * cfg.gpt.block_size
    per_layer = [(m, c, 3 * c), (m, c, c), (m, c, 4 * c), (m, 4 * c, c)]
    shapes = [(mm, k, n, cfg.gpt.n_layer) for mm, k, n in per_layer]
    return [*shapes, (m, c, cfg.gpt.vocab_size, 1)]


def gemm_rate(m: int, k: int, n: int, dtype: torch.dtype, reps: int = 7) -> float:
    """Best GFLOP/s of torch's two GEMM paths at this shape (forward product): the fastest of
    ``reps`` calls after 3 warm-up calls, a floor being a bound (a median of 5 after one warm-up
    call read some shapes at half their rate: first-call set-up and page faults)."""
    x, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    paths = {"torch": lambda: F.linear(x, w)}
    if _gemm._HAVE_ONEDNN:
        paths["onednn"] = lambda: _gemm._onednn(x, w, None)
    best = 0.0
    for f in paths.values():
        for _ in range(3):
            f()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        best = max(best, 2 * m * k * n / min(ts) / 1e9)
    return best


def budget(cfg: Config, dtype: torch.dtype, ceilings) -> dict[str, float]:
    """Milliseconds per step each part would take at its ceiling (see the module doc)."""
    gemm_ms = 0.0
    for m, k, n, count in gemm_shapes(cfg):
        gemm_ms += count * 3 * 2 * m * k * n / gemm_rate(m, k, n, dtype) / 1e9 * 1e3
    g = cfg.gpt
    hd = g.n_embd // g.n_head
    # causal: half the scores; forward QK^T and PV, backward 5 products of the same size
    attn_flop = g.n_layer * 7 * cfg.batch * g.n_head * g.block_size**2 * hd
    peak = ceilings.compute(dtype)
    attn_ms = attn_flop / (peak.value * 1e9) * 1e3 if peak and peak.value else float("nan")
    # bytes: activations in the step's dtype (bf16 under autocast), the stream in float32
    act = 2 if dtype == torch.bfloat16 else 4
    tokens = cfg.batch * g.block_size
    c = g.n_embd
    ln_bytes = (2 * g.n_layer + 1) * tokens * c * (act + 4 + 4 + act + act + 4 + 4 + 4 + act)
    gelu_bytes = g.n_layer * tokens * 4 * c * act * 5  # fwd u -> h, bwd dh, u -> du
    n_params = sum(p.numel() for p in GPT(g, kernels="torch").parameters())
    adam_bytes = n_params * 4 * 7  # read p, g, m, v; write p, m, v
    bw = ceilings.memory()
    mem_ms = (
        (ln_bytes + gelu_bytes + adam_bytes) / (bw.value * 1e9) * 1e3
        if bw and bw.value
        else float("nan")
    )
    return {"gemm": gemm_ms, "attention": attn_ms, "memory": mem_ms}


def _eager(op: str, fn: str) -> tuple[str, str]:
    """The C++ eager path's profiler names (csrc/autograd.cpp): the forward op and the backward
    node (its self time is the backward kernel's)."""
    return (
        f"fastattn_C::{op}_eager",
        f"torch::autograd::CppNode<fastattn::(anonymous namespace)::{fn}>",
    )


FAMILIES = {
    "GEMM": ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise", "aten::bmm"),
    "attention": (
        "fastattn_C::attention_fwd",
        "fastattn_C::attention_bwd",
        "fastattn_C::attention_fwd_features",
        "fastattn_C::attention_bwd_features",
        *_eager("attention", "AttentionFn"),
    ),
    "layer_norm": (
        "fastattn_C::layer_norm_fwd",
        "fastattn_C::layer_norm_bwd",
        *_eager("layer_norm", "LayerNormFn"),
    ),
    "bias_gelu": (
        "fastattn_C::bias_gelu_fwd",
        "fastattn_C::bias_gelu_bwd",
        *_eager("bias_gelu", "BiasGeluFn"),
    ),
    "AdamW": ("aten::_fused_adamw_",),
}


def shares(step: Callable, steps: int = 3) -> dict[str, float]:
    """Milliseconds per step by kernel family: torch.profiler self time of the ops (an op's
    intra-op threads run inside its span on the calling thread)."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(steps):
            step()
    total: dict[str, float] = dict.fromkeys(FAMILIES, 0.0)
    for ev in prof.key_averages():
        for fam, names in FAMILIES.items():
            if ev.key in names:
                total[fam] += ev.self_cpu_time_total / 1e3 / steps
    return total


def suite_training(ctx) -> Report:
    dtypes = [torch.float32, torch.bfloat16]
    runs = ["torch eager", "torch compiled", "fastattn eager"]
    if not ctx.quick:
        runs.append("fastattn compiled")
    baselines = ["torch eager", "torch compiled"]
    rep = Report(
        "Demo GPT training step (forward + backward + clip + AdamW), CPU",
        comparison_columns(["model", "dtype"], None, None, baselines),
        ceilings=ctx.ceilings,
        notes=[
            "Same initial weights and batch for every run; dropout masks differ between torch "
            "(bernoulli) and fastattn (Philox), so dropout runs do equal work, not equal "
            "numbers. bf16 = torch.autocast(bfloat16) over float32 parameters. Compiled = "
            "torch.compile (Inductor) of the model; the optimizer step is eager in every run.",
        ],
    )
    budget_rows = []
    torch._dynamo.config.recompile_limit = 64
    for cfg in configs(ctx.quick):
        for dtype in dtypes:
            tag = "bf16" if dtype == torch.bfloat16 else "fp32"
            fns = {
                name: make_step(cfg, name.split()[0], dtype, name.endswith("compiled"))
                for name in runs
            }
            cmp = interleaved(fns, rounds=ctx.rounds_or(9), min_rounds=3, warmup=3, max_s=90.0)
            rep.add_comparison([cfg.label, tag], cmp, baselines=baselines)
            b = budget(cfg, dtype, ctx.ceilings)
            measured = cmp.time("fastattn eager").median * 1e3
            sh = shares(fns["fastattn eager"])
            floor = b["gemm"] + b["attention"] + b["memory"]
            budget_rows.append(
                [
                    cfg.label,
                    tag,
                    measured,
                    b["gemm"],
                    measured / b["gemm"],
                    b["attention"],
                    b["memory"],
                    measured / floor,
                    *(sh[f] for f in FAMILIES),
                ]  # fmt: skip
            )
    rep.sections.append(
        (
            "Step budget of the fastattn eager run (ms per step; shares: profiler self time "
            "of each kernel family in the same run)",
            [
                "model",
                "dtype",
                "measured step",
                "GEMM floor",
                "step / GEMM floor",
                "attention at peak",
                "memory-bound at copy BW",
                "step / all floors",
                *(f"{f} (measured)" for f in FAMILIES),
            ],  # fmt: skip
            budget_rows,
        )
    )
    return rep
