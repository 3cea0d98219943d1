# feedfleet. `make run` runs the fleet, `make test` the tests; both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Two test processes; the slow end-to-end tests run one after another in one of them
# (tests/conftest.py), beside the rest. PARALLEL= runs everything in one process.
PARALLEL ?= -n 2 --dist loadgroup

.PHONY: setup browser run test test-fast lint bench chaos mutate mutate-quick clean

setup: $(STAMP)

# Reinstalls only when pyproject.toml changes; `make setup` is safe to repeat.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: setup
	$(BIN)/feedfleet run

# Headless Chromium for the status page's test in the fleet run (Debian's package; root).
browser:
	command -v chromium >/dev/null || \
		(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)

test: setup browser
	$(BIN)/python -m pytest -q $(PARALLEL)

test-fast: setup
	$(BIN)/python -m pytest -q $(PARALLEL) -m "not slow"

lint: setup
	$(BIN)/ruff check common workers simulators chaos tests
	$(BIN)/ruff format --check common workers simulators chaos tests
	$(BIN)/mypy

# The benchmark (tests/bench/): the bench extra brings the official client it compares with.
bench: setup
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m tests.bench

chaos: setup
	$(BIN)/feedfleet chaos

# Mutation testing of the core modules; scores per module against the 85% target.
mutate: setup
	$(BIN)/python -m tests.mutate

mutate-quick: setup
	$(BIN)/python -m tests.mutate --quick

clean:
	rm -rf var mutants .pytest_cache .mypy_cache .ruff_cache
