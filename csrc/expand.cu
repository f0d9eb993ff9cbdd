// lora_expand: OUT[M, N] = scale · keep⊙(L[M, R] @ Rm[R, N]) + bias[N], written once in L's dtype: the low-rank
// term that enters cuBLAS as the C input of its GEMM (torch.addmm(C, P, Q) reads C once, in its epilogue).
//   forward:  L = S,  Rm = Bᵀ, scale = s,        bias: the layer's, no mask       (C of y = C + x·W0ᵀ)
//   backward: L = dS, Rm = A,  scale = 1/(1-p),  keep: the forward's mask of x    (low of dX = low + dY·W0)
//
// Block: 8 warps over a [64, 128] tile of OUT; the rank-R product accumulates on the tensor cores in fp32
// (lowrank_tile.cuh) and the epilogue scales it, zeroes the dropped elements (the mask regenerated from
// (seed, row, col), element (m, n) of the mask of an [M, N] x), adds the bias and rounds once, storing 16-byte
// vectors where OUT's rows allow. OUT is read never and written once; L and Rm are small and come from L2.
#include "fastpeft_cuda.h"
#include "lowrank_tile.cuh"

namespace fastpeft {
namespace {

template <class T, bool kRmT>
__global__ void __launch_bounds__(LowRankTile<T, kRmT>::kThreads, sizeof(T) == 4 ? 1 : 2) lora_expand_kernel(
    const T* __restrict__ l, int64_t l_s0, int64_t l_s1, const T* __restrict__ rm, int64_t rm_s0, int64_t rm_s1,
    const T* __restrict__ bias, int64_t bias_s0, T* __restrict__ out, int64_t M, int64_t N, int64_t R, float scale,
    uint32_t seed, uint32_t thr, bool use_dropout, bool l_vec, bool rm_vec, bool out_vec) {
  using Tile = LowRankTile<T, kRmT>;
  constexpr int V = Traits<T>::kVec, VPR = Tile::kCols / V;
  static_assert(V % 4 == 0, "the mask is drawn four columns at a time");
  const int64_t m0 = int64_t(blockIdx.x) * Tile::kRows, n0 = int64_t(blockIdx.y) * Tile::kCols;
  const float* prod = Tile::product(l, l_s0, l_s1, m0, M, rm, rm_s0, rm_s1, n0, N, R, l_vec, rm_vec, dyn_smem());

  for (int idx = threadIdx.x; idx < Tile::kRows * VPR; idx += Tile::kThreads) {
    const int row = idx / VPR, cv = (idx % VPR) * V;
    const int64_t m = m0 + row, n = n0 + cv;  // n % V == 0, so n % 4 == 0
    if (m >= M || n >= N) continue;
    uint32_t keep = use_dropout ? 0u : ~0u;
    if (use_dropout) {
#pragma unroll
      for (int g = 0; g < V / 4; ++g)
        keep |= dropout_keep4(seed, static_cast<uint32_t>(m), static_cast<uint32_t>((n >> 2) + g), thr) << (4 * g);
    }
    const float* pr = prod + row * Tile::LDP + cv;
    Vec16<T> v;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float e = ((keep >> j) & 1u) ? scale * pr[j] : 0.f;
      if (bias != nullptr && n + j < N) e += Traits<T>::to_f(bias[(n + j) * bias_s0]);
      v.v[j] = Traits<T>::from_f(e);
    }
    T* orow = out + m * N;
    if (out_vec && n + V <= N) {
      *reinterpret_cast<Vec16<T>*>(orow + n) = v;
    } else {
      for (int j = 0; j < V && n + j < N; ++j) orow[n + j] = v.v[j];
    }
  }
}

template <class T, bool kRmT>
cudaError_t launch(const void* l, int64_t l_s0, int64_t l_s1, const void* rm, int64_t rm_s0, int64_t rm_s1,
                   const void* bias, int64_t bias_s0, void* out, int64_t M, int64_t N, int64_t R, float scale,
                   uint32_t seed, uint32_t thr, bool dropout, cudaStream_t stream) {
  using Tile = LowRankTile<T, kRmT>;
  auto kernel = lora_expand_kernel<T, kRmT>;
  cudaError_t err = set_smem(kernel, Tile::kSmem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(cdiv(M, Tile::kRows)), static_cast<unsigned>(cdiv(N, Tile::kCols)));
  // kRmT stages Rm's columns as rows: 16-byte loads need Rm's column stride (its row stride as staged) to be 1.
  const bool rm_vec = kRmT ? can_vec(rm, rm_s1, rm_s0, sizeof(T)) : can_vec(rm, rm_s0, rm_s1, sizeof(T));
  kernel<<<grid, Tile::kThreads, Tile::kSmem, stream>>>(
      static_cast<const T*>(l), l_s0, l_s1, static_cast<const T*>(rm), rm_s0, rm_s1, static_cast<const T*>(bias),
      bias_s0, static_cast<T*>(out), M, N, R, scale, seed, thr, dropout, can_vec(l, l_s0, l_s1, sizeof(T)), rm_vec,
      can_vec(out, N, 1, sizeof(T)));
  return cudaGetLastError();
}

template <class T>
cudaError_t dispatch_layout(const void* l, int64_t l_s0, int64_t l_s1, const void* rm, int64_t rm_s0, int64_t rm_s1,
                            const void* bias, int64_t bias_s0, void* out, int64_t M, int64_t N, int64_t R, float scale,
                            uint32_t seed, uint32_t thr, bool dropout, cudaStream_t stream) {
  // Rm with unit-stride columns and strided rows (Bᵀ of a row-major B) is staged transposed; anything else
  // (A row-major, or no unit stride at all: scalar loads either way) along its rows.
  if (rm_s0 == 1 && rm_s1 != 1)
    return launch<T, true>(l, l_s0, l_s1, rm, rm_s0, rm_s1, bias, bias_s0, out, M, N, R, scale, seed, thr, dropout,
                           stream);
  return launch<T, false>(l, l_s0, l_s1, rm, rm_s0, rm_s1, bias, bias_s0, out, M, N, R, scale, seed, thr, dropout,
                          stream);
}

}  // namespace

int lora_expand(DType dt, const void* l, int64_t l_s0, int64_t l_s1, const void* rm, int64_t rm_s0, int64_t rm_s1,
                const void* bias, int64_t bias_s0, void* out, int64_t M, int64_t N, int64_t R, float scale,
                uint32_t seed, uint32_t thr, bool dropout, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (N > int64_t(65535) * LowRankTile<float, false>::kCols) return cudaErrorInvalidConfiguration;
  switch (dt) {
    case DType::kFloat32:
      return dispatch_layout<float>(l, l_s0, l_s1, rm, rm_s0, rm_s1, bias, bias_s0, out, M, N, R, scale, seed, thr,
                                    dropout, stream);
    case DType::kFloat16:
      return dispatch_layout<__half>(l, l_s0, l_s1, rm, rm_s0, rm_s1, bias, bias_s0, out, M, N, R, scale, seed, thr,
                                     dropout, stream);
    case DType::kBFloat16:
      return dispatch_layout<__nv_bfloat16>(l, l_s0, l_s1, rm, rm_s0, rm_s1, bias, bias_s0, out, M, N, R, scale, seed,
                                            thr, dropout, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastpeft
