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

// Workspace budget of every split reduction (issue 13: bounded temporaries): a reduction's fp32 partials take
// at most kMaxWsElems floats (4 MiB) whatever the reduced length, within the Triton kernels' PARTIAL_BUDGET rule
// (kernels/common.py: at most one output plus 4 MiB). Where even two partials would not fit, one part writes the
// output directly. The plans are inline, plain C++, so that host tests can check them.
constexpr int64_t kMaxWsElems = int64_t(1) << 20;  // fp32 elements: 4 MiB

// Parts of a reduction: `want`, at most `most` (the blocks along the reduced length) and within kMaxWsElems
// for partials of `part_elems` floats each; 1 (no partials) when fewer than two fit.
inline int64_t reduction_splits(int64_t want, int64_t most, int64_t part_elems) {
  int64_t s = want < most ? want : most;
  const int64_t cap = part_elems > 0 ? kMaxWsElems / part_elems : 1;
  if (s > cap) s = cap;
  return s < 2 ? 1 : s;
}

// The grid and workspace of lora_dy_reduce, fixed by the shapes and the device's SM count only (so the summation
// order, hence the result, is reproducible). A block covers a rank slice of rt (grid.z: dY re-read per slice), a
// range of rows (grid.y) and a range of 256-column chunks of dY (grid.x), looping over the chunks and, per chunk,
// over its rows: per chunk it keeps dB of the chunk's columns in registers over the rows (one partial per row
// range, or dB itself), and adds the chunk's dS of each row into its column range's fp32 partial (or into dS
// itself: one range). A second kernel sums the partials in a fixed order. Each workspace <= kMaxWsElems.
// One pass computes dS and dB from one read of dY while that keeps enough blocks busy; where the budget leaves
// it too few (large r*M and r*N), two passes read dY twice at full width: dS over row ranges (written directly),
// then dB over every column chunk (row-range partials within the budget). Workspace at M = 8192, 132 SMs, before
// (one column block per 256 columns, dS partials n_blocks*M*r, dB partials ~2*132/n_blocks row ranges) and now:
//   N = 4096,  r = 16:  8 MiB dS + 4.25 MiB dB;  now one pass, 8 column x 16 row ranges: 4 MiB + 4 MiB
//   N = 4096,  r = 128: 64 MiB + 34 MiB;         now two passes, dS direct, 2 row ranges of dB: 0 + 4 MiB
//   N = 11008, r = 16:  21.5 MiB + 4.7 MiB;      now two passes, dS direct, 5 row ranges of dB: 0 + 3.4 MiB
//   N = 11008, r = 128: 172 MiB + 37.6 MiB;      now two passes, both written directly: no workspace
constexpr int64_t kDyChunkCols = 256;  // columns of dY per chunk: 8 warps x 32
constexpr int64_t kDyTileRows = 16;    // rows of dY per tile
struct DyReducePass {
  bool ds, db;               // what the pass computes
  int64_t col_splits;        // grid.x: column ranges; dS partials when > 1
  int64_t chunks_per_split;  // 256-column chunks per range (the last range may have fewer)
  int64_t row_blocks;        // grid.y: row ranges; dB partials when > 1
  int64_t rows_per_block;    // multiple of kDyTileRows
};
struct DyReducePlan {
  int64_t rt;             // rank slice per block: 16 (R <= 16) or 64; grid.z = cdiv(R, rt)
  int64_t passes;         // 1: pass[0] computes dS and dB; 2: pass[0] dS, pass[1] dB
  DyReducePass pass[2];
  int64_t ws_ds_elems;    // fp32: col_splits * M * R of the pass computing dS, or 0 (dS written directly)
  int64_t ws_db_elems;    // fp32: row_blocks * N * R of the pass computing dB, or 0 (dB written directly)
};

// A pass over `chunks` column chunks and `tiles` row tiles with (at most) the wanted splits, each range even.
inline DyReducePass dy_reduce_pass(bool ds, bool db, int64_t col_splits, int64_t row_blocks, int64_t chunks,
                                   int64_t tiles, int64_t M) {
  DyReducePass p{};
  p.ds = ds;
  p.db = db;
  p.chunks_per_split = (chunks + col_splits - 1) / col_splits;
  p.col_splits = (chunks + p.chunks_per_split - 1) / p.chunks_per_split;
  p.rows_per_block = (tiles + row_blocks - 1) / row_blocks * kDyTileRows;
  p.row_blocks = M > 0 ? (M + p.rows_per_block - 1) / p.rows_per_block : 1;
  return p;
}

inline DyReducePlan dy_reduce_plan(int64_t M, int64_t N, int64_t R, int sms) {
  DyReducePlan p{};
  p.rt = R <= 16 ? 16 : 64;
  const int64_t slices = R > 0 ? (R + p.rt - 1) / p.rt : 1;
  const int64_t chunks = N > 0 ? (N + kDyChunkCols - 1) / kDyChunkCols : 1;
  const int64_t tiles = M > 0 ? (M + kDyTileRows - 1) / kDyTileRows : 1;
  const int64_t target = 2 * int64_t(sms > 0 ? sms : 1);  // blocks in flight: the passes stream dY
  const int64_t per_slice = (target + slices - 1) / slices;
  // One pass: column ranges first (one chunk each where the budget allows), then row ranges to fill the GPU.
  const int64_t f_cols = reduction_splits(per_slice, chunks, M * R);
  const int64_t f_rows = reduction_splits((per_slice + f_cols - 1) / f_cols, tiles, N * R);
  const DyReducePass fused = dy_reduce_pass(true, true, f_cols, f_rows, chunks, tiles, M);
  // Two passes: dS over row ranges only (no partials), dB over every chunk and row ranges within the budget.
  const int64_t s_rows = per_slice < tiles ? per_slice : tiles;
  const int64_t b_rows = reduction_splits((per_slice + chunks - 1) / chunks, tiles, N * R);
  const DyReducePass ds_pass = dy_reduce_pass(true, false, 1, s_rows, chunks, tiles, M);
  const DyReducePass db_pass = dy_reduce_pass(false, true, chunks, b_rows, chunks, tiles, M);
  // Cost model: a pass of g blocks per slice streams dY at min(g, per_slice) / per_slice of full speed; two
  // passes are taken only when estimated at least 25% faster (the one read of dY wins ties).
  auto busy = [per_slice](const DyReducePass& q) {
    const int64_t g = q.col_splits * q.row_blocks;
    return g < per_slice ? g : per_slice;
  };
  const int64_t gf = busy(fused), gs = busy(ds_pass), gb = busy(db_pass);
  if (4 * gf * (gs + gb) < 3 * gs * gb) {  // 4 (1/gs + 1/gb) < 3 / gf
    p.passes = 2;
    p.pass[0] = ds_pass;
    p.pass[1] = db_pass;
  } else {
    p.passes = 1;
    p.pass[0] = fused;
  }
  const DyReducePass& dsp = p.pass[0];
  const DyReducePass& dbp = p.pass[p.passes - 1];
  p.ws_ds_elems = dsp.col_splits > 1 ? dsp.col_splits * M * R : 0;
  p.ws_db_elems = dbp.row_blocks > 1 ? dbp.row_blocks * N * R : 0;
  return p;
}

// dS[M, R] = scaling * dy[M, N] @ b[N, R];  dB[N, R] = scaling * dy^T @ s[M, R]   (both fp32, contiguous)
// Per the plan: one read of dY (or two), fp32 partials in ws (plan.ws_ds_elems + plan.ws_db_elems floats, dS's
// first; may be null when both are 0), then a fixed-order reduction: deterministic, no float atomics.
int lora_dy_reduce(DType dt, const DyReducePlan& plan, const void* dy, int64_t dy_s0, int64_t dy_s1,
                   const void* b, int64_t b_s0, int64_t b_s1, const void* s, int64_t s_s0, int64_t s_s1,
                   float* ds, float* db, float* ws, int64_t M, int64_t N, int64_t R, float scaling,
                   cudaStream_t stream);

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
// workspace is capped at kMaxWsElems floats (4 MiB, reduction_splits): where a split would need more, one row
// range writes dA directly (such shapes have rt x bk tiles enough to fill the GPU).
constexpr int64_t kBwdDaRowChunk = 32;  // rows of x per warp step
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
  const int64_t want = reduction_splits(tiles > 0 ? (target + tiles - 1) / tiles : 1, chunks, R * K);
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
