# Two set-up commands, each building its own environment from nothing:
#   make demo   -> the main job (aro bench --preset quick)
#   make test   -> the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test standard clean

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

demo: $(VENV)/.ready
	$(BIN)/aro bench --preset quick

test: $(VENV)/.ready
	$(BIN)/python -m pytest

standard: $(VENV)/.ready
	$(BIN)/aro bench --preset standard --out benchmarks/results/standard

clean:
	rm -rf $(VENV) runs
