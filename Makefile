# Set-up is part of every target: a fresh machine needs only python3 (3.10+).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# torch is installed on its own first: 2.13.0 is the CPU build on local disk, and asking for
# it alone keeps pip from resolving a multi-GB CUDA build for diffusers' sake.
$(VENV)/.test: $(VENV)/.core
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.core
	$(PY) -m dod_jax.forward_demo --workdir runs/forward_demo

test: $(VENV)/.test
	$(PY) -m pytest -q tests

bench: $(VENV)/.test
	$(PY) bench/forward.py
	$(PY) bench/input_pipeline.py

clean:
	rm -rf $(VENV) runs .pytest_cache
