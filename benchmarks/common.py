"""Timing, machine ceilings and result files shared by the benchmark runner and bench_*.py."""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

try:
    import resource  # Unix only: page-fault counts
except ImportError:
    resource = None

from benchmarks.ceilings import Ceiling, Ceilings, cpu_flags, fraction

RESULTS = Path(__file__).resolve().parent / "results"


def median_time(
    fn: Callable[[], object], *, warmup: int = 3, reps: int = 15, max_s: float = 20.0
) -> float:
    """Median wall time of ``fn()`` in seconds, after ``warmup`` calls; stops early past ``max_s``."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_s and len(times) >= 3:
            break
    return statistics.median(times)


@dataclass
class Spread:
    """Median and spread of a sample: quartiles (the IQR) and the extremes."""

    median: float
    q1: float
    q3: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, xs: Sequence[float]) -> Spread:
        xs = sorted(xs)
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else xs * 3
        return cls(statistics.median(xs), q1, q3, xs[0], xs[-1], len(xs))


@dataclass
class Comparison:
    """Wall times (seconds) of implementations measured interleaved, one list per implementation,
    index = round: ``times[a][r]`` and ``times[b][r]`` ran back to back."""

    times: dict[str, list[float]]
    faults: dict[str, list[int]] = field(default_factory=dict)  # minor page faults per call

    @property
    def rounds(self) -> int:
        return min(len(v) for v in self.times.values())

    def time(self, name: str) -> Spread:
        return Spread.of(self.times[name])

    def ratio(self, base: str, name: str) -> Spread:
        """Speed-up of ``name`` over ``base``: the median of the per-round ratios, which a slow
        phase of the machine (it hits both sides of one round) does not move."""
        return Spread.of([b / t for b, t in zip(self.times[base], self.times[name], strict=True)])

    def faults_per_call(self, name: str) -> float | None:
        f = self.faults.get(name)
        return statistics.median(f) if f else None


def _minor_faults() -> int:
    """Minor page faults of this process so far (all its threads); 0 where unknown."""
    if resource is None:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    rounds: int = 31,
    min_rounds: int = 5,
    warmup: int = 2,
    max_warmup: int = 8,
    max_s: float = 60.0,
) -> Comparison:
    """Time every callable once per round, all of them in each round, for up to ``rounds``
    rounds (fewer, but at least ``min_rounds``, once ``max_s`` seconds have passed).

    Why interleaved: a shared machine's speed drifts (other jobs, page-cache and allocator
    state), and timing A's reps then B's reps hands the whole drift to the comparison; within a
    round both sides see the same machine. The order rotates each round (A B C, B C A, ...) so
    no implementation always runs right after the same neighbour.

    The warm-up runs whole interleaved rounds, at least ``warmup`` (compilation, caches) and
    then more, up to ``max_warmup``, until a round takes no page fault: glibc needs several
    frees before it keeps an output-sized block in its heap instead of mapping fresh pages, and
    without this the first-touch faults land on whichever implementation runs first. Outputs
    above glibc's mmap threshold fault on every call whatever the warm-up; the minor faults of
    each timed call are recorded so the tables show it. Each output is kept alive until its
    clock has stopped, so freeing it is not timed; the garbage collector is paused meanwhile.
    """
    names = list(fns)
    warm_start = time.perf_counter()
    for r in range(max_warmup):
        f0 = _minor_faults()
        for name in names:
            out = fns[name]()
            del out
        if r + 1 >= warmup and (
            _minor_faults() == f0 or time.perf_counter() - warm_start > max_s / 4
        ):
            break
    times: dict[str, list[float]] = {name: [] for name in names}
    faults: dict[str, list[int]] = {name: [] for name in names}
    gc_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for r in range(rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                f0 = _minor_faults()
                t0 = time.perf_counter()
                out = fns[name]()
                times[name].append(time.perf_counter() - t0)
                faults[name].append(_minor_faults() - f0)
                del out
            if r + 1 >= min_rounds and time.perf_counter() - start > max_s:
                break
    finally:
        if gc_enabled:
            gc.enable()
    return Comparison(times, faults)


FLAGS_OF_INTEREST = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
)


def _lscpu(field: str) -> str | None:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    return None


def _cpu_model() -> str:
    model = _lscpu("Model name")
    if model:
        return model
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    # The active mode is the bracketed word: "always [madvise] never".
    return next((w.strip("[]") for w in text.split() if w.startswith("[")), text.strip())


def machine() -> dict[str, object]:
    try:
        from fastattn import _C

        cap = _C.cpu_capability
        # Which float -> bfloat16 rounding the kernels' stores use (csrc/cpu/vec.h).
        cap += ", bf16 stores " + (
            "vcvtneps2bf16" if getattr(_C, "cpu_bf16_cvt", False) else "emulated"
        )
    except ImportError:
        cap = "extension not built"
    flags = cpu_flags()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    return {
        "cpu": _cpu_model(),
        "l3_cache": _lscpu("L3 cache") or "unknown",
        "flags": [f for f in FLAGS_OF_INTEREST if f in flags],
        "threads": torch.get_num_threads(),
        "cpus_available": cores,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "fastattn_cpu_build": cap,
        # torch backs large CPU tensors with transparent huge pages when this is set, which
        # removes most first-touch page faults of fresh outputs (for every op alike).
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
        "transparent_hugepage": _thp_mode(),
        # --steady-allocator: glibc keeps every freed block for reuse (see STEADY_TUNABLES).
        "steady_allocator": steady_allocator(),
    }


# glibc malloc settings of `python -m benchmarks.run --steady-allocator`: no block is its own
# mmap (mmap_max=0) and the heap is never trimmed, so a freed output's pages are handed to the
# next call of the same size already mapped: the state inside a training loop, where every
# step allocates the same sizes (the training suite's steps take 0 faults without it). By
# default a block above glibc's mmap threshold (adaptive, up to 32 MiB) is a fresh mapping on
# every call, and its first-touch page faults are timed with the kernel.
STEADY_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295"


def steady_allocator() -> bool:
    """Whether this process runs with :data:`STEADY_TUNABLES` (set before it started)."""
    return STEADY_TUNABLES in os.environ.get("GLIBC_TUNABLES", "")


METHOD_NOTE = (
    "Method: each round runs every implementation once, back to back, the order rotating "
    "from round to round, after 2-8 interleaved warm-up rounds (until a round takes no page "
    "fault: allocator and caches warm, compilation done); ms = median over rounds, IQR = its interquartile range; a speed-up is "
    "the median over rounds of that round's time ratio; rounds = how many rounds ran. Rates "
    "use the median time. page faults/call = median minor page faults per timed call (the "
    "whole process): non-zero means first-touch faults are inside that time. Per-round times "
    "and faults are in the JSON (raw_per_round)."
)


def cache_note() -> str:
    """Why a memory-bound case can show more than 100% of the copy bandwidth."""
    l3 = _lscpu("L3 cache") or "unknown"
    return (
        "The copy bandwidth is measured on a buffer far beyond the caches (size in the "
        f"ceilings table); a case whose working set fits in the last-level cache (L3: {l3}) "
        "can run above it."
    )


def fresh_output_note(what: str) -> str:
    """The note every table with freshly allocated outputs carries: page faults are in it."""
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "0")
    state = "set" if thp not in ("", "0") else "not set"
    if steady_allocator():
        return (
            f"{what} are fresh tensors allocated by each call, from an allocator in its steady "
            f"state (--steady-allocator: GLIBC_TUNABLES={STEADY_TUNABLES}, so glibc reuses "
            "freed blocks without unmapping them, as inside a training loop): first-touch page "
            "faults are out of the times (the faults column shows it), for every "
            "implementation alike. Runs without the flag time them too. Compare only within "
            "one file."
        )
    return (
        f"{what} are fresh tensors allocated by each call, so first-touch page faults are part "
        "of every time (for every implementation alike) where the allocator hands out fresh "
        "pages: with glibc, blocks above its mmap threshold (which adapts upwards to 32 MiB "
        "after the first frees) are new mappings on every call, smaller ones are reused from "
        f"the heap once warm. THP_MEM_ALLOC_ENABLE is {state} "
        f"({thp!r}; system THP mode: {_thp_mode()}): with it set, torch backs large tensors "
        "with huge pages and most of those faults go away. Compare only within one file."
    )


@dataclass
class Report:
    """One benchmark run: the machine, its ceilings and a table of rows, saved as JSON + Markdown.

    Both files start with the machine (CPU model, flags of interest, threads, huge-page state)
    and the ceilings measured in this run, so every number below has its limit beside it.
    """

    name: str
    columns: list[str]
    rows: list[list[object]] = field(default_factory=list)
    ceilings: Ceilings | None = None
    notes: list[str] = field(default_factory=list)
    machine: dict[str, object] = field(default_factory=machine)
    date: str = field(default_factory=lambda: _dt.datetime.now().strftime("%Y-%m-%d %H:%M"))
    # Per round, "case | impl" -> {"seconds": [...], "minor_faults": [...]} (kept in the JSON
    # for re-analysis).
    raw: dict[str, dict[str, list]] = field(default_factory=dict)
    # Further tables: (title, columns, rows), written after the main one.
    sections: list[tuple[str, list[str], list[list[object]]]] = field(default_factory=list)
    # Optional: a function path -> None that draws this run's figure (not saved in the JSON).
    plot: Callable[[Path], None] | None = field(default=None, repr=False, compare=False)

    def add(self, *row: object) -> None:
        self.rows.append(list(row))
        print("  " + " | ".join(_fmt(c) for c in row), flush=True)

    def add_comparison(
        self,
        case: Sequence[object],
        cmp: Comparison,
        *,
        work: float | None = None,
        ceiling: Ceiling | None = None,
        baselines: Sequence[str] = (),
    ) -> None:
        """One row per implementation of ``cmp``: ``case`` cells, impl, median ms, IQR ms,
        median minor page faults per call, rate (``work`` / median time / 1e9: GB/s or GFLOP/s) and its fraction of ``ceiling``
        when ``work`` is given, the speed-up over each baseline (median of per-round ratios),
        and the number of rounds. Columns must match ``comparison_columns``."""
        label = " ".join(str(c) for c in case)
        for name, ts in cmp.times.items():
            t = cmp.time(name)
            row: list[object] = [
                *case,
                name,
                t.median * 1e3,
                f"{_fmt(t.q1 * 1e3)}-{_fmt(t.q3 * 1e3)}",
                cmp.faults_per_call(name),
            ]
            if work is not None:
                rate = work / t.median / 1e9
                row += [rate, fraction(rate, ceiling)]
            row += [cmp.ratio(b, name).median if b in cmp.times else None for b in baselines]
            row.append(cmp.rounds)
            self.add(*row)
            self.raw[f"{label} | {name}"] = {
                "seconds": ts,
                "minor_faults": cmp.faults.get(name, []),
            }

    def markdown(self) -> str:
        m = self.machine
        lines = [
            f"# {self.name}",
            "",
            f"Run {self.date}. Machine: {m['cpu']}; flags of interest: "
            f"{' '.join(m.get('flags', [])) or 'none'}; {m['threads']} torch threads on "
            f"{m.get('cpus_available', '?')} CPUs; L3 {m.get('l3_cache', 'unknown')}; torch {m['torch']}; fastattn CPU build "
            f"{m['fastattn_cpu_build']}; THP_MEM_ALLOC_ENABLE={m.get('THP_MEM_ALLOC_ENABLE', '0')}, "
            f"system THP mode {m.get('transparent_hugepage', 'unknown')}"
            + (
                f"; steady allocator (--steady-allocator: GLIBC_TUNABLES={STEADY_TUNABLES})."
                if m.get("steady_allocator")
                else "."
            ),
            "",
        ]
        if self.ceilings is not None:
            lines += ["Ceilings measured in this run:", "", self.ceilings.markdown(), ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "---|" * len(self.columns))
        for row in self.rows:
            lines.append("| " + " | ".join(_fmt(c) for c in row) + " |")
        for title, columns, rows in self.sections:
            lines += ["", f"{title}:", "", "| " + " | ".join(columns) + " |"]
            lines.append("|" + "---|" * len(columns))
            lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
        notes = [*self.notes, METHOD_NOTE] if self.raw else self.notes
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
        return "\n".join(lines) + "\n"

    def save(self, stem: str) -> Path:
        """Write ``results/<stem>.json`` and ``.md`` atomically (temp file, then rename)."""
        RESULTS.mkdir(parents=True, exist_ok=True)
        data = {
            "name": self.name,
            "date": self.date,
            "machine": self.machine,
            "ceilings": asdict(self.ceilings)["items"] if self.ceilings else [],
            "cores_shared_during_ceilings": self.ceilings.shared if self.ceilings else None,
            "columns": self.columns,
            "rows": self.rows,
            "sections": [{"title": t, "columns": c, "rows": r} for t, c, r in self.sections],
            "notes": [*self.notes, METHOD_NOTE] if self.raw else self.notes,
            "raw_per_round": self.raw,
        }
        atomic_write(RESULTS / f"{stem}.json", json.dumps(data, indent=1))
        path = RESULTS / f"{stem}.md"
        atomic_write(path, self.markdown())
        return path


def comparison_columns(
    case: Sequence[str], rate: str | None, ceiling: str | None, baselines: Sequence[str]
) -> list[str]:
    """The header matching ``Report.add_comparison`` rows."""
    cols = [*case, "impl", "ms (median)", "ms IQR", "page faults/call"]
    if rate is not None:
        cols += [rate, f"of {ceiling}"]
    cols += [f"vs {b} (median of rounds)" for b in baselines]
    return [*cols, "rounds"]


def _fmt(c: object) -> str:
    if c is None:
        return "n/a"
    if isinstance(c, float):
        return f"{c:.3g}" if abs(c) < 100 else f"{c:.0f}"
    return str(c)


def atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
