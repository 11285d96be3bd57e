# The two commands of the README: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install build browser interop demo test test-fast test-long lint format protos up down status bench clean

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

demo: build
	$(BIN)/python -m regtest.demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint build browser interop
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m "not regtest"

# The long variants only (minutes): the 60 s load test with 500 unpaid and 50 paying clients.
test-long: build
	$(BIN)/pytest --long -m long -s

# Every benchmark, each against a baseline measured in the same run: bench/results.md.
bench: build
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
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
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info $(JS_INTEROP)/node_modules
