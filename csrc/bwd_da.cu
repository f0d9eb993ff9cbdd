// lora_bwd_da: dA[R, K] = keep_scale · dS[M, R]^T @ dropout(x)[M, K] (fp32), one read of x, the mask
// regenerated from the seed (the forward's mask: element (m, k) of x's stream).
//
// Block: 8 warps over a [RT, BK] tile of dA (RT-wide slice of R, BK columns of x) and one range of rows of M
// (bwd_da_plan in fastpeft_cuda.h). Warp w takes the range's row chunks w, w+8, ... (32 rows; 16 for RT = 64),
// stages x (masked) and dS of those rows in its own shared-memory tiles and accumulates dS^T @ x on the tensor
// cores. The eight warp tiles are summed in a fixed order, scaled by 1/(1-p) and written: to dA itself when the
// plan has one row range, else to that range's fp32 partial, which lora_bwd_da_finish sums in a fixed order. So
// the result is deterministic and the workspace bounded (4 MiB) whatever M is.
#include "common.cuh"
#include "fastpeft_cuda.h"

namespace fastpeft {
namespace {

constexpr int kWarps = 8, kThreads = kWarps * 32;

// Rows per warp step: 32 (the plan's chunk), 16 for rank slices of 64, whose dS rows would not fit in registers.
template <int RT>
constexpr int row_step() {
  return RT == 64 ? 16 : static_cast<int>(kBwdDaRowChunk);
}
static_assert(kBwdDaRowChunk % 16 == 0, "a row range is a whole number of steps of either size");

template <class T, int RT, int BK>
struct DaCfg {
  static constexpr int kMC = row_step<RT>();
  static constexpr int LDX = BK + smem_pad<T>();  // x tile [kMC][LDX]
  static constexpr int LDS = RT + smem_pad<T>();  // dS tile [kMC][LDS]
  static constexpr int LDR = BK + 4;              // fp32 warp tiles [kWarps * RT][LDR]
  static constexpr size_t kX = size_t(kMC) * LDX * sizeof(T);
  static constexpr size_t kWarpTile = kX + size_t(kMC) * LDS * sizeof(T);
  static constexpr size_t kTiles = kWarps * kWarpTile;
  static constexpr size_t kRed = size_t(kWarps) * RT * LDR * sizeof(float);
  static constexpr size_t kSmem = kTiles > kRed ? kTiles : kRed;
  static_assert(kX % 32 == 0 && kWarpTile % 32 == 0, "wmma needs 32-byte alignment");
  static_assert(BK % 16 == 0 && RT % 16 == 0 && kMC % 16 == 0, "whole 16x16 fragments");
};

// ~130-250 registers: one or two blocks per SM, whose warps each keep a chunk of x (2-4 KiB) in flight while
// the tensor cores work on the previous one (capping at 128 for two blocks spilled).
template <class T, int RT, int BK>
__global__ void __launch_bounds__(kThreads) lora_bwd_da_kernel(
    const T* __restrict__ x, int64_t x_s0, int64_t x_s1, const T* __restrict__ ds, int64_t ds_s0, int64_t ds_s1,
    float* __restrict__ out, int64_t M, int64_t K, int64_t R, int64_t rows_per_block, uint32_t seed, uint32_t thr,
    float keep_scale, bool use_dropout, bool x_vec, bool ds_vec) {
  using Cfg = DaCfg<T, RT, BK>;
  using MM = Mma<T>;
  constexpr int NT = RT / 16, CT = BK / 16, kMC = Cfg::kMC;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, tid = threadIdx.x;
  const int64_t k0 = int64_t(blockIdx.x) * BK, j0 = int64_t(blockIdx.z) * RT;
  const int64_t m_begin = int64_t(blockIdx.y) * rows_per_block;
  const int64_t m_end = m_begin + rows_per_block < M ? m_begin + rows_per_block : M;

  unsigned char* smem = dyn_smem();
  T* xs = reinterpret_cast<T*>(smem + warp * Cfg::kWarpTile);
  T* ss = reinterpret_cast<T*>(smem + warp * Cfg::kWarpTile + Cfg::kX);

  typename MM::Acc acc[NT][CT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int ct = 0; ct < CT; ++ct) zero(acc[nt][ct]);

  TileRegs<T, kMC, BK, 32> xr;
  TileRegs<T, kMC, RT, 32> sr;
  const int64_t nchunks = m_end > m_begin ? cdiv(m_end - m_begin, kMC) : 0;
  int64_t c = warp;
  if (c < nchunks) {
    xr.load(x, x_s0, x_s1, m_begin + c * kMC, m_end, k0, K, x_vec, lane);
    sr.load(ds, ds_s0, ds_s1, m_begin + c * kMC, m_end, j0, R, ds_vec, lane);
  }
  for (; c < nchunks; c += kWarps) {
    if (use_dropout) xr.dropout(seed, thr, m_begin + c * kMC, k0, lane);
    xr.store(xs, Cfg::LDX, lane);
    sr.store(ss, Cfg::LDS, lane);
    __syncwarp();
    if (c + kWarps < nchunks) {  // next chunk's loads overlap this chunk's math
      const int64_t m1 = m_begin + (c + kWarps) * kMC;
      xr.load(x, x_s0, x_s1, m1, m_end, k0, K, x_vec, lane);
      sr.load(ds, ds_s0, ds_s1, m1, m_end, j0, R, ds_vec, lane);
    }
#pragma unroll
    for (int kk = 0; kk < kMC; kk += MM::kK) {
      // acc[j, k] += dS^T [j, m] @ x [m, k]: dS^T is the column-major view of the dS tile [m][j].
      typename MM::template B<wmma::row_major> fb[CT];
#pragma unroll
      for (int ct = 0; ct < CT; ++ct) MM::load(fb[ct], xs + kk * Cfg::LDX + ct * 16, Cfg::LDX);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        typename MM::template A<wmma::col_major> fa;
        MM::load(fa, ss + kk * Cfg::LDS + nt * 16, Cfg::LDS);
#pragma unroll
        for (int ct = 0; ct < CT; ++ct) MM::mma(acc[nt][ct], fa, fb[ct]);
      }
    }
    __syncwarp();
  }

  __syncthreads();  // the warp tiles reuse the staging tiles' shared memory
  float* red = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int ct = 0; ct < CT; ++ct)
      wmma::store_matrix_sync(red + (warp * RT + nt * 16) * Cfg::LDR + ct * 16, acc[nt][ct], Cfg::LDR,
                              wmma::mem_row_major);
  __syncthreads();
  float* dst = out + int64_t(blockIdx.y) * R * K;  // this row range's partial (or dA itself: one range)
  for (int idx = tid; idx < RT * BK; idx += kThreads) {
    const int row = idx / BK, col = idx % BK;
    const int64_t j = j0 + row, k = k0 + col;
    if (j >= R || k >= K) continue;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += red[(w * RT + row) * Cfg::LDR + col];
    dst[j * K + k] = sum * keep_scale;
  }
}

// da = the sum of the row ranges' partials, in range order.
__global__ void lora_bwd_da_finish(const float* __restrict__ ws, float* __restrict__ da, int64_t parts,
                                   int64_t elems) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < elems; i += stride)
    da[i] = sum_parts(ws, parts, elems, i);
}

template <class T, int RT, int BK>
cudaError_t launch(const BwdDaPlan& plan, const void* x, int64_t x_s0, int64_t x_s1, const void* ds, int64_t ds_s0,
                   int64_t ds_s1, float* out, int64_t M, int64_t K, int64_t R, uint32_t seed, uint32_t thr,
                   float keep_scale, bool dropout, cudaStream_t stream) {
  using Cfg = DaCfg<T, RT, BK>;
  auto kernel = lora_bwd_da_kernel<T, RT, BK>;
  cudaError_t err = set_smem(kernel, Cfg::kSmem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(cdiv(K, BK)), static_cast<unsigned>(plan.m_blocks),
                  static_cast<unsigned>(cdiv(R, RT)));
  kernel<<<grid, kThreads, Cfg::kSmem, stream>>>(
      static_cast<const T*>(x), x_s0, x_s1, static_cast<const T*>(ds), ds_s0, ds_s1, out, M, K, R,
      plan.rows_per_block, seed, thr, keep_scale, dropout, can_vec(x, x_s0, x_s1, sizeof(T)),
      can_vec(ds, ds_s0, ds_s1, sizeof(T)));
  return cudaGetLastError();
}

template <class T>
cudaError_t dispatch_rank(const BwdDaPlan& plan, const void* x, int64_t x_s0, int64_t x_s1, const void* ds,
                          int64_t ds_s0, int64_t ds_s1, float* out, int64_t M, int64_t K, int64_t R, uint32_t seed,
                          uint32_t thr, float keep_scale, bool dropout, cudaStream_t stream) {
  // The tile shapes are the plan's (fastpeft_cuda.h): r <= 16 takes [16, 64] tiles, wider ranks [64, 32].
  if (plan.rt == 16 && plan.bk == 64)
    return launch<T, 16, 64>(plan, x, x_s0, x_s1, ds, ds_s0, ds_s1, out, M, K, R, seed, thr, keep_scale, dropout,
                             stream);
  if (plan.rt == 64 && plan.bk == 32)
    return launch<T, 64, 32>(plan, x, x_s0, x_s1, ds, ds_s0, ds_s1, out, M, K, R, seed, thr, keep_scale, dropout,
                             stream);
  return cudaErrorInvalidValue;
}

}  // namespace

int lora_bwd_da(DType dt, const BwdDaPlan& plan, const void* x, int64_t x_s0, int64_t x_s1, const void* ds,
                int64_t ds_s0, int64_t ds_s1, float* da, float* ws, int64_t M, int64_t K, int64_t R, uint32_t seed,
                uint32_t thr, float keep_scale, bool dropout, cudaStream_t stream) {
  if (R == 0 || K == 0) return cudaSuccess;
  if (M == 0) return cudaMemsetAsync(da, 0, size_t(R) * size_t(K) * sizeof(float), stream);  // an empty sum
  if (plan.m_blocks < 1 || plan.m_blocks > 65535 || (plan.m_blocks > 1 && ws == nullptr)) return cudaErrorInvalidValue;
  float* out = plan.m_blocks > 1 ? ws : da;
  cudaError_t err = cudaErrorInvalidValue;
  switch (dt) {
    case DType::kFloat32:
      err = dispatch_rank<float>(plan, x, x_s0, x_s1, ds, ds_s0, ds_s1, out, M, K, R, seed, thr, keep_scale, dropout,
                                 stream);
      break;
    case DType::kFloat16:
      err = dispatch_rank<__half>(plan, x, x_s0, x_s1, ds, ds_s0, ds_s1, out, M, K, R, seed, thr, keep_scale, dropout,
                                  stream);
      break;
    case DType::kBFloat16:
      err = dispatch_rank<__nv_bfloat16>(plan, x, x_s0, x_s1, ds, ds_s0, ds_s1, out, M, K, R, seed, thr, keep_scale,
                                         dropout, stream);
      break;
  }
  if (err != cudaSuccess || plan.m_blocks == 1) return err;
  const int64_t elems = R * K, threads = 256;
  const int64_t blocks = cdiv(elems, threads) < 4096 ? cdiv(elems, threads) : 4096;
  lora_bwd_da_finish<<<static_cast<unsigned>(blocks), static_cast<unsigned>(threads), 0, stream>>>(
      ws, da, plan.m_blocks, elems);
  return cudaGetLastError();
}

}  // namespace fastpeft
