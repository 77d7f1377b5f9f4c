#!/usr/bin/env bash
# Run the CPU kernels' tests against an AddressSanitizer build of fastattn._C.
#
# The build happens in a scratch copy of the tree (so the normal build is untouched); Python
# itself is not instrumented, so libasan is preloaded and leak detection (which would report
# the interpreter's own allocations) is off: this finds out-of-bounds reads and writes and
# use-after-free in the kernels. Usage: bash scripts/asan_check.sh [pytest args]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PY:-$root/.venv/bin/python}
work=${ASAN_DIR:-/tmp/fastattn-asan}
rm -rf "$work" && mkdir -p "$work"
(cd "$root" && git ls-files -z | xargs -0 cp --parents -t "$work")
cd "$work"
FASTATTN_ASAN=1 "$py" setup.py -q build_ext --inplace
# libstdc++ preloaded right after libasan: otherwise asan's __cxa_throw interceptor finds no real
# __cxa_throw and every C++ exception (TORCH_CHECK) aborts the process.
preload="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
tests=${*:-tests/test_layernorm.py tests/test_rms_norm.py tests/test_attention.py tests/test_gelu.py tests/test_properties.py}
LD_PRELOAD=$preload ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
    "$py" -m pytest -q -p no:cacheprovider -k "not compile and not export" $tests
