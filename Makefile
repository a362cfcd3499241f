# The two commands of the README, and the rest of the house. Each target sets up what it needs
# by itself: a virtual environment in .venv with the package (the server and the development
# tools: `.[server,dev]`), and the embedded Postgres (a PyPI package that ships the server
# binaries). `make bench` adds the [bench] extra and a Redis server.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed-stamp
BENCH_STAMP := $(VENV)/.bench-stamp
# Python sources that lint checks (ruff would also format the README's code blocks: not ours to).
PY_PATHS := campaignstats tests bench examples run.py

.PHONY: run test test-fast lint bench clean

$(STAMP): pyproject.toml campaignstats/_version.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[server,dev]'
	touch $(STAMP)

# Serves the socket protocol and HTTP (docs/http.md); the server prints the demo page's URL once
# it listens (http://127.0.0.1:7401/ by default).
run: $(STAMP)
	@echo "make run: socket on tcp://127.0.0.1:7400, HTTP on http://127.0.0.1:7401," \
	      "demo page (the busiest campaigns, live): http://127.0.0.1:7401/"
	$(VENV)/bin/python run.py $(ARGS)

# pytest exits with 5 when it collected no tests: make stops on it like on any other failure,
# and says why, so that an empty or mis-selected run never passes.
define pytest
	@$(VENV)/bin/python -m pytest $(1) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5): failing" >&2; fi; \
	exit $$rc
endef

# The whole suite, the tests marked slow included (about 7 to 9 minutes on 2 cores): the README's test
# command, and what CI runs (.ci/run). It ends with its 25 slowest tests, so that a CI log says
# where the time goes (the budget is 10 minutes).
test: $(STAMP)
	$(call pytest,--durations=25)

# The suite without the tests marked slow (pytest -m slow: more than ~20 s each).
test-fast: $(STAMP)
	$(call pytest,-m "not slow")

lint: $(STAMP)
	$(VENV)/bin/ruff check $(PY_PATHS)
	$(VENV)/bin/ruff format --check $(PY_PATHS)
	$(VENV)/bin/mypy

# The bench needs the [bench] extra (redis-py, hiredis, matplotlib, uvloop, py-spy) and a Redis
# server binary, which is a Debian package: installed with apt-get when it is missing.
# `make bench BENCH_ARGS=--quick` for the 1-minute smoke run.
$(BENCH_STAMP): $(STAMP)
	$(VENV)/bin/python -m pip install --quiet -e '.[server,dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	@if ! command -v redis-server >/dev/null 2>&1; then \
	  echo "redis-server is missing: the bench compares against it; installing Debian's" \
	       "redis-server with apt-get (needs root; or install it yourself and rerun)" >&2; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; } \
	  || { echo "could not install redis-server: run 'apt-get install redis-server'," \
	            "or 'python -m bench.run --no-redis' to bench without the Redis peer" >&2; exit 1; }; \
	fi
	$(VENV)/bin/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .campaignstats .pytest_cache .mypy_cache .ruff_cache build *.egg-info
