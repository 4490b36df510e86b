# Quick start: `make run` (set up, train on demo data if no models yet, serve) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/maxmin-inspect
DEMO_DATA ?= data/demo
DEMO_RUN ?= runs/demo
PORT ?= 8000
# Test processes: many tests wait on a server, a model process or a trainer, so two share even two
# cores well; more cost memory (each loads its own models).
TEST_WORKERS ?= 2

.PHONY: install run test lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

install: $(VENV)/.installed

# The demo profile: 48 px and otherwise the trainer's defaults, so the demo shows what a real run
# does. Trains only when no demo run exists yet, then migrates the database and starts the
# service, whose training page (/training) lists the demo data as a dataset.
run: install
	@set -e; if [ ! -f $(DEMO_RUN)/report.json ]; then \
		[ -d $(DEMO_DATA) ] || $(CLI) demo-data $(DEMO_DATA); \
		$(CLI) train $(DEMO_DATA) --size 48 --out $(DEMO_RUN); \
	fi
	$(CLI) db upgrade
	MAXMIN_DATASETS_DIR=$${MAXMIN_DATASETS_DIR:-$(dir $(DEMO_DATA))} \
		$(CLI) serve --host 127.0.0.1 --port $(PORT)

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=10

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs data var .pytest_cache
