#!/usr/bin/env bash
# Compile-check the CUDA kernels: every csrc/cuda/*.cu with nvcc for sm_80 and sm_90, then a
# table of registers, spill stores / loads and static shared memory per kernel and arch, and
# for the FlashAttention-2 attention kernels their dynamic shared memory (ptxas does not report
# it: it is computed from csrc/cuda/attention_tiles.h, compiled and run on the host) against the
# opt-in limit of the arch (sm_80 166912 B, sm_90 232448 B). The simple attention kernels' tiles
# are static_asserted <= 160 KB in csrc/cuda/attention.cu.
#
# Exit 1 on any compile error, if an FA2 attention kernel (fp16 / bf16) spills or exceeds the
# shared memory of an arch, or if a simple attention kernel for head dim 64 or 128 spills.
# Also a syntax check of the torch binding (bindings.cpp) against torch's headers.
# Usage: bash scripts/cuda_check.sh   (env NVCC to pick the compiler, default: nvcc on PATH;
#   PY: the Python whose torch the binding is checked against, default python3)
# Flags are those of the real build: setup.py's (-O3 --use_fast_math, C++17) plus the ones
# torch.utils.cpp_extension always adds (no implicit half / bfloat16 conversions or operators).
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-nvcc}"
OUT="$(mktemp -d /tmp/fastattn_cuda_check.XXXXXX)"
trap 'rm -rf "$OUT"' EXIT

if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "cuda_check: $NVCC not found (set NVCC=/path/to/nvcc)" >&2
  exit 1
fi
echo "cuda_check: $("$NVCC" --version | tail -1)"

shopt -s nullglob
sources=("$ROOT"/csrc/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "cuda_check: no .cu files under csrc/cuda" >&2
  exit 1
fi

# Compile the files in parallel (ptxas is single-threaded; attention.cu dominates).
pids=()
for src in "${sources[@]}"; do
  name="$(basename "$src" .cu)"
  "$NVCC" -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -Xptxas -v -std=c++17 -O3 --use_fast_math -I"$ROOT/csrc" \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
    -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr \
    -c -o "$OUT/$name.o" "$src" >"$OUT/$name.log" 2>&1 &
  pids+=("$!")
done
status=0
i=0
for src in "${sources[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "cuda_check: FAILED to compile $(basename "$src"):" >&2
    grep -v "^ptxas info" "$OUT/$(basename "$src" .cu).log" >&2
    status=1
  fi
  i=$((i + 1))
done
[ $status -eq 0 ] || exit 1

# The torch binding (csrc/cuda/bindings.cpp, host C++ that setup.py builds only where torch has
# CUDA): a syntax check against this torch's headers, so that a binding error shows here and not
# first on a GPU machine. A CPU wheel lacks the CMake-generated c10/cuda/impl/cuda_cmake_macros.h
# (it only defines build options): an empty stand-in is put after torch's include dirs.
PY="${PY:-python3}"
if torch_inc="$("$PY" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join(include_paths()))' 2>/dev/null)"; then
  mkdir -p "$OUT/stub/c10/cuda/impl" && : >"$OUT/stub/c10/cuda/impl/cuda_cmake_macros.h"
  py_inc="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  cuda_inc="$(dirname "$(dirname "$(command -v "$NVCC")")")/include"
  [ -f "$cuda_inc/cuda_runtime.h" ] || cuda_inc=/usr/local/cuda/include
  inc=()
  for d in $torch_inc; do inc+=("-I$d"); done
  if ! "${CXX:-c++}" -std=c++17 -fsyntax-only -DFASTATTN_WITH_CUDA -I"$ROOT/csrc" "${inc[@]}" \
    -I"$OUT/stub" -I"$cuda_inc" -I"$py_inc" "$ROOT/csrc/cuda/bindings.cpp" >"$OUT/bindings.log" 2>&1; then
    echo "cuda_check: FAILED to compile csrc/cuda/bindings.cpp against torch's headers:" >&2
    grep -E "error|note: " "$OUT/bindings.log" | head -20 >&2
    exit 1
  fi
  echo "cuda_check: csrc/cuda/bindings.cpp compiles against torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "cuda_check: bindings.cpp not checked ($PY cannot import torch; set PY=...)"
fi

# Dynamic shared memory of the FA2 kernels per padded head dim, from the tile headers.
"${CXX:-c++}" -std=c++17 -I"$ROOT/csrc" -x c++ -o "$OUT/fa2_tiles" - <<'CPP' || exit 1
#include "cuda/attention_tiles.h"
#include <cstdio>
using namespace fastattn::cuda::tiles;
template <int Dp> void fwd() { std::printf("fwd %d %zu\n", Dp, Fa2Fwd<2, Dp>::bytes); }
template <int Dp> void bwd() { std::printf("bwd %d %zu\n", Dp, Fa2Bwd<2, Dp>::bytes); }
int main() {
  fwd<16>(); fwd<32>(); fwd<64>(); fwd<128>(); fwd<256>();
  bwd<16>(); bwd<32>(); bwd<64>(); bwd<128>(); bwd<256>();
  std::printf("limit sm_80 %zu\nlimit sm_90 %zu\n", kSmemOptInSm80, kSmemOptInSm90);
}
CPP
"$OUT/fa2_tiles" > "$OUT/fa2_tiles.txt" || exit 1

python3 - "$OUT" "${sources[@]}" <<'PY'
import os
import re
import subprocess
import sys

out_dir, sources = sys.argv[1], sys.argv[2:]
entry = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
spill = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
used = re.compile(r"Used (\d+) registers")
smem = re.compile(r"(\d+) bytes smem")


def demangle(names):
    try:
        res = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                             check=True)
        out = res.stdout.splitlines()
        if len(out) == len(names):
            return out
    except (OSError, subprocess.CalledProcessError):
        pass
    return names


def short(name):
    name = re.sub(r"\(anonymous namespace\)::|fastattn::cuda::(detail::)?", "", name)
    name = re.sub(r"\(.*\)$", "", name)  # argument list
    name = re.sub(r"^void ", "", name)
    return name.replace("__nv_bfloat16", "bf16").replace("__half", "fp16").replace("float", "fp32")


rows = []  # (file, kernel, arch, regs, spill_st, spill_ld, smem)
for src in sources:
    base = os.path.splitext(os.path.basename(src))[0]
    cur = None
    with open(os.path.join(out_dir, base + ".log")) as f:
        for line in f:
            m = entry.search(line)
            if m:
                cur = [base, m.group(1), m.group(2), None, None, None, 0]
                rows.append(cur)
                continue
            if cur is None:
                continue
            m = spill.search(line)
            if m:
                cur[4], cur[5] = int(m.group(1)), int(m.group(2))
            m = used.search(line)
            if m:
                cur[3] = int(m.group(1))
                s = smem.search(line)
                cur[6] = int(s.group(1)) if s else 0

names = demangle([r[1] for r in rows])
for r, n in zip(rows, names):
    r[1] = short(n)
rows.sort(key=lambda r: (r[0], r[1], r[2]))

fa2_smem, limit = {}, {}
with open(os.path.join(out_dir, "fa2_tiles.txt")) as f:
    for line in f:
        kind, key, val = line.split()
        (limit if kind == "limit" else fa2_smem)[(kind, key)] = int(val)
fa2 = re.compile(r"attention_(fwd|bwd)_fa2_kernel<\w+, (\d+)>")

w = max(len(r[1]) for r in rows)
print(f"{'file':<10} {'kernel':<{w}} {'arch':<6} {'regs':>4} {'spill st':>8} {'spill ld':>8} "
      f"{'smem':>6} {'dyn smem':>8}")
bad = []
for r in rows:
    m = fa2.search(r[1])
    dyn = fa2_smem.get((m.group(1), m.group(2))) if m else None
    print(f"{r[0]:<10} {r[1]:<{w}} {r[2]:<6} {r[3]:>4} {r[4]:>8} {r[5]:>8} {r[6]:>6} "
          f"{dyn if dyn is not None else '':>8}")
    spills = (r[4] or 0) + (r[5] or 0)
    if r[3] is None or r[4] is None:
        bad.append(f"{r[1]} {r[2]}: could not parse ptxas output")
    elif spills and m:
        bad.append(f"{r[1]} {r[2]}: spills {r[4]} B stored / {r[5]} B loaded")
    elif spills and r[0] == "attention" and re.search(r"\b(64|128)>", r[1]):
        bad.append(f"{r[1]} {r[2]}: spills {r[4]} B stored / {r[5]} B loaded")
    if m and dyn is None:
        bad.append(f"{r[1]}: no shared-memory size in attention_tiles.h")
    elif m and dyn + r[6] > limit[("limit", r[2])]:
        bad.append(f"{r[1]} {r[2]}: {dyn + r[6]} B of shared memory > {limit[('limit', r[2])]}")
spilling = sum(1 for r in rows if (r[4] or 0) + (r[5] or 0))
print(f"cuda_check: {len(rows)} kernel builds, {spilling} with spills")
if bad:
    print("cuda_check: FAIL\n  " + "\n  ".join(bad), file=sys.stderr)
    sys.exit(1)
print("cuda_check: OK")
PY
