// Philox4x32-10 for the CPU kernels' dropout: a counter-based generator, so a mask is
// recomputed in the backward instead of stored, and every backend draws the same bits.
//
// philox4x32(c0..c3, k0, k1) is the scalar round function (bit-identical to the Python
// reference fastattn.ops.attention.philox4x32 and to Triton's philox). philox16() runs 16
// counters at once: on AVX-512 the 32x32->64-bit products are two _mm512_mul_epu32 (even and odd
// lanes), elsewhere a loop over the scalar function.
//
// Row dropout (layer_norm's `s = dropout(x) + residual`): element (i, j) of an [N, M] tensor is
// word w of the Philox call with counter (i, 16 * (j / 64) + (j % 16), kRowTag, offset), where
// w = (j % 64) / 16. One 16-lane call thus gives the words of 64 consecutive columns as four
// vectors of 16 consecutive columns: no shuffles. Kept iff (word >> 8) >= ceil(p * 2^24).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace fastattn {
namespace cpu {

constexpr uint32_t kPhiloxMulA = 0xD2511F53u, kPhiloxMulB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u, kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kRowTag = 0x4C4E4F52u;  // "LNOR": keeps row dropout apart from attention's

inline uint32_t philox_mulhi(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// Philox4x32-10; the four output words in c[0..3].
inline void philox4x32(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint32_t a0 = c[0], a2 = c[2];
    c[0] = philox_mulhi(kPhiloxMulB, a2) ^ c[1] ^ k0;
    c[2] = philox_mulhi(kPhiloxMulA, a0) ^ c[3] ^ k1;
    c[1] = kPhiloxMulB * a2;
    c[3] = kPhiloxMulA * a0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
}

// keep iff (word >> 8) >= threshold: u = (word >> 8) 2^-24 >= p, compared exactly as integers.
inline uint32_t keep_threshold(double p) { return static_cast<uint32_t>(std::ceil(p * 16777216.0)); }

struct RowDropout {
  bool on = false;
  uint32_t k0 = 0, k1 = 0, c3 = 0, thr = 0;
  float scale = 1.f;  // 1 / (1 - p)
  double p = 0.0;
  RowDropout(double p_, int64_t seed, int64_t offset) : p(p_) {
    on = p > 0;
    thr = keep_threshold(p);
    scale = p < 1 ? static_cast<float>(1.0 / (1.0 - p)) : 0.f;
    const uint64_t s = static_cast<uint64_t>(seed);
    k0 = static_cast<uint32_t>(s & 0xFFFFFFFFu);
    k1 = static_cast<uint32_t>(s >> 32);
    c3 = static_cast<uint32_t>(static_cast<uint64_t>(offset) & 0xFFFFFFFFu);
  }
  // Keep bits of columns [64 blk, 64 blk + 64) of row i: bit l of out[w] is column
  // 64 blk + 16 w + l.
  void block(uint32_t i, uint32_t blk, uint16_t out[4]) const {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i c0 = _mm512_set1_epi32(static_cast<int>(i));
    __m512i c1 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(16 * blk)), lanes);
    __m512i c2 = _mm512_set1_epi32(static_cast<int>(kRowTag));
    __m512i c3v = _mm512_set1_epi32(static_cast<int>(c3));
    const __m512i ma = _mm512_set1_epi32(static_cast<int>(kPhiloxMulA));
    const __m512i mb = _mm512_set1_epi32(static_cast<int>(kPhiloxMulB));
    uint32_t a = k0, b = k1;
    for (int r = 0; r < 10; ++r) {
      // 32x32 -> 64: even lanes directly, odd lanes shifted down; the high words recombined.
      const __m512i pb_e = _mm512_mul_epu32(c2, mb);
      const __m512i pb_o = _mm512_mul_epu32(_mm512_srli_epi64(c2, 32), mb);
      const __m512i pa_e = _mm512_mul_epu32(c0, ma);
      const __m512i pa_o = _mm512_mul_epu32(_mm512_srli_epi64(c0, 32), ma);
      const __m512i hb = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pb_e, 32), pb_o);
      const __m512i ha = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pa_e, 32), pa_o);
      const __m512i lb = _mm512_mullo_epi32(c2, mb), la = _mm512_mullo_epi32(c0, ma);
      c0 = _mm512_xor_si512(_mm512_xor_si512(hb, c1), _mm512_set1_epi32(static_cast<int>(a)));
      c2 = _mm512_xor_si512(_mm512_xor_si512(ha, c3v), _mm512_set1_epi32(static_cast<int>(b)));
      c1 = lb;
      c3v = la;
      a += kPhiloxKeyA;
      b += kPhiloxKeyB;
    }
    const __m512i t = _mm512_set1_epi32(static_cast<int>(thr));
    out[0] = _mm512_cmpge_epu32_mask(_mm512_srli_epi32(c0, 8), t);
    out[1] = _mm512_cmpge_epu32_mask(_mm512_srli_epi32(c1, 8), t);
    out[2] = _mm512_cmpge_epu32_mask(_mm512_srli_epi32(c2, 8), t);
    out[3] = _mm512_cmpge_epu32_mask(_mm512_srli_epi32(c3v, 8), t);
#else
    out[0] = out[1] = out[2] = out[3] = 0;
    for (uint32_t l = 0; l < 16; ++l) {
      uint32_t c[4] = {i, 16 * blk + l, kRowTag, c3};
      philox4x32(c, k0, k1);
      for (int w = 0; w < 4; ++w)
        if ((c[w] >> 8) >= thr) out[w] = static_cast<uint16_t>(out[w] | (1u << l));
    }
#endif
  }
};

}  // namespace cpu
}  // namespace fastattn
