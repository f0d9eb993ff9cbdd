// lora_dy_reduce: dS = s * dY @ B ([M, R]) and dB = s * dY^T @ S ([N, R]), fp32, deterministic.
//
// Block: 8 warps over a range of 256-column chunks of dY (32 columns per warp), a range of rows (a multiple of
// 16) and one RT-wide slice of R (grid.z covers R > RT, re-reading dY); the grid is dy_reduce_plan's
// (fastpeft_cuda.h), a function of the shapes and the SM count only. Per chunk, per 16-row tile, every warp
// stages its dY [16, 32] slice and the block stages S [16, RT]. Each warp adds dY_w^T @ S to its dB accumulator
// (registers, over the block's rows; written at the chunk's end as the row range's partial or as dB itself) and
// computes dY_w @ B_w; the eight dS pieces are summed in a fixed order and added to the row's value in the column
// range's partial (or in dS itself): the thread that adds a chunk's piece is the one that wrote the previous
// chunk's, so the running sum needs no synchronisation. A second kernel sums the partials in a fixed order and
// scales them: deterministic, no float atomics, every workspace within kMaxWsElems (4 MiB).
#include "common.cuh"
#include "fastpeft_cuda.h"

namespace fastpeft {
namespace {

constexpr int kWarps = 8, kThreads = kWarps * 32, kWN = 32, kBN = kWarps * kWN, kBM = 16;
static_assert(kBN == kDyChunkCols && kBM == kDyTileRows, "dy_reduce_plan counts the kernel's chunks and tiles");

template <class T, int RT>
struct DyCfg {
  static constexpr int LDY = kWN + smem_pad<T>();  // dY tile [16][LDY]
  static constexpr int LDB = RT + smem_pad<T>();   // B tile [32][LDB], S tile [16][LDB]
  static constexpr int LDR = RT + 4;               // fp32 [..][LDR]
  static constexpr size_t kWarpTile = size_t(kBM) * LDY * sizeof(T) + size_t(kWN) * LDB * sizeof(T);
  static constexpr size_t kTiles = kWarps * kWarpTile;
  static constexpr size_t kS = size_t(kBM) * LDB * sizeof(T);
  static constexpr size_t kRed = size_t(kWarps) * kBM * LDR * sizeof(float);
  static constexpr size_t kStage = size_t(kWarps) * kWN * LDR * sizeof(float);  // dB at the end
  static constexpr size_t kMain = kTiles + kS + kRed;
  static constexpr size_t kSmem = kMain > kStage ? kMain : kStage;
  static_assert(kWarpTile % 32 == 0 && (size_t(kBM) * LDY * sizeof(T)) % 32 == 0 && kS % 32 == 0,
                "wmma needs 32-byte alignment");
};

template <class T, int RT>
__global__ void __launch_bounds__(kThreads) lora_dy_reduce_kernel(
    const T* __restrict__ dy, int64_t dy_s0, int64_t dy_s1, const T* __restrict__ b, int64_t b_s0, int64_t b_s1,
    const T* __restrict__ s, int64_t s_s0, int64_t s_s1, float* __restrict__ ds_out, int64_t ds_part_stride,
    float ds_scale, float* __restrict__ db_out, int64_t db_part_stride, float db_scale, int64_t M, int64_t N,
    int64_t R, int64_t rows_per_block, int64_t chunks_per_split, bool do_ds, bool do_db, bool dy_vec, bool b_vec,
    bool s_vec) {
  using Cfg = DyCfg<T, RT>;
  using MM = Mma<T>;
  constexpr int NT = RT / 16;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, tid = threadIdx.x;
  const int64_t chunks = cdiv(N, kBN);
  const int64_t c_begin = int64_t(blockIdx.x) * chunks_per_split;
  const int64_t c_end = c_begin + chunks_per_split < chunks ? c_begin + chunks_per_split : chunks;
  const int64_t m_begin = int64_t(blockIdx.y) * rows_per_block;
  const int64_t m_end = m_begin + rows_per_block < M ? m_begin + rows_per_block : M;
  const int64_t j0 = int64_t(blockIdx.z) * RT;
  float* dso = ds_out + int64_t(blockIdx.x) * ds_part_stride;  // this column range's partial (or dS: stride 0)
  float* dbo = db_out + int64_t(blockIdx.y) * db_part_stride;  // this row range's partial (or dB: stride 0)

  unsigned char* smem = dyn_smem();
  T* dys = reinterpret_cast<T*>(smem + warp * Cfg::kWarpTile);
  T* bs = dys + kBM * Cfg::LDY;
  T* ss = reinterpret_cast<T*>(smem + Cfg::kTiles);
  float* red = reinterpret_cast<float*>(smem + Cfg::kTiles + Cfg::kS);

  TileRegs<T, kBM, kWN, 32> dyr;
  TileRegs<T, kBM, RT, kThreads> sr;
  dyr.load(dy, dy_s0, dy_s1, m_begin, m_end, c_begin * kBN + warp * kWN, N, dy_vec, lane);
  if (do_db) sr.load(s, s_s0, s_s1, m_begin, m_end, j0, R, s_vec, tid);
  for (int64_t c = c_begin; c < c_end; ++c) {
    const int64_t n_warp = c * kBN + warp * kWN;
    if (do_ds) {  // B rows of this warp's columns: [32, RT], constant over the row loop (own region of smem)
      TileRegs<T, kWN, RT, 32> br;
      br.load(b, b_s0, b_s1, n_warp, N, j0, R, b_vec, lane);
      br.store(bs, Cfg::LDB, lane);
    }
    typename MM::Acc acc_db[kWN / 16][NT];
    if (do_db) {
#pragma unroll
      for (int i = 0; i < kWN / 16; ++i)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) zero(acc_db[i][nt]);
    }
    for (int64_t m0 = m_begin; m0 < m_end; m0 += kBM) {
      dyr.store(dys, Cfg::LDY, lane);
      if (do_db) sr.store(ss, Cfg::LDB, tid);
      __syncthreads();
      // The next tile's loads (this chunk's next rows, else the next chunk's first rows) overlap this tile's math.
      const bool more_rows = m0 + kBM < m_end;
      if (more_rows || c + 1 < c_end) {
        const int64_t m1 = more_rows ? m0 + kBM : m_begin;
        dyr.load(dy, dy_s0, dy_s1, m1, m_end, more_rows ? n_warp : n_warp + kBN, N, dy_vec, lane);
        if (do_db) sr.load(s, s_s0, s_s1, m1, m_end, j0, R, s_vec, tid);
      }
      if (do_db) {  // dB_w += dY_w^T [32, 16] @ S [16, RT]: dY_w^T is the column-major view of the dY tile.
#pragma unroll
        for (int kk = 0; kk < kBM; kk += MM::kK) {
          typename MM::template B<wmma::row_major> fs[NT];
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) MM::load(fs[nt], ss + kk * Cfg::LDB + nt * 16, Cfg::LDB);
#pragma unroll
          for (int i = 0; i < kWN / 16; ++i) {
            typename MM::template A<wmma::col_major> fa;
            MM::load(fa, dys + kk * Cfg::LDY + i * 16, Cfg::LDY);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) MM::mma(acc_db[i][nt], fa, fs[nt]);
          }
        }
      }
      if (do_ds) {  // dS piece of this warp = dY_w [16, 32] @ B_w [32, RT]
        typename MM::Acc acc_ds[NT];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) zero(acc_ds[nt]);
#pragma unroll
        for (int kk = 0; kk < kWN; kk += MM::kK) {
          typename MM::template A<wmma::row_major> fa;
          MM::load(fa, dys + kk, Cfg::LDY);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            typename MM::template B<wmma::row_major> fb;
            MM::load(fb, bs + kk * Cfg::LDB + nt * 16, Cfg::LDB);
            MM::mma(acc_ds[nt], fa, fb);
          }
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
          wmma::store_matrix_sync(red + warp * kBM * Cfg::LDR + nt * 16, acc_ds[nt], Cfg::LDR, wmma::mem_row_major);
      }
      __syncthreads();  // red is complete; every read of this tile's dys and ss is done
      if (do_ds) {
        for (int idx = tid; idx < kBM * RT; idx += kThreads) {
          const int row = idx / RT, col = idx % RT;
          const int64_t m = m0 + row, j = j0 + col;
          if (m >= m_end || j >= R) continue;
          float sum = 0.f;
#pragma unroll
          for (int w = 0; w < kWarps; ++w) sum += red[(w * kBM + row) * Cfg::LDR + col];
          float* dst = dso + m * R + j;
          if (c != c_begin) sum = *dst + sum;  // the running sum over the range's chunks, in chunk order
          *dst = c + 1 == c_end ? sum * ds_scale : sum;
        }
      }
    }
    if (do_db) {
      __syncthreads();  // the dB staging reuses all of shared memory
      float* stage = reinterpret_cast<float*>(smem) + warp * kWN * Cfg::LDR;
#pragma unroll
      for (int i = 0; i < kWN / 16; ++i)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
          wmma::store_matrix_sync(stage + i * 16 * Cfg::LDR + nt * 16, acc_db[i][nt], Cfg::LDR, wmma::mem_row_major);
      __syncwarp();
      for (int idx = lane; idx < kWN * RT; idx += 32) {
        const int row = idx / RT, col = idx % RT;
        const int64_t n = n_warp + row, j = j0 + col;
        if (n < N && j < R) dbo[n * R + j] = stage[row * Cfg::LDR + col] * db_scale;
      }
      __syncthreads();  // the next chunk stages its tiles over the dB staging
    }
  }
}

// The outputs whose reduction was split: dS = s * sum over column ranges, dB = s * sum over row ranges, each in a
// fixed order. parts < 2: that output was written by the pass itself and is skipped.
__global__ void lora_dy_reduce_finish(const float* __restrict__ ws_ds, const float* __restrict__ ws_db,
                                      float* __restrict__ ds, float* __restrict__ db, int64_t ds_parts,
                                      int64_t db_parts, int64_t ds_elems, int64_t db_elems, float scaling) {
  const int64_t ds_n = ds_parts > 1 ? ds_elems : 0, total = ds_n + (db_parts > 1 ? db_elems : 0);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    if (i < ds_n)
      ds[i] = sum_parts(ws_ds, ds_parts, ds_elems, i) * scaling;
    else
      db[i - ds_n] = sum_parts(ws_db, db_parts, db_elems, i - ds_n) * scaling;
  }
}

// One pass of the plan: its outputs go to the partials when its reduction is split, else to dS / dB scaled.
struct PassArgs {
  float *ds_out, *db_out;
  int64_t ds_part_stride, db_part_stride;
  float ds_scale, db_scale;
};

template <class T, int RT>
cudaError_t launch(const DyReducePass& q, const PassArgs& o, const void* dy, int64_t dy_s0, int64_t dy_s1,
                   const void* b, int64_t b_s0, int64_t b_s1, const void* s, int64_t s_s0, int64_t s_s1, int64_t M,
                   int64_t N, int64_t R, cudaStream_t stream) {
  using Cfg = DyCfg<T, RT>;
  auto kernel = lora_dy_reduce_kernel<T, RT>;
  cudaError_t err = set_smem(kernel, Cfg::kSmem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(q.col_splits), static_cast<unsigned>(q.row_blocks),
                  static_cast<unsigned>(cdiv(R, RT)));
  kernel<<<grid, kThreads, Cfg::kSmem, stream>>>(
      static_cast<const T*>(dy), dy_s0, dy_s1, static_cast<const T*>(b), b_s0, b_s1, static_cast<const T*>(s), s_s0,
      s_s1, o.ds_out, o.ds_part_stride, o.ds_scale, o.db_out, o.db_part_stride, o.db_scale, M, N, R,
      q.rows_per_block, q.chunks_per_split, q.ds, q.db, can_vec(dy, dy_s0, dy_s1, sizeof(T)),
      can_vec(b, b_s0, b_s1, sizeof(T)), can_vec(s, s_s0, s_s1, sizeof(T)));
  return cudaGetLastError();
}

template <class T>
cudaError_t dispatch_rank(int64_t rt, const DyReducePass& q, const PassArgs& o, const void* dy, int64_t dy_s0,
                          int64_t dy_s1, const void* b, int64_t b_s0, int64_t b_s1, const void* s, int64_t s_s0,
                          int64_t s_s1, int64_t M, int64_t N, int64_t R, cudaStream_t stream) {
  // The rank slice is the plan's (fastpeft_cuda.h): r <= 16 takes 16, wider ranks 64.
  if (rt == 16) return launch<T, 16>(q, o, dy, dy_s0, dy_s1, b, b_s0, b_s1, s, s_s0, s_s1, M, N, R, stream);
  if (rt == 64) return launch<T, 64>(q, o, dy, dy_s0, dy_s1, b, b_s0, b_s1, s, s_s0, s_s1, M, N, R, stream);
  return cudaErrorInvalidValue;
}

// A pass the kernel can run: a grid within CUDA's limits whose ranges tile [0, M) x [0, N) exactly.
bool pass_ok(const DyReducePass& q, int64_t M, int64_t N) {
  const int64_t chunks = cdiv(N, kBN);
  return (q.ds || q.db) && q.chunks_per_split >= 1 && q.col_splits >= 1 && q.col_splits <= 0x7fffffff &&
         (q.col_splits - 1) * q.chunks_per_split < chunks && q.col_splits * q.chunks_per_split >= chunks &&
         q.rows_per_block >= kBM && q.rows_per_block % kBM == 0 && q.row_blocks >= 1 && q.row_blocks <= 65535 &&
         (q.row_blocks - 1) * q.rows_per_block < M && q.row_blocks * q.rows_per_block >= M;
}

}  // namespace

int lora_dy_reduce(DType dt, const DyReducePlan& plan, const void* dy, int64_t dy_s0, int64_t dy_s1, const void* b,
                   int64_t b_s0, int64_t b_s1, const void* s, int64_t s_s0, int64_t s_s1, float* ds, float* db,
                   float* ws, int64_t M, int64_t N, int64_t R, float scaling, cudaStream_t stream) {
  if (R == 0) return cudaSuccess;
  if (M == 0 || N == 0) {  // an empty reduction: the other output is zeros
    const size_t bytes = size_t(M > 0 ? M : N) * size_t(R) * sizeof(float);
    return bytes > 0 ? cudaMemsetAsync(M > 0 ? ds : db, 0, bytes, stream) : cudaSuccess;
  }
  if (plan.passes < 1 || plan.passes > 2 || plan.rt != (R <= 16 ? 16 : 64)) return cudaErrorInvalidValue;
  const DyReducePass& dsp = plan.pass[0];
  const DyReducePass& dbp = plan.pass[plan.passes - 1];
  const int64_t ds_parts = dsp.col_splits > 1 ? dsp.col_splits : 1, db_parts = dbp.row_blocks > 1 ? dbp.row_blocks : 1;
  if (!dsp.ds || !dbp.db || (plan.passes == 2 && (dsp.db || dbp.ds)) ||
      plan.ws_ds_elems != (ds_parts > 1 ? ds_parts * M * R : 0) ||
      plan.ws_db_elems != (db_parts > 1 ? db_parts * N * R : 0) ||
      (plan.ws_ds_elems + plan.ws_db_elems > 0 && ws == nullptr))
    return cudaErrorInvalidValue;
  float* ws_ds = ws;
  float* ws_db = ws != nullptr ? ws + plan.ws_ds_elems : nullptr;
  for (int i = 0; i < plan.passes; ++i) {
    const DyReducePass& q = plan.pass[i];
    if (!pass_ok(q, M, N)) return cudaErrorInvalidValue;
    PassArgs o{};
    if (q.ds) {
      o.ds_out = ds_parts > 1 ? ws_ds : ds;
      o.ds_part_stride = ds_parts > 1 ? M * R : 0;
      o.ds_scale = ds_parts > 1 ? 1.f : scaling;
    }
    if (q.db) {
      o.db_out = db_parts > 1 ? ws_db : db;
      o.db_part_stride = db_parts > 1 ? N * R : 0;
      o.db_scale = db_parts > 1 ? 1.f : scaling;
    }
    cudaError_t err = cudaErrorInvalidValue;
    switch (dt) {
      case DType::kFloat32:
        err = dispatch_rank<float>(plan.rt, q, o, dy, dy_s0, dy_s1, b, b_s0, b_s1, s, s_s0, s_s1, M, N, R, stream);
        break;
      case DType::kFloat16:
        err = dispatch_rank<__half>(plan.rt, q, o, dy, dy_s0, dy_s1, b, b_s0, b_s1, s, s_s0, s_s1, M, N, R, stream);
        break;
      case DType::kBFloat16:
        err = dispatch_rank<__nv_bfloat16>(plan.rt, q, o, dy, dy_s0, dy_s1, b, b_s0, b_s1, s, s_s0, s_s1, M, N, R,
                                           stream);
        break;
    }
    if (err != cudaSuccess) return err;
  }
  if (ds_parts == 1 && db_parts == 1) return cudaSuccess;  // both written by the passes
  const int64_t total = (ds_parts > 1 ? M * R : 0) + (db_parts > 1 ? N * R : 0);
  const int threads = 256;
  const int64_t blocks = cdiv(total, threads) < 4096 ? cdiv(total, threads) : 4096;
  lora_dy_reduce_finish<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(ws_ds, ws_db, ds, db, ds_parts,
                                                                               db_parts, M * R, N * R, scaling);
  return cudaGetLastError();
}

}  // namespace fastpeft
