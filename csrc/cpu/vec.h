// Small helpers shared by the CPU kernels: load any supported dtype as float vectors,
// store float vectors back, and a per-thread chunking that keeps reductions deterministic.
#pragma once

#include <type_traits>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

// FASTATTN_HW_BF16_CVT: this build can emit AVX512_BF16 instructions (x86 AVX-512 and a compiler
// that knows them). bf16dot.h's dot-product kernels use the same condition.
#if defined(CPU_CAPABILITY_AVX512) && (defined(__x86_64__) || defined(__i386__)) && \
    (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 10))
#include <cpuid.h>
#include <immintrin.h>
#define FASTATTN_HW_BF16_CVT 1
#else
#define FASTATTN_HW_BF16_CVT 0
#endif

namespace fastattn {
namespace cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVecSize = Vec::size();

// Accumulation type: float for float and bfloat16, double for double.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// Does this CPU execute AVX512_BF16 (cpuid leaf 7 subleaf 1, EAX bit 5)? The build's AVX-512
// check (fastattn/_dispatch.py) already covers the OS saving zmm state.
inline bool cpu_has_avx512_bf16() {
#if FASTATTN_HW_BF16_CVT
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
    return ((a >> 5) & 1u) != 0;
  }();
  return ok;
#else
  return false;
#endif
}

// float -> bfloat16 stores round in hardware (AVX512_BF16 `vcvtneps2bf16`: one instruction for
// ATen's seven) where the CPU has it. Decided once, when the extension loads: a per-store test
// of the environment would cost more than the rounding. FASTATTN_CPU_BF16_CVT=0 keeps the
// emulated rounding that a CPU without AVX512_BF16 runs (tests compare the two). Both round to
// nearest even; the instruction flushes denormal inputs (|x| < 2^-126) to a signed zero, an
// error below 1.2e-38, and keeps a NaN's sign and payload where ATen writes 0xffff.
inline const bool kHwBf16Cvt = [] {
  if (!cpu_has_avx512_bf16()) return false;
  const char* env = std::getenv("FASTATTN_CPU_BF16_CVT");
  return env == nullptr || std::strcmp(env, "0") != 0;
}();

// Load Vec::size() elements of T as float.
template <typename T>
inline Vec load_f(const T* p);
template <>
inline Vec load_f<float>(const float* p) {
  return Vec::loadu(p);
}
template <>
inline Vec load_f<c10::BFloat16>(const c10::BFloat16* p) {
  Vec out;
  at::vec::load_to_float<c10::BFloat16>(p, out);
  return out;
}

// Store a float vector as Vec::size() elements of T.
template <typename T>
inline void store_f(const Vec& v, T* p);
template <>
inline void store_f<float>(const Vec& v, float* p) {
  v.store(p);
}
template <>
inline void store_f<c10::BFloat16>(const Vec& v, c10::BFloat16* p) {
#if FASTATTN_HW_BF16_CVT
  // One vector's rounding and a plain 256-bit store: convert_from_float rounds two vectors,
  // packs them and masks the store, and the bfloat16 LayerNorm forward, bound by its vector
  // ops, ran slower than the float32 one at half the bytes. The instruction goes in as inline
  // assembly: the build targets plain AVX-512, and a target-attributed helper would not inline.
  __m256i r;
  if (kHwBf16Cvt) {
    asm("vcvtneps2bf16 %1, %0" : "=v"(r) : "v"(__m512(v)));
  } else {
    r = at::vec::cvtfp32_bf16(__m512(v));  // ATen's rounding: convert_from_float's bits
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), r);
#else
  // convert_from_float packs two float vectors; store only the first half.
  at::vec::convert_from_float<c10::BFloat16>(v, v).store(p, kVecSize);
#endif
}

// Non-temporal ("streaming") store of a float vector to a 64-byte aligned address (AVX-512
// float only; elsewhere a plain store). For outputs much larger than the last-level cache it
// skips the read-for-ownership of the destination line: 2 memory passes instead of 3.
inline void store_stream(const Vec& v, float* p) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_stream_ps(p, __m512(v));
#else
  v.store(p);
#endif
}
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}
inline bool aligned64(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 63) == 0; }

// A float vector stored as T: a streaming store where the caller asks for one (float outputs
// whose rows stay 64-byte aligned: the caller's rule, usually kStreamBytes below), else plain.
template <typename T>
inline void store_out(const Vec& v, T* p, bool stream) {
  if constexpr (std::is_same_v<T, float>) {
    if (stream) return store_stream(v, p);
  }
  store_f<T>(v, p);
}

// Outputs at least this large are written with streaming stores: well past what the
// last-level cache (32 MiB L3 shared here) could hand to the next op anyway.
constexpr int64_t kStreamBytes = 16 << 20;

// Whether an [N, M] output of elem-byte elements at p is written with streaming stores: float
// (store_stream's type), rows that stay 64-byte aligned, and past kStreamBytes. Skipping the
// read-for-ownership of every line saves a third of a one-in-one-out kernel's memory traffic.
inline bool streamed(const void* p, int64_t N, int64_t M, int64_t elem) {
  return elem == 4 && (M % 16) == 0 && N * M * elem >= kStreamBytes && aligned64(p);
}

// Split [0, n) into one contiguous chunk per thread: deterministic for a given thread
// count, so per-chunk partial sums reduce to bitwise-identical results run to run.
inline int64_t num_chunks(int64_t n, int64_t min_per_chunk) {
  int64_t threads = at::get_num_threads();
  return std::max<int64_t>(1, std::min<int64_t>(threads, n / std::max<int64_t>(1, min_per_chunk)));
}
inline void chunk_range(int64_t n, int64_t chunks, int64_t c, int64_t& begin, int64_t& end) {
  int64_t base = n / chunks, rem = n % chunks;
  begin = c * base + std::min(c, rem);
  end = begin + base + (c < rem ? 1 : 0);
}

// Sum per-chunk partial column sums [chunks, M] over chunks, in chunk order (deterministic),
// in parallel over columns: the second stage of the dweight / dbias reductions.
inline void reduce_chunks(const float* part, float* outp, int64_t chunks, int64_t M) {
  at::parallel_for(0, M, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      float s = 0.f;
      for (int64_t c = 0; c < chunks; ++c) s += part[c * M + j];
      outp[j] = s;
    }
  });
}

}  // namespace cpu
}  // namespace fastattn
