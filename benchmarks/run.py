"""Benchmark runner: ``python -m benchmarks.run [ceilings|SUITE|all] [--quick] [--rounds N]``.

``ceilings`` prints the machine's ceilings alone (fp32 FMA peak, bf16 dot peak, copy bandwidth,
torch's GEMM rates; see ``benchmarks/ceilings.py``). A suite measures fastattn beside its
baselines (PyTorch eager, PyTorch's own fused op, ``torch.compile`` of the reference),
interleaved round by round, and reports medians, IQRs, the number of rounds, speed-ups as the
median of per-round ratios, and rates as fractions of the ceiling that limits them: compute-bound
kernels of the FMA / bf16-dot peak, memory-bound ones of the copy bandwidth. The ceilings are
measured first in the same run and head every file recorded in ``benchmarks/results/``
(Markdown + JSON, and a plot where one helps).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fastattn
from benchmarks import ceilings as _ceilings
from benchmarks.common import (
    RESULTS,
    STEADY_TUNABLES,
    Report,
    cache_note,
    comparison_columns,
    fresh_output_note,
    interleaved,
    machine,
    steady_allocator,
)
from benchmarks.training import suite_training


@dataclass
class Context:
    """What every suite gets: the run's options and the ceilings measured at its start."""

    quick: bool
    ceilings: _ceilings.Ceilings
    rounds: int | None = None  # --rounds: overrides every suite's default (smoke runs)

    def rounds_or(self, default: int) -> int:
        return self.rounds if self.rounds is not None else default


def _compiled(fn: Callable) -> Callable:
    # Inductor on CPU; compile time is excluded by the warm-up rounds of interleaved. Each shape
    # and grad mode is its own static graph: raise dynamo's recompile limit so a sweep never
    # silently falls back to eager.
    torch._dynamo.config.recompile_limit = 64
    return torch.compile(fn, dynamic=False)


# ----------------------------------------------------------------------------- layernorm
def layernorm_cases(
    shapes: list[tuple[int, int]],
) -> Iterator[tuple[tuple[int, int], dict[str, Callable]]]:
    """(label, shape, callables) for LayerNorm: fastattn cpu, F.layer_norm eager and compiled."""
    compiled = _compiled(lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b))
    for n, m in shapes:
        impls = {
            "fastattn": lambda x, w, b: fastattn.layer_norm(x, (x.shape[-1],), w, b),
            "torch eager": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b),
            "torch.compile": compiled,
        }
        yield (n, m), impls


def _add_layer_norm_torch(x, r, w, b):
    s = x + r
    return F.layer_norm(s, (s.shape[-1],), w, b), s


def add_layer_norm_impls() -> dict[str, Callable]:
    """add_layer_norm (y, s = LN(x + r), x + r): fastattn and the two ops torch runs for it."""
    return {
        "fastattn": lambda x, r, w, b: fastattn.add_layer_norm(x, r, (x.shape[-1],), w, b),
        "torch eager": _add_layer_norm_torch,
        "torch.compile": _compiled(_add_layer_norm_torch),
    }


def _grads(fn: Callable, inputs: tuple[torch.Tensor, ...], dy):
    """One forward+backward step; the gradients are returned (not accumulated in ``.grad``) so
    they stay alive until the clock stops and freeing them is not timed. ``dy``: one gradient,
    or a tuple of them for a function with several outputs."""
    return torch.autograd.grad(fn(*inputs), inputs, dy)


# Memory-bound cases take milliseconds: many rounds are cheap and tame the spread.
MEMORY_ROUNDS = 31
MEMORY_MAX_S = 30.0


def suite_layernorm(ctx: Context) -> Report:
    shapes = [(8192, 768), (32768, 1024)] if not ctx.quick else [(2048, 768)]
    baselines = ["torch eager", "torch.compile"]
    copy = ctx.ceilings.memory()
    rep = Report(
        "LayerNorm and add_layer_norm (float32 and bfloat16, CPU)",
        comparison_columns(["op", "dtype", "shape", "pass"], "GB/s", "copy BW", baselines),
        ceilings=ctx.ceilings,
        notes=[
            "Bytes counted, e = the activations' element size (4 float32, 2 bfloat16; weight, "
            "bias, mean and rstd are float32 and negligible): layer_norm forward reads x and "
            "writes y (2 N M e); forward+backward adds reading dy and x and writing dx (5 N M e "
            "in all: 2.5 copies of x). add_layer_norm forward reads x and r and writes s = x + r "
            "and y (4 N M e); its backward reads dy, ds (the gradient reaching s from the "
            "residual stream) and s and writes one gradient (x's and r's are the same tensor): "
            "8 N M e in all (4 copies).",
            "bfloat16: x (and r) bfloat16, weight and bias float32 (a model under autocast); "
            "torch eager = F.layer_norm's mixed-dtype CPU path on the same tensors.",
            "torch eager = F.layer_norm (ATen's fused CPU kernel, the PyTorch fused op), after "
            "x + r for add_layer_norm; torch.compile = Inductor on the same calls.",
            fresh_output_note("Outputs (y, s; dx, dw, db in fwd+bwd)"),
            cache_note(),
        ],
    )
    cases: list[tuple[str, tuple[int, int], dict[str, Callable]]] = [
        ("layer_norm", shape, impls) for shape, impls in layernorm_cases(shapes)
    ]
    cases.append(("add_layer_norm", shapes[0], add_layer_norm_impls()))
    for dtype in (torch.float32, torch.bfloat16):
        es = torch.finfo(dtype).bits // 8
        for op, (n, m), impls in cases:
            acts = [torch.randn(n, m).to(dtype) for _ in range(2 if op == "add_layer_norm" else 1)]
            w, b = torch.randn(m), torch.randn(m)
            grads = tuple(torch.randn(n, m).to(dtype) for _ in acts)
            leaves = tuple(t.clone().requires_grad_() for t in (*acts, w, b))
            passes = (
                {"fwd": 4, "fwd+bwd": 8} if op == "add_layer_norm" else {"fwd": 2, "fwd+bwd": 5}
            )
            for pas, k in passes.items():
                nbytes = k * n * m * es
                if pas == "fwd":
                    fns = {key: (lambda fn=fn: fn(*acts, w, b)) for key, fn in impls.items()}
                else:
                    dy = grads if len(grads) > 1 else grads[0]
                    fns = {key: (lambda fn=fn: _grads(fn, leaves, dy)) for key, fn in impls.items()}
                with torch.set_grad_enabled(pas != "fwd"):
                    cmp = interleaved(fns, rounds=ctx.rounds_or(MEMORY_ROUNDS), max_s=MEMORY_MAX_S)
                rep.add_comparison(
                    [op, str(dtype).removeprefix("torch."), f"{n}x{m}", pas],
                    cmp,
                    work=nbytes,
                    ceiling=copy,
                    baselines=baselines,
                )
    return rep


# ----------------------------------------------------------------------------- rms_norm
def rms_norm_cases(
    shapes: list[tuple[int, int]],
) -> Iterator[tuple[tuple[int, int], dict[str, Callable]]]:
    """(shape, callables) for RMSNorm: fastattn cpu, F.rms_norm eager and compiled."""
    compiled = _compiled(lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6))
    for n, m in shapes:
        impls = {
            "fastattn": lambda x, w: fastattn.rms_norm(x, (x.shape[-1],), w, 1e-6),
            "torch eager": lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6),
            "torch.compile": compiled,
        }
        yield (n, m), impls


def suite_rms_norm(ctx: Context) -> Report:
    shapes = [(8192, 768), (32768, 1024)] if not ctx.quick else [(2048, 768)]
    baselines = ["torch eager", "torch.compile"]
    copy = ctx.ceilings.memory()
    rep = Report(
        "RMSNorm (float32, CPU)",
        comparison_columns(["shape", "pass"], "GB/s", "copy BW", baselines),
        ceilings=ctx.ceilings,
        notes=[
            "Bytes counted: forward reads x and writes y (2 N M 4); forward+backward adds reading "
            "dy and x and writing dx (5 N M 4 in all). The weight and rstd are negligible.",
            "torch eager = F.rms_norm (ATen's fused CPU kernel); torch.compile = Inductor on it.",
            fresh_output_note("Outputs (y; dx, dw in fwd+bwd)"),
            cache_note(),
        ],
    )
    for (n, m), impls in rms_norm_cases(shapes):
        x, w, dy = torch.randn(n, m), torch.randn(m), torch.randn(n, m)
        xg, wg = (t.clone().requires_grad_() for t in (x, w))
        for pas, nbytes in (("fwd", 2 * n * m * 4), ("fwd+bwd", 5 * n * m * 4)):
            if pas == "fwd":
                fns = {k: (lambda fn=fn: fn(x, w)) for k, fn in impls.items()}
            else:
                fns = {k: (lambda fn=fn: _grads(fn, (xg, wg), dy)) for k, fn in impls.items()}
            with torch.set_grad_enabled(pas != "fwd"):
                cmp = interleaved(fns, rounds=ctx.rounds_or(MEMORY_ROUNDS), max_s=MEMORY_MAX_S)
            rep.add_comparison(
                [f"{n}x{m}", pas], cmp, work=nbytes, ceiling=copy, baselines=baselines
            )
    return rep


# ----------------------------------------------------------------------------- rotary
def rotary_impls() -> dict[str, Callable]:
    """fastattn.rotary, transformers' formula (``x * cos + rotate_half(x) * sin``: what
    ``apply_rotary_pos_emb`` runs) eager, and torch.compile of that formula."""
    from fastattn.ops.rotary import rotary_reference

    return {
        "fastattn": fastattn.rotary,
        "torch eager": rotary_reference,
        "torch.compile": _compiled(rotary_reference),
    }


def rotary_inputs(b: int, h: int, t: int, d: int, x_dtype, cos_dtype):
    """q as transformers makes it (the transpose of a [B, T, H, D] projection output) and the
    cos / sin of its rotary embedding ([B, T, D], cat(freqs, freqs))."""
    x = torch.randn(b, t, h, d).to(x_dtype).transpose(1, 2)
    ang = torch.randn(b, t, d // 2)
    ang = torch.cat((ang, ang), -1)
    return x, ang.cos().to(cos_dtype), ang.sin().to(cos_dtype)


def suite_rotary(ctx: Context) -> Report:
    shapes = [(8, 6, 256, 64), (2, 32, 1024, 128)] if not ctx.quick else [(2, 4, 64, 64)]
    dtypes = [
        ("fp32", torch.float32, torch.float32),
        ("bf16 q, fp32 cos (autocast)", torch.bfloat16, torch.float32),
        ("bf16", torch.bfloat16, torch.bfloat16),
    ]
    baselines = ["torch eager", "torch.compile"]
    copy = ctx.ceilings.memory()
    rep = Report(
        "Rotary embedding (transformers' apply_rotary_pos_emb on one tensor, CPU)",
        comparison_columns(["B,H,T,D", "dtypes", "pass"], "GB/s", "copy BW", baselines),
        ceilings=ctx.ceilings,
        notes=[
            "x is q as transformers makes it: the transpose of a [B, T, H, D] projection output; "
            "cos / sin are [B, T, D]. The output dtype is promote(x, cos), as the formula's.",
            "Bytes counted: forward reads x and cos / sin and writes y; forward+backward adds "
            "reading dy and cos / sin and writing dx.",
            "torch eager = transformers' formula in torch ops; torch.compile = Inductor on it.",
            fresh_output_note("Outputs (y; dx in fwd+bwd)"),
            cache_note(),
        ],
    )
    impls = rotary_impls()
    for b, h, t, d in shapes:
        for label, xd, cd in dtypes:
            x, cos, sin = rotary_inputs(b, h, t, d, xd, cd)
            od = torch.promote_types(xd, cd)
            xb, ob, cb = (torch.finfo(dt).bits // 8 for dt in (xd, od, cd))
            n, nc = x.numel(), cos.numel()
            fwd_bytes = n * (xb + ob) + 2 * nc * cb
            xg = x.detach().clone().requires_grad_()
            dy = torch.randn(x.shape).to(od)
            for pas, nbytes in (("fwd", fwd_bytes), ("fwd+bwd", 2 * fwd_bytes)):
                if pas == "fwd":
                    fns = {k: (lambda fn=fn: fn(x, cos, sin)) for k, fn in impls.items()}
                else:
                    fns = {
                        k: (lambda fn=fn: torch.autograd.grad(fn(xg, cos, sin), xg, dy))
                        for k, fn in impls.items()
                    }
                with torch.set_grad_enabled(pas != "fwd"):
                    cmp = interleaved(fns, rounds=ctx.rounds_or(MEMORY_ROUNDS), max_s=MEMORY_MAX_S)
                rep.add_comparison(
                    [f"{b},{h},{t},{d}", label, pas],
                    cmp,
                    work=nbytes,
                    ceiling=copy,
                    baselines=baselines,
                )
    return rep


# ----------------------------------------------------------------------------- attention
def attention_impls() -> dict[str, Callable]:
    """fastattn, PyTorch's fused SDPA (its CPU flash path), the reference eager and compiled."""
    from fastattn.ops.attention import attention_reference

    def ref(q, k, v):
        return attention_reference(q, k, v, causal=True)

    return {
        "fastattn": lambda q, k, v: fastattn.attention(q, k, v, causal=True),
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "reference eager": ref,
        "reference compiled": _compiled(ref),
    }


def suite_attention(ctx: Context) -> Report:
    B, H, D = 4, 12, 64
    lens = [128, 256] if ctx.quick else [128, 256, 512, 1024, 2048, 4096]
    baselines = ["sdpa"]
    peak = ctx.ceilings.compute(torch.float32)
    rep = Report(
        "Attention (float32, causal, B=4, H=12, D=64, CPU)",
        comparison_columns(["T", "pass"], "GFLOP/s", "fp32 FMA peak", baselines),
        ceilings=ctx.ceilings,
        notes=[
            "FLOPs: forward 4 B H T^2 D / 2 (causal counts half), backward 2.5 x forward; the "
            "exp and the softmax bookkeeping are not counted, so the fraction of the FMA peak "
            "understates the work done.",
            "sdpa = F.scaled_dot_product_attention(is_causal=True), PyTorch's fused CPU kernel; "
            "reference = fastattn.ops.attention.attention_reference (materialises T x T), eager "
            "and under torch.compile (Inductor); the reference is skipped above T=2048.",
        ],
    )
    impls = attention_impls()
    speedups: dict[str, list[tuple[int, float]]] = {"fwd": [], "fwd+bwd": []}
    for T in lens:
        q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
        dout = torch.randn(B, H, T, D)
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        chosen = {
            name: fn
            for name, fn in impls.items()
            if not (name.startswith("reference") and T > 2048)
        }
        for pas, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            flops = 4 * B * H * T * T * D / 2 * mult
            if pas == "fwd":
                fns = {n: (lambda fn=fn: fn(q, k, v)) for n, fn in chosen.items()}
            else:
                fns = {
                    n: (lambda fn=fn: _grads(fn, (qg, kg, vg), dout)) for n, fn in chosen.items()
                }
            with torch.set_grad_enabled(pas != "fwd"):
                cmp = interleaved(fns, rounds=ctx.rounds_or(9), min_rounds=3, max_s=60.0)
            rep.add_comparison([T, pas], cmp, work=flops, ceiling=peak, baselines=baselines)
            speedups[pas].append((T, cmp.ratio("sdpa", "fastattn").median))
    rep.plot = _plot_speedups(speedups, "attention speed-up over SDPA (float32, causal, CPU)")
    return rep


def _env_flag(name: str, value: str, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with the environment variable ``name`` set to ``value`` (restored after)."""

    def run():
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old

    return run


def suite_attention_bf16(ctx: Context) -> Report:
    """bfloat16 attention on the CPU: the AVX512_BF16 dot-product path against the fp32 FMA
    path it replaced (FASTATTN_CPU_BF16_DOT=0), PyTorch's bf16 SDPA and fastattn in float32;
    at the float32 suite's shape (B=4, H=12, D=64, T 512..2048) and the demo GPT's (B=8, H=6,
    T=256)."""
    shapes = [(4, 12, 512)] if ctx.quick else [(4, 12, 512), (4, 12, 1024), (4, 12, 2048)]
    if not ctx.quick:
        shapes.append((8, 6, 256))  # the demo GPT's attention at its training length
    D = 64
    baselines = ["sdpa bf16", "fastattn bf16-fma"]
    peak = ctx.ceilings.compute(torch.bfloat16)
    fma = ctx.ceilings.compute(torch.float32)
    fp32_rates: list[str] = []
    load0 = os.getloadavg()
    rep = Report(
        "Attention bfloat16 (causal, D=64, CPU)",
        comparison_columns(["B", "H", "T", "pass"], "GFLOP/s", "bf16 dot peak", baselines),
        ceilings=ctx.ceilings,
        notes=[
            "FLOPs: forward 4 B H T^2 D / 2 (causal counts half), backward 2.5 x forward.",
            "fastattn bf16-dot: the C++ kernel's AVX512_BF16 (vdpbf16ps) path, the default where "
            "the CPU has it; fastattn bf16-fma: the same kernel's fp32 FMA path "
            "(FASTATTN_CPU_BF16_DOT=0, bf16 widened to fp32), the path before; sdpa bf16: "
            "F.scaled_dot_product_attention(is_causal=True) on bf16; fastattn fp32: float32 "
            "inputs (its fraction is of the bf16 peak too).",
        ],
    )
    fa = lambda q, k, v: fastattn.attention(q, k, v, causal=True)  # noqa: E731
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    speedups: dict[str, list[tuple[int, float]]] = {}
    for B, H, T in shapes:
        x32 = [torch.randn(B, H, T, D) for _ in range(3)]
        x16 = [t.to(torch.bfloat16) for t in x32]
        d32 = torch.randn(B, H, T, D)
        d16 = d32.to(torch.bfloat16)
        g32 = [t.clone().requires_grad_() for t in x32]
        g16 = [t.clone().requires_grad_() for t in x16]
        impls = {  # name: (function, input bits)
            "fastattn bf16-dot": (fa, 16),
            "fastattn bf16-fma": (fa, 16),
            "sdpa bf16": (sdpa, 16),
            "fastattn fp32": (fa, 32),
        }
        for pas, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            flops = 4 * B * H * T * T * D / 2 * mult
            fns = {}
            for name, (fn, bits) in impls.items():
                if pas == "fwd":
                    x = x16 if bits == 16 else x32
                    call = lambda fn=fn, x=x: fn(*x)  # noqa: E731
                else:
                    x, d = (g16, d16) if bits == 16 else (g32, d32)
                    call = lambda fn=fn, x=x, d=d: _grads(fn, tuple(x), d)  # noqa: E731
                flag = "0" if name == "fastattn bf16-fma" else "1"
                fns[name] = _env_flag("FASTATTN_CPU_BF16_DOT", flag, call)
            with torch.set_grad_enabled(pas != "fwd"):
                cmp = interleaved(fns, rounds=ctx.rounds_or(9), min_rounds=7, max_s=90.0)
            rep.add_comparison([B, H, T, pas], cmp, work=flops, ceiling=peak, baselines=baselines)
            rate32 = flops / cmp.time("fastattn fp32").median / 1e9
            frac32 = _ceilings.fraction(rate32, fma)
            faults32 = cmp.faults_per_call("fastattn fp32")
            fp32_rates.append(
                f"B={B} H={H} T={T} {pas} {rate32:.0f} GFLOP/s = "
                + ("n/a" if frac32 is None else f"{frac32:.3f}")
                + f" ({'n/a' if faults32 is None else f'{faults32:.0f}'} faults/call)"
            )
            if (B, H) == (4, 12):
                speedups.setdefault(f"{pas} vs sdpa bf16", []).append(
                    (T, cmp.ratio("sdpa bf16", "fastattn bf16-dot").median)
                )
    load1 = os.getloadavg()
    rep.notes.append(
        "fastattn fp32 as a fraction of this run's fp32 FMA peak (the column gives the bf16 "
        "peak): " + "; ".join(fp32_rates) + "."
    )
    rep.notes.append(
        f"Load average (1, 5, 15 min) at the start {load0[0]:.1f}, {load0[1]:.1f}, {load0[2]:.1f}"
        f" and at the end {load1[0]:.1f}, {load1[1]:.1f}, {load1[2]:.1f} on {os.cpu_count()} "
        "cores (this run's own threads count in it; whether other processes shared the cores "
        "is judged from the peak loops, in the ceilings table)."
    )
    rep.plot = _plot_speedups(speedups, "bf16 attention speed-up over SDPA (B4 H12 D64, CPU)")
    return rep


def _plot_speedups(series: dict[str, list[tuple[int, float]]], title: str):
    def draw(path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for label, pts in series.items():
            ax.plot([t for t, _ in pts], [s for _, s in pts], marker="o", label=label)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("speed-up (x)")
        ax.set_title(title, fontsize=10)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    return draw


# ----------------------------------------------------------------------------- gelu
def suite_gelu(ctx: Context) -> Report:
    from fastattn.nn import FeedForward

    n, m = (8192, 3072) if not ctx.quick else (2048, 768)
    baselines = ["torch eager", "torch.compile"]
    copy, peak = ctx.ceilings.memory(), ctx.ceilings.compute(torch.float32)
    rep = Report(
        "bias+GELU and the GELU feed-forward block (float32, CPU)",
        comparison_columns(["case", "pass"], "GB/s or GFLOP/s", "its ceiling", baselines),
        ceilings=ctx.ceilings,
        notes=[
            "bias_gelu is memory-bound: its GB/s is a fraction of the copy bandwidth. Bytes: "
            "forward reads x, writes y (2 N M 4); forward+backward adds reading dy and x and "
            "writing dx (5 N M 4).",
            "FeedForward is compute-bound: its GFLOP/s is a fraction of the fp32 FMA peak "
            "(torch's own GEMM rates at similar shapes are the context rows of the ceilings "
            "table). FLOPs: 6 x 2 x tokens x d x 4d (three matmuls per linear, two linears), "
            "compared with torch.nn.Sequential(Linear, GELU, Linear) eager and compiled.",
            fresh_output_note("bias_gelu outputs (y; dx, db in fwd+bwd)"),
            cache_note(),
        ],
    )
    x, b, dy = torch.randn(n, m), torch.randn(m), torch.randn(n, m)
    xg, bg = x.clone().requires_grad_(), b.clone().requires_grad_()
    for approx in ("none", "tanh"):
        eager = lambda x, b, a=approx: F.gelu(x + b, approximate=a)
        impls = {
            "fastattn": lambda x, b, a=approx: fastattn.bias_gelu(x, b, approximate=a),
            "torch eager": eager,
            "torch.compile": _compiled(eager),
        }
        for pas, nbytes in (("fwd", 2 * n * m * 4), ("fwd+bwd", 5 * n * m * 4)):
            if pas == "fwd":
                fns = {k: (lambda fn=fn: fn(x, b)) for k, fn in impls.items()}
            else:
                fns = {k: (lambda fn=fn: _grads(fn, (xg, bg), dy)) for k, fn in impls.items()}
            with torch.set_grad_enabled(pas != "fwd"):
                cmp = interleaved(fns, rounds=ctx.rounds_or(MEMORY_ROUNDS), max_s=MEMORY_MAX_S)
            rep.add_comparison(
                [f"bias_gelu {n}x{m} {approx}", pas],
                cmp,
                work=nbytes,
                ceiling=copy,
                baselines=baselines,
            )
    tokens, d = (8192, 768) if not ctx.quick else (512, 256)
    xt, dyt = torch.randn(tokens, d), torch.randn(tokens, d)
    flops = 6 * 2 * tokens * d * 4 * d
    for approx in ("none", "tanh"):
        ours = FeedForward(d, 4 * d, approximate=approx)
        seq = torch.nn.Sequential(ours.fc1, torch.nn.GELU(approximate=approx), ours.fc2)
        xtg = xt.clone().requires_grad_()
        fns = {}
        for name, mod in {
            "fastattn": ours,
            "torch eager": seq,
            "torch.compile": _compiled(seq),
        }.items():
            params = (xtg, *mod.parameters())
            fns[name] = lambda mod=mod, params=params: torch.autograd.grad(mod(xtg), params, dyt)
        cmp = interleaved(fns, rounds=ctx.rounds_or(11), max_s=60.0)
        rep.add_comparison(
            [f"FeedForward {tokens}x{d}->{4 * d} {approx}", "fwd+bwd"],
            cmp,
            work=flops,
            ceiling=peak,
            baselines=baselines,
        )
    return rep


# ----------------------------------------------------------------------------- gated_act
def suite_gated(ctx: Context) -> Report:
    from fastattn.nn import GatedFeedForward

    n, m = (8192, 2752) if not ctx.quick else (2048, 688)
    baselines = ["torch eager", "torch.compile"]
    copy, peak = ctx.ceilings.memory(), ctx.ceilings.compute(torch.float32)
    rep = Report(
        "Gated activations (SwiGLU / GeGLU) and the gated feed-forward block (float32, CPU)",
        comparison_columns(["case", "pass"], "GB/s or GFLOP/s", "its ceiling", baselines),
        ceilings=ctx.ceilings,
        notes=[
            "swiglu / geglu are memory-bound: GB/s is a fraction of the copy bandwidth. Bytes: "
            "forward reads gate and up, writes h (3 N H 4); forward+backward adds reading dh, "
            "gate and up and writing dgate and dup (8 N H 4 in all). gate and up are the halves "
            "of one [N, 2H] tensor (a fused projection's output), read in place.",
            "torch eager = F.silu(gate) * up (F.gelu(gate, approximate='tanh') * up); "
            "torch.compile = Inductor on the same expression.",
            "GatedFeedForward is compute-bound: FLOPs 3 x 2 x tokens x d x h x 3 (three "
            "projections, three matmuls each), vs the Hugging Face formula "
            "down(act(gate(x)) * up(x)) on the same nn.Linear modules, eager and compiled.",
            fresh_output_note("activation outputs (h; dgate, dup in fwd+bwd)"),
            cache_note(),
        ],
    )
    gu, dh = torch.randn(n, 2 * m), torch.randn(n, m)
    gug = gu.clone().requires_grad_()
    for act in ("silu", "gelu_tanh"):
        if act == "silu":
            eager = lambda t: F.silu(t[:, :m]) * t[:, m:]  # noqa: E731
            ours = lambda t: fastattn.swiglu(t[:, :m], t[:, m:])  # noqa: E731
        else:
            eager = lambda t: F.gelu(t[:, :m], approximate="tanh") * t[:, m:]  # noqa: E731
            ours = lambda t: fastattn.geglu(t[:, :m], t[:, m:], approximate="tanh")  # noqa: E731
        impls = {"fastattn": ours, "torch eager": eager, "torch.compile": _compiled(eager)}
        for pas, nbytes in (("fwd", 3 * n * m * 4), ("fwd+bwd", 8 * n * m * 4)):
            if pas == "fwd":
                fns = {k: (lambda fn=fn: fn(gu)) for k, fn in impls.items()}
            else:
                fns = {k: (lambda fn=fn: _grads(fn, (gug,), dh)) for k, fn in impls.items()}
            with torch.set_grad_enabled(pas != "fwd"):
                cmp = interleaved(fns, rounds=ctx.rounds_or(MEMORY_ROUNDS), max_s=MEMORY_MAX_S)
            rep.add_comparison(
                [f"{act} {n}x{m}", pas], cmp, work=nbytes, ceiling=copy, baselines=baselines
            )
    tokens, d, h = (4096, 1024, 2752) if not ctx.quick else (512, 256, 688)
    xt, dyt = torch.randn(tokens, d), torch.randn(tokens, d)
    flops = 3 * 2 * tokens * d * h * 3
    ours = GatedFeedForward(d, h)

    def hf_style(x):
        return ours.down_proj(F.silu(ours.gate_proj(x)) * ours.up_proj(x))

    xtg = xt.clone().requires_grad_()
    params = (xtg, *ours.parameters())
    fns = {
        name: (lambda fn=fn: torch.autograd.grad(fn(xtg), params, dyt))
        for name, fn in {
            "fastattn": ours,
            "torch eager": hf_style,
            "torch.compile": _compiled(hf_style),
        }.items()
    }
    cmp = interleaved(fns, rounds=ctx.rounds_or(11), max_s=60.0)
    rep.add_comparison(
        [f"GatedFeedForward {tokens}x{d}->{h} silu", "fwd+bwd"],
        cmp,
        work=flops,
        ceiling=peak,
        baselines=baselines,
    )
    return rep


# ----------------------------------------------------------------------------- patch
def patch_models(quick: bool):
    """(label, model factory, input factory): a torch TransformerEncoder and a Hugging Face GPT-2
    built from a small random config (nothing downloaded)."""
    B, T = (4, 128) if quick else (8, 256)

    def encoder():
        layer = torch.nn.TransformerEncoderLayer(
            384, 6, 1536, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        return torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)

    models = [("TransformerEncoder 4x384, 6 heads", encoder, lambda: (torch.randn(B, T, 384),))]
    try:
        import transformers

        def gpt2():
            cfg = transformers.GPT2Config(
                n_layer=4,
                n_head=6,
                n_embd=384,
                vocab_size=1024,
                n_positions=T,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
            )
            return transformers.GPT2LMHeadModel(cfg)

        models.append(("HF GPT-2 4x384, 6 heads", gpt2, lambda: (torch.randint(0, 1024, (B, T)),)))

        def llama(t: int = T):  # GQA, RMSNorm, SwiGLU: the Llama / Mistral / Qwen2 family's layers
            cfg = transformers.LlamaConfig(
                num_hidden_layers=4,
                hidden_size=384,
                num_attention_heads=6,
                num_key_value_heads=2,
                intermediate_size=1024,
                vocab_size=1024,
                max_position_embeddings=t,
            )
            return transformers.LlamaForCausalLM(cfg)

        models.append(
            (
                "HF Llama 4x384, 6 q / 2 kv heads, SwiGLU 1024",
                llama,
                lambda: (torch.randint(0, 1024, (B, T)),),
            )  # fmt: skip
        )
        if not quick:  # the same tokens per step as one long-context batch: attention weighs more
            long_b, long_t = B * T // 1024, 1024
            models.append(
                (
                    f"HF Llama 4x384 as above, B={long_b}, T={long_t}",
                    lambda: llama(long_t),
                    lambda: (torch.randint(0, 1024, (long_b, long_t)),),
                )  # fmt: skip
            )
    except ImportError:
        pass
    return B, T, models


def suite_patch(ctx: Context) -> Report:
    import copy

    B, T, models = patch_models(ctx.quick)
    baselines = ["original eager", "original compiled"]
    rep = Report(
        f"fastattn.patch(model): forward+backward, float32 and bf16 autocast, B={B}, T={T} unless the model says otherwise, CPU",
        comparison_columns(["model", "dtype"], None, None, baselines),
        ceilings=ctx.ceilings,
        notes=[
            "original = the model as built; patched = fastattn.patch(copy); compiled = "
            "torch.compile (Inductor) of each; training mode, dropout 0. Whole models mix "
            "compute- and memory-bound work, so no fraction of a ceiling is given."
        ],
    )
    budget_rows = []
    for label, make, inputs in models:
        torch.manual_seed(0)
        original = make().train()
        shapes = None  # the projections' GEMM shapes, the same in both dtypes
        patched = copy.deepcopy(original)
        fastattn.patch(patched)
        args = inputs()
        variants = {
            "original eager": original,
            "patched eager": patched,
            "original compiled": _compiled(original),
            "patched compiled": _compiled(patched),
        }
        for tag, ac in (
            ("fp32", contextlib.nullcontext),
            ("bf16", lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
        ):
            fns = {}
            for name, model in variants.items():

                def step(model=model, ac=ac):
                    with ac():
                        out = model(*args)
                        out = getattr(out, "logits", out)
                    return torch.autograd.grad(
                        out.float().mean(), list(model.parameters()), allow_unused=True
                    )

                fns[name] = step
            cmp = interleaved(fns, rounds=ctx.rounds_or(11), max_s=90.0)
            rep.add_comparison([label, tag], cmp, baselines=baselines)
            dtype = torch.bfloat16 if tag == "bf16" else torch.float32
            shapes = shapes or _projection_shapes(original, args)
            floor = _gemm_floor_ms(shapes, dtype)
            orig, pat = (cmp.time(k).median * 1e3 for k in ("original eager", "patched eager"))
            budget_rows.append([label, tag, orig, pat, floor, orig / floor, pat / floor])
    rep.sections.append(
        (
            "GEMM floor: the model's projections (Linear, HF Conv1D, MultiheadAttention's in / "
            "out projections; forward, dx and dW products) at the best "
            "rate torch's GEMMs (MKL or oneDNN) reach at each shape, measured in this run. "
            "original / floor bounds the speed-up of any change that leaves the Linears' "
            "FLOPs as they are (everything else free).",
            [
                "model",
                "dtype",
                "original eager ms",
                "patched eager ms",
                "GEMM floor ms",
                "original / floor",
                "patched / floor",
            ],
            budget_rows,
        )
    )
    return rep


def _projection_shapes(model: torch.nn.Module, args: tuple) -> list[tuple[int, int, int]]:
    """(M, K, N) of every projection GEMM one forward runs: every ``nn.Linear`` (subclasses
    too), Hugging Face's ``Conv1D`` (GPT-2's projections, weight ``[in, out]``) and
    ``nn.MultiheadAttention``'s packed input and output projections (it reads their weights
    without calling the modules)."""
    shapes: list[tuple[int, int, int]] = []

    def rows(x: torch.Tensor) -> int:
        return x.numel() // x.shape[-1]

    def hook(mod, inputs, _out):
        x = inputs[0]
        if isinstance(mod, torch.nn.MultiheadAttention):
            e = mod.embed_dim
            shapes.extend([(rows(x), e, 3 * e), (rows(x), e, e)])
        elif isinstance(mod, torch.nn.Linear):
            shapes.append((rows(x), mod.in_features, mod.out_features))
        else:  # Conv1D
            shapes.append((rows(x), mod.weight.shape[0], mod.weight.shape[1]))

    mods = [
        m
        for m in model.modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.MultiheadAttention))
        or type(m).__name__ == "Conv1D"
    ]
    mha_parts = {id(m.out_proj) for m in mods if isinstance(m, torch.nn.MultiheadAttention)}
    hooks = [m.register_forward_hook(hook) for m in mods if id(m) not in mha_parts]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _gemm_floor_ms(shapes: list[tuple[int, int, int]], dtype: torch.dtype) -> float:
    """Milliseconds of these GEMMs forward + backward (forward, dx, dW products) at the best
    rate measured per shape in ``dtype``."""
    from benchmarks.training import gemm_rate

    rates = {s: gemm_rate(*s, dtype) for s in set(shapes)}
    return sum(3 * 2 * m * k * n / rates[(m, k, n)] / 1e9 for m, k, n in shapes) * 1e3


# ----------------------------------------------------------------------------- overhead
def suite_overhead(ctx: Context) -> Report:
    """What a call costs besides its kernel: each op on a tiny tensor (the kernel's own work is
    a few hundred FLOPs), 1000 calls per timing, so ms per timing = microseconds per call."""
    from fastattn.nn import Linear

    calls = 1000
    baselines = ["torch"]
    rep = Report(
        "Per-call overhead: fastattn vs torch on tiny tensors (float32, CPU, 1 thread)",
        comparison_columns(["op", "pass"], None, None, baselines),
        ceilings=ctx.ceilings,
        notes=[
            f"ms (median) is the time of {calls} calls: microseconds per call. Tensors: x [4, 8] "
            "(attention q/k/v [1, 1, 4, 8], causal). fwd runs without autograd; fwd+bwd calls "
            "backward on the sum. What it measures is the Python validation, dispatch, "
            "autograd bookkeeping and the C++ op's own fixed cost (checks, allocations).",
        ],
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, r, w, b = torch.randn(4, 8), torch.randn(4, 8), torch.randn(8), torch.randn(8)
        q = torch.randn(1, 1, 4, 8)
        ours_lin, torch_lin = Linear(8, 8), torch.nn.Linear(8, 8)
        cases = {
            "layer_norm": (
                lambda t: fastattn.layer_norm(t, (8,), w, b),
                lambda t: F.layer_norm(t, (8,), w, b),
                x,
            ),
            "add_layer_norm": (
                lambda t: fastattn.add_layer_norm(t, r, (8,), w, b)[0],
                lambda t: F.layer_norm(t + r, (8,), w, b),
                x,
            ),
            "bias_gelu": (lambda t: fastattn.bias_gelu(t, b), lambda t: F.gelu(t + b), x),
            "attention": (
                lambda t: fastattn.attention(t, t, t, causal=True),
                lambda t: F.scaled_dot_product_attention(t, t, t, is_causal=True),
                q,
            ),
            "Linear": (ours_lin, torch_lin, x),
        }
        for op, (ours, theirs, t) in cases.items():
            tg = t.clone().requires_grad_()
            for pas in ("fwd", "fwd+bwd"):

                def loop(fn, pas=pas, t=t, tg=tg):
                    if pas == "fwd":
                        with torch.no_grad():
                            for _ in range(calls):
                                fn(t)
                    else:
                        for _ in range(calls):
                            fn(tg).sum().backward()

                fns = {"fastattn": lambda: loop(ours), "torch": lambda: loop(theirs)}
                cmp = interleaved(fns, rounds=ctx.rounds_or(11), max_s=30.0)
                rep.add_comparison([op, pas], cmp, baselines=baselines)
    finally:
        torch.set_num_threads(threads)
    return rep


@dataclass(frozen=True)
class Suite:
    run: Callable[[Context], Report]
    about: str


# The table of suites: add a row to add one (a function Context -> Report, usually built from
# the same cases as its bench_<name>.py pytest-benchmark file). Run in this order by "all".
SUITES: dict[str, Suite] = {
    "layernorm": Suite(suite_layernorm, "LayerNorm fwd, fwd+bwd vs F.layer_norm (memory-bound)"),
    "rms_norm": Suite(suite_rms_norm, "RMSNorm fwd, fwd+bwd vs F.rms_norm (memory-bound)"),
    "rotary": Suite(suite_rotary, "rotary embedding fwd, fwd+bwd vs transformers' formula"),
    "attention": Suite(suite_attention, "causal attention fwd, fwd+bwd vs SDPA (compute-bound)"),
    "attention_bf16": Suite(
        suite_attention_bf16, "bf16 causal attention: AVX512_BF16 path vs fp32 path vs SDPA"
    ),
    "gelu": Suite(suite_gelu, "bias_gelu (memory-bound) and FeedForward (compute-bound)"),
    "gated": Suite(suite_gated, "swiglu / geglu (memory-bound), GatedFeedForward (compute-bound)"),
    "patch": Suite(suite_patch, "fastattn.patch on whole models, fwd+bwd"),
    "training": Suite(suite_training, "the demo GPT's training step and its budget"),
    "overhead": Suite(suite_overhead, "per-call cost besides the kernel, tiny tensors"),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        epilog="suites: " + "; ".join(f"{k}: {v.about}" for k, v in SUITES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "suite",
        nargs="?",
        default="all",
        choices=["ceilings", *SUITES, "all"],
        help="ceilings alone, one suite, or all suites (default)",
    )
    p.add_argument("--quick", action="store_true", help="small shapes, short ceilings: smoke run")
    p.add_argument(
        "--rounds", type=int, default=None, help="rounds per comparison (default: per suite)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: torch's default, all cores)",
    )
    p.add_argument("--no-save", action="store_true", help="print only; do not write results/")
    p.add_argument(
        "--steady-allocator",
        action="store_true",
        help="run with glibc malloc keeping freed blocks mapped (GLIBC_TUNABLES, the process "
        "restarts itself with it): fresh outputs then take no first-touch page faults, as in "
        "a training loop's steady state; results are saved as SUITE-steady-STAMP",
    )
    args = p.parse_args(argv)
    if args.steady_allocator and not steady_allocator():
        # glibc reads its tunables at start-up only: start again with them set.
        env = dict(os.environ)
        env["GLIBC_TUNABLES"] = ":".join(
            t for t in (env.get("GLIBC_TUNABLES", ""), STEADY_TUNABLES) if t
        )
        cmd = [sys.executable, "-m", "benchmarks.run", *(sys.argv[1:] if argv is None else argv)]
        os.execve(sys.executable, cmd, env)
    if args.threads:
        torch.set_num_threads(args.threads)
    m = machine()
    print(
        f"{m['cpu']}; flags: {' '.join(m['flags'])}; {m['threads']} torch threads; "
        f"THP_MEM_ALLOC_ENABLE={m['THP_MEM_ALLOC_ENABLE']}; "
        f"steady allocator: {'yes' if m['steady_allocator'] else 'no'}",
        flush=True,
    )
    print("measuring ceilings ...", flush=True)
    ceilings = _ceilings.measure(quick=args.quick)
    print(ceilings.markdown(), flush=True)
    if args.suite == "ceilings":
        return 0
    ctx = Context(quick=args.quick, ceilings=ceilings, rounds=args.rounds)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M")
    for name in SUITES if args.suite == "all" else [args.suite]:
        print(f"== {name}", flush=True)
        rep = SUITES[name].run(ctx)
        if not args.no_save:
            base = f"{name}-steady-{stamp}" if steady_allocator() else f"{name}-{stamp}"
            print(f"saved {rep.save(base)}")
            if rep.plot is not None:
                path = RESULTS / f"{base}.png"
                rep.plot(path)
                print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
