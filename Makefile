# The README's two commands, `make demo` and `make test`, do all set-up on a fresh machine:
# a local .venv with the project and its dev tools, and (as root on Debian) the system packages
# the tests use (scripts/system-deps.sh).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test fuzz mutants lint bench alerts dashboard chaos venv system-deps clean

# pip shows what it fetches and installs (the first run takes a minute or two, most of it here).
$(STAMP): pyproject.toml
	@echo "== $(VENV): hydra-watchdog and its dev tools (pip's progress below; once per checkout)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --progress-bar on --upgrade pip
	$(BIN)/python -m pip install --progress-bar on -e '.[dev,bench]'
	@echo "== $(VENV) ready"
	touch $@

venv: $(STAMP)

system-deps:
	@bash scripts/system-deps.sh

demo: venv system-deps
	$(BIN)/hydra-watchdog demo

# Hypothesis draws the same examples on every run (the ci profile, tests/harness/
# hypothesis_profiles.py): a landing never depends on the draw.
test: venv system-deps
	$(BIN)/pytest --hypothesis-profile=ci

# Exploration, beside `make test`: the policy oracle (issue 13) on many more seeded traces
# (FUZZ_TRACES and FUZZ_SEED pick how many and which), then every hypothesis test drawing at
# random (the fuzz profile: 1000 examples where a test sets no number of its own).
FUZZ_TRACES ?= 20000
FUZZ_SEED ?= 13000
fuzz: venv
	HYDRA_ORACLE_TRACES=$(FUZZ_TRACES) HYDRA_ORACLE_SEED=$(FUZZ_SEED) \
		$(BIN)/pytest -p no:cacheprovider -s tests/test_policy_oracle.py
	$(BIN)/pytest --hypothesis-profile=fuzz -m hypothesis tests

# Mutation testing of the policy (issue 23 item 11; not in CI, long on two cores): mutmut
# mutates policy.py, situation.py and findings.py ([tool.mutmut] in pyproject.toml), runs the
# policy's fast tests and an oracle campaign of MUTANT_TRACES traces against each mutant, and
# lists the survivors. MUTANTS picks some, e.g. MUTANTS='hydra_watchdog.policy.x__backoff*'.
MUTANTS ?=
MUTANT_TRACES ?= 40
mutants: venv
	$(BIN)/python -m pip install -q -e '.[mutants]'
	HYDRA_ORACLE_TRACES=$(MUTANT_TRACES) $(BIN)/mutmut run --max-children 2 $(MUTANTS)
	$(BIN)/mutmut results | grep -v ': not checked$$' || true

chaos: venv system-deps
	$(BIN)/pytest -m chaos tests/chaos

lint: venv
	$(BIN)/ruff check hydra_watchdog tests bench dashboards
	$(BIN)/ruff format --check hydra_watchdog tests bench dashboards
	$(BIN)/mypy

bench: venv system-deps
	$(BIN)/python -m bench

# The runbook's incidents under a real Prometheus and Alertmanager (issue 26): pages fired and
# avoided, time to resolution; writes its own section of bench/RESULTS.md (a few minutes).
alerts: venv system-deps
	$(BIN)/python -m bench.alerts

# dashboards/hydra-watchdog.json from its generator (tests/test_dashboard.py checks they agree).
dashboard: venv
	$(BIN)/python -m dashboards.hydra_watchdog --write

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis mutants
