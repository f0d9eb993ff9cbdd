// rank_update: W[N, K] += c * B[N, R] @ A[R, K] in place, without forming B @ A in global memory.
//
// Block: 8 warps over a [64, 128] tile of W. The rank-R product of the tile is accumulated on the tensor
// cores from B and A staged in 32-wide slices of R (lowrank_tile.cuh), parked in shared memory (fp32), and added
// to W in one read-modify-write pass with 16-byte vectors where the layout allows: each W element is read
// once, updated in fp32 and rounded once.
#include "fastpeft_cuda.h"
#include "lowrank_tile.cuh"

namespace fastpeft {
namespace {

using Tile = LowRankTile<__half, false>;  // for the block shape only (the same for every dtype)
constexpr int kThreads = Tile::kThreads, kBO = Tile::kRows, kBI = Tile::kCols;

// fp32 (3xTF32) needs more than the 128 registers that two blocks per SM would leave it.
template <class T>
__global__ void __launch_bounds__(kThreads, sizeof(T) == 4 ? 1 : 2) rank_update_kernel(
    T* __restrict__ w, int64_t w_s0, int64_t w_s1, const T* __restrict__ b, int64_t b_s0, int64_t b_s1,
    const T* __restrict__ a, int64_t a_s0, int64_t a_s1, int64_t N, int64_t K, int64_t R, float c, bool w_vec,
    bool b_vec, bool a_vec) {
  using Cfg = LowRankTile<T, false>;
  constexpr int V = Traits<T>::kVec;
  const int tid = threadIdx.x;
  const int64_t o0 = int64_t(blockIdx.y) * kBO, i0 = int64_t(blockIdx.x) * kBI;
  const float* prod = Cfg::product(b, b_s0, b_s1, o0, N, a, a_s0, a_s1, i0, K, R, b_vec, a_vec, dyn_smem());

  constexpr int VPR = kBI / V;
  for (int idx = tid; idx < kBO * VPR; idx += kThreads) {
    const int row = idx / VPR, cv = (idx % VPR) * V;
    const int64_t o = o0 + row, i = i0 + cv;
    if (o >= N || i >= K) continue;
    T* wr = w + o * w_s0;
    const float* pr = prod + row * Cfg::LDP + cv;
    if (w_vec && i + V <= K) {
      Vec16<T> v = *reinterpret_cast<const Vec16<T>*>(wr + i);
#pragma unroll
      for (int j = 0; j < V; ++j) v.v[j] = Traits<T>::from_f(Traits<T>::to_f(v.v[j]) + c * pr[j]);
      *reinterpret_cast<Vec16<T>*>(wr + i) = v;
    } else {
      for (int j = 0; j < V && i + j < K; ++j) {
        T* e = wr + (i + j) * w_s1;
        *e = Traits<T>::from_f(Traits<T>::to_f(*e) + c * pr[j]);
      }
    }
  }
}

template <class T>
cudaError_t launch(void* w, int64_t w_s0, int64_t w_s1, const void* b, int64_t b_s0, int64_t b_s1, const void* a,
                   int64_t a_s0, int64_t a_s1, int64_t N, int64_t K, int64_t R, float c, cudaStream_t stream) {
  using Cfg = LowRankTile<T, false>;
  auto kernel = rank_update_kernel<T>;
  cudaError_t err = set_smem(kernel, Cfg::kSmem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(cdiv(K, kBI)), static_cast<unsigned>(cdiv(N, kBO)));
  kernel<<<grid, kThreads, Cfg::kSmem, stream>>>(static_cast<T*>(w), w_s0, w_s1, static_cast<const T*>(b), b_s0, b_s1,
                                                 static_cast<const T*>(a), a_s0, a_s1, N, K, R, c,
                                                 can_vec(w, w_s0, w_s1, sizeof(T)), can_vec(b, b_s0, b_s1, sizeof(T)),
                                                 can_vec(a, a_s0, a_s1, sizeof(T)));
  return cudaGetLastError();
}

}  // namespace

int rank_update(DType dt, void* w, int64_t w_s0, int64_t w_s1, const void* b, int64_t b_s0, int64_t b_s1, const void* a,
                int64_t a_s0, int64_t a_s1, int64_t N, int64_t K, int64_t R, float c, cudaStream_t stream) {
  if (N == 0 || K == 0 || R == 0) return cudaSuccess;  // nothing to add
  if (N > int64_t(65535) * kBO) return cudaErrorInvalidConfiguration;
  switch (dt) {
    case DType::kFloat32:
      return launch<float>(w, w_s0, w_s1, b, b_s0, b_s1, a, a_s0, a_s1, N, K, R, c, stream);
    case DType::kFloat16:
      return launch<__half>(w, w_s0, w_s1, b, b_s0, b_s1, a, a_s0, a_s1, N, K, R, c, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(w, w_s0, w_s1, b, b_s0, b_s1, a, a_s0, a_s1, N, K, R, c, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastpeft
