# Two entry points: `make demo` and `make test` (the linter, then the tests). Both create .venv (if
# missing) and install the pinned set from constraints.txt; torch 2.13.0 comes from that pin, never an
# unpinned build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test lint test-fast test-integration bench bench-label-efficiency clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps fastmri==0.3.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/demo.sh

bench-label-efficiency: $(STAMP)
	PYTHON=$(CURDIR)/$(BIN)/python bash scripts/bench_label_efficiency.sh

test: $(STAMP) lint
	$(BIN)/python -m pytest -q -ra --durations=15 -n 2 --dist loadgroup

lint: $(STAMP)
	$(BIN)/ruff check .

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

test-integration: $(STAMP)
	$(BIN)/python -m pytest -q -m integration

clean:
	rm -rf runs data hub cache .pytest_cache
