// RMSNorm, and residual-add fused with RMSNorm, on the CPU: forward and backward.
//
// Maths, per row of M elements (s = x + residual, rounded to x's dtype, when a residual is
// given, else s = x), with the scale c = weight + weight_offset (c = 1 without a weight):
//   rstd = 1 / sqrt(mean(s^2) + eps),  xhat = s * rstd,  out = r(xhat) * c
// where r() rounds to x's dtype when cast_before_weight (LlamaRMSNorm's order) and is the
// identity otherwise (torch.nn.functional.rms_norm, GemmaRMSNorm).
// Backward, with g = dout * c:
//   dx = rstd * (g - xhat * mean(g * xhat))  (+ dsum, the gradient reaching s directly)
//   dweight = sum over rows of dout * r(xhat)   (the offset is a constant: no term of its own)
//
// Launch choices (those of csrc/cpu/layernorm.cpp, one fewer pass):
// - Rows are independent: at::parallel_for over rows; a row stays in L1/L2 between its
//   reduction pass and its normalising pass.
// - The scale c = weight + weight_offset is formed once per call ([M] floats) by the host code,
//   so the inner loops see one multiply whatever the offset.
// - dweight: one contiguous chunk of rows per thread accumulates partial sums into its own row
//   of a [chunks, M] float buffer in the loop that computes the row reduction (dout and xhat
//   are in registers there); reduce_chunks adds the chunks in a fixed order: deterministic for
//   a given thread count, no atomics.
// - float outputs of 16 MiB and more (vec.h's streamed()): the forward's output and the
//   backward's dx in streaming stores, as in layernorm.cpp; the residual sum stays plain.
// - float and bfloat16 are vectorised with at::vec and accumulate in float; float64 (gradcheck)
//   takes a plain scalar path, where r() is the identity.
//
// Test: pytest tests/test_rms_norm.py.
#include "cpu/kernels.h"
#include "cpu/vec.h"

#include <cmath>
#include <type_traits>

namespace fastattn {
namespace cpu {
namespace {

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// Rows per parallel task: enough work (~16K elements) to amortise scheduling.
inline int64_t row_grain(int64_t M) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, M)); }

// r(): round a float vector to T and back (identity for float). Through a stack buffer: the
// bfloat16 store/load pair of vec.h, no second conversion code path to get wrong.
template <typename T>
inline Vec round_to(const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    T buf[kVecSize];
    store_f<T>(v, buf);
    return load_f<T>(buf);
  }
}
template <typename T>
inline float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// ---------------------------------------------------------------- forward, float/bfloat16
template <typename T>
void fwd_vec(const T* x, const T* res, const float* c, T* out, T* sum, float* rstd, int64_t N,
             int64_t M, float eps, bool cast) {
  constexpr int64_t V = kVecSize;
  const float inv_m = 1.0f / static_cast<float>(M);
  const bool stream = streamed(out, N, M, sizeof(T));  // the sum (read back) stays plain
  at::parallel_for(0, N, row_grain(M), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* src = x + i * M;
      if (res != nullptr) {
        // s = x + residual, rounded to T: the normalised value is the sum the caller gets back.
        T* sr = sum + i * M;
        const T* rr = res + i * M;
        int64_t j = 0;
        for (; j + V <= M; j += V) store_f<T>(load_f<T>(src + j) + load_f<T>(rr + j), sr + j);
        for (; j < M; ++j) sr[j] = static_cast<T>(static_cast<float>(src[j]) + static_cast<float>(rr[j]));
        src = sr;
      }
      // Pass 1: sum of squares. Two accumulators hide the FMA latency.
      Vec a0(0.f), a1(0.f);
      int64_t j = 0;
      for (; j + 2 * V <= M; j += 2 * V) {
        const Vec v0 = load_f<T>(src + j), v1 = load_f<T>(src + j + V);
        a0 = at::vec::fmadd(v0, v0, a0);
        a1 = at::vec::fmadd(v1, v1, a1);
      }
      for (; j + V <= M; j += V) {
        const Vec v0 = load_f<T>(src + j);
        a0 = at::vec::fmadd(v0, v0, a0);
      }
      float ss = hsum(a0 + a1);
      for (; j < M; ++j) {
        const float v = static_cast<float>(src[j]);
        ss += v * v;
      }
      const float rs = 1.0f / std::sqrt(ss * inv_m + eps);
      // Pass 2: normalise (round first in the Llama order), scale.
      const Vec vrs(rs);
      T* o = out + i * M;
      j = 0;
      for (; j + V <= M; j += V) {
        Vec y = load_f<T>(src + j) * vrs;
        if (cast) y = round_to<T>(y);
        if (c != nullptr) y = y * Vec::loadu(c + j);
        store_out<T>(y, o + j, stream);
      }
      for (; j < M; ++j) {
        float y = static_cast<float>(src[j]) * rs;
        if (cast) y = round_to<T>(y);
        if (c != nullptr) y *= c[j];
        o[j] = static_cast<T>(y);
      }
      rstd[i] = rs;
    }
    if (stream) stream_fence();
  });
}

// ---------------------------------------------------------------- backward, float/bfloat16
template <typename T>
void bwd_vec(const T* dout, const T* x, const float* c, const float* rstd, const T* dsum, T* dx,
             float* dw_part, int64_t chunks, int64_t N, int64_t M, bool cast) {
  constexpr int64_t V = kVecSize;
  const float inv_m = 1.0f / static_cast<float>(M);
  const bool stream = streamed(dx, N, M, sizeof(T));
  at::parallel_for(0, chunks, 1, [&](int64_t cbegin, int64_t cend) {
    for (int64_t ch = cbegin; ch < cend; ++ch) {
      int64_t r0, r1;
      chunk_range(N, chunks, ch, r0, r1);
      float* dwp = dw_part != nullptr ? dw_part + ch * M : nullptr;
      for (int64_t i = r0; i < r1; ++i) {
        const T* dyr = dout + i * M;
        const T* xr = x + i * M;
        const float rs = rstd[i];
        const Vec vrs(rs);
        // Pass 1: the row reduction sum(g * xhat), and this chunk's dweight partials.
        Vec agx(0.f);
        int64_t j = 0;
        for (; j + V <= M; j += V) {
          const Vec dy = load_f<T>(dyr + j);
          const Vec xh = load_f<T>(xr + j) * vrs;
          const Vec g = c != nullptr ? dy * Vec::loadu(c + j) : dy;
          agx = at::vec::fmadd(g, xh, agx);
          if (dwp != nullptr) {
            const Vec xw = cast ? round_to<T>(xh) : xh;
            at::vec::fmadd(dy, xw, Vec::loadu(dwp + j)).store(dwp + j);
          }
        }
        float sgx = hsum(agx);
        for (; j < M; ++j) {
          const float dy = static_cast<float>(dyr[j]);
          const float xh = static_cast<float>(xr[j]) * rs;
          const float g = c != nullptr ? dy * c[j] : dy;
          sgx += g * xh;
          if (dwp != nullptr) dwp[j] += dy * (cast ? round_to<T>(xh) : xh);
        }
        const float mgx = sgx * inv_m;
        // Pass 2: dx = rstd * (g - xhat * mean(g * xhat)) (+ dsum).
        const Vec vmgx(mgx);
        T* dxr = dx + i * M;
        const T* dsr = dsum != nullptr ? dsum + i * M : nullptr;
        j = 0;
        for (; j + V <= M; j += V) {
          const Vec dy = load_f<T>(dyr + j);
          const Vec xh = load_f<T>(xr + j) * vrs;
          const Vec g = c != nullptr ? dy * Vec::loadu(c + j) : dy;
          Vec d = (g - xh * vmgx) * vrs;
          if (dsr != nullptr) d = d + load_f<T>(dsr + j);
          store_out<T>(d, dxr + j, stream);
        }
        for (; j < M; ++j) {
          const float dy = static_cast<float>(dyr[j]);
          const float xh = static_cast<float>(xr[j]) * rs;
          const float g = c != nullptr ? dy * c[j] : dy;
          float d = (g - xh * mgx) * rs;
          if (dsr != nullptr) d += static_cast<float>(dsr[j]);
          dxr[j] = static_cast<T>(d);
        }
      }
    }
    if (stream) stream_fence();
  });
}

// ---------------------------------------------------------------- float64 (gradcheck) path
void fwd_double(const double* x, const double* res, const double* c, double* out, double* sum,
                double* rstd, int64_t N, int64_t M, double eps) {
  at::parallel_for(0, N, row_grain(M), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double* src = x + i * M;
      if (res != nullptr) {
        for (int64_t j = 0; j < M; ++j) sum[i * M + j] = src[j] + res[i * M + j];
        src = sum + i * M;
      }
      double ss = 0;
      for (int64_t j = 0; j < M; ++j) ss += src[j] * src[j];
      const double rs = 1.0 / std::sqrt(ss / M + eps);
      for (int64_t j = 0; j < M; ++j) out[i * M + j] = src[j] * rs * (c != nullptr ? c[j] : 1.0);
      rstd[i] = rs;
    }
  });
}

void bwd_double(const double* dout, const double* x, const double* c, const double* rstd,
                const double* dsum, double* dx, double* dw, int64_t N, int64_t M) {
  at::parallel_for(0, N, row_grain(M), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double *dy = dout + i * M, *xr = x + i * M;
      double sgx = 0;
      for (int64_t j = 0; j < M; ++j) sgx += dy[j] * (c != nullptr ? c[j] : 1.0) * xr[j] * rstd[i];
      for (int64_t j = 0; j < M; ++j) {
        const double g = dy[j] * (c != nullptr ? c[j] : 1.0);
        const double d = (g - xr[j] * rstd[i] * sgx / M) * rstd[i];
        dx[i * M + j] = d + (dsum != nullptr ? dsum[i * M + j] : 0.0);
      }
    }
  });
  if (dw == nullptr) return;
  // Column sums: serial over rows per column keeps the float64 path simple and exact-order.
  at::parallel_for(0, M, 256, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      double sw = 0;
      for (int64_t i = 0; i < N; ++i) sw += dout[i * M + j] * x[i * M + j] * rstd[i];
      dw[j] = sw;
    }
  });
}

void check_2d(const at::Tensor& t, const char* name, int64_t N, int64_t M, at::ScalarType dt) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == M, "fastattn_C.rms_norm: ", name,
              " must have shape [", N, ", ", M, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dt, "fastattn_C.rms_norm: ", name, " must be ", dt, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "fastattn_C.rms_norm: ", name, " must be on the CPU");
}

void check_weight(const std::optional<at::Tensor>& t, int64_t M) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == M, "fastattn_C.rms_norm: weight must have shape [",
              M, "], got ", t->sizes());
  TORCH_CHECK(t->device().is_cpu(), "fastattn_C.rms_norm: weight must be on the CPU");
  TORCH_CHECK(at::isFloatingType(t->scalar_type()),
              "fastattn_C.rms_norm: weight must be floating point, got ", t->scalar_type());
}

void check_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 2, "fastattn_C.", op, ": x must be 2-D [rows, cols], got ", x.dim(), "-D");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kDouble, "fastattn_C.", op,
              ": x must be float32, bfloat16 or float64, got ", dt);
}

// The scale c = weight + weight_offset in the accumulation dtype, M elements, or undefined.
at::Tensor scale_as(const std::optional<at::Tensor>& w, double offset, at::ScalarType acc) {
  if (!w.has_value()) return at::Tensor();
  at::Tensor c = w->to(acc).contiguous();
  if (offset != 0.0) c = c + offset;
  return c;
}

template <typename P>
P* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<P>() : nullptr;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& residual, double eps, double weight_offset,
    bool cast_before_weight) {
  check_input(x_in, "rms_norm_fwd");
  const auto dt = x_in.scalar_type();
  const int64_t N = x_in.size(0), M = x_in.size(1);
  TORCH_CHECK(M > 0 || N == 0, "fastattn_C.rms_norm_fwd: rows must not be empty");
  TORCH_CHECK(eps >= 0 && std::isfinite(eps),
              "fastattn_C.rms_norm_fwd: eps must be a finite value >= 0, got ", eps);
  TORCH_CHECK(std::isfinite(weight_offset),
              "fastattn_C.rms_norm_fwd: weight_offset must be finite, got ", weight_offset);
  check_weight(weight, M);
  if (residual.has_value()) check_2d(*residual, "residual", N, M, dt);

  const at::Tensor x = x_in.contiguous();
  const at::Tensor res = residual.has_value() ? residual->contiguous() : at::Tensor();
  at::Tensor out = at::empty({N, M}, x.options());
  at::Tensor sum = residual.has_value() ? at::empty({N, M}, x.options()) : at::empty({0}, x.options());
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor rstd = at::empty({N}, x.options().dtype(acc));
  if (N == 0) return {out, sum, rstd};
  const at::Tensor c = scale_as(weight, weight_offset, acc);

  if (dt == at::kDouble) {
    fwd_double(x.data_ptr<double>(), ptr_or_null<double>(res), ptr_or_null<double>(c),
               out.data_ptr<double>(), residual.has_value() ? sum.data_ptr<double>() : nullptr,
               rstd.data_ptr<double>(), N, M, eps);
  } else if (dt == at::kFloat) {
    fwd_vec<float>(x.data_ptr<float>(), ptr_or_null<float>(res), ptr_or_null<float>(c),
                   out.data_ptr<float>(), residual.has_value() ? sum.data_ptr<float>() : nullptr,
                   rstd.data_ptr<float>(), N, M, static_cast<float>(eps), false);
  } else {
    using BF = c10::BFloat16;
    fwd_vec<BF>(x.data_ptr<BF>(), ptr_or_null<BF>(res), ptr_or_null<float>(c), out.data_ptr<BF>(),
                residual.has_value() ? sum.data_ptr<BF>() : nullptr, rstd.data_ptr<float>(), N, M,
                static_cast<float>(eps), cast_before_weight);
  }
  return {out, sum, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(
    const at::Tensor& dout_in, const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const at::Tensor& rstd_in, const std::optional<at::Tensor>& dsum, double weight_offset,
    bool cast_before_weight, bool need_weight_grad) {
  check_input(x_in, "rms_norm_bwd");
  const auto dt = x_in.scalar_type();
  const int64_t N = x_in.size(0), M = x_in.size(1);
  check_2d(dout_in, "dout", N, M, dt);
  check_weight(weight, M);
  if (dsum.has_value()) check_2d(*dsum, "dsum", N, M, dt);
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(rstd_in.numel() == N && rstd_in.scalar_type() == acc,
              "fastattn_C.rms_norm_bwd: rstd must hold ", N, " values of ", acc, ", got ",
              rstd_in.sizes(), " ", rstd_in.scalar_type());
  TORCH_CHECK(!need_weight_grad || weight.has_value(),
              "fastattn_C.rms_norm_bwd: need_weight_grad without a weight");
  TORCH_CHECK(std::isfinite(weight_offset),
              "fastattn_C.rms_norm_bwd: weight_offset must be finite, got ", weight_offset);

  const at::Tensor dout = dout_in.contiguous(), x = x_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  const at::Tensor ds = dsum.has_value() ? dsum->contiguous() : at::Tensor();
  const at::Tensor c = scale_as(weight, weight_offset, acc);
  at::Tensor dx = at::empty({N, M}, x.options());
  at::Tensor dw = need_weight_grad ? at::empty({M}, x.options().dtype(acc)) : at::Tensor();
  const auto pdt = weight.has_value() ? weight->scalar_type() : dt;
  auto finish = [&](const at::Tensor& t) {
    return t.defined() ? t.to(pdt) : at::empty({0}, x.options().dtype(pdt));
  };
  if (N == 0 || M == 0) {
    if (dw.defined()) dw.zero_();
    return {dx, finish(dw)};
  }

  if (dt == at::kDouble) {
    bwd_double(dout.data_ptr<double>(), x.data_ptr<double>(), ptr_or_null<double>(c),
               rstd.data_ptr<double>(), ptr_or_null<double>(ds), dx.data_ptr<double>(),
               ptr_or_null<double>(dw), N, M);
    return {dx, finish(dw)};
  }

  // At least 8 rows per chunk, so tiny batches do not pay for a [threads, M] buffer each.
  const int64_t chunks = num_chunks(N, 8);
  at::Tensor dw_part = need_weight_grad ? at::zeros({chunks, M}, x.options().dtype(at::kFloat)) : at::Tensor();
  if (dt == at::kFloat) {
    bwd_vec<float>(dout.data_ptr<float>(), x.data_ptr<float>(), ptr_or_null<float>(c),
                   rstd.data_ptr<float>(), ptr_or_null<float>(ds), dx.data_ptr<float>(),
                   ptr_or_null<float>(dw_part), chunks, N, M, false);
  } else {
    using BF = c10::BFloat16;
    bwd_vec<BF>(dout.data_ptr<BF>(), x.data_ptr<BF>(), ptr_or_null<float>(c),
                rstd.data_ptr<float>(), ptr_or_null<BF>(ds), dx.data_ptr<BF>(),
                ptr_or_null<float>(dw_part), chunks, N, M, cast_before_weight);
  }
  if (need_weight_grad) reduce_chunks(dw_part.data_ptr<float>(), dw.data_ptr<float>(), chunks, M);
  return {dx, finish(dw)};
}

}  // namespace cpu
}  // namespace fastattn
