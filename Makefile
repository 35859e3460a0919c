# lrexport: `make demo` and `make test` work on a fresh clone (they set everything up).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch 2.13.0 lies on this kind of machine's disk; override to taste.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint clean

setup: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $@

demo: setup custom-ops
	$(BIN)/lrexport demo

test: setup custom-ops
	$(BIN)/python -m pytest -q --durations=25 $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check lrexport tests bench

clean:
	rm -rf $(VENV) build *.egg-info out

# The ONNX Runtime custom-op library (build/custom_ops/liblrexport_ops.so): fetches the ORT
# headers (Debian libonnxruntime-dev, or ORT_INCLUDE_DIR) and builds with CMake (docs/custom_op.md).
.PHONY: custom-ops
custom-ops: setup
	$(BIN)/python -m lrexport.ortops
