// The CPU dropout kernels (see dropout_cpu.h). No torch headers: raw pointers, sizes, strides.
//
// Vectorisation. Philox is computed for kLanes counters at once, over plain arrays of lanes, which g++ -O3
// turns into SIMD code (widening 32x32->64-bit multiplies: vpmuludq). The same template body is compiled
// three times, with target("avx512...") and target("avx2") attributes and for the compiler's baseline, and the
// best one this CPU runs is chosen once at run time (__builtin_cpu_supports), so that the build never needs
// -march=native and a binary copied to another x86-64 machine still runs there. Other architectures (or
// compilers without the attributes) get the baseline only.
//
// Exactness. Everything the mask depends on is integer arithmetic. The value path mirrors torch's CPU kernel of
// `tensor * python_float`: the scale arrives as a float (rounded once by the caller); each element is widened
// to float32 (exact), multiplied once in float32 and, for fp16/bf16, rounded to nearest-even with the same
// bit recipes as c10::Half and c10::BFloat16. No add follows a multiply, so FMA contraction cannot change a bit.
#include "dropout_cpu.h"

#include <atomic>
#include <cstring>
#include <initializer_list>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define FASTPEFT_X86_DISPATCH 1
#else
#define FASTPEFT_X86_DISPATCH 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define FP_INLINE inline __attribute__((always_inline))
#define FP_RESTRICT __restrict__
#else
#define FP_INLINE inline
#define FP_RESTRICT
#endif

namespace fastpeft_cpu {
namespace {

constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;

FP_INLINE uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

FP_INLINE float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// ---- the mask: keep[e] = ~0u if column 4 * q0 + e of `row` is kept, else 0, for e < 4 * nq -------------------
// nq is a multiple of the instruction set's counters per step (kChunk / 4 is a multiple of every one of them).
constexpr int kChunk = 512;  // columns per call of a keep_chunk_* function (a 2 KiB keep buffer, in L1)

// Portable: lanes of uint32 over plain arrays (g++ vectorises what the baseline instruction set allows).
void keep_chunk_generic(uint32_t row, uint32_t q0, int nq, uint32_t seed, uint32_t thr, uint32_t* FP_RESTRICT keep) {
  constexpr int kLanes = 16;
  for (int b = 0; b < nq; b += kLanes) {
    uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
    for (int i = 0; i < kLanes; ++i) {
      c0[i] = q0 + static_cast<uint32_t>(b + i);
      c1[i] = row;
      c2[i] = 0u;
      c3[i] = 0u;
    }
    uint32_t k0 = seed, k1 = 0u;
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 10
#endif
    for (int round = 0; round < 10; ++round) {
      for (int i = 0; i < kLanes; ++i) {
        const uint64_t p0 = static_cast<uint64_t>(kRoundA) * c0[i];
        const uint64_t p1 = static_cast<uint64_t>(kRoundB) * c2[i];
        const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[i] ^ k0;
        const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[i] ^ k1;
        c1[i] = static_cast<uint32_t>(p1);
        c3[i] = static_cast<uint32_t>(p0);
        c0[i] = n0;
        c2[i] = n2;
      }
      k0 += kKeyA;
      k1 += kKeyB;
    }
    uint32_t* out = keep + 4 * b;
    for (int i = 0; i < kLanes; ++i) {
      out[4 * i + 0] = (c0[i] >> 1) >= thr ? ~0u : 0u;
      out[4 * i + 1] = (c1[i] >> 1) >= thr ? ~0u : 0u;
      out[4 * i + 2] = (c2[i] >> 1) >= thr ? ~0u : 0u;
      out[4 * i + 3] = (c3[i] >> 1) >= thr ? ~0u : 0u;
    }
  }
}

#if FASTPEFT_X86_DISPATCH
// SIMD: each 64-bit lane holds one 32-bit Philox word in its low half (the high half is never read: the
// widening multiply vpmuludq takes the low halves, so one instruction gives 32x32->64 for every lane). The
// four words of lane i are then interleaved into columns 4i..4i+3 and compared: keep when
// (word >> 1) - thr >= 0, both sides < 2**31, so the sign of the difference decides.
// (g++ 12's AVX-512 headers trip -Wuninitialized on _mm512_undefined_epi32: a false positive, GCC bug 105593.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FP_TARGET_AVX2 __attribute__((target("avx2")))
#define FP_TARGET_AVX512 __attribute__((target("avx512f")))

FP_TARGET_AVX2 void keep_chunk_avx2(uint32_t row, uint32_t q0, int nq, uint32_t seed, uint32_t thr,
                                    uint32_t* FP_RESTRICT keep) {
  constexpr int kVecs = 2;  // 8 counters per step: 2 vectors of 4 lanes per word, 8 of the 16 ymm registers
  const __m256i mul_a = _mm256_set1_epi64x(kRoundA), mul_b = _mm256_set1_epi64x(kRoundB);
  const __m256i lanes = _mm256_set_epi64x(3, 2, 1, 0), low32 = _mm256_set1_epi64x(0xFFFFFFFFll);
  const __m256i thr_v = _mm256_set1_epi32(static_cast<int>(thr)), rows = _mm256_set1_epi64x(row);
  for (int b = 0; b < nq; b += 4 * kVecs) {
    __m256i c0[kVecs], c1[kVecs], c2[kVecs], c3[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      c0[v] = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(q0) + b + 4 * v), lanes);
      c1[v] = rows;
      c2[v] = _mm256_setzero_si256();
      c3[v] = _mm256_setzero_si256();
    }
    uint32_t k0 = seed, k1 = 0u;
    for (int round = 0; round < 10; ++round) {
      const __m256i k0v = _mm256_set1_epi64x(k0), k1v = _mm256_set1_epi64x(k1);
      for (int v = 0; v < kVecs; ++v) {
        const __m256i p0 = _mm256_mul_epu32(c0[v], mul_a), p1 = _mm256_mul_epu32(c2[v], mul_b);
        const __m256i t1 = _mm256_xor_si256(c1[v], k0v), t3 = _mm256_xor_si256(c3[v], k1v);
        c0[v] = _mm256_xor_si256(_mm256_srli_epi64(p1, 32), t1);
        c2[v] = _mm256_xor_si256(_mm256_srli_epi64(p0, 32), t3);
        c1[v] = p1;
        c3[v] = p0;
      }
      k0 += kKeyA;
      k1 += kKeyB;
    }
    for (int v = 0; v < kVecs; ++v) {
      // [w0 w1] and [w2 w3] pairs of each lane, then 4 words of a lane next to each other
      const __m256i t01 = _mm256_or_si256(_mm256_and_si256(c0[v], low32), _mm256_slli_epi64(c1[v], 32));
      const __m256i t23 = _mm256_or_si256(_mm256_and_si256(c2[v], low32), _mm256_slli_epi64(c3[v], 32));
      const __m256i lo = _mm256_unpacklo_epi64(t01, t23), hi = _mm256_unpackhi_epi64(t01, t23);
      const __m256i w[2] = {_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31)};
      for (int h = 0; h < 2; ++h) {
        const __m256i d = _mm256_sub_epi32(_mm256_srli_epi32(w[h], 1), thr_v);
        const __m256i k = _mm256_xor_si256(_mm256_srai_epi32(d, 31), _mm256_set1_epi32(-1));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(keep + 4 * (b + 4 * v) + 8 * h), k);
      }
    }
  }
}

FP_TARGET_AVX512 void keep_chunk_avx512(uint32_t row, uint32_t q0, int nq, uint32_t seed, uint32_t thr,
                                        uint32_t* FP_RESTRICT keep) {
  constexpr int kVecs = 4;  // 32 counters per step: 4 vectors of 8 lanes per word (16 of 32 zmm registers)
  const __m512i mul_a = _mm512_set1_epi64(kRoundA), mul_b = _mm512_set1_epi64(kRoundB);
  const __m512i lanes = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), low32 = _mm512_set1_epi64(0xFFFFFFFFll);
  const __m512i thr_v = _mm512_set1_epi32(static_cast<int>(thr)), rows = _mm512_set1_epi64(row);
  const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0), second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
  for (int b = 0; b < nq; b += 8 * kVecs) {
    __m512i c0[kVecs], c1[kVecs], c2[kVecs], c3[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      c0[v] = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(q0) + b + 8 * v), lanes);
      c1[v] = rows;
      c2[v] = _mm512_setzero_si512();
      c3[v] = _mm512_setzero_si512();
    }
    uint32_t k0 = seed, k1 = 0u;
    for (int round = 0; round < 10; ++round) {
      const __m512i k0v = _mm512_set1_epi64(k0), k1v = _mm512_set1_epi64(k1);
      for (int v = 0; v < kVecs; ++v) {
        const __m512i p0 = _mm512_mul_epu32(c0[v], mul_a), p1 = _mm512_mul_epu32(c2[v], mul_b);
        c0[v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1, 32), c1[v], k0v, 0x96);  // a ^ b ^ c
        c2[v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0, 32), c3[v], k1v, 0x96);
        c1[v] = p1;
        c3[v] = p0;
      }
      k0 += kKeyA;
      k1 += kKeyB;
    }
    for (int v = 0; v < kVecs; ++v) {
      const __m512i t01 = _mm512_or_si512(_mm512_and_si512(c0[v], low32), _mm512_slli_epi64(c1[v], 32));
      const __m512i t23 = _mm512_or_si512(_mm512_and_si512(c2[v], low32), _mm512_slli_epi64(c3[v], 32));
      const __m512i lo = _mm512_unpacklo_epi64(t01, t23), hi = _mm512_unpackhi_epi64(t01, t23);
      const __m512i w[2] = {_mm512_permutex2var_epi64(lo, first, hi), _mm512_permutex2var_epi64(lo, second, hi)};
      for (int h = 0; h < 2; ++h) {
        const __m512i d = _mm512_sub_epi32(_mm512_srli_epi32(w[h], 1), thr_v);
        const __m512i k = _mm512_ternarylogic_epi32(_mm512_srai_epi32(d, 31), d, d, 0x0F);  // ~a
        _mm512_storeu_si512(keep + 4 * (b + 8 * v) + 16 * h, k);
      }
    }
  }
}
#pragma GCC diagnostic pop
#endif

// ---- element types: widen to float32 exactly, round back as torch does -------------------------------
struct F32 {
  using T = float;
  static FP_INLINE float load(float v) { return v; }
  static FP_INLINE float store_masked(float v, uint32_t keep) { return u2f(f2u(v) & keep); }
};

struct F16 {  // IEEE half as its bits; the recipes of c10/util/Half.h (fp16_ieee_{to,from}_fp32_value)
  using T = uint16_t;
  static FP_INLINE float load(uint16_t h) {
    const uint32_t w = static_cast<uint32_t>(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = u2f((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = u2f((two_w >> 17) | (126u << 23)) - 0.5f;
    return u2f(sign | (two_w < (1u << 27) ? f2u(denormalized) : f2u(normalized)));
  }
  static FP_INLINE uint16_t store_masked(float f, uint32_t keep) {
    const float base0 = (u2f(f2u(f) & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = f2u(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    const uint32_t bits = f2u(u2f((bias >> 1) + 0x07800000u) + base0);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    const uint32_t h = (sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign);
    return static_cast<uint16_t>(h & keep);
  }
};

struct BF16 {  // bfloat16 as its bits; c10::detail::round_to_nearest_even
  using T = uint16_t;
  static FP_INLINE float load(uint16_t b) { return u2f(static_cast<uint32_t>(b) << 16); }
  static FP_INLINE uint16_t store_masked(float f, uint32_t keep) {
    const uint32_t u = f2u(f);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const uint32_t b = (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded;
    return static_cast<uint16_t>(b & keep);
  }
};

using KeepFn = void (*)(uint32_t, uint32_t, int, uint32_t, uint32_t, uint32_t*);

// The mask of columns [c, c + n) of `row`, c % kChunk == 0, n <= kChunk.
template <KeepFn kKeep>
FP_INLINE void keep_for(int64_t row, int64_t c, int64_t n, uint32_t seed, uint32_t thr, uint32_t* keep) {
  const int nq = static_cast<int>((n + 3) / 4);
  constexpr int kStep = 32;  // counters per step of the widest instruction set; kChunk / 4 is a multiple
  kKeep(static_cast<uint32_t>(row), static_cast<uint32_t>(c >> 2), (nq + kStep - 1) / kStep * kStep, seed, thr, keep);
}

// n <= kChunk columns. kN is n when it is known at compile time (whole chunks), else 0.
template <class D, bool kContig, bool kPair, int kN>
FP_INLINE void apply_chunk(const typename D::T* FP_RESTRICT x, int64_t xs1, typename D::T* FP_RESTRICT out,
                           typename D::T* FP_RESTRICT low, const uint32_t* FP_RESTRICT keep, int n, float scale) {
  const int count = kN > 0 ? kN : n;
  for (int e = 0; e < count; ++e) {
    const float v = D::load(kContig ? x[e] : x[e * xs1]) * scale;
    out[e] = D::store_masked(v, keep[e]);
    if (kPair) low[e] = D::store_masked(D::load(low[e]) * scale, keep[e]);
  }
}

template <KeepFn kKeep, class D, bool kContig, bool kPair>
FP_INLINE void rows_impl(const void* xv, int64_t xs0, int64_t xs1, void* outv, void* lowv, int64_t cols,
                         int64_t row0, int64_t row1, uint32_t seed, uint32_t thr, float scale) {
  using T = typename D::T;
  const T* x = static_cast<const T*>(xv);
  T* out = static_cast<T*>(outv);
  T* low = static_cast<T*>(lowv);
  alignas(64) uint32_t keep[kChunk];
  for (int64_t r = row0; r < row1; ++r) {
    const T* xr = x + r * xs0;
    T* orow = out + r * cols;
    T* lrow = kPair ? low + r * cols : nullptr;
    int64_t c = 0;
    for (; c + kChunk <= cols; c += kChunk) {
      keep_for<kKeep>(r, c, kChunk, seed, thr, keep);
      apply_chunk<D, kContig, kPair, kChunk>(xr + c * xs1, xs1, orow + c, kPair ? lrow + c : nullptr, keep, kChunk,
                                              scale);
    }
    if (c < cols) {
      keep_for<kKeep>(r, c, cols - c, seed, thr, keep);
      apply_chunk<D, kContig, kPair, 0>(xr + c * xs1, xs1, orow + c, kPair ? lrow + c : nullptr, keep,
                                         static_cast<int>(cols - c), scale);
    }
  }
}

template <KeepFn kKeep, bool kPair>
FP_INLINE void dispatch_rows(DType dtype, const void* x, int64_t xs0, int64_t xs1, void* out, void* low,
                             int64_t cols, int64_t row0, int64_t row1, uint32_t seed, uint32_t thr, float scale) {
  const bool contig = xs1 == 1;
  switch (dtype) {
    case DType::kFloat32:
      return contig ? rows_impl<kKeep, F32, true, kPair>(x, xs0, xs1, out, low, cols, row0, row1, seed, thr, scale)
                    : rows_impl<kKeep, F32, false, kPair>(x, xs0, xs1, out, low, cols, row0, row1, seed, thr, scale);
    case DType::kFloat16:
      return contig ? rows_impl<kKeep, F16, true, kPair>(x, xs0, xs1, out, low, cols, row0, row1, seed, thr, scale)
                    : rows_impl<kKeep, F16, false, kPair>(x, xs0, xs1, out, low, cols, row0, row1, seed, thr, scale);
    case DType::kBFloat16:
      return contig ? rows_impl<kKeep, BF16, true, kPair>(x, xs0, xs1, out, low, cols, row0, row1, seed, thr, scale)
                    : rows_impl<kKeep, BF16, false, kPair>(x, xs0, xs1, out, low, cols, row0, row1, seed, thr, scale);
  }
}

template <KeepFn kKeep>
FP_INLINE void mask_impl(uint8_t* mask, int64_t cols, int64_t row0, int64_t row1, uint32_t seed, uint32_t thr) {
  alignas(64) uint32_t keep[kChunk];
  for (int64_t r = row0; r < row1; ++r) {
    uint8_t* mrow = mask + r * cols;
    for (int64_t c = 0; c < cols; c += kChunk) {
      const int n = cols - c < kChunk ? static_cast<int>(cols - c) : kChunk;
      keep_for<kKeep>(r, c, n, seed, thr, keep);
      for (int e = 0; e < n; ++e) mrow[c + e] = static_cast<uint8_t>(keep[e] & 1u);
    }
  }
}

// ---- one set of entry points per instruction set ------------------------------------------------------
// The mask comes from that set's keep_chunk_*; the value pass (apply_chunk) is plain C++ inlined into a
// function compiled for that set, so g++ vectorises it with the same instructions.
struct Kernels {
  const char* name;
  void (*dropped)(DType, const void*, int64_t, int64_t, void*, int64_t, int64_t, int64_t, uint32_t, uint32_t, float);
  void (*pair)(DType, const void*, int64_t, int64_t, void*, void*, int64_t, int64_t, int64_t, uint32_t, uint32_t,
               float);
  void (*mask)(uint8_t*, int64_t, int64_t, int64_t, uint32_t, uint32_t);
};

#define FASTPEFT_KERNELS(suffix, attr)                                                                           \
  attr void dropped_##suffix(DType dt, const void* x, int64_t xs0, int64_t xs1, void* out, int64_t cols,         \
                             int64_t row0, int64_t row1, uint32_t seed, uint32_t thr, float scale) {             \
    dispatch_rows<keep_chunk_##suffix, false>(dt, x, xs0, xs1, out, nullptr, cols, row0, row1, seed, thr, scale); \
  }                                                                                                              \
  attr void pair_##suffix(DType dt, const void* x, int64_t xs0, int64_t xs1, void* out, void* low, int64_t cols, \
                          int64_t row0, int64_t row1, uint32_t seed, uint32_t thr, float scale) {                \
    dispatch_rows<keep_chunk_##suffix, true>(dt, x, xs0, xs1, out, low, cols, row0, row1, seed, thr, scale);     \
  }                                                                                                              \
  attr void mask_##suffix(uint8_t* mask, int64_t cols, int64_t row0, int64_t row1, uint32_t seed, uint32_t thr) { \
    mask_impl<keep_chunk_##suffix>(mask, cols, row0, row1, seed, thr);                                           \
  }                                                                                                              \
  constexpr Kernels kKernels_##suffix = {#suffix, dropped_##suffix, pair_##suffix, mask_##suffix};

FASTPEFT_KERNELS(generic, )
#if FASTPEFT_X86_DISPATCH
FASTPEFT_KERNELS(avx2, FP_TARGET_AVX2)
FASTPEFT_KERNELS(avx512, FP_TARGET_AVX512)
#endif

bool cpu_has(const char* name) {
#if FASTPEFT_X86_DISPATCH
  __builtin_cpu_init();
  if (std::strcmp(name, "avx512") == 0) return __builtin_cpu_supports("avx512f");
  if (std::strcmp(name, "avx2") == 0) return __builtin_cpu_supports("avx2");
#endif
  return std::strcmp(name, "generic") == 0;
}

const Kernels* kernels_named(const char* name) {
#if FASTPEFT_X86_DISPATCH
  if (std::strcmp(name, "avx512") == 0) return &kKernels_avx512;
  if (std::strcmp(name, "avx2") == 0) return &kKernels_avx2;
#endif
  if (std::strcmp(name, "generic") == 0) return &kKernels_generic;
  return nullptr;
}

const Kernels* best_kernels() {
  for (const char* name : {"avx512", "avx2"})
    if (kernels_named(name) != nullptr && cpu_has(name)) return kernels_named(name);
  return &kKernels_generic;
}

// Chosen once (thread-safe static initialisation); set_isa() replaces it, for tests.
std::atomic<const Kernels*>& active_slot() {
  static std::atomic<const Kernels*> k{best_kernels()};
  return k;
}

FP_INLINE const Kernels* active() { return active_slot().load(std::memory_order_relaxed); }

}  // namespace

void keep_mask_rows(uint8_t* mask, int64_t cols, int64_t row0, int64_t row1, uint32_t seed, uint32_t thr) {
  active()->mask(mask, cols, row0, row1, seed, thr);
}

void dropped_rows(DType dtype, const void* x, int64_t xs0, int64_t xs1, void* out, int64_t cols, int64_t row0,
                  int64_t row1, uint32_t seed, uint32_t thr, float scale) {
  active()->dropped(dtype, x, xs0, xs1, out, cols, row0, row1, seed, thr, scale);
}

void dropped_pair_rows(DType dtype, const void* x, int64_t xs0, int64_t xs1, void* out, void* low, int64_t cols,
                       int64_t row0, int64_t row1, uint32_t seed, uint32_t thr, float scale) {
  active()->pair(dtype, x, xs0, xs1, out, low, cols, row0, row1, seed, thr, scale);
}

const char* isa() { return active()->name; }

bool set_isa(const char* name) {
  const Kernels* k = kernels_named(name);
  if (k == nullptr || !cpu_has(name)) return false;
  active_slot().store(k, std::memory_order_relaxed);
  return true;
}

const char* available_isas() {
  static const char* names = cpu_has("avx512") && kernels_named("avx512") ? "avx512,avx2,generic"
                             : cpu_has("avx2") && kernels_named("avx2")   ? "avx2,generic"
                                                                          : "generic";
  return names;
}

}  // namespace fastpeft_cpu
