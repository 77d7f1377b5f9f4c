// LayerNorm, and residual-add fused with LayerNorm, on the CPU: forward and backward.
//
// Maths, per row of M elements (s = x + residual when a residual is given, else s = x):
//   mu = mean(s),  var = mean((s - mu)^2),  rstd = 1 / sqrt(var + eps)
//   xhat = (s - mu) * rstd,  out = xhat * weight + bias
// Backward, with g = dout * weight:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))  (+ dsum, the gradient reaching s directly)
//   dweight = sum over rows of dout * xhat,  dbias = sum over rows of dout
//
// Launch choices:
// - Rows are independent: at::parallel_for over rows. A row (<= a few 10s of KB) stays in
//   L1/L2, so the two reduction passes and the normalising pass read memory once.
// - The variance is two-pass (sum of squared deviations from the mean), not E[x^2]-E[x]^2:
//   it costs an L1 pass and never cancels catastrophically.
// - dweight/dbias: one contiguous chunk of rows per thread accumulates partial sums into its own
//   row of a [chunks, M] float buffer, in the same loop that computes dx (dout and xhat are
//   already in registers there). A second parallel pass over columns adds the chunks in a fixed
//   order: deterministic for a given thread count, no atomics.
// - float and bfloat16 are vectorised with at::vec (AVX-512 / AVX2 / portable, chosen by
//   setup.py) and accumulate in float; float64 (used by gradcheck) takes a plain scalar path.
//
// Test: pytest tests/test_layernorm.py.  Time: python -m benchmarks.run layernorm.
#include "cpu/kernels.h"
#include "cpu/vec.h"

#include <cmath>
#include <type_traits>
#include <vector>

namespace fastattn {
namespace cpu {
namespace {

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// Rows per parallel task: enough work (~16K elements) to amortise scheduling.
inline int64_t row_grain(int64_t M) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, M)); }

// ---------------------------------------------------------------- forward, float/bfloat16
template <typename T>
void fwd_vec(const T* x, const T* res, const float* w, const float* b, T* out, T* sum,
             float* mean, float* rstd, int64_t N, int64_t M, float eps) {
  constexpr int64_t V = kVecSize;
  const float inv_m = 1.0f / static_cast<float>(M);
  // Streaming stores only where rows stay 64-byte aligned and the output dwarfs the cache.
  const bool stream = res == nullptr && (M % 16) == 0 && N * M * int64_t(sizeof(T)) >= kStreamBytes;
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
      // Pass 1: mean. Two accumulators hide the add latency.
      Vec a0(0.f), a1(0.f);
      int64_t j = 0;
      for (; j + 2 * V <= M; j += 2 * V) {
        a0 += load_f<T>(src + j);
        a1 += load_f<T>(src + j + V);
      }
      for (; j + V <= M; j += V) a0 += load_f<T>(src + j);
      float s = hsum(a0 + a1);
      for (; j < M; ++j) s += static_cast<float>(src[j]);
      const float mu = s * inv_m;
      // Pass 2: variance about the mean.
      const Vec vmu(mu);
      a0 = Vec(0.f);
      a1 = Vec(0.f);
      j = 0;
      for (; j + 2 * V <= M; j += 2 * V) {
        Vec d0 = load_f<T>(src + j) - vmu, d1 = load_f<T>(src + j + V) - vmu;
        a0 = at::vec::fmadd(d0, d0, a0);
        a1 = at::vec::fmadd(d1, d1, a1);
      }
      for (; j + V <= M; j += V) {
        Vec d0 = load_f<T>(src + j) - vmu;
        a0 = at::vec::fmadd(d0, d0, a0);
      }
      float ss = hsum(a0 + a1);
      for (; j < M; ++j) {
        float d = static_cast<float>(src[j]) - mu;
        ss += d * d;
      }
      const float rs = 1.0f / std::sqrt(ss * inv_m + eps);
      // Pass 3: normalise, scale, shift.
      const Vec vrs(rs);
      T* o = out + i * M;
      j = 0;
      if constexpr (std::is_same_v<T, float>) {
        if (stream && aligned64(o)) {
          for (; j + V <= M; j += V) {
            Vec y = (load_f<T>(src + j) - vmu) * vrs;
            if (w != nullptr) y = y * Vec::loadu(w + j);
            if (b != nullptr) y = y + Vec::loadu(b + j);
            store_stream(y, o + j);
          }
        }
      }
      for (; j + V <= M; j += V) {
        Vec y = (load_f<T>(src + j) - vmu) * vrs;
        if (w != nullptr) y = y * Vec::loadu(w + j);
        if (b != nullptr) y = y + Vec::loadu(b + j);
        store_f<T>(y, o + j);
      }
      for (; j < M; ++j) {
        float y = (static_cast<float>(src[j]) - mu) * rs;
        if (w != nullptr) y *= w[j];
        if (b != nullptr) y += b[j];
        o[j] = static_cast<T>(y);
      }
      mean[i] = mu;
      rstd[i] = rs;
    }
    if (stream) stream_fence();
  });
}

// ---------------------------------------------------------------- backward, float/bfloat16
template <typename T>
void bwd_vec(const T* dout, const T* x, const float* w, const float* mean, const float* rstd,
             const T* dsum, T* dx, float* dw_part, float* db_part, int64_t chunks, int64_t N,
             int64_t M) {
  constexpr int64_t V = kVecSize;
  const float inv_m = 1.0f / static_cast<float>(M);
  at::parallel_for(0, chunks, 1, [&](int64_t cbegin, int64_t cend) {
    for (int64_t c = cbegin; c < cend; ++c) {
      int64_t r0, r1;
      chunk_range(N, chunks, c, r0, r1);
      float* dwp = dw_part != nullptr ? dw_part + c * M : nullptr;
      float* dbp = db_part != nullptr ? db_part + c * M : nullptr;
      for (int64_t i = r0; i < r1; ++i) {
        const T* dyr = dout + i * M;
        const T* xr = x + i * M;
        const float mu = mean[i], rs = rstd[i];
        const Vec vmu(mu), vrs(rs);
        // Pass 1: the two row reductions, and this chunk's dweight / dbias partials.
        Vec ag(0.f), agx(0.f);
        int64_t j = 0;
        for (; j + V <= M; j += V) {
          Vec dy = load_f<T>(dyr + j);
          Vec xh = (load_f<T>(xr + j) - vmu) * vrs;
          Vec g = w != nullptr ? dy * Vec::loadu(w + j) : dy;
          ag += g;
          agx = at::vec::fmadd(g, xh, agx);
          if (dwp != nullptr) at::vec::fmadd(dy, xh, Vec::loadu(dwp + j)).store(dwp + j);
          if (dbp != nullptr) (Vec::loadu(dbp + j) + dy).store(dbp + j);
        }
        float sg = hsum(ag), sgx = hsum(agx);
        for (; j < M; ++j) {
          float dy = static_cast<float>(dyr[j]);
          float xh = (static_cast<float>(xr[j]) - mu) * rs;
          float g = w != nullptr ? dy * w[j] : dy;
          sg += g;
          sgx += g * xh;
          if (dwp != nullptr) dwp[j] += dy * xh;
          if (dbp != nullptr) dbp[j] += dy;
        }
        const float mg = sg * inv_m, mgx = sgx * inv_m;
        // Pass 2: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dsum).
        const Vec vmg(mg), vmgx(mgx);
        T* dxr = dx + i * M;
        const T* dsr = dsum != nullptr ? dsum + i * M : nullptr;
        j = 0;
        for (; j + V <= M; j += V) {
          Vec dy = load_f<T>(dyr + j);
          Vec xh = (load_f<T>(xr + j) - vmu) * vrs;
          Vec g = w != nullptr ? dy * Vec::loadu(w + j) : dy;
          Vec d = (g - vmg - xh * vmgx) * vrs;
          if (dsr != nullptr) d = d + load_f<T>(dsr + j);
          store_f<T>(d, dxr + j);
        }
        for (; j < M; ++j) {
          float dy = static_cast<float>(dyr[j]);
          float xh = (static_cast<float>(xr[j]) - mu) * rs;
          float g = w != nullptr ? dy * w[j] : dy;
          float d = (g - mg - xh * mgx) * rs;
          if (dsr != nullptr) d += static_cast<float>(dsr[j]);
          dxr[j] = static_cast<T>(d);
        }
      }
    }
  });
}

// ---------------------------------------------------------------- float64 (gradcheck) path
void fwd_double(const double* x, const double* res, const double* w, const double* b,
                double* out, double* sum, double* mean, double* rstd, int64_t N, int64_t M,
                double eps) {
  at::parallel_for(0, N, row_grain(M), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double* src = x + i * M;
      if (res != nullptr) {
        for (int64_t j = 0; j < M; ++j) sum[i * M + j] = src[j] + res[i * M + j];
        src = sum + i * M;
      }
      double s = 0, ss = 0;
      for (int64_t j = 0; j < M; ++j) s += src[j];
      const double mu = s / M;
      for (int64_t j = 0; j < M; ++j) ss += (src[j] - mu) * (src[j] - mu);
      const double rs = 1.0 / std::sqrt(ss / M + eps);
      for (int64_t j = 0; j < M; ++j) {
        double y = (src[j] - mu) * rs;
        if (w != nullptr) y *= w[j];
        if (b != nullptr) y += b[j];
        out[i * M + j] = y;
      }
      mean[i] = mu;
      rstd[i] = rs;
    }
  });
}

void bwd_double(const double* dout, const double* x, const double* w, const double* mean,
                const double* rstd, const double* dsum, double* dx, double* dw, double* db,
                int64_t N, int64_t M) {
  at::parallel_for(0, N, row_grain(M), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double *dy = dout + i * M, *xr = x + i * M;
      double sg = 0, sgx = 0;
      for (int64_t j = 0; j < M; ++j) {
        double g = dy[j] * (w != nullptr ? w[j] : 1.0);
        sg += g;
        sgx += g * (xr[j] - mean[i]) * rstd[i];
      }
      for (int64_t j = 0; j < M; ++j) {
        double xh = (xr[j] - mean[i]) * rstd[i];
        double g = dy[j] * (w != nullptr ? w[j] : 1.0);
        double d = (g - sg / M - xh * sgx / M) * rstd[i];
        dx[i * M + j] = d + (dsum != nullptr ? dsum[i * M + j] : 0.0);
      }
    }
  });
  // Column sums: serial over rows per column keeps the float64 path simple and exact-order.
  at::parallel_for(0, M, 256, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      double sw = 0, sb = 0;
      for (int64_t i = 0; i < N; ++i) {
        sw += dout[i * M + j] * (x[i * M + j] - mean[i]) * rstd[i];
        sb += dout[i * M + j];
      }
      if (dw != nullptr) dw[j] = sw;
      if (db != nullptr) db[j] = sb;
    }
  });
}

void check_2d(const at::Tensor& t, const char* name, int64_t N, int64_t M, at::ScalarType dt) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == M, "fastattn_C.layer_norm: ", name,
              " must have shape [", N, ", ", M, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dt, "fastattn_C.layer_norm: ", name, " must be ", dt, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "fastattn_C.layer_norm: ", name, " must be on the CPU");
}

void check_vec(const std::optional<at::Tensor>& t, const char* name, int64_t M) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == M, "fastattn_C.layer_norm: ", name,
              " must have shape [", M, "], got ", t->sizes());
  TORCH_CHECK(t->device().is_cpu(), "fastattn_C.layer_norm: ", name, " must be on the CPU");
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "fastattn_C.layer_norm: ", name,
              " must be floating point, got ", t->scalar_type());
}

// Parameters are read as float (or double for double inputs): M elements, converted once.
at::Tensor param_as(const std::optional<at::Tensor>& t, at::ScalarType dt) {
  if (!t.has_value()) return at::Tensor();
  return t->to(dt).contiguous();
}

template <typename P>
P* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<P>() : nullptr;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    double eps) {
  TORCH_CHECK(x_in.dim() == 2, "fastattn_C.layer_norm_fwd: x must be 2-D [rows, cols], got ",
              x_in.dim(), "-D");
  const auto dt = x_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kDouble,
              "fastattn_C.layer_norm_fwd: x must be float32, bfloat16 or float64, got ", dt);
  const int64_t N = x_in.size(0), M = x_in.size(1);
  TORCH_CHECK(M > 0 || N == 0, "fastattn_C.layer_norm_fwd: rows must not be empty");
  TORCH_CHECK(eps >= 0, "fastattn_C.layer_norm_fwd: eps must be >= 0, got ", eps);
  check_2d(x_in, "x", N, M, dt);
  check_vec(weight, "weight", M);
  check_vec(bias, "bias", M);
  if (residual.has_value()) check_2d(*residual, "residual", N, M, dt);

  const at::Tensor x = x_in.contiguous();
  const at::Tensor res = residual.has_value() ? residual->contiguous() : at::Tensor();
  at::Tensor out = at::empty({N, M}, x.options());
  at::Tensor sum = residual.has_value() ? at::empty({N, M}, x.options()) : at::empty({0}, x.options());
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({N}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({N}, x.options().dtype(acc));
  if (N == 0) return {out, sum, mean, rstd};
  at::Tensor w = param_as(weight, acc), b = param_as(bias, acc);

  if (dt == at::kDouble) {
    fwd_double(x.data_ptr<double>(), ptr_or_null<double>(res), ptr_or_null<double>(w),
               ptr_or_null<double>(b), out.data_ptr<double>(),
               residual.has_value() ? sum.data_ptr<double>() : nullptr, mean.data_ptr<double>(),
               rstd.data_ptr<double>(), N, M, eps);
  } else if (dt == at::kFloat) {
    fwd_vec<float>(x.data_ptr<float>(), ptr_or_null<float>(res), ptr_or_null<float>(w),
                   ptr_or_null<float>(b), out.data_ptr<float>(),
                   residual.has_value() ? sum.data_ptr<float>() : nullptr, mean.data_ptr<float>(),
                   rstd.data_ptr<float>(), N, M, static_cast<float>(eps));
  } else {
    using BF = c10::BFloat16;
    fwd_vec<BF>(x.data_ptr<BF>(), ptr_or_null<BF>(res), ptr_or_null<float>(w),
                ptr_or_null<float>(b), out.data_ptr<BF>(),
                residual.has_value() ? sum.data_ptr<BF>() : nullptr, mean.data_ptr<float>(),
                rstd.data_ptr<float>(), N, M, static_cast<float>(eps));
  }
  return {out, sum, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
    const at::Tensor& dout_in, const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean_in, const at::Tensor& rstd_in, const std::optional<at::Tensor>& dsum,
    bool need_weight_grad, bool need_bias_grad) {
  TORCH_CHECK(x_in.dim() == 2, "fastattn_C.layer_norm_bwd: x must be 2-D, got ", x_in.dim(), "-D");
  const auto dt = x_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kDouble,
              "fastattn_C.layer_norm_bwd: x must be float32, bfloat16 or float64, got ", dt);
  const int64_t N = x_in.size(0), M = x_in.size(1);
  check_2d(dout_in, "dout", N, M, dt);
  check_vec(weight, "weight", M);
  if (dsum.has_value()) check_2d(*dsum, "dsum", N, M, dt);
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(mean_in.numel() == N && rstd_in.numel() == N && mean_in.scalar_type() == acc &&
                  rstd_in.scalar_type() == acc,
              "fastattn_C.layer_norm_bwd: mean and rstd must hold ", N, " values of ", acc);
  TORCH_CHECK(!need_weight_grad || weight.has_value(),
              "fastattn_C.layer_norm_bwd: need_weight_grad without a weight");

  const at::Tensor dout = dout_in.contiguous(), x = x_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const at::Tensor ds = dsum.has_value() ? dsum->contiguous() : at::Tensor();
  at::Tensor w = param_as(weight, acc);
  at::Tensor dx = at::empty({N, M}, x.options());
  at::Tensor dw = need_weight_grad ? at::empty({M}, x.options().dtype(acc)) : at::Tensor();
  at::Tensor db = need_bias_grad ? at::empty({M}, x.options().dtype(acc)) : at::Tensor();
  auto pdt = weight.has_value() ? weight->scalar_type() : dt;
  auto finish = [&](at::Tensor t) {
    return t.defined() ? t.to(pdt) : at::empty({0}, x.options().dtype(pdt));
  };
  if (N == 0 || M == 0) {
    if (dw.defined()) dw.zero_();
    if (db.defined()) db.zero_();
    return {dx, finish(dw), finish(db)};
  }

  if (dt == at::kDouble) {
    bwd_double(dout.data_ptr<double>(), x.data_ptr<double>(), ptr_or_null<double>(w),
               mean.data_ptr<double>(), rstd.data_ptr<double>(), ptr_or_null<double>(ds),
               dx.data_ptr<double>(), ptr_or_null<double>(dw), ptr_or_null<double>(db), N, M);
    return {dx, finish(dw), finish(db)};
  }

  // At least 8 rows per chunk, so tiny batches do not pay for a [threads, M] buffer each.
  const int64_t chunks = num_chunks(N, 8);
  at::Tensor dw_part = need_weight_grad ? at::zeros({chunks, M}, x.options().dtype(at::kFloat)) : at::Tensor();
  at::Tensor db_part = need_bias_grad ? at::zeros({chunks, M}, x.options().dtype(at::kFloat)) : at::Tensor();
  if (dt == at::kFloat) {
    bwd_vec<float>(dout.data_ptr<float>(), x.data_ptr<float>(), ptr_or_null<float>(w),
                   mean.data_ptr<float>(), rstd.data_ptr<float>(), ptr_or_null<float>(ds),
                   dx.data_ptr<float>(), ptr_or_null<float>(dw_part), ptr_or_null<float>(db_part),
                   chunks, N, M);
  } else {
    using BF = c10::BFloat16;
    bwd_vec<BF>(dout.data_ptr<BF>(), x.data_ptr<BF>(), ptr_or_null<float>(w),
                mean.data_ptr<float>(), rstd.data_ptr<float>(), ptr_or_null<BF>(ds),
                dx.data_ptr<BF>(), ptr_or_null<float>(dw_part), ptr_or_null<float>(db_part),
                chunks, N, M);
  }
  if (need_weight_grad) reduce_chunks(dw_part.data_ptr<float>(), dw.data_ptr<float>(), chunks, M);
  if (need_bias_grad) reduce_chunks(db_part.data_ptr<float>(), db.data_ptr<float>(), chunks, M);
  return {dx, finish(dw), finish(db)};
}

}  // namespace cpu
}  // namespace fastattn
