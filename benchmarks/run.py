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
from benchmarks.common import RESULTS, Report, copy_gbps, matmul_gflops, median_time


def _compiled(fn):
    # Inductor on CPU; compile time is excluded by the warm-up calls of median_time. Each shape
    # and grad mode is its own static graph: raise dynamo's recompile limit so a sweep never
    # silently falls back to eager.
    torch._dynamo.config.recompile_limit = 64
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


# ----------------------------------------------------------------------------- attention
def attention_impls():
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


def suite_attention(quick: bool) -> Report:
    B, H, D = 4, 12, 64
    lens = [512, 1024] if quick else [128, 256, 512, 1024, 2048, 4096]
    ceiling = matmul_gflops()
    rep = Report(
        "Attention (float32, causal, B=4, H=12, D=64, CPU)",
        ["T", "pass", "impl", "ms", "GFLOP/s", "of matmul", "speed-up vs sdpa"],
        ceilings={"fp32 matmul GFLOP/s": ceiling},
        notes=[
            "FLOPs: forward 4 B H T^2 D / 2 (causal counts half), backward 2.5 x forward.",
            "sdpa = F.scaled_dot_product_attention(is_causal=True), PyTorch's fused CPU kernel; "
            "reference = fastattn.ops.attention.attention_reference (materialises T x T), eager "
            "and under torch.compile (Inductor); the reference is skipped above T=2048.",
        ],
    )
    print(f"fp32 matmul: {ceiling:.0f} GFLOP/s")
    impls = attention_impls()
    speedups: dict[str, list[tuple[int, float]]] = {"fwd": [], "fwd+bwd": []}
    for T in lens:
        q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
        dout = torch.randn(B, H, T, D)
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        for pas, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            flops = 4 * B * H * T * T * D / 2 * mult
            times = {}
            for name, fn in impls.items():
                if name.startswith("reference") and T > 2048:
                    continue
                if pas == "fwd":
                    with torch.no_grad():
                        times[name] = median_time(lambda fn=fn: fn(q, k, v), reps=7)
                else:

                    def step(fn=fn):
                        qg.grad = kg.grad = vg.grad = None
                        fn(qg, kg, vg).backward(dout)

                    times[name] = median_time(step, reps=7)
            for name, t in times.items():
                rate = flops / t / 1e9
                rep.add(T, pas, name, t * 1e3, rate, rate / ceiling, times["sdpa"] / t)
            speedups[pas].append((T, times["sdpa"] / times["fastattn"]))
    rep.plot = _plot_speedups(speedups, "attention speed-up over SDPA (float32, causal, CPU)")
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
def suite_gelu(quick: bool) -> Report:
    from fastattn.nn import FeedForward

    n, m = 8192, 3072
    gbps = copy_gbps()
    ceiling = matmul_gflops()
    rep = Report(
        "bias+GELU and the GELU feed-forward block (float32, CPU)",
        [
            "case",
            "pass",
            "impl",
            "ms",
            "GB/s or GFLOP/s",
            "of ceiling",
            "speed-up vs eager",
            "vs compile",
        ],
        ceilings={"copy GB/s": gbps, "fp32 matmul GFLOP/s": ceiling},
        notes=[
            "bias_gelu bytes: forward reads x, writes y (2 N M 4); forward+backward adds reading "
            "dy and x and writing dx (5 N M 4). FeedForward FLOPs: 6 x 2 x tokens x d x 4d "
            "(three matmuls per linear, two linears), compared with torch.nn.Sequential("
            "Linear, GELU, Linear) eager and compiled.",
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
            times = {}
            for name, fn in impls.items():
                if pas == "fwd":
                    with torch.no_grad():
                        times[name] = median_time(lambda fn=fn: fn(x, b))
                else:

                    def step(fn=fn):
                        xg.grad = bg.grad = None
                        fn(xg, bg).backward(dy)

                    times[name] = median_time(step)
            for name, t in times.items():
                rate = nbytes / t / 1e9
                rep.add(
                    f"bias_gelu {n}x{m} {approx}",
                    pas,
                    name,
                    t * 1e3,
                    rate,
                    rate / gbps,
                    times["torch eager"] / t,
                    times["torch.compile"] / t,
                )
    tokens, d = (2048, 768) if quick else (8192, 768)
    xt, dyt = torch.randn(tokens, d), torch.randn(tokens, d)
    flops = 6 * 2 * tokens * d * 4 * d
    for approx in ("none", "tanh"):
        ours = FeedForward(d, 4 * d, approximate=approx)
        seq = torch.nn.Sequential(ours.fc1, torch.nn.GELU(approximate=approx), ours.fc2)
        impls = {"fastattn": ours, "torch eager": seq, "torch.compile": _compiled(seq)}
        xtg = xt.clone().requires_grad_()
        times = {}
        for name, mod in impls.items():

            def step(mod=mod):
                xtg.grad = None
                mod(xtg).backward(dyt)

            times[name] = median_time(step, reps=7)
        for name, t in times.items():
            rate = flops / t / 1e9
            rep.add(
                f"FeedForward {tokens}x{d}->{4 * d} {approx}",
                "fwd+bwd",
                name,
                t * 1e3,
                rate,
                rate / ceiling,
                times["torch eager"] / t,
                times["torch.compile"] / t,
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
    except ImportError:
        pass
    return B, T, models


def suite_patch(quick: bool) -> Report:
    import copy

    B, T, models = patch_models(quick)
    rep = Report(
        f"fastattn.patch(model): forward+backward, float32, B={B}, T={T}, CPU",
        ["model", "variant", "ms", "speed-up vs original eager", "vs original compiled"],
        notes=[
            "original = the model as built; patched = fastattn.patch(copy); compiled = "
            "torch.compile (Inductor) of each; training mode, dropout 0."
        ],
    )
    for label, make, inputs in models:
        torch.manual_seed(0)
        original = make().train()
        patched = copy.deepcopy(original)
        fastattn.patch(patched)
        args = inputs()
        variants = {
            "original eager": original,
            "patched eager": patched,
            "original compiled": _compiled(original),
            "patched compiled": _compiled(patched),
        }
        times = {}
        for name, model in variants.items():

            def step(model=model):
                out = model(*args)
                out = getattr(out, "logits", out)
                out.float().mean().backward()

            times[name] = median_time(step, reps=7)
        for name, t in times.items():
            rep.add(
                label, name, t * 1e3, times["original eager"] / t, times["original compiled"] / t
            )
    return rep


SUITES = {
    "layernorm": suite_layernorm,
    "attention": suite_attention,
    "gelu": suite_gelu,
    "patch": suite_patch,
}


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
            if rep.plot is not None:
                path = RESULTS / f"{name}-{stamp}.png"
                rep.plot(path)
                print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
