// Host emulation of the subset of CUDA the fastattn kernels use. Blocks run one after another;
// a block's threads are fibers (ucontext) on one OS thread, switched only at the barriers
// (__syncthreads, and the warp barrier inside every warp-collective operation), so a block runs
// in lockstep phases: every thread runs up to its next barrier, then the next phase begins.
// (Threads as OS threads made a barrier cost milliseconds on a busy 2-core machine.)
//
// Warp-collective operations (shuffles, mma.sync, ldmatrix) go through a per-warp exchange:
// every lane writes its operands into its slot, a warp barrier, every lane reads the slots it
// needs. Two slot sets alternate (per-thread phase), so a lane that runs ahead into the next
// collective writes the other set while slow lanes still read this one; it cannot get two ahead,
// because the next barrier waits for them. mma.sync m16n8k16 and ldmatrix use the per-lane
// fragment layouts of the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point
// type"; ldmatrix .m8n8 .x4 [.trans]), so a kernel that puts a wrong element in a wrong register
// computes a wrong answer here too. cp.async copies are deferred: each thread queues its copies,
// commit_group closes a group, wait_group<N> performs all but the newest N groups; the
// destination is poisoned (0xFF: NaN) at issue, so a read of a tile before its wait + barrier,
// or a restage while another warp still reads the old tile, computes NaNs. Warps are scheduled
// warp-major (each runs as far as the barriers let it) so that such races happen here.
#pragma once
#define FASTATTN_HOST_EMULATION 1
#include <ucontext.h>

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <vector>

#undef __global__
#undef __device__
#undef __forceinline__
#undef __noinline__
#undef __shared__
#undef __launch_bounds__
#undef __align__
#define __global__
#define __device__
#define __forceinline__ inline
#define __noinline__
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

namespace emu {
// One warp's exchange slots: [phase][lane][word].
struct WarpX {
  uint32_t w[2][32][8];
  const void* p[2][32];
};
struct CpAsyncCopy {
  void* dst;
  const void* src;
  size_t n;
};
struct Fiber {
  ucontext_t uc;
  uint3 tid;
  unsigned xphase = 0;  // warp-exchange phase
  std::vector<CpAsyncCopy> cp_open;              // not yet committed
  std::deque<std::vector<CpAsyncCopy>> cp_groups;  // committed, pending
  bool done = false;
  const struct Barrier* waiting = nullptr;  // the barrier this fiber waits at, and its generation
  unsigned waiting_gen = 0;
  bool runnable() const;
};
// A barrier over `alive` fibers; a fiber that exits counts as arrived from then on.
struct Barrier {
  unsigned count = 0, gen = 0, alive = 0;
};
struct Block {
  Barrier bar;
  std::vector<Barrier> warp_bar;
  std::vector<WarpX> wx;
  int vote = 0;
  unsigned char* smem = nullptr;
  std::function<void()> body;
};
inline Fiber* cur = nullptr;
inline Block* blk = nullptr;
inline ucontext_t sched_uc;
inline uint3 bid;
inline dim3 g_block, g_grid;
inline void yield() { swapcontext(&cur->uc, &sched_uc); }
inline bool Fiber::runnable() const {
  return !done && (waiting == nullptr || waiting->gen != waiting_gen);
}
inline void arrive_and_wait(Barrier& b) {
  const unsigned gen = b.gen;
  if (++b.count == b.alive) {
    b.count = 0;
    ++b.gen;
    return;
  }
  cur->waiting = &b;
  cur->waiting_gen = gen;
  while (b.gen == gen) yield();
  cur->waiting = nullptr;
}
inline void drop(Barrier& b) {
  --b.alive;
  if (b.count > 0 && b.count == b.alive) {
    b.count = 0;
    ++b.gen;
  }
}
}  // namespace emu
#define threadIdx (emu::cur->tid)
#define blockIdx (emu::bid)
#define blockDim (emu::g_block)
#define gridDim (emu::g_grid)

inline void __syncthreads() { emu::arrive_and_wait(emu::blk->bar); }
inline void __syncwarp_emu() { emu::arrive_and_wait(emu::blk->warp_bar[threadIdx.x / 32]); }
// Two barriers: every thread has voted before the result is read, and has read it before the
// next call clears it.
inline int __syncthreads_or(int pred) {
  __syncthreads();
  if (pred) emu::blk->vote = 1;
  __syncthreads();
  const int r = emu::blk->vote;
  __syncthreads();
  emu::blk->vote = 0;
  return r;
}
namespace emu {
inline unsigned lane() { return threadIdx.x % 32; }
inline WarpX& warpx() { return blk->wx[threadIdx.x / 32]; }
// Start a collective: this lane's slot set; finish with xsync() then read, then xdone().
inline unsigned xbegin() { return cur->xphase & 1; }
inline void xsync() { __syncwarp_emu(); }
inline void xdone() { ++cur->xphase; }
}  // namespace emu
inline float __shfl_xor_sync(unsigned, float v, int o) {
  auto& X = emu::warpx();
  const unsigned ph = emu::xbegin(), l = emu::lane();
  std::memcpy(&X.w[ph][l][0], &v, 4);
  emu::xsync();
  float r;
  std::memcpy(&r, &X.w[ph][l ^ static_cast<unsigned>(o)][0], 4);
  emu::xdone();
  return r;
}
// Bit l of the result: lane l's predicate (every lane of the warp takes part, as the kernels'
// full masks say).
inline unsigned __ballot_sync(unsigned, int pred) {
  auto& X = emu::warpx();
  const unsigned ph = emu::xbegin(), l = emu::lane();
  const unsigned v = pred != 0;
  std::memcpy(&X.w[ph][l][0], &v, 4);
  emu::xsync();
  unsigned r = 0;
  for (unsigned k = 0; k < 32; ++k) {
    unsigned b;
    std::memcpy(&b, &X.w[ph][k][0], 4);
    r |= b << k;
  }
  emu::xdone();
  return r;
}
// Fibers switch only at barriers, so a read-modify-write is atomic here.
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
inline float __frcp_rn(float x) { return 1.0f / x; }
inline int min(int a, int b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline unsigned char* emu_dynamic_smem() { return emu::blk->smem; }

#define cudaFuncSetAttribute(...) (cudaSuccess)
#define cudaGetLastError() (cudaSuccess)
#define cudaMemsetAsync(p, v, n, s) (std::memset((p), (v), (n)), cudaSuccess)

namespace emu {
inline void fiber_main() {
  blk->body();
  cur->done = true;
  drop(blk->bar);
  drop(blk->warp_bar[cur->tid.x / 32]);
}  // returns to uc_link (the scheduler)

template <typename F>
struct Launch {
  F f;
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A... args) {
    g_grid = grid;
    g_block = block;
    const unsigned nt = block.x * block.y * block.z, nw = (nt + 31) / 32;
    constexpr size_t kStack = 256 * 1024;
    std::vector<unsigned char> dyn(smem + 128);
    std::vector<unsigned char> stacks(static_cast<size_t>(nt) * kStack);
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          Block B;
          B.bar.alive = nt;
          B.warp_bar.resize(nw);
          for (unsigned w = 0; w < nw; ++w) B.warp_bar[w].alive = std::min(32u, nt - 32 * w);
          B.wx.resize(nw);
          std::fill(dyn.begin(), dyn.end(), 0xFF);  // poison shared memory (NaN floats)
          B.smem = dyn.data();
          B.body = [&] { f(args...); };
          blk = &B;
          bid = uint3{bx, by, bz};
          std::vector<Fiber> fibers(nt);
          for (unsigned t = 0; t < nt; ++t) {
            Fiber& fb = fibers[t];
            fb.tid = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            getcontext(&fb.uc);
            fb.uc.uc_stack.ss_sp = stacks.data() + t * kStack;
            fb.uc.uc_stack.ss_size = kStack;
            fb.uc.uc_link = &sched_uc;
            makecontext(&fb.uc, fiber_main, 0);
          }
          // Warp-major schedule: warp 0 runs as far as it can (until all its lanes wait at
          // __syncthreads or are done), then warp 1, ...: warps drift as far apart as the
          // barriers allow, so a missing __syncthreads shows up as a race.
          unsigned left = nt;
          while (left > 0)
            for (unsigned w = 0; w < nw; ++w)
              for (bool any = true; any;) {
                any = false;
                for (unsigned t = 32 * w; t < std::min(nt, 32 * w + 32); ++t) {
                  Fiber& fb = fibers[t];
                  if (!fb.runnable()) continue;
                  any = true;
                  cur = &fb;
                  swapcontext(&sched_uc, &fb.uc);
                  if (fb.done) --left;
                }
              }
          cur = nullptr;
          blk = nullptr;
        }
  }
};
template <typename F>
Launch<F> launch(F f, dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  return Launch<F>{f, grid, block, smem};
}
}  // namespace emu

// ---- tensor-core and async-copy primitives of csrc/cuda/attention.cu (FASTATTN_HOST_EMULATION)
namespace emu {
inline float bits_to_float(uint16_t b, __half*) {
  __half_raw r;
  r.x = b;
  return __half2float(__half(r));
}
inline float bits_to_float(uint16_t b, __nv_bfloat16*) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <typename T>
inline float elem(uint32_t reg, int half) {
  return bits_to_float(static_cast<uint16_t>(half ? reg >> 16 : reg & 0xFFFF), static_cast<T*>(nullptr));
}
}  // namespace emu

// D = A B + C, m16n8k16, A row-major 16x16, B column-major 16x8, fp32 accumulate.
// PTX fragment layout, groupID g = lane >> 2, threadID_in_group t = lane % 4:
//   A: reg r holds (row g + 8 (r & 1), cols 2t + 8 (r >> 1) + {0, 1})
//   B: reg r holds (rows 2t + 8 r + {0, 1}, col g)
//   C, D: element e holds (row g + 8 (e >> 1), col 2t + (e & 1))
template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  auto& X = emu::warpx();
  const unsigned ph = emu::xbegin(), l = emu::lane();
  for (int r = 0; r < 4; ++r) X.w[ph][l][r] = a[r];
  X.w[ph][l][4] = b0;
  X.w[ph][l][5] = b1;
  emu::xsync();
  const int g = l >> 2, t = l & 3;
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    float acc = d[e];
    for (int k = 0; k < 16; ++k) {
      // A(row, k): lane (row % 8) * 4 + (k % 8) / 2, reg (row >= 8) + 2 (k >= 8), half k % 2
      const uint32_t ra = X.w[ph][(row % 8) * 4 + (k % 8) / 2][(row >= 8) + 2 * (k >= 8)];
      // B(k, col): lane col * 4 + (k % 8) / 2, reg 4 + (k >= 8), half k % 2
      const uint32_t rb = X.w[ph][col * 4 + (k % 8) / 2][4 + (k >= 8)];
      acc = std::fma(emu::elem<T>(ra, k % 2), emu::elem<T>(rb, k % 2), acc);
    }
    out[e] = acc;
  }
  emu::xdone();
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the row addresses of
// 8x8 matrix i; register i of lane l receives row l / 4, elements 2 (l % 4) + {0, 1} of matrix i
// (.trans: elements (rows 2 (l % 4) + {0, 1}, column l / 4), i.e. of the transposed matrix).
inline void ldmatrix_x4_impl(uint32_t (&r)[4], const void* row_addr, bool trans) {
  auto& X = emu::warpx();
  const unsigned ph = emu::xbegin(), l = emu::lane();
  X.p[ph][l] = row_addr;
  emu::xsync();
  for (int i = 0; i < 4; ++i) {
    uint16_t h[2];
    for (int e = 0; e < 2; ++e) {
      const uint16_t* row;
      int col;
      if (!trans) {
        row = static_cast<const uint16_t*>(X.p[ph][8 * i + l / 4]);
        col = 2 * (l % 4) + e;
      } else {
        row = static_cast<const uint16_t*>(X.p[ph][8 * i + 2 * (l % 4) + e]);
        col = l / 4;
      }
      h[e] = row[col];
    }
    r[i] = static_cast<uint32_t>(h[0]) | (static_cast<uint32_t>(h[1]) << 16);
  }
  emu::xdone();
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr) { ldmatrix_x4_impl(r, row_addr, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_addr) {
  ldmatrix_x4_impl(r, row_addr, true);
}
// In flight, the destination holds garbage (the 0xFF poison) until the wait performs the copy:
// a read before the wait, or a restage while another warp still reads the old tile, sees NaNs.
inline void cp_async_16(void* dst, const void* src) {
  std::memset(dst, 0xFF, 16);
  emu::cur->cp_open.push_back({dst, src, 16});
}
inline void cp_async_commit() {
  emu::cur->cp_groups.push_back(std::move(emu::cur->cp_open));
  emu::cur->cp_open.clear();
}
template <int N>
inline void cp_async_wait() {
  while (emu::cur->cp_groups.size() > static_cast<size_t>(N)) {
    for (const auto& c : emu::cur->cp_groups.front()) std::memcpy(c.dst, c.src, c.n);
    emu::cur->cp_groups.pop_front();
  }
}

// nvcuda::wmma, emulated: every lane holds the whole 16x16 tile and computes it redundantly;
// lane 0 stores. Warp barriers around each op keep the lanes in step.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  float x[256];
};
template <typename Use, int M, int N, int K, typename T, typename L>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, float v) {
  for (int i = 0; i < 256; ++i) f.x[i] = v;
}
inline float tof(float v) { return v; }
inline float tof(__half v) { return __half2float(v); }
inline float tof(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename Use, typename T, typename L>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  __syncwarp_emu();
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.x[r * 16 + c] = tof(std::is_same_v<L, row_major> ? p[r * ldm + c] : p[r + c * ldm]);
  __syncwarp_emu();
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p,
                             unsigned ldm, layout_t l) {
  __syncwarp_emu();
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = l == mem_row_major ? p[r * ldm + c] : p[r + c * ldm];
  __syncwarp_emu();
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t l) {
  __syncwarp_emu();
  if (threadIdx.x % 32 == 0)
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c) (l == mem_row_major ? p[r * ldm + c] : p[r + c * ldm]) = f.x[r * 16 + c];
  __syncwarp_emu();
}
template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
                     const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.x[i * 16 + j];
      for (int k = 0; k < 16; ++k) s += a.x[i * 16 + k] * b.x[k * 16 + j];
      out[i * 16 + j] = s;
    }
  std::memcpy(d.x, out, sizeof out);
}
}  // namespace wmma
}  // namespace nvcuda
