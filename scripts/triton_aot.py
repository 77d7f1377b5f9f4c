#!/usr/bin/env python3
"""Compile every Triton kernel variant fastattn's launchers can start, for sm_80 and sm_90, on
a machine without a GPU; print registers, spills and shared memory per variant and target.

What is compiled: ``aot_launches()`` of ``fastattn.triton.{attention,layernorm,rms_norm,gelu,gated_act,rotary}`` -- the
launch rules themselves, run over the whole domain the op declarations give Triton (dtypes,
head dims 1..128, row lengths 1..65536, every flag and autotune config), deduplicated. A
launcher cannot start a variant that is not in that set (``tests/test_triton_aot.py`` checks).
Specialisation is the common case: 16-byte aligned pointers and multiple-of-16 integer
arguments, as Triton specialises at run time (other alignments compile the same tiles with
narrower loads; an integer argument equal to 1 becomes a constant: the same tiles, fewer
instructions). ``make test`` (so CI) and ``make cuda-check`` run every variant (2389 per target,
~11 min cold on 2 cores); ``--quick`` only the variant with every optional flag on per tile, a
smoke test: ptxas's allocation is not monotonic in the flags, some variants with fewer flags
spill where the all-flags one does not.

Numbers: registers and spill bytes from ptxas's own log (``-v``, Triton's bundled ptxas: no
nvcc needed), shared memory from the kernel's metadata (Triton allocates it dynamically).

Exit 1 on any compile error, any spill in a kernel on fp16 / bf16 data, or shared memory above
the target's opt-in limit per block (sm_80: 166912 B, sm_90: 232448 B). Spills of fp32 kernels
are reported, not failed: exact fp32 attention dots are scalar FMAs, and ptxas's allocation of
them (and of some TF32 variants) spills a few bytes to ~1 KB in variants that differ from a
spill-free one by a flag; the 16-bit kernels are the fast path.
Prints a skip line and exits 0 where triton is not installed.

Usage: python scripts/triton_aot.py [--quick] [--jobs N] [--only SUBSTRING] [--arch 80,90]
[--table] (env TRITON_CACHE_DIR: Triton's compile cache, which also keeps ptxas's numbers, so
an unchanged kernel is not compiled again).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SMEM_LIMIT = {80: 166912, 90: 232448}  # cudaDevAttrMaxSharedMemoryPerBlockOptin, A100 / H100
MODULES = ("attention", "layernorm", "rms_norm", "gelu", "gated_act", "rotary")

_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _signature(fn, launch) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for triton.compile's ASTSource, as the JIT would build
    them for a call with aligned pointers and multiple-of-16 integers."""
    pointers = dict(launch.pointers)
    constexprs = dict(launch.constexprs)
    sig, attrs = {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params, strict=True)):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + pointers[name]
            if not param.do_not_specialize_on_alignment:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in launch.floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if not param.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    missing = set(constexprs) - set(fn.arg_names)
    if missing:
        raise ValueError(f"{fn.__name__}: no argument named {sorted(missing)}")
    return sig, constexprs, attrs


def _ptxas_log(ptx: str, arch: int) -> str:
    """ptxas -v on Triton's PTX, with the flags Triton's own ptxas call uses."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2"]
        cmd += [f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", src + ".o"]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return res.stdout + res.stderr


def compile_one(launch, arch: int, fn=None) -> dict:
    """Compile one Launch for sm_<arch>; a dict with regs, spills, smem or error."""
    import triton
    from triton.backends.compiler import GPUTarget

    t0 = time.time()
    row = {"launch": launch, "arch": arch, "regs": None, "spill": None, "smem": None}
    try:
        if fn is None:
            name = launch.module if "." in launch.module else f"fastattn.triton.{launch.module}"
            fn = getattr(__import__(name, fromlist=[launch.kernel]), launch.kernel)
        sig, constexprs, attrs = _signature(fn, launch)
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
        log = io.StringIO()
        with contextlib.redirect_stdout(log), triton.knobs.nvidia.scope():
            triton.knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas's -v log
            kernel = triton.compile(
                src,
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": launch.num_warps, "num_stages": launch.num_stages},
            )
        text = log.getvalue()
        # ptxas's numbers, kept beside Triton's compile cache: a cache hit prints no log.
        memo = os.path.join(triton.knobs.cache.dir, "fastattn_aot", kernel.hash + ".log")
        if _REGS.search(text):
            os.makedirs(os.path.dirname(memo), exist_ok=True)
            with open(memo, "w") as f:
                f.write(text)
        elif os.path.exists(memo):
            with open(memo) as f:
                text = f.read()
        else:
            text = _ptxas_log(kernel.asm["ptx"], arch)
        regs, spill = _REGS.findall(text), _SPILL.findall(text)
        if len(regs) != 1 or len(spill) != 1:
            raise RuntimeError(f"could not parse the ptxas log:\n{text}")
        row["regs"] = int(regs[0])
        row["spill"] = int(spill[0][0]) + int(spill[0][1])
        row["smem"] = int(kernel.metadata.shared)
    except Exception as e:  # noqa: BLE001 - every failure is reported, the run goes on
        row["error"] = f"{type(e).__name__}: {e}".strip()[:2000]
    row["secs"] = time.time() - t0
    return row


def _data_type(launch) -> str:
    """The element type of the kernel's data: its first pointer's (the table lists it first)."""
    return launch.pointers[0][1] if launch.pointers else ""


def problems(row: dict) -> list[str]:
    """Why a compiled variant fails the check (empty: it passes)."""
    launch, arch = row["launch"], row["arch"]
    if "error" in row:
        return [f"compile error: {row['error']}"]
    out = []
    if row["spill"] and _data_type(launch) in ("fp16", "bf16"):
        out.append(f"spills {row['spill']} B")
    if row["smem"] > SMEM_LIMIT[arch]:
        out.append(f"shared memory {row['smem']} B > {SMEM_LIMIT[arch]} B (sm_{arch} limit)")
    return out


def _worker(args):
    return compile_one(*args)


def collect(modules=MODULES, only: str | None = None, every_flag: bool = True) -> list:
    """The launchers' variants (each module's aot_launches), optionally filtered by label."""
    launches = []
    for name in modules:
        mod = __import__(f"fastattn.triton.{name}", fromlist=["aot_launches"])
        launches.extend(mod.aot_launches(every_flag))
    if only:
        launches = [lc for lc in launches if only in lc.label()]
    return sorted(set(launches), key=lambda lc: lc.label())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--only", help="compile only the variants whose label contains this")
    ap.add_argument("--arch", default="80,90", help="comma-separated compute capabilities")
    ap.add_argument("--table", action="store_true", help="print every variant, not a summary")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="only the variants with every optional flag on (the most live values) per tile",
    )
    args = ap.parse_args(argv)
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as e:
        print(f"triton_aot: skipped (triton not installed: {e})")
        return 0
    # Kernels must be real JIT functions, not the interpreter's stand-ins.
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated
    import triton

    archs = [int(a) for a in args.arch.split(",")]
    launches = collect(only=args.only, every_flag=not args.quick)
    print(f"triton_aot: triton {triton.__version__}, {len(launches)} variants x sm_{archs}")
    return run(launches, archs, jobs=args.jobs, table=args.table)


def run(launches: list, archs: list[int], jobs: int = 1, table: bool = False) -> int:
    """Compile launches for archs (a pool of jobs processes); print the report; exit status."""
    t0 = time.time()
    work = [(lc, arch) for lc in launches for arch in archs]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            rows = list(pool.map(_worker, work, chunksize=2))
    else:
        rows = [compile_one(*w) for w in work]
    return report(rows, archs, time.time() - t0, table=table)


def report(rows: list, archs: list[int], wall: float, table: bool = False) -> int:
    bad = []
    for r in rows:
        for p in problems(r):
            bad.append(f"{r['launch'].label()} sm_{r['arch']}: {p}")
    if table:
        w = max(len(r["launch"].label()) for r in rows)
        print(f"{'variant':<{w}} {'arch':<6} {'regs':>4} {'spill':>6} {'smem':>7}")
        for r in rows:
            if "error" in r:
                print(f"{r['launch'].label():<{w}} sm_{r['arch']:<3} ERROR")
            else:
                print(
                    f"{r['launch'].label():<{w}} sm_{r['arch']:<3} {r['regs']:>4} "
                    f"{r['spill']:>6} {r['smem']:>7}"
                )
    # Summary: per module, kernel, arch.
    groups: dict = {}
    for r in rows:
        key = (r["launch"].module, r["launch"].kernel, r["arch"])
        groups.setdefault(key, []).append(r)
    print(
        f"{'kernel':<24} {'arch':<6} {'variants':>8} {'max regs':>8} {'spilling':>8} "
        f"{'max spill':>9} {'max smem':>9}"
    )
    for (_, kernel, arch), rs in sorted(groups.items()):
        ok = [r for r in rs if "error" not in r]
        spilling = [r for r in ok if r["spill"]]
        print(
            f"{kernel:<24} sm_{arch:<3} {len(rs):>8} "
            f"{max((r['regs'] for r in ok), default=0):>8} {len(spilling):>8} "
            f"{max((r['spill'] for r in ok), default=0):>9} "
            f"{max((r['smem'] for r in ok), default=0):>9}"
        )
    for arch in archs:
        rs = [r for r in rows if r["arch"] == arch and "error" not in r]
        if not rs:
            print(f"triton_aot: sm_{arch}: nothing compiled")
            continue
        spilling = [r for r in rs if r["spill"]]
        fp32 = [r for r in spilling if _data_type(r["launch"]) == "fp32"]
        print(
            f"triton_aot: sm_{arch}: {len(rs)} variants compiled, max {max(r['regs'] for r in rs)} "
            f"registers, {len(spilling)} spilling ({len(fp32)} of them fp32, max "
            f"{max((r['spill'] for r in spilling), default=0)} B), max shared memory "
            f"{max(r['smem'] for r in rs)} B (limit {SMEM_LIMIT[arch]} B)"
        )
    secs: dict = {}
    for r in rows:
        secs[r["launch"].module] = secs.get(r["launch"].module, 0.0) + r["secs"]
    per = ", ".join(f"{m} {t:.0f} s" for m, t in sorted(secs.items()))
    print(f"triton_aot: {len(rows)} compiles in {wall:.0f} s wall (compile time: {per})")
    if bad:
        print("triton_aot: FAIL\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    print("triton_aot: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
