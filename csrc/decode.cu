// lora_decode: y[M, N] = x @ W0^T + bias + s * S @ B^T with S = dropout(x) @ A^T, for M <= 16 (decode): the
// whole forward in one launch, S included (a backward needs it).
//
// Block: 8 warps over 32 output features; the warps split K in 32-column chunks and stage x (M rows padded
// to 16), W0 [32, chunk] and A [RT, chunk] in their own shared-memory tiles, so W0 is read once in total.
// With dropout a warp also stages the masked x chunk (the mask regenerated from (seed, row, col), as in
// shrink.cu): W0 sees x, A sees dropout(x). Each block recomputes S = dropout(x) @ A^T · 1/(1-p) (A and x are
// small and stay in L2), rounds it to x's dtype like the stored S of the other paths (block 0 stores it) and
// applies S @ B^T to its 32 features with fp32 FMAs. Ranks above RT take extra passes over x and A (not over
// W0). Warp partials are summed in a fixed order (deterministic, so every block holds the same S); y is fp32
// until the one rounding at the store.
#include "common.cuh"
#include "fastpeft_cuda.h"

namespace fastpeft {
namespace {

constexpr int kWarps = 8, kThreads = kWarps * 32, kNO = 32, kKC = 32, kMP = 16;

template <class T, int RT>
struct DecCfg {
  static constexpr int LD = kKC + smem_pad<T>();
  static constexpr int LDY = kNO + 4, LDT = RT + 4;
  static constexpr size_t kX = size_t(kMP) * LD * sizeof(T);
  static constexpr size_t kW = size_t(kNO) * LD * sizeof(T);
  static constexpr size_t kA = size_t(RT) * LD * sizeof(T);
  static constexpr size_t kWarpTile = kX + kW + kA + kX;  // x, W0, A, dropout(x)
  static constexpr size_t kTiles = kWarps * kWarpTile;
  static constexpr size_t kYRed = size_t(kWarps) * kMP * LDY * sizeof(float);
  static constexpr size_t kTRed = size_t(kWarps) * kMP * LDT * sizeof(float);
  static constexpr size_t kTFin = size_t(kMP) * LDT * sizeof(float);
  static constexpr size_t kRed = kYRed + kTRed + kTFin;
  static constexpr size_t kSmem = kTiles > kRed ? kTiles : kRed;
  static_assert(kX % 32 == 0 && kW % 32 == 0 && kA % 32 == 0 && kWarpTile % 32 == 0 && kYRed % 32 == 0 &&
                    kTRed % 32 == 0,
                "wmma needs 32-byte alignment");
};

template <class T, int RT>
__global__ void __launch_bounds__(kThreads) lora_decode_kernel(
    const T* __restrict__ x, int64_t x_s0, int64_t x_s1, const T* __restrict__ w, int64_t w_s0, int64_t w_s1,
    const T* __restrict__ bias, int64_t bias_s0, const T* __restrict__ a, int64_t a_s0, int64_t a_s1,
    const T* __restrict__ b, int64_t b_s0, int64_t b_s1, T* __restrict__ y, T* __restrict__ s, int64_t M, int64_t N,
    int64_t K, int64_t R, float scaling, uint32_t seed, uint32_t thr, float keep_scale, bool use_dropout, bool x_vec,
    bool w_vec, bool a_vec) {
  using Cfg = DecCfg<T, RT>;
  using MM = Mma<T>;
  constexpr int NT = RT / 16;
  constexpr int kOut = kMP * kNO / kThreads;  // outputs per thread in the epilogue
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, tid = threadIdx.x;
  const int64_t o0 = int64_t(blockIdx.x) * kNO;

  unsigned char* smem = dyn_smem();
  T* xs = reinterpret_cast<T*>(smem + warp * Cfg::kWarpTile);
  T* ws = reinterpret_cast<T*>(smem + warp * Cfg::kWarpTile + Cfg::kX);
  T* as = reinterpret_cast<T*>(smem + warp * Cfg::kWarpTile + Cfg::kX + Cfg::kW);
  T* xds = reinterpret_cast<T*>(smem + warp * Cfg::kWarpTile + Cfg::kX + Cfg::kW + Cfg::kA);
  float* yred = reinterpret_cast<float*>(smem);
  float* tred = reinterpret_cast<float*>(smem + Cfg::kYRed);
  float* tfin = reinterpret_cast<float*>(smem + Cfg::kYRed + Cfg::kTRed);

  float ybase[kOut], lr[kOut];
#pragma unroll
  for (int i = 0; i < kOut; ++i) ybase[i] = lr[i] = 0.f;

  const int64_t nchunks = cdiv(K, kKC);
  const int64_t passes = R > 0 ? cdiv(R, RT) : 1;  // pass 0 also carries x @ W0^T
  for (int64_t pass = 0; pass < passes; ++pass) {
    const bool with_w = pass == 0;
    const int64_t j0 = pass * RT;
    typename MM::Acc acc_y[kNO / 16], acc_t[NT];
#pragma unroll
    for (int i = 0; i < kNO / 16; ++i) zero(acc_y[i]);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) zero(acc_t[nt]);

    TileRegs<T, kMP, kKC, 32> xr;
    TileRegs<T, kNO, kKC, 32> wr;
    TileRegs<T, RT, kKC, 32> ar;
    int64_t c = warp;
    if (c < nchunks) {
      xr.load(x, x_s0, x_s1, 0, M, c * kKC, K, x_vec, lane);
      if (with_w) wr.load(w, w_s0, w_s1, o0, N, c * kKC, K, w_vec, lane);
      ar.load(a, a_s0, a_s1, j0, R, c * kKC, K, a_vec, lane);
    }
    for (; c < nchunks; c += kWarps) {
      xr.store(xs, Cfg::LD, lane);
      if (use_dropout) {  // rows 0..15 of x, columns of this chunk
        xr.dropout(seed, thr, 0, c * kKC, lane);
        xr.store(xds, Cfg::LD, lane);
      }
      if (with_w) wr.store(ws, Cfg::LD, lane);
      ar.store(as, Cfg::LD, lane);
      __syncwarp();
      if (c + kWarps < nchunks) {  // next chunk's loads (W0 above all) overlap this chunk's math
        const int64_t k1 = (c + kWarps) * kKC;
        xr.load(x, x_s0, x_s1, 0, M, k1, K, x_vec, lane);
        if (with_w) wr.load(w, w_s0, w_s1, o0, N, k1, K, w_vec, lane);
        ar.load(a, a_s0, a_s1, j0, R, k1, K, a_vec, lane);
      }
#pragma unroll
      for (int kk = 0; kk < kKC; kk += MM::kK) {
        typename MM::template A<wmma::row_major> fa;
        MM::load(fa, xs + kk, Cfg::LD);
        if (with_w) {
#pragma unroll
          for (int i = 0; i < kNO / 16; ++i) {
            typename MM::template B<wmma::col_major> fb;  // W0^T: column-major view of W0 rows
            MM::load(fb, ws + i * 16 * Cfg::LD + kk, Cfg::LD);
            MM::mma(acc_y[i], fa, fb);
          }
        }
        if (use_dropout) MM::load(fa, xds + kk, Cfg::LD);  // A sees dropout(x)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          typename MM::template B<wmma::col_major> fb;
          MM::load(fb, as + nt * 16 * Cfg::LD + kk, Cfg::LD);
          MM::mma(acc_t[nt], fa, fb);
        }
      }
      __syncwarp();
    }

    __syncthreads();  // partials reuse the tiles' shared memory
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
      wmma::store_matrix_sync(tred + warp * kMP * Cfg::LDT + nt * 16, acc_t[nt], Cfg::LDT, wmma::mem_row_major);
    if (with_w) {
#pragma unroll
      for (int i = 0; i < kNO / 16; ++i)
        wmma::store_matrix_sync(yred + warp * kMP * Cfg::LDY + i * 16, acc_y[i], Cfg::LDY, wmma::mem_row_major);
    }
    __syncthreads();
    for (int idx = tid; idx < kMP * RT; idx += kThreads) {
      const int row = idx / RT, col = idx % RT;
      float sum = 0.f;
#pragma unroll
      for (int wi = 0; wi < kWarps; ++wi) sum += tred[(wi * kMP + row) * Cfg::LDT + col];
      const T sv = Traits<T>::from_f(sum * keep_scale);  // S as stored, and as y uses it
      tfin[row * Cfg::LDT + col] = Traits<T>::to_f(sv);
      if (blockIdx.x == 0 && row < M && j0 + col < R) s[row * R + j0 + col] = sv;
    }
    if (with_w) {
#pragma unroll
      for (int i = 0; i < kOut; ++i) {
        const int idx = tid + i * kThreads, m = idx / kNO, o = idx % kNO;
        float sum = 0.f;
#pragma unroll
        for (int wi = 0; wi < kWarps; ++wi) sum += yred[(wi * kMP + m) * Cfg::LDY + o];
        ybase[i] = sum;
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kOut; ++i) {
      const int idx = tid + i * kThreads, m = idx / kNO, o = idx % kNO;
      if (m >= M || o0 + o >= N) continue;
      const T* brow = b + (o0 + o) * b_s0;
      const int jn = R - j0 < RT ? static_cast<int>(R - j0) : RT;
      float sum = 0.f;
      for (int j = 0; j < jn; ++j) sum += tfin[m * Cfg::LDT + j] * Traits<T>::to_f(brow[(j0 + j) * b_s1]);
      lr[i] += sum;
    }
    __syncthreads();  // the next pass reuses shared memory
  }

#pragma unroll
  for (int i = 0; i < kOut; ++i) {
    const int idx = tid + i * kThreads, m = idx / kNO, o = idx % kNO;
    const int64_t n = o0 + o;
    if (m >= M || n >= N) continue;
    float v = ybase[i] + scaling * lr[i];
    if (bias != nullptr) v += Traits<T>::to_f(bias[n * bias_s0]);
    y[m * N + n] = Traits<T>::from_f(v);
  }
}

template <class T, int RT>
cudaError_t launch(const void* x, int64_t x_s0, int64_t x_s1, const void* w, int64_t w_s0, int64_t w_s1,
                   const void* bias, int64_t bias_s0, const void* a, int64_t a_s0, int64_t a_s1, const void* b,
                   int64_t b_s0, int64_t b_s1, void* y, void* s, int64_t M, int64_t N, int64_t K, int64_t R,
                   float scaling, uint32_t seed, uint32_t thr, float keep_scale, bool dropout, cudaStream_t stream) {
  using Cfg = DecCfg<T, RT>;
  auto kernel = lora_decode_kernel<T, RT>;
  cudaError_t err = set_smem(kernel, Cfg::kSmem);
  if (err != cudaSuccess) return err;
  // At least one block: block 0 writes S, also when there are no outputs (N == 0).
  const int64_t blocks = N > 0 ? cdiv(N, kNO) : 1;
  kernel<<<static_cast<unsigned>(blocks), kThreads, Cfg::kSmem, stream>>>(
      static_cast<const T*>(x), x_s0, x_s1, static_cast<const T*>(w), w_s0, w_s1, static_cast<const T*>(bias),
      bias_s0, static_cast<const T*>(a), a_s0, a_s1, static_cast<const T*>(b), b_s0, b_s1, static_cast<T*>(y),
      static_cast<T*>(s), M, N, K, R, scaling, seed, thr, keep_scale, dropout, can_vec(x, x_s0, x_s1, sizeof(T)),
      can_vec(w, w_s0, w_s1, sizeof(T)), can_vec(a, a_s0, a_s1, sizeof(T)));
  return cudaGetLastError();
}

template <class T>
cudaError_t dispatch_rank(const void* x, int64_t x_s0, int64_t x_s1, const void* w, int64_t w_s0, int64_t w_s1,
                          const void* bias, int64_t bias_s0, const void* a, int64_t a_s0, int64_t a_s1, const void* b,
                          int64_t b_s0, int64_t b_s1, void* y, void* s, int64_t M, int64_t N, int64_t K, int64_t R,
                          float scaling, uint32_t seed, uint32_t thr, float keep_scale, bool dropout,
                          cudaStream_t stream) {
  if (R <= 16)
    return launch<T, 16>(x, x_s0, x_s1, w, w_s0, w_s1, bias, bias_s0, a, a_s0, a_s1, b, b_s0, b_s1, y, s, M, N, K, R,
                         scaling, seed, thr, keep_scale, dropout, stream);
  // fp32's 3xTF32 fragments leave no registers for a 64-wide slice: it takes more, narrower passes.
  constexpr int kWide = sizeof(T) == 4 ? 32 : 64;
  return launch<T, kWide>(x, x_s0, x_s1, w, w_s0, w_s1, bias, bias_s0, a, a_s0, a_s1, b, b_s0, b_s1, y, s, M, N, K, R,
                          scaling, seed, thr, keep_scale, dropout, stream);
}

}  // namespace

int lora_decode(DType dt, const void* x, int64_t x_s0, int64_t x_s1, const void* w, int64_t w_s0, int64_t w_s1,
                const void* bias, int64_t bias_s0, const void* a, int64_t a_s0, int64_t a_s1, const void* b,
                int64_t b_s0, int64_t b_s1, void* y, void* s, int64_t M, int64_t N, int64_t K, int64_t R,
                float scaling, uint32_t seed, uint32_t thr, float keep_scale, bool dropout, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  if (M > kMaxDecodeRows) return cudaErrorInvalidValue;
  switch (dt) {
    case DType::kFloat32:
      return dispatch_rank<float>(x, x_s0, x_s1, w, w_s0, w_s1, bias, bias_s0, a, a_s0, a_s1, b, b_s0, b_s1, y, s, M, N,
                                  K, R, scaling, seed, thr, keep_scale, dropout, stream);
    case DType::kFloat16:
      return dispatch_rank<__half>(x, x_s0, x_s1, w, w_s0, w_s1, bias, bias_s0, a, a_s0, a_s1, b, b_s0, b_s1, y, s, M, N,
                                   K, R, scaling, seed, thr, keep_scale, dropout, stream);
    case DType::kBFloat16:
      return dispatch_rank<__nv_bfloat16>(x, x_s0, x_s1, w, w_s0, w_s1, bias, bias_s0, a, a_s0, a_s1, b, b_s0, b_s1, y,
                                          s, M, N, K, R, scaling, seed, thr, keep_scale, dropout, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastpeft
