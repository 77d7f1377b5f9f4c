// Bias + GELU on the CPU: forward and backward, fused (one pass over memory each way).
//
// Maths, elementwise with u = x + bias (bias broadcast over rows; u is kept in float, never
// rounded to the input dtype):
//   approximate="none":  gelu(u)  = u * Phi(u),        Phi(u) = (1 + erf(u / sqrt 2)) / 2
//                        gelu'(u) = Phi(u) + u * phi(u), phi(u) = exp(-u^2 / 2) / sqrt(2 pi)
//   approximate="tanh":  gelu(u)  = u * (1 + tanh(y)) / 2 = u * s,   y = k (u + c u^3),
//                        k = sqrt(2 / pi), c = 0.044715,  s = sigmoid(2 y) = 1 / (1 + e),
//                        e = exp(-2 y)
//                        gelu'(u) = s + u * s (1 - s) * 2 k (1 + 3 c u^2),  with 1 - s = e s
// Backward: dx = dout * gelu'(u), dbias = sum over rows of dx.
//
// Accuracy choices:
// - exp is SLEEF's expf_u10 (Vectorized<float>::exp; ATen's exp_u20 is 20 ulp, refused).
//   erf is our own (erf_given_exp below, max 1.5 ulp): it reuses exp(-z^2), which the backward
//   computes anyway for the pdf. SLEEF's erff_u10 (1.0 ulp) made the erf forward ~2x slower
//   than the tanh one; ATen's Vectorized<float>::erf (Abramowitz-Stegun 7.1.26) is 1.5e-7
//   absolute, a large relative error near 0.
// - tanh is written as the sigmoid 1 / (1 + exp(-2y)): no cancellation in 1 + tanh(y) for
//   y < 0 and 1 - s = e * s has none for y > 0 (1 - tanh^2 near 1 does). The cubic is
//   evaluated on u clamped to [-10, 10] (|2y| <= 87.3, so e never overflows); beyond it the
//   function is u (u > 10) or 0 (u < -10) and the derivative 1 or 0 to float precision, and
//   those values are selected explicitly, so |x| up to FLT_MAX gives no inf/NaN.
//
// Launch choices:
// - Forward: at::parallel_for over rows, ~16K elements per task; per row the bias row is in L1.
// - Backward: one contiguous chunk of rows per thread; each chunk adds its dx into its own row
//   of a [chunks, M] float buffer in the loop that computes dx (dx is in registers there); a
//   second parallel pass over columns adds the chunks in a fixed order: deterministic for a
//   given thread count, no atomics (as in layernorm.cpp).
// - float and bfloat16 are vectorised with at::vec and compute in float; float64 (gradcheck)
//   takes a plain scalar path with std::erf / std::exp.
//
// Test: pytest tests/test_gelu.py.  Time: python dev/gelu_cpu/bench.py (results in
// dev/gelu_cpu/RESULTS.md) or pytest benchmarks/bench_gelu.py.
#include "cpu/kernels.h"
#include "cpu/vec.h"

#include <cmath>
#include <cstdlib>
#include <vector>

namespace fastattn {
namespace cpu {
namespace {

enum class Approx { kNone, kTanh };

Approx parse_approx(const std::string& a, const char* op) {
  TORCH_CHECK(a == "none" || a == "tanh", "fastattn_C.", op,
              ": approximate must be \"none\" or \"tanh\", got \"", a, "\"");
  return a == "tanh" ? Approx::kTanh : Approx::kNone;
}

constexpr float kSqrtHalf = 0.70710678118654752440f;    // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;  // 1 / sqrt(2 pi)
constexpr float kTwoK = 1.59576912160573071176f;        // 2 sqrt(2 / pi)
constexpr float kC = 0.044715f;
constexpr float kTanhClamp = 10.0f;

// Outputs come from torch's allocator (at::empty). A fresh [8192, 3072] float output takes
// ~25K first-touch page faults, which cost about as much as the GELU itself (measured in
// dev/gelu_cpu/RESULTS.md); THP_MEM_ALLOC_ENABLE=1 makes torch back large tensors with huge
// pages, for every op alike. A private caching allocator here was tried and refused: it hid
// hundreds of MiB from the user and made the speed-up an allocator effect, not a kernel one.
at::Tensor empty_out(int64_t N, int64_t M, const at::Tensor& like) {
  return at::empty({N, M}, like.options());
}

// Rows per parallel task: enough work (~16K elements) to amortise scheduling.
inline int64_t row_grain(int64_t M) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, M)); }

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

// ---------------------------------------------------------------- elementwise maths
// Vector and scalar versions of the same formulas (the scalar ones serve the row tails, and,
// instantiated with double, the float64 path).
inline Vec gelu_none(const Vec& u) {
  const Vec z = u * Vec(kSqrtHalf);
  const Vec e = (Vec(0.f) - z * z).exp();
  return u * at::vec::fmadd(Vec(0.5f), erf_given_exp(z, e), Vec(0.5f));
}
inline Vec dgelu_none(const Vec& u) {
  const Vec z = u * Vec(kSqrtHalf);
  const Vec e = (Vec(0.f) - z * z).exp();  // exp(-u^2 / 2)
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

// ---------------------------------------------------------------- forward, float/bfloat16
template <typename T, Approx A>
void fwd_vec(const T* x, const float* b, T* out, int64_t N, int64_t M) {
  constexpr int64_t V = kVecSize;
  at::parallel_for(0, N, row_grain(M), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* xr = x + i * M;
      T* o = out + i * M;
      int64_t j = 0;
      for (; j + V <= M; j += V) {
        Vec u = load_f<T>(xr + j) + Vec::loadu(b + j);
        store_f<T>(A == Approx::kNone ? gelu_none(u) : gelu_tanh(u), o + j);
      }
      for (; j < M; ++j) o[j] = static_cast<T>(gelu_scalar<float>(static_cast<float>(xr[j]) + b[j], A));
    }
  });
}

// ---------------------------------------------------------------- backward, float/bfloat16
// dbias partials are summed in two levels: rows of a group of kGroup rows into a group buffer,
// groups into the chunk's partial. The rounding error then grows with kGroup + rows / kGroup
// instead of rows (about 130 instead of 4096 terms for 8192 rows on 2 threads), for one extra
// L1-resident pass over M every kGroup rows.
constexpr int64_t kGroup = 64;

template <typename T, Approx A>
void bwd_vec(const T* dout, const T* x, const float* b, T* dx, float* db_part, int64_t chunks,
             int64_t N, int64_t M) {
  constexpr int64_t V = kVecSize;
  at::parallel_for(0, chunks, 1, [&](int64_t cbegin, int64_t cend) {
    std::vector<float> group(db_part != nullptr ? M : 0);
    float* grp = group.data();
    for (int64_t c = cbegin; c < cend; ++c) {
      int64_t r0, r1;
      chunk_range(N, chunks, c, r0, r1);
      float* dbp = db_part != nullptr ? db_part + c * M : nullptr;
      for (int64_t g0 = r0; g0 < r1; g0 += kGroup) {
        const int64_t g1 = std::min(g0 + kGroup, r1);
        if (dbp != nullptr) std::fill(grp, grp + M, 0.f);
        for (int64_t i = g0; i < g1; ++i) {
          const T* dyr = dout + i * M;
          const T* xr = x + i * M;
          T* dxr = dx + i * M;
          int64_t j = 0;
          for (; j + V <= M; j += V) {
            Vec u = load_f<T>(xr + j) + Vec::loadu(b + j);
            Vec d = load_f<T>(dyr + j) * (A == Approx::kNone ? dgelu_none(u) : dgelu_tanh(u));
            store_f<T>(d, dxr + j);
            if (dbp != nullptr) (Vec::loadu(grp + j) + d).store(grp + j);
          }
          for (; j < M; ++j) {
            float d = static_cast<float>(dyr[j]) *
                      dgelu_scalar<float>(static_cast<float>(xr[j]) + b[j], A);
            dxr[j] = static_cast<T>(d);
            if (dbp != nullptr) grp[j] += d;
          }
        }
        if (dbp != nullptr) {
          int64_t j = 0;
          for (; j + V <= M; j += V) (Vec::loadu(dbp + j) + Vec::loadu(grp + j)).store(dbp + j);
          for (; j < M; ++j) dbp[j] += grp[j];
        }
      }
    }
  });
}

// ---------------------------------------------------------------- float64 (gradcheck) path
void fwd_double(const double* x, const double* b, double* out, int64_t N, int64_t M, Approx a) {
  at::parallel_for(0, N, row_grain(M), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      for (int64_t j = 0; j < M; ++j) out[i * M + j] = gelu_scalar<double>(x[i * M + j] + b[j], a);
  });
}

void bwd_double(const double* dout, const double* x, const double* b, double* dx, double* db,
                int64_t N, int64_t M, Approx a) {
  at::parallel_for(0, N, row_grain(M), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      for (int64_t j = 0; j < M; ++j)
        dx[i * M + j] = dout[i * M + j] * dgelu_scalar<double>(x[i * M + j] + b[j], a);
  });
  if (db == nullptr) return;
  // Column sums, serial over rows per column: simple and in a fixed order.
  at::parallel_for(0, M, 256, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      double s = 0;
      for (int64_t i = 0; i < N; ++i) s += dx[i * M + j];
      db[j] = s;
    }
  });
}

// ---------------------------------------------------------------- checks
void check_2d(const at::Tensor& t, const char* op, const char* name, int64_t N, int64_t M,
              at::ScalarType dt) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == M, "fastattn_C.", op, ": ", name,
              " must have shape [", N, ", ", M, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dt, "fastattn_C.", op, ": ", name, " must be ", dt, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "fastattn_C.", op, ": ", name, " must be on the CPU, got ",
              t.device());
}

// x must be 2-D float32 / bfloat16 / float64 on the CPU; bias, when given, [M] floating.
void check_inputs(const at::Tensor& x, const std::optional<at::Tensor>& bias, const char* op) {
  TORCH_CHECK(x.dim() == 2, "fastattn_C.", op, ": x must be 2-D [rows, cols], got ", x.dim(),
              "-D");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kDouble, "fastattn_C.", op,
              ": x must be float32, bfloat16 or float64, got ", dt);
  TORCH_CHECK(x.device().is_cpu(), "fastattn_C.", op, ": x must be on the CPU, got ", x.device());
  if (!bias.has_value()) return;
  const int64_t M = x.size(1);
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == M, "fastattn_C.", op,
              ": bias must have shape [", M, "] (x's last dim), got ", bias->sizes());
  TORCH_CHECK(bias->device().is_cpu(), "fastattn_C.", op, ": bias must be on the CPU, got ",
              bias->device());
  TORCH_CHECK(at::isFloatingType(bias->scalar_type()), "fastattn_C.", op,
              ": bias must be floating point, got ", bias->scalar_type());
}

// The bias as M contiguous values of the compute type (zeros when absent): read once per row
// from L1, so the no-bias case needs no separate kernel.
at::Tensor bias_as(const std::optional<at::Tensor>& bias, const at::Tensor& x, at::ScalarType acc) {
  if (!bias.has_value()) return at::zeros({x.size(1)}, x.options().dtype(acc));
  return bias->to(acc).contiguous();
}

}  // namespace

at::Tensor bias_gelu_fwd(const at::Tensor& x_in, const std::optional<at::Tensor>& bias,
                         const std::string& approximate) {
  const Approx a = parse_approx(approximate, "bias_gelu_fwd");
  check_inputs(x_in, bias, "bias_gelu_fwd");
  const auto dt = x_in.scalar_type();
  const int64_t N = x_in.size(0), M = x_in.size(1);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = empty_out(N, M, x);
  if (N == 0 || M == 0) return out;
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor b = bias_as(bias, x, acc);

  if (dt == at::kDouble) {
    fwd_double(x.data_ptr<double>(), b.data_ptr<double>(), out.data_ptr<double>(), N, M, a);
  } else if (dt == at::kFloat) {
    if (a == Approx::kNone)
      fwd_vec<float, Approx::kNone>(x.data_ptr<float>(), b.data_ptr<float>(), out.data_ptr<float>(), N, M);
    else
      fwd_vec<float, Approx::kTanh>(x.data_ptr<float>(), b.data_ptr<float>(), out.data_ptr<float>(), N, M);
  } else {
    using BF = c10::BFloat16;
    if (a == Approx::kNone)
      fwd_vec<BF, Approx::kNone>(x.data_ptr<BF>(), b.data_ptr<float>(), out.data_ptr<BF>(), N, M);
    else
      fwd_vec<BF, Approx::kTanh>(x.data_ptr<BF>(), b.data_ptr<float>(), out.data_ptr<BF>(), N, M);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd(const at::Tensor& dout_in, const at::Tensor& x_in,
                                                 const std::optional<at::Tensor>& bias,
                                                 const std::string& approximate,
                                                 bool need_bias_grad) {
  const Approx a = parse_approx(approximate, "bias_gelu_bwd");
  check_inputs(x_in, bias, "bias_gelu_bwd");
  const auto dt = x_in.scalar_type();
  const int64_t N = x_in.size(0), M = x_in.size(1);
  check_2d(dout_in, "bias_gelu_bwd", "dout", N, M, dt);
  TORCH_CHECK(!need_bias_grad || bias.has_value(),
              "fastattn_C.bias_gelu_bwd: need_bias_grad without a bias");

  const at::Tensor dout = dout_in.contiguous(), x = x_in.contiguous();
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dx = empty_out(N, M, x);
  // dbias comes back in the bias's dtype (its gradient's dtype under autograd).
  const auto pdt = bias.has_value() ? bias->scalar_type() : dt;
  if (!need_bias_grad) {
    if (N > 0 && M > 0) {
      const at::Tensor b = bias_as(bias, x, acc);
      if (dt == at::kDouble) {
        bwd_double(dout.data_ptr<double>(), x.data_ptr<double>(), b.data_ptr<double>(),
                   dx.data_ptr<double>(), nullptr, N, M, a);
      } else if (dt == at::kFloat) {
        (a == Approx::kNone ? bwd_vec<float, Approx::kNone> : bwd_vec<float, Approx::kTanh>)(
            dout.data_ptr<float>(), x.data_ptr<float>(), b.data_ptr<float>(), dx.data_ptr<float>(),
            nullptr, num_chunks(N, 1), N, M);
      } else {
        using BF = c10::BFloat16;
        (a == Approx::kNone ? bwd_vec<BF, Approx::kNone> : bwd_vec<BF, Approx::kTanh>)(
            dout.data_ptr<BF>(), x.data_ptr<BF>(), b.data_ptr<float>(), dx.data_ptr<BF>(), nullptr,
            num_chunks(N, 1), N, M);
      }
    }
    return {dx, at::empty({0}, x.options().dtype(pdt))};
  }

  at::Tensor db = at::zeros({M}, x.options().dtype(acc));
  if (N == 0 || M == 0) return {dx, db.to(pdt)};
  const at::Tensor b = bias_as(bias, x, acc);
  if (dt == at::kDouble) {
    bwd_double(dout.data_ptr<double>(), x.data_ptr<double>(), b.data_ptr<double>(),
               dx.data_ptr<double>(), db.data_ptr<double>(), N, M, a);
    return {dx, db.to(pdt)};
  }
  // At least 8 rows per chunk, so tiny batches do not pay for a [threads, M] buffer each.
  const int64_t chunks = num_chunks(N, 8);
  at::Tensor db_part = at::zeros({chunks, M}, x.options().dtype(at::kFloat));
  if (dt == at::kFloat) {
    (a == Approx::kNone ? bwd_vec<float, Approx::kNone> : bwd_vec<float, Approx::kTanh>)(
        dout.data_ptr<float>(), x.data_ptr<float>(), b.data_ptr<float>(), dx.data_ptr<float>(),
        db_part.data_ptr<float>(), chunks, N, M);
  } else {
    using BF = c10::BFloat16;
    (a == Approx::kNone ? bwd_vec<BF, Approx::kNone> : bwd_vec<BF, Approx::kTanh>)(
        dout.data_ptr<BF>(), x.data_ptr<BF>(), b.data_ptr<float>(), dx.data_ptr<BF>(),
        db_part.data_ptr<float>(), chunks, N, M);
  }
  reduce_chunks(db_part.data_ptr<float>(), db.data_ptr<float>(), chunks, M);
  return {dx, db.to(pdt)};
}

}  // namespace cpu
}  // namespace fastattn
