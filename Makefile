# The README's two commands, `make demo` and `make test`, do all set-up on a fresh machine:
# a local .venv with the project and its dev tools, and (as root on Debian) the system packages
# the tests use (scripts/system-deps.sh).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test fuzz lint bench chaos venv system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	touch $@

venv: $(STAMP)

system-deps:
	@bash scripts/system-deps.sh

demo: venv system-deps
	$(BIN)/hydra-watchdog demo

test: venv system-deps
	$(BIN)/pytest

# The policy oracle (issue 13) on many more seeded traces than `make test` runs; FUZZ_TRACES and
# FUZZ_SEED pick how many and which.
FUZZ_TRACES ?= 20000
FUZZ_SEED ?= 13000
fuzz: venv
	HYDRA_ORACLE_TRACES=$(FUZZ_TRACES) HYDRA_ORACLE_SEED=$(FUZZ_SEED) \
		$(BIN)/pytest -p no:cacheprovider -s tests/test_policy_oracle.py

chaos: venv system-deps
	$(BIN)/pytest -m chaos tests/chaos

lint: venv
	$(BIN)/ruff check hydra_watchdog tests bench
	$(BIN)/ruff format --check hydra_watchdog tests bench
	$(BIN)/mypy

bench: venv system-deps
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
