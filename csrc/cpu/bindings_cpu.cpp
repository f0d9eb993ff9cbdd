// pybind11 module fastpeft._C_cpu: the CPU dropout kernels of dropout_cpu.h on torch tensors. Validates every
// input (ValueError / TypeError naming the argument, what was expected and what came), allocates the outputs
// (fresh and contiguous) and splits the rows over torch's intra-op threads (at::parallel_for, so
// torch.set_num_threads applies). Kept apart from the CUDA extension fastpeft._C so that a CPU-only torch
// builds it and a failed nvcc build cannot take it down.
//
// Headers: the parts of torch/extension.h that this file uses (ATen, the pybind11 casters of torch), not all of
// it (torch/all.h with the C++ frontend): that halves the compile, which CI's two cores pay on every install.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "dropout_cpu.h"
#include "ops_cpu.h"

#ifndef FASTPEFT_BUILD_KIND
#define FASTPEFT_BUILD_KIND unknown
#endif
#define FASTPEFT_STR2(x) #x
#define FASTPEFT_STR(x) FASTPEFT_STR2(x)

namespace {

using at::Tensor;
constexpr int64_t kBound = (int64_t(1) << 31) - 1;  // seeds and thresholds are 31-bit
constexpr int64_t kCounters = int64_t(1) << 32;     // rows and column groups of four are 32-bit counters
constexpr int64_t kGrainElements = 16384;            // elements per at::parallel_for chunk, at least

fastpeft_cpu::DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return fastpeft_cpu::DType::kFloat32;
    case at::kHalf:
      return fastpeft_cpu::DType::kFloat16;
    case at::kBFloat16:
      return fastpeft_cpu::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, name, ": expected dtype float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return fastpeft_cpu::DType::kFloat32;  // unreachable
}

// A 2-D strided CPU tensor of a supported dtype that autograd does not track here (the kernels are not
// differentiable: fastpeft.dropout_cpu sends tensors that need a graph to the PyTorch twin).
fastpeft_cpu::DType check_matrix(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), name, ": expected a tensor, got an undefined tensor");
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, ": expected a CPU tensor, got device ", t.device().str());
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, name, ": expected a strided (dense) tensor, got layout ", t.layout());
  TORCH_CHECK_VALUE(t.dim() == 2, name, ": expected a 2-D tensor, got shape ", t.sizes());
  const fastpeft_cpu::DType dt = dtype_of(t, name);
  TORCH_CHECK_VALUE(!(t.requires_grad() && at::GradMode::is_enabled()), name,
                    ": expected a tensor that does not require grad (or torch.no_grad()): the C++ kernels are not "
                    "differentiable, got requires_grad=True");
  return dt;
}

void check_sizes(int64_t rows, int64_t cols) {
  TORCH_CHECK_VALUE(rows >= 0 && rows < kCounters, "rows: expected 0 <= rows < 2**32 (the row is a 32-bit Philox "
                    "counter), got ", rows);
  TORCH_CHECK_VALUE(cols >= 0 && (cols + 3) / 4 < kCounters, "cols: expected 0 <= cols < 2**34 (cols // 4 is a "
                    "32-bit Philox counter), got ", cols);
}

uint32_t check_seed(int64_t seed) {
  TORCH_CHECK_VALUE(seed >= 0 && seed <= kBound, "seed: expected an int in [0, ", kBound, "], got ", seed);
  return static_cast<uint32_t>(seed);
}

uint32_t check_thr(int64_t thr) {
  TORCH_CHECK_VALUE(thr >= 0 && thr <= kBound, "thr: expected an int in [0, ", kBound,
                    "] (fastpeft.dropout.keep_threshold(p)), got ", thr);
  return static_cast<uint32_t>(thr);
}

float check_scale(double scale) {
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale: expected a finite float (1 / (1 - p)), got ", scale);
  return static_cast<float>(scale);  // torch rounds a Python float to float32 once, as here
}

int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1)); }

}  // namespace

namespace fastpeft_cpu {

at::Tensor dropped_tensor(const at::Tensor& x, uint32_t seed, uint32_t thr, float scale) {
  const DType dt = dtype_of(x, "x");
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor out = at::empty({rows, cols}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const void* xp = x.data_ptr();
  void* op = out.data_ptr();
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1);
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t r0, int64_t r1) {
    dropped_rows(dt, xp, xs0, xs1, op, cols, r0, r1, seed, thr, scale);
  });
  return out;
}

at::Tensor dropped_pair_tensor(const at::Tensor& x, const at::Tensor& low, uint32_t seed, uint32_t thr, float scale) {
  const DType dt = dtype_of(x, "x");
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor out = at::empty({rows, cols}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  if (!low.is_inference()) low.unsafeGetTensorImpl()->bump_version();  // an in-place write, as autograd counts them
  const void* xp = x.data_ptr();
  void* op = out.data_ptr();
  void* lp = low.data_ptr();
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1);
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t r0, int64_t r1) {
    dropped_pair_rows(dt, xp, xs0, xs1, op, lp, cols, r0, r1, seed, thr, scale);
  });
  return out;
}

}  // namespace fastpeft_cpu

namespace {

Tensor keep_mask(int64_t seed, int64_t rows, int64_t cols, int64_t thr) {
  const uint32_t s = check_seed(seed), t = check_thr(thr);
  check_sizes(rows, cols);
  Tensor mask = at::empty({rows, cols}, at::TensorOptions().dtype(at::kBool));
  if (mask.numel() == 0) return mask;
  auto* m = reinterpret_cast<uint8_t*>(mask.data_ptr<bool>());
  pybind11::gil_scoped_release no_gil;
  at::parallel_for(0, rows, grain_rows(cols),
                   [&](int64_t r0, int64_t r1) { fastpeft_cpu::keep_mask_rows(m, cols, r0, r1, s, t); });
  return mask;
}

Tensor dropped(const Tensor& x, int64_t seed, int64_t thr, double scale) {
  check_matrix(x, "x");
  const uint32_t s = check_seed(seed), t = check_thr(thr);
  const float sc = check_scale(scale);
  check_sizes(x.size(0), x.size(1));
  pybind11::gil_scoped_release no_gil;
  return fastpeft_cpu::dropped_tensor(x, s, t, sc);
}

Tensor dropped_pair(const Tensor& x, const Tensor& low, int64_t seed, int64_t thr, double scale) {
  check_matrix(x, "x");
  check_matrix(low, "low");
  TORCH_CHECK_TYPE(low.scalar_type() == x.scalar_type(), "low: expected dtype ", x.scalar_type(), " (that of x), got ",
                   low.scalar_type());
  TORCH_CHECK_VALUE(low.sizes() == x.sizes(), "low: expected shape ", x.sizes(), " (that of x), got ", low.sizes());
  TORCH_CHECK_VALUE(low.is_contiguous(), "low: expected a contiguous tensor (it is scaled in place), got strides ",
                    low.strides());
  TORCH_CHECK_VALUE(at::get_overlap_status(low, x) == at::MemOverlapStatus::No,
                    "low: expected memory that does not overlap x's (low is written in place while x is read)");
  const uint32_t s = check_seed(seed), t = check_thr(thr);
  const float sc = check_scale(scale);
  check_sizes(x.size(0), x.size(1));
  pybind11::gil_scoped_release no_gil;
  return fastpeft_cpu::dropped_pair_tensor(x, low, s, t, sc);
}

std::string set_isa(const std::string& name) {
  const std::string before = fastpeft_cpu::isa();
  TORCH_CHECK_VALUE(fastpeft_cpu::set_isa(name.c_str()), "name: expected one of the instruction sets this build "
                    "and CPU run (", fastpeft_cpu::available_isas(), "), got '", name, "'");
  return before;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "fastpeft CPU kernels: the Philox4x32-10 dropout stream of fastpeft.dropout, bit for bit";
  m.attr("build_kind") = FASTPEFT_STR(FASTPEFT_BUILD_KIND);
  m.def("keep_mask", &keep_mask, py::arg("seed"), py::arg("rows"), py::arg("cols"), py::arg("thr"),
        "Boolean keep-mask [rows, cols] of the stream (fastpeft.dropout.dropout_keep_mask with thr).");
  m.def("dropped", &dropped, py::arg("x"), py::arg("seed"), py::arg("thr"), py::arg("scale"),
        "x * keep * scale as a new contiguous tensor, x 2-D fp32/fp16/bf16 with any strides: bit for bit "
        "torch.where(keep, x, 0) * scale.");
  m.def("dropped_pair", &dropped_pair, py::arg("x"), py::arg("low"), py::arg("seed"), py::arg("thr"),
        py::arg("scale"),
        "One pass, one mask: returns dropped(x) and scales `low` (contiguous, x's shape and dtype) in place the "
        "same way.");
  fastpeft_cpu::register_lora(m);
  m.def("isa", &fastpeft_cpu::isa, "The instruction set the kernels run with: avx512, avx2 or generic.");
  m.def("available_isas", &fastpeft_cpu::available_isas, "The instruction sets this build and CPU can run.");
  m.def("set_isa", &set_isa, py::arg("name"), "Run with another instruction set (tests); returns the previous one.");
}
