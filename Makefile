# Two entry points: `make demo` and `make test`. Each creates .venv when missing.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
DATA ?= ../shared/data/mtd
OUT ?= demo-out

.PHONY: demo test lint bench clean

$(INSTALLED): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing defectflow into $(VENV) (first run: a few minutes)"
	@$(PY) -m pip install -q -e '.[dev]' 2>&1 | { grep -v "^WARNING: Location" || true; }
	@touch $@

demo: $(INSTALLED)
	$(VENV)/bin/defectflow demo --data $(DATA) --out $(OUT)

# Two workers: one runs the modules that start Ray, in turn; the other the rest (tests/conftest.py).
test: $(INSTALLED)
	$(PY) -m pytest -n 2 --dist loadgroup

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
