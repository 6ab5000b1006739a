# Two entry points for a fresh machine with python3 and make: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest serve bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/relay demo

serve: $(STAMP)
	$(BIN)/relay serve --config relay.toml

lint: $(STAMP)
	$(BIN)/ruff check relay tests bench
	$(BIN)/ruff format --check relay tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

test: lint typecheck pytest

# Delivery latency, CPU and memory for long-poll and SSE clients (about six minutes), then what each
# way of delivering costs per member against today's 3-s polling at war rates (one change per faction
# per second; about four minutes), then durable ingest with and without group commit (one minute);
# rewrites bench/RESULTS.md, bench/RESULTS-per-member.md and bench/RESULTS-ingest.md.
# A benchmark, never a test: these machines are shared and noisy.
bench: $(STAMP)
	$(BIN)/python -m bench.delivery
	$(BIN)/python -m bench.delivery --kinds poll,longpoll,sse --clients 1000 --interval-s 1 --output bench/RESULTS-per-member.md
	$(BIN)/python -m bench.ingest

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache
