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
	# torchtitan for tests/integrations/test_torchtitan.py: its optimizer container and models need
	# only these (its own requirements add its trainer's datasets, wandb, tensorboard); pinned and
	# without dependencies, so nothing can replace the CPU torch above
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps torchtitan==0.3.0 triton==3.9.0 \
		spmd_types==0.2.3 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1
	touch $@

demo: $(VENV)/.ready
	$(BIN)/aro bench --preset quick

test: $(VENV)/.ready
	$(BIN)/python -m pytest

standard: $(VENV)/.ready
	$(BIN)/aro bench --preset standard --out benchmarks/results/standard

clean:
	rm -rf $(VENV) runs
