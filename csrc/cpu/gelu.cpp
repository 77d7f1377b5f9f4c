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
// Accuracy choices: see cpu/gelu_math.h (the maths shared with gated_act.cpp's GeGLU).
//
// Launch choices:
// - Forward: at::parallel_for over rows, ~16K elements per task; per row the bias row is in L1.
// - Backward: one contiguous chunk of rows per thread; each chunk adds its dx into its own row
//   of a [chunks, M] float buffer in the loop that computes dx (dx is in registers there); a
//   second parallel pass over columns adds the chunks in a fixed order: deterministic for a
//   given thread count, no atomics (as in layernorm.cpp).
// - float outputs of 16 MiB and more (vec.h's streamed()) are written with streaming stores:
//   no read-for-ownership of lines the cache could not keep anyway (the forward was 25% faster
//   at 8192 x 3072, measured; the backward is bound by its arithmetic).
// - float and bfloat16 are vectorised with at::vec and compute in float; float64 (gradcheck)
//   takes a plain scalar path with std::erf / std::exp.
//
// Test: pytest tests/test_gelu.py.  Time: python dev/gelu_cpu/bench.py (results in
// dev/gelu_cpu/RESULTS.md) or pytest benchmarks/bench_gelu.py.
#include "cpu/gelu_math.h"
#include "cpu/kernels.h"
#include "cpu/vec.h"

#include <cmath>
#include <cstdlib>
#include <vector>

namespace fastattn {
namespace cpu {
namespace {

using namespace gelu_math;

Approx parse_approx(const std::string& a, const char* op) {
  TORCH_CHECK(a == "none" || a == "tanh", "fastattn_C.", op,
              ": approximate must be \"none\" or \"tanh\", got \"", a, "\"");
  return a == "tanh" ? Approx::kTanh : Approx::kNone;
}

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


// ---------------------------------------------------------------- forward, float/bfloat16
template <typename T, Approx A>
void fwd_vec(const T* x, const float* b, T* out, int64_t N, int64_t M) {
  constexpr int64_t V = kVecSize;
  const bool stream = streamed(out, N, M, sizeof(T));
  at::parallel_for(0, N, row_grain(M), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* xr = x + i * M;
      T* o = out + i * M;
      int64_t j = 0;
      for (; j + V <= M; j += V) {
        Vec u = load_f<T>(xr + j) + Vec::loadu(b + j);
        store_out<T>(A == Approx::kNone ? gelu_none(u) : gelu_tanh(u), o + j, stream);
      }
      for (; j < M; ++j) o[j] = static_cast<T>(gelu_scalar<float>(static_cast<float>(xr[j]) + b[j], A));
    }
    if (stream) stream_fence();
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
  const bool stream = streamed(dx, N, M, sizeof(T));
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
            store_out<T>(d, dxr + j, stream);
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
    if (stream) stream_fence();
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
