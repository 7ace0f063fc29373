# Two entry points that do the whole set-up on a fresh machine:
#   make demo   virtual environment, torch, build, then the main job: a short SegNet-Basic
#               training on the bundled CamVid sample, its evaluation, and predictions
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

DEMO ?= runs/demo

demo: install
	$(VENV)/bin/segnet train --data sample --model segnet_basic --optimizer adam --lr 0.003 \
	    --scale 0.5 --epochs 30 --val-every 10 --batch-size 2 --output $(DEMO)
	$(VENV)/bin/segnet eval --checkpoint $(DEMO)/best.pt --data sample --output $(DEMO)/eval_val.json
	$(VENV)/bin/segnet predict --checkpoint $(DEMO)/best.pt --input sample --output $(DEMO)/predictions
	@echo "demo done: checkpoints $(DEMO)/best.pt and last.pt, curves $(DEMO)/curves.png, log $(DEMO)/metrics.csv," \
	      "metrics $(DEMO)/eval_val.json, predictions $(DEMO)/predictions/"

test: install
	$(PY) -m pytest tests

bench: install
	$(PY) -m bench.pool --write
	$(PY) -m bench.conv_bn_relu --write
	$(PY) -m bench.report --write
	$(PY) -m bench.recipe --write

clean:
	rm -rf build $(VENV) segnet_ext/*.so *.egg-info runs
