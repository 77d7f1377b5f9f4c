"""The machine's ceilings, measured in the same run as the benchmarks that are judged against them.

Each ceiling is named for what it is:

- ``fp32 FMA peak``: register-only vfmadd loops (``benchmarks/peak.cpp``) on every thread torch
  uses; the hardware's fp32 arithmetic limit. Compute-bound fp32 kernels are fractions of this.
- ``bf16 dot peak``: the same with AVX512_BF16 ``vdpbf16ps``; the limit for bf16 kernels.
- ``copy``: a large ``torch`` copy into a destination whose pages are already mapped, bytes read
  + written; the limit for memory-bound kernels.
- torch GEMM rates (ATen ``F.linear`` and oneDNN's packed linear, fp32 and bf16, at the demo
  GPT's shapes): what torch's libraries reach, kept as context rows; they are not ceilings.

Peaks and bandwidth are the best of several repetitions (interference from other processes only
ever lowers a rate, so the best is the estimate of what the machine can do); the median is kept
beside it. ``python -m benchmarks.run ceilings`` prints the table.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

_SOURCE = Path(__file__).resolve().parent / "peak.cpp"
# The demo GPT (n_embd 384): attention qkv projection, MLP up, MLP down, at 2048 tokens.
GEMM_SHAPES = [(2048, 384, 1152), (2048, 384, 1536), (2048, 1536, 384)]


@dataclass
class Ceiling:
    """One measured rate. ``value`` is None when it cannot be measured here (``note`` says why)."""

    key: str
    name: str
    unit: str
    value: float | None
    median: float | None = None
    reps: int = 0
    note: str = ""
    context: bool = False  # a reference rate shown beside the ceilings, not a ceiling itself
    # The peaks' busy-machine check (peak.cpp): True when other processes shared the cores.
    shared: bool | None = None


@dataclass
class Ceilings:
    items: list[Ceiling] = field(default_factory=list)

    def get(self, key: str) -> Ceiling | None:
        return next((c for c in self.items if c.key == key), None)

    def compute(self, dtype: torch.dtype) -> Ceiling | None:
        """The arithmetic peak a compute-bound kernel in ``dtype`` is judged against."""
        return self.get({torch.bfloat16: "bf16_dot"}.get(dtype, "fp32_fma"))

    def memory(self) -> Ceiling | None:
        """The bandwidth a memory-bound kernel is judged against."""
        return self.get("copy")

    @property
    def shared(self) -> bool:
        """Whether the peak loops saw other processes on the cores during this measurement."""
        return any(c.shared for c in self.items)

    def markdown(self) -> str:
        lines = []
        if self.shared:
            lines += [
                "**Warning: other processes shared the cores while the peaks were measured "
                "(wall-clock rate well below the rate by thread CPU time); the rates in this run "
                "understate the machine and its comparisons may be skewed.**",
                "",
            ]
        lines += [
            "| ceiling | value (best) | median | unit | reps | what it is |",
            "|---|---|---|---|---|---|",
        ]
        for c in self.items:
            name = f"context: {c.name}" if c.context else f"**{c.name}**"
            lines.append(
                f"| {name} | {_num(c.value)} | {_num(c.median)} | {c.unit} | {c.reps} | {c.note} |"
            )
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: the ceilings proper (not the context rows)."""
        return ", ".join(f"{c.name} {_num(c.value)} {c.unit}" for c in self.items if not c.context)


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_ext: ModuleType | None = None
_ext_error: str | None = None


def peak_extension() -> ModuleType | None:
    """Build (first use only; torch caches it by source hash) and load ``peak.cpp``."""
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        try:
            from torch.utils.cpp_extension import load

            # -O2 and no -m flags: every SIMD function has its own target attribute, so the
            # module builds on any x86-64 and the CPU check happens at call time.
            _ext = load(
                name="fastattn_bench_peak",
                sources=[str(_SOURCE)],
                extra_cflags=["-O2"],
                verbose=False,
            )
        except Exception as e:  # no compiler, no ninja, ...: report n/a, do not crash
            _ext_error = f"peak.cpp did not build: {type(e).__name__}: {str(e)[:200]}"
    return _ext


def _peak(
    fn: Callable[[int, int], tuple[float, float]], threads: int, target_s: float, reps: int
) -> tuple[float, float, float]:
    """Best and median wall-clock GFLOP/s of ``fn(iters, threads)`` with iters sized to about
    ``target_s``, and the best CPU-time GFLOP/s (see peak.cpp: the busy-machine check)."""
    # Calibrate by doubling until one call lasts target_s. Scaling a short call's time would
    # mislead: on a busy machine a short call is mostly the wait for the threads to be scheduled.
    iters = 1 << 14
    while True:
        t0 = time.perf_counter()
        fn(iters, threads)
        if time.perf_counter() - t0 >= target_s or iters >= 1 << 40:
            break
        iters *= 2
    runs = [fn(iters, threads) for _ in range(reps)]
    wall = [w for w, _ in runs]
    return max(wall), statistics.median(wall), max(c for _, c in runs)


def _best_median_time(fn: Callable[[], object], reps: int, warmup: int = 2) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def measure_fma(flags: set[str], threads: int, quick: bool) -> list[Ceiling]:
    target, reps = (0.05, 3) if quick else (0.2, 7)
    fp32 = Ceiling("fp32_fma", "fp32 FMA peak", "GFLOP/s", None)
    bf16 = Ceiling("bf16_dot", "bf16 dot peak", "GFLOP/s", None)
    has512, has256 = "avx512f" in flags, {"avx2", "fma"} <= flags
    hasbf16 = has512 and "avx512_bf16" in flags
    if not (has512 or has256):
        fp32.note = "n/a: the CPU has neither AVX-512F nor AVX2+FMA (or no /proc/cpuinfo)"
    if not hasbf16:
        bf16.note = "n/a: the CPU has no AVX512_BF16 (vdpbf16ps)"
    ext = peak_extension() if (has512 or has256) else None
    if ext is None and (has512 or has256):
        fp32.note = bf16.note = f"n/a: {_ext_error}"
        return [fp32, bf16]
    runs = {}
    if has512:
        runs["512-bit"] = _peak(ext.fma_avx512_gflops, threads, target, reps)
    if has256:
        runs["256-bit"] = _peak(ext.fma_avx2_gflops, threads, target, reps)
    if runs:
        # The wider loop is not always faster (Zen 4 splits 512-bit ops over 256-bit pipes):
        # the peak is whichever width reaches more.
        width, (best, med, cpu) = max(runs.items(), key=lambda kv: kv[1][0])
        fp32.value, fp32.median, fp32.reps = best, med, reps
        fp32.shared = _shared(best, cpu)
        others = ", ".join(f"{w} {b:.0f}" for w, (b, _, _) in runs.items() if w != width)
        nacc = 16 if width == "512-bit" else 12
        fp32.note = (
            f"register-only {width} vfmadd loop, {nacc} independent accumulators, {threads} "
            f"threads; {_busy(best, cpu)}" + (f"; other width: {others}" if others else "")
        )
    if hasbf16:
        best, med, cpu = _peak(ext.dpbf16_gflops, threads, target, reps)
        bf16.value, bf16.median, bf16.reps = best, med, reps
        bf16.shared = _shared(best, cpu)
        bf16.note = (
            "register-only vdpbf16ps loop (64 FLOP per instruction), 16 accumulators, "
            f"{threads} threads; {_busy(best, cpu)}"
        )
    return [fp32, bf16]


def _shared(wall: float, cpu: float) -> bool | None:
    """The busy-machine check: with the cores to itself, the loop's wall-clock rate equals the
    sum of its threads' rates by CPU time; a clearly lower wall rate means waiting for a core."""
    return None if cpu <= 0 else wall < 0.9 * cpu


def _busy(wall: float, cpu: float) -> str:
    shared = _shared(wall, cpu)
    if shared is None:
        return "no per-thread CPU clock"
    verdict = "OTHER PROCESSES SHARED THE CORES" if shared else "cores were free"
    return f"by thread CPU time {cpu:.0f} ({verdict})"


def measure_copy(quick: bool) -> Ceiling:
    nbytes = (128 if quick else 512) * 2**20
    reps = 5 if quick else 10
    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    # Filled once before timing, so every destination page is mapped: this is bandwidth, not
    # the first-touch page faults that fresh outputs pay.
    dst = torch.zeros_like(src)
    best, med = _best_median_time(lambda: dst.copy_(src), reps)
    return Ceiling(
        "copy",
        "copy bandwidth",
        "GB/s",
        2 * nbytes / best / 1e9,
        2 * nbytes / med / 1e9,
        reps,
        f"torch copy_ of {nbytes >> 20} MiB fp32 into a pre-faulted tensor, read + write bytes",
    )


def _onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    """torch's oneDNN linear from eager: the packed-weight op Inductor's freezing pass emits."""
    packed = torch.ops.mkldnn._reorder_linear_weight(w, x.shape[0])
    return lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")


def measure_gemm(quick: bool) -> list[Ceiling]:
    reps = 3 if quick else 10
    shapes = GEMM_SHAPES[:1] if quick else GEMM_SHAPES
    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    out = []
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for m, k, n in shapes:
            x = torch.randn(m, k).to(dtype)
            w = torch.randn(n, k).to(dtype)
            b = torch.randn(n).to(dtype)
            flop = 2 * m * k * n
            shape = f"{m}x{k}->{n}"
            best, med = _best_median_time(lambda x=x, w=w, b=b: F.linear(x, w, b), reps)
            out.append(
                Ceiling(
                    f"gemm_{tag}_aten_{shape}",
                    f"F.linear {tag} {shape}",
                    "GFLOP/s",
                    flop / best / 1e9,
                    flop / med / 1e9,
                    reps,
                    "ATen addmm (fp32: MKL sgemm; bf16: ATen's bf16 gemm, oneDNN where built in)",
                    context=True,
                )
            )
            c = Ceiling(
                f"gemm_{tag}_onednn_{shape}", f"oneDNN linear {tag} {shape}", "GFLOP/s", None
            )
            c.context = True
            try:
                if not onednn:
                    raise RuntimeError("torch built without oneDNN")
                best, med = _best_median_time(_onednn_linear(x, w, b), reps)
                c.value, c.median, c.reps = flop / best / 1e9, flop / med / 1e9, reps
                c.note = (
                    "torch.ops.mkldnn._linear_pointwise with a weight packed by "
                    "_reorder_linear_weight (Inductor's CPU freezing path)"
                )
            except Exception as e:  # an op missing in this torch: n/a, not a crash
                c.note = f"n/a: {type(e).__name__}: {str(e)[:120]}"
            out.append(c)
    return out


def measure(quick: bool = False, gemm: bool = True) -> Ceilings:
    """Every ceiling, measured now on torch's current thread count."""
    threads = torch.get_num_threads()
    flags = cpu_flags()
    items = measure_fma(flags, threads, quick)
    items.append(measure_copy(quick))
    if gemm:
        items += measure_gemm(quick)
    return Ceilings(items)


def fraction(rate: float, ceiling: Ceiling | None) -> float | None:
    """``rate`` as a fraction of ``ceiling`` (None where the ceiling is n/a)."""
    if ceiling is None or not ceiling.value:
        return None
    return rate / ceiling.value
