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

# Four pairs, three months of 1h candles from the bundled sample. On a terminal the
# dashboard opens and the replay runs at a pace you can watch (q quits; the summary
# follows); on a pipe or in CI it runs flat out and prints the summary.
SIM_ARGS := --mode sim --feed replay --pairs BTC/USDT,ETH/USDT,SOL/USDT,XRP/USDT --timeframe 1h

sim: $(STAMP)
	$(BIN)/python main.py $(SIM_ARGS)

# The suite on two workers (pytest-xdist): most of its time is daemons, emulators and
# subprocesses waiting on each other, so two workers on two cores take about half the
# wall time of one. A worker that runs out of tests takes some of the other's
# (worksteal): the crash test alone is about three minutes. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2

test: $(DEVSTAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

bench: $(DEVSTAMP)
	$(BIN)/python -m benchmarks.run

lint: $(DEVSTAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
