// Launch functions of the fastpeft CUDA kernels: plain C++, no CUDA or torch headers needed to include it.
// Pointers are raw device pointers, sizes and strides are in elements, `stream` is the caller's stream.
// The launchers trust their arguments (csrc/bindings.cpp validates them) and return a cudaError_t value as
// int: 0 on success, else the launch error (see cuda_error_string).
#pragma once

#include <cstdint>

struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

namespace fastpeft {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kMaxRank = 256;
constexpr int kMaxDecodeRows = 16;

const char* cuda_error_string(int err);
// Multiprocessor count of `device` (sizes the reduction grid of lora_dy_reduce).
int sm_count(int device, int* out);
// binaryVersion / ptxVersion (e.g. 90) of the extension's code as loaded on the current device.
int loaded_arch(int* binary_version, int* ptx_version);

// S[M, R] = dropout(x)[M, K] @ a[R, K]^T. S contiguous, x's dtype. p == 0 skips the mask.
int lora_shrink(DType dt, const void* x, int64_t x_s0, int64_t x_s1, const void* a, int64_t a_s0,
                int64_t a_s1, void* s, int64_t M, int64_t K, int64_t R, uint32_t seed, uint32_t thr,
                float keep_scale, bool dropout, cudaStream_t stream);

// The grid and workspace of lora_dy_reduce, fixed by the shapes and the device's SM count.
struct DyReducePlan {
  int64_t n_blocks;        // blocks over `out`; dS partials per row
  int64_t m_blocks;        // blocks over M; dB partials per output column
  int64_t rows_per_block;  // multiple of 16
  int64_t ws_ds_elems;     // fp32 elements: n_blocks * M * R
  int64_t ws_db_elems;     // fp32 elements: m_blocks * N * R
};
DyReducePlan dy_reduce_plan(int64_t M, int64_t N, int64_t R, int sms);

// dS[M, R] = scaling * dy[M, N] @ b[N, R];  dB[N, R] = scaling * dy^T @ s[M, R]   (both fp32, contiguous)
// Reads dy once; per-block partials in the fp32 workspaces, then a fixed-order reduction (deterministic).
int lora_dy_reduce(DType dt, const DyReducePlan& plan, const void* dy, int64_t dy_s0, int64_t dy_s1,
                   const void* b, int64_t b_s0, int64_t b_s1, const void* s, int64_t s_s0, int64_t s_s1,
                   float* ds, float* db, float* ws_ds, float* ws_db, int64_t M, int64_t N, int64_t R,
                   float scaling, cudaStream_t stream);

// w[N, K] += c * b[N, R] @ a[R, K] in place (w must not overlap a or b).
int rank_update(DType dt, void* w, int64_t w_s0, int64_t w_s1, const void* b, int64_t b_s0, int64_t b_s1,
                const void* a, int64_t a_s0, int64_t a_s1, int64_t N, int64_t K, int64_t R, float c,
                cudaStream_t stream);

// y[M, N] = x[M, K] @ w[N, K]^T + bias[N] + scaling * (x @ a[R, K]^T) @ b[N, R]^T for M <= 16, one launch.
// bias may be null. y contiguous, x's dtype.
int lora_decode(DType dt, const void* x, int64_t x_s0, int64_t x_s1, const void* w, int64_t w_s0,
                int64_t w_s1, const void* bias, int64_t bias_s0, const void* a, int64_t a_s0, int64_t a_s1,
                const void* b, int64_t b_s0, int64_t b_s1, void* y, int64_t M, int64_t N, int64_t K, int64_t R,
                float scaling, cudaStream_t stream);

}  // namespace fastpeft
