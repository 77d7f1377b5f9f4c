// Register-only arithmetic loops that measure the CPU's peak rates for benchmarks/ceilings.py.
//
// Compiled on first use by torch.utils.cpp_extension.load with plain -O2 and no -m flags: every
// SIMD function carries its own target attribute, so this file builds on any x86-64 (and, with
// the bodies compiled out, elsewhere). Python checks /proc/cpuinfo before calling a function
// whose instructions the CPU may lack; each entry point also re-checks with
// __builtin_cpu_supports so a wrong call returns -1 instead of dying of SIGILL.
//
// Each loop keeps NACC independent accumulators in registers and never touches memory, so the
// only limit is how many FMA / dot-product instructions the core retires per cycle. NACC must
// cover latency x issue ports (Zen 4: 4-cycle FMA x 2 pipes = 8; vdpbf16ps 6 x 2 = 12; Intel
// server cores: 4 x 2 = 8); 16 covers all of them and still leaves registers for the operands.

#include <pybind11/pybind11.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <utility>
#include <vector>

#if defined(__unix__)
#include <time.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PEAK_X86 1
#else
#define PEAK_X86 0
#endif

namespace {

constexpr int NACC = 16;

// The recurrence acc = acc * a + b with a just below 1 converges to b / (1 - a): the values stay
// normal (no denormal slow path, no overflow) however long the loop runs, and the compiler
// cannot fold it because it does not know the trip count.
constexpr float kMul = 0.999999f;
constexpr float kAdd = 1e-6f;

#if PEAK_X86
__attribute__((target("avx512f"))) double fma_avx512(long iters) {
  __m512 acc[NACC];
  for (int i = 0; i < NACC; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(i));
  const __m512 a = _mm512_set1_ps(kMul), b = _mm512_set1_ps(kAdd);
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < NACC; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  }
  __m512 s = acc[0];
  for (int i = 1; i < NACC; ++i) s = _mm512_add_ps(s, acc[i]);
  return _mm512_reduce_add_ps(s);  // returned so the loop is not dead code
}

// AVX2 has 16 ymm registers: 12 accumulators + 2 operands fit without spilling.
__attribute__((target("avx2,fma"))) double fma_avx2(long iters) {
  constexpr int N = 12;
  __m256 acc[N];
  for (int i = 0; i < N; ++i) acc[i] = _mm256_set1_ps(static_cast<float>(i));
  const __m256 a = _mm256_set1_ps(kMul), b = _mm256_set1_ps(kAdd);
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < N; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  }
  __m256 s = acc[0];
  for (int i = 1; i < N; ++i) s = _mm256_add_ps(s, acc[i]);
  alignas(32) float out[8];
  _mm256_store_ps(out, s);
  double r = 0;
  for (float v : out) r += v;
  return r;
}

// vdpbf16ps: 32 bf16 pairs per instruction, each fp32 lane adds two products -> 64 FLOP.
// The operands are small so the fp32 accumulators grow slowly and never overflow.
__attribute__((target("avx512f,avx512bf16"))) double dpbf16_avx512(long iters) {
  __m512 acc[NACC];
  for (int i = 0; i < NACC; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(i));
  const __m512 half = _mm512_set1_ps(1e-3f);
  const __m512bh x = _mm512_cvtne2ps_pbh(half, half);
  const __m512bh y = _mm512_cvtne2ps_pbh(half, half);
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < NACC; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], x, y);
  }
  __m512 s = acc[0];
  for (int i = 1; i < NACC; ++i) s = _mm512_add_ps(s, acc[i]);
  return _mm512_reduce_add_ps(s);
}
#endif

enum class Kind { FmaAvx512, FmaAvx2, DpBf16 };

// FLOP per loop iteration of one thread.
double flop_per_iter(Kind k) {
  switch (k) {
    case Kind::FmaAvx512:
      return NACC * 16 * 2.0;
    case Kind::FmaAvx2:
      return 12 * 8 * 2.0;
    case Kind::DpBf16:
      return NACC * 16 * 4.0;
  }
  return 0;
}

bool supported(Kind k) {
#if PEAK_X86
  __builtin_cpu_init();
  switch (k) {
    case Kind::FmaAvx512:
      return __builtin_cpu_supports("avx512f");
    case Kind::FmaAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Kind::DpBf16:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
  }
#endif
  (void)k;
  return false;
}

double run_one(Kind k, long iters) {
#if PEAK_X86
  switch (k) {
    case Kind::FmaAvx512:
      return fma_avx512(iters);
    case Kind::FmaAvx2:
      return fma_avx2(iters);
    case Kind::DpBf16:
      return dpbf16_avx512(iters);
  }
#endif
  (void)k;
  (void)iters;
  return 0;
}

// CPU time this thread has run, in seconds (0 where there is no per-thread clock).
double thread_cpu_seconds() {
#if defined(__unix__)
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
#else
  return 0.0;
#endif
}

// Runs the loop on `threads` std::threads at once (torch's thread count is passed in, so the
// peak covers the same cores the benchmarks use). Returns (wall, cpu) GFLOP/s of the whole
// machine: wall = total FLOP over the wall time from a common start signal to the last thread's
// finish (the ceiling); cpu = the sum over threads of FLOP over that thread's own CPU time, what
// the cores reach while they actually run the loop. wall well below cpu means other processes
// shared the cores during the measurement. Thread creation is outside the timed span.
std::pair<double, double> peak_gflops(Kind k, long iters, int threads) {
  if (!supported(k) || iters <= 0 || threads <= 0) return {-1.0, -1.0};
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<double> sink(threads, 0.0), cpu(threads, 0.0);
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) {
      }
      const double c0 = thread_cpu_seconds();
      sink[t] = run_one(k, iters);
      cpu[t] = thread_cpu_seconds() - c0;
    });
  }
  while (ready.load() < threads) {
  }
  const auto t0 = std::chrono::steady_clock::now();
  go.store(true, std::memory_order_release);
  for (auto& th : pool) th.join();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  volatile double keep = 0;  // consume the results so no loop is optimised away
  for (double v : sink) keep = keep + v;
  (void)keep;
  const double per_thread = flop_per_iter(k) * static_cast<double>(iters);
  double cpu_rate = 0;
  for (double c : cpu) cpu_rate += c > 0 ? per_thread / c / 1e9 : 0.0;
  return {per_thread * threads / secs / 1e9, cpu_rate};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "register-only peak-rate loops for benchmarks/ceilings.py";
  m.def(
      "fma_avx512_gflops", [](long iters, int threads) { return peak_gflops(Kind::FmaAvx512, iters, threads); },
      "fp32 FMA peak with 512-bit vfmadd ((wall, cpu-time) GFLOP/s; -1 if the CPU lacks AVX-512F)");
  m.def(
      "fma_avx2_gflops", [](long iters, int threads) { return peak_gflops(Kind::FmaAvx2, iters, threads); },
      "fp32 FMA peak with 256-bit vfmadd ((wall, cpu-time) GFLOP/s; -1 if the CPU lacks AVX2+FMA)");
  m.def(
      "dpbf16_gflops", [](long iters, int threads) { return peak_gflops(Kind::DpBf16, iters, threads); },
      "bf16 dot-product peak with vdpbf16ps ((wall, cpu-time) GFLOP/s; -1 if the CPU lacks AVX512_BF16)");
}
