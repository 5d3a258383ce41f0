# Two things most people want: `make demo` (try it) and `make test` (check it).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint format venv bench bench-flex screenshots clean

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

## Run the product end to end on SQLite against the bundled IB Gateway and Flex Web Service
## simulators (two connections, both synced).
demo: $(STAMP)
	DEBUG=true $(PY) manage.py ibkr_demo $(DEMO_ARGS)

## Run the test suite (DATABASE_URL picks the database; SQLite by default).
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

## The inner loop: every test but the browser tests and those that start processes.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not processes and not browser" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) bench/sync_bench.py $(BENCH_ARGS)

## The import of a 250,000-transaction Flex statement against a bare XML pass (SQLite and
## PostgreSQL: BENCH_ARGS="--database-url postgres://..." or "--databases sqlite").
bench-flex: $(STAMP)
	$(PY) bench/flex_bench.py $(BENCH_ARGS)

## Take the docs' screenshots of the admin again (docs/images/: overview, admin-index,
## sync-runs, sync-run, positions), at 1400 x 900.
screenshots: $(STAMP)
	DOCS_SCREENSHOTS=1 REQUIRE_BROWSER=1 $(PY) -m pytest -q tests/browser/test_overview_browser.py \
		tests/browser/test_layout_browser.py -k "overview_charts or (every_admin_page and 1400x900)"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
