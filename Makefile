# fastanalog: every target does its own set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# aihwkit, built from source against the venv's torch (bench-aihwkit, crosscheck).
AIHWKIT_VERSION := 1.2.0
AIHWKIT_STAMP := $(VENV)/.aihwkit-$(AIHWKIT_VERSION)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The CUDA toolkit that compiles the CUDA kernels (they build and link without a GPU).
CUDA_HOME ?= /usr/local/cuda
export CUDA_HOME

.PHONY: setup data demo test test-slow lint bench bench-aihwkit crosscheck reproduce reproduce-quick gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel ninja
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	MAX_JOBS=2 $(PY) -m pip install --quiet --no-build-isolation -e ".[dev]"
	touch $(STAMP)

data: $(FMNIST)

$(FMNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

demo: setup data
	$(PY) examples/demo.py

lint: setup
	$(VENV)/bin/ruff check .

test: setup data lint
	$(PY) -m pytest -q

test-slow: setup data
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) -m fastanalog bench step
	$(PY) -m fastanalog bench train
	$(PY) -m fastanalog bench kernels

# On a machine with a CUDA GPU: GPU tests, kernel and ResNet-50 step benchmarks, static
# compile figures, one report (results/gpu-check/REPORT.md). Without a GPU it says so, exit 2.
gpu-check: setup
	$(PY) benchmarks/gpu_check.py

# The paper's experiments: results/reproduce/REPORT.md (70-80 minutes on 2 cores), or the
# few-minute version (results/reproduce-quick/REPORT.md).
reproduce: setup data
	$(PY) -m fastanalog reproduce --out results/reproduce

reproduce-quick: setup data
	$(PY) -m fastanalog reproduce --quick --out results/reproduce-quick

# aihwkit builds from source against the venv's torch (10 to 15 minutes on 2 cores). Its build
# calls mypy's stubgen from PATH, so the venv's bin folder goes first on PATH.
$(AIHWKIT_STAMP): $(STAMP)
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq build-essential python3-dev libopenblas-dev
	$(PY) -m pip install --quiet cmake scikit-build pybind11 ninja setuptools wheel scipy mypy
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" MAX_JOBS=2 $(PY) -m pip install --no-build-isolation --no-binary aihwkit aihwkit==$(AIHWKIT_VERSION)
	$(PY) -c "import aihwkit"
	touch $(AIHWKIT_STAMP)

bench-aihwkit: setup $(AIHWKIT_STAMP)
	$(PY) -m fastanalog bench aihwkit

# fastanalog against aihwkit, number by number: results/crosscheck/CROSSCHECK.md.
crosscheck: setup $(AIHWKIT_STAMP)
	$(PY) -m fastanalog bench aihwkit --crosscheck --out results/crosscheck

clean:
	rm -rf $(VENV) build *.egg-info fastanalog/*.so
