// lora_dy_reduce: dS = s * dY @ B ([M, R]) and dB = s * dY^T @ S ([N, R]) from one read of dY.
//
// Block: 8 warps over 256 columns of dY (32 per warp) and a range of rows (a multiple of 16), one RT-wide
// slice of R (grid.z covers R > RT, re-reading dY). Per 16-row tile, every warp stages its dY [16, 32]
// slice; the block stages S [16, RT]. Each warp adds dY_w^T @ S to its dB accumulator (kept in registers for
// the whole row range) and computes dY_w @ B_w for the tile; the eight dS pieces are summed in a fixed order
// and written as this column-block's partial. A second kernel sums the partials in a fixed order and
// scales them: deterministic, no float atomics.
#include "common.cuh"
#include "fastpeft_cuda.h"

namespace fastpeft {
namespace {

constexpr int kWarps = 8, kThreads = kWarps * 32, kWN = 32, kBN = kWarps * kWN, kBM = 16;

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
    const T* __restrict__ s, int64_t s_s0, int64_t s_s1, float* __restrict__ ws_ds, float* __restrict__ ws_db,
    int64_t M, int64_t N, int64_t R, int64_t rows_per_block, bool dy_vec, bool b_vec, bool s_vec) {
  using Cfg = DyCfg<T, RT>;
  using MM = Mma<T>;
  constexpr int NT = RT / 16;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, tid = threadIdx.x;
  const int64_t n_warp = int64_t(blockIdx.x) * kBN + warp * kWN;
  const int64_t m_begin = int64_t(blockIdx.y) * rows_per_block;
  const int64_t m_end = m_begin + rows_per_block < M ? m_begin + rows_per_block : M;
  const int64_t j0 = int64_t(blockIdx.z) * RT;

  unsigned char* smem = dyn_smem();
  T* dys = reinterpret_cast<T*>(smem + warp * Cfg::kWarpTile);
  T* bs = dys + kBM * Cfg::LDY;
  T* ss = reinterpret_cast<T*>(smem + Cfg::kTiles);
  float* red = reinterpret_cast<float*>(smem + Cfg::kTiles + Cfg::kS);

  {  // B rows of this warp's columns: [32, RT], constant over the row loop
    TileRegs<T, kWN, RT, 32> br;
    br.load(b, b_s0, b_s1, n_warp, N, j0, R, b_vec, lane);
    br.store(bs, Cfg::LDB, lane);
  }

  typename MM::Acc acc_db[kWN / 16][NT];
#pragma unroll
  for (int i = 0; i < kWN / 16; ++i)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) zero(acc_db[i][nt]);

  TileRegs<T, kBM, kWN, 32> dyr;
  TileRegs<T, kBM, RT, kThreads> sr;
  dyr.load(dy, dy_s0, dy_s1, m_begin, m_end, n_warp, N, dy_vec, lane);
  sr.load(s, s_s0, s_s1, m_begin, m_end, j0, R, s_vec, tid);
  for (int64_t m0 = m_begin; m0 < m_end; m0 += kBM) {
    dyr.store(dys, Cfg::LDY, lane);
    sr.store(ss, Cfg::LDB, tid);
    __syncthreads();
    if (m0 + kBM < m_end) {  // next tile's loads overlap this tile's math
      dyr.load(dy, dy_s0, dy_s1, m0 + kBM, m_end, n_warp, N, dy_vec, lane);
      sr.load(s, s_s0, s_s1, m0 + kBM, m_end, j0, R, s_vec, tid);
    }
    // dB_w += dY_w^T [32, 16] @ S [16, RT]: dY_w^T is the column-major view of the dY tile.
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
    // dS piece of this warp = dY_w [16, 32] @ B_w [32, RT]
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
    __syncthreads();
    for (int idx = tid; idx < kBM * RT; idx += kThreads) {
      const int row = idx / RT, col = idx % RT;
      const int64_t m = m0 + row, j = j0 + col;
      if (m >= m_end || j >= R) continue;
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += red[(w * kBM + row) * Cfg::LDR + col];
      ws_ds[(int64_t(blockIdx.x) * M + m) * R + j] = sum;
    }
  }

  __syncthreads();  // the dB staging reuses all of shared memory
  float* stage = reinterpret_cast<float*>(smem) + warp * kWN * Cfg::LDR;
#pragma unroll
  for (int i = 0; i < kWN / 16; ++i)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
      wmma::store_matrix_sync(stage + i * 16 * Cfg::LDR + nt * 16, acc_db[i][nt], Cfg::LDR, wmma::mem_row_major);
  __syncwarp();
  float* out = ws_db + int64_t(blockIdx.y) * N * R;
  for (int idx = lane; idx < kWN * RT; idx += 32) {
    const int row = idx / RT, col = idx % RT;
    const int64_t n = n_warp + row, j = j0 + col;
    if (n < N && j < R) out[n * R + j] = stage[row * Cfg::LDR + col];
  }
}

// dS = s * sum over column-blocks, dB = s * sum over row-blocks, each in a fixed order.
__global__ void lora_dy_reduce_finish(const float* __restrict__ ws_ds, const float* __restrict__ ws_db,
                                      float* __restrict__ ds, float* __restrict__ db, int64_t n_blocks,
                                      int64_t m_blocks, int64_t ds_elems, int64_t db_elems, float scaling) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < ds_elems + db_elems; i += stride) {
    float sum = 0.f;
    if (i < ds_elems) {
      for (int64_t p = 0; p < n_blocks; ++p) sum += ws_ds[p * ds_elems + i];
      ds[i] = sum * scaling;
    } else {
      const int64_t e = i - ds_elems;
      for (int64_t p = 0; p < m_blocks; ++p) sum += ws_db[p * db_elems + e];
      db[e] = sum * scaling;
    }
  }
}

template <class T, int RT>
cudaError_t launch(const DyReducePlan& plan, const void* dy, int64_t dy_s0, int64_t dy_s1, const void* b, int64_t b_s0,
                   int64_t b_s1, const void* s, int64_t s_s0, int64_t s_s1, float* ws_ds, float* ws_db, int64_t M,
                   int64_t N, int64_t R, cudaStream_t stream) {
  using Cfg = DyCfg<T, RT>;
  auto kernel = lora_dy_reduce_kernel<T, RT>;
  cudaError_t err = set_smem(kernel, Cfg::kSmem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(plan.n_blocks), static_cast<unsigned>(plan.m_blocks),
                  static_cast<unsigned>(cdiv(R, RT)));
  kernel<<<grid, kThreads, Cfg::kSmem, stream>>>(
      static_cast<const T*>(dy), dy_s0, dy_s1, static_cast<const T*>(b), b_s0, b_s1, static_cast<const T*>(s), s_s0,
      s_s1, ws_ds, ws_db, M, N, R, plan.rows_per_block, can_vec(dy, dy_s0, dy_s1, sizeof(T)),
      can_vec(b, b_s0, b_s1, sizeof(T)), can_vec(s, s_s0, s_s1, sizeof(T)));
  return cudaGetLastError();
}

template <class T>
cudaError_t dispatch_rank(const DyReducePlan& plan, const void* dy, int64_t dy_s0, int64_t dy_s1, const void* b,
                          int64_t b_s0, int64_t b_s1, const void* s, int64_t s_s0, int64_t s_s1, float* ws_ds,
                          float* ws_db, int64_t M, int64_t N, int64_t R, cudaStream_t stream) {
  if (R <= 16) return launch<T, 16>(plan, dy, dy_s0, dy_s1, b, b_s0, b_s1, s, s_s0, s_s1, ws_ds, ws_db, M, N, R, stream);
  return launch<T, 64>(plan, dy, dy_s0, dy_s1, b, b_s0, b_s1, s, s_s0, s_s1, ws_ds, ws_db, M, N, R, stream);
}

}  // namespace

DyReducePlan dy_reduce_plan(int64_t M, int64_t N, int64_t R, int sms) {
  // About two blocks per SM per R-slice; the row range per block is what trades grid size against the
  // dB partials (m_blocks * N * R floats) while n_blocks * M * R floats hold the dS partials.
  DyReducePlan p{};
  p.n_blocks = cdiv(N > 0 ? N : 1, kBN);
  const int64_t tiles = cdiv(M > 0 ? M : 1, kBM);
  int64_t want = cdiv(2 * int64_t(sms > 0 ? sms : 1), p.n_blocks);
  if (want < 1) want = 1;
  if (want > tiles) want = tiles;
  p.rows_per_block = cdiv(tiles, want) * kBM;
  p.m_blocks = cdiv(M > 0 ? M : 1, p.rows_per_block);
  p.ws_ds_elems = p.n_blocks * M * R;
  p.ws_db_elems = p.m_blocks * N * R;
  return p;
}

int lora_dy_reduce(DType dt, const DyReducePlan& plan, const void* dy, int64_t dy_s0, int64_t dy_s1, const void* b,
                   int64_t b_s0, int64_t b_s1, const void* s, int64_t s_s0, int64_t s_s1, float* ds, float* db,
                   float* ws_ds, float* ws_db, int64_t M, int64_t N, int64_t R, float scaling, cudaStream_t stream) {
  if (R == 0 || (M == 0 && N == 0)) return cudaSuccess;
  cudaError_t err = cudaSuccess;
  if (M > 0 && N > 0) {
    switch (dt) {
      case DType::kFloat32:
        err = dispatch_rank<float>(plan, dy, dy_s0, dy_s1, b, b_s0, b_s1, s, s_s0, s_s1, ws_ds, ws_db, M, N, R, stream);
        break;
      case DType::kFloat16:
        err = dispatch_rank<__half>(plan, dy, dy_s0, dy_s1, b, b_s0, b_s1, s, s_s0, s_s1, ws_ds, ws_db, M, N, R, stream);
        break;
      case DType::kBFloat16:
        err = dispatch_rank<__nv_bfloat16>(plan, dy, dy_s0, dy_s1, b, b_s0, b_s1, s, s_s0, s_s1, ws_ds, ws_db, M, N, R,
                                           stream);
        break;
      default:
        return cudaErrorInvalidValue;
    }
    if (err != cudaSuccess) return err;
  }
  // M == 0 or N == 0: an empty reduction, the finish kernel writes zeros and reads no partials.
  const int64_t total = M * R + N * R;
  const int64_t n_parts_ds = (M > 0 && N > 0) ? plan.n_blocks : 0, n_parts_db = (M > 0 && N > 0) ? plan.m_blocks : 0;
  const int threads = 256;
  const int64_t blocks = cdiv(total, threads) < 4096 ? cdiv(total, threads) : 4096;
  lora_dy_reduce_finish<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(ws_ds, ws_db, ds, db, n_parts_ds,
                                                                               n_parts_db, M * R, N * R, scaling);
  return cudaGetLastError();
}

}  // namespace fastpeft
