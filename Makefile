# Two entry points for a fresh machine with python3 and make: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYZ := dist/cat-relay.pyz
# The locks (README, "Updating dependencies"): what goes into the pyz; what the venv of `make test`
# and CI holds (the same versions, plus the tests' and the build's tools); that plus the benchmark's.
# Every line is pinned with its hashes, and each file says `--only-binary :all:`, so that no source
# distribution runs a build with unlocked build dependencies of its own.
RUNTIME_LOCK := requirements/runtime.txt
DEV_LOCK := requirements/dev.txt
BENCH_LOCK := requirements/bench.txt
# Everything that goes into the pyz (README.md is the package description), so that an unchanged
# checkout is not built again.
PYZ_SOURCES := pyproject.toml README.md $(RUNTIME_LOCK) \
    $(shell find relay migrations -type f -not -path '*/__pycache__/*')

.PHONY: demo test lint typecheck pytest serve bench clean pyz lock

# Without --no-deps, so that pip refuses a lock that misses a dependency of what it lists. The project
# itself last, without its dependencies (the lock's) and built by the lock's hatchling: nothing that
# the venv holds comes from outside the lock.
$(STAMP): pyproject.toml $(DEV_LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes -r $(DEV_LOCK)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
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

# tests/test_pyz.py builds the pyz itself (`make pyz`), so that no other test waits for shiv.
pytest: $(STAMP)
	$(BIN)/pytest

test: lint typecheck pytest

PYZ_BUILD := build/pyz

# One file to copy to a server (README, "Deploy on a Debian VM"): this checkout and exactly the
# runtime lock's dependencies, run by the server's own python3. --reproducible fixes every file's
# date, so rebuilding the same checkout in the same place gives the same bytes. The dependencies and
# the relay are installed into two folders that shiv packs together, because pip --target skips a
# folder that is already there (bin/, which both have). Written aside first, so that a failed build
# leaves no pyz that looks up to date.
$(PYZ): $(STAMP) $(PYZ_SOURCES)
	rm -rf $(PYZ_BUILD) && mkdir -p dist
	$(BIN)/pip install --quiet --require-hashes --no-compile --target $(PYZ_BUILD)/dependencies \
	    -r $(RUNTIME_LOCK)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation --no-compile --target $(PYZ_BUILD)/relay .
	$(BIN)/shiv --reproducible --console-script relay --python '/usr/bin/env python3' \
	    --site-packages $(PYZ_BUILD)/dependencies --site-packages $(PYZ_BUILD)/relay --output-file $@.tmp
	mv $@.tmp $@

pyz: $(PYZ)

# The newest versions that pyproject.toml admits, resolved with uv for the pyz's and CI's Python
# (3.11 on Debian 12's x86-64, glibc 2.36) whatever machine runs it; each lock within the one
# before, so that the tests run on exactly the versions the pyz ships.
LOCK := $(BIN)/uv pip compile pyproject.toml --quiet --upgrade --generate-hashes --only-binary :all: \
    --emit-build-options --python-version 3.11 --python-platform x86_64-manylinux_2_36
lock: $(STAMP)
	$(LOCK) --output-file $(RUNTIME_LOCK)
	$(LOCK) --extra test --extra deploy --constraint $(RUNTIME_LOCK) --output-file $(DEV_LOCK)
	$(LOCK) --extra test --extra deploy --extra bench --constraint $(DEV_LOCK) --output-file $(BENCH_LOCK)

BENCH_STAMP := $(VENV)/.bench-installed

# The benchmark's own tools: py-spy (the `bench` extra, locked), wrk (Debian), Express (npm ci, locked).
$(BENCH_STAMP): $(STAMP) $(BENCH_LOCK)
	$(BIN)/pip install --quiet --require-hashes -r $(BENCH_LOCK)
	command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	command -v npm >/dev/null || { apt-get update -qq && apt-get install -y -qq nodejs npm; }
	touch $(BENCH_STAMP)

# Issue 6's goals, each in its own results file (about 45 minutes; a benchmark, never a test: these
# machines are shared and noisy, so nothing else should run meanwhile):
#   RESULTS-shortpoll.md   short polls: the relay against bare hypercorn and the Node relay (wrk)
#   RESULTS.md             delivery latency, CPU and memory for long-poll and SSE, 1,000 and 5,000 clients
#   RESULTS-capacity.md    members per core at p99 <= 1 s: the relay's SSE against the Node relay at 1-s polls
#   RESULTS-per-member.md  each way of delivering's cost per member against today's 3-s polling
#   RESULTS-ingest.md      durable ingest with and without group commit
#   RESULTS-flood.md       one faction flooded at 1,000-10,000 changes/s: kept, dropped, reconnects
#   RESULTS-footprint.md   memory per held client and per idle faction, and start-up time
#   RESULTS-budget.md      issue 16: the relay's RSS under the worst legitimate load at the defaults, against its budget
#   RESULTS-upstream-cost.md issue 17: REST requests and bytes, connects, joins, heartbeats per faction-hour and day
#   PROFILE-sse.md         py-spy of the relay delivering to 5,000 SSE clients (short polls: in RESULTS-shortpoll.md)
#   PROFILE-longpoll.md    py-spy of the relay holding 3,000 long-polling members (issue 18's shortfall)
#   PROFILE-footprint.md   tracemalloc: where a held SSE client's and an idle faction's memory goes
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.shortpoll
	$(BIN)/python -m bench.delivery
	$(BIN)/python -m bench.capacity
	$(BIN)/python -m bench.delivery --kinds poll,longpoll,sse --clients 1000 --interval-s 1 --output bench/RESULTS-per-member.md
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.flood
	$(BIN)/python -m bench.footprint
	$(BIN)/python -m bench.budget
	$(BIN)/python -m bench.big_answers
	$(BIN)/python -m bench.upstream_cost
	$(BIN)/python -m bench.delivery --kinds sse --clients 5000 --duration-s 20 --profile bench/PROFILE-sse.md
	$(BIN)/python -m bench.delivery --kinds longpoll --clients 3000 --duration-s 20 --profile bench/PROFILE-longpoll.md
	$(BIN)/python -m bench.footprint --tracemalloc --parts clients,factions --kinds sse --clients 3000 --factions 200 --output bench/PROFILE-footprint.md

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache
