# make run           set up and start the gateway on SQLite (PORT, DATABASE_URL, ADMIN_SUPER_SECRET honoured)
# make test          set up and run the whole test suite (TEST_WORKERS: 3 processes)
# make translations  extract the dashboard's messages, update the catalogs, compile them
# make screenshots   photograph every dashboard page in both languages into docs/screenshots/
# make bench         the gateway against a bare gevent proxy and the upstream (BENCH_ARGS: bench/README.md)
SHELL := /bin/bash  # translations compares with process substitution
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8080
# Compiled catalogs are built here, never committed (.gitignore has *.mo).
MO := translations/zh_CN/LC_MESSAGES/messages.mo
POT := translations/messages.pot
PYBABEL_EXTRACT := $(BIN)/pybabel extract -F babel.cfg -k _l --no-wrap --project=gateway \
	-o $(POT).new .

.PHONY: run test lint format migrate bench clean translations browser screenshots bytecode

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt requirements-fast.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	@$(BIN)/pip install --quiet -r requirements-fast.txt 2>/dev/null \
		|| echo "make: gunicorn_h1c did not build (no C compiler?): gunicorn parses requests in Python"
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt $(VENV)/.runtime
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

$(MO): translations/zh_CN/LC_MESSAGES/messages.po | $(VENV)/.runtime
	$(BIN)/pybabel compile -d translations

# A fresh extraction that differs only in its creation date leaves the catalogs as they
# are, so running this twice changes nothing.
translations: $(VENV)/.runtime
	$(PYBABEL_EXTRACT)
	@if diff -q <(grep -v '^"POT-Creation-Date' $(POT)) <(grep -v '^"POT-Creation-Date' $(POT).new) >/dev/null; \
		then rm $(POT).new; else mv $(POT).new $(POT); fi
	$(BIN)/pybabel update -i $(POT) -d translations --no-wrap --ignore-pot-creation-date
	$(BIN)/pybabel compile -d translations

# The browser tests drive Debian's Chromium and need a CJK font (apt, as root). When they
# cannot be installed this says so and the tests fail with the same advice.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -e /usr/share/fonts/truetype/wqy/wqy-zenhei.ttc ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-zenhei) \
		|| echo "make: could not install chromium and fonts-wqy-zenhei; the browser tests will fail"; \
	fi

# The project's own modules compiled ahead: every gateway process (the master's prepare,
# each worker, the instance store) imports them, and where PYTHONDONTWRITEBYTECODE is set
# (as on this project's CI machines) Python never keeps what it compiled, so each
# process compiled them again: importing wsgi took 1.4 s of CPU, 1.0 with them compiled.
# Python reads .pyc files whatever that variable says, and compiles a changed source again.
bytecode: | $(BIN)/python
	@$(BIN)/python -m compileall -q gateway tests bench wsgi.py >/dev/null

run: $(VENV)/.runtime $(MO) bytecode
	PORT=$(PORT) $(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

migrate: $(VENV)/.runtime
	$(BIN)/flask --app wsgi migrate

# Three pytest-xdist workers, each given whole files (a module's gateway starts once);
# in file order, so that no long module is left to run alone at the end. Three on two
# cores: most of a server test is waiting (the suite kept 2 cores 68% busy with two
# workers), so a third overlaps the waits (16:00 -> 13:49 on 2026-12-05). TEST_WORKERS=0
# runs everything in one process. A worker that a hung test took down (pyproject's
# faulthandler_timeout) is replaced once; xdist retries the test on the replacement.
TEST_WORKERS ?= 3
test: $(VENV)/.dev $(MO) browser bytecode
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder \
		--max-worker-restart 1 $(PYTEST_ARGS)

screenshots: $(VENV)/.dev $(MO) browser
	GATEWAY_SCREENSHOTS=docs/screenshots $(BIN)/python -m pytest -q tests/test_browser.py \
		-k without_javascript -p no:cacheprovider

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# BENCH_ARGS="--streams 5000" adds the open streams figure; --postgres URL uses PostgreSQL.
bench: $(VENV)/.dev
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
