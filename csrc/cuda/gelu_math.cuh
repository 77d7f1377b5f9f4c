// The GELU maths of the CUDA kernels, shared by gelu.cu (bias + GELU) and gated_act.cu (GeGLU).
//
//   "none": gelu(v) = v * Phi(v) = 0.5 v (1 + erf(v / sqrt 2)) = 0.5 v erfc(-v / sqrt 2)
//           gelu'(v) = Phi(v) + v phi(v),  phi(v) = exp(-v^2 / 2) / sqrt(2 pi)
//   "tanh": gelu(v) = 0.5 v (1 + tanh(u)) = v sigmoid(2u),  u = sqrt(2/pi) (v + 0.044715 v^3)
//           gelu'(v) = s + 2 v s (1 - s) u',  s = sigmoid(2u),  u' = sqrt(2/pi) (1 + 3*0.044715 v^2)
//   The sigmoid form avoids tanhf (which fast-math builds may approximate) and the cancellation
//   in 1 + tanh(u) for very negative u; erfc avoids it in 1 + erf; 1 - s is sigmoid(-2u).
#pragma once

#include <cuda_runtime.h>

namespace fastattn {
namespace cuda {
namespace detail {

constexpr float kInvSqrt2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;
constexpr float kSqrt2OverPi = 0.79788456080286535588f;
constexpr float kTanhCoef = 0.044715f;

__device__ __forceinline__ float gelu(float v, bool tanh_approx) {
  if (tanh_approx) {
    const float u = kSqrt2OverPi * (v + kTanhCoef * v * v * v);
    const float s = 1.0f / (1.0f + expf(-2.0f * u));
    return v * s;
  }
  return 0.5f * v * erfcf(-v * kInvSqrt2);  // Phi(v) without the 1 + erf cancellation for v < 0
}

__device__ __forceinline__ float gelu_grad(float v, bool tanh_approx) {
  if (tanh_approx) {
    const float u = kSqrt2OverPi * (v + kTanhCoef * v * v * v);
    const float du = kSqrt2OverPi * (1.0f + 3.0f * kTanhCoef * v * v);
    // 1 - s = sigmoid(-2u), computed directly: no cancellation when s -> 1, no inf * 0.
    const float s = 1.0f / (1.0f + expf(-2.0f * u));
    const float one_minus_s = 1.0f / (1.0f + expf(2.0f * u));
    return s + 2.0f * v * (s * one_minus_s) * du;
  }
  const float cdf = 0.5f * erfcf(-v * kInvSqrt2);
  const float pdf = kInvSqrt2Pi * expf(-0.5f * v * v);
  return cdf + v * pdf;
}

}  // namespace detail
}  // namespace cuda
}  // namespace fastattn
