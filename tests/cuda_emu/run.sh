#!/usr/bin/env bash
# Host emulation of the CUDA kernels, for machines without a GPU: a numeric check of the
# kernels' indexing, masking, tiling and reductions, NOT of the hardware (no timing, no real
# tensor cores, no memory model beyond the barriers).
#
# How: prep.pl rewrites csrc/cuda/*.cu(h) (kernel launches -> emu::launch(...)(args), the
# dynamic shared array -> a per-block buffer); shim.h maps the CUDA built-ins onto host C++:
# blocks run in turn, a block's threads are fibers on one OS thread switched at barriers
# (__syncthreads, and a warp barrier in each warp-collective op); shuffles, mma.sync m16n8k16
# and ldmatrix exchange per-lane registers with the PTX ISA's fragment layouts; cp.async is a
# deferred copy performed at wait_group; nvcuda::wmma (the simple kernels) is emulated from its
# documented semantics (every lane computes the whole 16x16 tile). g++ builds a shared library
# that drive.py calls through ctypes on CPU tensors, with the cases and the error rule of
# tests/test_cuda.py.
#
# Usage: bash tests/cuda_emu/run.sh [ln|rms|gelu|gated|rotary|attn|f32|fa2|quick|all] [seed]
#   quick: what `make test` runs (tests/test_cuda_emu.py); fa2: the FA2 kernels' whole matrix.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
BUILD="${BUILD:-/tmp/fastattn_cuda_emu}"
PY="${PY:-python}"
mkdir -p "$BUILD"
rm -f "$BUILD"/*.cpp
for f in "$ROOT"/csrc/cuda/*.cu "$ROOT"/csrc/cuda/*.cuh "$ROOT"/csrc/cuda/*.h; do
  base="$(basename "$f")"
  case "$base" in *.cu) base="${base%.cu}.cpp" ;; esac
  perl "$HERE/prep.pl" "$f" > "$BUILD/$base"
done
cp "$HERE/harness.cpp" "$BUILD/"
CUDA_INC="${CUDA_INC:-$(dirname "$(dirname "$(command -v nvcc)")")/include}"
[ -f "$CUDA_INC/cuda_fp16.h" ] || CUDA_INC=/usr/local/cuda/include
g++ -std=c++20 -O1 -pthread -shared -fPIC -w -include "$HERE/shim.h" -I"$CUDA_INC" -I"$BUILD" -I"$ROOT/csrc" \
  "$BUILD"/*.cpp \
  -o "$BUILD/libemu.so"
"$PY" "$HERE/drive.py" "$BUILD/libemu.so" "${1:-all}" "${2:-0}"
