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

// y[M, N] = x[M, K] @ w[N, K]^T + bias[N] + scaling * S @ b[N, R]^T and S[M, R] = dropout(x) @ a[R, K]^T for
// M <= 16, one launch (S rounded to x's dtype before it enters y, as the other paths do). bias may be null.
// y and S contiguous, x's dtype. The mask is that of lora_shrink; p == 0 (dropout false) skips it.
int lora_decode(DType dt, const void* x, int64_t x_s0, int64_t x_s1, const void* w, int64_t w_s0,
                int64_t w_s1, const void* bias, int64_t bias_s0, const void* a, int64_t a_s0, int64_t a_s1,
                const void* b, int64_t b_s0, int64_t b_s1, void* y, void* s, int64_t M, int64_t N, int64_t K,
                int64_t R, float scaling, uint32_t seed, uint32_t thr, float keep_scale, bool dropout,
                cudaStream_t stream);

// out[M, N] = scale * keep (.) (l[M, R] @ rm[R, N]) + bias[N]: out contiguous, l's dtype, written once. keep is the
// dropout mask of an [M, N] tensor from (seed, thr) when `dropout` (dropped elements are 0 + bias), else all
// ones; bias may be null. N <= 65535 * 128.
int lora_expand(DType dt, const void* l, int64_t l_s0, int64_t l_s1, const void* rm, int64_t rm_s0, int64_t rm_s1,
                const void* bias, int64_t bias_s0, void* out, int64_t M, int64_t N, int64_t R, float scale,
                uint32_t seed, uint32_t thr, bool dropout, cudaStream_t stream);

// The grid and workspace of lora_bwd_da, fixed by the shapes and the device's SM count. Blocks tile dA [R, K]
// in [rt, bk] pieces and split M into m_blocks row ranges; with m_blocks > 1 each range writes an fp32 partial
// of dA to the workspace and a second kernel sums them in a fixed order (deterministic, no atomics). The
// workspace is capped at kBwdDaMaxWsElems floats (4 MiB): where a split would need more, one row range writes
// dA directly (such shapes have rt x bk tiles enough to fill the GPU). Inline so that host tests can check it.
constexpr int64_t kBwdDaRowChunk = 32;                  // rows of x per warp step
constexpr int64_t kBwdDaMaxWsElems = int64_t(1) << 20;  // fp32 elements: 4 MiB
struct BwdDaPlan {
  int64_t rt;              // rank slice per block: 16 (R <= 16) or 64
  int64_t bk;              // columns of x per block: 64 (rt 16) or 32 (rt 64)
  int64_t m_blocks;        // row ranges; 1: no workspace
  int64_t rows_per_block;  // multiple of kBwdDaRowChunk
  int64_t ws_elems;        // fp32 elements: m_blocks * R * K, or 0 when m_blocks == 1
};
inline BwdDaPlan bwd_da_plan(int64_t M, int64_t K, int64_t R, int sms) {
  BwdDaPlan p{};
  p.rt = R <= 16 ? 16 : 64;
  p.bk = p.rt == 16 ? 64 : 32;
  const int64_t tiles = ((K + p.bk - 1) / p.bk) * ((R + p.rt - 1) / p.rt);
  const int64_t chunks = M > 0 ? (M + kBwdDaRowChunk - 1) / kBwdDaRowChunk : 1;
  const int64_t target = 4 * int64_t(sms > 0 ? sms : 1);  // blocks in flight: the pass streams x
  int64_t want = tiles > 0 ? (target + tiles - 1) / tiles : 1;
  const int64_t cap = R * K > 0 ? kBwdDaMaxWsElems / (R * K) : 1;
  if (want > cap) want = cap;
  if (want > chunks) want = chunks;
  if (want < 2) want = 1;
  p.rows_per_block = (chunks + want - 1) / want * kBwdDaRowChunk;
  p.m_blocks = M > 0 ? (M + p.rows_per_block - 1) / p.rows_per_block : 1;  // <= want
  p.ws_elems = p.m_blocks > 1 ? p.m_blocks * R * K : 0;
  return p;
}

// da[R, K] = keep_scale * ds[M, R]^T @ dropout(x)[M, K], fp32 contiguous; the mask is that of lora_shrink for
// x (skipped when `dropout` is false). ws: plan.ws_elems floats (may be null when that is 0). M == 0 writes zeros.
int lora_bwd_da(DType dt, const BwdDaPlan& plan, const void* x, int64_t x_s0, int64_t x_s1, const void* ds,
                int64_t ds_s0, int64_t ds_s1, float* da, float* ws, int64_t M, int64_t K, int64_t R, uint32_t seed,
                uint32_t thr, float keep_scale, bool dropout, cudaStream_t stream);

}  // namespace fastpeft
