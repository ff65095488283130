# The README's two commands: `make demo` and `make test`. Everything they need is set up here.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install install-system demo test test-fast down clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[all]'
	@touch $@

install-system:
	@bash scripts/install-system.sh nginx prometheus prometheus-alertmanager
	@bash scripts/install-system.sh wrk || echo "wrk missing and not root: only \`abfleet bench\` needs it"

demo: install install-system
	$(BIN)/python -m abfleet.demo

test: install install-system
	@bash scripts/install-system.sh chromium docker-compose || echo "chromium or docker-compose missing and not root: the browser and compose checks will skip (see above)"
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow and not e2e and not sim" $(PYTEST_ARGS)

down:
	@if [ -x $(BIN)/abfleet ]; then $(BIN)/abfleet down; fi

clean: down
	rm -rf .run test-output
