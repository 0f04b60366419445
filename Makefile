# make run           set up and start the gateway on SQLite (PORT, DATABASE_URL, ADMIN_SUPER_SECRET honoured)
# make test          set up and run the whole test suite
# make translations  extract the dashboard's messages, update the catalogs, compile them
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8080
# Compiled catalogs are built here, never committed (.gitignore has *.mo).
MO := translations/zh_CN/LC_MESSAGES/messages.mo
PYBABEL_EXTRACT := $(BIN)/pybabel extract -F babel.cfg -k _l --no-wrap --project=gateway \
	-o translations/messages.pot .

.PHONY: run test lint format migrate bench clean translations

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt $(VENV)/.runtime
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

$(MO): translations/zh_CN/LC_MESSAGES/messages.po | $(VENV)/.runtime
	$(BIN)/pybabel compile -d translations

translations: $(VENV)/.runtime
	$(PYBABEL_EXTRACT)
	$(BIN)/pybabel update -i translations/messages.pot -d translations --no-wrap
	$(BIN)/pybabel compile -d translations

run: $(VENV)/.runtime $(MO)
	PORT=$(PORT) $(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

migrate: $(VENV)/.runtime
	$(BIN)/flask --app wsgi migrate

test: $(VENV)/.dev $(MO)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(VENV)/.dev
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
