# One command sets everything up on a fresh machine and runs the tests: make test
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel lies on the CI machines' disk; on a GPU machine set TORCH= to keep the installed build.
TORCH ?= torch==2.13.0
TRITON ?= triton==3.9.0
PY := $(VENV)/bin/python

.PHONY: setup test bench bench-cpu bench-gpu demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned, so that nothing later can pull a multi-GB CUDA build onto a CPU machine
	$(PY) -m pip install -q $(TORCH) $(TRITON)
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	touch $@

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m fastpeft.bench $(BENCH_ARGS)

bench-cpu: setup
	$(PY) -m fastpeft.bench --preset cpu --device cpu

# on a GPU machine with the project's dependencies present: CUDA tests + full grid + pytest-benchmark, < 10 min
bench-gpu:
	bash benchmarks/gpu_session.sh

clean:
	rm -rf $(VENV) build *.egg-info
