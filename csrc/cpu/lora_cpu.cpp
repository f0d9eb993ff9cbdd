// The PyTorch backend of the fused LoRA linear (fastpeft/ops/lora_linear_torch.py) in one C++ call per pass:
// the same ATen ops in the same order, so the same bits, without a Python round trip per op (about a
// microsecond each, which is what a decode step or a small layer spends its time on). The dropout is the
// stream of dropout_cpu.h, computed on the fly.
//
// Inputs are validated by the Python caller (fastpeft.ops.lora_linear.check_lora_inputs); the checks here only
// keep a wrong call from reading out of bounds.
#include <ATen/core/Tensor.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "ops_cpu.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

Tensor as_dtype(const Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

void check_rows(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.dim() == 2, name, ": expected a 2-D CPU tensor, got shape ", t.sizes(),
                    " on ", t.device().str());
}

// the dropout of the Python twin: keep ? x * float(1 / (1 - p)) : 0
struct Drop {
  bool on;
  uint32_t seed, thr;
  float scale;
  Drop(double p, int64_t seed_, int64_t thr_)
      : on(p > 0), seed(static_cast<uint32_t>(seed_)), thr(static_cast<uint32_t>(thr_)),
        scale(static_cast<float>(1.0 / (1.0 - p))) {
    TORCH_CHECK_VALUE(p >= 0 && p < 1, "dropout_p: expected a probability in [0, 1), got ", p);
    TORCH_CHECK_VALUE(!on || (seed_ >= 0 && seed_ < (int64_t(1) << 31)), "seed: expected an int in [0, 2**31 - 1], got ",
                      seed_);
  }
};

// (y, S): S = dropout(x)·Aᵀ, y = x·Wᵀ + bias + scaling·S·Bᵀ, in x's dtype.
std::tuple<Tensor, Tensor> lora_fwd(const Tensor& x, const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
                                    const OptTensor& bias, double scaling, double p, int64_t seed, int64_t thr) {
  check_rows(x, "x");
  const Drop drop(p, seed, thr);
  pybind11::gil_scoped_release no_gil;
  const at::ScalarType dt = x.scalar_type();
  const Tensor xd = drop.on ? fastpeft_cpu::dropped_tensor(x, drop.seed, drop.thr, drop.scale) : x;
  Tensor s = at::mm(xd, as_dtype(lora_a, dt).t());
  Tensor y = at::linear(x, weight, bias);
  y.addmm_(s, as_dtype(lora_b, dt).t(), 1, scaling);
  return {y, s};
}

// (dx, dA, dB, dbias), each undefined (None) where not needed.
std::tuple<OptTensor, OptTensor, OptTensor, OptTensor> lora_bwd(
    const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
    const Tensor& s, double scaling, double p, int64_t seed, int64_t thr, bool need_dx, bool need_da, bool need_db,
    bool need_dbias) {
  check_rows(dy, "dy");
  check_rows(x, "x");
  const Drop drop(p, seed, thr);
  pybind11::gil_scoped_release no_gil;
  const at::ScalarType dt = dy.scalar_type();
  OptTensor dx, da, db, dbias;
  Tensor ds, xd;
  if (need_dx || need_da) {
    ds = at::mm(dy, as_dtype(lora_b, dt));
    ds.mul_(scaling);
  }
  if (need_db) {
    Tensor g = at::mm(dy.t(), s);
    g.mul_(scaling);
    db = as_dtype(g, lora_b.scalar_type());
  }
  if (need_dx) {
    const Tensor a = as_dtype(lora_a, dt);
    Tensor g = at::mm(dy, weight);
    if (drop.on) {  // the forward's mask and 1/(1-p) on dS·A; with dA wanted, dA's input under the same mask
      Tensor low = at::mm(ds, a);
      if (need_da) {
        xd = fastpeft_cpu::dropped_pair_tensor(x, low, drop.seed, drop.thr, drop.scale);
      } else {
        low = fastpeft_cpu::dropped_tensor(low, drop.seed, drop.thr, drop.scale);
      }
      g.add_(low);
    } else {
      g.addmm_(ds, a);
    }
    dx = g;
  }
  if (need_da) {
    if (!xd.defined()) xd = drop.on ? fastpeft_cpu::dropped_tensor(x, drop.seed, drop.thr, drop.scale) : x;
    da = as_dtype(at::mm(ds.t(), xd), lora_a.scalar_type());
  }
  if (need_dbias) dbias = as_dtype(at::sum(dy, {0}, false, at::kFloat), dt);
  return {dx, da, db, dbias};
}

}  // namespace

namespace fastpeft_cpu {

void register_lora(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("lora_fwd", &lora_fwd, py::arg("x"), py::arg("weight"), py::arg("lora_a"), py::arg("lora_b"), py::arg("bias"),
        py::arg("scaling"), py::arg("dropout_p"), py::arg("seed"), py::arg("thr"),
        "(S, y) of the LoRA linear's PyTorch backend on rows x [M, in]: lora_linear_fwd_torch in one call.");
  m.def("lora_bwd", &lora_bwd, py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("lora_a"), py::arg("lora_b"),
        py::arg("s"), py::arg("scaling"), py::arg("dropout_p"), py::arg("seed"), py::arg("thr"), py::arg("need_dx"),
        py::arg("need_da"), py::arg("need_db"), py::arg("need_dbias"),
        "(dx, dA, dB, dbias) of the LoRA linear's PyTorch backend: lora_linear_bwd_torch in one call.");
}

}  // namespace fastpeft_cpu
