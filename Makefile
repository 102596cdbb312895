# fastanalog: every target does its own set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The CUDA toolkit that compiles the CUDA kernels (they build and link without a GPU).
CUDA_HOME ?= /usr/local/cuda
export CUDA_HOME

.PHONY: setup data demo test test-slow lint bench bench-aihwkit gpu-check clean

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

# aihwkit builds from source against the venv's torch (about 10 minutes here).
bench-aihwkit: setup
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq build-essential python3-dev libopenblas-dev
	$(PY) -m pip install --quiet cmake scikit-build pybind11 ninja setuptools wheel scipy mypy
	$(PY) -m pip install --no-build-isolation --no-binary aihwkit aihwkit
	$(PY) -m fastanalog bench aihwkit

clean:
	rm -rf $(VENV) build *.egg-info fastanalog/*.so
