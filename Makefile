# Quick start: `make run` (set up, make demo data, train, write the report) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/maxmin-inspect
DEMO_DATA ?= data/demo
DEMO_RUN ?= runs/demo

.PHONY: install run demo-report test lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

install: $(VENV)/.installed

$(DEMO_DATA): | install
	$(CLI) demo-data $(DEMO_DATA)

# The demo profile: 48 px, 12 epochs, 3 seeds; a few minutes on a 2-core CPU.
run: install $(DEMO_DATA)
	$(CLI) train $(DEMO_DATA) --size 48 --epochs 12 --seeds 3 --out $(DEMO_RUN)
	@echo
	@echo "Demo data:  $(DEMO_DATA) (synthetic metal surfaces: dent, good, scratch, spots)"
	@echo "PoC report: $(DEMO_RUN)/report.html (open it in a browser)"

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs data .pytest_cache
