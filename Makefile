# One command sets up and runs the main job; one sets up and runs the tests.
#   make run        base-model evaluation on the embedded suite, as a cached Prefect flow
#   make test       the whole test suite
#   make test-fast  the unit tests only (no Prefect server, DVC, real model or benchmark scripts): minutes
#   make lint       ruff (lint and format check) and mypy, as CI runs them
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup run test test-fast lint format repro compare ablation serve mlflow-ui mlflow-server clean

setup: $(VENV)/.installed

# CPU machines: constraints.txt pins torch==2.13.0 (the CPU build on these machines).
# GPU machines: install your CUDA torch into the venv first, then `make setup`.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

run: setup
	$(BIN)/unisd run

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not integration and not slow" --ignore=tests/test_benchmarks_quick.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

repro: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/dvc repro evaluate

compare: setup
	$(BIN)/unisd study compare

ablation: setup
	$(BIN)/unisd study ablation

serve: setup
	$(BIN)/unisd serve --with-server

mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

# a shared tracking server on 127.0.0.1:5000 (store in mlflow-server/); workers:
# export MLFLOW_TRACKING_URI=http://127.0.0.1:5000 (README "Scaling out")
mlflow-server: setup
	$(BIN)/unisd tracking-server

clean:
	rm -rf artifacts metrics reports mlflow.db mlartifacts .prefect
