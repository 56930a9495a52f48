# Two commands a user needs: `make book` and `make test`. Both create .venv
# and install the project into it on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS ?= test,book,torch
CONSTRAINTS := .ci/constraints.txt

.PHONY: setup test book notebooks bench-cpu device-check clean help

help:
	@echo "make book       run every chapter notebook, then build book/_build/html"
	@echo "make test       run the test suite (pytest)"
	@echo "make bench-cpu  MoE vs dense on this CPU, prints ratios, writes results/"
	@echo "make device-check PY=python3  on a GPU machine: gpu tests, compute-sanitizer, a gpu-tests record"
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

bench-cpu: $(STAMP)
	$(PY) -m analysis.bench_cpu $(BENCH_ARGS)

# No $(STAMP) prerequisite: GPU machines have their own Python (no .venv), so
# run it there as `make device-check PY=python3`. Pass options in DEVICE_CHECK_ARGS.
device-check:
	$(PY) -m analysis.device_check $(DEVICE_CHECK_ARGS)

clean:
	rm -rf book/_build book/generated .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
