# Two commands a user needs: `make book` and `make test`. Both create .venv
# and install the project into it on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS ?= test,book
CONSTRAINTS := .ci/constraints.txt

.PHONY: setup test book notebooks bench-cpu clean help

help:
	@echo "make book       run every chapter notebook, then build book/_build/html"
	@echo "make test       run the test suite (pytest)"
	@echo "make bench-cpu  MoE vs dense on this CPU, prints ratios, writes results/"
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

clean:
	rm -rf book/_build book/generated .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
