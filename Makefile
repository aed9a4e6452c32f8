# Every target creates .venv and installs on its own; a stamp file keeps re-runs fast.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev

.PHONY: sim test bench lint clean help

help:
	@echo "make sim    run the paper-trading sim on the bundled sample (offline)"
	@echo "make test   run the whole test suite"
	@echo "make bench  run benchmarks/ and write benchmarks/RESULTS.md"
	@echo "make lint   ruff + mypy"

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

$(DEVSTAMP): requirements.txt requirements-dev.txt $(STAMP)
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

sim: $(STAMP)
	$(BIN)/python main.py --mode sim --feed replay --no-ui --duration 60

test: $(DEVSTAMP)
	$(BIN)/python -m pytest

bench: $(DEVSTAMP)
	$(BIN)/python -m benchmarks.run

lint: $(DEVSTAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
