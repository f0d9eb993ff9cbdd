"""The largest rank (bottleneck width for adapters) that each op's kernels take: one place for every limit.

Triton-free and torch-free: the ops read these to choose a backend before any kernel module is imported.
Above a Triton limit, `auto` takes the PyTorch backend and an explicit `triton` raises BackendUnavailableError.
"""

# LoRA linear (kernels/lora_linear.py): the shrink and dY kernels hold [BLOCK_M, r] accumulators in registers
# (rank blocks 16 .. 256); larger ranks would need R-chunked accumulators.
LORA_MAX_RANK_TRITON = 256
# LoRA linear, CUDA C++ backend: csrc/fastpeft_cuda.h `kMaxRank` holds the same number (the extension also
# reports it as fastpeft._C.max_rank); tests/test_lora_kernels_static.py checks that the two agree.
LORA_MAX_RANK_CUDA = 256
# Multi-LoRA (kernels/multi_lora.py): the largest rank in an adapter pool; its skinny kernels' rank buckets
# are 64 and 128.
MULTI_LORA_MAX_RANK_TRITON = 128
# Bottleneck adapter (kernels/adapter.py): the widest bottleneck its register tiles are laid out for.
ADAPTER_MAX_BOTTLENECK_TRITON = 256
