# fastattn: make demo (the main job) / make test (everything CI runs) / make bench / make cuda-check
#
# Everything installs into a virtualenv ($(VENV)). torch is pinned to the CPU wheel this machine
# has; override with e.g. `make test TORCH=torch` (a CUDA build) or TORCH='torch==2.5.1'.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
PY     := $(BIN)/python
DEPS   := $(VENV)/.deps-stamp
PKG    := $(VENV)/.pkg-stamp
NVCC   := $(shell command -v nvcc 2>/dev/null)
# scripts/triton_aot.py compiles every Triton variant (4778 compiles: ~11 min cold on 2 cores,
# seconds with build/triton_aot_cache warm: only changed kernels are compiled again).
# TRITON_AOT_ARGS=--quick: per tile only the variant with every optional flag on (a smoke test,
# not a proof: ptxas spills in some variants with fewer flags, as the full set found in a 16-bit
# attention forward that the quick set passed).
TRITON_AOT_ARGS ?=
AOT_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
PYTEST_ARGS ?=

.PHONY: demo test lint build bench cuda-check asan clean help

help:
	@echo "make demo        train the demo GPT with torch and with fastattn kernels, compare speed"
	@echo "make test        lint, build, cuda-check (CUDA where nvcc exists) and the whole test-suite"
	@echo "make bench       microbenchmarks; tables and plots in benchmarks/results/"
	@echo "make cuda-check  compile csrc/cuda/*.cu and the Triton kernels for sm_80 and sm_90, print"
	@echo "                 registers, spills and shared memory"
	@echo "make asan        the CPU kernels' tests against an AddressSanitizer build"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Third-party dependencies: torch first, pinned, so that nothing after it pulls another torch
# build; then the package itself, editable, with the dev extras that pyproject.toml lists (the
# one list). FASTATTN_SKIP_EXT: pip does not compile the extension; `build` does, in place, so
# that ninja rebuilds only what changed. --no-build-isolation: the build uses the pinned torch.
$(DEPS): pyproject.toml | $(PY)
	$(PY) -m pip install -q "$(TORCH)" numpy setuptools wheel ninja
	FASTATTN_SKIP_EXT=1 $(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $@

# Re-register the editable package when setup.py changes (the dependencies stay).
$(PKG): $(DEPS) setup.py
	FASTATTN_SKIP_EXT=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(PKG)
	$(PY) setup.py -q build_ext --inplace
	$(PY) -m fastattn

lint: $(DEPS)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

cuda-check:
ifeq ($(NVCC),)
	@echo "cuda-check: CUDA sources skipped (nvcc not found)"
else
	PY=$(AOT_PY) bash scripts/cuda_check.sh
endif
	TRITON_CACHE_DIR=$(CURDIR)/build/triton_aot_cache $(AOT_PY) scripts/triton_aot.py $(TRITON_AOT_ARGS)

# make test (and CI) compiles the CUDA sources and every Triton variant for sm_80 and sm_90 (the
# proof the GPU-less project has: failing on a compile error, a 16-bit spill or shared memory
# over the limit; ~11 min cold). `make test TRITON_AOT_ARGS=--quick` for a smoke run.
test: lint build
ifneq ($(NVCC),)
	PY=$(PY) bash scripts/cuda_check.sh
endif
	TRITON_CACHE_DIR=$(CURDIR)/build/triton_aot_cache $(PY) scripts/triton_aot.py --jobs 2 $(TRITON_AOT_ARGS)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: build
	$(PY) -m benchmarks.run

asan: $(PKG)
	PY=$(abspath $(PY)) bash scripts/asan_check.sh

demo: build
	$(PY) -m fastattn.train --preset cpu_small --compare --max-iters 800 --out-dir out/demo

clean:
	rm -rf build fastattn/*.so *.egg-info .pytest_cache
