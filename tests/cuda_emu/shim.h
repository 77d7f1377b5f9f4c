// Host emulation of the subset of CUDA the fastattn kernels use: blocks run one after another,
// each block's threads are std::threads; __syncthreads and warp shuffles are barriers.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>
#include <memory>
#include <algorithm>
#include <cstdint>

#undef __global__
#undef __device__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#undef __align__
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

namespace emu {
struct Ctx {
  std::barrier<>* block;
  std::vector<std::unique_ptr<std::barrier<>>>* warps;
  float* slots;  // [threads] exchange for shuffles
  unsigned char* smem;
};
inline thread_local Ctx ctx;
inline thread_local uint3 tid, bid;
inline dim3 g_block, g_grid;
}  // namespace emu
#define threadIdx (emu::tid)
#define blockIdx (emu::bid)
#define blockDim (emu::g_block)
#define gridDim (emu::g_grid)

inline void __syncthreads() { emu::ctx.block->arrive_and_wait(); }
inline void __syncwarp_emu() { (*emu::ctx.warps)[threadIdx.x / 32]->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
  const unsigned t = threadIdx.x;
  __syncwarp_emu();
  emu::ctx.slots[t] = v;
  __syncwarp_emu();
  const float r = emu::ctx.slots[(t & ~31u) | ((t & 31u) ^ o)];
  __syncwarp_emu();
  return r;
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
inline unsigned char* emu_dynamic_smem() { return emu::ctx.smem; }

#define cudaFuncSetAttribute(...) (cudaSuccess)
#define cudaGetLastError() (cudaSuccess)
#define cudaMemsetAsync(p, v, n, s) (std::memset((p), (v), (n)), cudaSuccess)

namespace emu {
template <typename F>
struct Launch {
  F f;
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A... args) {
    g_grid = grid;
    g_block = block;
    const unsigned nt = block.x * block.y * block.z;
    std::vector<unsigned char> dyn(smem + 128);
    std::vector<float> slots(nt);
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          std::barrier<> bar(nt);
          std::vector<std::unique_ptr<std::barrier<>>> warps;
          for (unsigned w = 0; w < (nt + 31) / 32; ++w)
            warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, nt - 32 * w)));
          std::fill(dyn.begin(), dyn.end(), 0xFF);  // poison shared memory (NaN floats)
          std::vector<std::thread> ths;
          for (unsigned t = 0; t < nt; ++t) {
            ths.emplace_back([&, t] {
              ctx = Ctx{&bar, &warps, slots.data(), dyn.data()};
              tid = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
              bid = uint3{bx, by, bz};
              f(args...);
              warps[t / 32]->arrive_and_drop();
              bar.arrive_and_drop();
            });
          }
          for (auto& th : ths) th.join();
        }
  }
};
template <typename F>
Launch<F> launch(F f, dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  return Launch<F>{f, grid, block, smem};
}
}  // namespace emu

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
