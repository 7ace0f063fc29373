# Two entry points that do the whole set-up on a fresh machine:
#   make demo   virtual environment, torch, build, then the main job
#   make test   the same set-up, then the test suite
# Variables: PYTHON (the interpreter that creates the venv), TORCH (the torch requirement),
# SEGNET_EXT_CUDA / TORCH_CUDA_ARCH_LIST / MAX_JOBS (passed to the build, see setup.py).

PYTHON ?= python3
TORCH ?= torch==2.14.1
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.segnet-ext-installed

.PHONY: demo test bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) setup.py pyproject.toml $(shell find csrc -type f)
	$(PY) -m pip install --quiet "$(TORCH)" numpy ninja setuptools wheel
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m bench.pool

test: install
	$(PY) -m pytest tests

bench: install
	$(PY) -m bench.pool --write

clean:
	rm -rf build $(VENV) segnet_ext/*.so *.egg-info
