// Softmax attention on the CPU, FlashAttention-2 style: forward and backward.
//
// Maths, per (batch b, query head h, kv head g = h / (Hq / Hkv)), with scale c:
//   t_ij = c * q_i . k_j,  s_ij = cap * tanh(t_ij / cap) (softcap; s = t without) + bias_bhij,
//   masked to -inf where key j is padding or outside the window of query i: with the diagonal
//   d_i = i + off (off = Tk - Tq bottom-right, 0 top-left), visible iff (wl < 0 or
//   j >= d_i - wl) and (wr < 0 or j <= d_i + wr); causal is wr = 0.
//   lse_i = log sum_j exp(s_ij),  p_ij = exp(s_ij - lse_i),  out_i = sum_j d_ij p_ij v_j
// where d_ij = keep_ij / (1 - dropout_p) (1 without dropout; keep from Philox4x32-10, below).
// A row that sees no key has out = 0 and lse = +inf. Backward, with dO = dout:
//   dV_j = sum_i d_ij p_ij dO_i,  dP_ij = d_ij (dO_i . v_j),  Delta_i = dO_i . out_i
//   dS_ij = p_ij (dP_ij - Delta_i) (= dbias_bhij),  dT_ij = dS_ij (1 - tanh^2(t_ij / cap))
//   dQ_i = c sum_j dT_ij k_j,  dK_j = c sum_i dT_ij q_i
// (dK, dV summed over the query heads that share the kv head; dbias is the full [B, Hq, Tq, Tk]
// dS, which autograd sums over the bias's broadcast dims).
//
// Algorithm (FlashAttention-2): the forward walks key blocks of kBK keys for one block of kBQ
// queries at a time, keeping the running row max m, row sum l and the unnormalised output in
// a per-thread tile (online softmax), so memory is linear in T; lse is saved for the backward,
// which recomputes p per tile from lse (no Tq x Tk matrix anywhere).
// - Scores are computed in the log2 domain: Q is packed pre-multiplied by c * log2(e), so
//   p = exp2(s - m) and one FMA-polynomial exp2 (AVX-512 scalef) serves the whole row.
// - Every product is one register-tiled micro-kernel, C[M,N] (+)= A[M,K] B[K,N] with A read
//   through two strides (so A^T costs nothing) and B row-major with N a multiple of the vector
//   width: kMR rows x kNV vectors of accumulators (4 x 4 = 16 zmm on AVX-512, one broadcast of A
//   and kNV loads of B per 4*kNV FMAs). Operands are packed into zero-padded float tiles:
//   K^T per key block ([D, kBK], so q.K^T streams contiguously), V and K row-major [Tk, Dp]
//   (Dp = D rounded up to the vector width); padding columns and rows are zero, so tail tiles
//   run the same full-vector code.
// - The packing happens per thread, once per (b, kv head) it works on, into a buffer that stays
//   in L2 (Tk * Dp floats per operand), not in a global pass over memory.
// - Causal / window: a query block visits only the key blocks that meet its band
//   [lo(first row), hi(last row)) (Geom::kbeg / kend), the last one cut at a 16-column
//   boundary, and only tiles crossing the band's edges (or the Tk tail) are masked per element.
//   A key-padding mask is a per-batch additive 0 / -inf row. Softcap and bias are applied in the
//   same pass over a score row (modify_row), in log2 units; the backward recomputes tanh per
//   tile for the softcap's derivative and writes dS into dbias for the tiles it visits.
// - Forward parallelism: items (b, h, query block) in that order, cut into one contiguous range
//   per thread with equal total cost (cost = key blocks visited), which balances causal work.
// - Backward parallelism: items (b, kv head, split), each owning its dK / dV accumulators
//   (per thread, in L2) while iterating over the (query head, query block) pairs of its split;
//   for each pair it builds dQ over the key blocks and writes it directly (each pair is in
//   exactly one item). When B * Hkv is too small to occupy the threads, a group's pairs are cut
//   into `splits` parts of equal cost whose dK / dV partials are summed in split order at the
//   end. No atomics; the result depends only on the thread count. One kernel does all five
//   products per tile (S, dP, dV, dK, dQ), the minimum: 2.5x the forward's FLOPs.
// - Dropout: counter-based Philox4x32-10, keyed by (seed) and counted by (j >> 2, i, b*Hq + h,
//   offset); key j takes output word j & 3, so one call serves 4 adjacent keys (AVX-512: one
//   16-lane call per 64 keys). Identical to the Triton and CUDA backends; regenerated in the
//   backward.
// - bfloat16 on a CPU with AVX512_BF16 (checked at run time; FASTATTN_CPU_BF16_DOT=0 opts
//   out) runs every product on bf16 pairs with `vdpbf16ps` (csrc/cpu/bf16dot.h and the "bfloat16
//   dot-product path" below: 2x the multiply rate of fp32 FMA), P and dS rounded to bf16 for
//   their products as flash-attention does on GPUs; scores, softmax statistics and accumulators
//   stay fp32. Elsewhere bfloat16 is packed to float on the fly (the fp32 micro-kernels).
//   float64 takes a plain scalar path (gradcheck only). lse is float32 (float64 for float64).
//
// Block sizes, measured on AVX-512 (Zen, 2 threads, float32, B=4, H=12, D=64, causal,
// T = 512..2048; dev/attention_cpu/tune.py): kBQ = 64 query rows x kBK = 128 keys. kBK = 128
// beat 64 by 3-8% at T >= 1024 (half the per-row horizontal max/sum and rescale work per key)
// and tied at 512; kBQ = 128 was 2-5% slower than 64 (more causal waste on diagonal tiles, fewer
// items to balance); a 6 x 4 micro-kernel was no faster than 4 x 4. The score tile (32 KB) and
// the Q / O tiles (16 KB each at D = 64) stay in L1/L2.
//
// Tests: tests/test_attention_cpu.py (both bf16 paths, features over many tiles),
// tests/test_attention_features.py, tests/test_attention.py.  Time:
// python -m benchmarks.tune_attention, benchmarks/bench_attention.py.
#include "cpu/bf16dot.h"
#include "cpu/kernels.h"
#include "cpu/vec.h"
#include "kernel_limits.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace fastattn {
namespace cpu {
namespace {

constexpr int64_t kBQ = 64;  // query rows per block
constexpr int64_t kBK = 128;  // keys per block (a multiple of 16)
constexpr int kMR = 4;       // micro-kernel rows
constexpr int kNV = 4;       // micro-kernel vectors per row
constexpr int64_t kMaxHeadDim = limits::kAttentionMaxHeadDimCpu;
constexpr int64_t kMaxSplitBytes = int64_t(256) << 20;  // backward dK / dV partials, all splits
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// ------------------------------------------------------------------ micro-kernel and GEMM
// C[MR, NV*V] (+)= sum_k A(r, k) * B[k, :], A(r, k) = A[r * sr + k * sk].
template <int MR, int NV, bool ACC>
inline void micro(const float* __restrict A, int64_t sr, int64_t sk, const float* __restrict B,
                  int64_t ldb, float* __restrict C, int64_t ldc, int64_t K) {
  constexpr int64_t V = kVecSize;
  Vec c[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) c[r][v] = ACC ? Vec::loadu(C + r * ldc + v * V) : Vec(0.f);
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    Vec bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = Vec::loadu(b + v * V);
    const float* a = A + k * sk;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const Vec av(a[r * sr]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[r][v] = at::vec::fmadd(av, bv[v], c[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) c[r][v].store(C + r * ldc + v * V);
}

template <int NV, bool ACC, int R>
inline void micro_tail_rows(int64_t rem, const float* A, int64_t sr, int64_t sk, const float* B,
                            int64_t ldb, float* C, int64_t ldc, int64_t K) {
  if constexpr (R > 0) {
    if (rem == R) {
      micro<R, NV, ACC>(A, sr, sk, B, ldb, C, ldc, K);
    } else {
      micro_tail_rows<NV, ACC, R - 1>(rem, A, sr, sk, B, ldb, C, ldc, K);
    }
  }
}

template <int NV, bool ACC>
inline void gemm_cols(int64_t M, const float* A, int64_t sr, int64_t sk, const float* B,
                      int64_t ldb, float* C, int64_t ldc, int64_t K) {
  int64_t m = 0;
  for (; m + kMR <= M; m += kMR) micro<kMR, NV, ACC>(A + m * sr, sr, sk, B, ldb, C + m * ldc, ldc, K);
  if (m < M) micro_tail_rows<NV, ACC, kMR - 1>(M - m, A + m * sr, sr, sk, B, ldb, C + m * ldc, ldc, K);
}

template <bool ACC, int NV>
inline void gemm_tail_cols(int64_t nv, int64_t M, const float* A, int64_t sr, int64_t sk,
                           const float* B, int64_t ldb, float* C, int64_t ldc, int64_t K) {
  if constexpr (NV > 0) {
    if (nv == NV) {
      gemm_cols<NV, ACC>(M, A, sr, sk, B, ldb, C, ldc, K);
    } else {
      gemm_tail_cols<ACC, NV - 1>(nv, M, A, sr, sk, B, ldb, C, ldc, K);
    }
  }
}

// C[M, N] (+)= A[M, K] B[K, N]; N a multiple of the vector width.
template <bool ACC>
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t sr, int64_t sk, const float* B,
          int64_t ldb, float* C, int64_t ldc) {
  constexpr int64_t W = kNV * kVecSize;
  int64_t n = 0;
  for (; n + W <= N; n += W) gemm_cols<kNV, ACC>(M, A, sr, sk, B + n, ldb, C + n, ldc, K);
  if (n < N) gemm_tail_cols<ACC, kNV - 1>((N - n) / kVecSize, M, A, sr, sk, B + n, ldb, C + n, ldc, K);
}

// ------------------------------------------------------------------ exp2 and reductions
// 2^x for x <= 0 (and -inf -> exactly 0): x = n + f, |f| <= 1/2, 2^f by a degree-6 Taylor
// polynomial (relative error < 2e-7), 2^n by scalef (exact, underflows to 0).
inline Vec exp2v(const Vec& xin) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 x = _mm512_max_ps(xin, _mm512_set1_ps(-200.f));
  __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402265069591007f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931471805599453f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return Vec(_mm512_scalef_ps(p, n));
#else
  return xin.exp2();
#endif
}

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}
// Row maxima with plain vmaxps on AVX-512, not at::vec::maximum's NaN-propagating blend (a
// third of the softmax's time at small head dims): a NaN score still reaches the output through
// exp2 and the row sum, as on the bf16 path.
inline Vec vmax(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vec(_mm512_max_ps(__m512(a), __m512(b)));
#else
  return at::vec::maximum(a, b);
#endif
}
inline float hmax(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_max_ps(__m512(v));
#else
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
#endif
}

// ------------------------------------------------------------------ Philox dropout
// Philox4x32-10 with key (k0, k1) and counter (c[0..3]); the four output words in c[0..3].
inline uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}
inline void philox4(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint32_t a0 = c[0], a2 = c[2];
    c[0] = mulhi32(0xCD9E8D57u, a2) ^ c[1] ^ k0;
    c[2] = mulhi32(0xD2511F53u, a0) ^ c[3] ^ k1;
    c[1] = 0xCD9E8D57u * a2;
    c[3] = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}
// Element (b, h, i, j) reads word w = (j & 3) of the call with counter (j >> 2, i, b*Hq + h,
// offset): one call serves the 4 keys 4k .. 4k+3. keep iff u = (w >> 8) * 2^-24 >= p, done as
// the exact integer compare (w >> 8) >= ceil(p 2^24): identical on every backend whatever the
// rounding of p to float.
inline uint32_t keep_threshold(double p) { return static_cast<uint32_t>(std::ceil(p * 16777216.0)); }

struct Dropout {
  bool on = false;
  float inv_keep = 1.f;
  double p64 = 0.0;
  uint32_t k0 = 0, k1 = 0, c3 = 0, thr = 0;
  Dropout(double dropout_p, int64_t seed, int64_t offset) {
    on = dropout_p > 0;
    thr = keep_threshold(dropout_p);
    p64 = dropout_p;
    inv_keep = static_cast<float>(1.0 / (1.0 - dropout_p));
    const uint64_t s = static_cast<uint64_t>(seed);
    k0 = static_cast<uint32_t>(s & 0xFFFFFFFFu);
    k1 = static_cast<uint32_t>((s >> 32) & 0xFFFFFFFFu);
    c3 = static_cast<uint32_t>(static_cast<uint64_t>(offset) & 0xFFFFFFFFu);
  }
  // The four output words of the call serving keys 4 * (j >> 2) .. + 3 of row (i, bh).
  void words(uint32_t j, uint32_t i, uint32_t bh, uint32_t w[4]) const {
    w[0] = j >> 2;
    w[1] = i;
    w[2] = bh;
    w[3] = c3;
    philox4(w, k0, k1);
  }
  bool keep_word(uint32_t w) const { return (w >> 8) >= thr; }
  // One element (one Philox call; callers walking a row use words() once per 4 keys).
  bool keep(uint32_t j, uint32_t i, uint32_t bh) const {
    uint32_t w[4];
    words(j, i, bh, w);
    return keep_word(w[j & 3]);
  }
};

#if defined(CPU_CAPABILITY_AVX512)
inline __m512i mulhi_epu32(__m512i a, __m512i b) {
  const __m512i ev = _mm512_mul_epu32(a, b);
  const __m512i od = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), _mm512_srli_epi64(b, 32));
  return _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(ev, 32), od);
}
// 16 Philox calls, lane l on counter (c0[l], i, bh, offset); the four output words in w[0..3].
inline void philox16(const Dropout& dr, __m512i c0, uint32_t i, uint32_t bh, __m512i w[4]) {
  __m512i c1 = _mm512_set1_epi32(static_cast<int>(i));
  __m512i c2 = _mm512_set1_epi32(static_cast<int>(bh));
  __m512i c3 = _mm512_set1_epi32(static_cast<int>(dr.c3));
  __m512i k0 = _mm512_set1_epi32(static_cast<int>(dr.k0));
  __m512i k1 = _mm512_set1_epi32(static_cast<int>(dr.k1));
  const __m512i ma = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i mb = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m512i w0 = _mm512_set1_epi32(static_cast<int>(0x9E3779B9u));
  const __m512i w1 = _mm512_set1_epi32(static_cast<int>(0xBB67AE85u));
  for (int r = 0; r < 10; ++r) {
    const __m512i a0 = c0, a2 = c2;
    c0 = _mm512_xor_si512(_mm512_xor_si512(mulhi_epu32(mb, a2), c1), k0);
    c2 = _mm512_xor_si512(_mm512_xor_si512(mulhi_epu32(ma, a0), c3), k1);
    c1 = _mm512_mullo_epi32(mb, a2);
    c3 = _mm512_mullo_epi32(ma, a0);
    k0 = _mm512_add_epi32(k0, w0);
    k1 = _mm512_add_epi32(k1, w1);
  }
  w[0] = c0;
  w[1] = c1;
  w[2] = c2;
  w[3] = c3;
}
inline __mmask16 keep_mask16(const Dropout& dr, __m512i w) {
  return _mm512_cmpge_epu32_mask(_mm512_srli_epi32(w, 8), _mm512_set1_epi32(static_cast<int>(dr.thr)));
}
// Keep bits of the 16 elements (j0 .. j0 + 15, i) of row bh, for any j0: lane l runs the call
// (j0 + l) >> 2 and takes its word (j0 + l) & 3 (each call computed up to 4 times over; the
// aligned keep64 below avoids that).
inline __mmask16 keep16(const Dropout& dr, uint32_t j0, uint32_t i, uint32_t bh) {
  const __m512i j = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(j0)),
                                     _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  __m512i w[4];
  philox16(dr, _mm512_srli_epi32(j, 2), i, bh, w);
  const __m512i sel = _mm512_and_si512(j, _mm512_set1_epi32(3));
  __m512i x = w[0];
  for (int k = 1; k < 4; ++k)
    x = _mm512_mask_blend_epi32(_mm512_cmpeq_epi32_mask(sel, _mm512_set1_epi32(k)), x, w[k]);
  return keep_mask16(dr, x);
}
// Keep bits of the 64 elements (j0 .. j0 + 63, i) of row bh, j0 % 4 == 0, from one 16-lane
// Philox call (16 counters x 4 words): m[c] holds keys j0 + 16c .. j0 + 16c + 15. Lane 4q + r
// runs counter j0/4 + 4r + q, so the 4x4 transpose inside each 128-bit lane (unpack 32 then
// 64) leaves, in vector r, the words of counters j0/4 + 4r .. + 3 in key order.
inline void keep64(const Dropout& dr, uint32_t j0, uint32_t i, uint32_t bh, __mmask16 m[4]) {
  const __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(j0 >> 2)),
                                      _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
  __m512i w[4];
  philox16(dr, c0, i, bh, w);
  const __m512i t0 = _mm512_unpacklo_epi32(w[0], w[1]);  // per 128-bit lane: w0[0] w1[0] w0[1] w1[1]
  const __m512i t1 = _mm512_unpackhi_epi32(w[0], w[1]);  // w0[2] w1[2] w0[3] w1[3]
  const __m512i t2 = _mm512_unpacklo_epi32(w[2], w[3]);
  const __m512i t3 = _mm512_unpackhi_epi32(w[2], w[3]);
  m[0] = keep_mask16(dr, _mm512_unpacklo_epi64(t0, t2));  // lane 4q + 0's four words
  m[1] = keep_mask16(dr, _mm512_unpackhi_epi64(t0, t2));  // lane 4q + 1
  m[2] = keep_mask16(dr, _mm512_unpacklo_epi64(t1, t3));  // lane 4q + 2
  m[3] = keep_mask16(dr, _mm512_unpackhi_epi64(t1, t3));  // lane 4q + 3
}
#endif

// x[jj] *= keep(j0 + jj, i) / (1 - p) for jj < n (n a multiple of the vector width); the same
// for y when given. dst may alias x. The callers' j0 is a key-block start (a multiple of kBK),
// so AVX-512 draws 64 keys per 16-lane Philox call (keep64); keep16 covers any other j0.
inline void dropout_row(const Dropout& dr, int64_t j0, int64_t i, int64_t bh, const float* x,
                        float* xd, float* y, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 s = _mm512_set1_ps(dr.inv_keep);
  const auto apply = [&](int64_t jj, __mmask16 m) {
    _mm512_storeu_ps(xd + jj, _mm512_maskz_mul_ps(m, _mm512_loadu_ps(x + jj), s));
    if (y != nullptr) _mm512_storeu_ps(y + jj, _mm512_maskz_mul_ps(m, _mm512_loadu_ps(y + jj), s));
  };
  const uint32_t ui = static_cast<uint32_t>(i), ubh = static_cast<uint32_t>(bh);
  if ((j0 & 3) == 0) {
    for (int64_t jj = 0; jj < n; jj += 64) {
      __mmask16 m[4];
      keep64(dr, static_cast<uint32_t>(j0 + jj), ui, ubh, m);  // keys past n: drawn, unused
      for (int c = 0; c < 4 && jj + 16 * c < n; ++c) apply(jj + 16 * c, m[c]);
    }
  } else {
    for (int64_t jj = 0; jj < n; jj += 16) apply(jj, keep16(dr, static_cast<uint32_t>(j0 + jj), ui, ubh));
  }
#else
  uint32_t w[4];
  for (int64_t jj = 0; jj < n; ++jj) {
    const uint32_t j = static_cast<uint32_t>(j0 + jj);
    if (jj == 0 || (j & 3) == 0) dr.words(j, static_cast<uint32_t>(i), static_cast<uint32_t>(bh), w);
    const bool k = dr.keep_word(w[j & 3]);
    xd[jj] = k ? x[jj] * dr.inv_keep : 0.f;
    if (y != nullptr) y[jj] = k ? y[jj] * dr.inv_keep : 0.f;
  }
#endif
}

// ------------------------------------------------------------------ shapes and packing
struct Geom {
  int64_t B, Hq, Hkv, G, Tq, Tk, D, Dp, nQB, nKB, Tkp;
  // Window around query i's diagonal key i + off: keys [i + off - wl, i + off + wr] (-1 = no
  // bound on that side; causal is wr = 0).
  int64_t wl = -1, wr = -1, off = 0;
  // Keys query i may see (before padding / bias): [lo(i), hi(i)), empty when lo >= hi.
  int64_t lo(int64_t i) const { return wl < 0 ? 0 : std::clamp<int64_t>(i + off - wl, 0, Tk); }
  int64_t hi(int64_t i) const { return wr < 0 ? Tk : std::clamp<int64_t>(i + off + wr + 1, 0, Tk); }
  // Keys visited by the query block [i0, i0 + rows): [kbeg, kend), kbeg on a block boundary;
  // blocks outside are fully masked for every row and skipped.
  int64_t kbeg(int64_t i0) const { return lo(i0) / kBK * kBK; }
  int64_t kend(int64_t i0, int64_t rows) const { return hi(i0 + rows - 1); }
  // Whether some element of the tile (keys j0 .. j0 + n) is outside a row's window or past Tk.
  bool edge(int64_t i0, int64_t rows, int64_t j0, int64_t n) const {
    return j0 + n > hi(i0) || (wl >= 0 && j0 < lo(i0 + rows - 1));
  }
  int64_t rows_of(int64_t qb) const { return std::min<int64_t>(kBQ, Tq - qb * kBQ); }
  int64_t cost(int64_t qb) const {
    const int64_t i0 = qb * kBQ;
    return ceil_div(std::max<int64_t>(0, kend(i0, rows_of(qb)) - kbeg(i0)), kBK) + 1;
  }
};

// Score modifiers of one call: softcap, additive bias, key padding; and the bias gradient.
struct Mods {
  float cap2 = 0.f;             // softcap in log2 units (c * log2 e), 0 = none
  const float* bias = nullptr;  // [B, Hq, Tq, Tk] view, unit last stride (natural units)
  int64_t sb = 0, sh = 0, sq = 0;
  const float* kpm = nullptr;   // key padding as additive rows [B][Tkp] (0 / -inf)
  float* dbias = nullptr;       // [B, Hq, Tq, Tk] contiguous: dS, when the bias needs a gradient
  bool any() const { return cap2 > 0.f || bias != nullptr || kpm != nullptr; }
};

struct Strides {
  int64_t b, h, t;
  explicit Strides(const at::Tensor& x) : b(x.stride(0)), h(x.stride(1)), t(x.stride(2)) {}
};

// KT[kb][d][jj] = k[kb*kBK + jj][d] (zero beyond Tk); optional row-major Kp[Tkp][Dp] too.
#if defined(CPU_CAPABILITY_AVX512)
// In-register transpose of a 16 x 16 float tile: r[i] (row i) becomes column i. Two rounds of
// unpacks give, per 128-bit lane L of r[4a + c], column 4L + c of rows 4a .. 4a+3; two rounds of
// 128-bit lane shuffles then gather each column's four lanes in row order.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int a = 0; a < 4; ++a) {
    const __m512d t0 = _mm512_castps_pd(t[4 * a]), t1 = _mm512_castps_pd(t[4 * a + 1]);
    const __m512d t2 = _mm512_castps_pd(t[4 * a + 2]), t3 = _mm512_castps_pd(t[4 * a + 3]);
    r[4 * a] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    r[4 * a + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    r[4 * a + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    r[4 * a + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  __m512 out[16];
  for (int c = 0; c < 4; ++c) {
    const __m512 u0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);   // lanes 0, 2
    const __m512 u1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xDD);   // lanes 1, 3
    const __m512 u2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    const __m512 u3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xDD);
    out[c] = _mm512_shuffle_f32x4(u0, u2, 0x88);
    out[4 + c] = _mm512_shuffle_f32x4(u1, u3, 0x88);
    out[8 + c] = _mm512_shuffle_f32x4(u0, u2, 0xDD);
    out[12 + c] = _mm512_shuffle_f32x4(u1, u3, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = out[i];
}
#endif

template <typename T>
void pack_kt(const T* k, int64_t st, const Geom& g, float* kt, float* kp) {
  std::memset(kt, 0, sizeof(float) * g.Tkp * g.D);
  int64_t jv = 0;  // keys [0, jv) packed by whole 16 x 16 tiles of (key, dim)
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (!std::is_same_v<T, double>) {
    const int64_t dv = g.D / 16 * 16;
    jv = dv > 0 ? g.Tk / 16 * 16 : 0;  // kBK is a multiple of 16: a tile stays in one block
    for (int64_t j0 = 0; j0 < jv; j0 += 16) {
      float* blk = kt + (j0 / kBK) * g.D * kBK + (j0 % kBK);
      for (int64_t d0 = 0; d0 < dv; d0 += 16) {
        __m512 r[16];
        for (int i = 0; i < 16; ++i) r[i] = __m512(load_f<T>(k + (j0 + i) * st + d0));
        transpose16(r);
        for (int c = 0; c < 16; ++c) _mm512_storeu_ps(blk + (d0 + c) * kBK, r[c]);
      }
      for (int64_t j = j0; j < j0 + 16; ++j)  // the dims past the last whole tile
        for (int64_t d = dv; d < g.D; ++d) blk[d * kBK + (j - j0)] = static_cast<float>(k[j * st + d]);
    }
  }
#endif
  for (int64_t j = jv; j < g.Tk; ++j) {
    const T* row = k + j * st;
    float* dst = kt + (j / kBK) * g.D * kBK + (j % kBK);
    for (int64_t d = 0; d < g.D; ++d) dst[d * kBK] = static_cast<float>(row[d]);
  }
  if (kp != nullptr) {
    for (int64_t j = 0; j < g.Tkp; ++j) {
      float* dst = kp + j * g.Dp;
      int64_t d = 0;
      if (j < g.Tk)
        for (; d < g.D; ++d) dst[d] = static_cast<float>(k[j * st + d]);
      for (; d < g.Dp; ++d) dst[d] = 0.f;
    }
  }
}

// dst[r][0:Dp] = src rows * mul, zero padded; `rows` rows of stride st.
template <typename T>
void pack_rows(const T* src, int64_t st, int64_t rows, int64_t D, int64_t Dp, float mul, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * st;
    float* o = dst + r * Dp;
    int64_t d = 0;
    if constexpr (!std::is_same_v<T, double>) {  // whole vectors, then the tail (same rounding)
      const Vec vm(mul);
      for (; d + kVecSize <= D; d += kVecSize) (load_f<T>(s + d) * vm).store(o + d);
    }
    for (; d < D; ++d) o[d] = static_cast<float>(s[d]) * mul;
    for (; d < Dp; ++d) o[d] = 0.f;
  }
}

// Cut items [0, n) with the given costs into `parts` contiguous ranges of near-equal cost.
template <typename CostFn>
std::vector<int64_t> balanced_bounds(int64_t n, int64_t parts, CostFn cost) {
  std::vector<int64_t> prefix(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + cost(i);
  std::vector<int64_t> bounds(parts + 1, n);
  bounds[0] = 0;
  int64_t it = 0;
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t target = prefix[n] * p / parts;
    while (it < n && prefix[it] < target) ++it;
    bounds[p] = it;
  }
  return bounds;
}

// Masks one score row in place: -inf outside columns [lo, hi) (window / Tk tail), plus the
// additive key-padding row (0 / -inf) when given. s holds n columns starting at key j0.
inline void mask_row(float* s, int64_t n, int64_t lo, int64_t hi, const float* kpm) {
  if (kpm != nullptr)
    for (int64_t jj = 0; jj < n; jj += kVecSize) (Vec::loadu(s + jj) + Vec::loadu(kpm + jj)).store(s + jj);
#if defined(CPU_CAPABILITY_AVX512)
  // Whole vectors with a lane mask (n is a multiple of 16): the scalar stores this replaces
  // stalled the vector loads that read the row next (store forwarding), on every diagonal tile.
  if (lo <= 0 && hi >= n) return;
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i vlo = _mm512_set1_epi32(static_cast<int>(std::clamp<int64_t>(lo, 0, n)));
  const __m512i vhi = _mm512_set1_epi32(static_cast<int>(std::clamp<int64_t>(hi, 0, n)));
  const __m512 ninf = _mm512_set1_ps(kNegInf);
  for (int64_t jj = 0; jj < n; jj += kVecSize) {
    const __m512i j = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(jj)));
    const __mmask16 out = _mm512_cmplt_epi32_mask(j, vlo) | _mm512_cmpge_epi32_mask(j, vhi);
    if (out) _mm512_storeu_ps(s + jj, _mm512_mask_mov_ps(_mm512_loadu_ps(s + jj), out, ninf));
  }
#else
  for (int64_t jj = 0; jj < std::min(lo, n); ++jj) s[jj] = kNegInf;
  for (int64_t jj = std::max<int64_t>(0, hi); jj < n; ++jj) s[jj] = kNegInf;
#endif
}

// One row of scores in log2 units (keys j0 .. j0 + n of query i of head (b, h)), in place:
// softcap (th receives tanh(t / c) for the backward, when given), + bias, then the masks.
inline void modify_row(float* sr, int64_t n, int64_t j0, int64_t i, int64_t b, int64_t h,
                       const Geom& g, const Mods& md, bool edge, float* th) {
  if (md.cap2 > 0.f) {
    const Vec c(md.cap2), ic(1.f / md.cap2);
    for (int64_t jj = 0; jj < n; jj += kVecSize) {
      const Vec t = (Vec::loadu(sr + jj) * ic).tanh();
      if (th != nullptr) t.store(th + jj);
      (t * c).store(sr + jj);
    }
  }
  if (md.bias != nullptr) {
    const float* br = md.bias + b * md.sb + h * md.sh + i * md.sq + j0;
    const int64_t m = std::min<int64_t>(n, g.Tk - j0);  // columns past Tk are masked below
    const Vec l2e(kLog2e);
    int64_t jj = 0;
    for (; jj + kVecSize <= m; jj += kVecSize)
      at::vec::fmadd(Vec::loadu(br + jj), l2e, Vec::loadu(sr + jj)).store(sr + jj);
    for (; jj < m; ++jj) sr[jj] = std::fma(br[jj], kLog2e, sr[jj]);
  }
  if (edge || md.kpm != nullptr)
    mask_row(sr, n, g.lo(i) - j0, g.hi(i) - j0, md.kpm != nullptr ? md.kpm + b * g.Tkp + j0 : nullptr);
}

// The backward's dS row (natural units, before the softcap's factor) into dbias when wanted;
// then dS times 1 - tanh^2 (the softcap's derivative) in place when there is a softcap.
inline void ds_row(float* ds, int64_t n, int64_t j0, int64_t i, int64_t bh, const Geom& g,
                   const Mods& md, const float* th) {
  if (md.dbias != nullptr) {
    float* dst = md.dbias + (bh * g.Tq + i) * g.Tk + j0;
    const int64_t m = std::min<int64_t>(n, g.Tk - j0);
    std::memcpy(dst, ds, sizeof(float) * m);
  }
  if (md.cap2 > 0.f) {
    const Vec one(1.f);
    for (int64_t jj = 0; jj < n; jj += kVecSize) {
      const Vec t = Vec::loadu(th + jj);
      (Vec::loadu(ds + jj) * (one - t * t)).store(ds + jj);
    }
  }
}

// ------------------------------------------------------------------ forward, float/bfloat16
template <typename T>
void fwd_vec(const Geom& g, const T* q, Strides qs, const T* k, Strides ks, const T* v, Strides vs,
             const Mods& md, float scale, const Dropout& dr, T* out, float* lse) {
  const int64_t items = g.B * g.Hq * g.nQB;
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  const auto bounds = balanced_bounds(items, nt, [&](int64_t it) { return g.cost(it % g.nQB); });
  const float qmul = scale * kLog2e;
  const int64_t D = g.D, Dp = g.Dp;
  at::parallel_for(0, nt, 1, [&](int64_t tb, int64_t te) {
    at::Tensor scratch = at::empty({2 * g.Tkp * Dp + 2 * kBQ * Dp + kBQ * kBK + 2 * kBQ}, at::kFloat);
    float* kt = scratch.data_ptr<float>();
    float* vp = kt + g.Tkp * Dp;
    float* qp = vp + g.Tkp * Dp;
    float* o = qp + kBQ * Dp;
    float* s = o + kBQ * Dp;
    float* mrow = s + kBQ * kBK;
    float* lrow = mrow + kBQ;
    int64_t packed = -1;
    for (int64_t t = tb; t < te; ++t) {
      for (int64_t it = bounds[t]; it < bounds[t + 1]; ++it) {
        const int64_t qb = it % g.nQB, h = (it / g.nQB) % g.Hq, b = it / (g.nQB * g.Hq);
        const int64_t kvh = h / g.G, bh = b * g.Hq + h;
        if (packed != b * g.Hkv + kvh) {
          packed = b * g.Hkv + kvh;
          pack_kt<T>(k + b * ks.b + kvh * ks.h, ks.t, g, kt, nullptr);
          pack_rows<T>(v + b * vs.b + kvh * vs.h, vs.t, g.Tk, D, Dp, 1.f, vp);
          std::memset(vp + g.Tk * Dp, 0, sizeof(float) * (g.Tkp - g.Tk) * Dp);
        }
        const int64_t i0 = qb * kBQ, rows = g.rows_of(qb);
        pack_rows<T>(q + b * qs.b + h * qs.h + i0 * qs.t, qs.t, rows, D, Dp, qmul, qp);
        std::memset(o, 0, sizeof(float) * rows * Dp);
        for (int64_t r = 0; r < rows; ++r) {
          mrow[r] = kNegInf;
          lrow[r] = 0.f;
        }
        const int64_t kend = g.kend(i0, rows);
        for (int64_t j0 = g.kbeg(i0); j0 < kend; j0 += kBK) {
          const int64_t n = round_up(std::min<int64_t>(kBK, kend - j0), kVecSize);
          gemm<false>(rows, n, D, qp, Dp, 1, kt + j0 * D, kBK, s, kBK);
          const bool edge = g.edge(i0, rows, j0, n);
          for (int64_t r = 0; r < rows; ++r) {
            float* sr = s + r * kBK;
            if (edge || md.any()) modify_row(sr, n, j0, i0 + r, b, h, g, md, edge, nullptr);
            Vec mx(kNegInf);
            for (int64_t jj = 0; jj < n; jj += kVecSize) mx = vmax(mx, Vec::loadu(sr + jj));
            const float m_new = std::max(mrow[r], hmax(mx));
            const float m_safe = m_new == kNegInf ? 0.f : m_new;
            const Vec vm(m_safe);
            Vec sum(0.f);
            for (int64_t jj = 0; jj < n; jj += kVecSize) {
              const Vec p = exp2v(Vec::loadu(sr + jj) - vm);
              sum = sum + p;
              p.store(sr + jj);
            }
            const float alpha = std::exp2(mrow[r] - m_safe);
            lrow[r] = lrow[r] * alpha + hsum(sum);
            mrow[r] = m_new;
            if (alpha != 1.f) {
              float* orow = o + r * Dp;
              const Vec va(alpha);
              for (int64_t d = 0; d < Dp; d += kVecSize) (Vec::loadu(orow + d) * va).store(orow + d);
            }
            if (dr.on) dropout_row(dr, j0, i0 + r, bh, sr, sr, nullptr, n);
          }
          gemm<true>(rows, Dp, n, s, kBK, 1, vp + j0 * Dp, Dp, o, Dp);
        }
        T* orow_out = out + (bh * g.Tq + i0) * D;
        float* lse_out = lse + bh * g.Tq + i0;
        for (int64_t r = 0; r < rows; ++r) {
          const float l = lrow[r];
          const float inv = l > 0.f ? 1.f / l : 0.f;
          for (int64_t d = 0; d < D; ++d) orow_out[r * D + d] = static_cast<T>(o[r * Dp + d] * inv);
          lse_out[r] = l > 0.f ? (mrow[r] + std::log2(l)) * kLn2 : kPosInf;
        }
      }
    }
  });
}

// ------------------------------------------------------------------ backward work plan
// Items (b, kv head, split): see the header. Shared by the fp32 and the bf16 dot-product paths.
struct BwdPlan {
  int64_t groups = 0, pairs = 0, splits = 1, nt = 1;
  std::vector<int64_t> split_bounds, bounds;  // pairs per split; items per thread
  at::Tensor partial;                          // [2][splits][groups][Tkp][Dp] when splits > 1
};

BwdPlan bwd_plan(const Geom& g) {
  BwdPlan pl;
  pl.groups = g.B * g.Hkv;
  pl.pairs = g.G * g.nQB;  // (query head, query block) pairs per group
  const int64_t threads = at::get_num_threads();
  // Split a group's pairs only when the groups alone cannot keep every thread busy (two items
  // per thread balance well), and keep the dK / dV partials under kMaxSplitBytes.
  const int64_t want = pl.groups >= 2 * threads ? 1 : ceil_div(2 * threads, pl.groups);
  const int64_t split_bytes = 2 * pl.groups * g.Tkp * g.Dp * static_cast<int64_t>(sizeof(float));
  const int64_t mem_cap = std::max<int64_t>(1, kMaxSplitBytes / std::max<int64_t>(1, split_bytes));
  pl.splits = std::max<int64_t>(1, std::min({want, pl.pairs, mem_cap}));
  const auto pair_cost = [&](int64_t pr) { return g.cost(pr % g.nQB); };
  pl.split_bounds = balanced_bounds(pl.pairs, pl.splits, pair_cost);
  std::vector<int64_t> split_cost(pl.splits, 0);
  for (int64_t sp = 0; sp < pl.splits; ++sp)
    for (int64_t pr = pl.split_bounds[sp]; pr < pl.split_bounds[sp + 1]; ++pr) split_cost[sp] += pair_cost(pr);
  const int64_t items = pl.groups * pl.splits;
  pl.nt = std::max<int64_t>(1, std::min<int64_t>(threads, items));
  const int64_t splits = pl.splits;
  pl.bounds = balanced_bounds(items, pl.nt, [&](int64_t it) { return split_cost[it % splits] + 1; });
  if (pl.splits > 1) pl.partial = at::empty({2, pl.splits, pl.groups, g.Tkp, g.Dp}, at::kFloat);
  return pl;
}

// A finished item's dK / dV accumulators ([Tkp][Dp]): written out (dK times dk_mul) when its
// group is not split, else kept as that split's partial.
template <typename T>
void store_dkdv(const BwdPlan& pl, const Geom& g, int64_t grp, int64_t sp, const float* dka,
                const float* dva, float dk_mul, T* dk, T* dv) {
  const int64_t D = g.D, Dp = g.Dp;
  if (pl.splits == 1) {
    T* dkg = dk + grp * g.Tk * D;
    T* dvg = dv + grp * g.Tk * D;
    for (int64_t j = 0; j < g.Tk; ++j)
      for (int64_t d = 0; d < D; ++d) {
        dkg[j * D + d] = static_cast<T>(dka[j * Dp + d] * dk_mul);
        dvg[j * D + d] = static_cast<T>(dva[j * Dp + d]);
      }
  } else {
    float* base = pl.partial.data_ptr<float>();
    const int64_t sz = g.Tkp * Dp;
    std::memcpy(base + (sp * pl.groups + grp) * sz, dka, sizeof(float) * sz);
    std::memcpy(base + ((pl.splits + sp) * pl.groups + grp) * sz, dva, sizeof(float) * sz);
  }
}

// Split partials summed in split order (deterministic), then dK times dk_mul.
template <typename T>
void reduce_splits(const BwdPlan& pl, const Geom& g, float dk_mul, T* dk, T* dv) {
  if (pl.splits == 1) return;
  const int64_t D = g.D, Dp = g.Dp, groups = pl.groups, splits = pl.splits;
  const float* base = pl.partial.data_ptr<float>();
  const int64_t sz = g.Tkp * Dp;
  at::parallel_for(0, groups * g.Tk, 64, [&](int64_t rb, int64_t re) {
    for (int64_t row = rb; row < re; ++row) {
      const int64_t grp = row / g.Tk, j = row % g.Tk;
      for (int64_t d = 0; d < D; ++d) {
        float ak = 0.f, av = 0.f;
        for (int64_t sp = 0; sp < splits; ++sp) {
          ak += base[(sp * groups + grp) * sz + j * Dp + d];
          av += base[((splits + sp) * groups + grp) * sz + j * Dp + d];
        }
        dk[row * D + d] = static_cast<T>(ak * dk_mul);
        dv[row * D + d] = static_cast<T>(av);
      }
    }
  });
}

// ------------------------------------------------------------------ backward, float/bfloat16
template <typename T>
void bwd_vec(const Geom& g, const T* dout, const T* q, Strides qs, const T* k, Strides ks,
             const T* v, Strides vs, const T* out, const float* lse, const Mods& md, float scale,
             const Dropout& dr, T* dq, T* dk, T* dv) {
  const int64_t D = g.D, Dp = g.Dp;
  const BwdPlan plan = bwd_plan(g);
  const int64_t splits = plan.splits;
  const auto& split_bounds = plan.split_bounds;
  const auto& bounds = plan.bounds;
  const float qmul = scale * kLog2e;
  const float dk_mul = 1.f / kLog2e;  // dS^T (Q * scale * log2e) / log2e = scale * dS^T Q
  at::parallel_for(0, plan.nt, 1, [&](int64_t tb, int64_t te) {
    at::Tensor scratch = at::empty(
        {5 * g.Tkp * Dp + 3 * kBQ * Dp + 4 * kBQ * kBK + 2 * kBQ}, at::kFloat);
    float* kt = scratch.data_ptr<float>();  // [Tkp][D] as K^T blocks
    float* kp = kt + g.Tkp * Dp;            // [Tkp][Dp]
    float* vt = kp + g.Tkp * Dp;            // V^T blocks
    float* dka = vt + g.Tkp * Dp;           // [Tkp][Dp] accumulators
    float* dva = dka + g.Tkp * Dp;
    float* qp = dva + g.Tkp * Dp;  // [kBQ][Dp]
    float* dop = qp + kBQ * Dp;
    float* dqa = dop + kBQ * Dp;
    float* s = dqa + kBQ * Dp;  // [kBQ][kBK]: scores, then P
    float* dp = s + kBQ * kBK;  // dP, then dS
    float* pd = dp + kBQ * kBK;  // dropped P
    float* th = pd + kBQ * kBK;  // tanh of the softcap
    float* delta = th + kBQ * kBK;
    float* lse2 = delta + kBQ;
    for (int64_t t = tb; t < te; ++t) {
      for (int64_t it = bounds[t]; it < bounds[t + 1]; ++it) {
        const int64_t grp = it / splits, sp = it % splits;
        const int64_t b = grp / g.Hkv, kvh = grp % g.Hkv;
        pack_kt<T>(k + b * ks.b + kvh * ks.h, ks.t, g, kt, kp);
        pack_kt<T>(v + b * vs.b + kvh * vs.h, vs.t, g, vt, nullptr);
        std::memset(dka, 0, sizeof(float) * 2 * g.Tkp * Dp);
        for (int64_t pr = split_bounds[sp]; pr < split_bounds[sp + 1]; ++pr) {
          const int64_t h = kvh * g.G + pr / g.nQB, qb = pr % g.nQB;
          const int64_t bh = b * g.Hq + h;
          const int64_t i0 = qb * kBQ, rows = g.rows_of(qb);
          pack_rows<T>(q + b * qs.b + h * qs.h + i0 * qs.t, qs.t, rows, D, Dp, qmul, qp);
          const T* dorow = dout + (bh * g.Tq + i0) * D;
          const T* orow = out + (bh * g.Tq + i0) * D;
          pack_rows<T>(dorow, D, rows, D, Dp, 1.f, dop);
          for (int64_t r = 0; r < rows; ++r) {
            float acc = 0.f;
            // The same fused multiply-add chain as the dP micro-kernel, so dP - Delta is exact
            // where the two agree mathematically (e.g. a single visible key).
            for (int64_t d = 0; d < D; ++d) acc = std::fma(dop[r * Dp + d], static_cast<float>(orow[r * D + d]), acc);
            delta[r] = acc;
            lse2[r] = lse[bh * g.Tq + i0 + r] * kLog2e;
          }
          std::memset(dqa, 0, sizeof(float) * rows * Dp);
          const int64_t kend = g.kend(i0, rows);
          for (int64_t j0 = g.kbeg(i0); j0 < kend; j0 += kBK) {
            const int64_t n = round_up(std::min<int64_t>(kBK, kend - j0), kVecSize);
            gemm<false>(rows, n, D, qp, Dp, 1, kt + j0 * D, kBK, s, kBK);
            gemm<false>(rows, n, D, dop, Dp, 1, vt + j0 * D, kBK, dp, kBK);
            const bool edge = g.edge(i0, rows, j0, n);
            for (int64_t r = 0; r < rows; ++r) {
              float* sr = s + r * kBK;
              float* dpr = dp + r * kBK;
              float* thr = th + r * kBK;
              if (edge || md.any()) modify_row(sr, n, j0, i0 + r, b, h, g, md, edge, thr);
              const Vec vl(lse2[r]);
              for (int64_t jj = 0; jj < n; jj += kVecSize) exp2v(Vec::loadu(sr + jj) - vl).store(sr + jj);
              if (dr.on) dropout_row(dr, j0, i0 + r, bh, sr, pd + r * kBK, dpr, n);
              const Vec vd(delta[r]);
              for (int64_t jj = 0; jj < n; jj += kVecSize)
                (Vec::loadu(sr + jj) * (Vec::loadu(dpr + jj) - vd)).store(dpr + jj);
              ds_row(dpr, n, j0, i0 + r, bh, g, md, thr);
            }
            const float* pdrop = dr.on ? pd : s;
            gemm<true>(n, Dp, rows, pdrop, 1, kBK, dop, Dp, dva + j0 * Dp, Dp);
            gemm<true>(n, Dp, rows, dp, 1, kBK, qp, Dp, dka + j0 * Dp, Dp);
            gemm<true>(rows, Dp, n, dp, kBK, 1, kp + j0 * Dp, Dp, dqa, Dp);
          }
          T* dqrow = dq + (bh * g.Tq + i0) * D;
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t d = 0; d < D; ++d) dqrow[r * D + d] = static_cast<T>(dqa[r * Dp + d] * scale);
        }
        store_dkdv<T>(plan, g, grp, sp, dka, dva, dk_mul, dk, dv);
      }
    }
  });
  reduce_splits<T>(plan, g, dk_mul, dk, dv);
}

// ------------------------------------------------------------------ bfloat16 dot-product path
// bfloat16 inputs on a CPU with AVX512_BF16 (csrc/cpu/bf16dot.h): the same algorithm, tiles and
// work split as fwd_vec / bwd_vec, but every product runs on bf16 pairs with fp32 accumulation.
// Operands are packed once per tile (K, V per (b, kv head); Q, dO per query block; P, dS per
// tile) into the pair layouts the micro-kernel reads:
//   pairs along the head dim   [rows][Dq] bf16 (Dq = D rounded up to even): Q, dO as A of
//                              S = Q K^T and dP = dO V^T; K^T, V^T per key block
//                              [kb][Dq/2][kBK] words as their B
//   pairs along the row index  [rows/2][Dp] words: V (O += P V), K (dQ += dS K), Q (dK += dS^T Q),
//                              dO (dV += P^T dO) as B; P^T and dS^T as A ([rows/2][kBK] words,
//                              read through the transposing strides)
//   pairs along the key index  [rows][kBK] bf16: P (forward) and dS (dQ) as A.
// P and dS are rounded to bfloat16 for their products, as flash-attention does on GPUs; the
// scores, softmax statistics (max, sum, lse), Delta and every accumulator stay fp32, and the
// inputs enter the products unrounded (the scale is applied to the fp32 scores).
#if FASTATTN_BF16_DOT
using BF = c10::BFloat16;

// w[(kb * Pd + p) * kBK + jj] = (x[j][2p], x[j][2p+1]) for key j = kb * kBK + jj: x^T per key
// block in pairs along the head dim; zero past Tk and past D.
void pack_t_pairs(const BF* x, int64_t st, const Geom& g, int64_t Pd, uint32_t* w) {
  std::memset(w, 0, sizeof(uint32_t) * g.Tkp * Pd);
  for (int64_t j = 0; j < g.Tk; ++j) {
    const BF* row = x + j * st;
    uint32_t* dst = w + (j / kBK) * Pd * kBK + (j % kBK);
    for (int64_t p = 0; p < Pd; ++p) {
      const uint16_t hi = 2 * p + 1 < g.D ? row[2 * p + 1].x : uint16_t(0);
      dst[p * kBK] = bf16dot::pair(row[2 * p].x, hi);
    }
  }
}

// w[(r / 2) * Dp + d] = (x[r & ~1][d], x[r | 1][d]): `rows` rows of stride st in pairs along
// the row index, zero padded to `rows_pad` (even) rows and Dp columns.
void pack_row_pairs(const BF* x, int64_t st, int64_t rows, int64_t rows_pad, int64_t D,
                    int64_t Dp, uint32_t* w) {
  for (int64_t r = 0; r < rows_pad; r += 2) {
    uint32_t* dst = w + (r / 2) * Dp;
    int64_t d = 0;
    if (r < rows) {
      const BF* a = x + r * st;
      if (r + 1 < rows) {
        const BF* b = a + st;
        for (; d < D; ++d) dst[d] = bf16dot::pair(a[d].x, b[d].x);
      } else {
        for (; d < D; ++d) dst[d] = bf16dot::pair(a[d].x, 0);
      }
    }
    for (; d < Dp; ++d) dst[d] = 0;
  }
}

// dst[r][0:Dq] = x rows, the odd head-dim pad zero: pairs along the head dim.
void pack_rows_bf(const BF* x, int64_t st, int64_t rows, int64_t D, int64_t Dq, uint16_t* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(dst + r * Dq, x + r * st, sizeof(uint16_t) * D);
    if (Dq > D) dst[r * Dq + D] = 0;
  }
}

inline float bf_float(uint16_t x) {
  const uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

FA_BF16_TARGET void fwd_bf16_range(const Geom& g, const std::vector<int64_t>& bounds, int64_t tb,
                                   int64_t te, const BF* q, Strides qs, const BF* k, Strides ks,
                                   const BF* v, Strides vs, const Mods& md, float scale,
                                   const Dropout& dr, BF* out, float* lse) {
  const int64_t D = g.D, Dp = g.Dp, Pd = ceil_div(D, 2), Dq = 2 * Pd;
  const float qmul = scale * kLog2e;
  at::Tensor wbuf = at::empty({g.Tkp * Pd + (g.Tkp / 2) * Dp + kBQ * Pd + kBQ * kBK / 2}, at::kInt);
  at::Tensor fbuf = at::empty({kBQ * Dp + kBQ * kBK + 2 * kBQ}, at::kFloat);
  uint32_t* kt2 = reinterpret_cast<uint32_t*>(wbuf.data_ptr<int32_t>());  // K^T pairs (S)
  uint32_t* v2 = kt2 + g.Tkp * Pd;                                       // V row pairs (O)
  uint32_t* qa = v2 + (g.Tkp / 2) * Dp;                                  // Q [kBQ][Dq]
  uint32_t* pb = qa + kBQ * Pd;                                          // P [kBQ][kBK] bf16
  float* o = fbuf.data_ptr<float>();
  float* s = o + kBQ * Dp;
  float* mrow = s + kBQ * kBK;
  float* lrow = mrow + kBQ;
  const __m512 vq = _mm512_set1_ps(qmul);
  int64_t packed = -1;
  for (int64_t t = tb; t < te; ++t) {
    for (int64_t it = bounds[t]; it < bounds[t + 1]; ++it) {
      const int64_t qb = it % g.nQB, h = (it / g.nQB) % g.Hq, b = it / (g.nQB * g.Hq);
      const int64_t kvh = h / g.G, bh = b * g.Hq + h;
      if (packed != b * g.Hkv + kvh) {
        packed = b * g.Hkv + kvh;
        pack_t_pairs(k + b * ks.b + kvh * ks.h, ks.t, g, Pd, kt2);
        pack_row_pairs(v + b * vs.b + kvh * vs.h, vs.t, g.Tk, g.Tkp, D, Dp, v2);
      }
      const int64_t i0 = qb * kBQ, rows = g.rows_of(qb);
      pack_rows_bf(q + b * qs.b + h * qs.h + i0 * qs.t, qs.t, rows, D, Dq,
                   reinterpret_cast<uint16_t*>(qa));
      std::memset(o, 0, sizeof(float) * rows * Dp);
      for (int64_t r = 0; r < rows; ++r) {
        mrow[r] = kNegInf;
        lrow[r] = 0.f;
      }
      const int64_t kend = g.kend(i0, rows);
      for (int64_t j0 = g.kbeg(i0); j0 < kend; j0 += kBK) {
        const int64_t n = round_up(std::min<int64_t>(kBK, kend - j0), kVecSize);
        bf16dot::gemm<false>(rows, n, Pd, qa, Pd, 1, kt2 + (j0 / kBK) * Pd * kBK, kBK, s, kBK);
        const bool edge = g.edge(i0, rows, j0, n);
        for (int64_t r = 0; r < rows; ++r) {
          float* sr = s + r * kBK;
          // Plain vmaxps, not at::vec::maximum's NaN-propagating blend: a NaN score still
          // reaches the output through exp2 and the row sum.
          __m512 mx = _mm512_set1_ps(kNegInf);
          for (int64_t jj = 0; jj < n; jj += kVecSize) {
            const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(sr + jj), vq);
            _mm512_storeu_ps(sr + jj, x);
            mx = _mm512_max_ps(mx, x);
          }
          if (edge || md.any()) {
            modify_row(sr, n, j0, i0 + r, b, h, g, md, edge, nullptr);
            mx = _mm512_set1_ps(kNegInf);
            for (int64_t jj = 0; jj < n; jj += kVecSize) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sr + jj));
          }
          const float m_new = std::max(mrow[r], _mm512_reduce_max_ps(mx));
          const float m_safe = m_new == kNegInf ? 0.f : m_new;
          const Vec vm(m_safe);
          Vec sum(0.f);
          for (int64_t jj = 0; jj < n; jj += kVecSize) {
            const Vec p = exp2v(Vec::loadu(sr + jj) - vm);
            sum = sum + p;
            p.store(sr + jj);
          }
          const float alpha = std::exp2(mrow[r] - m_safe);
          lrow[r] = lrow[r] * alpha + hsum(sum);
          mrow[r] = m_new;
          if (alpha != 1.f) {
            float* orow = o + r * Dp;
            const Vec va(alpha);
            for (int64_t d = 0; d < Dp; d += kVecSize) (Vec::loadu(orow + d) * va).store(orow + d);
          }
          if (dr.on) dropout_row(dr, j0, i0 + r, bh, sr, sr, nullptr, n);
          bf16dot::round_row(sr, reinterpret_cast<uint16_t*>(pb) + r * kBK, n);
        }
        bf16dot::gemm<true>(rows, Dp, n / 2, pb, kBK / 2, 1, v2 + (j0 / 2) * Dp, Dp, o, Dp);
      }
      BF* orow_out = out + (bh * g.Tq + i0) * D;
      float* lse_out = lse + bh * g.Tq + i0;
      for (int64_t r = 0; r < rows; ++r) {
        const float l = lrow[r];
        const float inv = l > 0.f ? 1.f / l : 0.f;
        for (int64_t d = 0; d < D; ++d) orow_out[r * D + d] = static_cast<BF>(o[r * Dp + d] * inv);
        lse_out[r] = l > 0.f ? (mrow[r] + std::log2(l)) * kLn2 : kPosInf;
      }
    }
  }
}

void fwd_bf16dot(const Geom& g, const BF* q, Strides qs, const BF* k, Strides ks, const BF* v,
                 Strides vs, const Mods& md, float scale, const Dropout& dr, BF* out, float* lse) {
  const int64_t items = g.B * g.Hq * g.nQB;
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  const auto bounds = balanced_bounds(items, nt, [&](int64_t it) { return g.cost(it % g.nQB); });
  at::parallel_for(0, nt, 1, [&](int64_t tb, int64_t te) {
    fwd_bf16_range(g, bounds, tb, te, q, qs, k, ks, v, vs, md, scale, dr, out, lse);
  });
}

FA_BF16_TARGET void bwd_bf16_range(const Geom& g, const BwdPlan& plan, int64_t tb, int64_t te,
                                   const BF* dout, const BF* q, Strides qs, const BF* k,
                                   Strides ks, const BF* v, Strides vs, const BF* out,
                                   const float* lse, const Mods& md, float scale,
                                   const Dropout& dr, BF* dq, BF* dk, BF* dv) {
  const int64_t D = g.D, Dp = g.Dp, Pd = ceil_div(D, 2), Dq = 2 * Pd;
  const int64_t splits = plan.splits;
  const float qmul = scale * kLog2e;
  const int64_t half = kBQ / 2;
  at::Tensor wbuf = at::empty({2 * g.Tkp * Pd + (g.Tkp / 2) * Dp + 2 * kBQ * Pd + 2 * half * Dp +
                                   2 * half * kBK + kBQ * kBK / 2},
                              at::kInt);
  at::Tensor fbuf = at::empty({2 * g.Tkp * Dp + kBQ * Dp + 4 * kBQ * kBK + 2 * kBQ}, at::kFloat);
  uint32_t* kt2 = reinterpret_cast<uint32_t*>(wbuf.data_ptr<int32_t>());  // K^T pairs (S)
  uint32_t* vt2 = kt2 + g.Tkp * Pd;                                      // V^T pairs (dP)
  uint32_t* k2 = vt2 + g.Tkp * Pd;                                       // K row pairs (dQ)
  uint32_t* qa = k2 + (g.Tkp / 2) * Dp;                                  // Q [kBQ][Dq] (S)
  uint32_t* doa = qa + kBQ * Pd;                                         // dO [kBQ][Dq] (dP)
  uint32_t* q2 = doa + kBQ * Pd;                                         // Q row pairs (dK)
  uint32_t* do2 = q2 + half * Dp;                                        // dO row pairs (dV)
  uint32_t* pt2 = do2 + half * Dp;                                       // P^T, dropped (dV)
  uint32_t* st2 = pt2 + half * kBK;                                      // dS^T (dK)
  uint16_t* dsa = reinterpret_cast<uint16_t*>(st2 + half * kBK);         // dS [kBQ][kBK] (dQ)
  float* dka = fbuf.data_ptr<float>();  // [Tkp][Dp] accumulators
  float* dva = dka + g.Tkp * Dp;
  float* dqa = dva + g.Tkp * Dp;  // [kBQ][Dp]
  float* s = dqa + kBQ * Dp;      // [kBQ][kBK]: scores, then P
  float* dp = s + kBQ * kBK;      // dP, then dS
  float* pd = dp + kBQ * kBK;     // dropped P
  float* th = pd + kBQ * kBK;     // tanh of the softcap
  float* delta = th + kBQ * kBK;
  float* lse2 = delta + kBQ;
  const Vec vq(qmul);
  for (int64_t t = tb; t < te; ++t) {
    for (int64_t it = plan.bounds[t]; it < plan.bounds[t + 1]; ++it) {
      const int64_t grp = it / splits, sp = it % splits;
      const int64_t b = grp / g.Hkv, kvh = grp % g.Hkv;
      const BF* kg = k + b * ks.b + kvh * ks.h;
      pack_t_pairs(kg, ks.t, g, Pd, kt2);
      pack_t_pairs(v + b * vs.b + kvh * vs.h, vs.t, g, Pd, vt2);
      pack_row_pairs(kg, ks.t, g.Tk, g.Tkp, D, Dp, k2);
      std::memset(dka, 0, sizeof(float) * 2 * g.Tkp * Dp);
      for (int64_t pr = plan.split_bounds[sp]; pr < plan.split_bounds[sp + 1]; ++pr) {
        const int64_t h = kvh * g.G + pr / g.nQB, qb = pr % g.nQB;
        const int64_t bh = b * g.Hq + h;
        const int64_t i0 = qb * kBQ, rows = g.rows_of(qb), rows2 = round_up(rows, 2);
        const BF* qrow = q + b * qs.b + h * qs.h + i0 * qs.t;
        const BF* dorow = dout + (bh * g.Tq + i0) * D;
        const BF* orow = out + (bh * g.Tq + i0) * D;
        pack_rows_bf(qrow, qs.t, rows, D, Dq, reinterpret_cast<uint16_t*>(qa));
        pack_row_pairs(qrow, qs.t, rows, rows2, D, Dp, q2);
        pack_rows_bf(dorow, D, rows, D, Dq, reinterpret_cast<uint16_t*>(doa));
        pack_row_pairs(dorow, D, rows, rows2, D, Dp, do2);
        for (int64_t r = 0; r < rows; ++r) {
          // Delta in the order vdpbf16ps sums a dP element (per pair: odd product, then even),
          // so dP - Delta is exact where the two agree mathematically (a single visible key).
          const BF* dor = dorow + r * D;
          const BF* orr = orow + r * D;
          float acc = 0.f;
          for (int64_t p = 0; p < Pd; ++p) {
            if (2 * p + 1 < D) acc = acc + bf_float(dor[2 * p + 1].x) * bf_float(orr[2 * p + 1].x);
            acc = acc + bf_float(dor[2 * p].x) * bf_float(orr[2 * p].x);
          }
          delta[r] = acc;
          lse2[r] = lse[bh * g.Tq + i0 + r] * kLog2e;
        }
        std::memset(dqa, 0, sizeof(float) * rows * Dp);
        const int64_t kend = g.kend(i0, rows);
        for (int64_t j0 = g.kbeg(i0); j0 < kend; j0 += kBK) {
          const int64_t n = round_up(std::min<int64_t>(kBK, kend - j0), kVecSize);
          const int64_t kb = j0 / kBK;
          bf16dot::gemm<false>(rows, n, Pd, qa, Pd, 1, kt2 + kb * Pd * kBK, kBK, s, kBK);
          bf16dot::gemm<false>(rows, n, Pd, doa, Pd, 1, vt2 + kb * Pd * kBK, kBK, dp, kBK);
          const bool edge = g.edge(i0, rows, j0, n);
          for (int64_t r = 0; r < rows; ++r) {
            float* sr = s + r * kBK;
            float* dpr = dp + r * kBK;
            float* thr = th + r * kBK;
            for (int64_t jj = 0; jj < n; jj += kVecSize) (Vec::loadu(sr + jj) * vq).store(sr + jj);
            if (edge || md.any()) modify_row(sr, n, j0, i0 + r, b, h, g, md, edge, thr);
            const Vec vl(lse2[r]);
            for (int64_t jj = 0; jj < n; jj += kVecSize) exp2v(Vec::loadu(sr + jj) - vl).store(sr + jj);
            if (dr.on) dropout_row(dr, j0, i0 + r, bh, sr, pd + r * kBK, dpr, n);
            const Vec vd(delta[r]);
            for (int64_t jj = 0; jj < n; jj += kVecSize)
              (Vec::loadu(sr + jj) * (Vec::loadu(dpr + jj) - vd)).store(dpr + jj);
            ds_row(dpr, n, j0, i0 + r, bh, g, md, thr);
            bf16dot::round_row(dpr, dsa + r * kBK, n);
          }
          const float* pdrop = dr.on ? pd : s;
          for (int64_t r = 0; r < rows2; r += 2) {
            const bool two = r + 1 < rows;
            bf16dot::interleave_rows(pdrop + r * kBK, two ? pdrop + (r + 1) * kBK : nullptr,
                                     pt2 + (r / 2) * kBK, n);
            bf16dot::interleave_rows(dp + r * kBK, two ? dp + (r + 1) * kBK : nullptr,
                                     st2 + (r / 2) * kBK, n);
          }
          bf16dot::gemm<true>(n, Dp, rows2 / 2, pt2, 1, kBK, do2, Dp, dva + j0 * Dp, Dp);
          bf16dot::gemm<true>(n, Dp, rows2 / 2, st2, 1, kBK, q2, Dp, dka + j0 * Dp, Dp);
          bf16dot::gemm<true>(rows, Dp, n / 2, reinterpret_cast<const uint32_t*>(dsa), kBK / 2, 1,
                              k2 + (j0 / 2) * Dp, Dp, dqa, Dp);
        }
        BF* dqrow = dq + (bh * g.Tq + i0) * D;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t d = 0; d < D; ++d) dqrow[r * D + d] = static_cast<BF>(dqa[r * Dp + d] * scale);
      }
      store_dkdv<BF>(plan, g, grp, sp, dka, dva, scale, dk, dv);
    }
  }
}

void bwd_bf16dot(const Geom& g, const BF* dout, const BF* q, Strides qs, const BF* k, Strides ks,
                 const BF* v, Strides vs, const BF* out, const float* lse, const Mods& md,
                 float scale, const Dropout& dr, BF* dq, BF* dk, BF* dv) {
  const BwdPlan plan = bwd_plan(g);
  at::parallel_for(0, plan.nt, 1, [&](int64_t tb, int64_t te) {
    bwd_bf16_range(g, plan, tb, te, dout, q, qs, k, ks, v, vs, out, lse, md, scale, dr, dq, dk, dv);
  });
  reduce_splits<BF>(plan, g, scale, dk, dv);
}
#endif  // FASTATTN_BF16_DOT

// ------------------------------------------------------------------ float64 (gradcheck) path
// The same maths per element, in double, one query row at a time.
struct Mods64 {
  double cap = 0;                // softcap (natural units), 0 = none
  const double* bias = nullptr;  // as Mods
  int64_t sb = 0, sh = 0, sq = 0;
  const bool* kpm = nullptr;     // [B, Tk], true = padding
  double* dbias = nullptr;
};

// Score s_ij (softcap, bias; -inf when hidden) and, for the backward, tanh(t / c).
inline double score64(const Geom& g, const Mods64& md, int64_t b, int64_t h, int64_t i, int64_t j,
                      double t, double* th) {
  if (md.kpm != nullptr && md.kpm[b * g.Tk + j]) return -std::numeric_limits<double>::infinity();
  double sc = t;
  if (md.cap > 0) {
    const double x = std::tanh(t / md.cap);
    if (th != nullptr) *th = x;
    sc = md.cap * x;
  }
  if (md.bias != nullptr) sc += md.bias[b * md.sb + h * md.sh + i * md.sq + j];
  return sc;
}

void fwd_double(const Geom& g, const double* q, Strides qs, const double* k, Strides ks,
                const double* v, Strides vs, const Mods64& md, double scale, const Dropout& dr,
                double* out, double* lse) {
  const int64_t D = g.D;
  constexpr double kNegInf64 = -std::numeric_limits<double>::infinity();
  at::parallel_for(0, g.B * g.Hq * g.Tq, 16, [&](int64_t rb, int64_t re) {
    std::vector<double> p(g.Tk);
    for (int64_t row = rb; row < re; ++row) {
      const int64_t i = row % g.Tq, h = (row / g.Tq) % g.Hq, b = row / (g.Tq * g.Hq);
      const int64_t kvh = h / g.G, bh = b * g.Hq + h;
      const double* qi = q + b * qs.b + h * qs.h + i * qs.t;
      const double* kb = k + b * ks.b + kvh * ks.h;
      const double* vb = v + b * vs.b + kvh * vs.h;
      const int64_t lo = g.lo(i), hi = g.hi(i);
      double mx = kNegInf64;
      for (int64_t j = lo; j < hi; ++j) {
        double acc = 0;
        for (int64_t d = 0; d < D; ++d) acc += qi[d] * kb[j * ks.t + d];
        p[j] = score64(g, md, b, h, i, j, acc * scale, nullptr);
        mx = std::max(mx, p[j]);
      }
      double* o = out + row * D;
      for (int64_t d = 0; d < D; ++d) o[d] = 0;
      if (mx == kNegInf64) {
        lse[row] = std::numeric_limits<double>::infinity();
        continue;
      }
      double l = 0;
      for (int64_t j = lo; j < hi; ++j) {
        p[j] = std::exp(p[j] - mx);
        l += p[j];
      }
      for (int64_t j = lo; j < hi; ++j) {
        double w = p[j] / l;
        if (dr.on) w = dr.keep(j, i, bh) ? w / (1.0 - dr.p64) : 0.0;
        for (int64_t d = 0; d < D; ++d) o[d] += w * vb[j * vs.t + d];
      }
      lse[row] = mx + std::log(l);
    }
  });
}

void bwd_double(const Geom& g, const double* dout, const double* q, Strides qs, const double* k,
                Strides ks, const double* v, Strides vs, const double* out, const double* lse,
                const Mods64& md, double scale, const Dropout& dr, double* dq, double* dk,
                double* dv) {
  const int64_t D = g.D;
  const double inv_keep = 1.0 / (1.0 - dr.p64);
  // One (b, kv head) per task: its dK / dV rows (and its heads' dbias rows) are written by that
  // task only.
  at::parallel_for(0, g.B * g.Hkv, 1, [&](int64_t gb, int64_t ge) {
    for (int64_t grp = gb; grp < ge; ++grp) {
      const int64_t b = grp / g.Hkv, kvh = grp % g.Hkv;
      const double* kb = k + b * ks.b + kvh * ks.h;
      const double* vb = v + b * vs.b + kvh * vs.h;
      double* dkg = dk + grp * g.Tk * D;
      double* dvg = dv + grp * g.Tk * D;
      for (int64_t x = 0; x < g.Tk * D; ++x) dkg[x] = dvg[x] = 0;
      for (int64_t h = kvh * g.G; h < (kvh + 1) * g.G; ++h) {
        const int64_t bh = b * g.Hq + h;
        for (int64_t i = 0; i < g.Tq; ++i) {
          const int64_t row = bh * g.Tq + i;
          const double* qi = q + b * qs.b + h * qs.h + i * qs.t;
          const double* doi = dout + row * D;
          const double* oi = out + row * D;
          double* dqi = dq + row * D;
          for (int64_t d = 0; d < D; ++d) dqi[d] = 0;
          if (std::isinf(lse[row])) continue;
          double delta = 0;
          for (int64_t d = 0; d < D; ++d) delta += doi[d] * oi[d];
          for (int64_t j = g.lo(i); j < g.hi(i); ++j) {
            double sc = 0, dpd = 0;
            for (int64_t d = 0; d < D; ++d) {
              sc += qi[d] * kb[j * ks.t + d];
              dpd += doi[d] * vb[j * vs.t + d];
            }
            double th = 0;
            const double pj = std::exp(score64(g, md, b, h, i, j, sc * scale, &th) - lse[row]);
            const double keep = dr.on ? (dr.keep(j, i, bh) ? inv_keep : 0.0) : 1.0;
            const double ds = pj * (dpd * keep - delta);
            if (md.dbias != nullptr) md.dbias[row * g.Tk + j] = ds;
            const double dt = md.cap > 0 ? ds * (1.0 - th * th) : ds;
            for (int64_t d = 0; d < D; ++d) {
              dvg[j * D + d] += pj * keep * doi[d];
              dkg[j * D + d] += dt * scale * qi[d];
              dqi[d] += dt * scale * kb[j * ks.t + d];
            }
          }
        }
      }
    }
  });
}

// ------------------------------------------------------------------ validation
at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

Geom check_qkv(const char* fn, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const std::optional<at::Tensor>& mask, double dropout_p) {
  TORCH_CHECK(q.dim() == 4, fn, ": q must be 4-D [B, Hq, Tq, D], got ", q.dim(), "-D ", q.sizes());
  TORCH_CHECK(k.dim() == 4, fn, ": k must be 4-D [B, Hkv, Tk, D], got ", k.dim(), "-D ", k.sizes());
  TORCH_CHECK(v.dim() == 4, fn, ": v must be 4-D [B, Hkv, Tk, D], got ", v.dim(), "-D ", v.sizes());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kDouble, fn,
              ": q must be float32, bfloat16 or float64, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, fn,
              ": q, k and v must have the same dtype, got ", dt, ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), fn,
              ": q, k and v must be CPU tensors, got ", q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK(k.sizes() == v.sizes(), fn, ": k and v must have the same shape, got ", k.sizes(),
              " and ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0), fn, ": q and k must have the same batch size, got ",
              q.size(0), " and ", k.size(0));
  TORCH_CHECK(k.size(3) == q.size(3), fn, ": q and k must have the same head dim, got ",
              q.size(3), " and ", k.size(3));
  const int64_t D = q.size(3);
  TORCH_CHECK(D >= 1 && D <= kMaxHeadDim, fn, ": head dim must be in [1, ", kMaxHeadDim,
              "], got ", D);
  const int64_t Hq = q.size(1), Hkv = k.size(1);
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, fn, ": query heads (", Hq,
              ") must be a multiple of kv heads (", Hkv, ")");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, fn, ": dropout_p must be in [0, 1), got ",
              dropout_p);
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, fn, ": key_padding_mask must be bool, got ",
                mask->scalar_type());
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == q.size(0) && mask->size(1) == k.size(2), fn,
                ": key_padding_mask must have shape [B, Tk] = [", q.size(0), ", ", k.size(2),
                "], got ", mask->sizes());
    TORCH_CHECK(mask->device().is_cpu(), fn, ": key_padding_mask must be a CPU tensor, got ",
                mask->device());
  }
  Geom g;
  g.B = q.size(0);
  g.Hq = Hq;
  g.Hkv = Hkv;
  g.G = Hq / Hkv;
  g.Tq = q.size(2);
  g.Tk = k.size(2);
  g.D = D;
  g.Dp = round_up(D, kVecSize);
  g.nQB = ceil_div(g.Tq, kBQ);
  g.nKB = ceil_div(g.Tk, kBK);
  g.Tkp = g.nKB * kBK;
  return g;
}

// Additive key-padding rows [B][Tkp]: 0 for a key, -inf for padding and for columns >= Tk.
at::Tensor mask_bias(const std::optional<at::Tensor>& mask, const Geom& g) {
  if (!mask.has_value()) return at::Tensor();
  at::Tensor m = mask->contiguous();
  at::Tensor bias = at::full({g.B, g.Tkp}, kNegInf, at::kFloat);
  const bool* mp = m.data_ptr<bool>();
  float* bp = bias.data_ptr<float>();
  for (int64_t b = 0; b < g.B; ++b)
    for (int64_t j = 0; j < g.Tk; ++j) bp[b * g.Tkp + j] = mp[b * g.Tk + j] ? kNegInf : 0.f;
  return bias;
}

// The window, softcap and bias arguments: checked, then set into g.
void check_features(const char* fn, Geom& g, const at::Tensor& q,
                    const std::optional<at::Tensor>& bias, double scale, double softcap,
                    int64_t wl, int64_t wr, int64_t diag_offset) {
  TORCH_CHECK(std::isfinite(scale), fn, ": scale must be finite, got ", scale);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, fn,
              ": softcap must be finite and >= 0 (0 = none), got ", softcap);
  TORCH_CHECK(wl >= -1 && wr >= -1, fn, ": window_left and window_right must be >= -1 (-1 = ",
              "unbounded), got ", wl, " and ", wr);
  TORCH_CHECK(std::abs(diag_offset) <= (int64_t(1) << 40), fn, ": diag_offset out of range: ",
              diag_offset);
  g.wl = wl;
  g.wr = wr;
  g.off = diag_offset;
  if (bias.has_value()) {
    const auto want = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(bias->scalar_type() == want, fn, ": bias must be ", want, " for ",
                q.scalar_type(), " inputs, got ", bias->scalar_type());
    TORCH_CHECK(bias->device().is_cpu(), fn, ": bias must be a CPU tensor, got ", bias->device());
    TORCH_CHECK(bias->dim() == 4 && bias->size(0) == g.B && bias->size(1) == g.Hq &&
                    bias->size(2) == g.Tq && bias->size(3) == g.Tk,
                fn, ": bias must have shape [B, Hq, Tq, Tk] = [", g.B, ", ", g.Hq, ", ", g.Tq,
                ", ", g.Tk, "] (broadcast dims with stride 0), got ", bias->sizes());
    TORCH_CHECK(bias->stride(3) == 1 || g.Tk == 1, fn, ": bias must have unit stride on the ",
                "key dim, got strides ", bias->strides());
  }
}

template <typename S>
void set_bias(const std::optional<at::Tensor>& bias, S& md) {
  if (!bias.has_value()) return;
  using E = std::remove_const_t<std::remove_pointer_t<decltype(md.bias)>>;
  md.bias = bias->data_ptr<E>();
  md.sb = bias->stride(0);
  md.sh = bias->stride(1);
  md.sq = bias->stride(2);
}

}  // namespace

bool attention_bf16_dot_available() { return FASTATTN_BF16_DOT && cpu_has_avx512_bf16(); }
bool bf16_hw_convert() { return kHwBf16Cvt; }

std::tuple<at::Tensor, at::Tensor> attention_fwd_features(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& bias,
    double scale, double softcap, int64_t window_left, int64_t window_right, int64_t diag_offset,
    double dropout_p, int64_t seed, int64_t offset) {
  const char* fn = "fastattn_C.attention_fwd";
  Geom g = check_qkv(fn, q_in, k_in, v_in, key_padding_mask, dropout_p);
  check_features(fn, g, q_in, bias, scale, softcap, window_left, window_right, diag_offset);
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in),
                   v = last_dim_contiguous(v_in);
  const auto dt = q.scalar_type();
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({g.B, g.Hq, g.Tq, g.D}, q.options());
  at::Tensor lse = at::empty({g.B, g.Hq, g.Tq}, q.options().dtype(acc));
  if (out.numel() == 0) {
    lse.fill_(std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  const Dropout dr(dropout_p, seed, offset);
  if (dt == at::kDouble) {
    at::Tensor m = key_padding_mask.has_value() ? key_padding_mask->contiguous() : at::Tensor();
    Mods64 md;
    md.cap = softcap;
    md.kpm = m.defined() ? m.data_ptr<bool>() : nullptr;
    set_bias(bias, md);
    fwd_double(g, q.data_ptr<double>(), Strides(q), k.data_ptr<double>(), Strides(k),
               v.data_ptr<double>(), Strides(v), md, scale, dr, out.data_ptr<double>(),
               lse.data_ptr<double>());
    return {out, lse};
  }
  const at::Tensor kpm = mask_bias(key_padding_mask, g);
  Mods md;
  md.cap2 = static_cast<float>(softcap * kLog2e);
  md.kpm = kpm.defined() ? kpm.data_ptr<float>() : nullptr;
  set_bias(bias, md);
  if (dt == at::kFloat) {
    fwd_vec<float>(g, q.data_ptr<float>(), Strides(q), k.data_ptr<float>(), Strides(k),
                   v.data_ptr<float>(), Strides(v), md, static_cast<float>(scale), dr,
                   out.data_ptr<float>(), lse.data_ptr<float>());
  } else {
    using BF = c10::BFloat16;
#if FASTATTN_BF16_DOT
    if (bf16_dot_usable()) {
      fwd_bf16dot(g, q.data_ptr<BF>(), Strides(q), k.data_ptr<BF>(), Strides(k), v.data_ptr<BF>(),
                  Strides(v), md, static_cast<float>(scale), dr, out.data_ptr<BF>(),
                  lse.data_ptr<float>());
      return {out, lse};
    }
#endif
    fwd_vec<BF>(g, q.data_ptr<BF>(), Strides(q), k.data_ptr<BF>(), Strides(k), v.data_ptr<BF>(),
                Strides(v), md, static_cast<float>(scale), dr, out.data_ptr<BF>(),
                lse.data_ptr<float>());
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_features(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& bias,
    double scale, double softcap, int64_t window_left, int64_t window_right, int64_t diag_offset,
    double dropout_p, int64_t seed, int64_t offset, bool need_bias_grad) {
  const char* fn = "fastattn_C.attention_bwd";
  Geom g = check_qkv(fn, q_in, k_in, v_in, key_padding_mask, dropout_p);
  check_features(fn, g, q_in, bias, scale, softcap, window_left, window_right, diag_offset);
  TORCH_CHECK(!need_bias_grad || bias.has_value(), fn, ": need_bias_grad without a bias");
  const auto dt = q_in.scalar_type();
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(dout_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(), fn,
              ": dout and out must have q's shape ", q_in.sizes(), ", got ", dout_in.sizes(),
              " and ", out_in.sizes());
  TORCH_CHECK(dout_in.scalar_type() == dt && out_in.scalar_type() == dt, fn,
              ": dout and out must have q's dtype ", dt, ", got ", dout_in.scalar_type(), " and ",
              out_in.scalar_type());
  TORCH_CHECK(dout_in.device().is_cpu() && out_in.device().is_cpu() && lse_in.device().is_cpu(),
              fn, ": dout, out and lse must be CPU tensors");
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == g.B && lse_in.size(1) == g.Hq &&
                  lse_in.size(2) == g.Tq,
              fn, ": lse must have shape [B, Hq, Tq] = [", g.B, ", ", g.Hq, ", ", g.Tq, "], got ",
              lse_in.sizes());
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat || lse_in.scalar_type() == at::kDouble, fn,
              ": lse must be float32 (or float64 for float64 inputs), got ", lse_in.scalar_type());
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in),
                   v = last_dim_contiguous(v_in);
  const at::Tensor dout = dout_in.contiguous(), out = out_in.contiguous();
  const at::Tensor lse = lse_in.to(acc).contiguous();
  at::Tensor dq = at::empty({g.B, g.Hq, g.Tq, g.D}, q.options());
  at::Tensor dk = at::empty({g.B, g.Hkv, g.Tk, g.D}, q.options());
  at::Tensor dv = at::empty({g.B, g.Hkv, g.Tk, g.D}, q.options());
  // dS for the bias gradient: zero where no tile is visited (hidden keys have dS = 0).
  at::Tensor dbias = need_bias_grad ? at::zeros({g.B, g.Hq, g.Tq, g.Tk}, q.options().dtype(acc))
                                    : at::empty({0}, q.options().dtype(acc));
  if (dq.numel() == 0 || dk.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv, dbias};
  }
  const Dropout dr(dropout_p, seed, offset);
  if (dt == at::kDouble) {
    at::Tensor m = key_padding_mask.has_value() ? key_padding_mask->contiguous() : at::Tensor();
    Mods64 md;
    md.cap = softcap;
    md.kpm = m.defined() ? m.data_ptr<bool>() : nullptr;
    set_bias(bias, md);
    md.dbias = need_bias_grad ? dbias.data_ptr<double>() : nullptr;
    bwd_double(g, dout.data_ptr<double>(), q.data_ptr<double>(), Strides(q), k.data_ptr<double>(),
               Strides(k), v.data_ptr<double>(), Strides(v), out.data_ptr<double>(),
               lse.data_ptr<double>(), md, scale, dr, dq.data_ptr<double>(),
               dk.data_ptr<double>(), dv.data_ptr<double>());
    return {dq, dk, dv, dbias};
  }
  const at::Tensor kpm = mask_bias(key_padding_mask, g);
  Mods md;
  md.cap2 = static_cast<float>(softcap * kLog2e);
  md.kpm = kpm.defined() ? kpm.data_ptr<float>() : nullptr;
  set_bias(bias, md);
  md.dbias = need_bias_grad ? dbias.data_ptr<float>() : nullptr;
  if (dt == at::kFloat) {
    bwd_vec<float>(g, dout.data_ptr<float>(), q.data_ptr<float>(), Strides(q),
                   k.data_ptr<float>(), Strides(k), v.data_ptr<float>(), Strides(v),
                   out.data_ptr<float>(), lse.data_ptr<float>(), md, static_cast<float>(scale), dr,
                   dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>());
  } else {
    using BF = c10::BFloat16;
#if FASTATTN_BF16_DOT
    if (bf16_dot_usable()) {
      bwd_bf16dot(g, dout.data_ptr<BF>(), q.data_ptr<BF>(), Strides(q), k.data_ptr<BF>(),
                  Strides(k), v.data_ptr<BF>(), Strides(v), out.data_ptr<BF>(),
                  lse.data_ptr<float>(), md, static_cast<float>(scale), dr, dq.data_ptr<BF>(),
                  dk.data_ptr<BF>(), dv.data_ptr<BF>());
      return {dq, dk, dv, dbias};
    }
#endif
    bwd_vec<BF>(g, dout.data_ptr<BF>(), q.data_ptr<BF>(), Strides(q), k.data_ptr<BF>(), Strides(k),
                v.data_ptr<BF>(), Strides(v), out.data_ptr<BF>(), lse.data_ptr<float>(), md,
                static_cast<float>(scale), dr, dq.data_ptr<BF>(), dk.data_ptr<BF>(),
                dv.data_ptr<BF>());
  }
  return {dq, dk, dv, dbias};
}

// The original schemas (shared with the CUDA kernels): no window but causal, no softcap, no bias.
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v,
                                                 const std::optional<at::Tensor>& key_padding_mask,
                                                 bool causal, double scale, double dropout_p,
                                                 int64_t seed, int64_t offset) {
  const int64_t off = k.dim() == 4 && q.dim() == 4 ? k.size(2) - q.size(2) : 0;
  return attention_fwd_features(q, k, v, key_padding_mask, std::nullopt, scale, 0.0, -1,
                                causal ? 0 : -1, off, dropout_p, seed, offset);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask,
    bool causal, double scale, double dropout_p, int64_t seed, int64_t offset) {
  const int64_t off = k.dim() == 4 && q.dim() == 4 ? k.size(2) - q.size(2) : 0;
  auto [dq, dk, dv, dbias] =
      attention_bwd_features(dout, q, k, v, out, lse, key_padding_mask, std::nullopt, scale, 0.0,
                             -1, causal ? 0 : -1, off, dropout_p, seed, offset, false);
  return {dq, dk, dv};
}

}  // namespace cpu
}  // namespace fastattn
