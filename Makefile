# Two commands set everything up: `make demo` and `make test`. A second run skips what is done.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
DEPS_STAMP  := $(VENV)/.deps-stamp
DEV_STAMP   := $(VENV)/.dev-stamp
BUILD_STAMP := $(VENV)/.build-stamp
NATIVE_SRC  := $(shell find csrc -type f 2>/dev/null) tools/torch_cmake_vars.py CMakeLists.txt setup.py pyproject.toml
PYTEST_ARGS ?=

.PHONY: all setup build demo test install-check bench bench-smoke gpu-check lint options-doc clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch, torchvision and the build tools (torch from local disk here, through pip).
$(DEPS_STAMP): requirements.txt | $(PY)
	$(PIP) install --quiet -r requirements.txt
	touch $@

# The package, editable, with its dependencies (pyproject.toml) and its native extension built
# by CMake against that torch (rebuilt when csrc changes).
$(BUILD_STAMP): $(DEPS_STAMP) $(NATIVE_SRC)
	$(PIP) install --quiet --no-build-isolation -e .
	$(PY) -c "import liftplus_fast, json; print(json.dumps(liftplus_fast.backend_info()['native'], indent=1))"
	touch $@

# Test and lint tools: `make demo` does without them.
$(DEV_STAMP): requirements-dev.txt | $(PY)
	$(PIP) install --quiet -r requirements-dev.txt
	touch $@

setup: $(BUILD_STAMP) $(DEV_STAMP)
build: $(BUILD_STAMP)

demo: $(BUILD_STAMP)
	$(VENV)/bin/liftplus-fast demo

test: $(BUILD_STAMP) $(DEV_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The wheel and the pure-Python install, as a user gets them (tools/install_check.py): both
# wheels built from the build folder above, installed into a new virtual environment with only
# torch and the package's dependencies, run outside the source tree with no compiler on PATH.
install-check: $(BUILD_STAMP)
	$(PY) tools/install_check.py

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
lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SRC)

# docs/options.md is generated from the option declarations (tests/test_option_listing.py checks it).
options-doc: $(BUILD_STAMP)
	$(VENV)/bin/liftplus-fast options --markdown > docs/options.md

clean:
	rm -rf build dist *.egg-info liftplus_fast/_C*.so liftplus_fast/_build_info.json $(BUILD_STAMP)
