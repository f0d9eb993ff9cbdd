// The [64, 128] fp32 tile of a product of two thin factors, L[rows, R] @ Rm[R, cols], computed by the 8 warps
// of a block on the tensor cores from 32-wide slices of R staged in shared memory. The main loop of
// rank_update.cu (W += c·B·A) and expand.cu (OUT = c·keep⊙(L·Rm) + bias); each adds its own epilogue.
#pragma once

#include "common.cuh"

namespace fastpeft {

// kRmT: Rm is staged transposed, as a [128][32] tile read along R. That is the layout with 16-byte loads for an
// Rm whose rows are strided and columns unit-stride, e.g. Rm = Bᵀ of a row-major B [N, R]; otherwise Rm is
// staged as a [32][128] tile read along its columns (Rm = A of a row-major A [R, K]).
template <class T, bool kRmT>
struct LowRankTile {
  static constexpr int kWarps = 8, kThreads = kWarps * 32, kRows = 64, kCols = 128, kRK = 32;
  static constexpr int LDL = kRK + smem_pad<T>();                   // L tile [64][LDL]
  static constexpr int LDR = (kRmT ? kRK : kCols) + smem_pad<T>();  // Rm tile [128][LDR] (kRmT) or [32][LDR]
  static constexpr int LDP = kCols + 4;                             // fp32 product [64][LDP]
  static constexpr size_t kL = size_t(kRows) * LDL * sizeof(T);
  static constexpr size_t kTiles = kL + size_t(kRmT ? kCols : kRK) * LDR * sizeof(T);
  static constexpr size_t kProd = size_t(kRows) * LDP * sizeof(float);
  static constexpr size_t kSmem = kTiles > kProd ? kTiles : kProd;
  static_assert(kL % 32 == 0, "wmma needs 32-byte alignment");

  // Returns prod [64][LDP] in `smem` (fp32): rows row0.. of L (rows at or past nrows read as zero) times columns
  // col0.. of Rm (at or past ncols: zero). Every thread of the block calls it; it ends with a barrier, so the
  // product is visible to all. l_vec / rm_vec: 16-byte loads allowed along the staged rows (L's row, Rm's row
  // or, with kRmT, Rm's column).
  __device__ static const float* product(const T* __restrict__ l, int64_t l_s0, int64_t l_s1, int64_t row0,
                                         int64_t nrows, const T* __restrict__ rm, int64_t rm_s0, int64_t rm_s1,
                                         int64_t col0, int64_t ncols, int64_t R, bool l_vec, bool rm_vec,
                                         unsigned char* smem) {
    using MM = Mma<T>;
    const int warp = threadIdx.x / 32, tid = threadIdx.x;
    const int mt = warp / 2, nh = warp % 2;  // warp tile: rows 16*mt.., columns 64*nh..
    T* ls = reinterpret_cast<T*>(smem);
    T* rs = reinterpret_cast<T*>(smem + kL);

    typename MM::Acc acc[4];
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) zero(acc[nt]);

    TileRegs<T, kRows, kRK, kThreads> lr;
    TileRegs<T, kRmT ? kCols : kRK, kRmT ? kRK : kCols, kThreads> rr;
    for (int64_t r0 = 0; r0 < R; r0 += kRK) {
      lr.load(l, l_s0, l_s1, row0, nrows, r0, R, l_vec, tid);
      if constexpr (kRmT) {
        rr.load(rm, rm_s1, rm_s0, col0, ncols, r0, R, rm_vec, tid);  // element (n, r) of Rmᵀ is Rm[r][n]
      } else {
        rr.load(rm, rm_s0, rm_s1, r0, R, col0, ncols, rm_vec, tid);
      }
      __syncthreads();  // the previous slice's math is done with the tiles
      lr.store(ls, LDL, tid);
      rr.store(rs, LDR, tid);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kRK; kk += MM::kK) {
        typename MM::template A<wmma::row_major> fa;
        MM::load(fa, ls + mt * 16 * LDL + kk, LDL);
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          if constexpr (kRmT) {  // Rm [kk.., n..] is the column-major view of the [n][r] tile
            typename MM::template B<wmma::col_major> fb;
            MM::load(fb, rs + (nh * 64 + nt * 16) * LDR + kk, LDR);
            MM::mma(acc[nt], fa, fb);
          } else {
            typename MM::template B<wmma::row_major> fb;
            MM::load(fb, rs + kk * LDR + nh * 64 + nt * 16, LDR);
            MM::mma(acc[nt], fa, fb);
          }
        }
      }
    }
    __syncthreads();  // the product reuses the tiles' shared memory
    float* prod = reinterpret_cast<float*>(smem);
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
      wmma::store_matrix_sync(prod + mt * 16 * LDP + nh * 64 + nt * 16, acc[nt], LDP, wmma::mem_row_major);
    __syncthreads();
    return prod;
  }
};

}  // namespace fastpeft
