// The dropout stream of fastpeft on the CPU: plain C++ (no torch headers), raw pointers, sizes and strides
// in elements. Bit-identical to kernels/philox.py, fastpeft/dropout.py and csrc/common.cuh: element (row, col)
// of a [rows, cols] mask takes word col % 4 of Philox4x32-10 with counter (col / 4, row, 0, 0) and key
// (seed, 0); it is kept when (word >> 1) >= thr, thr = round(p * 2**31).
//
// Every function works on the rows [row0, row1) only, so that the caller can split the rows over threads
// (csrc/cpu/bindings_cpu.cpp uses at::parallel_for). Outputs are contiguous [rows, cols] buffers; x may have
// any strides (0 and overlapping included). The arithmetic is that of the PyTorch twin,
// `torch.where(keep, x, 0) * scale` with a Python float `scale` on a CPU tensor: the scale is rounded to
// float32 once; fp16/bf16 elements are widened to float32, multiplied, rounded to nearest-even back to
// their dtype; dropped elements are +0.
#pragma once

#include <cstdint>

namespace fastpeft_cpu {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// mask[r * cols + c] = keep(seed, r, c, thr) as 0 or 1 (a bool buffer), for r in [row0, row1).
void keep_mask_rows(uint8_t* mask, int64_t cols, int64_t row0, int64_t row1, uint32_t seed, uint32_t thr);

// out[r * cols + c] = keep ? x[r * xs0 + c * xs1] * scale : +0, for r in [row0, row1).
void dropped_rows(DType dtype, const void* x, int64_t xs0, int64_t xs1, void* out, int64_t cols, int64_t row0,
                  int64_t row1, uint32_t seed, uint32_t thr, float scale);

// One mask for two tensors: out = dropped(x) as above, and low[r * cols + c] (contiguous, in place) becomes
// keep ? low * scale : +0. `out` and `low` must not overlap each other or x.
void dropped_pair_rows(DType dtype, const void* x, int64_t xs0, int64_t xs1, void* out, void* low, int64_t cols,
                       int64_t row0, int64_t row1, uint32_t seed, uint32_t thr, float scale);

// The instruction set the functions above run with: "avx512", "avx2" or "generic" (the compiler's baseline).
// Chosen once from the CPU's features; set_isa() overrides it (tests compare the paths): it returns false,
// changing nothing, when the name is unknown or this CPU or build lacks that instruction set.
const char* isa();
bool set_isa(const char* name);
// The instruction sets this build and CPU can run, best first, separated by commas.
const char* available_isas();

}  // namespace fastpeft_cpu
