# make test           set up .venv (CPU torch from the pinned version), build the extension, run the whole suite
# make bench          every op's speedup suite, default profile (<= 10 min on a 2-core host), into
#                     bench-results/<UTC timestamp>/ (results.json, report.md, plots; bench-results/latest)
# make bench-quick    the same at small shapes (about a minute)
# make bench-compare A=bench-results/<run> B=bench-results/<run>   per-case times and speedups of two runs
# make bench-isa      the CPU attention suite once per ISA path of our kernels (KANDINSKY_CPU_ISA forced,
#                     quick shapes), one side-by-side report.md; paths this CPU cannot run listed as skipped
#                     (ISA_PATHS=avx2,avx512 picks some; BENCH_ARGS='--profile default' for the goal shapes).
#                     All 5 paths took 3 min 16 s on this 2-vCPU host (Intel Xeon with AMX; the scalar
#                     baseline path 77 s of it) with a warm inductor cache (Flex compiles once, cached)
# BENCH_ARGS passes more driver options, e.g. BENCH_ARGS='-k nabla' or BENCH_ARGS='--out /tmp/run'
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# On machines without an NVIDIA driver pin the CPU build that lies on local disk, so pip never pulls
# a multi-GB CUDA wheel. Where nvidia-smi exists, take any torch >= 2.6.
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.6,torch==2.13.0)
# Without a GPU the Triton kernels are tested in the interpreter, which needs Triton >= 3.7 under
# NumPy >= 2.4; with one, keep whatever triton the CUDA torch pins.
TRITON_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),triton>=3.2,triton>=3.7)
# Optional integrations the suite also tests (their tests skip where these are missing): diffusers'
# video transformers and VAE (pinned: the integration follows its attention-processor API) and PyAV
# for MP4 output. Neither pulls torch. TEST_EXTRAS= leaves them out.
TEST_EXTRAS ?= diffusers==0.42.1 av
PYTEST_ARGS ?=
BENCH_ARGS ?=
ISA_PATHS ?= all

.PHONY: test bench bench-quick bench-compare bench-isa ext venv clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-run when the Makefile changes too: a dependency added here must reach existing checkouts.
$(VENV)/.deps: $(PY) setup.py pyproject.toml Makefile
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install "setuptools>=64" wheel ninja numpy safetensors "pytest>=8" "pytest-benchmark>=4" matplotlib \
	  tqdm fsspec s3fs "moto[server]" "$(TRITON_SPEC)" $(TEST_EXTRAS)
	KANDINSKY_SKIP_EXT=1 $(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

venv: $(VENV)/.deps

# Builds kandinsky_kernels/_C*.so in place (ninja; MAX_JOBS honoured). flock serialises parallel builds.
ext: venv
	flock .ext.lock $(PY) setup.py -q build_ext --inplace

# The build is portable (every ISA path compiled in, chosen at run time); the second step runs the
# C++ attention tests again with the dispatch forced to the AVX2 path that laptops take.
test: ext
	$(PY) -m pytest tests $(PYTEST_ARGS)
	KANDINSKY_CPU_ISA=avx2 $(PY) -m pytest tests/test_block_sparse_attention.py -q -k cpu -p no:cacheprovider
	KANDINSKY_BENCH_SMOKE=1 $(PY) -m pytest benchmarks -q --benchmark-disable -p no:cacheprovider

bench: ext
	$(PY) -m benchmarks $(BENCH_ARGS)

bench-quick: ext
	$(PY) -m benchmarks --profile quick $(BENCH_ARGS)

bench-isa: ext
	$(PY) -m benchmarks --cpu-isa $(ISA_PATHS) $(BENCH_ARGS)

bench-compare:
	@if [ -z "$(A)" ] || [ -z "$(B)" ]; then \
	  echo "usage: make bench-compare A=bench-results/<run> B=bench-results/<run>"; exit 2; fi
	$(PY) -m benchmarks.compare "$(A)" "$(B)"

clean:
	rm -rf build kandinsky_kernels/_C*.so *.egg-info .ext.lock
