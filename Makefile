# Two commands a user needs: `make book` and `make test`. Both create .venv
# and install the project into it on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS ?= test,book,torch
CONSTRAINTS := .ci/constraints.txt

.PHONY: setup test book book-check notebooks bench-cpu sweep-cpu gpu-wheels device-check train-cpu train-gpu clean help

help:
	@echo "make book       run every chapter notebook, then build book/_build/html"
	@echo "make test       run the test suite (pytest)"
	@echo "make book-check open every built page in headless Chromium; screenshots in book/_build/screens"
	@echo "make bench-cpu  MoE vs dense on this CPU, prints ratios, writes results/"
	@echo "make sweep-cpu  the benchmark sweep on this CPU (SWEEP_THREADS=1 on a shared machine), writes results/"
	@echo "make gpu-wheels download the wheels a GPU machine lacks (nsight-python 0.9 and its needs) into .whl/"
	@echo "make device-check PY=python3  on a GPU machine: gpu tests, compute-sanitizer, the GPU sweep, records"
	@echo "make device-check DRY=1       the same run rehearsed on this CPU (emulator, stand-in tools; no GPU result)"
	@echo "make train-cpu  train the accuracy study's cpu preset (all arms, 3 seeds; ~1 h on 2 cores, resumable), then score on the whole test split"
	@echo "make train-gpu  the same with the larger gpu preset on a CUDA device"
	@echo "make setup      create .venv and install the project (done by the others)"
	@echo "make clean      remove generated notebooks, the built book and caches"

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

notebooks: $(STAMP)
	$(PY) -m analysis.run_notebooks

book: notebooks
	$(VENV)/bin/jupyter-book build book --warningiserror --keep-going

# Every page of the built book in headless Chromium (Debian's `chromium`): no
# request off the file system, no console error, no zero-size chart, no unfilled
# glue, no table wider than the page. Run `make book` first.
book-check: $(STAMP)
	$(PY) -m analysis.book_check

bench-cpu: $(STAMP)
	$(PY) -m analysis.measure.bench_cpu $(BENCH_ARGS)

# The sweep (analysis/measure/sweep.py) at CPU-sized shapes. SWEEP_THREADS sets the
# BLAS and OpenMP thread counts (they must be set before NumPy starts).
sweep-cpu: $(STAMP)
	$(if $(SWEEP_THREADS),OPENBLAS_NUM_THREADS=$(SWEEP_THREADS) OMP_NUM_THREADS=$(SWEEP_THREADS) MKL_NUM_THREADS=$(SWEEP_THREADS)) $(PY) -m analysis.measure.sweep --plan cpu-default $(SWEEP_ARGS)

# Pure-Python (and one manylinux) wheels the GPU machine lacks: nsight-python
# 0.9 (1.x needs ncu >= 2026.2.1; the machines have 2025.3) and its needs.
# Carry .whl with the run and pip install --no-index --target from it there.
GPU_WHEELS := nsight-python==0.9.6 deepdiff==8.6.2 orderly-set==5.5.0 nvtx==0.2.17
gpu-wheels:
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)

# No $(STAMP) prerequisite: GPU machines have their own Python (no .venv), so
# run it there as `make device-check PY=python3`. Nothing is installed there:
# PYTHONPATH puts topk_moe (kernels/) and analysis (the root) on the path, and
# every step's subprocess inherits it. Pass options in DEVICE_CHECK_ARGS
# (--deadline-s, --steps sweep, ...: python -m analysis.measure.device_check --help).
# DRY=1 rehearses the whole run on this CPU (cuda-emulated backend, stand-ins for
# compute-sanitizer and ncu, records in a temporary folder): no GPU result.
device-check:
	PYTHONPATH=$(CURDIR)/kernels:$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PY) -m analysis.measure.device_check $(if $(DRY),--rehearse) $(DEVICE_CHECK_ARGS)

# Training, then the whole-test-split scores the Accuracy chapter reads (accuracy-rescore
# records); both skip what is done already, so an interrupted run resumes.
train-cpu: $(STAMP)
	$(PY) -m analysis.study.train --preset cpu $(TRAIN_ARGS)
	$(PY) -m analysis.study.evaluation --preset cpu

train-gpu: $(STAMP)
	$(PY) -m analysis.study.train --preset gpu $(TRAIN_ARGS)
	$(PY) -m analysis.study.evaluation --preset gpu

clean:
	rm -rf book/_build book/generated .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
