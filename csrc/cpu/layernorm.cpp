// LayerNorm, and residual-add fused with LayerNorm, on the CPU: forward and backward.
//
// Maths, per row of M elements (s = x + residual when a residual is given, else s = x):
//   mu = mean(s),  var = mean((s - mu)^2),  rstd = 1 / sqrt(var + eps)
//   xhat = (s - mu) * rstd,  out = xhat * weight + bias
// Backward, with g = dout * weight:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))  (+ dsum, the gradient reaching s directly)
//   dweight = sum over rows of dout * xhat,  dbias = sum over rows of dout
// The mean's rounding: mu rounded to float is off by up to ulp(mu) / 2, the same in every
// column, so on a row whose spread is small next to its mean (2 columns, a near-constant row)
// s - mu carries a relative error of ulp(mu) / spread into xhat, the output and dweight, and the
// dx formula (which assumes sum(xhat) == 0) amplifies it further. The forward subtracts the
// rounding error too, c = mean(s - mu) (in the variance pass: var = mean((s - mu)^2) - c^2,
// xhat = (s - mu - c) * rstd); the backward centres the recomputed xhat on its own row mean,
// xc = xhat - mean(xhat), with mean(g * xc), and dweight sums dout * xc. Both are then 10-100x
// more accurate than PyTorch on such rows (whose own error is that of the rounded mean).
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
// - float outputs of 16 MiB and more (vec.h's streamed()) are written with streaming stores:
//   the forward's y and the backward's dx / ds (the backward at 32768 x 1024 took 0.55-0.65 of
//   the time with them, measured); add_layer_norm's sum is stored plainly (read back from L1).
// - float and bfloat16 are vectorised with at::vec (AVX-512 / AVX2 / portable, chosen by
//   setup.py) and accumulate in float; float64 (used by gradcheck) takes a plain scalar path.
//
// Test: pytest tests/test_layernorm.py.  Time: python -m benchmarks.run layernorm.
#include "cpu/kernels.h"
#include "cpu/philox.h"
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

// ---------------------------------------------------------------- row dropout helpers
// Keep bits of the 16 columns starting at column j (j % 16 == 0 holds for the vector loops
// when V = 16; V = 8 takes the half the column selects).
inline uint32_t keep_bits(const uint16_t bits[4], int64_t j) {
  return static_cast<uint32_t>(bits[(j % 64) / 16]) >> (j % 16);
}
inline Vec drop_vec(const Vec& v, uint32_t bits, float scale) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vec(_mm512_maskz_mul_ps(static_cast<__mmask16>(bits), __m512(v), _mm512_set1_ps(scale)));
#else
  float t[kVecSize];
  v.store(t);
  for (int64_t l = 0; l < kVecSize; ++l) t[l] = ((bits >> l) & 1u) ? t[l] * scale : 0.f;
  return Vec::loadu(t);
#endif
}
inline float drop_one(float v, const uint16_t bits[4], int64_t j, float scale) {
  return (keep_bits(bits, j) & 1u) ? v * scale : 0.f;
}

// ---------------------------------------------------------------- forward, float/bfloat16
// TX: x (the sublayer output), TR: residual, TS: the sum s = dropout(x) + residual (the
// promoted type; TS == TX when nothing is added or dropped), TO: the normalised output.
template <typename TX, typename TR, typename TS, typename TO>
void fwd_vec(const TX* x, const TR* res, const float* w, const float* b, TO* out, TS* sum,
             float* mean, float* rstd, int64_t N, int64_t M, float eps, const RowDropout& drop) {
  constexpr int64_t V = kVecSize;
  const float inv_m = 1.0f / static_cast<float>(M);
  // Streaming stores for the normalised output only where rows stay 64-byte aligned and the
  // output dwarfs the cache. The sum s (add_layer_norm) is stored plainly: its row is read
  // back from L1 by the passes below.
  const bool stream = streamed(out, N, M, sizeof(TO));
  // A bfloat16 row is widened once, in the mean pass, into an L1-resident float row that the
  // variance and normalising passes read: each conversion is ~3 vector ops, and the bf16 kernel
  // was bound by its arithmetic (0.61 of the copy speed forward against 1.1 in float32).
  constexpr bool kWiden = !std::is_same_v<TS, float>;
  at::parallel_for(0, N, row_grain(M), [&](int64_t begin, int64_t end) {
    uint16_t bits[4] = {0, 0, 0, 0};
    std::vector<float> widened(kWiden ? M : 0);
    for (int64_t i = begin; i < end; ++i) {
      const TS* src;
      if (sum != nullptr) {
        // s = dropout(x) + residual, rounded to TS: the normalised value is the sum the caller
        // gets back (and the backward reads).
        TS* sr = sum + i * M;
        const TX* xr = x + i * M;
        const TR* rr = res != nullptr ? res + i * M : nullptr;
        int64_t j = 0;
        for (; j + V <= M; j += V) {
          Vec v = load_f<TX>(xr + j);
          if (drop.on) {
            if (j % 64 == 0) drop.block(static_cast<uint32_t>(i), static_cast<uint32_t>(j / 64), bits);
            v = drop_vec(v, keep_bits(bits, j), drop.scale);
          }
          if (rr != nullptr) v = v + load_f<TR>(rr + j);
          store_f<TS>(v, sr + j);
        }
        for (; j < M; ++j) {
          float v = static_cast<float>(xr[j]);
          if (drop.on) {
            if (j % 64 == 0 || j == (M / V) * V)
              drop.block(static_cast<uint32_t>(i), static_cast<uint32_t>(j / 64), bits);
            v = drop_one(v, bits, j, drop.scale);
          }
          if (rr != nullptr) v += static_cast<float>(rr[j]);
          sr[j] = static_cast<TS>(v);
        }
        src = sr;
      } else {
        src = reinterpret_cast<const TS*>(x + i * M);  // TS == TX here
      }
      // Pass 1: mean (and the widened row). Two accumulators hide the add latency.
      Vec a0(0.f), a1(0.f);
      int64_t j = 0;
      float* wf = widened.data();
      for (; j + 2 * V <= M; j += 2 * V) {
        const Vec v0 = load_f<TS>(src + j), v1 = load_f<TS>(src + j + V);
        if constexpr (kWiden) {
          v0.store(wf + j);
          v1.store(wf + j + V);
        }
        a0 += v0;
        a1 += v1;
      }
      for (; j + V <= M; j += V) {
        const Vec v0 = load_f<TS>(src + j);
        if constexpr (kWiden) v0.store(wf + j);
        a0 += v0;
      }
      float s = hsum(a0 + a1);
      for (; j < M; ++j) {
        const float v = static_cast<float>(src[j]);
        if constexpr (kWiden) wf[j] = v;
        s += v;
      }
      const float mu = s * inv_m;
      const float* fs = kWiden ? wf : reinterpret_cast<const float*>(src);
      // Pass 2: variance about the mean, and the mean's rounding error c = mean(s - mu) (see
      // the header): var = mean((s - mu)^2) - c^2, xhat = (s - mu - c) * rstd.
      const Vec vmu(mu);
      a0 = Vec(0.f);
      a1 = Vec(0.f);
      Vec c0(0.f), c1(0.f);
      j = 0;
      for (; j + 2 * V <= M; j += 2 * V) {
        Vec d0 = Vec::loadu(fs + j) - vmu, d1 = Vec::loadu(fs + j + V) - vmu;
        a0 = at::vec::fmadd(d0, d0, a0);
        a1 = at::vec::fmadd(d1, d1, a1);
        c0 += d0;
        c1 += d1;
      }
      for (; j + V <= M; j += V) {
        Vec d0 = Vec::loadu(fs + j) - vmu;
        a0 = at::vec::fmadd(d0, d0, a0);
        c0 += d0;
      }
      float ss = hsum(a0 + a1), sd = hsum(c0 + c1);
      for (; j < M; ++j) {
        float d = fs[j] - mu;
        ss += d * d;
        sd += d;
      }
      const float c = sd * inv_m;
      const float rs = 1.0f / std::sqrt(std::max(ss * inv_m - c * c, 0.0f) + eps);
      // Pass 3: normalise, scale, shift.
      const Vec vrs(rs), vc(c);
      TO* o = out + i * M;
      for (j = 0; j + V <= M; j += V) {
        Vec y = (Vec::loadu(fs + j) - vmu - vc) * vrs;
        if (w != nullptr) y = y * Vec::loadu(w + j);
        if (b != nullptr) y = y + Vec::loadu(b + j);
        store_out<TO>(y, o + j, stream);
      }
      for (; j < M; ++j) {
        float y = (fs[j] - mu - c) * rs;
        if (w != nullptr) y *= w[j];
        if (b != nullptr) y += b[j];
        o[j] = static_cast<TO>(y);
      }
      mean[i] = mu + c;
      rstd[i] = rs;
    }
    if (stream) stream_fence();
  });
}

// ---------------------------------------------------------------- backward, float/bfloat16
// TD: dout (the forward's output type), TS: s, dsum and ds (the residual's gradient), TX: dx
// (the gradient of x: ds through the dropout mask, in x's type). ds or dx may be null.
template <typename TD, typename TS, typename TX>
void bwd_vec(const TD* dout, const TS* x, const float* w, const float* mean, const float* rstd,
             const TS* dsum, TS* ds, TX* dx, float* dw_part, float* db_part, int64_t chunks,
             int64_t N, int64_t M, const RowDropout& drop) {
  constexpr int64_t V = kVecSize;
  const float inv_m = 1.0f / static_cast<float>(M);
  // dx / ds in streaming stores where rows stay 64-byte aligned and the output dwarfs the cache
  // (the forward's rule): each saves the read-for-ownership of its lines, a quarter of the
  // backward's memory traffic.
  const bool stream = (dx != nullptr || ds != nullptr) &&
                      (dx == nullptr || streamed(dx, N, M, sizeof(TX))) &&
                      (ds == nullptr || streamed(ds, N, M, sizeof(TS)));
  at::parallel_for(0, chunks, 1, [&](int64_t cbegin, int64_t cend) {
    uint16_t bits[4] = {0, 0, 0, 0};
    for (int64_t c = cbegin; c < cend; ++c) {
      int64_t r0, r1;
      chunk_range(N, chunks, c, r0, r1);
      float* dwp = dw_part != nullptr ? dw_part + c * M : nullptr;
      float* dbp = db_part != nullptr ? db_part + c * M : nullptr;
      for (int64_t i = r0; i < r1; ++i) {
        const TD* dyr = dout + i * M;
        const TS* xr = x + i * M;
        const float mu = mean[i], rs = rstd[i];
        const Vec vmu(mu), vrs(rs);
        // Pass 1: the row reductions.
        Vec ag(0.f), agx(0.f), ax(0.f);
        int64_t j = 0;
        for (; j + V <= M; j += V) {
          Vec dy = load_f<TD>(dyr + j);
          Vec xh = (load_f<TS>(xr + j) - vmu) * vrs;
          Vec g = w != nullptr ? dy * Vec::loadu(w + j) : dy;
          ag += g;
          ax += xh;
          agx = at::vec::fmadd(g, xh, agx);
        }
        float sg = hsum(ag), sgx = hsum(agx), sx = hsum(ax);
        for (; j < M; ++j) {
          float dy = static_cast<float>(dyr[j]);
          float xh = (static_cast<float>(xr[j]) - mu) * rs;
          float g = w != nullptr ? dy * w[j] : dy;
          sg += g;
          sx += xh;
          sgx += g * xh;
        }
        // xc = xhat - mean(xhat) (see the header); mean(g * xc) = mean(g * xhat) - mean(xhat) mg.
        const float mg = sg * inv_m, mx = sx * inv_m, mgx = (sgx - sx * mg) * inv_m;
        // Pass 2: ds = rstd * (g - mean(g) - xc * mean(g * xc)) (+ dsum); dx = ds * mask; this
        // chunk's dweight (dout * xc) / dbias partials.
        const Vec vmg(mg), vmx(mx), vmgx(mgx);
        TS* dsr = ds != nullptr ? ds + i * M : nullptr;
        TX* dxr = dx != nullptr ? dx + i * M : nullptr;
        const TS* dsm = dsum != nullptr ? dsum + i * M : nullptr;
        j = 0;
        for (; j + V <= M; j += V) {
          Vec dy = load_f<TD>(dyr + j);
          Vec xh = (load_f<TS>(xr + j) - vmu) * vrs;
          Vec g = w != nullptr ? dy * Vec::loadu(w + j) : dy;
          Vec xc = xh - vmx;
          Vec d = (g - vmg - xc * vmgx) * vrs;
          if (dwp != nullptr) at::vec::fmadd(dy, xc, Vec::loadu(dwp + j)).store(dwp + j);
          if (dbp != nullptr) (Vec::loadu(dbp + j) + dy).store(dbp + j);
          if (dsm != nullptr) d = d + load_f<TS>(dsm + j);
          if (dsr != nullptr) store_out<TS>(d, dsr + j, stream);
          if (dxr != nullptr) {
            if (drop.on) {
              if (j % 64 == 0) drop.block(static_cast<uint32_t>(i), static_cast<uint32_t>(j / 64), bits);
              d = drop_vec(d, keep_bits(bits, j), drop.scale);
            }
            store_out<TX>(d, dxr + j, stream);
          }
        }
        for (; j < M; ++j) {
          float dy = static_cast<float>(dyr[j]);
          float xh = (static_cast<float>(xr[j]) - mu) * rs;
          float g = w != nullptr ? dy * w[j] : dy;
          float xc = xh - mx;
          float d = (g - mg - xc * mgx) * rs;
          if (dwp != nullptr) dwp[j] += dy * xc;
          if (dbp != nullptr) dbp[j] += dy;
          if (dsm != nullptr) d += static_cast<float>(dsm[j]);
          if (dsr != nullptr) dsr[j] = static_cast<TS>(d);
          if (dxr != nullptr) {
            if (drop.on) {
              if (j % 64 == 0 || j == (M / V) * V)
                drop.block(static_cast<uint32_t>(i), static_cast<uint32_t>(j / 64), bits);
              d = drop_one(d, bits, j, drop.scale);
            }
            dxr[j] = static_cast<TX>(d);
          }
        }
      }
    }
    if (stream) stream_fence();
  });
}

// ---------------------------------------------------------------- float64 (gradcheck) path
inline bool keep_one(const RowDropout& drop, uint16_t bits[4], int64_t i, int64_t j) {
  if (j % 64 == 0) drop.block(static_cast<uint32_t>(i), static_cast<uint32_t>(j / 64), bits);
  return keep_bits(bits, j) & 1u;
}

void fwd_double(const double* x, const double* res, const double* w, const double* b,
                double* out, double* sum, double* mean, double* rstd, int64_t N, int64_t M,
                double eps, const RowDropout& drop) {
  const double scale = drop.on ? 1.0 / (1.0 - drop.p) : 1.0;
  at::parallel_for(0, N, row_grain(M), [&](int64_t begin, int64_t end) {
    uint16_t bits[4] = {0, 0, 0, 0};
    for (int64_t i = begin; i < end; ++i) {
      const double* src = x + i * M;
      if (sum != nullptr) {
        for (int64_t j = 0; j < M; ++j) {
          double v = src[j];
          if (drop.on) v = keep_one(drop, bits, i, j) ? v * scale : 0.0;
          sum[i * M + j] = v + (res != nullptr ? res[i * M + j] : 0.0);
        }
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
                const double* rstd, const double* dsum, double* ds, double* dx, double* dw,
                double* db, int64_t N, int64_t M, const RowDropout& drop) {
  const double scale = drop.on ? 1.0 / (1.0 - drop.p) : 1.0;
  at::parallel_for(0, N, row_grain(M), [&](int64_t begin, int64_t end) {
    uint16_t bits[4] = {0, 0, 0, 0};
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
        d += dsum != nullptr ? dsum[i * M + j] : 0.0;
        if (ds != nullptr) ds[i * M + j] = d;
        if (dx != nullptr) dx[i * M + j] = drop.on ? (keep_one(drop, bits, i, j) ? d * scale : 0.0) : d;
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


// Calls f(T{}) with T the C++ type of a float32 / bfloat16 tensor.
template <typename F>
void with_fb(at::ScalarType t, F&& f) {
  if (t == at::kFloat) f(float{});
  else f(c10::BFloat16{});
}

void check_fb(at::ScalarType t, const char* op, const char* name) {
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16, "fastattn_C.", op, ": ", name,
              " must be float32 or bfloat16 (float64 only with every tensor float64), got ", t);
}

void check_dropout(double p, const char* op) {
  TORCH_CHECK(p >= 0 && p < 1, "fastattn_C.", op, ": dropout_p must be in [0, 1), got ", p);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    double eps, std::optional<at::ScalarType> out_dtype, double dropout_p, int64_t seed) {
  const char* op = "layer_norm_fwd";
  TORCH_CHECK(x_in.dim() == 2, "fastattn_C.layer_norm_fwd: x must be 2-D [rows, cols], got ",
              x_in.dim(), "-D");
  const auto dt = x_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kDouble,
              "fastattn_C.layer_norm_fwd: x must be float32, bfloat16 or float64, got ", dt);
  const int64_t N = x_in.size(0), M = x_in.size(1);
  TORCH_CHECK(M > 0 || N == 0, "fastattn_C.layer_norm_fwd: rows must not be empty");
  TORCH_CHECK(eps >= 0, "fastattn_C.layer_norm_fwd: eps must be >= 0, got ", eps);
  check_dropout(dropout_p, op);
  check_2d(x_in, "x", N, M, dt);
  check_vec(weight, "weight", M);
  check_vec(bias, "bias", M);
  const auto rdt = residual.has_value() ? residual->scalar_type() : dt;
  if (residual.has_value()) check_2d(*residual, "residual", N, M, rdt);
  const auto sdt = at::promote_types(dt, rdt);
  const auto odt = out_dtype.value_or(sdt);
  if (dt == at::kDouble || rdt == at::kDouble || odt == at::kDouble) {
    TORCH_CHECK(dt == at::kDouble && rdt == at::kDouble && odt == at::kDouble,
                "fastattn_C.layer_norm_fwd: float64 must not be mixed with other dtypes (x ", dt,
                ", residual ", rdt, ", out ", odt, ")");
  } else {
    check_fb(rdt, op, "residual");
    check_fb(odt, op, "out_dtype");
  }
  const bool has_sum = residual.has_value() || dropout_p > 0;

  const at::Tensor x = x_in.contiguous();
  const at::Tensor res = residual.has_value() ? residual->contiguous() : at::Tensor();
  at::Tensor out = at::empty({N, M}, x.options().dtype(odt));
  at::Tensor sum = at::empty({has_sum ? N : 0, has_sum ? M : 0}, x.options().dtype(sdt));
  if (!has_sum) sum = at::empty({0}, x.options());
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({N}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({N}, x.options().dtype(acc));
  if (N == 0) return {out, sum, mean, rstd};
  at::Tensor w = param_as(weight, acc), b = param_as(bias, acc);
  const RowDropout drop(dropout_p, seed, 0);

  if (dt == at::kDouble) {
    fwd_double(x.data_ptr<double>(), ptr_or_null<double>(res), ptr_or_null<double>(w),
               ptr_or_null<double>(b), out.data_ptr<double>(),
               has_sum ? sum.data_ptr<double>() : nullptr, mean.data_ptr<double>(),
               rstd.data_ptr<double>(), N, M, eps, drop);
    return {out, sum, mean, rstd};
  }
  const float* wp = ptr_or_null<float>(w);
  const float* bp = ptr_or_null<float>(b);
  with_fb(dt, [&](auto tx) {
    using TX = decltype(tx);
    with_fb(rdt, [&](auto tr) {
      using TR = decltype(tr);
      with_fb(odt, [&](auto to) {
        using TO = decltype(to);
        // s is float unless both addends are bfloat16 (torch's promotion).
        using TS = std::conditional_t<std::is_same_v<TX, float> || std::is_same_v<TR, float>,
                                      float, c10::BFloat16>;
        if (!has_sum) {
          fwd_vec<TX, TX, TX, TO>(x.data_ptr<TX>(), nullptr, wp, bp, out.data_ptr<TO>(), nullptr,
                                  mean.data_ptr<float>(), rstd.data_ptr<float>(), N, M,
                                  static_cast<float>(eps), drop);
        } else {
          fwd_vec<TX, TR, TS, TO>(x.data_ptr<TX>(), residual.has_value() ? res.data_ptr<TR>() : nullptr,
                                  wp, bp, out.data_ptr<TO>(), sum.data_ptr<TS>(),
                                  mean.data_ptr<float>(), rstd.data_ptr<float>(), N, M,
                                  static_cast<float>(eps), drop);
        }
      });
    });
  });
  return {out, sum, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
    const at::Tensor& dout_in, const at::Tensor& s_in, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean_in, const at::Tensor& rstd_in, const std::optional<at::Tensor>& dsum,
    bool need_weight_grad, bool need_bias_grad, bool need_ds,
    std::optional<at::ScalarType> x_dtype, double dropout_p, int64_t seed) {
  const char* op = "layer_norm_bwd";
  TORCH_CHECK(s_in.dim() == 2, "fastattn_C.layer_norm_bwd: x must be 2-D, got ", s_in.dim(), "-D");
  const auto sdt = s_in.scalar_type();
  TORCH_CHECK(sdt == at::kFloat || sdt == at::kBFloat16 || sdt == at::kDouble,
              "fastattn_C.layer_norm_bwd: x must be float32, bfloat16 or float64, got ", sdt);
  const int64_t N = s_in.size(0), M = s_in.size(1);
  const auto ddt = dout_in.scalar_type();
  const auto xdt = x_dtype.value_or(sdt);
  check_dropout(dropout_p, op);
  if (sdt == at::kDouble || ddt == at::kDouble || xdt == at::kDouble) {
    TORCH_CHECK(sdt == at::kDouble && ddt == at::kDouble && xdt == at::kDouble,
                "fastattn_C.layer_norm_bwd: float64 must not be mixed with other dtypes");
  } else {
    check_fb(ddt, op, "dout");
    check_fb(xdt, op, "x_dtype");
  }
  check_2d(dout_in, "dout", N, M, ddt);
  check_vec(weight, "weight", M);
  if (dsum.has_value()) check_2d(*dsum, "dsum", N, M, sdt);
  const auto acc = sdt == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(mean_in.numel() == N && rstd_in.numel() == N && mean_in.scalar_type() == acc &&
                  rstd_in.scalar_type() == acc,
              "fastattn_C.layer_norm_bwd: mean and rstd must hold ", N, " values of ", acc);
  TORCH_CHECK(!need_weight_grad || weight.has_value(),
              "fastattn_C.layer_norm_bwd: need_weight_grad without a weight");

  const at::Tensor dout = dout_in.contiguous(), x = s_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const at::Tensor dsm = dsum.has_value() ? dsum->contiguous() : at::Tensor();
  at::Tensor w = param_as(weight, acc);
  // dx (x's gradient) is ds itself unless the dropout mask or a dtype change lies between.
  const bool dx_is_ds = dropout_p == 0 && xdt == sdt;
  at::Tensor ds = need_ds ? at::empty({N, M}, x.options()) : at::empty({0}, x.options());
  at::Tensor dx = (need_ds && dx_is_ds) ? at::empty({0}, x.options().dtype(xdt))
                                        : at::empty({N, M}, x.options().dtype(xdt));
  at::Tensor dw = need_weight_grad ? at::empty({M}, x.options().dtype(acc)) : at::Tensor();
  at::Tensor db = need_bias_grad ? at::empty({M}, x.options().dtype(acc)) : at::Tensor();
  auto pdt = weight.has_value() ? weight->scalar_type() : sdt;
  auto finish = [&](at::Tensor t) {
    return t.defined() ? t.to(pdt) : at::empty({0}, x.options().dtype(pdt));
  };
  if (N == 0 || M == 0) {
    if (dw.defined()) dw.zero_();
    if (db.defined()) db.zero_();
    return {ds, dx, finish(dw), finish(db)};
  }
  const RowDropout drop(dropout_p, seed, 0);
  const bool write_ds = need_ds, write_dx = dx.numel() > 0;

  if (sdt == at::kDouble) {
    bwd_double(dout.data_ptr<double>(), x.data_ptr<double>(), ptr_or_null<double>(w),
               mean.data_ptr<double>(), rstd.data_ptr<double>(), ptr_or_null<double>(dsm),
               write_ds ? ds.data_ptr<double>() : nullptr,
               write_dx ? dx.data_ptr<double>() : nullptr, ptr_or_null<double>(dw),
               ptr_or_null<double>(db), N, M, drop);
    return {ds, dx, finish(dw), finish(db)};
  }

  // At least 8 rows per chunk, so tiny batches do not pay for a [threads, M] buffer each.
  const int64_t chunks = num_chunks(N, 8);
  at::Tensor dw_part = need_weight_grad ? at::zeros({chunks, M}, x.options().dtype(at::kFloat)) : at::Tensor();
  at::Tensor db_part = need_bias_grad ? at::zeros({chunks, M}, x.options().dtype(at::kFloat)) : at::Tensor();
  with_fb(ddt, [&](auto td) {
    using TD = decltype(td);
    with_fb(sdt, [&](auto ts) {
      using TS = decltype(ts);
      with_fb(xdt, [&](auto tx) {
        using TX = decltype(tx);
        bwd_vec<TD, TS, TX>(dout.data_ptr<TD>(), x.data_ptr<TS>(), ptr_or_null<float>(w),
                            mean.data_ptr<float>(), rstd.data_ptr<float>(),
                            ptr_or_null<TS>(dsm), write_ds ? ds.data_ptr<TS>() : nullptr,
                            write_dx ? dx.data_ptr<TX>() : nullptr, ptr_or_null<float>(dw_part),
                            ptr_or_null<float>(db_part), chunks, N, M, drop);
      });
    });
  });
  if (need_weight_grad) reduce_chunks(dw_part.data_ptr<float>(), dw.data_ptr<float>(), chunks, M);
  if (need_bias_grad) reduce_chunks(db_part.data_ptr<float>(), db.data_ptr<float>(), chunks, M);
  return {ds, dx, finish(dw), finish(db)};
}

}  // namespace cpu
}  // namespace fastattn
