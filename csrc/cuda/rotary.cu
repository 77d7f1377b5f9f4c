// Rotary position embedding on the GPU: forward and backward, one pass over memory each.
// Framework-free (launchers in kernels.cuh).
//
// Maths (fastattn/ops/rotary.py), per row (b, head, t) of x [B, H, T, D], with c = cos[b', t],
// s = sin[b', t] ([Bc, T, R], b' = 0 when Bc == 1: the launcher gets batch stride 0), h = R / 2,
// for j < h, a = x[j], bb = x[j + h], in float with one rounding to the output type:
//   forward:   y[j] = a c[j] - bb s[j],       y[j + h] = bb c[j + h] + a s[j + h]
//   backward:  y[j] = a c[j] + bb s[j + h],   y[j + h] = bb c[j + h] - a s[j]   (the transpose)
//   y[j] = x[j] for R <= j < D (partial rotary: pass-through columns, converted).
// Each pair is fmaf(a, c, +-(bb s)): the FMA is written out (nvcc would contract it anyway), so
// the host emulation rounds exactly as the GPU does.
//
// dtypes: x, cos / sin and y are each float or the call's one 16-bit type (__nv_bfloat16 or
// __half), in any mix (bf16 q with float cos and a float y under autocast; its backward: float
// dy, float cos, bf16 dx). One kernel per (x, cos, y) type triple, direction and vector width:
// 15 type triples x 2 x 2. Two different 16-bit types in one call: cudaErrorInvalidValue.
//
// Layouts: x and y have their own (b, head, t) strides and a unit column stride (q is the
// transpose of a [B, T, H, D] projection: no copy; y is allocated like x); cos and sin each have
// their own (batch, time) strides, 0 allowed (a broadcast batch or time). All offsets int64.
//
// Launch configuration: memory bound, no reduction (deterministic). 128-thread blocks; a row is
// served by tpr = 2^k threads (1 to 32, never across a warp), the smallest power of two >= the
// row's larger half of the work in packs (max(h, D - R) / V), so that D = 128 gives every thread
// one pack pair instead of idling half a warp; a block thus covers 128 / tpr rows. Rows are
// numbered in (b, t, head) order, so the rows of one block share cos / sin rows (L1 / L2 hits).
// A thread loads the packs x[j..j+V), x[h+j..), c[j..), c[h+j..), s[j..), s[h+j..), writes
// y[j..), y[h+j..), then copies its share of the pass-through columns. Packs: V = 16 bytes of
// the widest operand type (4 with a float operand, 8 when all three are 16-bit) when h and D - R
// are multiples of V and every pointer and every stride that is used (size > 1) allows aligned
// V-element accesses; else V = 1. Blocks = ceil(rows / (128 / tpr)) capped at 4096, with a
// grid-stride loop over rows.
//
// Compile-check: bash scripts/cuda_check.sh. Test (needs a GPU): pytest tests/test_cuda.py -k
// rotary; host emulation: bash tests/cuda_emu/run.sh rotary.
#include "common.cuh"

#include <algorithm>

namespace fastattn {
namespace cuda {
namespace {

using namespace detail;

constexpr int kThreads = 128;
constexpr int64_t kMaxBlocks = 4096;

// The kernel's view of RotaryArgs: typed pointers, h and the row count precomputed.
template <typename TI, typename TC, typename TO>
struct RotaryParams {
  const TI* x;
  Strides3 xs;
  const TC* cos;
  const TC* sin;
  int64_t cs_b, cs_t, ss_b, ss_t;
  TO* y;
  Strides3 ys;
  int64_t H, T, D, R, h, rows;
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> ld(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <typename TI, typename TC, typename TO, int V, bool BWD>
__global__ void __launch_bounds__(kThreads)
    rotary_kernel(const RotaryParams<TI, TC, TO> p, int tpr_log2) {
  const int tpr = 1 << tpr_log2;
  const int lane = static_cast<int>(threadIdx.x) & (tpr - 1);
  const int64_t rows_per_block = kThreads >> tpr_log2;
  const int64_t rot_packs = p.h / V, pass_packs = (p.D - p.R) / V;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + (threadIdx.x >> tpr_log2);
       row < p.rows; row += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t hd = row % p.H;
    const int64_t bt = row / p.H;
    const int64_t t = bt % p.T, b = bt / p.T;
    const TI* xr = p.x + b * p.xs.b + hd * p.xs.h + t * p.xs.t;
    const TC* cr = p.cos + b * p.cs_b + t * p.cs_t;
    const TC* sr = p.sin + b * p.ss_b + t * p.ss_t;
    TO* yr = p.y + b * p.ys.b + hd * p.ys.h + t * p.ys.t;
    for (int64_t q = lane; q < rot_packs; q += tpr) {
      const int64_t j = q * V;
      const Pack<TI, V> a = ld<TI, V>(xr + j), bb = ld<TI, V>(xr + p.h + j);
      const Pack<TC, V> c1 = ld<TC, V>(cr + j), c2 = ld<TC, V>(cr + p.h + j);
      const Pack<TC, V> s1 = ld<TC, V>(sr + j), s2 = ld<TC, V>(sr + p.h + j);
      Pack<TO, V> y1, y2;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float av = to_float(a.v[e]), bv = to_float(bb.v[e]);
        if constexpr (BWD) {
          y1.v[e] = from_float<TO>(fmaf(av, to_float(c1.v[e]), bv * to_float(s2.v[e])));
          y2.v[e] = from_float<TO>(fmaf(bv, to_float(c2.v[e]), -(av * to_float(s1.v[e]))));
        } else {
          y1.v[e] = from_float<TO>(fmaf(av, to_float(c1.v[e]), -(bv * to_float(s1.v[e]))));
          y2.v[e] = from_float<TO>(fmaf(bv, to_float(c2.v[e]), av * to_float(s2.v[e])));
        }
      }
      *reinterpret_cast<Pack<TO, V>*>(yr + j) = y1;
      *reinterpret_cast<Pack<TO, V>*>(yr + p.h + j) = y2;
    }
    for (int64_t q = lane; q < pass_packs; q += tpr) {
      const int64_t j = p.R + q * V;
      const Pack<TI, V> a = ld<TI, V>(xr + j);
      Pack<TO, V> y;
#pragma unroll
      for (int e = 0; e < V; ++e) y.v[e] = from_float<TO>(to_float(a.v[e]));
      *reinterpret_cast<Pack<TO, V>*>(yr + j) = y;
    }
  }
}

// Whether a stride (in elements) of a dim of `size` allows V-element packs: unused when size <= 1.
bool stride_ok(int64_t stride, int64_t size, int V) { return size <= 1 || stride % V == 0; }

template <typename TI, typename TC, typename TO, bool BWD>
cudaError_t run(const RotaryArgs& a, cudaStream_t stream) {
  RotaryParams<TI, TC, TO> p{};
  p.x = static_cast<const TI*>(a.x);
  p.xs = a.x_stride;
  p.cos = static_cast<const TC*>(a.cos);
  p.sin = static_cast<const TC*>(a.sin);
  p.cs_b = a.cos_stride_b;
  p.cs_t = a.cos_stride_t;
  p.ss_b = a.sin_stride_b;
  p.ss_t = a.sin_stride_t;
  p.y = static_cast<TO*>(a.out);
  p.ys = a.out_stride;
  p.H = a.H;
  p.T = a.T;
  p.D = a.D;
  p.R = a.R;
  p.h = a.R / 2;
  p.rows = a.B * a.H * a.T;

  constexpr int V = 16 / static_cast<int>(std::max({sizeof(TI), sizeof(TC), sizeof(TO)}));
  auto rows_ok = [&](const void* ptr, size_t elem, const Strides3& s) {
    return aligned(ptr, V * elem) && stride_ok(s.b, a.B, V) && stride_ok(s.h, a.H, V) &&
           stride_ok(s.t, a.T, V);
  };
  auto cs_ok = [&](const void* ptr, int64_t sb, int64_t st) {
    return aligned(ptr, V * sizeof(TC)) && stride_ok(sb, a.B, V) && stride_ok(st, a.T, V);
  };
  const bool vec = p.h % V == 0 && (a.D - a.R) % V == 0 && rows_ok(a.x, sizeof(TI), a.x_stride) &&
                   rows_ok(a.out, sizeof(TO), a.out_stride) &&
                   cs_ok(a.cos, a.cos_stride_b, a.cos_stride_t) &&
                   cs_ok(a.sin, a.sin_stride_b, a.sin_stride_t);
  const int v = vec ? V : 1;
  const int64_t work = (std::max(p.h, a.D - a.R) + v - 1) / v;  // packs per row, per thread group
  int tpr_log2 = 0;
  while (tpr_log2 < 5 && (int64_t{1} << tpr_log2) < work) ++tpr_log2;
  const int64_t rows_per_block = kThreads >> tpr_log2;
  const unsigned blocks =
      static_cast<unsigned>(std::min((p.rows + rows_per_block - 1) / rows_per_block, kMaxBlocks));
  if (vec) {
    rotary_kernel<TI, TC, TO, V, BWD><<<blocks, kThreads, 0, stream>>>(p, tpr_log2);
  } else {
    rotary_kernel<TI, TC, TO, 1, BWD><<<blocks, kThreads, 0, stream>>>(p, tpr_log2);
  }
  return cudaGetLastError();
}

// The type of one operand: float, or the call's 16-bit type H.
template <typename H, typename TI, typename TC, bool BWD>
cudaError_t pick_out(DType o, const RotaryArgs& a, cudaStream_t s) {
  return o == DType::kFloat32 ? run<TI, TC, float, BWD>(a, s) : run<TI, TC, H, BWD>(a, s);
}
template <typename H, typename TI, bool BWD>
cudaError_t pick_cs(DType c, DType o, const RotaryArgs& a, cudaStream_t s) {
  return c == DType::kFloat32 ? pick_out<H, TI, float, BWD>(o, a, s)
                              : pick_out<H, TI, H, BWD>(o, a, s);
}
template <typename H, bool BWD>
cudaError_t pick_x(DType x, DType c, DType o, const RotaryArgs& a, cudaStream_t s) {
  return x == DType::kFloat32 ? pick_cs<H, float, BWD>(c, o, a, s)
                              : pick_cs<H, H, BWD>(c, o, a, s);
}

template <bool BWD>
cudaError_t launch(DType x, DType c, DType o, const RotaryArgs& a, cudaStream_t stream) {
  if (!rotary_dtypes_supported(x, c, o) || a.R % 2 != 0 || a.R < 2 || a.R > a.D) {
    return cudaErrorInvalidValue;
  }
  if (a.B == 0 || a.H == 0 || a.T == 0 || a.D == 0) return cudaSuccess;
  const bool half = x == DType::kFloat16 || c == DType::kFloat16 || o == DType::kFloat16;
  return half ? pick_x<__half, BWD>(x, c, o, a, stream)
              : pick_x<__nv_bfloat16, BWD>(x, c, o, a, stream);
}

}  // namespace

bool rotary_dtypes_supported(DType x, DType cs, DType out) {
  const DType ts[3] = {x, cs, out};
  bool f16 = false, bf16 = false;
  for (DType t : ts) {
    if (t == DType::kFloat16) {
      f16 = true;
    } else if (t == DType::kBFloat16) {
      bf16 = true;
    } else if (t != DType::kFloat32) {
      return false;
    }
  }
  return !(f16 && bf16);
}

cudaError_t rotary_fwd(DType x_dt, DType cs_dt, DType out_dt, const RotaryArgs& args,
                       cudaStream_t stream) {
  return launch<false>(x_dt, cs_dt, out_dt, args, stream);
}

cudaError_t rotary_bwd(DType dy_dt, DType cs_dt, DType out_dt, const RotaryArgs& args,
                       cudaStream_t stream) {
  return launch<true>(dy_dt, cs_dt, out_dt, args, stream);
}

}  // namespace cuda
}  // namespace fastattn
