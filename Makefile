# Two commands do all the set-up on a fresh machine:
#   make demo   the whole loop on the embedded default (no servers needed)
#   make test   the test suite (needs the local PostgreSQL, Redis and RabbitMQ)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint bench soak

$(BIN)/orch-outbox: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: $(BIN)/orch-outbox
	$(BIN)/orch-outbox demo

lint: $(BIN)/orch-outbox
	$(BIN)/ruff check orch_outbox tests bench scripts examples
	$(BIN)/ruff format --check orch_outbox tests bench scripts examples
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

bench: $(BIN)/orch-outbox
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench

soak: $(BIN)/orch-outbox
	$(BIN)/python scripts/soak.py
