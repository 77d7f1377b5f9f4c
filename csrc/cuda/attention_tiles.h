// Tile shapes and shared-memory layouts of the FlashAttention-2 kernels in attention.cu.
// Plain constexpr C++ (no CUDA headers): scripts/cuda_check.sh compiles it on the host to print
// the dynamic shared memory of every instantiation next to ptxas's registers and spills.
#pragma once

#include <cstddef>

namespace fastattn {
namespace cuda {
namespace tiles {

// Dynamic shared memory a block may opt into (cudaFuncAttributeMaxDynamicSharedMemorySize).
constexpr size_t kSmemOptInSm80 = 166912;  // 163 KB
constexpr size_t kSmemOptInSm90 = 232448;  // 227 KB
constexpr size_t align128(size_t n) { return (n + 127) / 128 * 128; }

// Forward, element size E bytes (2: fp16 / bf16), head dim padded to Dp (a multiple of 16).
// 4 warps x 16 query rows. Key blocks of 64 (32 for Dp = 256, where O alone is 128 registers
// per lane). Shared: Q [BM][LD], K and V [2 stages][BN][LD], key_ok [2][BN]; rows padded by 16
// bytes so that ldmatrix's 8 row addresses fall in distinct bank groups.
template <int E, int Dp>
struct Fa2Fwd {
  static_assert(Dp % 16 == 0 && Dp <= 256, "head dim padded to a multiple of 16, at most 256");
  static constexpr int kWarps = 4, kThreads = 32 * kWarps;
  static constexpr int BM = 16 * kWarps;
  static constexpr int BN = Dp <= 128 ? 64 : 32;
  static constexpr int LD = Dp + 16 / E;
  // Q's A fragments stay in registers across key blocks up to Dp = 128 (Dp / 4 registers);
  // at 256 they are re-read from shared memory each block (the registers go to O).
  static constexpr bool kQInRegisters = Dp <= 128;
  static constexpr size_t q = 0;
  static constexpr size_t k = q + align128(size_t(E) * BM * LD);
  static constexpr size_t v = k + align128(size_t(2) * E * BN * LD);
  static constexpr size_t key_ok = v + align128(size_t(2) * E * BN * LD);
  static constexpr size_t bytes = key_ok + align128(2 * BN);
  static_assert(bytes <= kSmemOptInSm80, "FA2 forward tiles exceed sm_80's shared memory");
};

// Backward (dK / dV kernel): 64 keys per block, 16 per key warp; query blocks of 64 (32 from
// Dp = 128, where dK and dV take Dp registers per lane). Up to Dp = 128: 4 warps, each keeps the
// whole dK, dV rows of its 16 keys in registers and feeds S^T / dS^T to the dK / dV products in
// place. Dp = 256 (dK + dV would be 256 registers per lane): 8 warps, kSplit = 2; warps w and
// w + 4 share keys 16 (w % 4) ..: S^T / dP^T are split by query (16 each), P^T and dS^T go
// through shared memory (p, ds) and the dK / dV accumulators are split by head-dim half (128
// registers per lane), as FlashAttention-2 does at this head dim. Shared: K, V [BN][LD], Q and
// dO [2 stages][BM][LD], dS (and P at kSplit = 2) [BM][LDS], lse and Delta [2][BM] floats,
// key_ok.
template <int E, int Dp>
struct Fa2Bwd {
  static_assert(Dp % 16 == 0 && (Dp <= 128 || Dp == 256),
                "head dim padded to a multiple of 16 up to 128, or to 256");
  static constexpr int kSplit = Dp <= 128 ? 1 : 2;
  static constexpr int kWarps = 4 * kSplit, kThreads = 32 * kWarps;
  static constexpr int BN = 64;
  static constexpr int BM = Dp <= 64 ? 64 : 32;
  static constexpr int LD = Dp + 16 / E;
  static constexpr int LDS = BN + 16 / E;
  static constexpr size_t k = 0;
  static constexpr size_t v = k + align128(size_t(E) * BN * LD);
  static constexpr size_t q = v + align128(size_t(E) * BN * LD);
  static constexpr size_t dout = q + align128(size_t(2) * E * BM * LD);
  static constexpr size_t ds = dout + align128(size_t(2) * E * BM * LD);
  static constexpr size_t p = ds + align128(size_t(E) * BM * LDS);
  static constexpr size_t lse = p + (kSplit > 1 ? align128(size_t(E) * BM * LDS) : 0);
  static constexpr size_t delta = lse + align128(2 * 4 * BM);
  static constexpr size_t key_ok = delta + align128(2 * 4 * BM);
  static constexpr size_t bytes = key_ok + align128(BN);
  static_assert(bytes <= kSmemOptInSm80, "FA2 backward tiles exceed sm_80's shared memory");
};

}  // namespace tiles
}  // namespace cuda
}  // namespace fastattn
