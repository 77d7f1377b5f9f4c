#!/usr/bin/env bash
# Host emulation of the CUDA kernels, for machines without a GPU: a numeric check of the
# kernels' indexing, masking, tiling and reductions, NOT of the hardware (no timing, no real
# tensor cores, no memory model beyond the barriers).
#
# How: prep.pl rewrites csrc/cuda/*.cu(h) (kernel launches -> emu::launch(...)(args), the
# dynamic shared array -> a per-block buffer); shim.h maps the CUDA built-ins onto host C++:
# one std::thread per GPU thread, blocks run in turn, __syncthreads / warp shuffles are
# std::barrier, and nvcuda::wmma is emulated from its documented semantics (every lane
# computes the whole 16x16 tile; row_major / col_major loads as documented). g++ builds a
# shared library that drive.py calls through ctypes on CPU tensors, with the cases and the
# error rule of tests/test_cuda.py.
#
# Usage: bash tests/cuda_emu/run.sh [ln|gelu|gated|attn|f32|all] [seed]    (attn takes ~5 min on 2 cores)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
BUILD="${BUILD:-/tmp/fastattn_cuda_emu}"
PY="${PY:-python}"
mkdir -p "$BUILD"
for f in "$ROOT"/csrc/cuda/*.cu "$ROOT"/csrc/cuda/*.cuh; do
  base="$(basename "$f")"
  case "$base" in *.cu) base="${base%.cu}.cpp" ;; esac
  perl "$HERE/prep.pl" "$f" > "$BUILD/$base"
done
cp "$HERE/harness.cpp" "$BUILD/"
CUDA_INC="${CUDA_INC:-$(dirname "$(dirname "$(command -v nvcc)")")/include}"
[ -f "$CUDA_INC/cuda_fp16.h" ] || CUDA_INC=/usr/local/cuda/include
g++ -std=c++20 -O1 -pthread -shared -fPIC -w -include "$HERE/shim.h" -I"$CUDA_INC" -I"$BUILD" \
  "$BUILD"/gelu.cpp "$BUILD"/gated_act.cpp "$BUILD"/layernorm.cpp "$BUILD"/attention.cpp "$BUILD"/harness.cpp \
  -o "$BUILD/libemu.so"
"$PY" "$HERE/drive.py" "$BUILD/libemu.so" "${1:-all}" "${2:-0}"
