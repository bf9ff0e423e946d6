# pecm developer entry points. `make test` is the README's test command and what .ci/run calls.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pecm-installed
PYTEST_ARGS ?=

.PHONY: install build test test-all test-gpu test-triton aot-check lint format bench bench-readme bench-index demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Pinned dependencies (torch/torchvision pins install from local files on the CI machines), then the
# project in editable mode, which builds the C++ extension pecm._C with CMake.
$(STAMP): $(BIN)/python requirements.txt pyproject.toml setup.py CMakeLists.txt
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# Rebuild pecm._C in place after editing csrc/.
build: $(STAMP)
	$(BIN)/python setup.py -q build_ext --inplace

test: build
	$(BIN)/python -c "import pecm, pecm._C; print('backends:', pecm.ops.available_backends())"
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-all: build
	$(BIN)/python -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

test-gpu: build
	$(BIN)/python -m pytest -q -m gpu $(PYTEST_ARGS)

# Triton kernels: on a CPU host the test modules set TRITON_INTERPRET=1 for the whole pytest process.
test-triton: build
	$(BIN)/python -m pytest -q tests/test_triton_kernels.py tests/test_triton_grad.py tests/test_triton_backend.py \
		tests/test_triton_pq.py $(PYTEST_ARGS)

# Compile every autotune config of the Triton kernels for sm_90 without a GPU (spills, shared memory).
aot-check: $(STAMP)
	$(BIN)/python kernels/aot_check.py --quick

lint: $(STAMP)
	$(BIN)/ruff check pecm kernels tests bench setup.py

format: $(STAMP)
	$(BIN)/ruff format --line-length 120 pecm kernels tests bench setup.py

bench: build
	$(BIN)/python bench/throughput.py

# Re-measure and rewrite the headline tables of bench/README.md (run alone: it times things)
bench-readme: build
	$(BIN)/python bench/throughput.py --ops topk,rerank,scores --readme

bench-index: build
	$(BIN)/python bench/bench_index.py --n 20000 --out runs/bench/index_smoke.json --force

demo: build
	$(BIN)/python -m pecm demo

clean:
	rm -rf build *.egg-info pecm/_C*.so .pytest_cache

# Packaging check: sdist -> wheel built from it -> fresh venv outside the tree -> import, ops, demo --quick,
# bench index (tests/test_packaging.py; also part of `make test`). The wheel and sdist are left in dist/.
.PHONY: wheel-check
wheel-check: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_packaging.py $(PYTEST_ARGS)
	rm -rf dist && mkdir -p dist
	$(BIN)/python -c "from setuptools import build_meta; print(build_meta.build_sdist('dist'))"
	rm -rf pecm.egg-info
	$(BIN)/python -m pip wheel --no-deps --no-build-isolation --no-cache-dir -w dist dist/pecm-*.tar.gz
