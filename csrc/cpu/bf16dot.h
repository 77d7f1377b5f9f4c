// bfloat16 dot-product micro-kernel for the CPU attention (AVX512_BF16 `vdpbf16ps`), and the
// pair-interleaved packing it needs. Used by csrc/cpu/attention.cpp for bfloat16 inputs.
//
// `_mm512_dpbf16_ps(c, a, b)` multiplies 16 pairs of bf16 (32 bf16 per operand) and adds each
// pair's two products into one fp32 lane of c: twice the multiply rate of fp32 FMA at the same
// register width, and half the operand bytes. The reduction index must therefore come in
// adjacent pairs in both operands ("VNNI" layout): element pairs (x[2p], x[2p+1]) of the
// reduction dim share one 32-bit word, low half first. Every operand below is a matrix of such
// words:
//   A(r, p): the word at A[r * sr + p * sk] (two strides, so a transposed A costs nothing);
//            broadcast to all 16 lanes.
//   B[p][:]: row p of words, 16 * NV contiguous words (16 output columns per vector).
// Odd reduction lengths are padded with a zero half-word, so both operands must be zero there.
//
// The functions carry a target attribute: the rest of the extension is built for plain
// AVX-512 and runs on CPUs without AVX512_BF16. Callers check bf16_dot_usable() at run time.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cpu/vec.h"

#if FASTATTN_HW_BF16_CVT
#define FASTATTN_BF16_DOT 1
#include <immintrin.h>
#define FA_BF16_TARGET __attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl,avx512dq")))
#else
#define FASTATTN_BF16_DOT 0
#define FA_BF16_TARGET
#endif

namespace fastattn {
namespace cpu {

// The bf16 dot-product path runs when the build has it, the CPU has it, and the environment
// does not switch it off (FASTATTN_CPU_BF16_DOT=0: the fp32 FMA path, for comparison and
// tests). Read per call, so a test can flip it.
inline bool bf16_dot_usable() {
  if (!FASTATTN_BF16_DOT || !cpu_has_avx512_bf16()) return false;
  const char* env = std::getenv("FASTATTN_CPU_BF16_DOT");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

#if FASTATTN_BF16_DOT
namespace bf16dot {

constexpr int kMR = 4;  // micro-kernel rows
constexpr int kNV = 4;  // micro-kernel vectors (16 fp32 columns each) per row

// C[MR, 16 NV] (+)= sum_{p < P} A(r, p) . B[p][:], fp32 accumulators in 16 zmm.
template <int MR, int NV, bool ACC>
FA_BF16_TARGET inline void micro(const uint32_t* __restrict A, int64_t sr, int64_t sk,
                                 const uint32_t* __restrict B, int64_t ldb, float* __restrict C,
                                 int64_t ldc, int64_t P) {
  __m512 c[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) c[r][v] = ACC ? _mm512_loadu_ps(C + r * ldc + v * 16) : _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    const uint32_t* b = B + p * ldb;
    __m512bh bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + v * 16);
    const uint32_t* a = A + p * sk;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * sr]));
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_dpbf16_ps(c[r][v], av, bv[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + r * ldc + v * 16, c[r][v]);
}

template <int NV, bool ACC, int R>
FA_BF16_TARGET inline void tail_rows(int64_t rem, const uint32_t* A, int64_t sr, int64_t sk,
                                     const uint32_t* B, int64_t ldb, float* C, int64_t ldc,
                                     int64_t P) {
  if constexpr (R > 0) {
    if (rem == R) {
      micro<R, NV, ACC>(A, sr, sk, B, ldb, C, ldc, P);
    } else {
      tail_rows<NV, ACC, R - 1>(rem, A, sr, sk, B, ldb, C, ldc, P);
    }
  }
}

template <int NV, bool ACC>
FA_BF16_TARGET inline void gemm_cols(int64_t M, const uint32_t* A, int64_t sr, int64_t sk,
                                     const uint32_t* B, int64_t ldb, float* C, int64_t ldc,
                                     int64_t P) {
  int64_t m = 0;
  for (; m + kMR <= M; m += kMR) micro<kMR, NV, ACC>(A + m * sr, sr, sk, B, ldb, C + m * ldc, ldc, P);
  if (m < M) tail_rows<NV, ACC, kMR - 1>(M - m, A + m * sr, sr, sk, B, ldb, C + m * ldc, ldc, P);
}

template <bool ACC, int NV>
FA_BF16_TARGET inline void tail_cols(int64_t nv, int64_t M, const uint32_t* A, int64_t sr,
                                     int64_t sk, const uint32_t* B, int64_t ldb, float* C,
                                     int64_t ldc, int64_t P) {
  if constexpr (NV > 0) {
    if (nv == NV) {
      gemm_cols<NV, ACC>(M, A, sr, sk, B, ldb, C, ldc, P);
    } else {
      tail_cols<ACC, NV - 1>(nv, M, A, sr, sk, B, ldb, C, ldc, P);
    }
  }
}

// C[M, N] (+)= A[M, 2P] B[2P, N] in bf16 pairs (see the header); N a multiple of 16.
template <bool ACC>
FA_BF16_TARGET void gemm(int64_t M, int64_t N, int64_t P, const uint32_t* A, int64_t sr,
                         int64_t sk, const uint32_t* B, int64_t ldb, float* C, int64_t ldc) {
  constexpr int64_t W = kNV * 16;
  int64_t n = 0;
  for (; n + W <= N; n += W) gemm_cols<kNV, ACC>(M, A, sr, sk, B + n, ldb, C + n, ldc, P);
  if (n < N) tail_cols<ACC, kNV - 1>((N - n) / 16, M, A, sr, sk, B + n, ldb, C + n, ldc, P);
}

// One word from two bf16 bit patterns: lo is the even element of the pair.
inline uint32_t pair(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }

// w[jj] = pair(bf16(a[jj]), bf16(b[jj])) for jj < n (n a multiple of 16), rounding to nearest
// even; b == nullptr pairs with zeros. Two fp32 rows become one row of words: the layout of a
// reduction over the row index (P^T dO, dS^T Q).
FA_BF16_TARGET inline void interleave_rows(const float* a, const float* b, uint32_t* w, int64_t n) {
  for (int64_t jj = 0; jj < n; jj += 16) {
    const __m256i lo = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(a + jj));
    __m512i x = _mm512_cvtepu16_epi32(lo);
    if (b != nullptr) {
      const __m256i hi = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(b + jj));
      x = _mm512_or_si512(x, _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
    }
    _mm512_storeu_si512(w + jj, x);
  }
}

// dst[jj] = bf16(src[jj]) for jj < n (n a multiple of 16): a row whose pairs run along it.
FA_BF16_TARGET inline void round_row(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t jj = 0; jj < n; jj += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + jj),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + jj)));
}

}  // namespace bf16dot
#endif

}  // namespace cpu
}  // namespace fastattn
