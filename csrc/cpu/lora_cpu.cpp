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
#include <ATen/ops/ones.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/custom_function.h>
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
  const at::ScalarType dt = x.scalar_type();
  const Tensor xd = drop.on ? fastpeft_cpu::dropped_tensor(x, drop.seed, drop.thr, drop.scale) : x;
  Tensor s = at::mm(xd, as_dtype(lora_a, dt).t());
  Tensor y = at::linear(x, weight, bias);
  y.addmm_(s, as_dtype(lora_b, dt).t(), 1, scaling);
  return {y, s};
}

// (dx, dA, dB, dbias), each undefined (None) where not needed.
std::tuple<OptTensor, OptTensor, OptTensor, OptTensor> lora_bwd_nogil(
    const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
    const Tensor& s, double scaling, double p, int64_t seed, int64_t thr, bool need_dx, bool need_da, bool need_db,
    bool need_dbias) {
  check_rows(dy, "dy");
  check_rows(x, "x");
  const Drop drop(p, seed, thr);
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


// ---- the autograd node: the whole layer as one C++ node, so a training step runs no Python in backward ----
//
// The same passes as above. Under create_graph=True (double backward) the backward runs with grad mode on and
// computes with differentiable ops instead (the mask as a constant, S recomputed from x and A), as
// fastpeft.ops.lora_linear's _differentiable_backward does.
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

Tensor keep_mask_rows(int64_t rows, int64_t cols, const Drop& drop) {
  Tensor ones = at::ones({rows, cols}, at::TensorOptions().dtype(at::kFloat));
  return fastpeft_cpu::dropped_tensor(ones, drop.seed, drop.thr, 1.0f).ne(0);
}

struct LoRANode : public torch::autograd::Function<LoRANode> {
  // x [..., in] -> y [M, out] (rows; the caller views it back)
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& lora_a,
                        const Tensor& lora_b, const OptTensor& bias, double scaling, double p, int64_t seed,
                        int64_t thr) {
    const Tensor x2 = x.reshape({-1, x.size(-1)});
    Tensor y, s;
    std::tie(y, s) = lora_fwd(x2, weight, lora_a, lora_b, bias, scaling, p, seed, thr);
    ctx->save_for_backward({x, weight, lora_a, lora_b, s});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["p"] = p;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["thr"] = thr;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &lora_a = saved[2], &lora_b = saved[3], &s = saved[4];
    const double scaling = ctx->saved_data["scaling"].toDouble(), p = ctx->saved_data["p"].toDouble();
    const int64_t seed = ctx->saved_data["seed"].toInt(), thr = ctx->saved_data["thr"].toInt();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool need_dx = ctx->needs_input_grad(0), need_dw = ctx->needs_input_grad(1);
    const bool need_da = ctx->needs_input_grad(2), need_db = ctx->needs_input_grad(3);
    const bool need_dbias = has_bias && ctx->needs_input_grad(4);
    const Tensor& dy = grads[0];
    const Tensor x2 = x.reshape({-1, x.size(-1)});
    Tensor dx, dw, da, db, dbias;
    if (x2.size(0) == 0 || weight.size(0) == 0) {
      if (need_dx) dx = at::zeros_like(x);
      if (need_da) da = at::zeros_like(lora_a);
      if (need_db) db = at::zeros_like(lora_b);
      if (need_dbias) dbias = at::zeros({weight.size(0)}, weight.options());
    } else if (at::GradMode::is_enabled()) {  // create_graph=True: differentiable ops
      const Drop drop(p, seed, thr);
      const at::ScalarType dt = dy.scalar_type();
      const Tensor a = as_dtype(lora_a, dt), b = as_dtype(lora_b, dt);
      Tensor mask;
      auto drop_op = [&](const Tensor& t) {
        if (!drop.on) return t;
        if (!mask.defined()) mask = keep_mask_rows(t.size(0), t.size(1), drop);
        return at::where(mask, t, at::zeros({}, t.options())).mul(static_cast<double>(drop.scale));
      };
      const Tensor ds = at::mm(dy, b).mul(scaling);
      if (need_db) db = as_dtype(at::mm(dy.t(), at::mm(drop_op(x2), a.t())).mul(scaling), lora_b.scalar_type());
      if (need_dx) dx = at::mm(dy, weight).add(drop_op(at::mm(ds, a))).view(x.sizes());
      if (need_da) da = as_dtype(at::mm(ds.t(), drop_op(x2)), lora_a.scalar_type());
      if (need_dbias) dbias = as_dtype(at::sum(dy, {0}, false, at::kFloat), dt);
    } else {
      OptTensor odx, oda, odb, odbias;
      std::tie(odx, oda, odb, odbias) = lora_bwd_nogil(dy, x2, weight, lora_a, lora_b, s, scaling, p, seed, thr,
                                                       need_dx, need_da, need_db, need_dbias);
      if (odx) dx = odx->view(x.sizes());
      if (oda) da = *oda;
      if (odb) db = *odb;
      if (odbias) dbias = *odbias;
    }
    if (need_dw) dw = as_dtype(at::mm(dy.t(), x2), weight.scalar_type());  // W0 is frozen in LoRA, unless asked
    return {dx, dw, da, db, dbias, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor lora_apply(const Tensor& x, const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
                  const OptTensor& bias, double scaling, double p, int64_t seed, int64_t thr) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.dim() >= 1, "x: expected a CPU tensor of shape [..., in], got shape ",
                    x.sizes(), " on ", x.device().str());
  return LoRANode::apply(x, weight, lora_a, lora_b, bias, scaling, p, seed, thr);
}

std::tuple<Tensor, Tensor> lora_fwd_py(const Tensor& x, const Tensor& weight, const Tensor& lora_a,
                                       const Tensor& lora_b, const OptTensor& bias, double scaling, double p,
                                       int64_t seed, int64_t thr) {
  pybind11::gil_scoped_release no_gil;
  return lora_fwd(x, weight, lora_a, lora_b, bias, scaling, p, seed, thr);
}

std::tuple<OptTensor, OptTensor, OptTensor, OptTensor> lora_bwd_py(
    const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
    const Tensor& s, double scaling, double p, int64_t seed, int64_t thr, bool need_dx, bool need_da, bool need_db,
    bool need_dbias) {
  pybind11::gil_scoped_release no_gil;
  return lora_bwd_nogil(dy, x, weight, lora_a, lora_b, s, scaling, p, seed, thr, need_dx, need_da, need_db,
                        need_dbias);
}

Tensor lora_apply_py(const Tensor& x, const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
                     const OptTensor& bias, double scaling, double p, int64_t seed, int64_t thr) {
  pybind11::gil_scoped_release no_gil;
  return lora_apply(x, weight, lora_a, lora_b, bias, scaling, p, seed, thr);
}

}  // namespace

namespace fastpeft_cpu {

void register_lora(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("lora_fwd", &lora_fwd_py, py::arg("x"), py::arg("weight"), py::arg("lora_a"), py::arg("lora_b"), py::arg("bias"),
        py::arg("scaling"), py::arg("dropout_p"), py::arg("seed"), py::arg("thr"),
        "(S, y) of the LoRA linear's PyTorch backend on rows x [M, in]: lora_linear_fwd_torch in one call.");
  m.def("lora_bwd", &lora_bwd_py, py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("lora_a"), py::arg("lora_b"),
        py::arg("s"), py::arg("scaling"), py::arg("dropout_p"), py::arg("seed"), py::arg("thr"), py::arg("need_dx"),
        py::arg("need_da"), py::arg("need_db"), py::arg("need_dbias"),
        "(dx, dA, dB, dbias) of the LoRA linear's PyTorch backend: lora_linear_bwd_torch in one call.");
  m.def("lora_apply", &lora_apply_py, py::arg("x"), py::arg("weight"), py::arg("lora_a"), py::arg("lora_b"),
        py::arg("bias"), py::arg("scaling"), py::arg("dropout_p"), py::arg("seed"), py::arg("thr"),
        "y [M, out] of the LoRA linear (x [..., in]) as one C++ autograd node: LoRALinearFunction on the torch "
        "backend without Python in forward or backward.");
}

}  // namespace fastpeft_cpu
