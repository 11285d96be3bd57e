# The two commands of the README: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install build browser postgres interop demo test test-fast test-pythons test-long lint format protos up down status bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# LND and btcd from the Go module proxy; cached, so only the first run takes minutes.
build: install
	$(BIN)/python -m regtest build

# Debian's chromium for the paywall's browser test (Playwright drives it; its own browser
# downloads are never used). Installed once, as root; anyone else is told what to run.
CHROMIUM := /usr/bin/chromium
browser:
	@if [ -x $(CHROMIUM) ]; then \
		echo "browser: $$($(CHROMIUM) --version 2>/dev/null || echo $(CHROMIUM))"; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	else \
		echo "error: $(CHROMIUM) is missing and installing it needs root:" \
			"sudo apt-get install chromium" >&2; \
		exit 1; \
	fi

# Debian's PostgreSQL for the PostgreSQL store's tests, which start a throwaway server of their
# own (tests/postgres_server.py; no system-wide server is used). Installed once, as root;
# anyone else is told what to run. `make demo` runs on SQLite and needs none of it.
POSTGRES_BIN = $$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
postgres:
	@bindir=$(POSTGRES_BIN); \
	if [ -n "$$bindir" ] && [ -x "$$bindir/initdb" ]; then \
		echo "postgres: $$bindir"; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql; \
	else \
		echo "error: PostgreSQL's server binaries are missing and installing them needs root:" \
			"sudo apt-get install postgresql" >&2; \
		exit 1; \
	fi

# The npm L402 client the interop tests run with node, pinned by the committed lockfile.
JS_INTEROP := tests/interop/js
JS_STAMP := $(JS_INTEROP)/node_modules/.installed
$(JS_STAMP): $(JS_INTEROP)/package.json $(JS_INTEROP)/package-lock.json
	@if ! command -v npm >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y nodejs npm; \
		else \
			echo "error: npm (Node.js 18 or newer) is missing: sudo apt-get install nodejs npm" >&2; \
			exit 1; \
		fi; \
	fi
	cd $(JS_INTEROP) && npm ci --no-audit --no-fund
	touch $@

interop: $(JS_STAMP)

# DEMO_ARGS="--listen 0.0.0.0:8402 --stay" keeps it serving (docker-compose.yml does).
demo: build
	$(BIN)/python -m regtest.demo $(DEMO_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint build browser interop postgres test-pythons
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m "not regtest"

# The fast suite on the other supported Pythons (from PATH or pyenv), one venv each
# (.venv-3.12, ...). 3.12 gets the lowest grpcio and protobuf the package allows, the others
# the newest. A Python that is not there is skipped, except under CI. The fast suites include
# the PostgreSQL store's tests.
OTHER_PYTHONS := 3.12 3.13
LOWEST_PINS_3.12 := grpcio==1.85.1 protobuf==7.35.1
PYENV_VERSIONS := $(or $(PYENV_ROOT),$(HOME)/.pyenv)/versions
find_python = $$({ ls -d $(PYENV_VERSIONS)/$(1).*/bin/python$(1); \
	python$(1) -c 'import sys; print(sys.executable)'; } 2>/dev/null | head -1)

.venv-%/.installed: pyproject.toml
	python=$(call find_python,$*); $$python -m venv .venv-$*
	.venv-$*/bin/pip install --quiet --upgrade pip
	.venv-$*/bin/pip install --quiet -e '.[dev]' $(LOWEST_PINS_$*)
	touch $@

test-pythons: postgres
	@for v in $(OTHER_PYTHONS); do \
		if [ -z "$(call find_python,$$v)" ]; then \
			echo "python$$v: not found (PATH or pyenv)" >&2; \
			if [ -n "$$CI" ]; then exit 1; else continue; fi; \
		fi; \
		$(MAKE) --no-print-directory .venv-$$v/.installed || exit 1; \
		echo "fast suite on $$(.venv-$$v/bin/python --version)" \
			"$$(.venv-$$v/bin/pip list 2>/dev/null | grep -E '^(grpcio|protobuf) ' | tr -s ' ' | paste -sd' ')"; \
		.venv-$$v/bin/pytest -m "not regtest" -q || exit 1; \
	done

# The long variants only (minutes): the 60 s load test with 500 unpaid and 50 paying clients.
test-long: build
	$(BIN)/pytest --long -m long -s

# Every benchmark, each against a baseline measured in the same run: bench/results.md.
bench: build
	command -v wrk >/dev/null && command -v valgrind >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq wrk valgrind)
	$(BIN)/python -m bench

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

protos: install
	$(BIN)/python protos/generate.py

up: build
	$(BIN)/python -m regtest up

down: install
	$(BIN)/python -m regtest down

status: install
	$(BIN)/python -m regtest status

clean:
	rm -rf $(VENV) .venv-3.* .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info $(JS_INTEROP)/node_modules
