# Two commands set everything up: `make demo` and `make test`. A second run skips what is done.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
DEPS_STAMP  := $(VENV)/.deps-stamp
BUILD_STAMP := $(VENV)/.build-stamp
NATIVE_SRC  := $(shell find csrc -type f 2>/dev/null) tools/torch_cmake_vars.py CMakeLists.txt setup.py pyproject.toml
PYTEST_ARGS ?=

.PHONY: all setup build demo test bench bench-smoke gpu-check lint options-doc clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch and torchvision come from local disk here (pip); the rest from the package index.
$(DEPS_STAMP): requirements.txt | $(PY)
	$(PIP) install --quiet -r requirements.txt
	touch $@

# The package, editable, with its native extension built by CMake (rebuilt when csrc changes).
$(BUILD_STAMP): $(DEPS_STAMP) $(NATIVE_SRC)
	$(PIP) install --quiet --no-build-isolation --no-deps -e .
	$(PY) -c "import liftplus_fast, json; print(json.dumps(liftplus_fast.backend_info()['native'], indent=1))"
	touch $@

setup: $(BUILD_STAMP)
build: $(BUILD_STAMP)

demo: $(BUILD_STAMP)
	$(VENV)/bin/liftplus-fast demo

test: $(BUILD_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(BUILD_STAMP)
	$(PY) benchmarks/run.py

bench-smoke: $(BUILD_STAMP)
	$(PY) benchmarks/run.py --smoke

# One unattended check on a CUDA machine without network (docs/gpu.md): installs what does not
# import from WHEELS, builds for the local GPU, runs the GPU tests, a training step with each
# backend, the step and op benchmarks, and writes summary.json + gpu_check.log into OUT (quick
# mode, 8.7 min at most; GPU_CHECK_ARGS=--full for every shape). Uses the Python that holds
# torch, not .venv.
OUT    ?= gpu-check-out
WHEELS ?=
gpu-check:
	$(PYTHON) tools/gpu_check.py $(OUT) $(if $(WHEELS),--wheels $(WHEELS)) $(GPU_CHECK_ARGS)

# ruff (lint + format check) over the Python tree, clang-format over csrc/ (config: pyproject.toml,
# .clang-format). Fix with `ruff check --fix .`, `ruff format .` and `clang-format -i`.
CXX_SRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)
lint: $(DEPS_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SRC)

# docs/options.md is generated from the option declarations (tests/test_option_listing.py checks it).
options-doc: $(BUILD_STAMP)
	$(VENV)/bin/liftplus-fast options --markdown > docs/options.md

clean:
	rm -rf build *.egg-info liftplus_fast/_C*.so liftplus_fast/_build_info.json $(BUILD_STAMP)
