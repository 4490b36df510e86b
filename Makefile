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

# MLServer, an Open Inference Protocol server from PyPI, in a venv of its own (its pins differ from
# the service's): tests/test_remote.py serves the exported models with it.
OIP_VENV ?= .venv-oip
$(OIP_VENV)/.installed:
	python3 -m venv $(OIP_VENV)
	$(OIP_VENV)/bin/python -m pip install --quiet --disable-pip-version-check 'mlserver>=1.6' 'onnxruntime>=1.18'
	touch $@

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

test: install $(OIP_VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=10

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) $(OIP_VENV) runs data var .pytest_cache
