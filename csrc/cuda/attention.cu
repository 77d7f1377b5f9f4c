// Scaled dot-product attention on the GPU, FlashAttention-2 style: forward (out, lse) and
// backward (dq, dk, dv). Framework-free (launchers in kernels.cuh); contract of attention_fwd /
// attention_bwd in csrc/ops.cpp.
//
// Maths, per (batch b, query head h, kv head hk = h / (Hq / Hkv)), S = scale * Q K^T:
//   visible(i, j) = j < Tk, !key_padding_mask[b, j], and (causal => j <= i + Tk - Tq)
//   m_i = max_j S_ij, l_i = sum_j exp(S_ij - m_i) over visible j;  lse_i = m_i + log l_i
//   P_ij = exp(S_ij - lse_i);  Z_ij = keep(b, h, i, j) / (1 - p) (1 without dropout)
//   out_i = sum_j P_ij Z_ij V_j;  a row with no visible key: out = 0, lse = +inf
// Forward streams key blocks with the online softmax: m and l are updated per block and the
// float accumulator O is rescaled by exp(m_old - m_new) before O += P~ V_block.
// Backward, with Delta_i = sum_d dO_id O_id (preprocess kernel):
//   dV = (P o Z)^T dO,  dP = dO V^T,  dS = P o (dP o Z - Delta),  dQ = scale dS K,  dK = scale dS^T Q
//   dK/dV kernel: one block per (key block, b, hk) walks the query blocks of every query head
//   of its group (GQA: dK, dV sum over the group without atomics); dQ kernel: one block per
//   (query block, b, h) walks the key blocks. Both recompute P from Q, K and lse.
// Dropout: keep(b, h, i, j) from w = output word (j & 3) of philox4x32_10(counter = (j >> 2,
//   i, b*Hq + h, offset mod 2^32), key = (seed mod 2^32, seed >> 32)): u = (w >> 8) * 2^-24,
//   keep iff u >= p, compared as integers: (w >> 8) >= ceil(p * 2^24), the threshold taken on
//   the host from the double p (dropout_threshold_of). One call serves keys 4k .. 4k+3. Every
//   backend draws the same mask; the backward regenerates it.
//
// Two sets of kernels. attention_fwd / attention_bwd send fp16 / bf16 to the FA2 kernels and
// fp32 to the simple ones; both sets stay callable (attention_*_simple / _fa2) so that the host
// emulation checks each against float64 and against the other.
//
// FA2 kernels (fp16 / bf16; tiles and shared-memory layouts in attention_tiles.h):
// - 4 warps per block. Forward: warp w owns 16 query rows of a 64-row block (the key/value
//   head's K, V tiles are shared); backward: warp w owns 16 keys of a 64-key block.
// - Products on tensor cores by mma.sync.m16n8k16 (f32 accumulate) with operands from ldmatrix
//   (.trans for the operand whose reduction dim is the row dim in memory: V, dO, Q, K). S, P,
//   O (forward) and S^T, dP^T, dK, dV (backward) never leave registers: an accumulator
//   fragment of S becomes the A fragment of P V in place (same lane / row / column map).
// - The streamed tiles (forward K, V; backward Q, dO, lse, Delta) are double-buffered in
//   shared memory by cp.async (16-byte chunks, when D, the strides and pointers allow; plain
//   copies otherwise): the next tile's copy is in flight while this one is computed; two
//   barriers per tile.
// - Masks (causal, key tail, padding) only on tiles that they cut; others take a mask-free path.
// - Results (O; dK, dV) are rounded into shared memory and leave as 16-byte row stores.
// - Online softmax on the fragments: each row lives in the 4 lanes of a quad, so the row max /
//   sum are two __shfl_xor_sync steps; O and l are rescaled in registers.
// - dQ: dS goes through shared memory (rounded to T), each block adds its dS K into an fp32
//   [B, Hq, Tq, D] workspace with atomicAdd, a last kernel rounds it (the FA2 arrangement: one
//   pass over the key blocks instead of a dQ kernel that recomputes S and dP; not bitwise
//   reproducible). Head dims padded to 16, 32, 64, 128 or 256 (kAttentionFa2MaxHeadDim); at
//   256 the backward runs 8 warps (attention_tiles.h: P and dS through shared memory, dK / dV
//   split by head-dim half).
// - Dropout (the mapping every backend shares: key j takes word j & 3 of the call on counter
//   j >> 2), one call per 4 elements: each lane draws one call and the four keep bits reach
//   the lanes that hold those elements by four __ballot_sync (dropout_ballots). Forward: lane
//   (g, t) draws row g + 8 (t & 1), keys 4 (t >> 1) .. of each 8-key tile; its element (row
//   g + 8 h2, key 2t + x) reads lane 4g + (t & 2) + h2's call. Backward (S^T pairs adjacent
//   queries, not keys): bits drawn before the products, see the kernel (at Dp = 128 its dQ
//   product runs in two column passes to leave the registers for it). (Was: 1 call per 2
//   elements forward, 1 per element backward.)
//
// Simple kernels (fp32; the first 16-bit implementation, kept as a reference):
// 128 threads = 4 warps per block, everything staged in shared memory:
// - Head dims are padded up to Dp in {16, 32, 64, 128} (template parameter; 128 is also their
//   limit, kAttentionSimpleMaxHeadDim); the padding
//   columns are loaded as zeros and never written back.
// - Tiles (rows of Q x rows of K): forward 64 x 64 (fp32 with Dp = 128: 64 x 32), dQ 64 x 64
//   (Dp = 128: 64 x 32; fp32 Dp = 128: 32 x 32), dK/dV 64 x 64 (Dp = 128 or fp32: 64 x 32;
//   fp32 Dp = 128: 32 x 32): the largest tiles whose shared memory stays under ~150 KB (sm_80
//   allows 163 KB per block). The sizes of every buffer are compile-time (static_asserted).
// - fp16 / bf16: every product runs on tensor cores through nvcuda::wmma 16x16x16 fragments,
//   accumulators (O, dQ, dK, dV) in fp32 shared memory. fp32: the same products by plain FMAs
//   from shared memory (no TF32, which would be less accurate than PyTorch's fp32 attention).
// - The softmax step works on rows: a warp per row, lanes across the key block, shuffles for
//   the row max and sum. Rows of shared-memory tiles are padded by 16 bytes (bank spread; wmma
//   needs 32-byte aligned fragments and a leading dimension multiple of 16 bytes).
// - Global loads are 16-byte vectors when D, the strides and the pointers allow it.
// - Dropout: while a tile loads, the block draws its keep bits, one call per 4 keys, into a
//   [BM][BN / 4] byte array (draw_keep_tile, noinline: inlined, it made ptxas spill in the
//   16-bit instances); the softmax steps read a bit per element.
//
// Compile-check (registers, spills, shared memory): bash scripts/cuda_check.sh
// Host emulation: pytest tests/test_cuda_emu.py (bash tests/cuda_emu/run.sh fa2: all cases)
// Test (needs a GPU): pytest tests/test_cuda.py -k attention
#include "common.cuh"
#include "attention_tiles.h"

#include <mma.h>

#include <algorithm>
#include <type_traits>

namespace fastattn {
namespace cuda {
namespace {

using namespace detail;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr size_t kMaxSmem = 160 * 1024;  // under sm_80's 163 KB opt-in limit per block
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = __builtin_huge_valf();

constexpr size_t align128(size_t n) { return (n + 127) / 128 * 128; }

// Tile shapes and shared-memory row strides for element type T and padded head dim Dp.
template <typename T, int Dp>
struct Cfg {
  static constexpr bool k16 = sizeof(T) == 2;
  static constexpr int kPadT = 16 / sizeof(T);  // 16 bytes of padding per row
  static constexpr int kLdT = Dp + kPadT;       // [rows][Dp] tiles of T
  static constexpr int kLdF = Dp + 4;           // [rows][Dp] float accumulators

  static constexpr int kFwdBM = 64;
  static constexpr int kFwdBN = (!k16 && Dp == 128) ? 32 : 64;
  static constexpr int kDqBM = (!k16 && Dp == 128) ? 32 : 64;
  static constexpr int kDqBN = Dp == 128 ? 32 : 64;
  static constexpr int kKvBM = (!k16 && Dp == 128) ? 32 : 64;
  static constexpr int kKvBN = (Dp == 128 || !k16) ? 32 : 64;
};

// Shared-memory layouts: byte offsets of each buffer, each 128-byte aligned.
template <typename T, int Dp>
struct FwdSmem {
  using C = Cfg<T, Dp>;
  static constexpr int BM = C::kFwdBM, BN = C::kFwdBN;
  static constexpr int LDS = BN + 4, LDP = BN + C::kPadT;
  static constexpr size_t q = 0;
  static constexpr size_t k = q + align128(sizeof(T) * BM * C::kLdT);
  static constexpr size_t v = k + align128(sizeof(T) * BN * C::kLdT);
  static constexpr size_t s = v + align128(sizeof(T) * BN * C::kLdT);
  static constexpr size_t p = s + align128(sizeof(float) * BM * LDS);
  static constexpr size_t o = p + align128(sizeof(T) * BM * LDP);
  static constexpr size_t m = o + align128(sizeof(float) * BM * C::kLdF);
  static constexpr size_t l = m + align128(sizeof(float) * BM);
  static constexpr size_t key_ok = l + align128(sizeof(float) * BM);
  static constexpr size_t keep = key_ok + align128(BN);  // [BM][BN / 4] dropout keep nibbles
  static constexpr size_t bytes = keep + align128(BM * BN / 4);
  static_assert(bytes <= kMaxSmem, "forward tile does not fit in shared memory");
};

template <typename T, int Dp>
struct DqSmem {
  using C = Cfg<T, Dp>;
  static constexpr int BM = C::kDqBM, BN = C::kDqBN;
  static constexpr int LDS = BN + 4, LDP = BN + C::kPadT;
  static constexpr size_t q = 0;
  static constexpr size_t dout = q + align128(sizeof(T) * BM * C::kLdT);
  static constexpr size_t k = dout + align128(sizeof(T) * BM * C::kLdT);
  static constexpr size_t v = k + align128(sizeof(T) * BN * C::kLdT);
  static constexpr size_t s = v + align128(sizeof(T) * BN * C::kLdT);
  static constexpr size_t dp = s + align128(sizeof(float) * BM * LDS);
  static constexpr size_t ds = dp + align128(sizeof(float) * BM * LDS);
  static constexpr size_t dq = ds + align128(sizeof(T) * BM * LDP);
  static constexpr size_t lse = dq + align128(sizeof(float) * BM * C::kLdF);
  static constexpr size_t delta = lse + align128(sizeof(float) * BM);
  static constexpr size_t key_ok = delta + align128(sizeof(float) * BM);
  static constexpr size_t keep = key_ok + align128(BN);  // [BM][BN / 4] dropout keep nibbles
  static constexpr size_t bytes = keep + align128(BM * BN / 4);
  static_assert(bytes <= kMaxSmem, "dQ tile does not fit in shared memory");
};

template <typename T, int Dp>
struct KvSmem {
  using C = Cfg<T, Dp>;
  static constexpr int BM = C::kKvBM, BN = C::kKvBN;
  static constexpr int LDS = BN + 4, LDP = BN + C::kPadT;
  static constexpr size_t k = 0;
  static constexpr size_t v = k + align128(sizeof(T) * BN * C::kLdT);
  static constexpr size_t q = v + align128(sizeof(T) * BN * C::kLdT);
  static constexpr size_t dout = q + align128(sizeof(T) * BM * C::kLdT);
  static constexpr size_t s = dout + align128(sizeof(T) * BM * C::kLdT);
  static constexpr size_t dp = s + align128(sizeof(float) * BM * LDS);
  static constexpr size_t pd = dp + align128(sizeof(float) * BM * LDS);
  static constexpr size_t ds = pd + align128(sizeof(T) * BM * LDP);
  static constexpr size_t dk = ds + align128(sizeof(T) * BM * LDP);
  static constexpr size_t dv = dk + align128(sizeof(float) * BN * C::kLdF);
  static constexpr size_t lse = dv + align128(sizeof(float) * BN * C::kLdF);
  static constexpr size_t delta = lse + align128(sizeof(float) * BM);
  static constexpr size_t key_ok = delta + align128(sizeof(float) * BM);
  static constexpr size_t keep = key_ok + align128(BN);  // [BM][BN / 4] dropout keep nibbles
  static constexpr size_t bytes = keep + align128(BM * BN / 4);
  static_assert(bytes <= kMaxSmem, "dK/dV tile does not fit in shared memory");
};

// ------------------------------------------------------------------ dropout
// Philox4x32-10 on counter (c0, c1, c2, c3) with key (k0, k1): the four output words.
__device__ __forceinline__ uint4 philox4(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                         uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t c0_old = c0, c2_old = c2;
    c0 = __umulhi(0xCD9E8D57u, c2_old) ^ c1 ^ k0;
    c2 = __umulhi(0xD2511F53u, c0_old) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * c2_old;
    c3 = 0xD2511F53u * c0_old;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return make_uint4(c0, c1, c2, c3);
}

// The call serving keys 4 * (j >> 2) .. + 3 of row (bh, i), bh = b * Hq + h (h: query head):
// key 4 * (j >> 2) + w reads word w.
__device__ __forceinline__ uint4 dropout_words(uint64_t seed, uint64_t offset, uint32_t bh, int i,
                                               int j) {
  return philox4(static_cast<uint32_t>(j) >> 2, static_cast<uint32_t>(i), bh,
                 static_cast<uint32_t>(offset & 0xFFFFFFFFull),
                 static_cast<uint32_t>(seed & 0xFFFFFFFFull),
                 static_cast<uint32_t>((seed >> 32) & 0xFFFFFFFFull));
}

// keep iff u = (w >> 8) * 2^-24 >= p for the element's word w, i.e. (w >> 8) >= thr =
// ceil(p * 2^24) (dropout_threshold_of: exact, the same integers as every backend).
__device__ __forceinline__ bool dropout_keep_word(uint32_t w, uint32_t thr) {
  return (w >> 8) >= thr;
}

// The keep bits of a call's four words across the warp: bit l of .x / .y / .z / .w is the keep
// of word 0 / 1 / 2 / 3 of lane l's call (every lane takes part). The FA2 kernels share calls
// this way: each lane draws one call for four elements of the warp, four ballots hand the bits
// to the lanes that hold those elements (a ballot is one vote; a call is 10 rounds of 2 mul.hi).
__device__ __forceinline__ uint4 dropout_ballots(uint4 w, uint32_t thr) {
  return make_uint4(__ballot_sync(0xffffffffu, dropout_keep_word(w.x, thr)),
                    __ballot_sync(0xffffffffu, dropout_keep_word(w.y, thr)),
                    __ballot_sync(0xffffffffu, dropout_keep_word(w.z, thr)),
                    __ballot_sync(0xffffffffu, dropout_keep_word(w.w, thr)));
}

// The simple kernels' dropout keep bits of the tile (i0 .., j0 ..), by the whole block, one
// call per 4 keys: bit w of sKeep[r * (BN / 4) + c / 4] keeps (i0 + r, j0 + 4 (c / 4) + w)
// (j0 a multiple of 4). Drawn while the tiles load, read after the barrier that follows.
template <int BM, int BN>
__device__ __noinline__ void draw_keep_tile(const uint64_t seed, const uint64_t offset,
                                            const uint32_t thr, const uint32_t bh, const int i0,
                                            const int j0, uint8_t* __restrict__ sKeep) {
  static_assert(BN % 4 == 0, "whole calls per row");
  for (int e = threadIdx.x; e < BM * (BN / 4); e += kThreads) {
    const int r = e / (BN / 4), c4 = e % (BN / 4);
    const uint4 w = dropout_words(seed, offset, bh, i0 + r, j0 + 4 * c4);
    sKeep[e] = static_cast<uint8_t>(
        static_cast<unsigned>(dropout_keep_word(w.x, thr)) |
        (static_cast<unsigned>(dropout_keep_word(w.y, thr)) << 1) |
        (static_cast<unsigned>(dropout_keep_word(w.z, thr)) << 2) |
        (static_cast<unsigned>(dropout_keep_word(w.w, thr)) << 3));
  }
}

template <int BN>
__device__ __forceinline__ bool keep_bit(const uint8_t* sKeep, int r, int c) {
  return ((sKeep[r * (BN / 4) + (c >> 2)] >> (c & 3)) & 1u) != 0;
}

__device__ __forceinline__ bool causal_ok(bool causal, int i, int j, int Tq, int Tk) {
  return !causal || static_cast<long long>(j) <= static_cast<long long>(i) + Tk - Tq;
}

// ------------------------------------------------------------------ shared-memory products
// C[M][N] (+)= A[M][K] B[K][N], all in shared memory, by the whole block.
//   A(m, k) = TA ? A[k * lda + m] : A[m * lda + k];  B(k, n) = TB ? B[n * ldb + k] : B[k * ldb + n]
//   C: float, row-major with leading dimension ldc.
// fp16 / bf16: wmma 16x16x16 on tensor cores, fp32 accumulate; each warp owns 16x16 tiles of C.
// fp32: plain FMAs, one output element per thread at a time.
template <typename T, int M, int N, int K, bool TA, bool TB, bool ACC>
__device__ __forceinline__ void block_gemm(const T* __restrict__ A, int lda,
                                           const T* __restrict__ B, int ldb,
                                           float* __restrict__ C, int ldc) {
  static_assert(M % 16 == 0 && N % 16 == 0 && K % 16 == 0, "tiles are multiples of 16");
  if constexpr (std::is_same_v<T, float>) {
    for (int e = threadIdx.x; e < M * N; e += kThreads) {
      const int m = e / N, n = e % N;
      float acc = ACC ? C[m * ldc + n] : 0.f;
#pragma unroll 8
      for (int k = 0; k < K; ++k) {
        const float a = TA ? A[k * lda + m] : A[m * lda + k];
        const float b = TB ? B[n * ldb + k] : B[k * ldb + n];
        acc = fmaf(a, b, acc);
      }
      C[m * ldc + n] = acc;
    }
  } else {
    namespace wmma = nvcuda::wmma;
    using LA = std::conditional_t<TA, wmma::col_major, wmma::row_major>;
    using LB = std::conditional_t<TB, wmma::col_major, wmma::row_major>;
    constexpr int kTilesN = N / 16;
    const int warp = threadIdx.x / 32;
    for (int tile = warp; tile < (M / 16) * kTilesN; tile += kWarps) {
      const int m0 = (tile / kTilesN) * 16, n0 = (tile % kTilesN) * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
      if constexpr (ACC) {
        wmma::load_matrix_sync(c, C + m0 * ldc + n0, ldc, wmma::mem_row_major);
      } else {
        wmma::fill_fragment(c, 0.f);
      }
#pragma unroll
      for (int k0 = 0; k0 < K; k0 += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> b;
        wmma::load_matrix_sync(a, TA ? A + k0 * lda + m0 : A + m0 * lda + k0, lda);
        wmma::load_matrix_sync(b, TB ? B + n0 * ldb + k0 : B + k0 * ldb + n0, ldb);
        wmma::mma_sync(c, a, b, c);
      }
      wmma::store_matrix_sync(C + m0 * ldc + n0, c, ldc, wmma::mem_row_major);
    }
  }
}

// s[ROWS][Dp] (row stride Cfg::kLdT) <- rows [0, rows) x cols [0, D) of g (row stride `stride`),
// zeros elsewhere. vec: 16-byte loads (D, stride and g are multiples of 16 bytes).
template <typename T, int ROWS, int Dp>
__device__ __forceinline__ void load_tile(T* __restrict__ s, const T* __restrict__ g,
                                          int64_t stride, int rows, int D, bool vec) {
  constexpr int kLd = Cfg<T, Dp>::kLdT;
  if (vec) {
    constexpr int V = kVec<T>;
    constexpr int kChunks = Dp / V;
    for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += kThreads) {
      const int r = idx / kChunks, c = (idx % kChunks) * V;
      Pack<T, V> val;
      if (r < rows && c < D) {
        val = *reinterpret_cast<const Pack<T, V>*>(g + r * stride + c);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) val.v[e] = from_float<T>(0.f);
      }
      *reinterpret_cast<Pack<T, V>*>(s + r * kLd + c) = val;
    }
  } else {
    for (int idx = threadIdx.x; idx < ROWS * Dp; idx += kThreads) {
      const int r = idx / Dp, c = idx % Dp;
      s[r * kLd + c] = (r < rows && c < D) ? g[r * stride + c] : from_float<T>(0.f);
    }
  }
}

// key_ok[c] = key j0 + c exists and is not padding.
template <int BN>
__device__ __forceinline__ void load_key_ok(uint8_t* key_ok, const uint8_t* mask_row, int j0,
                                            int Tk) {
  for (int c = threadIdx.x; c < BN; c += kThreads) {
    const int j = j0 + c;
    key_ok[c] = j < Tk && (mask_row == nullptr || mask_row[j] == 0);
  }
}

template <typename T>
__device__ __forceinline__ T* at(unsigned char* base, size_t off) {
  return reinterpret_cast<T*>(base + off);
}

// ------------------------------------------------------------------ forward
// grid: (B * Hq, ceil(Tq / BM)).
template <typename T, int Dp>
__global__ void __launch_bounds__(kThreads)
    attention_fwd_simple_kernel(const AttentionFwdArgs a, bool vec) {
  using C = Cfg<T, Dp>;
  using L = FwdSmem<T, Dp>;
  constexpr int BM = L::BM, BN = L::BN, LDS = L::LDS, LDP = L::LDP;
  constexpr int LDT = C::kLdT, LDF = C::kLdF;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = at<T>(smem, L::q);
  T* sK = at<T>(smem, L::k);
  T* sV = at<T>(smem, L::v);
  float* sS = at<float>(smem, L::s);
  T* sP = at<T>(smem, L::p);
  float* sO = at<float>(smem, L::o);
  float* sM = at<float>(smem, L::m);
  float* sL = at<float>(smem, L::l);
  uint8_t* sKeyOk = at<uint8_t>(smem, L::key_ok);
  uint8_t* sKeep = at<uint8_t>(smem, L::keep);

  const int bh = blockIdx.x, b = bh / a.Hq, h = bh % a.Hq, hk = h / (a.Hq / a.Hkv);
  const int i0 = blockIdx.y * BM;
  const int Tq = a.Tq, Tk = a.Tk, D = a.D;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* q = static_cast<const T*>(a.q) + b * a.q_stride.b + h * a.q_stride.h;
  const T* k = static_cast<const T*>(a.k) + b * a.k_stride.b + hk * a.k_stride.h;
  const T* v = static_cast<const T*>(a.v) + b * a.v_stride.b + hk * a.v_stride.h;
  const uint8_t* mask_row =
      a.key_padding_mask != nullptr ? a.key_padding_mask + b * a.mask_stride_b : nullptr;
  const bool dropout = a.dropout_p > 0.f;
  const float inv_keep = dropout ? 1.0f / (1.0f - a.dropout_p) : 1.0f;
  const float scale_log2 = a.scale * kLog2e;  // softmax in base 2: exp(x) = exp2(x log2 e)

  load_tile<T, BM, Dp>(sQ, q + static_cast<int64_t>(i0) * a.q_stride.t, a.q_stride.t,
                       min(BM, Tq - i0), D, vec);
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    sM[r] = -kInf;
    sL[r] = 0.f;
  }
  for (int e = threadIdx.x; e < BM * LDF; e += kThreads) sO[e] = 0.f;

  // Keys past the last one visible to this block's last row are skipped.
  const long long last = a.causal ? static_cast<long long>(i0) + BM + Tk - Tq : Tk;
  const int n_end = static_cast<int>(last < Tk ? last : Tk);
  for (int j0 = 0; j0 < n_end; j0 += BN) {
    __syncthreads();  // the previous block's readers of sK, sV, sP are done
    const int nk = min(BN, Tk - j0);
    load_tile<T, BN, Dp>(sK, k + static_cast<int64_t>(j0) * a.k_stride.t, a.k_stride.t, nk, D, vec);
    load_tile<T, BN, Dp>(sV, v + static_cast<int64_t>(j0) * a.v_stride.t, a.v_stride.t, nk, D, vec);
    load_key_ok<BN>(sKeyOk, mask_row, j0, Tk);
    if (dropout)
      draw_keep_tile<BM, BN>(a.seed, a.offset, a.dropout_threshold, static_cast<uint32_t>(bh), i0,
                             j0, sKeep);
    __syncthreads();
    block_gemm<T, BM, BN, Dp, false, true, false>(sQ, LDT, sK, LDT, sS, LDS);  // S = Q K^T
    __syncthreads();
    // Online softmax, a warp per row: new max, rescale factor, P (dropped) into sP, O *= alpha.
    for (int r = warp; r < BM; r += kWarps) {
      const int i = i0 + r;
      float sv[BN / 32];
      float mx = -kInf;
#pragma unroll
      for (int c = 0; c < BN / 32; ++c) {
        const int jj = lane + 32 * c;
        const bool ok = i < Tq && sKeyOk[jj] && causal_ok(a.causal, i, j0 + jj, Tq, Tk);
        sv[c] = ok ? sS[r * LDS + jj] * scale_log2 : -kInf;
        mx = fmaxf(mx, sv[c]);
      }
      mx = warp_max(mx);
      const float m_old = sM[r];
      const float m_new = fmaxf(m_old, mx);
      // m_new == -inf: nothing visible yet; keep O (zero) and l (zero) as they are.
      const float alpha = m_new == -kInf ? 1.f : exp2f(m_old - m_new);
      float rowsum = 0.f;
#pragma unroll
      for (int c = 0; c < BN / 32; ++c) {
        const int jj = lane + 32 * c;
        const float p = sv[c] == -kInf ? 0.f : exp2f(sv[c] - m_new);
        rowsum += p;
        float pd = p;
        if (dropout) {
          pd = keep_bit<BN>(sKeep, r, jj) ? p * inv_keep : 0.f;
        }
        sP[r * LDP + jj] = from_float<T>(pd);
      }
      rowsum = warp_sum(rowsum);  // also orders every lane's read of sM[r] before the write
      if (lane == 0) {
        sM[r] = m_new;
        sL[r] = sL[r] * alpha + rowsum;
      }
      for (int d = lane; d < Dp; d += 32) sO[r * LDF + d] *= alpha;
    }
    __syncthreads();
    block_gemm<T, BM, Dp, BN, false, false, true>(sP, LDP, sV, LDT, sO, LDF);  // O += P~ V
  }
  __syncthreads();

  // out = O / l (0 for rows that saw no key), lse = m + log l (+inf for them).
  T* out = static_cast<T*>(a.out) + (static_cast<int64_t>(bh) * Tq + i0) * D;
  const int rows = min(BM, Tq - i0);
  for (int e = threadIdx.x; e < rows * D; e += kThreads) {
    const int r = e / D, d = e % D;
    const float l = sL[r];
    out[e] = from_float<T>(l > 0.f ? sO[r * LDF + d] / l : 0.f);
  }
  for (int r = threadIdx.x; r < rows; r += kThreads) {
    const float l = sL[r];
    a.lse[static_cast<int64_t>(bh) * Tq + i0 + r] = l > 0.f ? (sM[r] + log2f(l)) * kLn2 : kInf;
  }
}

// ------------------------------------------------------------------ backward
// Delta[bh, i] = sum_d dout[b, h, i, d] * out[b, h, i, d]: a warp per row, 4 rows per block.
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_bwd_preprocess_kernel(const AttentionBwdArgs a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t rows = static_cast<int64_t>(a.B) * a.Hq * a.Tq;
  if (row >= rows) return;
  const int64_t bh = row / a.Tq;
  const int i = static_cast<int>(row % a.Tq);
  const int b = static_cast<int>(bh / a.Hq), h = static_cast<int>(bh % a.Hq);
  const T* dor = static_cast<const T*>(a.dout) + b * a.dout_stride.b + h * a.dout_stride.h +
                 i * a.dout_stride.t;
  const T* orow = static_cast<const T*>(a.out) + b * a.out_stride.b + h * a.out_stride.h +
                  i * a.out_stride.t;
  float s = 0.f;
  for (int d = lane; d < a.D; d += 32) s += to_float(dor[d]) * to_float(orow[d]);
  s = warp_sum(s);
  if (lane == 0) a.delta[row] = s;
}

// Shared by the dQ and dK/dV kernels: from S (sS) and dP (sdP) of a BM x BN tile, write
// P o Z (if sPd) and scale * dS into shared memory, both rounded to T.
//   P = exp(S scale - lse) on visible (i, j), else 0;  dS = P (dP Z - Delta)
template <typename T, int BM, int BN, int LDS, int LDP>
__device__ __forceinline__ void softmax_grad_tile(const AttentionBwdArgs& a, const float* sS,
                                                  const float* sdP, const float* sLse2,
                                                  const float* sDelta, const uint8_t* sKeyOk,
                                                  const uint8_t* sKeep, T* sPd, T* sdS, int i0,
                                                  int j0) {
  const bool dropout = a.dropout_p > 0.f;
  const float inv_keep = dropout ? 1.0f / (1.0f - a.dropout_p) : 1.0f;
  const float scale_log2 = a.scale * kLog2e;
  for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
    const int r = e / BN, c = e % BN;
    const int i = i0 + r, j = j0 + c;
    const bool ok = i < a.Tq && sKeyOk[c] && causal_ok(a.causal, i, j, a.Tq, a.Tk);
    // sLse2 = lse * log2 e; +inf (row without keys, or past Tq) gives p = 0.
    const float p = ok ? exp2f(fmaf(sS[r * LDS + c], scale_log2, -sLse2[r])) : 0.f;
    float z = 1.f;
    if (dropout) z = keep_bit<BN>(sKeep, r, c) ? inv_keep : 0.f;
    const float ds = p * (sdP[r * LDS + c] * z - sDelta[r]);
    if (sPd != nullptr) sPd[r * LDP + c] = from_float<T>(p * z);
    sdS[r * LDP + c] = from_float<T>(ds * a.scale);
  }
}

// dQ: grid (B * Hq, ceil(Tq / BM)); walks the key blocks this query block can see.
template <typename T, int Dp>
__global__ void __launch_bounds__(kThreads) attention_bwd_dq_simple_kernel(const AttentionBwdArgs a,
                                                                    bool vec) {
  using C = Cfg<T, Dp>;
  using L = DqSmem<T, Dp>;
  constexpr int BM = L::BM, BN = L::BN, LDS = L::LDS, LDP = L::LDP;
  constexpr int LDT = C::kLdT, LDF = C::kLdF;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = at<T>(smem, L::q);
  T* sdO = at<T>(smem, L::dout);
  T* sK = at<T>(smem, L::k);
  T* sV = at<T>(smem, L::v);
  float* sS = at<float>(smem, L::s);
  float* sdP = at<float>(smem, L::dp);
  T* sdS = at<T>(smem, L::ds);
  float* sdQ = at<float>(smem, L::dq);
  float* sLse2 = at<float>(smem, L::lse);
  float* sDelta = at<float>(smem, L::delta);
  uint8_t* sKeyOk = at<uint8_t>(smem, L::key_ok);
  uint8_t* sKeep = at<uint8_t>(smem, L::keep);

  const int bh = blockIdx.x, b = bh / a.Hq, h = bh % a.Hq, hk = h / (a.Hq / a.Hkv);
  const int i0 = blockIdx.y * BM;
  const int Tq = a.Tq, Tk = a.Tk, D = a.D;
  const bool dropout = a.dropout_p > 0.f;
  const int rows = min(BM, Tq - i0);
  const T* q = static_cast<const T*>(a.q) + b * a.q_stride.b + h * a.q_stride.h;
  const T* dout = static_cast<const T*>(a.dout) + b * a.dout_stride.b + h * a.dout_stride.h;
  const T* k = static_cast<const T*>(a.k) + b * a.k_stride.b + hk * a.k_stride.h;
  const T* v = static_cast<const T*>(a.v) + b * a.v_stride.b + hk * a.v_stride.h;
  const uint8_t* mask_row =
      a.key_padding_mask != nullptr ? a.key_padding_mask + b * a.mask_stride_b : nullptr;

  load_tile<T, BM, Dp>(sQ, q + static_cast<int64_t>(i0) * a.q_stride.t, a.q_stride.t, rows, D, vec);
  load_tile<T, BM, Dp>(sdO, dout + static_cast<int64_t>(i0) * a.dout_stride.t, a.dout_stride.t,
                       rows, D, vec);
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    const int64_t idx = static_cast<int64_t>(bh) * Tq + i0 + r;
    sLse2[r] = r < rows ? a.lse[idx] * kLog2e : kInf;
    sDelta[r] = r < rows ? a.delta[idx] : 0.f;
  }
  for (int e = threadIdx.x; e < BM * LDF; e += kThreads) sdQ[e] = 0.f;

  const long long last = a.causal ? static_cast<long long>(i0) + BM + Tk - Tq : Tk;
  const int n_end = static_cast<int>(last < Tk ? last : Tk);
  for (int j0 = 0; j0 < n_end; j0 += BN) {
    __syncthreads();
    const int nk = min(BN, Tk - j0);
    load_tile<T, BN, Dp>(sK, k + static_cast<int64_t>(j0) * a.k_stride.t, a.k_stride.t, nk, D, vec);
    load_tile<T, BN, Dp>(sV, v + static_cast<int64_t>(j0) * a.v_stride.t, a.v_stride.t, nk, D, vec);
    load_key_ok<BN>(sKeyOk, mask_row, j0, Tk);
    if (dropout)
      draw_keep_tile<BM, BN>(a.seed, a.offset, a.dropout_threshold, static_cast<uint32_t>(bh), i0,
                             j0, sKeep);
    __syncthreads();
    block_gemm<T, BM, BN, Dp, false, true, false>(sQ, LDT, sK, LDT, sS, LDS);    // S = Q K^T
    block_gemm<T, BM, BN, Dp, false, true, false>(sdO, LDT, sV, LDT, sdP, LDS);  // dP = dO V^T
    __syncthreads();
    softmax_grad_tile<T, BM, BN, LDS, LDP>(a, sS, sdP, sLse2, sDelta, sKeyOk, sKeep, nullptr, sdS,
                                           i0, j0);
    __syncthreads();
    block_gemm<T, BM, Dp, BN, false, false, true>(sdS, LDP, sK, LDT, sdQ, LDF);  // dQ += dS K
  }
  __syncthreads();
  T* dq = static_cast<T*>(a.dq) + (static_cast<int64_t>(bh) * Tq + i0) * D;
  for (int e = threadIdx.x; e < rows * D; e += kThreads) {
    dq[e] = from_float<T>(sdQ[(e / D) * LDF + e % D]);
  }
}

// dK, dV: grid (B * Hkv, ceil(Tk / BN)); walks, for every query head of the kv head's group,
// the query blocks that can see this key block.
template <typename T, int Dp>
__global__ void __launch_bounds__(kThreads) attention_bwd_dkdv_simple_kernel(const AttentionBwdArgs a,
                                                                      bool vec) {
  using C = Cfg<T, Dp>;
  using L = KvSmem<T, Dp>;
  constexpr int BM = L::BM, BN = L::BN, LDS = L::LDS, LDP = L::LDP;
  constexpr int LDT = C::kLdT, LDF = C::kLdF;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = at<T>(smem, L::k);
  T* sV = at<T>(smem, L::v);
  T* sQ = at<T>(smem, L::q);
  T* sdO = at<T>(smem, L::dout);
  float* sS = at<float>(smem, L::s);
  float* sdP = at<float>(smem, L::dp);
  T* sPd = at<T>(smem, L::pd);
  T* sdS = at<T>(smem, L::ds);
  float* sdK = at<float>(smem, L::dk);
  float* sdV = at<float>(smem, L::dv);
  float* sLse2 = at<float>(smem, L::lse);
  float* sDelta = at<float>(smem, L::delta);
  uint8_t* sKeyOk = at<uint8_t>(smem, L::key_ok);
  uint8_t* sKeep = at<uint8_t>(smem, L::keep);

  const int bhk = blockIdx.x, b = bhk / a.Hkv, hk = bhk % a.Hkv;
  const int group = a.Hq / a.Hkv;
  const int j0 = blockIdx.y * BN;
  const int Tq = a.Tq, Tk = a.Tk, D = a.D;
  const bool dropout = a.dropout_p > 0.f;
  const int nk = min(BN, Tk - j0);
  const T* k = static_cast<const T*>(a.k) + b * a.k_stride.b + hk * a.k_stride.h;
  const T* v = static_cast<const T*>(a.v) + b * a.v_stride.b + hk * a.v_stride.h;
  const uint8_t* mask_row =
      a.key_padding_mask != nullptr ? a.key_padding_mask + b * a.mask_stride_b : nullptr;

  load_tile<T, BN, Dp>(sK, k + static_cast<int64_t>(j0) * a.k_stride.t, a.k_stride.t, nk, D, vec);
  load_tile<T, BN, Dp>(sV, v + static_cast<int64_t>(j0) * a.v_stride.t, a.v_stride.t, nk, D, vec);
  load_key_ok<BN>(sKeyOk, mask_row, j0, Tk);
  for (int e = threadIdx.x; e < BN * LDF; e += kThreads) {
    sdK[e] = 0.f;
    sdV[e] = 0.f;
  }

  // First query that sees key j0 (causal): i >= j0 - (Tk - Tq); start at its block.
  int m_begin = 0;
  if (a.causal) {
    const long long first = static_cast<long long>(j0) - Tk + Tq;
    m_begin = first > 0 ? static_cast<int>(first / BM) * BM : 0;
  }
  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    const int bh = b * a.Hq + h;
    const T* q = static_cast<const T*>(a.q) + b * a.q_stride.b + h * a.q_stride.h;
    const T* dout = static_cast<const T*>(a.dout) + b * a.dout_stride.b + h * a.dout_stride.h;
    for (int i0 = m_begin; i0 < Tq; i0 += BM) {
      __syncthreads();  // the previous block's readers of sQ, sdO, sPd, sdS are done
      const int rows = min(BM, Tq - i0);
      load_tile<T, BM, Dp>(sQ, q + static_cast<int64_t>(i0) * a.q_stride.t, a.q_stride.t, rows,
                           D, vec);
      load_tile<T, BM, Dp>(sdO, dout + static_cast<int64_t>(i0) * a.dout_stride.t,
                           a.dout_stride.t, rows, D, vec);
      for (int r = threadIdx.x; r < BM; r += kThreads) {
        const int64_t idx = static_cast<int64_t>(bh) * Tq + i0 + r;
        sLse2[r] = r < rows ? a.lse[idx] * kLog2e : kInf;
        sDelta[r] = r < rows ? a.delta[idx] : 0.f;
      }
      if (dropout)
        draw_keep_tile<BM, BN>(a.seed, a.offset, a.dropout_threshold, static_cast<uint32_t>(bh),
                               i0, j0, sKeep);
      __syncthreads();
      block_gemm<T, BM, BN, Dp, false, true, false>(sQ, LDT, sK, LDT, sS, LDS);    // S = Q K^T
      block_gemm<T, BM, BN, Dp, false, true, false>(sdO, LDT, sV, LDT, sdP, LDS);  // dP = dO V^T
      __syncthreads();
      softmax_grad_tile<T, BM, BN, LDS, LDP>(a, sS, sdP, sLse2, sDelta, sKeyOk, sKeep, sPd, sdS, i0,
                                             j0);
      __syncthreads();
      block_gemm<T, BN, Dp, BM, true, false, true>(sPd, LDP, sdO, LDT, sdV, LDF);  // dV += P~^T dO
      block_gemm<T, BN, Dp, BM, true, false, true>(sdS, LDP, sQ, LDT, sdK, LDF);   // dK += dS^T Q
    }
  }
  __syncthreads();
  const int64_t base = (static_cast<int64_t>(bhk) * Tk + j0) * D;
  T* dk = static_cast<T*>(a.dk) + base;
  T* dv = static_cast<T*>(a.dv) + base;
  for (int e = threadIdx.x; e < nk * D; e += kThreads) {
    const int s = (e / D) * LDF + e % D;
    dk[e] = from_float<T>(sdK[s]);
    dv[e] = from_float<T>(sdV[s]);
  }
}

// ================================================================== FlashAttention-2 kernels
// fp16 / bf16 only (fp32 stays on the *_simple kernels above: no TF32, see the header).
// Tiles are in csrc/cuda/attention_tiles.h (shared with scripts/cuda_check.sh's table).

// ------------------------------------------------------------------ PTX primitives
// Tensor-core product, fragment loads and async copies. The host emulation
// (tests/cuda_emu/shim.h) provides the same functions with the PTX ISA's per-lane layouts.
#ifndef FASTATTN_HOST_EMULATION
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// d += a b: a 16x16 (row), b 16x8 (col), fp32 accumulators. Fragment layout (PTX ISA),
// g = lane / 4, t = lane % 4: a[r] = A(g + 8 (r & 1), 2t + 8 (r >> 1) + {0, 1});
// b{0,1} = B(2t + 8 {0,1} + {0, 1}, g); d[e] = D(g + 8 (e >> 1), 2t + (e & 1)).
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i of lane l
// gets row l / 4, columns 2 (l % 4) + {0, 1} of it (.trans: of its transpose).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row_addr))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row_addr))
               : "memory");
}

// 16 bytes global -> shared, bypassing L1 (.cg): the tile is read once per block from L2.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(dst)), "l"(src)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif  // FASTATTN_HOST_EMULATION

__device__ __forceinline__ uint32_t bits16(__half h) { return __half_as_ushort(h); }
__device__ __forceinline__ uint32_t bits16(__nv_bfloat16 h) { return __bfloat16_as_ushort(h); }
// Two floats rounded to T, packed as one b32 register (lo in the low half, as mma expects).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return bits16(from_float<T>(lo)) | (bits16(from_float<T>(hi)) << 16);
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// rows x Dp tile of T into shared memory (row stride LD): rows [0, rows) x cols [0, D) from g
// (row stride `stride`), zeros elsewhere. vec: 16-byte cp.async chunks (the caller commits and
// waits); else plain element copies (visible after the next barrier). Threads: NT.
template <typename T, int ROWS, int Dp, int LD, int NT>
__device__ __forceinline__ void stage_tile(T* __restrict__ s, const T* __restrict__ g,
                                           int64_t stride, int rows, int D, bool vec) {
  if (vec) {
    constexpr int V = kVec<T>;
    constexpr int kChunks = Dp / V;
    for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += NT) {
      const int r = idx / kChunks, c = (idx % kChunks) * V;
      if (r < rows && c < D) {
        cp_async_16(s + r * LD + c, g + r * stride + c);
      } else {
        Pack<T, V> z;
#pragma unroll
        for (int e = 0; e < V; ++e) z.v[e] = from_float<T>(0.f);
        *reinterpret_cast<Pack<T, V>*>(s + r * LD + c) = z;
      }
    }
  } else {
    for (int idx = threadIdx.x; idx < ROWS * Dp; idx += NT) {
      const int r = idx / Dp, c = idx % Dp;
      s[r * LD + c] = (r < rows && c < D) ? g[r * stride + c] : from_float<T>(0.f);
    }
  }
}

// ------------------------------------------------------------------ FA2 forward
// grid (B * Hq, ceil(Tq / BM)); 4 warps, warp w owns query rows i0 + 16 w .. + 15 of the block.
// Per key block (K, V double-buffered, the next block's cp.async in flight while this one is
// computed; two barriers per block: tile ready, tile consumed):
//   S = Q K^T      16 x BN per warp, BN / 8 accumulator fragments (registers)
//   mask           only on a tile that the causal diagonal, the key tail or padding cuts
//   softmax        row max / sum over the lane's values then the 4 lanes of its quad (rows are
//                  split across a quad in the C layout); O, l rescaled by exp2(m_old - m_new)
//   O += P V       P's C fragments become A fragments in place (same lane / row / column map),
//                  rounded to T; V fragments through ldmatrix.trans
template <typename T, int Dp>
__global__ void __launch_bounds__(tiles::Fa2Fwd<2, Dp>::kThreads)
    attention_fwd_fa2_kernel(const AttentionFwdArgs a, bool vec) {
  using L = tiles::Fa2Fwd<2, Dp>;
  constexpr int BM = L::BM, BN = L::BN, LD = L::LD, NT = L::kThreads;
  constexpr int NS = BN / 8;   // S fragments per warp (n tiles of 8 keys)
  constexpr int NO = Dp / 8;   // O fragments per warp (n tiles of 8 head-dim columns)
  constexpr int KD = Dp / 16;  // k steps of Q K^T
  constexpr bool kQRegs = L::kQInRegisters;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = at<T>(smem, L::q);
  T* sK = at<T>(smem, L::k);  // [2][BN][LD]
  T* sV = at<T>(smem, L::v);  // [2][BN][LD]
  uint8_t* sKeyOk = at<uint8_t>(smem, L::key_ok);  // [2][BN]

  const int bh = blockIdx.x, b = bh / a.Hq, h = bh % a.Hq, hk = h / (a.Hq / a.Hkv);
  const int i0 = blockIdx.y * BM;
  const int Tq = a.Tq, Tk = a.Tk, D = a.D;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int iw = i0 + warp * 16;  // first query row of this warp
  const T* q = static_cast<const T*>(a.q) + b * a.q_stride.b + h * a.q_stride.h;
  const T* k = static_cast<const T*>(a.k) + b * a.k_stride.b + hk * a.k_stride.h;
  const T* v = static_cast<const T*>(a.v) + b * a.v_stride.b + hk * a.v_stride.h;
  const uint8_t* mask_row =
      a.key_padding_mask != nullptr ? a.key_padding_mask + b * a.mask_stride_b : nullptr;
  const bool dropout = a.dropout_p > 0.f;
  const float inv_keep = dropout ? 1.0f / (1.0f - a.dropout_p) : 1.0f;
  const float scale_log2 = a.scale * kLog2e;

  const long long last = a.causal ? static_cast<long long>(i0) + BM + Tk - Tq : Tk;
  const int n_end = static_cast<int>(last < Tk ? last : Tk);
  const int n_blocks = n_end > 0 ? (n_end + BN - 1) / BN : 0;

  float o[NO][4];
#pragma unroll
  for (int n = 0; n < NO; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[n][e] = 0.f;
  float m_run[2] = {-kInf, -kInf}, l_run[2] = {0.f, 0.f};  // rows g and g + 8

  // Stage key block `blk` into buffer `buf`; returns whether this thread saw a padded key.
  auto stage_kv = [&](int blk, int buf) -> int {
    const int j0 = blk * BN, nk = min(BN, Tk - j0);
    stage_tile<T, BN, Dp, LD, NT>(sK + buf * BN * LD, k + static_cast<int64_t>(j0) * a.k_stride.t,
                                  a.k_stride.t, nk, D, vec);
    stage_tile<T, BN, Dp, LD, NT>(sV + buf * BN * LD, v + static_cast<int64_t>(j0) * a.v_stride.t,
                                  a.v_stride.t, nk, D, vec);
    int pad = 0;
    if (mask_row != nullptr) {
      for (int c = threadIdx.x; c < BN; c += NT) {
        const int j = j0 + c;
        const bool ok = j < Tk && mask_row[j] == 0;
        sKeyOk[buf * BN + c] = ok;
        pad |= j < Tk && !ok;
      }
    }
    return pad;
  };

  uint32_t qf[kQRegs ? KD : 1][4];
  int pad_next = 0;
  if (n_blocks > 0) {
    stage_tile<T, BM, Dp, LD, NT>(sQ, q + static_cast<int64_t>(i0) * a.q_stride.t, a.q_stride.t,
                                  min(BM, Tq - i0), D, vec);
    pad_next = stage_kv(0, 0);
    cp_async_commit();
  }
  for (int blk = 0; blk < n_blocks; ++blk) {
    const int buf = blk & 1, j0 = blk * BN;
    const int pad_cur = pad_next;
    if (blk + 1 < n_blocks) {
      pad_next = stage_kv(blk + 1, buf ^ 1);  // overlaps with this block's products
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    // Barrier 1: block `blk` staged by every thread; also: does any thread see a padded key?
    const bool any_pad = __syncthreads_or(pad_cur) != 0;
    const T* Kb = sK + buf * BN * LD;
    const T* Vb = sV + buf * BN * LD;

    if constexpr (kQRegs) {
      if (blk == 0) {
#pragma unroll
        for (int kk = 0; kk < KD; ++kk)
          ldmatrix_x4(qf[kk], sQ + (warp * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * LD +
                                  kk * 16 + 8 * (lane / 16));
      }
    }

    // S = Q K^T
    float s[NS][4];
#pragma unroll
    for (int n = 0; n < NS; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
      uint32_t af[4];
      if constexpr (kQRegs) {
#pragma unroll
        for (int r = 0; r < 4; ++r) af[r] = qf[kk][r];
      } else {
        ldmatrix_x4(af, sQ + (warp * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * LD + kk * 16 +
                            8 * (lane / 16));
      }
#pragma unroll
      for (int np = 0; np < NS / 2; ++np) {
        // matrices: keys np*16 + {0-7, 0-7, 8-15, 8-15} x dims kk*16 + {0-7, 8-15, 0-7, 8-15}
        uint32_t bf[4];
        ldmatrix_x4(bf, Kb + (np * 16 + (lane % 8) + 8 * (lane / 16)) * LD + kk * 16 +
                            8 * ((lane / 8) % 2));
        mma_m16n8k16<T>(s[2 * np], af, bf[0], bf[1]);
        mma_m16n8k16<T>(s[2 * np + 1], af, bf[2], bf[3]);
      }
    }

    // Scale into base 2; mask where this warp's tile is cut (warp-uniform branch).
    const bool full = j0 + BN <= Tk && !any_pad &&
                      (!a.causal || static_cast<long long>(j0) + BN - 1 <=
                                        static_cast<long long>(iw) + Tk - Tq);
    if (full) {
#pragma unroll
      for (int n = 0; n < NS; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] *= scale_log2;
    } else {
      const uint8_t* ok = sKeyOk + buf * BN;
#pragma unroll
      for (int n = 0; n < NS; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = n * 8 + 2 * t + (e & 1), j = j0 + c, i = iw + g + 8 * (e >> 1);
          const bool vis = j < Tk && (mask_row == nullptr || ok[c]) &&
                           causal_ok(a.causal, i, j, Tq, Tk);
          s[n][e] = vis ? s[n][e] * scale_log2 : -kInf;
        }
    }

    // Online softmax on the fragments: rows g (e = 0, 1) and g + 8 (e = 2, 3).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -kInf;
#pragma unroll
      for (int n = 0; n < NS; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      mx = quad_max(mx);
      const float m_new = fmaxf(m_run[r], mx);
      // m_new == -inf: nothing visible yet (p = 0 below, O and l stay zero).
      const float alpha = m_new == -kInf ? 1.f : exp2f(m_run[r] - m_new);
      const float m_use = m_new == -kInf ? 0.f : m_new;
      float rs = 0.f;
#pragma unroll
      for (int n = 0; n < NS; ++n)
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          const float p = exp2f(s[n][e] - m_use);  // exp2(-inf) = 0 for masked keys
          rs += p;
          s[n][e] = p;
        }
      l_run[r] = l_run[r] * alpha + rs;  // this lane's part of the row sum (quad-summed at end)
      m_run[r] = m_new;
#pragma unroll
      for (int n = 0; n < NO; ++n) {
        o[n][2 * r] *= alpha;
        o[n][2 * r + 1] *= alpha;
      }
    }
    if (dropout) {
      // One call per 4 elements: lane (g, t) draws the call of row g + 8 (t & 1) over keys
      // j0 + 8n + 4 (t >> 1) .. + 3 (j0 a multiple of 4); the element (row g + 8 h2, key
      // j0 + 8n + 2t + x) takes word 2 (t & 1) + x of lane 4g + (t & 2) + h2's call, by ballot.
      const uint32_t bhq = static_cast<uint32_t>(bh);
      const int sh = 4 * g + (t & 2);
#pragma unroll
      for (int n = 0; n < NS; ++n) {
        const uint4 w = dropout_words(a.seed, a.offset, bhq, iw + g + 8 * (t & 1), j0 + n * 8 + 2 * t);
        const uint4 bal = dropout_ballots(w, a.dropout_threshold);
        const uint32_t k0 = ((t & 1) ? bal.z : bal.x) >> sh, k1 = ((t & 1) ? bal.w : bal.y) >> sh;
#pragma unroll
        for (int h2 = 0; h2 < 2; ++h2) {
          float& s0 = s[n][2 * h2];
          float& s1 = s[n][2 * h2 + 1];
          s0 = ((k0 >> h2) & 1u) ? s0 * inv_keep : 0.f;
          s1 = ((k1 >> h2) & 1u) ? s1 * inv_keep : 0.f;
        }
      }
    }

    // O += P V: A fragment of key step kk = S tiles 2kk (cols 0-7) and 2kk + 1 (cols 8-15).
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint32_t pf[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]),
                              pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < Dp / 16; ++dp) {
        // matrices: keys kk*16 + {0-7, 8-15, 0-7, 8-15} x dims dp*16 + {0-7, 0-7, 8-15, 8-15}
        uint32_t bf[4];
        ldmatrix_x4_trans(bf, Vb + (kk * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * LD +
                                  dp * 16 + 8 * (lane / 16));
        mma_m16n8k16<T>(o[2 * dp], pf, bf[0], bf[1]);
        mma_m16n8k16<T>(o[2 * dp + 1], pf, bf[2], bf[3]);
      }
    }
    __syncthreads();  // barrier 2: every warp is done with buffer `buf` (restaged at blk + 2)
  }

  // out = O / l (0 for a row that saw no key), lse = m + log l (+inf for it), in natural log.
  // O goes through shared memory (sQ, free now) so that the rows leave in 16-byte stores.
  __syncthreads();  // every warp is done reading sQ
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_run[r]);
    const int i = iw + g + 8 * r;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    uint32_t* srow = reinterpret_cast<uint32_t*>(sQ + (warp * 16 + g + 8 * r) * LD);
#pragma unroll
    for (int n = 0; n < NO; ++n) srow[n * 4 + t] = pack2<T>(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
    if (t == 0 && i < Tq)
      a.lse[static_cast<int64_t>(bh) * Tq + i] = l > 0.f ? (m_run[r] + log2f(l)) * kLn2 : kInf;
  }
  __syncthreads();
  T* out = static_cast<T*>(a.out) + (static_cast<int64_t>(bh) * Tq + i0) * D;
  const int rows = min(BM, Tq - i0);
  if (D % kVec<T> == 0 && reinterpret_cast<uintptr_t>(a.out) % 16 == 0) {
    constexpr int V = kVec<T>;
    const int chunks = D / V;
    for (int idx = threadIdx.x; idx < rows * chunks; idx += NT) {
      const int r = idx / chunks, c = (idx % chunks) * V;
      *reinterpret_cast<Pack<T, V>*>(out + static_cast<int64_t>(r) * D + c) =
          *reinterpret_cast<const Pack<T, V>*>(sQ + r * LD + c);
    }
  } else {
    for (int idx = threadIdx.x; idx < rows * D; idx += NT)
      out[idx] = sQ[(idx / D) * LD + idx % D];
  }
}

// ------------------------------------------------------------------ FA2 backward
// grid (B * Hkv, ceil(Tk / BN)); key warp kw = warp % 4 owns keys j0 + 16 kw .. + 15 of the
// block; the block keeps dK, dV of its keys in registers (fp32 fragments) over every query
// block of every query head of the kv head's group (GQA sums without atomics). Per query block
// (Q, dO, lse, Delta double-buffered: the next block's cp.async in flight while this one is
// computed):
//   S^T = K Q^T, dP^T = V dO^T          16 keys x BM / kSplit queries per warp, in registers
//   P^T = exp2(S^T scale log2 e - lse log2 e)  (masked only on cut tiles), Z: dropout
//   dV += (P^T o Z) dO,  dS^T = P^T o (dP^T o Z - Delta),  dK += dS^T Q
//     kSplit = 1 (Dp <= 128): C fragments -> A fragments in place, all Dp columns per warp;
//     kSplit = 2 (Dp = 256): P^T o Z and dS^T through shared memory (a barrier), A fragments by
//     ldmatrix.trans over all BM queries, warp w accumulating head-dim half w / 4
//   dS -> shared memory (T), barrier, dQ += scale dS K: warps split the BM x Dp tile, fp32
//   atomicAdd into a [B, Hq, Tq, D] workspace (the FA2 arrangement: dQ of a query row gets a
//   contribution from every key block, so it is summed across blocks in L2 instead of a second
//   kernel recomputing S and dP); a last kernel rounds it to T.
// Two barriers per query block: (1) this block's tiles staged, and every warp done with the
// previous block (so the next prefetch, issued right after it, may overwrite that buffer, and dS
// / P may be rewritten); (2) dS (and P) written.
template <typename T, int Dp>
__global__ void __launch_bounds__(tiles::Fa2Bwd<2, Dp>::kThreads)
    attention_bwd_fa2_kernel(const AttentionBwdArgs a, bool vec) {
  using L = tiles::Fa2Bwd<2, Dp>;
  constexpr int BM = L::BM, BN = L::BN, LD = L::LD, LDS = L::LDS, NT = L::kThreads;
  constexpr int SP = L::kSplit, NW = L::kWarps;
  constexpr int QW = BM / SP;  // queries of S^T / dP^T per warp
  constexpr int NQ = QW / 8;   // S^T / dP^T fragments per warp (n tiles of 8 queries)
  constexpr int DW = Dp / SP;  // dK / dV columns per warp
  constexpr int NO = DW / 8;   // dK / dV fragments per warp
  constexpr int KD = Dp / 16;  // k steps over the head dim
  constexpr int RG = BM / 16, CG = NW / RG, DQC = Dp / CG;  // dQ: row groups x column groups
  static_assert(RG * CG == NW && DQC % 16 == 0 && NQ % 2 == 0, "tile split over the warps");
  static_assert(BN == 16 * 4, "4 key warps of 16 keys");
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = at<T>(smem, L::k);
  T* sV = at<T>(smem, L::v);
  T* sQ = at<T>(smem, L::q);    // [2][BM][LD]
  T* sdO = at<T>(smem, L::dout);  // [2][BM][LD]
  T* sdS = at<T>(smem, L::ds);  // [BM][LDS]: dS (query rows, key columns)
  T* sP = at<T>(smem, L::p);    // [BM][LDS]: P o Z, kSplit = 2 only
  float* sLse = at<float>(smem, L::lse);      // [2][BM], times log2 e
  float* sDelta = at<float>(smem, L::delta);  // [2][BM]
  uint8_t* sKeyOk = at<uint8_t>(smem, L::key_ok);

  const int bhk = blockIdx.x, b = bhk / a.Hkv, hk = bhk % a.Hkv;
  const int group = a.Hq / a.Hkv;
  const int j0 = blockIdx.y * BN;
  const int Tq = a.Tq, Tk = a.Tk, D = a.D;
  const int nk = min(BN, Tk - j0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  // Key warp; query slice of S^T = head-dim slice of dK / dV (compile-time 0 when SP = 1).
  const int kw = SP > 1 ? warp % 4 : warp, half = SP > 1 ? warp / 4 : 0;
  const int jw = j0 + kw * 16;  // first key of this warp
  const T* k = static_cast<const T*>(a.k) + b * a.k_stride.b + hk * a.k_stride.h;
  const T* v = static_cast<const T*>(a.v) + b * a.v_stride.b + hk * a.v_stride.h;
  const uint8_t* mask_row =
      a.key_padding_mask != nullptr ? a.key_padding_mask + b * a.mask_stride_b : nullptr;
  const bool dropout = a.dropout_p > 0.f;
  const float inv_keep = dropout ? 1.0f / (1.0f - a.dropout_p) : 1.0f;
  const float scale_log2 = a.scale * kLog2e;

  // Query blocks that see this key block: causal, i >= j0 - (Tk - Tq).
  int m_begin = 0;
  if (a.causal) {
    const long long first = static_cast<long long>(j0) - Tk + Tq;
    m_begin = first > 0 ? static_cast<int>(first / BM) * BM : 0;
  }
  const int nq = m_begin < Tq ? (Tq - m_begin + BM - 1) / BM : 0;
  const int n_steps = group * nq;  // (head, query block) pairs, head-major

  stage_tile<T, BN, Dp, LD, NT>(sK, k + static_cast<int64_t>(j0) * a.k_stride.t, a.k_stride.t,
                                nk, D, vec);
  stage_tile<T, BN, Dp, LD, NT>(sV, v + static_cast<int64_t>(j0) * a.v_stride.t, a.v_stride.t,
                                nk, D, vec);
  int pad = 0;
  for (int c = threadIdx.x; c < BN; c += NT) {
    const int j = j0 + c;
    const bool ok = j < Tk && (mask_row == nullptr || mask_row[j] == 0);
    sKeyOk[c] = ok;
    pad |= j < Tk && !ok;
  }

  auto stage_q = [&](int step, int buf) {
    const int h = hk * group + step / nq, i0 = m_begin + (step % nq) * BM;
    const int rows = min(BM, Tq - i0);
    const T* q = static_cast<const T*>(a.q) + b * a.q_stride.b + h * a.q_stride.h;
    const T* dout = static_cast<const T*>(a.dout) + b * a.dout_stride.b + h * a.dout_stride.h;
    stage_tile<T, BM, Dp, LD, NT>(sQ + buf * BM * LD, q + static_cast<int64_t>(i0) * a.q_stride.t,
                                  a.q_stride.t, rows, D, vec);
    stage_tile<T, BM, Dp, LD, NT>(sdO + buf * BM * LD,
                                  dout + static_cast<int64_t>(i0) * a.dout_stride.t,
                                  a.dout_stride.t, rows, D, vec);
    const int64_t base = static_cast<int64_t>(b * a.Hq + h) * Tq + i0;
    for (int r = threadIdx.x; r < BM; r += NT) {
      sLse[buf * BM + r] = r < rows ? a.lse[base + r] * kLog2e : kInf;  // +inf: p = 0
      sDelta[buf * BM + r] = r < rows ? a.delta[base + r] : 0.f;
    }
  };

  float dk[NO][4], dv[NO][4];
#pragma unroll
  for (int n = 0; n < NO; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;

  if (n_steps > 0) stage_q(0, 0);
  cp_async_commit();
  const bool any_pad = __syncthreads_or(pad) != 0;  // (K, V wait below, before first use)

  for (int step = 0; step < n_steps; ++step) {
    const int buf = step & 1;
    const int h = hk * group + step / nq, i0 = m_begin + (step % nq) * BM;
    cp_async_wait<0>();  // this step's Q, dO (and, at step 0, K, V): the only group in flight
    __syncthreads();     // barrier 1: staged; every warp is done with the previous step
    if (step + 1 < n_steps) {  // prefetch into the buffer the previous step used
      stage_q(step + 1, buf ^ 1);
      cp_async_commit();
    }
    const T* Qb = sQ + buf * BM * LD;
    const T* dOb = sdO + buf * BM * LD;
    const float* lse2 = sLse + buf * BM;
    const float* delta = sDelta + buf * BM;

    // Dropout keep bits of this warp's S^T elements, drawn before the products (while only dK,
    // dV are live). Bit 4n + e: element e of n tile n (query 2t + (e & 1), key g + 8 (e >> 1) of
    // the tile). One call per 4 elements: the element takes word g & 3 of the call on its query
    // and keys 4 (g >> 2) + 8 (e >> 1) .. + 3, which lane 16 (g >> 2) + 4e + t draws (a lane's
    // own u = g & 3 names the element it draws for); the bits come back by ballot u.
    const uint32_t bhq = static_cast<uint32_t>(b * a.Hq + h);
    static_assert(NQ * 4 <= 32, "one word of keep bits");
    uint32_t keep = 0;
    if (dropout) {
      const int u = g & 3;
#pragma unroll
      for (int n = 0; n < NQ; ++n) {
        const uint4 w = dropout_words(a.seed, a.offset, bhq,
                                      i0 + half * QW + n * 8 + 2 * t + (u & 1),
                                      jw + 8 * (u >> 1) + 4 * (g >> 2));
        const uint4 bal = dropout_ballots(w, a.dropout_threshold);
        const uint32_t bu = (u & 2) ? ((u & 1) ? bal.w : bal.z) : ((u & 1) ? bal.y : bal.x);
        const uint32_t lb = bu >> (16 * (g >> 2) + t);
        keep |= ((lb & 1u) | ((lb >> 3) & 2u) | ((lb >> 6) & 4u) | ((lb >> 9) & 8u)) << (4 * n);
      }
    }

    // S^T = K_w Q^T and dP^T = V_w dO^T over this warp's queries half * QW ...
    float st[NQ][4], dpt[NQ][4];
#pragma unroll
    for (int n = 0; n < NQ; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[n][e] = dpt[n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
      const int arow = (kw * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * LD + kk * 16 + 8 * (lane / 16);
      uint32_t kf[4], vf[4];
      ldmatrix_x4(kf, sK + arow);
      ldmatrix_x4(vf, sV + arow);
#pragma unroll
      for (int np = 0; np < NQ / 2; ++np) {
        const int brow = (half * QW + np * 16 + (lane % 8) + 8 * (lane / 16)) * LD + kk * 16 +
                         8 * ((lane / 8) % 2);
        uint32_t qf[4], of[4];
        ldmatrix_x4(qf, Qb + brow);
        ldmatrix_x4(of, dOb + brow);
        mma_m16n8k16<T>(st[2 * np], kf, qf[0], qf[1]);
        mma_m16n8k16<T>(st[2 * np + 1], kf, qf[2], qf[3]);
        mma_m16n8k16<T>(dpt[2 * np], vf, of[0], of[1]);
        mma_m16n8k16<T>(dpt[2 * np + 1], vf, of[2], of[3]);
      }
    }

    // P^T, dS^T in place of S^T, dP^T (element e: key jw + g + 8 (e >> 1), query i0 + c).
    const bool full = jw + 16 <= Tk && !any_pad &&
                      (!a.causal || static_cast<long long>(jw) + 15 <=
                                        static_cast<long long>(i0) + Tk - Tq);
#pragma unroll
    for (int n = 0; n < NQ; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = half * QW + n * 8 + 2 * t + (e & 1), r = g + 8 * (e >> 1);
        const int i = i0 + c, j = jw + r;
        bool vis = true;
        if (!full) vis = j < Tk && sKeyOk[kw * 16 + r] && causal_ok(a.causal, i, j, Tq, Tk);
        const float p = vis ? exp2f(st[n][e] * scale_log2 - lse2[c]) : 0.f;
        const float z = dropout ? (((keep >> (4 * n + e)) & 1u) ? inv_keep : 0.f) : 1.f;
        st[n][e] = p * z;                          // P^T o Z (for dV)
        dpt[n][e] = p * (dpt[n][e] * z - delta[c]);  // dS^T
      }
    }
    // dS^T -> sdS as dS (and P^T o Z -> sP as P o Z when the products read it from there).
#pragma unroll
    for (int n = 0; n < NQ; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = half * QW + n * 8 + 2 * t + (e & 1), r = g + 8 * (e >> 1);
        sdS[c * LDS + kw * 16 + r] = from_float<T>(dpt[n][e]);
        if constexpr (SP > 1) sP[c * LDS + kw * 16 + r] = from_float<T>(st[n][e]);
      }
    if constexpr (SP > 1) __syncthreads();  // barrier 2: P, dS of all BM queries written

    // dV += (P^T o Z) dO, dK += dS^T Q over the BM queries, head-dim columns half * DW ..
    // (scale applied at the end).
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      uint32_t pf[4], sf[4];
      if constexpr (SP == 1) {  // this warp's accumulators hold all BM queries: A in place
        pf[0] = pack2<T>(st[2 * kk][0], st[2 * kk][1]);
        pf[1] = pack2<T>(st[2 * kk][2], st[2 * kk][3]);
        pf[2] = pack2<T>(st[2 * kk + 1][0], st[2 * kk + 1][1]);
        pf[3] = pack2<T>(st[2 * kk + 1][2], st[2 * kk + 1][3]);
        sf[0] = pack2<T>(dpt[2 * kk][0], dpt[2 * kk][1]);
        sf[1] = pack2<T>(dpt[2 * kk][2], dpt[2 * kk][3]);
        sf[2] = pack2<T>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
        sf[3] = pack2<T>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
      } else {  // A = P^T (keys x queries) from P stored [query][key]: ldmatrix.trans, matrix
                // m = lane / 8 at query rows + 8 (m >> 1), key columns + 8 (m & 1)
        const int arow = (kk * 16 + (lane % 8) + 8 * (lane / 16)) * LDS + kw * 16 + 8 * ((lane / 8) % 2);
        ldmatrix_x4_trans(pf, sP + arow);
        ldmatrix_x4_trans(sf, sdS + arow);
      }
#pragma unroll
      for (int dp = 0; dp < DW / 16; ++dp) {
        const int brow = (kk * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * LD + half * DW + dp * 16 +
                         8 * (lane / 16);
        uint32_t of[4], qf[4];
        ldmatrix_x4_trans(of, dOb + brow);
        ldmatrix_x4_trans(qf, Qb + brow);
        mma_m16n8k16<T>(dv[2 * dp], pf, of[0], of[1]);
        mma_m16n8k16<T>(dv[2 * dp + 1], pf, of[2], of[3]);
        mma_m16n8k16<T>(dk[2 * dp], sf, qf[0], qf[1]);
        mma_m16n8k16<T>(dk[2 * dp + 1], sf, qf[2], qf[3]);
      }
    }
    if constexpr (SP == 1) __syncthreads();  // barrier 2: dS complete

    // dQ[i0 + 16 rg.., DQC cg..] += scale dS K: A = dS rows (queries), B = K via .trans.
    {
      const int rg = warp % RG, cg = warp / RG;
      // Columns per pass: at Dp = 128 two passes of 32 (16 accumulators live beside dK, dV
      // instead of 32): the headroom that lets the dropout draw above fit without spills.
      constexpr int DQK = Dp == 128 ? 32 : DQC;
#pragma unroll
      for (int c0 = 0; c0 < DQC; c0 += DQK) {
        float acc[DQK / 8][4];
#pragma unroll
        for (int n = 0; n < DQK / 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          uint32_t af[4];
          ldmatrix_x4(af, sdS + (rg * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * LDS + kk * 16 +
                              8 * (lane / 16));
#pragma unroll
          for (int dp = 0; dp < DQK / 16; ++dp) {
            uint32_t kf[4];
            ldmatrix_x4_trans(kf, sK + (kk * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * LD +
                                      cg * DQC + c0 + dp * 16 + 8 * (lane / 16));
            mma_m16n8k16<T>(acc[2 * dp], af, kf[0], kf[1]);
            mma_m16n8k16<T>(acc[2 * dp + 1], af, kf[2], kf[3]);
          }
        }
        float* dq = a.dq_accum + static_cast<int64_t>(b * a.Hq + h) * Tq * D;
#pragma unroll
        for (int n = 0; n < DQK / 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = i0 + rg * 16 + g + 8 * (e >> 1);
            const int d = cg * DQC + c0 + n * 8 + 2 * t + (e & 1);
            if (i < Tq && d < D) atomicAdd(dq + static_cast<int64_t>(i) * D + d, acc[n][e] * a.scale);
          }
      }
    }
  }
  cp_async_wait<0>();  // (nothing in flight after the last step; n_steps = 0: K, V)

  // dK = scale dS^T Q and dV, through shared memory (sK, sV, free now) so that rows leave in
  // 16-byte stores.
  __syncthreads();  // every warp is done reading sK, sV
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = kw * 16 + g + 8 * r;
    uint32_t* krow = reinterpret_cast<uint32_t*>(sK + row * LD + half * DW);
    uint32_t* vrow = reinterpret_cast<uint32_t*>(sV + row * LD + half * DW);
#pragma unroll
    for (int n = 0; n < NO; ++n) {
      krow[n * 4 + t] = pack2<T>(dk[n][2 * r] * a.scale, dk[n][2 * r + 1] * a.scale);
      vrow[n * 4 + t] = pack2<T>(dv[n][2 * r], dv[n][2 * r + 1]);
    }
  }
  __syncthreads();
  const int64_t base = (static_cast<int64_t>(bhk) * Tk + j0) * D;
  T* dkp = static_cast<T*>(a.dk) + base;
  T* dvp = static_cast<T*>(a.dv) + base;
  if (D % kVec<T> == 0 && reinterpret_cast<uintptr_t>(a.dk) % 16 == 0 &&
      reinterpret_cast<uintptr_t>(a.dv) % 16 == 0) {
    constexpr int V = kVec<T>;
    const int chunks = D / V;
    for (int idx = threadIdx.x; idx < nk * chunks; idx += NT) {
      const int r = idx / chunks, c = (idx % chunks) * V;
      const int64_t o = static_cast<int64_t>(r) * D + c;
      *reinterpret_cast<Pack<T, V>*>(dkp + o) = *reinterpret_cast<const Pack<T, V>*>(sK + r * LD + c);
      *reinterpret_cast<Pack<T, V>*>(dvp + o) = *reinterpret_cast<const Pack<T, V>*>(sV + r * LD + c);
    }
  } else {
    for (int idx = threadIdx.x; idx < nk * D; idx += NT) {
      const int s = (idx / D) * LD + idx % D;
      dkp[idx] = sK[s];
      dvp[idx] = sV[s];
    }
  }
}

// dq = T(dq_accum), elementwise over [B, Hq, Tq, D].
template <typename T>
__global__ void attention_bwd_dq_convert_kernel(const float* __restrict__ acc, T* __restrict__ dq,
                                                int64_t n) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dq[e] = from_float<T>(acc[e]);
}

// ------------------------------------------------------------------ launchers
template <typename T>
bool strides_vec_ok(const void* p, const Strides3& s, int D) {
  constexpr int V = kVec<T>;
  return aligned(p, 16) && D % V == 0 && s.b % V == 0 && s.h % V == 0 && s.t % V == 0;
}

template <typename K>
cudaError_t set_smem(K kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

template <typename T, int Dp>
cudaError_t fwd_simple_dp(const AttentionFwdArgs& a, cudaStream_t stream) {
  using L = FwdSmem<T, Dp>;
  const bool vec = strides_vec_ok<T>(a.q, a.q_stride, a.D) &&
                   strides_vec_ok<T>(a.k, a.k_stride, a.D) &&
                   strides_vec_ok<T>(a.v, a.v_stride, a.D);
  auto kernel = attention_fwd_simple_kernel<T, Dp>;
  cudaError_t err = set_smem(kernel, L::bytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(a.B * a.Hq), static_cast<unsigned>((a.Tq + L::BM - 1) / L::BM));
  if (grid.y > 65535) return cudaErrorInvalidConfiguration;
  kernel<<<grid, kThreads, L::bytes, stream>>>(a, vec);
  return cudaGetLastError();
}

template <typename T, int Dp>
cudaError_t bwd_simple_dp(const AttentionBwdArgs& a, cudaStream_t stream) {
  using LQ = DqSmem<T, Dp>;
  using LK = KvSmem<T, Dp>;
  const bool vec = strides_vec_ok<T>(a.q, a.q_stride, a.D) &&
                   strides_vec_ok<T>(a.k, a.k_stride, a.D) &&
                   strides_vec_ok<T>(a.v, a.v_stride, a.D) &&
                   strides_vec_ok<T>(a.dout, a.dout_stride, a.D);
  const int64_t rows = static_cast<int64_t>(a.B) * a.Hq * a.Tq;
  const dim3 grid_q(static_cast<unsigned>(a.B * a.Hq), static_cast<unsigned>((a.Tq + LQ::BM - 1) / LQ::BM));
  const dim3 grid_kv(static_cast<unsigned>(a.B * a.Hkv), static_cast<unsigned>((a.Tk + LK::BN - 1) / LK::BN));
  if (grid_q.y > 65535 || grid_kv.y > 65535) return cudaErrorInvalidConfiguration;

  attention_bwd_preprocess_kernel<T>
      <<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  auto dq_kernel = attention_bwd_dq_simple_kernel<T, Dp>;
  if ((err = set_smem(dq_kernel, LQ::bytes)) != cudaSuccess) return err;
  dq_kernel<<<grid_q, kThreads, LQ::bytes, stream>>>(a, vec);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  if (a.Tk == 0) return cudaSuccess;
  auto kv_kernel = attention_bwd_dkdv_simple_kernel<T, Dp>;
  if ((err = set_smem(kv_kernel, LK::bytes)) != cudaSuccess) return err;
  kv_kernel<<<grid_kv, kThreads, LK::bytes, stream>>>(a, vec);
  return cudaGetLastError();
}

// Padded head dim: the smallest of 16, 32, 64, 128 that holds D.
inline int padded_head_dim(int D) { return D <= 16 ? 16 : D <= 32 ? 32 : D <= 64 ? 64 : 128; }

template <typename T>
cudaError_t fwd_simple_typed(const AttentionFwdArgs& a, cudaStream_t stream) {
  switch (padded_head_dim(a.D)) {
    case 16: return fwd_simple_dp<T, 16>(a, stream);
    case 32: return fwd_simple_dp<T, 32>(a, stream);
    case 64: return fwd_simple_dp<T, 64>(a, stream);
    default: return fwd_simple_dp<T, 128>(a, stream);
  }
}

template <typename T>
cudaError_t bwd_simple_typed(const AttentionBwdArgs& a, cudaStream_t stream) {
  switch (padded_head_dim(a.D)) {
    case 16: return bwd_simple_dp<T, 16>(a, stream);
    case 32: return bwd_simple_dp<T, 32>(a, stream);
    case 64: return bwd_simple_dp<T, 64>(a, stream);
    default: return bwd_simple_dp<T, 128>(a, stream);
  }
}

template <typename T, int Dp>
cudaError_t fwd_fa2_dp(const AttentionFwdArgs& a, cudaStream_t stream) {
  using L = tiles::Fa2Fwd<2, Dp>;
  const bool vec = strides_vec_ok<T>(a.q, a.q_stride, a.D) &&
                   strides_vec_ok<T>(a.k, a.k_stride, a.D) &&
                   strides_vec_ok<T>(a.v, a.v_stride, a.D);
  auto kernel = attention_fwd_fa2_kernel<T, Dp>;
  cudaError_t err = set_smem(kernel, L::bytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(a.B * a.Hq), static_cast<unsigned>((a.Tq + L::BM - 1) / L::BM));
  if (grid.y > 65535) return cudaErrorInvalidConfiguration;
  kernel<<<grid, L::kThreads, L::bytes, stream>>>(a, vec);
  return cudaGetLastError();
}

template <typename T>
cudaError_t fwd_fa2_typed(const AttentionFwdArgs& a, cudaStream_t stream) {
  const int D = a.D;
  if (D <= 16) return fwd_fa2_dp<T, 16>(a, stream);
  if (D <= 32) return fwd_fa2_dp<T, 32>(a, stream);
  if (D <= 64) return fwd_fa2_dp<T, 64>(a, stream);
  if (D <= 128) return fwd_fa2_dp<T, 128>(a, stream);
  return fwd_fa2_dp<T, 256>(a, stream);
}

template <typename T, int Dp>
cudaError_t bwd_fa2_dp(const AttentionBwdArgs& a, cudaStream_t stream) {
  using L = tiles::Fa2Bwd<2, Dp>;
  const bool vec = strides_vec_ok<T>(a.q, a.q_stride, a.D) &&
                   strides_vec_ok<T>(a.k, a.k_stride, a.D) &&
                   strides_vec_ok<T>(a.v, a.v_stride, a.D) &&
                   strides_vec_ok<T>(a.dout, a.dout_stride, a.D);
  const int64_t rows = static_cast<int64_t>(a.B) * a.Hq * a.Tq;
  const int64_t n = rows * a.D;
  const dim3 grid(static_cast<unsigned>(a.B * a.Hkv), static_cast<unsigned>((a.Tk + L::BN - 1) / L::BN));
  if (grid.y > 65535) return cudaErrorInvalidConfiguration;

  cudaError_t err = cudaMemsetAsync(a.dq_accum, 0, static_cast<size_t>(n) * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  attention_bwd_preprocess_kernel<T>
      <<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(a);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (a.Tk > 0) {
    auto kernel = attention_bwd_fa2_kernel<T, Dp>;
    if ((err = set_smem(kernel, L::bytes)) != cudaSuccess) return err;
    kernel<<<grid, L::kThreads, L::bytes, stream>>>(a, vec);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 65535);
  attention_bwd_dq_convert_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      a.dq_accum, static_cast<T*>(a.dq), n);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_fa2_typed(const AttentionBwdArgs& a, cudaStream_t stream) {
  const int D = a.D;
  if (D <= 16) return bwd_fa2_dp<T, 16>(a, stream);
  if (D <= 32) return bwd_fa2_dp<T, 32>(a, stream);
  if (D <= 64) return bwd_fa2_dp<T, 64>(a, stream);
  if (D <= 128) return bwd_fa2_dp<T, 128>(a, stream);
  return bwd_fa2_dp<T, 256>(a, stream);
}

// max_d: kAttentionSimpleMaxHeadDim (the simple kernels) or kAttentionFa2MaxHeadDim.
template <typename A>
bool shapes_ok(const A& a, int max_d) {
  return a.B >= 0 && a.Hq > 0 && a.Hkv > 0 && a.Hq % a.Hkv == 0 && a.Tq >= 0 && a.Tk >= 0 &&
         a.D >= 1 && a.D <= max_d && a.dropout_p >= 0.f && a.dropout_p < 1.f;
}

}  // namespace

int attention_max_head_dim(DType dt) {
  return dt == DType::kFloat32 ? kAttentionSimpleMaxHeadDim : kAttentionFa2MaxHeadDim;
}

bool attention_head_dim_supported(DType dt, int D) {
  return D >= 1 && D <= attention_max_head_dim(dt);
}

cudaError_t attention_fwd_simple(DType dt, const AttentionFwdArgs& a, cudaStream_t stream) {
  if (!shapes_ok(a, kAttentionSimpleMaxHeadDim)) return cudaErrorInvalidValue;
  if (a.B == 0 || a.Tq == 0) return cudaSuccess;
  switch (dt) {
    case DType::kFloat32: return fwd_simple_typed<float>(a, stream);
    case DType::kFloat16: return fwd_simple_typed<__half>(a, stream);
    case DType::kBFloat16: return fwd_simple_typed<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t attention_fwd_fa2(DType dt, const AttentionFwdArgs& a, cudaStream_t stream) {
  if (!shapes_ok(a, kAttentionFa2MaxHeadDim)) return cudaErrorInvalidValue;
  if (a.B == 0 || a.Tq == 0) return cudaSuccess;
  switch (dt) {
    case DType::kFloat16: return fwd_fa2_typed<__half>(a, stream);
    case DType::kBFloat16: return fwd_fa2_typed<__nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;  // fp32: attention_fwd_simple
  }
}

// fp16 / bf16: the FA2 kernel; fp32: the simple kernel (FMAs from shared memory, no TF32).
cudaError_t attention_fwd(DType dt, const AttentionFwdArgs& a, cudaStream_t stream) {
  return dt == DType::kFloat32 ? attention_fwd_simple(dt, a, stream)
                               : attention_fwd_fa2(dt, a, stream);
}

// No query: dq is empty, dk and dv are zero.
static cudaError_t zero_dk_dv(DType dt, const AttentionBwdArgs& a, cudaStream_t stream) {
  const size_t n = static_cast<size_t>(a.B) * a.Hkv * a.Tk * a.D * (dt == DType::kFloat32 ? 4 : 2);
  cudaError_t err = cudaMemsetAsync(a.dk, 0, n, stream);
  return err != cudaSuccess ? err : cudaMemsetAsync(a.dv, 0, n, stream);
}

cudaError_t attention_bwd_simple(DType dt, const AttentionBwdArgs& a, cudaStream_t stream) {
  if (!shapes_ok(a, kAttentionSimpleMaxHeadDim)) return cudaErrorInvalidValue;
  if (a.B == 0) return cudaSuccess;
  if (a.Tq == 0) return zero_dk_dv(dt, a, stream);
  switch (dt) {
    case DType::kFloat32: return bwd_simple_typed<float>(a, stream);
    case DType::kFloat16: return bwd_simple_typed<__half>(a, stream);
    case DType::kBFloat16: return bwd_simple_typed<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t attention_bwd_fa2(DType dt, const AttentionBwdArgs& a, cudaStream_t stream) {
  if (!shapes_ok(a, kAttentionFa2MaxHeadDim) || dt == DType::kFloat32 || a.dq_accum == nullptr)
    return cudaErrorInvalidValue;
  if (a.B == 0) return cudaSuccess;
  if (a.Tq == 0) return zero_dk_dv(dt, a, stream);
  switch (dt) {
    case DType::kFloat16: return bwd_fa2_typed<__half>(a, stream);
    case DType::kBFloat16: return bwd_fa2_typed<__nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

size_t attention_bwd_workspace(DType dt, int B, int Hq, int Tq, int D) {
  return dt == DType::kFloat32 ? 0 : static_cast<size_t>(B) * Hq * Tq * D;
}

// fp16 / bf16: the FA2 kernels (needs a.dq_accum); fp32: the simple kernels.
cudaError_t attention_bwd(DType dt, const AttentionBwdArgs& a, cudaStream_t stream) {
  return dt == DType::kFloat32 ? attention_bwd_simple(dt, a, stream)
                               : attention_bwd_fa2(dt, a, stream);
}

}  // namespace cuda
}  // namespace fastattn
