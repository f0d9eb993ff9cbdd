// pybind11 module fastpeft._C: validates every input, allocates outputs, calls the launchers of
// fastpeft_cuda.h on the caller's current stream.
//
// The stream arrives as an integer handle (torch.cuda.current_stream(device).cuda_stream, read by the
// Python wrapper) instead of at::cuda::getCurrentCUDAStream(): the CPU wheels of torch lack the generated
// CUDA headers, and this way the very file that is built is also the one CI compiles as a syntax check.
// The device guard is the generic c10::DeviceGuard, which dispatches to CUDA's at run time.
#include <ATen/MemoryOverlap.h>
#include <c10/core/DeviceGuard.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>

#include "fastpeft_cuda.h"

// Set by the build as bare identifiers (e.g. sm_80__sm_90__compute_90, setup_py): no quotes to survive
// the shells between setup.py or ninja and the compiler.
#ifndef FASTPEFT_ARCHS
#define FASTPEFT_ARCHS unknown
#endif
#ifndef FASTPEFT_BUILD_KIND
#define FASTPEFT_BUILD_KIND unknown
#endif
#define FASTPEFT_STR2(x) #x
#define FASTPEFT_STR(x) FASTPEFT_STR2(x)

namespace {

using at::Tensor;
constexpr int64_t kSeedBound = (int64_t(1) << 31) - 1;
constexpr int64_t kMaxExpandCols = int64_t(65535) * 128;  // lora_expand's grid: 128 columns per block in grid.y

std::string dev_str(const Tensor& t) { return t.device().str(); }

fastpeft::DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return fastpeft::DType::kFloat32;
    case at::kHalf:
      return fastpeft::DType::kFloat16;
    case at::kBFloat16:
      return fastpeft::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, name, ": expected dtype float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return fastpeft::DType::kFloat32;  // unreachable
}

// A 2-D CUDA tensor of `ref`'s dtype on `ref`'s device.
void check_matrix(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, ": expected a CUDA tensor, got device ", dev_str(t));
  TORCH_CHECK_VALUE(t.dim() == 2, name, ": expected a 2-D tensor, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(), " (that of ",
                   ref_name, "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, ": expected device ", dev_str(ref), " (that of ", ref_name,
                    "), got ", dev_str(t));
}

void check_rank(int64_t r, const char* what) {
  TORCH_CHECK_VALUE(r >= 1 && r <= fastpeft::kMaxRank, what, ": expected a rank in [1, ", fastpeft::kMaxRank, "], got ",
                    r);
}

void check_size(const Tensor& t, int dim, int64_t expected, const char* name, const char* why) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, name, ": expected size ", expected, " in dim ", dim, " (", why, "), got shape ",
                    t.sizes());
}

cudaStream_t as_stream(uint64_t handle) { return reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(handle)); }

void check_launch(int err, const char* op) {
  TORCH_CHECK(err == 0, "fastpeft.", op, ": CUDA error: ", fastpeft::cuda_error_string(err));
}

// Dropout threshold on 31-bit words, as fastpeft.dropout.keep_threshold: round half to even (nearbyint in
// the default rounding mode, like Python's round), capped at 2**31 - 1. p * 2**31 is exact in double.
uint32_t keep_threshold(double p) {
  const double t = std::nearbyint(p * 2147483648.0);
  return t >= 2147483647.0 ? 2147483647u : static_cast<uint32_t>(t);
}

// The dropout arguments of a kernel: p in [0, 1) and a seed in [0, 2**31 - 1]; p == 0 turns the mask off.
struct Dropout {
  bool on;
  uint32_t seed, thr;
  float keep_scale;  // 1/(1-p), rounded to float once
};

Dropout check_dropout(double p, int64_t seed) {
  TORCH_CHECK_VALUE(std::isfinite(p) && p >= 0.0 && p < 1.0, "p: expected a dropout probability in [0, 1), got ", p);
  TORCH_CHECK_VALUE(seed >= 0 && seed <= kSeedBound, "seed: expected an int in [0, ", kSeedBound, "], got ", seed);
  const bool on = p > 0.0;
  return {on, static_cast<uint32_t>(seed), keep_threshold(p), on ? static_cast<float>(1.0 / (1.0 - p)) : 1.0f};
}

void check_bias(const std::optional<Tensor>& bias, int64_t n, const Tensor& ref, const char* ref_name) {
  if (!bias.has_value()) return;
  const Tensor& bi = *bias;
  TORCH_CHECK_VALUE(bi.is_cuda(), "bias: expected a CUDA tensor, got device ", dev_str(bi));
  TORCH_CHECK_VALUE(bi.dim() == 1 && bi.size(0) == n, "bias: expected shape [", n, "], got ", bi.sizes());
  TORCH_CHECK_TYPE(bi.scalar_type() == ref.scalar_type(), "bias: expected dtype ", ref.scalar_type(), " (that of ",
                   ref_name, "), got ", bi.scalar_type());
  TORCH_CHECK_VALUE(bi.device() == ref.device(), "bias: expected device ", dev_str(ref), ", got ", dev_str(bi));
}

Tensor lora_shrink(const Tensor& x, const Tensor& a, double p, int64_t seed, uint64_t stream) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x: expected a CUDA tensor, got device ", dev_str(x));
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected a 2-D tensor [M, in], got shape ", x.sizes());
  const fastpeft::DType dt = dtype_of(x, "x");
  check_matrix(a, "a", x, "x");
  check_size(a, 1, x.size(1), "a", "a is [r, in] with in = x.shape[1]");
  check_rank(a.size(0), "a.shape[0]");
  const Dropout d = check_dropout(p, seed);
  const c10::DeviceGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), R = a.size(0);
  Tensor s = at::empty({M, R}, x.options());
  check_launch(fastpeft::lora_shrink(dt, x.data_ptr(), x.stride(0), x.stride(1), a.data_ptr(), a.stride(0), a.stride(1),
                                     s.data_ptr(), M, K, R, d.seed, d.thr, d.keep_scale, d.on, as_stream(stream)),
               "lora_shrink");
  return s;
}

std::tuple<Tensor, Tensor> lora_dy_reduce(const Tensor& dy, const Tensor& b, const Tensor& s_mat, double scaling,
                                          uint64_t stream) {
  TORCH_CHECK_VALUE(dy.is_cuda(), "dy: expected a CUDA tensor, got device ", dev_str(dy));
  TORCH_CHECK_VALUE(dy.dim() == 2, "dy: expected a 2-D tensor [M, out], got shape ", dy.sizes());
  const fastpeft::DType dt = dtype_of(dy, "dy");
  check_matrix(b, "b", dy, "dy");
  check_matrix(s_mat, "s_mat", dy, "dy");
  check_size(b, 0, dy.size(1), "b", "b is [out, r] with out = dy.shape[1]");
  check_rank(b.size(1), "b.shape[1]");
  check_size(s_mat, 0, dy.size(0), "s_mat", "s_mat is [M, r] with M = dy.shape[0]");
  check_size(s_mat, 1, b.size(1), "s_mat", "s_mat is [M, r] with r = b.shape[1]");
  TORCH_CHECK_VALUE(std::isfinite(scaling), "scaling: expected a finite number, got ", scaling);
  const c10::DeviceGuard guard(dy.device());
  const int64_t M = dy.size(0), N = dy.size(1), R = b.size(1);
  const auto f32 = dy.options().dtype(at::kFloat);
  Tensor ds = at::empty({M, R}, f32), db = at::empty({N, R}, f32);
  int sms = 0;
  check_launch(fastpeft::sm_count(dy.device().index(), &sms), "lora_dy_reduce");
  const fastpeft::DyReducePlan plan = fastpeft::dy_reduce_plan(M, N, R, sms);
  // dS's then dB's partials, each at most 4 MiB (dy_reduce_plan); empty when the passes write both outputs
  const int64_t ws_elems = plan.ws_ds_elems + plan.ws_db_elems;
  Tensor ws = at::empty({ws_elems}, f32);
  check_launch(fastpeft::lora_dy_reduce(dt, plan, dy.data_ptr(), dy.stride(0), dy.stride(1), b.data_ptr(), b.stride(0),
                                        b.stride(1), s_mat.data_ptr(), s_mat.stride(0), s_mat.stride(1),
                                        ds.data_ptr<float>(), db.data_ptr<float>(),
                                        ws_elems > 0 ? ws.data_ptr<float>() : nullptr, M, N, R,
                                        static_cast<float>(scaling), as_stream(stream)),
               "lora_dy_reduce");
  return {ds, db};
}

void rank_update_(Tensor& w, const Tensor& b, const Tensor& a, double c, uint64_t stream) {
  TORCH_CHECK_VALUE(w.is_cuda(), "w: expected a CUDA tensor, got device ", dev_str(w));
  TORCH_CHECK_VALUE(w.dim() == 2, "w: expected a 2-D tensor [out, in], got shape ", w.sizes());
  const fastpeft::DType dt = dtype_of(w, "w");
  check_matrix(b, "b", w, "w");
  check_matrix(a, "a", w, "w");
  check_size(b, 0, w.size(0), "b", "b is [out, r] with out = w.shape[0]");
  check_rank(b.size(1), "b.shape[1]");
  check_size(a, 0, b.size(1), "a", "a is [r, in] with r = b.shape[1]");
  check_size(a, 1, w.size(1), "a", "a is [r, in] with in = w.shape[1]");
  TORCH_CHECK_VALUE(std::isfinite(c), "c: expected a finite number, got ", c);
  TORCH_CHECK_VALUE(w.size(0) <= int64_t(65535) * 64, "w: at most ", int64_t(65535) * 64, " rows, got ", w.size(0));
  TORCH_CHECK_VALUE(at::has_internal_overlap(w) != at::MemOverlap::Yes,
                    "w: updated in place, so its elements must not share memory (got strides ", w.strides(), ")");
  TORCH_CHECK_VALUE(at::get_overlap_status(w, a) == at::MemOverlapStatus::No &&
                        at::get_overlap_status(w, b) == at::MemOverlapStatus::No,
                    "w: must not share memory with a or b (it is written while they are read)");
  const c10::DeviceGuard guard(w.device());
  check_launch(fastpeft::rank_update(dt, w.data_ptr(), w.stride(0), w.stride(1), b.data_ptr(), b.stride(0), b.stride(1),
                                     a.data_ptr(), a.stride(0), a.stride(1), w.size(0), w.size(1), b.size(1),
                                     static_cast<float>(c), as_stream(stream)),
               "rank_update_");
}

std::tuple<Tensor, Tensor> lora_decode(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias,
                                       const Tensor& a, const Tensor& b, double scaling, double p, int64_t seed,
                                       uint64_t stream) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x: expected a CUDA tensor, got device ", dev_str(x));
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected a 2-D tensor [M, in], got shape ", x.sizes());
  const fastpeft::DType dt = dtype_of(x, "x");
  TORCH_CHECK_VALUE(x.size(0) <= fastpeft::kMaxDecodeRows, "x: the decode kernel takes at most ",
                    fastpeft::kMaxDecodeRows, " rows, got shape ", x.sizes());
  check_matrix(w, "w", x, "x");
  check_matrix(a, "a", x, "x");
  check_matrix(b, "b", x, "x");
  check_size(w, 1, x.size(1), "w", "w is [out, in] with in = x.shape[1]");
  check_size(a, 1, x.size(1), "a", "a is [r, in] with in = x.shape[1]");
  check_rank(a.size(0), "a.shape[0]");
  check_size(b, 0, w.size(0), "b", "b is [out, r] with out = w.shape[0]");
  check_size(b, 1, a.size(0), "b", "b is [out, r] with r = a.shape[0]");
  check_bias(bias, w.size(0), x, "x");
  TORCH_CHECK_VALUE(std::isfinite(scaling), "scaling: expected a finite number, got ", scaling);
  const Dropout d = check_dropout(p, seed);
  const c10::DeviceGuard guard(x.device());
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1), R = a.size(0);
  Tensor y = at::empty({M, N}, x.options()), s = at::empty({M, R}, x.options());
  const void* bias_ptr = bias.has_value() ? bias->data_ptr() : nullptr;
  const int64_t bias_s0 = bias.has_value() ? bias->stride(0) : 0;
  check_launch(fastpeft::lora_decode(dt, x.data_ptr(), x.stride(0), x.stride(1), w.data_ptr(), w.stride(0), w.stride(1),
                                     bias_ptr, bias_s0, a.data_ptr(), a.stride(0), a.stride(1), b.data_ptr(), b.stride(0),
                                     b.stride(1), y.data_ptr(), s.data_ptr(), M, N, K, R, static_cast<float>(scaling),
                                     d.seed, d.thr, d.keep_scale, d.on, as_stream(stream)),
               "lora_decode");
  return {y, s};
}

Tensor lora_expand(const Tensor& l_mat, const Tensor& rm, const std::optional<Tensor>& bias, double scale, double p,
                   int64_t seed, uint64_t stream) {
  TORCH_CHECK_VALUE(l_mat.is_cuda(), "l_mat: expected a CUDA tensor, got device ", dev_str(l_mat));
  TORCH_CHECK_VALUE(l_mat.dim() == 2, "l_mat: expected a 2-D tensor [M, r], got shape ", l_mat.sizes());
  const fastpeft::DType dt = dtype_of(l_mat, "l_mat");
  check_rank(l_mat.size(1), "l_mat.shape[1]");
  check_matrix(rm, "rm", l_mat, "l_mat");
  check_size(rm, 0, l_mat.size(1), "rm", "rm is [r, N] with r = l_mat.shape[1]");
  TORCH_CHECK_VALUE(rm.size(1) <= kMaxExpandCols, "rm: at most ", kMaxExpandCols, " columns, got shape ", rm.sizes());
  check_bias(bias, rm.size(1), l_mat, "l_mat");
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale: expected a finite number, got ", scale);
  const Dropout d = check_dropout(p, seed);
  const c10::DeviceGuard guard(l_mat.device());
  const int64_t M = l_mat.size(0), N = rm.size(1), R = l_mat.size(1);
  Tensor out = at::empty({M, N}, l_mat.options());
  const void* bias_ptr = bias.has_value() ? bias->data_ptr() : nullptr;
  const int64_t bias_s0 = bias.has_value() ? bias->stride(0) : 0;
  check_launch(fastpeft::lora_expand(dt, l_mat.data_ptr(), l_mat.stride(0), l_mat.stride(1), rm.data_ptr(), rm.stride(0),
                                     rm.stride(1), bias_ptr, bias_s0, out.data_ptr(), M, N, R, static_cast<float>(scale),
                                     d.seed, d.thr, d.on, as_stream(stream)),
               "lora_expand");
  return out;
}

Tensor lora_bwd_da(const Tensor& x, const Tensor& ds, double p, int64_t seed, uint64_t stream) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x: expected a CUDA tensor, got device ", dev_str(x));
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected a 2-D tensor [M, in], got shape ", x.sizes());
  const fastpeft::DType dt = dtype_of(x, "x");
  check_matrix(ds, "ds", x, "x");
  check_size(ds, 0, x.size(0), "ds", "ds is [M, r] with M = x.shape[0]");
  check_rank(ds.size(1), "ds.shape[1]");
  const Dropout d = check_dropout(p, seed);
  const c10::DeviceGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), R = ds.size(1);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor da = at::empty({R, K}, f32);
  int sms = 0;
  check_launch(fastpeft::sm_count(x.device().index(), &sms), "lora_bwd_da");
  const fastpeft::BwdDaPlan plan = fastpeft::bwd_da_plan(M, K, R, sms);
  Tensor ws = at::empty({plan.ws_elems}, f32);  // at most 4 MiB; empty when one row range writes dA
  check_launch(fastpeft::lora_bwd_da(dt, plan, x.data_ptr(), x.stride(0), x.stride(1), ds.data_ptr(), ds.stride(0),
                                     ds.stride(1), da.data_ptr<float>(), plan.ws_elems > 0 ? ws.data_ptr<float>() : nullptr,
                                     M, K, R, d.seed, d.thr, d.keep_scale, d.on, as_stream(stream)),
               "lora_bwd_da");
  return da;
}

pybind11::tuple loaded_arch(int64_t device_index) {
  const c10::DeviceGuard guard(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device_index)));
  int binary = 0, ptx = 0;
  check_launch(fastpeft::loaded_arch(&binary, &ptx), "loaded_arch");
  return pybind11::make_tuple(binary, ptx);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastpeft CUDA kernels (use them through fastpeft.ops.cuda_ops)";
  m.attr("archs") = FASTPEFT_STR(FASTPEFT_ARCHS);
  m.attr("build_kind") = FASTPEFT_STR(FASTPEFT_BUILD_KIND);
  m.attr("max_rank") = fastpeft::kMaxRank;
  m.attr("max_decode_rows") = fastpeft::kMaxDecodeRows;
  m.def("lora_shrink", &lora_shrink, "S = dropout(x) @ a^T", pybind11::arg("x"), pybind11::arg("a"), pybind11::arg("p"),
        pybind11::arg("seed"), pybind11::arg("stream"));
  m.def("lora_dy_reduce", &lora_dy_reduce, "(dS, dB) = (scaling * dy @ b, scaling * dy^T @ s_mat), fp32",
        pybind11::arg("dy"), pybind11::arg("b"), pybind11::arg("s_mat"), pybind11::arg("scaling"), pybind11::arg("stream"));
  m.def("rank_update_", &rank_update_, "w += c * b @ a in place", pybind11::arg("w"), pybind11::arg("b"),
        pybind11::arg("a"), pybind11::arg("c"), pybind11::arg("stream"));
  m.def("lora_decode", &lora_decode,
        "(y, S) = (x @ w^T + bias + scaling * S @ b^T, dropout(x) @ a^T) for M <= 16, one launch", pybind11::arg("x"),
        pybind11::arg("w"), pybind11::arg("bias"), pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("scaling"),
        pybind11::arg("p"), pybind11::arg("seed"), pybind11::arg("stream"));
  m.def("lora_expand", &lora_expand, "out = scale * keep * (l_mat @ rm) + bias, written once", pybind11::arg("l_mat"),
        pybind11::arg("rm"), pybind11::arg("bias"), pybind11::arg("scale"), pybind11::arg("p"), pybind11::arg("seed"),
        pybind11::arg("stream"));
  m.def("lora_bwd_da", &lora_bwd_da, "dA = ds^T @ dropout(x), fp32", pybind11::arg("x"), pybind11::arg("ds"),
        pybind11::arg("p"), pybind11::arg("seed"), pybind11::arg("stream"));
  m.def("loaded_arch", &loaded_arch, "(binaryVersion, ptxVersion) of the extension's code on a device",
        pybind11::arg("device_index"));
}
