# One command sets everything up on a fresh machine and runs the tests: make test
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel lies on the CI machines' disk; on a GPU machine set TORCH= to keep the installed build.
TORCH ?= torch==2.13.0
TRITON ?= triton==3.9.0
PY := $(VENV)/bin/python

.PHONY: setup test test-gpu bench bench-cpu demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned, so that nothing later can pull a multi-GB CUDA build onto a CPU machine
	$(PY) -m pip install -q $(TORCH) $(TRITON)
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	touch $@

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
