// Gated activations (SwiGLU, GeGLU) on the CPU: forward and backward, one pass over memory each.
//
// Maths, elementwise on g = gate and u = up (computed in float, double for double):
//   h = act(g) * u
//   dgate = dh * u * act'(g),  dup = dh * act(g)      (act recomputed: nothing else is saved)
//   "silu":      act(g) = g s,  s = sigmoid(g) = 1 / (1 + e),  e = exp(-g)
//                act'(g) = s + g s (1 - s),  with 1 - s = e s (no cancellation for g > 0)
//   "gelu":      erf GELU,  "gelu_tanh": tanh GELU: the code of gelu.cpp (cpu/gelu_math.h).
//
// Accuracy choices:
// - exp is SLEEF's expf_u10 (Vectorized<float>::exp), as in gelu_math.h.
// - silu forward is g / (1 + exp(-g)): exp(-g) = inf for g < -88.7 gives -0, the correct limit,
//   for every finite g. The backward evaluates e on g clamped to >= -88 (e never overflows, so
//   e * s is never inf * 0) and selects act = 0, act' = 0 below -88 (the true values are below
//   1e-36 in magnitude there).
//
// Layouts: gate and up are [N, H] with any row stride and unit column stride (the two halves of
// one fused projection output [N, 2H] are such views: no copy). With `up` absent, `gate` is that
// packed [N, 2H] tensor itself (gate = its first H columns, up = the last H), and the backward
// writes dgate and dup into one packed [N, 2H] gradient, which is what the fused projection's
// backward wants (no concatenation). Outputs are contiguous.
//
// Launch choices: at::parallel_for over rows, ~16K elements per task (as gelu.cpp); within a row,
// at::vec float vectors with a scalar tail. No reduction, so every result is deterministic.
// float and bfloat16 compute in float; float64 (gradcheck) takes a plain scalar path with std::exp
// / std::erf.
//
// Test: pytest tests/test_gated_act.py.
#include "cpu/gelu_math.h"
#include "cpu/kernels.h"
#include "cpu/vec.h"

#include <cmath>
#include <limits>

namespace fastattn {
namespace cpu {
namespace {

using namespace gelu_math;

enum class Act { kSilu, kGelu, kGeluTanh };

Act parse_act(const std::string& a, const char* op) {
  TORCH_CHECK(a == "silu" || a == "gelu" || a == "gelu_tanh", "fastattn_C.", op,
              ": activation must be \"silu\", \"gelu\" or \"gelu_tanh\", got \"", a, "\"");
  return a == "silu" ? Act::kSilu : (a == "gelu" ? Act::kGelu : Act::kGeluTanh);
}

constexpr float kSiluClamp = 88.0f;  // exp(88) = 1.65e38 < FLT_MAX

// ---------------------------------------------------------------- elementwise maths
inline Vec silu(const Vec& g) { return g / (Vec(1.f) + (Vec(0.f) - g).exp()); }

inline void silu_both(const Vec& g, Vec& a, Vec& d) {
  const Vec gc = at::vec::maximum(g, Vec(-kSiluClamp));
  const Vec e = (Vec(0.f) - gc).exp();
  const Vec s = Vec(1.f) / (Vec(1.f) + e);
  const auto low = g < Vec(-kSiluClamp);
  a = Vec::blendv(g * s, Vec(0.f), low);
  d = Vec::blendv(at::vec::fmadd(gc * (e * s), s, s), Vec(0.f), low);
}

template <Act A>
inline Vec act_fwd(const Vec& g) {
  if constexpr (A == Act::kSilu) return silu(g);
  else if constexpr (A == Act::kGelu) return gelu_none(g);
  else return gelu_tanh(g);
}

template <Act A>
inline void act_both(const Vec& g, Vec& a, Vec& d) {
  if constexpr (A == Act::kSilu) silu_both(g, a, d);
  else if constexpr (A == Act::kGelu) gelu_none_both(g, a, d);
  else gelu_tanh_both(g, a, d);
}

// Scalar forms (row tails, and the float64 path).
template <typename F>
inline void act_both_scalar(F g, Act act, F& a, F& d) {
  if (act == Act::kSilu) {
    // exp(-g) finite on the clamp: -88 for float, -708 for double.
    const F lim = sizeof(F) == sizeof(float) ? F(kSiluClamp) : F(708);
    if (g < -lim) {
      a = F(0);
      d = F(0);
      return;
    }
    const F e = std::exp(-g);
    const F s = F(1) / (F(1) + e);
    a = g * s;
    d = s + g * (e * s) * s;
    return;
  }
  const Approx ap = act == Act::kGelu ? Approx::kNone : Approx::kTanh;
  a = gelu_scalar<F>(g, ap);
  d = dgelu_scalar<F>(g, ap);
}

template <typename F>
inline F act_scalar(F g, Act act) {
  if (act == Act::kSilu) return g / (F(1) + std::exp(-g));
  return gelu_scalar<F>(g, act == Act::kGelu ? Approx::kNone : Approx::kTanh);
}

// Rows per parallel task: enough work (~16K elements) to amortise scheduling.
inline int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H)); }

// Row-strided [N, H] views: pointer + row stride (unit column stride).
template <typename T>
struct Rows {
  T* p;
  int64_t stride;
  T* row(int64_t i) const { return p + i * stride; }
};

// ---------------------------------------------------------------- float / bfloat16
template <typename T, Act A>
void fwd_vec(Rows<const T> gate, Rows<const T> up, T* h, int64_t N, int64_t H) {
  constexpr int64_t V = kVecSize;
  at::parallel_for(0, N, row_grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* gr = gate.row(i);
      const T* ur = up.row(i);
      T* o = h + i * H;
      int64_t j = 0;
      for (; j + V <= H; j += V) store_f<T>(act_fwd<A>(load_f<T>(gr + j)) * load_f<T>(ur + j), o + j);
      for (; j < H; ++j)
        o[j] = static_cast<T>(act_scalar<float>(static_cast<float>(gr[j]), A) * static_cast<float>(ur[j]));
    }
  });
}

template <typename T, Act A>
void bwd_vec(Rows<const T> dh, Rows<const T> gate, Rows<const T> up, Rows<T> dgate, Rows<T> dup,
             int64_t N, int64_t H) {
  constexpr int64_t V = kVecSize;
  at::parallel_for(0, N, row_grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* dr = dh.row(i);
      const T* gr = gate.row(i);
      const T* ur = up.row(i);
      T* dg = dgate.row(i);
      T* du = dup.row(i);
      int64_t j = 0;
      for (; j + V <= H; j += V) {
        Vec a, d;
        act_both<A>(load_f<T>(gr + j), a, d);
        const Vec dy = load_f<T>(dr + j);
        store_f<T>(dy * load_f<T>(ur + j) * d, dg + j);
        store_f<T>(dy * a, du + j);
      }
      for (; j < H; ++j) {
        float a, d;
        act_both_scalar<float>(static_cast<float>(gr[j]), A, a, d);
        const float dy = static_cast<float>(dr[j]);
        dg[j] = static_cast<T>(dy * static_cast<float>(ur[j]) * d);
        du[j] = static_cast<T>(dy * a);
      }
    }
  });
}

// ---------------------------------------------------------------- float64 (gradcheck) path
void fwd_double(Rows<const double> gate, Rows<const double> up, double* h, int64_t N, int64_t H,
                Act act) {
  at::parallel_for(0, N, row_grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      for (int64_t j = 0; j < H; ++j)
        h[i * H + j] = act_scalar<double>(gate.row(i)[j], act) * up.row(i)[j];
  });
}

void bwd_double(Rows<const double> dh, Rows<const double> gate, Rows<const double> up,
                Rows<double> dgate, Rows<double> dup, int64_t N, int64_t H, Act act) {
  at::parallel_for(0, N, row_grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      for (int64_t j = 0; j < H; ++j) {
        double a, d;
        act_both_scalar<double>(gate.row(i)[j], act, a, d);
        const double dy = dh.row(i)[j];
        dgate.row(i)[j] = dy * up.row(i)[j] * d;
        dup.row(i)[j] = dy * a;
      }
  });
}

// ---------------------------------------------------------------- checks and layouts
// Unit column stride (any row stride) is what the loops read; anything else is copied once.
at::Tensor rows_ready(const at::Tensor& t) {
  return (t.stride(1) == 1 || t.size(1) <= 1) ? t : t.contiguous();
}

void check_operand(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, "fastattn_C.", op, ": ", name, " must be 2-D [rows, cols], got ",
              t.dim(), "-D");
  TORCH_CHECK(t.device().is_cpu(), "fastattn_C.", op, ": ", name, " must be on the CPU, got ",
              t.device());
}

// (gate [N, H], up [N, H]) views, from separate tensors or from one packed [N, 2H] gate.
std::pair<at::Tensor, at::Tensor> operands(const at::Tensor& gate_in,
                                           const std::optional<at::Tensor>& up_in, const char* op) {
  check_operand(gate_in, op, "gate");
  const auto dt = gate_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kDouble, "fastattn_C.", op,
              ": gate must be float32, bfloat16 or float64, got ", dt);
  if (!up_in.has_value()) {
    TORCH_CHECK(gate_in.size(1) % 2 == 0, "fastattn_C.", op,
                ": without `up`, gate is the packed [rows, 2 * cols] tensor and needs an even "
                "number of columns, got ",
                gate_in.size(1));
    const at::Tensor gu = rows_ready(gate_in);
    const int64_t H = gu.size(1) / 2;
    return {gu.narrow(1, 0, H), gu.narrow(1, H, H)};
  }
  check_operand(*up_in, op, "up");
  TORCH_CHECK(up_in->sizes() == gate_in.sizes(), "fastattn_C.", op,
              ": up must have the shape of gate ", gate_in.sizes(), ", got ", up_in->sizes());
  TORCH_CHECK(up_in->scalar_type() == dt, "fastattn_C.", op, ": up must have the dtype of gate (",
              dt, "), got ", up_in->scalar_type());
  return {rows_ready(gate_in), rows_ready(*up_in)};
}

template <typename T>
Rows<const T> crows(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0)};
}
template <typename T>
Rows<T> mrows(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0)};
}

template <typename T>
void fwd_dispatch(const at::Tensor& g, const at::Tensor& u, at::Tensor& h, Act act) {
  const int64_t N = g.size(0), H = g.size(1);
  switch (act) {
    case Act::kSilu: fwd_vec<T, Act::kSilu>(crows<T>(g), crows<T>(u), h.data_ptr<T>(), N, H); break;
    case Act::kGelu: fwd_vec<T, Act::kGelu>(crows<T>(g), crows<T>(u), h.data_ptr<T>(), N, H); break;
    case Act::kGeluTanh:
      fwd_vec<T, Act::kGeluTanh>(crows<T>(g), crows<T>(u), h.data_ptr<T>(), N, H);
      break;
  }
}

template <typename T>
void bwd_dispatch(const at::Tensor& dh, const at::Tensor& g, const at::Tensor& u, at::Tensor& dg,
                  at::Tensor& du, Act act) {
  const int64_t N = g.size(0), H = g.size(1);
  auto a = crows<T>(dh), b = crows<T>(g), c = crows<T>(u);
  auto x = mrows<T>(dg), y = mrows<T>(du);
  switch (act) {
    case Act::kSilu: bwd_vec<T, Act::kSilu>(a, b, c, x, y, N, H); break;
    case Act::kGelu: bwd_vec<T, Act::kGelu>(a, b, c, x, y, N, H); break;
    case Act::kGeluTanh: bwd_vec<T, Act::kGeluTanh>(a, b, c, x, y, N, H); break;
  }
}

}  // namespace

at::Tensor gated_act_fwd(const at::Tensor& gate, const std::optional<at::Tensor>& up,
                         const std::string& activation) {
  const char* op = "gated_act_fwd";
  const Act act = parse_act(activation, op);
  const auto [g, u] = operands(gate, up, op);
  const int64_t N = g.size(0), H = g.size(1);
  at::Tensor h = at::empty({N, H}, g.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0 || H == 0) return h;
  switch (g.scalar_type()) {
    case at::kDouble:
      fwd_double(crows<double>(g), crows<double>(u), h.data_ptr<double>(), N, H, act);
      break;
    case at::kFloat: fwd_dispatch<float>(g, u, h, act); break;
    default: fwd_dispatch<c10::BFloat16>(g, u, h, act); break;
  }
  return h;
}

std::tuple<at::Tensor, at::Tensor> gated_act_bwd(const at::Tensor& dh_in, const at::Tensor& gate,
                                                 const std::optional<at::Tensor>& up,
                                                 const std::string& activation) {
  const char* op = "gated_act_bwd";
  const Act act = parse_act(activation, op);
  const auto [g, u] = operands(gate, up, op);
  const int64_t N = g.size(0), H = g.size(1);
  check_operand(dh_in, op, "dh");
  TORCH_CHECK(dh_in.size(0) == N && dh_in.size(1) == H, "fastattn_C.", op,
              ": dh must have shape [", N, ", ", H, "], got ", dh_in.sizes());
  TORCH_CHECK(dh_in.scalar_type() == g.scalar_type(), "fastattn_C.", op,
              ": dh must have the dtype of gate (", g.scalar_type(), "), got ",
              dh_in.scalar_type());
  const at::Tensor dh = rows_ready(dh_in);
  const auto opts = g.options().memory_format(at::MemoryFormat::Contiguous);
  // Packed: one [N, 2H] gradient, dgate and dup its two halves; the second output is empty.
  const bool packed = !up.has_value();
  at::Tensor out1 = packed ? at::empty({N, 2 * H}, opts) : at::empty({N, H}, opts);
  at::Tensor out2 = packed ? at::empty({0}, opts) : at::empty({N, H}, opts);
  if (N == 0 || H == 0) return {out1, out2};
  at::Tensor dg = packed ? out1.narrow(1, 0, H) : out1;
  at::Tensor du = packed ? out1.narrow(1, H, H) : out2;
  switch (g.scalar_type()) {
    case at::kDouble:
      bwd_double(crows<double>(dh), crows<double>(g), crows<double>(u), mrows<double>(dg),
                 mrows<double>(du), N, H, act);
      break;
    case at::kFloat: bwd_dispatch<float>(dh, g, u, dg, du, act); break;
    default: bwd_dispatch<c10::BFloat16>(dh, g, u, dg, du, act); break;
  }
  return {out1, out2};
}

}  // namespace cpu
}  // namespace fastattn
