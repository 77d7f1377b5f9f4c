"""Timing, machine ceilings and result files shared by the benchmark runner and bench_*.py."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

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


def copy_gbps(nbytes: int = 256 * 2**20) -> float:
    """The machine's copy bandwidth in GB/s (bytes read + written), measured now."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), reps=10)
    return 2 * nbytes / t / 1e9


def matmul_gflops(n: int = 2048) -> float:
    """The machine's fp32 matmul rate in GFLOP/s (torch's BLAS on all threads), measured now."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    t = median_time(lambda: torch.mm(a, b, out=out), reps=10)
    return 2 * n**3 / t / 1e9


def machine() -> dict[str, object]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        from fastattn import _C

        cap = _C.cpu_capability
    except ImportError:
        cap = "extension not built"
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "fastattn_cpu_build": cap,
        # torch backs large CPU tensors with transparent huge pages when this is set, which
        # removes most first-touch page faults of fresh outputs (for every op alike).
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
    }


@dataclass
class Report:
    """One benchmark run: the machine, its ceilings and a table of rows, saved as JSON + Markdown."""

    name: str
    columns: list[str]
    rows: list[list[object]] = field(default_factory=list)
    ceilings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    machine: dict[str, object] = field(default_factory=machine)
    date: str = field(default_factory=lambda: _dt.datetime.now().strftime("%Y-%m-%d %H:%M"))
    # Optional: a function path -> None that draws this run's figure (not saved in the JSON).
    plot: Callable[[Path], None] | None = field(default=None, repr=False, compare=False)

    def add(self, *row: object) -> None:
        self.rows.append(list(row))
        print("  " + " | ".join(_fmt(c) for c in row), flush=True)

    def markdown(self) -> str:
        lines = [
            f"# {self.name}",
            "",
            f"Run {self.date} on {self.machine['cpu']} "
            f"({self.machine['threads']} threads), torch {self.machine['torch']}, "
            f"fastattn CPU build {self.machine['fastattn_cpu_build']}, "
            f"THP_MEM_ALLOC_ENABLE={self.machine.get('THP_MEM_ALLOC_ENABLE', '0')}.",
            "",
        ]
        if self.ceilings:
            lines.append(
                "Ceilings measured in this run: "
                + ", ".join(f"{k} {v:.1f}" for k, v in self.ceilings.items())
                + "."
            )
            lines.append("")
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "---|" * len(self.columns))
        for row in self.rows:
            lines.append("| " + " | ".join(_fmt(c) for c in row) + " |")
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def save(self, stem: str) -> Path:
        """Write ``results/<stem>.json`` and ``.md`` atomically (temp file, then rename)."""
        RESULTS.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in asdict(self).items() if k != "plot"}
        atomic_write(RESULTS / f"{stem}.json", json.dumps(data, indent=1))
        path = RESULTS / f"{stem}.md"
        atomic_write(path, self.markdown())
        return path


def _fmt(c: object) -> str:
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
