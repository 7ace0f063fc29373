# Two entry points that do the whole set-up on a fresh machine:
#   make demo   virtual environment, torch, build, then the main job (python/segnet/demo.py): the
#               shipped SegNet-Basic segmenting and evaluated on the bundled CamVid images, then a
#               short training run as the pipeline check, then a one-screen summary
#   make test   the same set-up, then the test suite
# CI also runs the paths that other machines take, on whatever CPU it has:
#   make test-isa        the op and layer tests as a CPU with AVX2 but no AVX-512 runs them,
#                        then as one without AVX2 (ATen, oneDNN and segnet_ext held to that level)
#   make test-cpu-only   the laptop install: torch's CPU build at the oldest version
#                        pyproject.toml admits, so the build skips CUDA; the whole suite but
#                        the sanitizer builds, which check this package's C++ whatever torch it
#                        meets, and ran in `make test`
# Variables: PYTHON (the interpreter that creates the venv), TORCH (the torch requirement),
# EXTRAS (the package's extras to install), PYTEST_ARGS (more arguments to `make test`'s pytest),
# SEGNET_EXT_CUDA / TORCH_CUDA_ARCH_LIST / MAX_JOBS (passed to the build, see setup.py).

PYTHON ?= python3
TORCH ?= torch==2.14.1
# torchvision's PyPI wheels import only beside torch's CUDA builds: the CPU-only run goes without it
EXTRAS ?= test,vision,video
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.segnet-ext-installed

.PHONY: demo test test-isa test-cpu-only bench gpu-check install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) setup.py pyproject.toml $(shell find csrc -type f)
	$(PY) -m pip install --quiet "$(TORCH)" numpy ninja setuptools wheel
	$(PY) -m pip install --quiet --no-build-isolation -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

DEMO ?= runs/demo

demo: install
	$(PY) -m segnet.demo --output $(DEMO)

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

OP_TESTS := tests/test_pool.py tests/test_pool_torch_conventions.py tests/test_conv_bn_relu.py tests/test_recompute.py tests/test_fuzz.py

test-isa: install
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 SEGNET_EXT_NO_AVX512=1 $(PY) -m pytest $(OP_TESTS)
	ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 SEGNET_EXT_NO_AVX2=1 $(PY) -m pytest $(OP_TESTS)

# In a copy of the tree, so that its CPU-only library does not replace this tree's.
CPU_ONLY_TREE ?= build/cpu-only
CPU_ONLY_TORCH ?= torch==2.13.0

test-cpu-only:
	rm -rf $(CPU_ONLY_TREE) && mkdir -p $(CPU_ONLY_TREE)
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t $(CPU_ONLY_TREE)
	$(MAKE) -C $(CPU_ONLY_TREE) test TORCH=$(CPU_ONLY_TORCH) EXTRAS=test VENV=.venv PYTEST_ARGS="-m 'not sanitizers'"

# The day a GPU is lent: builds for it, runs the CUDA tests, compute-sanitizer and the
# bandwidth and cuDNN comparisons, writes bench/RESULTS-gpu.md (bench/gpu_check.py). It uses
# the torch already installed and installs nothing; without a GPU it runs dry.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)

gpu-check:
	PYTHONPATH=$(CURDIR):$(CURDIR)/python $(GPU_PYTHON) -m bench.gpu_check

bench: install
	$(PY) -m bench.pool --write
	$(PY) -m bench.pool --dtype bfloat16 --write
	$(PY) -m bench.pool --dtype float16 --write
	$(PY) -m bench.conv_bn_relu --write
	$(PY) -m bench.report --write
	$(PY) -m bench.recipe --write
	$(PY) -m bench.models --write

clean:
	rm -rf build $(VENV) segnet_ext/*.so *.egg-info runs
