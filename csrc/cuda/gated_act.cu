// Gated activations (SwiGLU, GeGLU) on the GPU: forward and backward. Framework-free (launchers
// in kernels.cuh).
//
// Maths, elementwise on g = gate, u = up (in float):
//   h = act(g) * u;   dgate = dh * u * act'(g),  dup = dh * act(g)   (act recomputed)
//   silu:      act(g) = g s,  s = 1 / (1 + e),  e = exp(-g);  act'(g) = s + g (e s) s
//   gelu / gelu_tanh: gelu() / gelu_grad() of gelu_math.cuh (the code of bias_gelu).
//
// Accuracy: the build uses --use_fast_math, which turns expf into ex2.approx(x * log2 e), whose
// error grows with |x| (2 + 1.16 |x| ulp). silu takes exp_accurate() instead: Cody-Waite range
// reduction (x = n ln2 + r, ln2 in two parts, fma) so ex2.approx only sees |r log2 e| <= 0.5,
// then the exponent is added exactly: about 2 ulp over the whole range. The reciprocal is
// __frcp_rn (correctly rounded whatever the fast-math flags). e is evaluated on g clamped to
// >= -88 (never inf, so e * s is never inf * 0) and act = act' = 0 is selected below -88 (the
// true values are below 1e-36 there), as in csrc/cpu/gated_act.cpp.
//
// Launch configuration: memory bound and elementwise, like bias_gelu's forward. 256 threads per
// block, grid-stride over 16-byte packs (8 halfs / 4 floats) when H, every row stride and every
// pointer allow it, else over single elements; blocks = ceil(packs / 256) capped at 4096.
// Operands are [N, H] with their own row strides (the halves of a packed [N, 2H] tensor are read
// and written in place); a pack never straddles two rows (V divides H on the vector path).
//
// Compile-check: bash scripts/cuda_check.sh. Test (needs a GPU): pytest tests/test_cuda.py -k
// gated; host emulation: bash tests/cuda_emu/run.sh gated.
#include "common.cuh"
#include "gelu_math.cuh"

#include <algorithm>

namespace fastattn {
namespace cuda {
namespace {

using namespace detail;

constexpr float kSiluClamp = 88.0f;  // exp(88) = 1.65e38 < FLT_MAX

// exp(x) for x in [-87, 88] (clamped), ~2 ulp even under --use_fast_math.
__device__ __forceinline__ float exp_accurate(float x) {
  x = fminf(fmaxf(x, -87.0f), 88.0f);
  const float n = rintf(x * 1.44269504088896341f);
  float r = fmaf(n, -0.693145751953125f, x);    // ln2, high part: n * it is exact
  r = fmaf(n, -1.428606820309417232e-06f, r);   // ln2, low part
  const float p = exp2f(r * 1.44269504088896341f);
  // 2^n as a float (n in [-126, 127]), multiplied in exactly.
  return p * __int_as_float((static_cast<int>(n) + 127) << 23);
}

// act(g) and act'(g); ACT: 0 silu, 1 gelu (erf), 2 gelu_tanh.
template <int ACT>
__device__ __forceinline__ float act_fwd(float g) {
  if constexpr (ACT == 0) {
    const float s = __frcp_rn(1.0f + exp_accurate(-fmaxf(g, -kSiluClamp)));
    return g < -kSiluClamp ? 0.0f : g * s;
  } else {
    return gelu(g, ACT == 2);
  }
}

template <int ACT>
__device__ __forceinline__ void act_both(float g, float& a, float& d) {
  if constexpr (ACT == 0) {
    const float gc = fmaxf(g, -kSiluClamp);
    const float e = exp_accurate(-gc);
    const float s = __frcp_rn(1.0f + e);
    const bool low = g < -kSiluClamp;
    a = low ? 0.0f : g * s;
    d = low ? 0.0f : fmaf(gc * (e * s), s, s);
  } else {
    a = gelu(g, ACT == 2);
    d = gelu_grad(g, ACT == 2);
  }
}

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* base, int64_t ld, int64_t i, int64_t j) {
  return *reinterpret_cast<const Pack<T, V>*>(base + i * ld + j);
}

// h[i, j] = act(g[i, j]) * u[i, j] over V-element packs (V = 1: scalar path).
template <typename T, int V, int ACT>
__global__ void __launch_bounds__(256)
    gated_act_fwd_kernel(const T* __restrict__ g, int64_t ld_g, const T* __restrict__ u,
                         int64_t ld_u, T* __restrict__ h, int64_t packs, int64_t H) {
  const int64_t per_row = H / V;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = p / per_row, j = (p % per_row) * V;
    const Pack<T, V> gv = load_pack<T, V>(g, ld_g, i, j);
    const Pack<T, V> uv = load_pack<T, V>(u, ld_u, i, j);
    Pack<T, V> hv;
#pragma unroll
    for (int e = 0; e < V; ++e) hv.v[e] = from_float<T>(act_fwd<ACT>(to_float(gv.v[e])) * to_float(uv.v[e]));
    *reinterpret_cast<Pack<T, V>*>(h + i * H + j) = hv;
  }
}

template <typename T, int V, int ACT>
__global__ void __launch_bounds__(256)
    gated_act_bwd_kernel(const T* __restrict__ dh, int64_t ld_dh, const T* __restrict__ g,
                         int64_t ld_g, const T* __restrict__ u, int64_t ld_u, T* __restrict__ dg,
                         T* __restrict__ du, int64_t ld_out, int64_t packs, int64_t H) {
  const int64_t per_row = H / V;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = p / per_row, j = (p % per_row) * V;
    const Pack<T, V> dv = load_pack<T, V>(dh, ld_dh, i, j);
    const Pack<T, V> gv = load_pack<T, V>(g, ld_g, i, j);
    const Pack<T, V> uv = load_pack<T, V>(u, ld_u, i, j);
    Pack<T, V> dgv, duv;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      float a, d;
      act_both<ACT>(to_float(gv.v[e]), a, d);
      const float dy = to_float(dv.v[e]);
      dgv.v[e] = from_float<T>(dy * to_float(uv.v[e]) * d);
      duv.v[e] = from_float<T>(dy * a);
    }
    *reinterpret_cast<Pack<T, V>*>(dg + i * ld_out + j) = dgv;
    *reinterpret_cast<Pack<T, V>*>(du + i * ld_out + j) = duv;
  }
}

// Whether [N, H] rows at `p` with row stride `ld` can be read as aligned V-element packs.
template <typename T>
bool packable(const void* p, int64_t ld, int64_t N) {
  constexpr int V = kVec<T>;
  return aligned(p, 16) && (N <= 1 || ld % V == 0);
}

unsigned grid_for(int64_t packs) {
  return static_cast<unsigned>(std::min<int64_t>((packs + 255) / 256, 4096));
}

template <typename T, int ACT>
cudaError_t fwd_typed(const GatedActFwdArgs& a, cudaStream_t stream) {
  const T* g = static_cast<const T*>(a.gate);
  const T* u = static_cast<const T*>(a.up);
  T* h = static_cast<T*>(a.h);
  constexpr int V = kVec<T>;
  const bool vec = a.H % V == 0 && packable<T>(g, a.ld_gate, a.N) &&
                   packable<T>(u, a.ld_up, a.N) && packable<T>(h, a.H, a.N);
  const int64_t packs = a.N * (vec ? a.H / V : a.H);
  if (vec) {
    gated_act_fwd_kernel<T, V, ACT><<<grid_for(packs), 256, 0, stream>>>(g, a.ld_gate, u, a.ld_up,
                                                                          h, packs, a.H);
  } else {
    gated_act_fwd_kernel<T, 1, ACT><<<grid_for(packs), 256, 0, stream>>>(g, a.ld_gate, u, a.ld_up,
                                                                          h, packs, a.H);
  }
  return cudaGetLastError();
}

template <typename T, int ACT>
cudaError_t bwd_typed(const GatedActBwdArgs& a, cudaStream_t stream) {
  const T* dh = static_cast<const T*>(a.dh);
  const T* g = static_cast<const T*>(a.gate);
  const T* u = static_cast<const T*>(a.up);
  T* dg = static_cast<T*>(a.dgate);
  T* du = static_cast<T*>(a.dup);
  constexpr int V = kVec<T>;
  const bool vec = a.H % V == 0 && packable<T>(dh, a.ld_dh, a.N) &&
                   packable<T>(g, a.ld_gate, a.N) && packable<T>(u, a.ld_up, a.N) &&
                   packable<T>(dg, a.ld_out, a.N) && packable<T>(du, a.ld_out, a.N);
  const int64_t packs = a.N * (vec ? a.H / V : a.H);
  if (vec) {
    gated_act_bwd_kernel<T, V, ACT><<<grid_for(packs), 256, 0, stream>>>(
        dh, a.ld_dh, g, a.ld_gate, u, a.ld_up, dg, du, a.ld_out, packs, a.H);
  } else {
    gated_act_bwd_kernel<T, 1, ACT><<<grid_for(packs), 256, 0, stream>>>(
        dh, a.ld_dh, g, a.ld_gate, u, a.ld_up, dg, du, a.ld_out, packs, a.H);
  }
  return cudaGetLastError();
}

template <int ACT, typename Args, typename F32, typename F16, typename BF16>
cudaError_t by_dtype(DType dt, const Args& a, cudaStream_t stream, F32 f32, F16 f16, BF16 bf16) {
  switch (dt) {
    case DType::kFloat32: return f32(a, stream);
    case DType::kFloat16: return f16(a, stream);
    case DType::kBFloat16: return bf16(a, stream);
  }
  return cudaErrorInvalidValue;
}

template <int ACT>
cudaError_t fwd_act(DType dt, const GatedActFwdArgs& a, cudaStream_t stream) {
  return by_dtype<ACT>(dt, a, stream, fwd_typed<float, ACT>, fwd_typed<__half, ACT>,
                       fwd_typed<__nv_bfloat16, ACT>);
}

template <int ACT>
cudaError_t bwd_act(DType dt, const GatedActBwdArgs& a, cudaStream_t stream) {
  return by_dtype<ACT>(dt, a, stream, bwd_typed<float, ACT>, bwd_typed<__half, ACT>,
                       bwd_typed<__nv_bfloat16, ACT>);
}

}  // namespace

cudaError_t gated_act_fwd(DType dt, GatedAct act, const GatedActFwdArgs& args,
                          cudaStream_t stream) {
  if (args.N == 0 || args.H == 0) return cudaSuccess;
  switch (act) {
    case GatedAct::kSilu: return fwd_act<0>(dt, args, stream);
    case GatedAct::kGelu: return fwd_act<1>(dt, args, stream);
    case GatedAct::kGeluTanh: return fwd_act<2>(dt, args, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t gated_act_bwd(DType dt, GatedAct act, const GatedActBwdArgs& args,
                          cudaStream_t stream) {
  if (args.N == 0 || args.H == 0) return cudaSuccess;
  switch (act) {
    case GatedAct::kSilu: return bwd_act<0>(dt, args, stream);
    case GatedAct::kGelu: return bwd_act<1>(dt, args, stream);
    case GatedAct::kGeluTanh: return bwd_act<2>(dt, args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastattn
