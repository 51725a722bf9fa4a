# The same entry points for people and CI. `make serve` and `make test` are the two
# set-up commands of the README: each creates .venv at the repository root if needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: serve test test-fast check lint typecheck pytest bench kafka clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Install and run phasewatch on the embedded default (SQLite at ./phasewatch.db, no Kafka).
serve: $(STAMP)
	$(BIN)/phasewatch serve

## Install and run everything CI runs: lint, types, and all test tiers (real broker included).
test: $(STAMP) lint typecheck pytest

## The pure and in-process tiers only (no Kafka broker, no spawned services): under 30 s.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider -q -n 2 -m "not kafka and not slow and not fuzz" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check consumer handlers tests bench deploy
	$(BIN)/ruff format --check consumer handlers

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider $(PYTEST_ARGS)

## Benchmarks (numbers go in the README); not part of the test suite.
bench: $(STAMP)
	$(BIN)/python bench/webhook_bench.py
	$(BIN)/python bench/ingest_bench.py

## A local single-node Kafka broker (jars from Maven Central, cached), in the foreground,
## with phasewatch's default topic and its dead-letter topic created.
KAFKA_TOPIC      ?= livepeer.task-events
KAFKA_PARTITIONS ?= 4
kafka: $(STAMP)
	$(BIN)/python deploy/kafka_local.py start \
		--create-topic $(KAFKA_TOPIC):$(KAFKA_PARTITIONS) --create-topic $(KAFKA_TOPIC).dlq:1

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
