// The tensor-level CPU ops shared by the translation units of fastpeft._C_cpu. Unchecked: the callers (the
// pybind11 functions of bindings_cpu.cpp and lora_cpu.cpp) validate their inputs and release the GIL.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>

namespace fastpeft_cpu {

// x * keep * scale as a new contiguous tensor (x: 2-D CPU fp32/fp16/bf16, any strides).
at::Tensor dropped_tensor(const at::Tensor& x, uint32_t seed, uint32_t thr, float scale);

// One mask for two tensors: returns dropped_tensor(x, ...) and scales `low` (contiguous, x's shape and dtype,
// not overlapping x) in place the same way.
at::Tensor dropped_pair_tensor(const at::Tensor& x, const at::Tensor& low, uint32_t seed, uint32_t thr, float scale);

// Adds lora_fwd and lora_bwd (lora_cpu.cpp) to the module.
void register_lora(pybind11::module_& m);

}  // namespace fastpeft_cpu
