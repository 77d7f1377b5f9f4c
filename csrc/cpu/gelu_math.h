// The GELU maths of the CPU kernels, shared by gelu.cpp (bias + GELU) and gated_act.cpp
// (GeGLU): vector (at::vec, float) and scalar (float / double) forms of gelu and gelu'.
//
//   "none": gelu(u)  = u * Phi(u),           Phi(u) = (1 + erf(u / sqrt 2)) / 2
//           gelu'(u) = Phi(u) + u * phi(u),  phi(u) = exp(-u^2 / 2) / sqrt(2 pi)
//   "tanh": gelu(u)  = u * (1 + tanh(y)) / 2 = u * s,   y = k (u + c u^3),
//           k = sqrt(2 / pi), c = 0.044715,  s = sigmoid(2 y) = 1 / (1 + e),  e = exp(-2 y)
//           gelu'(u) = s + u * s (1 - s) * 2 k (1 + 3 c u^2),  with 1 - s = e s
//
// Accuracy choices:
// - exp: in the GELU backward exp_nonpos below (~1 ulp, its argument -u^2/2 is never
//   positive: 13 vector ops, 20% off the erf backward's time, measured), elsewhere SLEEF's
//   expf_u10 (Vectorized<float>::exp; ATen's exp_u20 is 20 ulp, refused).
//   erf is our own: in the backward erf_given_exp below (max 1.5 ulp), which reuses exp(-z^2),
//   computed anyway for the pdf; in the forward erf_no_exp (1.2e-7 absolute, no exp). SLEEF's erff_u10 (1.0 ulp) made the erf forward ~2x slower
//   than the tanh one; ATen's Vectorized<float>::erf (Abramowitz-Stegun 7.1.26) is 1.5e-7
//   absolute, a large relative error near 0.
// - tanh is written as the sigmoid 1 / (1 + exp(-2y)): no cancellation in 1 + tanh(y) for
//   y < 0 and 1 - s = e * s has none for y > 0 (1 - tanh^2 near 1 does). The cubic is
//   evaluated on u clamped to [-10, 10] (|2y| <= 87.3, so e never overflows); beyond it the
//   function is u (u > 10) or 0 (u < -10) and the derivative 1 or 0 to float precision, and
//   those values are selected explicitly, so |x| up to FLT_MAX gives no inf/NaN.
// - *_both(u, g, d) give gelu and gelu' from one exp (the GeGLU backward needs both).
#pragma once

#include "cpu/vec.h"

#include <algorithm>
#include <cmath>

namespace fastattn {
namespace cpu {
namespace gelu_math {

enum class Approx { kNone, kTanh };

constexpr float kSqrtHalf = 0.70710678118654752440f;    // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;  // 1 / sqrt(2 pi)
constexpr float kTwoK = 1.59576912160573071176f;        // 2 sqrt(2 / pi)
constexpr float kC = 0.044715f;
constexpr float kTanhClamp = 10.0f;

// erf(z) given e = exp(-z^2), in two pieces selected per lane (both are evaluated: no branch):
//   |z| <  0.9: erf(z) = z + z * P(z^2)         (P: degree 7, fitted by least squares on
//                                               Chebyshev nodes; the "z +" keeps the leading
//                                               term exact)
//   |z| >= 0.9: erf(z) = sign(z) (1 - e Q(|z|)), Q(w) ~ erfc(w) exp(w^2) on [0.9, 4] (degree 12),
//               |z| clamped to 4 in Q (beyond it e Q < 1e-8 and erf rounds to +-1).
// Measured over [-4.5, 4.5] against float64: max 1.5 ulp (0.9 ulp for |z| < 0.9), 9e-8 absolute
// (ATen's Vectorized<float>::erf: 1.5e-7 absolute, large relative error near 0). The backward
// needs exp(-u^2/2) = exp(-z^2) for the pdf anyway, so erf costs it only the two polynomials.
constexpr float kErfSplit = 0.9f;
constexpr float kErfP[8] = {0.12837916709286560f,  -0.37612638825999295f,  0.11283789371637155f,
                            -0.026865925891417730f, 0.0052227250793307320f, -8.5137279661018580e-04f,
                            1.1522862855509761e-04f, -1.0540461438232385e-05f};
constexpr float kErfQ[13] = {0.99840756190055210f,    -1.1166116615517700f,    0.96009824235092940f,
                             -0.66949637566823260f,   0.38172166194759716f,    -0.17611239655160850f,
                             0.064572945022042890f,   -0.018401229130327233f,  0.0039630788891412130f,
                             -6.2044489912654710e-04f, 6.6397048936442460e-05f, -4.3332344027439280e-06f,
                             1.2985816842068960e-07f};

// exp(x) for x <= 0 (the backward's exp(-z^2)), Cody-Waite reduction x = n ln2 + r with
// |r| <= ln2 / 2, Cephes' degree-5 minimax for (e^r - 1 - r) / r^2, then 2^n by scalef: about
// 1 ulp, 13 vector ops (SLEEF's expf_u10 behind Vectorized<float>::exp also handles overflow,
// NaN and the rounding of n in more steps). x is clamped to -200 first, so exp(-inf) and any
// x below -104 give exactly 0 (scalef by 2^-289), and u * 0 stays 0 for finite u up to
// FLT_MAX. Elsewhere (AVX2 / portable builds) Vectorized<float>::exp.
inline Vec exp_nonpos(const Vec& xin) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = _mm512_max_ps(__m512(xin), _mm512_set1_ps(-200.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 e = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(r, r), p, r), _mm512_set1_ps(1.f));
  return Vec(_mm512_scalef_ps(e, n));
#else
  return xin.exp();
#endif
}

inline Vec erf_given_exp(const Vec& z, const Vec& e) {
  const Vec a = z.abs();
  const Vec z2 = z * z;
  Vec p(kErfP[7]);
  for (int k = 6; k >= 0; --k) p = at::vec::fmadd(p, z2, Vec(kErfP[k]));
  const Vec small = at::vec::fmadd(z, p, z);
  const Vec w = at::vec::minimum(a, Vec(4.f));
  Vec q(kErfQ[12]);
  for (int k = 11; k >= 0; --k) q = at::vec::fmadd(q, w, Vec(kErfQ[k]));
  Vec large = at::vec::fnmadd(e, q, Vec(1.f));  // 1 - e q, in [0, 1]
  large = large | (z & Vec(-0.f));              // copy z's sign
  return Vec::blendv(large, small, a < Vec(kErfSplit));
}

// erf(z) without exp, for the forward (which needs no pdf), in two polynomial pieces selected
// per lane (both evaluated):
//   |z| <  1.5: erf(z) = z + z * S(z^2)                  (S: degree 7)
//   |z| >= 1.5: erf(z) = sign(z) R(min(|z|, 3.92) - 2.71) (R: degree 10, centred on the piece),
//               exactly +-1 from |z| >= 3.92 on (erf rounds to +-1 there; exactness keeps
//               gelu(u) = u * 0 = 0 for very negative u, not u * 3e-8).
// Both fitted by iteratively reweighted least squares (near-minimax) on Chebyshev nodes, with
// the float32-rounded coefficients evaluated by FMA Horner: max 1.2e-7 absolute over the
// whole line (torch's Vectorized<float>::erf: 1.5e-7), against 9e-8 for erf_given_exp, at
// 19 FMAs and no exp (erf_given_exp + exp: ~45 vector ops): the erf forward ran at half
// torch's gelu speed with the exp. GELU's error is u/2 times erf's.
constexpr float kErfFastSplit = 1.5f;
constexpr float kErfFastOne = 3.92f;
constexpr float kErfFastCentre = 2.71f;
constexpr float kErfS[8] = {0.128379151f,     -0.376125515f,    0.112830095f,
                            -0.0268384665f,   0.00517462706f,   -0.000805847347f,
                            9.24614578e-05f, -5.71871442e-06f};
constexpr float kErfR[11] = {0.999873161f,    0.000729206484f,  -0.00197786535f,
                             0.00333080976f,  -0.00384065975f,  0.00316188112f,
                             -0.00186985114f, 0.000698524993f,  -2.39242108e-05f,
                             -0.000123992679f, 4.25553699e-05f};

inline Vec erf_no_exp(const Vec& z) {
  const Vec a = z.abs();
  const Vec z2 = z * z;
  Vec p(kErfS[7]);
  for (int k = 6; k >= 0; --k) p = at::vec::fmadd(p, z2, Vec(kErfS[k]));
  const Vec small = at::vec::fmadd(z, p, z);
  const Vec t = at::vec::minimum(a, Vec(kErfFastOne)) - Vec(kErfFastCentre);
  Vec r(kErfR[10]);
  for (int k = 9; k >= 0; --k) r = at::vec::fmadd(r, t, Vec(kErfR[k]));
  r = Vec::blendv(r, Vec(1.f), a >= Vec(kErfFastOne));
  r = r | (z & Vec(-0.f));  // copy z's sign
  return Vec::blendv(r, small, a < Vec(kErfFastSplit));
}

// ---------------------------------------------------------------- elementwise maths
// Vector and scalar versions of the same formulas (the scalar ones serve the row tails, and,
// instantiated with double, the float64 path).
inline Vec gelu_none(const Vec& u) {
  return u * at::vec::fmadd(Vec(0.5f), erf_no_exp(u * Vec(kSqrtHalf)), Vec(0.5f));
}
inline Vec dgelu_none(const Vec& u) {
  const Vec z = u * Vec(kSqrtHalf);
  const Vec e = exp_nonpos(Vec(0.f) - z * z);  // exp(-u^2 / 2)
  const Vec cdf = at::vec::fmadd(Vec(0.5f), erf_given_exp(z, e), Vec(0.5f));
  return at::vec::fmadd(u * e, Vec(kInvSqrt2Pi), cdf);
}

// s = sigmoid(2y) and e = exp(-2y) on the clamped u.
inline Vec tanh_sigmoid(const Vec& uc, Vec& e) {
  Vec u2 = uc * uc;
  Vec y2 = Vec(kTwoK) * uc * at::vec::fmadd(Vec(kC), u2, Vec(1.f));
  e = (Vec(0.f) - y2).exp();
  return Vec(1.f) / (Vec(1.f) + e);
}
inline Vec gelu_tanh(const Vec& u) {
  Vec uc = at::vec::clamp(u, Vec(-kTanhClamp), Vec(kTanhClamp));
  Vec e;
  Vec s = tanh_sigmoid(uc, e);
  Vec out = u * s;
  // u < -10: gelu is below 1e-37 in magnitude; give 0 (and not u * tiny for huge |u|).
  return Vec::blendv(out, Vec(0.f), u < Vec(-kTanhClamp));
}
inline Vec dgelu_tanh(const Vec& u) {
  Vec uc = at::vec::clamp(u, Vec(-kTanhClamp), Vec(kTanhClamp));
  Vec e;
  Vec s = tanh_sigmoid(uc, e);
  Vec p = Vec(kTwoK) * at::vec::fmadd(Vec(3.f * kC), uc * uc, Vec(1.f));
  // (e * s) = 1 - s <= 1 first: e alone reaches 8.5e37 at u = -10.
  Vec d = at::vec::fmadd((e * s) * s * uc, p, s);
  d = Vec::blendv(d, Vec(0.f), u < Vec(-kTanhClamp));
  return Vec::blendv(d, Vec(1.f), u > Vec(kTanhClamp));
}

template <typename F>
inline F gelu_scalar(F u, Approx a) {
  if (a == Approx::kNone) return u * (F(0.5) + F(0.5) * std::erf(u * F(0.70710678118654752440)));
  if (u < F(-kTanhClamp)) return F(0);
  F uc = std::min(u, F(kTanhClamp));
  F y2 = F(1.59576912160573071176) * uc * (F(1) + F(kC) * uc * uc);
  return u / (F(1) + std::exp(-y2));
}
template <typename F>
inline F dgelu_scalar(F u, Approx a) {
  if (a == Approx::kNone) {
    F cdf = F(0.5) + F(0.5) * std::erf(u * F(0.70710678118654752440));
    return cdf + u * std::exp(F(-0.5) * u * u) * F(0.39894228040143267794);
  }
  if (u < F(-kTanhClamp)) return F(0);
  if (u > F(kTanhClamp)) return F(1);
  F y2 = F(1.59576912160573071176) * u * (F(1) + F(kC) * u * u);
  F e = std::exp(-y2);
  F s = F(1) / (F(1) + e);
  return s + (e * s) * s * u * F(1.59576912160573071176) * (F(1) + F(3) * F(kC) * u * u);
}
// gelu(u) and gelu'(u) together, sharing the exp (and erf / sigmoid) of both.
inline void gelu_none_both(const Vec& u, Vec& g, Vec& d) {
  const Vec z = u * Vec(kSqrtHalf);
  const Vec e = exp_nonpos(Vec(0.f) - z * z);  // exp(-u^2 / 2)
  const Vec cdf = at::vec::fmadd(Vec(0.5f), erf_given_exp(z, e), Vec(0.5f));
  g = u * cdf;
  d = at::vec::fmadd(u * e, Vec(kInvSqrt2Pi), cdf);
}
inline void gelu_tanh_both(const Vec& u, Vec& g, Vec& d) {
  const Vec uc = at::vec::clamp(u, Vec(-kTanhClamp), Vec(kTanhClamp));
  Vec e;
  const Vec s = tanh_sigmoid(uc, e);
  const Vec p = Vec(kTwoK) * at::vec::fmadd(Vec(3.f * kC), uc * uc, Vec(1.f));
  const auto low = u < Vec(-kTanhClamp);
  g = Vec::blendv(u * s, Vec(0.f), low);
  Vec dd = at::vec::fmadd((e * s) * s * uc, p, s);
  dd = Vec::blendv(dd, Vec(0.f), low);
  d = Vec::blendv(dd, Vec(1.f), u > Vec(kTanhClamp));
}

}  // namespace gelu_math
}  // namespace cpu
}  // namespace fastattn
