# The two commands of the README. Each one sets up what it needs by itself:
# a virtual environment in .venv with the package and its test tools, and the
# embedded Postgres (a PyPI package that ships the server binaries).
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/python run.py $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check campaignstats tests bench run.py
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .campaignstats .pytest_cache .mypy_cache .ruff_cache
