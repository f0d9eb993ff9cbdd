// lora_shrink: S[M, R] = dropout(x)[M, K] @ A[R, K]^T, one read of x, the mask regenerated from the seed.
//
// Block: 8 warps over 32 rows of x and an RT-wide slice of R (grid.y covers R > RT, re-reading x from L2).
// The warps split K: warp w takes K-chunks w, w+8, ... of 32 columns, stages x (masked) and A in its own
// shared-memory tiles and accumulates on the tensor cores; the eight partial [32, RT] tiles are summed in
// a fixed order at the end (deterministic), scaled by 1/(1-p) once and rounded once to x's dtype.
#include "common.cuh"
#include "fastpeft_cuda.h"

namespace fastpeft {
namespace {

constexpr int kWarps = 8, kThreads = kWarps * 32, kBM = 32, kKC = 32;

template <class T, int RT>
struct ShrinkCfg {
  static constexpr int LD = kKC + smem_pad<T>();  // x and A tiles: [rows][LD]
  static constexpr int LDR = RT + 4;              // fp32 partials: [kBM][LDR]
  static constexpr size_t kTileBytes = size_t(kBM + RT) * LD * sizeof(T);
  static constexpr size_t kRedBytes = size_t(kWarps) * kBM * LDR * sizeof(float);
  static constexpr size_t kSmem = kWarps * kTileBytes > kRedBytes ? kWarps * kTileBytes : kRedBytes;
  static_assert(kTileBytes % 32 == 0 && (size_t(kBM) * LD * sizeof(T)) % 32 == 0, "wmma needs 32-byte alignment");
};

template <class T, int RT>
__global__ void __launch_bounds__(kThreads) lora_shrink_kernel(
    const T* __restrict__ x, int64_t x_s0, int64_t x_s1, const T* __restrict__ a, int64_t a_s0, int64_t a_s1,
    T* __restrict__ s, int64_t M, int64_t K, int64_t R, uint32_t seed, uint32_t thr, float keep_scale,
    bool use_dropout, bool x_vec, bool a_vec) {
  using Cfg = ShrinkCfg<T, RT>;
  using MM = Mma<T>;
  constexpr int NT = RT / 16;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t m0 = int64_t(blockIdx.x) * kBM, j0 = int64_t(blockIdx.y) * RT;

  unsigned char* smem = dyn_smem();
  T* xs = reinterpret_cast<T*>(smem + warp * Cfg::kTileBytes);
  T* as = xs + kBM * Cfg::LD;

  typename MM::Acc acc[2][NT];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) zero(acc[mt][nt]);

  TileRegs<T, kBM, kKC, 32> xr;
  TileRegs<T, RT, kKC, 32> ar;
  const int64_t nchunks = cdiv(K, kKC);
  int64_t c = warp;
  if (c < nchunks) {
    xr.load(x, x_s0, x_s1, m0, M, c * kKC, K, x_vec, lane);
    ar.load(a, a_s0, a_s1, j0, R, c * kKC, K, a_vec, lane);
  }
  for (; c < nchunks; c += kWarps) {
    if (use_dropout) xr.dropout(seed, thr, m0, c * kKC, lane);
    xr.store(xs, Cfg::LD, lane);
    ar.store(as, Cfg::LD, lane);
    __syncwarp();
    if (c + kWarps < nchunks) {  // next chunk's loads overlap this chunk's math
      xr.load(x, x_s0, x_s1, m0, M, (c + kWarps) * kKC, K, x_vec, lane);
      ar.load(a, a_s0, a_s1, j0, R, (c + kWarps) * kKC, K, a_vec, lane);
    }
#pragma unroll
    for (int kk = 0; kk < kKC; kk += MM::kK) {
      typename MM::template B<wmma::col_major> fb[NT];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) MM::load(fb[nt], as + nt * 16 * Cfg::LD + kk, Cfg::LD);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        typename MM::template A<wmma::row_major> fa;
        MM::load(fa, xs + mt * 16 * Cfg::LD + kk, Cfg::LD);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) MM::mma(acc[mt][nt], fa, fb[nt]);
      }
    }
    __syncwarp();
  }

  __syncthreads();  // the partials reuse the tiles' shared memory
  float* red = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
      wmma::store_matrix_sync(red + (warp * kBM + mt * 16) * Cfg::LDR + nt * 16, acc[mt][nt], Cfg::LDR,
                              wmma::mem_row_major);
  __syncthreads();
  for (int idx = threadIdx.x; idx < kBM * RT; idx += kThreads) {
    const int row = idx / RT, col = idx % RT;
    const int64_t m = m0 + row, j = j0 + col;
    if (m >= M || j >= R) continue;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += red[(w * kBM + row) * Cfg::LDR + col];
    s[m * R + j] = Traits<T>::from_f(sum * keep_scale);
  }
}

template <class T, int RT>
cudaError_t launch(const void* x, int64_t x_s0, int64_t x_s1, const void* a, int64_t a_s0, int64_t a_s1, void* s,
                   int64_t M, int64_t K, int64_t R, uint32_t seed, uint32_t thr, float keep_scale, bool dropout,
                   cudaStream_t stream) {
  using Cfg = ShrinkCfg<T, RT>;
  auto kernel = lora_shrink_kernel<T, RT>;
  cudaError_t err = set_smem(kernel, Cfg::kSmem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(cdiv(M, kBM)), static_cast<unsigned>(cdiv(R, RT)));
  kernel<<<grid, kThreads, Cfg::kSmem, stream>>>(
      static_cast<const T*>(x), x_s0, x_s1, static_cast<const T*>(a), a_s0, a_s1, static_cast<T*>(s), M, K, R, seed,
      thr, keep_scale, dropout, can_vec(x, x_s0, x_s1, sizeof(T)), can_vec(a, a_s0, a_s1, sizeof(T)));
  return cudaGetLastError();
}

template <class T>
cudaError_t dispatch_rank(const void* x, int64_t x_s0, int64_t x_s1, const void* a, int64_t a_s0, int64_t a_s1,
                          void* s, int64_t M, int64_t K, int64_t R, uint32_t seed, uint32_t thr, float keep_scale,
                          bool dropout, cudaStream_t stream) {
  // r <= 16 (the common LoRA ranks) reads x once with a narrow tile; wider ranks take 64-wide slices.
  if (R <= 16) return launch<T, 16>(x, x_s0, x_s1, a, a_s0, a_s1, s, M, K, R, seed, thr, keep_scale, dropout, stream);
  return launch<T, 64>(x, x_s0, x_s1, a, a_s0, a_s1, s, M, K, R, seed, thr, keep_scale, dropout, stream);
}

}  // namespace

int lora_shrink(DType dt, const void* x, int64_t x_s0, int64_t x_s1, const void* a, int64_t a_s0, int64_t a_s1,
                void* s, int64_t M, int64_t K, int64_t R, uint32_t seed, uint32_t thr, float keep_scale, bool dropout,
                cudaStream_t stream) {
  if (M == 0 || R == 0) return cudaSuccess;
  switch (dt) {
    case DType::kFloat32:
      return dispatch_rank<float>(x, x_s0, x_s1, a, a_s0, a_s1, s, M, K, R, seed, thr, keep_scale, dropout, stream);
    case DType::kFloat16:
      return dispatch_rank<__half>(x, x_s0, x_s1, a, a_s0, a_s1, s, M, K, R, seed, thr, keep_scale, dropout, stream);
    case DType::kBFloat16:
      return dispatch_rank<__nv_bfloat16>(x, x_s0, x_s1, a, a_s0, a_s1, s, M, K, R, seed, thr, keep_scale, dropout,
                                          stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastpeft
