// Shared device code of the fastpeft CUDA kernels: dtype traits, the dropout stream, vector loads and a
// warp-level tensor-core step. No torch headers: the kernels see raw pointers, sizes and strides only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <stdint.h>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "fastpeft's CUDA kernels need sm_80 or newer (bf16 and TF32 tensor cores): set FASTPEFT_CUDA_ARCHS"
#endif

namespace fastpeft {

namespace wmma = nvcuda::wmma;

// ---------------------------------------------------------------------------------------------------
// Dropout stream, bit-identical to kernels/philox.py and fastpeft/dropout.py: element (row, col) takes
// word col % 4 of Philox4x32-10 with counter (col / 4, row, 0, 0) and key (seed, 0); it is kept when
// (word >> 1) >= thr, thr = round(p * 2**31). __host__ too so that a host program can check the stream.
// ---------------------------------------------------------------------------------------------------
struct Philox4 {
  uint32_t w[4];
};

__host__ __device__ inline uint32_t mulhi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

__host__ __device__ inline Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                                 uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int i = 0; i < 10; ++i) {
    const uint32_t hi0 = mulhi32(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = mulhi32(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The four keep bits of columns 4q .. 4q+3 of `row` (bit j is column 4q + j).
__host__ __device__ inline uint32_t dropout_keep4(uint32_t seed, uint32_t row, uint32_t q, uint32_t thr) {
  const Philox4 r = philox4x32_10(q, row, 0u, 0u, seed, 0u);
  uint32_t bits = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) bits |= static_cast<uint32_t>((r.w[j] >> 1) >= thr) << j;
  return bits;
}

__host__ __device__ inline bool dropout_keep(uint32_t seed, uint32_t row, uint32_t col, uint32_t thr) {
  return (dropout_keep4(seed, row, col >> 2, thr) >> (col & 3u)) & 1u;
}

// ---------------------------------------------------------------------------------------------------
// dtype traits. Tc is the type the tensor cores see: the input type for fp16/bf16, fp32 for fp32
// (split into three TF32 products, so fp32 inputs keep ~fp32 accuracy).
// ---------------------------------------------------------------------------------------------------
template <class T>
struct Traits;
template <>
struct Traits<float> {
  static constexpr int kVec = 4;  // elements per 16-byte vector
  __device__ static float to_f(float v) { return v; }
  __device__ static float from_f(float v) { return v; }
};
template <>
struct Traits<__half> {
  static constexpr int kVec = 8;
  __device__ static float to_f(__half v) { return __half2float(v); }
  __device__ static __half from_f(float v) { return __float2half_rn(v); }
};
template <>
struct Traits<__nv_bfloat16> {
  static constexpr int kVec = 8;
  __device__ static float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};

// Padding of shared-memory rows: 16 bytes keeps wmma's ldm rule (multiple of 16 bytes) and staggers banks.
template <class T>
constexpr int smem_pad() {
  return 16 / static_cast<int>(sizeof(T));
}

// A 16-byte vector of T, or a partial one at a row's end.
template <class T>
struct alignas(16) Vec16 {
  T v[Traits<T>::kVec];
};

// Load elements col .. col+kVec-1 of a row (zero beyond `ncols`). `vec_ok`: the row pointer and stride
// allow aligned 16-byte loads (checked once on the host); otherwise, and for the tail, scalar loads.
template <class T>
__device__ inline Vec16<T> load_row_vec(const T* __restrict__ row, int64_t col, int64_t ncols,
                                        int64_t col_stride, bool vec_ok) {
  constexpr int V = Traits<T>::kVec;
  Vec16<T> out;
  if (vec_ok && col + V <= ncols) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + col));
    out = *reinterpret_cast<const Vec16<T>*>(&raw);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j)
      out.v[j] = (col + j < ncols) ? row[(col + j) * col_stride] : Traits<T>::from_f(0.f);
  }
  return out;
}

template <class T>
__device__ inline void store_vec_smem(T* dst, const Vec16<T>& v) {
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(&v);
}

// ---------------------------------------------------------------------------------------------------
// Warp-level tensor-core tiles: acc(16x16) += A(16 x kK) * B(kK x 16), operands loaded from shared memory
// (pointers 32-byte aligned, ldm a multiple of 16 bytes). fp16/bf16 use m16n16k16; fp32 uses m16n16k8 TF32
// three times (v = big + small, big*big + big*small + small*big), which keeps ~fp32 accuracy.
// ---------------------------------------------------------------------------------------------------
template <class Tc>
struct Mma {
  static constexpr int kK = 16;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  template <class L>
  struct A {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, Tc, L> f;
  };
  template <class L>
  struct B {
    wmma::fragment<wmma::matrix_b, 16, 16, 16, Tc, L> f;
  };
  template <class F>
  __device__ static void load(F& frag, const Tc* p, unsigned ld) {
    wmma::load_matrix_sync(frag.f, p, ld);
  }
  template <class LA, class LB>
  __device__ static void mma(Acc& acc, const A<LA>& a, const B<LB>& b) {
    wmma::mma_sync(acc, a.f, b.f, acc);
  }
};

template <>
struct Mma<float> {
  static constexpr int kK = 8;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
  template <class L>
  struct A {
    wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, L> big, small;
  };
  template <class L>
  struct B {
    wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, L> big, small;
  };
  template <class F>
  __device__ static void load(F& frag, const float* p, unsigned ld) {
    wmma::load_matrix_sync(frag.big, p, ld);
#pragma unroll
    for (int i = 0; i < frag.big.num_elements; ++i) {
      const float v = frag.big.x[i], hi = wmma::__float_to_tf32(v);
      frag.big.x[i] = hi;
      frag.small.x[i] = wmma::__float_to_tf32(v - hi);
    }
  }
  template <class LA, class LB>
  __device__ static void mma(Acc& acc, const A<LA>& a, const B<LB>& b) {
    wmma::mma_sync(acc, a.small, b.big, acc);
    wmma::mma_sync(acc, a.big, b.small, acc);
    wmma::mma_sync(acc, a.big, b.big, acc);
  }
};

template <class Acc>
__device__ inline void zero(Acc& acc) {
  wmma::fill_fragment(acc, 0.f);
}

// ---------------------------------------------------------------------------------------------------
// A [ROWS, COLS] tile of a strided matrix, loaded by THREADS threads into registers (16-byte vectors
// where allowed, zeros outside the matrix), then stored to shared memory. Loading the next tile into
// registers while the tensor cores work on the current one keeps loads in flight.
// ---------------------------------------------------------------------------------------------------
template <class T, int ROWS, int COLS, int THREADS>
struct TileRegs {
  static constexpr int V = Traits<T>::kVec;
  static constexpr int VPR = COLS / V;  // vectors per row
  static constexpr int TOTAL = ROWS * VPR;
  static constexpr int N = (TOTAL + THREADS - 1) / THREADS;
  static_assert(COLS % V == 0, "tile width must be a whole number of 16-byte vectors");
  Vec16<T> r[N];

  // rows row0.. of a matrix with `nrows` rows (those at or past nrows read as zero); columns col0..
  __device__ void load(const T* __restrict__ base, int64_t s0, int64_t s1, int64_t row0, int64_t nrows,
                       int64_t col0, int64_t ncols, bool vec_ok, int tid) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const int idx = tid + i * THREADS;
      const int64_t g = row0 + idx / VPR;
      if ((TOTAL % THREADS == 0 || idx < TOTAL) && g < nrows) {
        r[i] = load_row_vec<T>(base + g * s0, col0 + (idx % VPR) * V, ncols, s1, vec_ok);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) r[i].v[j] = Traits<T>::from_f(0.f);
      }
    }
  }

  // Zero the dropped elements (row0 + local row, col0 + local column) of the tile; col0 % 4 == 0.
  __device__ void dropout(uint32_t seed, uint32_t thr, int64_t row0, int64_t col0, int tid) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const int idx = tid + i * THREADS;
      const uint32_t row = static_cast<uint32_t>(row0 + idx / VPR);
      const uint32_t q = static_cast<uint32_t>((col0 + (idx % VPR) * V) >> 2);
#pragma unroll
      for (int g = 0; g < V / 4; ++g) {
        const uint32_t bits = dropout_keep4(seed, row, q + g, thr);
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (!((bits >> j) & 1u)) r[i].v[4 * g + j] = Traits<T>::from_f(0.f);
      }
    }
  }

  __device__ void store(T* smem, int ld, int tid) const {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const int idx = tid + i * THREADS;
      if (TOTAL % THREADS == 0 || idx < TOTAL) store_vec_smem(smem + (idx / VPR) * ld + (idx % VPR) * V, r[i]);
    }
  }
};

// Element i of a split reduction: its `parts` fp32 partials (`stride` floats apart) summed in part order, so the
// result is reproducible bit for bit (the finishing kernels of bwd_da.cu and dy_reduce.cu).
__device__ inline float sum_parts(const float* __restrict__ ws, int64_t parts, int64_t stride, int64_t i) {
  float sum = 0.f;
  for (int64_t p = 0; p < parts; ++p) sum += ws[p * stride + i];
  return sum;
}

// Launch-time helpers (host).
inline bool can_vec(const void* p, int64_t s0, int64_t s1, int elem_bytes) {
  const int v = 16 / elem_bytes;
  return s1 == 1 && (reinterpret_cast<uintptr_t>(p) % 16 == 0) && (s0 % v == 0);
}

template <class Kernel>
inline cudaError_t set_smem(Kernel k, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

// Dynamic shared memory, 128-byte aligned so that every carved tile can be kept 32-byte aligned.
__device__ inline unsigned char* dyn_smem() {
  extern __shared__ __align__(128) unsigned char fastpeft_smem[];
  return fastpeft_smem;
}

__host__ __device__ constexpr int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
__host__ __device__ constexpr int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace fastpeft
