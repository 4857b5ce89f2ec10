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

test: $(INSTALLED)
	$(PY) -m pytest

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
