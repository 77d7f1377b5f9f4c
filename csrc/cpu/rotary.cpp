// Rotary position embedding on the CPU: forward and backward, one pass over memory each.
//
// Maths (fastattn/ops/rotary.py), per row (b, head, t) of x [B, H, T, D], with c = cos[b', t],
// s = sin[b', t] ([Bc, T, R], b' = 0 when Bc == 1), h = R / 2, for j < h, a = x[j], b = x[j + h]:
//   forward:   y[j] = a c[j] - b s[j],        y[j + h] = b c[j + h] + a s[j + h]
//   backward:  y[j] = a c[j] + b s[j + h],    y[j + h] = b c[j + h] - a s[j]   (the transpose)
//   y[j] = x[j] for R <= j < D (partial rotary: pass-through columns).
// Computed in float (double when every operand is double), one rounding to the output dtype.
//
// dtypes: x, cos / sin and the output are each float or bfloat16, in any mix (transformers
// under autocast: bf16 q, float cos, float out; its backward: float dy, float cos, bf16 dx), or
// all double. One template instance per (x, cos, out) type triple.
//
// Layouts: x has any strides with a unit last stride (q as the transpose of a [B, T, H, D]
// projection output); the output is allocated like x (empty_like: x's strides when x is dense)
// and written through its strides; cos and sin rows each have their own batch and time strides
// (0 for a broadcast batch or time).
//
// Launch choices: at::parallel_for over the B*H*T rows, ~16K elements per task (as the other
// elementwise kernels); rows in (b, t, head) order, so the heads of one position reuse the same
// cos / sin row from L1. Within a row, at::vec float vectors over j < h with a scalar tail.
// No reduction: every result is deterministic.
//
// Test: pytest tests/test_rotary.py.
#include "cpu/kernels.h"
#include "cpu/vec.h"

#include <utility>

namespace fastattn {
namespace cpu {
namespace {

struct Strides {
  int64_t b, h, t;
};

template <typename TI, typename TC, typename TO>
void rotary_rows(const TI* x, Strides sx, const TC* cos, Strides sc, const TC* sin, Strides ss,
                 TO* y, Strides sy, int64_t B, int64_t H, int64_t T, int64_t D, int64_t R,
                 bool backward) {
  using A = typename Acc<TO>::type;
  const int64_t h = R / 2;
  const int64_t rows = B * H * T;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  // The pair's rotation, for float vectors and for scalars alike: (y[j], y[j + h]).
  const auto rotate = [backward](auto a, auto bb, auto c1, auto c2, auto s1, auto s2) {
    return backward ? std::pair(a * c1 + bb * s2, bb * c2 - a * s1)
                    : std::pair(a * c1 - bb * s1, bb * c2 + a * s2);
  };
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t hh = r % H;
      const int64_t t = (r / H) % T;
      const int64_t b = r / (H * T);
      const TI* xr = x + b * sx.b + hh * sx.h + t * sx.t;
      const TC* cr = cos + b * sc.b + t * sc.t;
      const TC* sr = sin + b * ss.b + t * ss.t;
      TO* yr = y + b * sy.b + hh * sy.h + t * sy.t;
      int64_t j = 0;
      if constexpr (!std::is_same_v<A, double>) {
        for (; j + kVecSize <= h; j += kVecSize) {
          const auto [y1, y2] = rotate(load_f(xr + j), load_f(xr + h + j), load_f(cr + j),
                                       load_f(cr + h + j), load_f(sr + j), load_f(sr + h + j));
          store_f(y1, yr + j);
          store_f(y2, yr + h + j);
        }
      }
      for (; j < h; ++j) {
        const auto [y1, y2] =
            rotate(static_cast<A>(xr[j]), static_cast<A>(xr[h + j]), static_cast<A>(cr[j]),
                   static_cast<A>(cr[h + j]), static_cast<A>(sr[j]), static_cast<A>(sr[h + j]));
        yr[j] = static_cast<TO>(y1);
        yr[h + j] = static_cast<TO>(y2);
      }
      for (j = R; j < D; ++j) yr[j] = static_cast<TO>(static_cast<A>(xr[j]));
    }
  });
}

// Calls f with a value of the C++ type of t (float or bfloat16).
template <typename F>
void with_type(at::ScalarType t, F&& f) {
  if (t == at::kFloat) {
    f(float{});
  } else {
    f(c10::BFloat16{});
  }
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                  at::ScalarType out_dtype, bool backward) {
  const char* op = backward ? "rotary_bwd" : "rotary_fwd";
  const char* what = backward ? "dy" : "x";
  TORCH_CHECK(x.dim() == 4, "fastattn_C.", op, ": ", what, " must be 4-D [B, H, T, D], got ",
              x.dim(), "-D");
  TORCH_CHECK(cos.dim() == 3 && sin.sizes() == cos.sizes(), "fastattn_C.", op,
              ": cos and sin must be 3-D [Bc, T, R] of one shape, got ", cos.sizes(), " and ",
              sin.sizes());
  TORCH_CHECK(cos.scalar_type() == sin.scalar_type(), "fastattn_C.", op,
              ": cos and sin must have one dtype, got ", cos.scalar_type(), " and ",
              sin.scalar_type());
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), R = cos.size(2);
  TORCH_CHECK(cos.size(0) == 1 || cos.size(0) == B, "fastattn_C.", op,
              ": cos.size(0) must be 1 or B (", B, "), got ", cos.size(0));
  TORCH_CHECK(cos.size(1) == T, "fastattn_C.", op, ": cos.size(1) must be T (", T, "), got ",
              cos.size(1));
  TORCH_CHECK(R % 2 == 0 && R >= 2 && R <= D, "fastattn_C.", op,
              ": the rotary dim R = cos.size(2) must be even, >= 2 and <= D (", D, "), got ", R);
  TORCH_CHECK(x.stride(3) == 1 && cos.stride(2) == 1 && sin.stride(2) == 1, "fastattn_C.", op,
              ": ", what, ", cos and sin need a unit last-dim stride");
  const auto xt = x.scalar_type(), ct = cos.scalar_type();
  const bool all_double = xt == at::kDouble && ct == at::kDouble && out_dtype == at::kDouble;
  auto narrow = [](at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16; };
  TORCH_CHECK(all_double || (narrow(xt) && narrow(ct) && narrow(out_dtype)), "fastattn_C.", op,
              ": ", what, ", cos / sin and the output must each be float32 or bfloat16, or all "
              "float64; got ", xt, ", ", ct, " and ", out_dtype);
  TORCH_CHECK(x.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(), "fastattn_C.",
              op, ": the CPU kernel takes CPU tensors");
  at::Tensor y = at::empty_like(x, x.options().dtype(out_dtype));
  if (y.numel() == 0) return y;
  const Strides sx{x.stride(0), x.stride(1), x.stride(2)};
  const Strides sy{y.stride(0), y.stride(1), y.stride(2)};
  const Strides sc{cos.size(0) == 1 ? 0 : cos.stride(0), 0, cos.stride(1)};
  const Strides ss{sin.size(0) == 1 ? 0 : sin.stride(0), 0, sin.stride(1)};
  if (all_double) {
    rotary_rows<double, double, double>(x.data_ptr<double>(), sx, cos.data_ptr<double>(), sc,
                                        sin.data_ptr<double>(), ss, y.data_ptr<double>(), sy, B,
                                        H, T, D, R, backward);
    return y;
  }
  with_type(xt, [&](auto xi) {
    with_type(ct, [&](auto ci) {
      with_type(out_dtype, [&](auto oi) {
        using TI = decltype(xi);
        using TC = decltype(ci);
        using TO = decltype(oi);
        rotary_rows<TI, TC, TO>(x.data_ptr<TI>(), sx, cos.data_ptr<TC>(), sc, sin.data_ptr<TC>(),
                                ss, y.data_ptr<TO>(), sy, B, H, T, D, R, backward);
      });
    });
  });
  return y;
}

}  // namespace

at::Tensor rotary_fwd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      at::ScalarType out_dtype) {
  return rotary(x, cos, sin, out_dtype, false);
}

at::Tensor rotary_bwd(const at::Tensor& dy, const at::Tensor& cos, const at::Tensor& sin,
                      at::ScalarType out_dtype) {
  return rotary(dy, cos, sin, out_dtype, true);
}

}  // namespace cpu
}  // namespace fastattn
