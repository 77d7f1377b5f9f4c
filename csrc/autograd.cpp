// The eager CPU path of the differentiable ops: one torch::autograd::Function per op, in C++.
//
// Why: at the demo's small shapes (cpu_small: 768 x 128 activations) a kernel takes 20-300 us,
// and the Python autograd.Function around it (validation, case building, dispatch, a Python
// backward node, view nodes for the reshapes) cost ~100 us more per op call, fwd + bwd
// (benchmarks/results/overhead-*.md): fastattn's step was slower than torch's there. These
// Functions record one C++ node per call (the reshapes happen inside, unrecorded) and their
// backward runs without Python.
//
// Meaning: exactly the autograd formulas of fastattn/ops/<op>.py (_setup_context / _backward),
// calling the same CPU kernels (csrc/cpu) with the same arguments, so both paths give the same
// bits (tests/test_eager_path.py compares them). Python routes a call here only when the
// backend in force resolves it to `cpu` on CPU tensors, outside torch.compile tracing and
// torch.func transforms, and with no feature the formulas below leave out (attention with an
// additive bias stays on the Python path); everything else takes the torch.library custom ops.
//
// Schemas (torch.ops.fastattn_C.*_eager), registered CompositeImplicitAutograd so that one
// kernel serves grad and no-grad calls (autograd records the Function's node where needed):
//   layer_norm_eager(x[..., M], weight?, bias?, residual?[..., M], cols = M, eps, out_dtype?,
//                    dropout_p, seed) -> (out[..., M], sum[..., M] or [0] without residual
//                    and dropout)
//       M: the product of normalized_shape (the last dims of x); weight / bias may have any
//       shape of M elements, and their gradients come back in that shape.
//   attention_eager(q, k, v, key_padding_mask?, scale, softcap, window_left, window_right,
//                   diag_offset, dropout_p, seed, offset) -> out
//   bias_gelu_eager(x[..., M], bias?[M], approximate) -> out[..., M]
//   rms_norm_eager(x[..., M], weight?, residual?[..., M], cols = M, eps, weight_offset,
//                  cast_before_weight) -> (out[..., M], sum[..., M] or [0] without residual)
//   gated_act_eager(gate[..., H], up?[..., H], activation) -> h[..., H]  (no up: gate is
//                   [..., 2H], [gate | up])
//   linear_onednn_eager(x[..., K], w[N, K], b?[N]) -> y[..., N]  (fastattn/ops/_gemm.py's
//                   oneDNN path; no kernel of fastattn's own)
#include <torch/library.h>
#include <torch/csrc/autograd/custom_function.h>

#include "cpu/kernels.h"

namespace fastattn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using at::Tensor;

std::optional<Tensor> opt(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}
Tensor or_undefined(const std::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

// needs_input_grad(i) counts only the tensors that were passed (an absent optional has no
// edge): whether argument `arg` (of the leading optional tensor arguments, `present` saying
// which were given) needs a gradient.
bool needs_grad(AutogradContext* ctx, const std::vector<bool>& present, size_t arg) {
  if (!present[arg]) return false;
  size_t edge = 0;
  for (size_t i = 0; i < arg; ++i) edge += present[i];
  return ctx->needs_input_grad(edge);
}

// The kernels' backward is not differentiable. With create_graph=True autograd runs a backward
// in grad mode and would take its outputs as constants: a second derivative through them would
// silently be zero. So the backward runs without grad and, in grad mode, its outputs are routed
// through this node, whose own backward refuses (torch's @once_differentiable, in C++).
struct SecondDerivativeError : public torch::autograd::Function<SecondDerivativeError> {
  static variable_list forward(AutogradContext* ctx, at::TensorList upstream, at::TensorList outs,
                               const std::string& op) {
    ctx->saved_data["op"] = op;
    return variable_list(outs.begin(), outs.end());
  }
  static variable_list backward(AutogradContext* ctx, variable_list) {
    TORCH_CHECK(false, "fastattn::", ctx->saved_data["op"].toStringRef(),
                ": double backward (a gradient of this op's gradient, create_graph=True) is not "
                "implemented by fastattn's kernels; use torch's own ops for higher-order "
                "gradients");
  }
};

variable_list once_differentiable(const char* op, const variable_list& upstream,
                                  variable_list grads) {
  if (!at::GradMode::is_enabled()) return grads;
  std::vector<Tensor> up, defined;
  std::vector<size_t> where;
  for (const auto& g : upstream)
    if (g.defined() && g.requires_grad()) up.push_back(g);
  if (up.empty()) return grads;
  for (size_t i = 0; i < grads.size(); ++i)
    if (grads[i].defined()) {
      defined.push_back(grads[i]);
      where.push_back(i);
    }
  auto wrapped = SecondDerivativeError::apply(at::TensorList(up), at::TensorList(defined),
                                              std::string(op));
  for (size_t k = 0; k < where.size(); ++k) grads[where[k]] = wrapped[k];
  return grads;
}

// The Functions below: T::forward, and T::input_grads (the gradients of T's inputs) which
// backward runs without grad and without autocast, then through once_differentiable.
template <typename T>
struct EagerFunction : public torch::autograd::Function<T> {
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out;
    {
      at::NoGradGuard no_grad;
      c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
      out = T::input_grads(ctx, grads);
    }
    return once_differentiable(T::kName, grads, std::move(out));
  }
};

// The [N, M] view (or copy) the kernels take, as the Python path's x.reshape(-1, m).
Tensor rows(const Tensor& t, int64_t m) { return t.reshape({-1, m}); }

// ---------------------------------------------------------------- layer_norm / add_layer_norm
struct LayerNormFn : public EagerFunction<LayerNormFn> {
  static constexpr const char* kName = "layer_norm";
  static variable_list forward(AutogradContext* ctx, const Tensor& x,
                               const std::optional<Tensor>& weight_,
                               const std::optional<Tensor>& bias_,
                               const std::optional<Tensor>& residual_, int64_t m,
                               double eps, std::optional<at::ScalarType> out_dtype,
                               double dropout_p, int64_t seed) {
    const Tensor weight = or_undefined(weight_), bias = or_undefined(bias_),
                 residual = or_undefined(residual_);
    ctx->saved_data["present"] = c10::List<bool>(
        {true, weight.defined(), bias.defined(), residual.defined()});
    const Tensor w = weight.defined() ? weight.reshape({-1}) : Tensor();
    const Tensor b = bias.defined() ? bias.reshape({-1}) : Tensor();
    const Tensor res = residual.defined() ? rows(residual, m) : Tensor();
    auto [out, s, mean, rstd] = cpu::layer_norm_fwd(rows(x, m), opt(w), opt(b), opt(res), eps,
                                                    out_dtype, dropout_p, seed);
    const bool has_sum = residual.defined() || dropout_p > 0;
    // Unused outputs (often the sum) get undefined gradients instead of zeros.
    ctx->set_materialize_grads(false);
    ctx->saved_data["x_dtype"] = x.scalar_type();
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["m"] = m;
    ctx->saved_data["x_shape"] = x.sizes().vec();
    ctx->saved_data["w_shape"] = weight.defined() ? weight.sizes().vec() : std::vector<int64_t>{};
    ctx->saved_data["b_shape"] = bias.defined() ? bias.sizes().vec() : std::vector<int64_t>{};
    // _unsafe_view: plain outputs, not views autograd would track (callers may modify them in
    // place, as after F.layer_norm). The sum is saved as the output itself, so that an in-place
    // change of it before the backward is caught by its version counter.
    Tensor sum_out = has_sum ? at::_unsafe_view(s, x.sizes()) : s;
    ctx->save_for_backward({has_sum ? sum_out : rows(x, m), w, mean, rstd});
    return {at::_unsafe_view(out, x.sizes()), sum_out};
  }

  static variable_list input_grads(AutogradContext* ctx, const variable_list& grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& w = saved[1];
    const int64_t m = ctx->saved_data["m"].toInt();
    const Tensor xs = rows(saved[0], m);
    const auto list = ctx->saved_data["present"].toBoolList();
    const std::vector<bool> present(list.begin(), list.end());
    const double dropout_p = ctx->saved_data["dropout_p"].toDouble();
    const bool has_residual = present[3];
    const bool has_sum = has_residual || dropout_p > 0;
    const bool need_x = needs_grad(ctx, present, 0);
    const bool need_w = needs_grad(ctx, present, 1);
    const bool need_b = needs_grad(ctx, present, 2);
    const bool need_ds = has_residual && needs_grad(ctx, present, 3);
    const Tensor dout = grads[0].defined() ? rows(grads[0], m).contiguous() : at::zeros_like(xs);
    const Tensor dsum = has_sum && grads[1].defined() ? rows(grads[1], m).contiguous() : Tensor();
    auto [ds, dx, dw, db] = cpu::layer_norm_bwd(
        dout, xs, opt(w), saved[2], saved[3], opt(dsum), need_w, need_b, need_ds,
        ctx->saved_data["x_dtype"].toScalarType(), dropout_p, ctx->saved_data["seed"].toInt());
    if (need_ds && dx.numel() == 0 && ds.numel() != 0) dx = ds;  // no mask or cast between s and x
    // Back to the inputs' shapes (autograd checks them): x / residual [..., M], the parameters
    // normalized_shape.
    const auto shape = [&](const char* key) { return ctx->saved_data[key].toIntVector(); };
    const auto x_shape = shape("x_shape");
    return {need_x ? dx.view(x_shape) : Tensor(),
            need_w ? dw.view(shape("w_shape")) : Tensor(),
            need_b ? db.view(shape("b_shape")) : Tensor(),
            need_ds ? ds.view(x_shape) : Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> layer_norm_eager(const Tensor& x, const std::optional<Tensor>& weight,
                                            const std::optional<Tensor>& bias,
                                            const std::optional<Tensor>& residual, int64_t cols,
                                            double eps, std::optional<at::ScalarType> out_dtype,
                                            double dropout_p, int64_t seed) {
  auto outs = LayerNormFn::apply(x, weight, bias, residual, cols, eps, out_dtype, dropout_p, seed);
  return {outs[0], outs[1]};
}

// ---------------------------------------------------------------- attention (no additive bias)
struct AttentionFn : public EagerFunction<AttentionFn> {
  static constexpr const char* kName = "attention";
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k,
                               const Tensor& v, const std::optional<Tensor>& key_padding_mask_,
                               double scale,
                               double softcap, int64_t window_left, int64_t window_right,
                               int64_t diag_offset, double dropout_p, int64_t seed,
                               int64_t offset) {
    const Tensor key_padding_mask = or_undefined(key_padding_mask_);
    auto [out, lse] = cpu::attention_fwd_features(q, k, v, key_padding_mask_, std::nullopt,
                                                  scale, softcap, window_left, window_right,
                                                  diag_offset, dropout_p, seed, offset);
    out = out.contiguous();
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["softcap"] = softcap;
    ctx->saved_data["window_left"] = window_left;
    ctx->saved_data["window_right"] = window_right;
    ctx->saved_data["diag_offset"] = diag_offset;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["offset"] = offset;
    ctx->save_for_backward({q, k, v, out, lse.contiguous(), key_padding_mask});
    return {out};
  }

  static variable_list input_grads(AutogradContext* ctx, const variable_list& grads) {
    const auto s = ctx->get_saved_variables();
    auto& d = ctx->saved_data;
    auto [dq, dk, dv, dbias] = cpu::attention_bwd_features(
        grads[0].contiguous(), s[0], s[1], s[2], s[3], s[4], opt(s[5]), std::nullopt,
        d["scale"].toDouble(), d["softcap"].toDouble(), d["window_left"].toInt(),
        d["window_right"].toInt(), d["diag_offset"].toInt(), d["dropout_p"].toDouble(),
        d["seed"].toInt(), d["offset"].toInt(), false);
    variable_list g(12);
    g[0] = dq.contiguous();
    g[1] = dk.contiguous();
    g[2] = dv.contiguous();
    return g;
  }
};

Tensor attention_eager(const Tensor& q, const Tensor& k, const Tensor& v,
                       const std::optional<Tensor>& key_padding_mask, double scale, double softcap,
                       int64_t window_left, int64_t window_right, int64_t diag_offset,
                       double dropout_p, int64_t seed, int64_t offset) {
  return AttentionFn::apply(q, k, v, key_padding_mask, scale, softcap, window_left,
                            window_right, diag_offset, dropout_p, seed, offset)[0];
}

// ---------------------------------------------------------------- bias_gelu
struct BiasGeluFn : public EagerFunction<BiasGeluFn> {
  static constexpr const char* kName = "bias_gelu";
  static variable_list forward(AutogradContext* ctx, const Tensor& x,
                               const std::optional<Tensor>& bias_, const std::string& approximate) {
    const Tensor bias = or_undefined(bias_);
    const int64_t m = x.size(-1);
    const Tensor x2 = rows(x, m);
    Tensor out = cpu::bias_gelu_fwd(x2, opt(bias), approximate);
    // x (the pre-activation without the bias) is saved, not x + bias: the backward re-adds
    // the bias in registers.
    ctx->saved_data["approximate"] = approximate;
    ctx->saved_data["x_shape"] = x.sizes().vec();
    ctx->save_for_backward({x2, bias});
    return {at::_unsafe_view(out, x.sizes())};
  }

  static variable_list input_grads(AutogradContext* ctx, const variable_list& grads) {
    const auto s = ctx->get_saved_variables();
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_b = s[1].defined() && ctx->needs_input_grad(1);  // bias: edge 1 if given
    if (!(need_x || need_b)) return {Tensor(), Tensor(), Tensor()};
    const int64_t m = s[0].size(1);
    auto [dx, db] = cpu::bias_gelu_bwd(rows(grads[0], m).contiguous(), s[0], opt(s[1]),
                                       ctx->saved_data["approximate"].toStringRef(), need_b);
    return {need_x ? dx.view(ctx->saved_data["x_shape"].toIntVector()) : Tensor(),
            need_b ? db : Tensor(), Tensor()};
  }
};

Tensor bias_gelu_eager(const Tensor& x, const std::optional<Tensor>& bias,
                       const std::string& approximate) {
  return BiasGeluFn::apply(x, bias, approximate)[0];
}

// ---------------------------------------------------------------- rms_norm / add_rms_norm
struct RMSNormFn : public EagerFunction<RMSNormFn> {
  static constexpr const char* kName = "rms_norm";
  static variable_list forward(AutogradContext* ctx, const Tensor& x,
                               const std::optional<Tensor>& weight_,
                               const std::optional<Tensor>& residual_, int64_t m, double eps,
                               double weight_offset, bool cast_before_weight) {
    const Tensor weight = or_undefined(weight_), residual = or_undefined(residual_);
    ctx->saved_data["present"] = c10::List<bool>({true, weight.defined(), residual.defined()});
    const Tensor w = weight.defined() ? weight.reshape({-1}) : Tensor();
    const Tensor res = residual.defined() ? rows(residual, m) : Tensor();
    auto [out, s, rstd] = cpu::rms_norm_fwd(rows(x, m), opt(w), opt(res), eps, weight_offset,
                                            cast_before_weight);
    ctx->set_materialize_grads(false);  // the sum often gets no gradient
    ctx->saved_data["m"] = m;
    ctx->saved_data["weight_offset"] = weight_offset;
    ctx->saved_data["cast_before_weight"] = cast_before_weight;
    ctx->saved_data["x_shape"] = x.sizes().vec();
    ctx->saved_data["w_shape"] = weight.defined() ? weight.sizes().vec() : std::vector<int64_t>{};
    // Plain outputs; the sum saved as the output itself (see layer_norm above).
    Tensor sum_out = residual.defined() ? at::_unsafe_view(s, x.sizes()) : s;
    ctx->save_for_backward({residual.defined() ? sum_out : rows(x, m), w, rstd});
    return {at::_unsafe_view(out, x.sizes()), sum_out};
  }

  static variable_list input_grads(AutogradContext* ctx, const variable_list& grads) {
    const auto saved = ctx->get_saved_variables();
    auto& d = ctx->saved_data;
    const int64_t m = d["m"].toInt();
    const Tensor xs = rows(saved[0], m);
    const auto list = d["present"].toBoolList();
    const std::vector<bool> present(list.begin(), list.end());
    const bool has_residual = present[2];
    const bool need_w = needs_grad(ctx, present, 1);
    const Tensor dout = grads[0].defined() ? rows(grads[0], m).contiguous() : at::zeros_like(xs);
    const Tensor dsum =
        has_residual && grads[1].defined() ? rows(grads[1], m).contiguous() : Tensor();
    auto [dx, dw] = cpu::rms_norm_bwd(dout, xs, opt(saved[1]), saved[2], opt(dsum),
                                      d["weight_offset"].toDouble(),
                                      d["cast_before_weight"].toBool(), need_w);
    const Tensor dx_full = dx.view(d["x_shape"].toIntVector());
    return {dx_full, need_w ? dw.view(d["w_shape"].toIntVector()) : Tensor(),
            has_residual ? dx_full : Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> rms_norm_eager(const Tensor& x, const std::optional<Tensor>& weight,
                                          const std::optional<Tensor>& residual, int64_t cols,
                                          double eps, double weight_offset,
                                          bool cast_before_weight) {
  auto outs = RMSNormFn::apply(x, weight, residual, cols, eps, weight_offset, cast_before_weight);
  return {outs[0], outs[1]};
}

// ---------------------------------------------------------------- gated_act
struct GatedActFn : public EagerFunction<GatedActFn> {
  static constexpr const char* kName = "gated_act";
  static variable_list forward(AutogradContext* ctx, const Tensor& gate,
                               const std::optional<Tensor>& up_, const std::string& activation) {
    const Tensor up = or_undefined(up_);
    const bool packed = !up.defined();  // gate holds [gate | up] on its last dim
    const int64_t h = packed ? gate.size(-1) / 2 : gate.size(-1);
    // Views where the layout allows (the chunked halves of one projection included): the
    // backward recomputes act(gate) from them, nothing else is saved.
    const Tensor g2 = rows(gate, packed ? 2 * h : h);
    const Tensor u2 = packed ? Tensor() : rows(up, h);
    Tensor out = cpu::gated_act_fwd(g2, opt(u2), activation);
    auto out_shape = gate.sizes().vec();
    out_shape.back() = h;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["h"] = h;
    ctx->saved_data["gate_shape"] = gate.sizes().vec();
    ctx->save_for_backward({g2, u2});
    return {at::_unsafe_view(out, out_shape)};
  }

  static variable_list input_grads(AutogradContext* ctx, const variable_list& grads) {
    const auto s = ctx->get_saved_variables();
    auto& d = ctx->saved_data;
    const Tensor dh = rows(grads[0], d["h"].toInt());
    const auto gate_shape = d["gate_shape"].toIntVector();
    const std::string& activation = d["activation"].toStringRef();
    if (!s[1].defined()) {  // packed: one gradient, [dgate | dup]
      if (!ctx->needs_input_grad(0)) return {Tensor(), Tensor(), Tensor()};
      auto [dgu, unused] = cpu::gated_act_bwd(dh, s[0], std::nullopt, activation);
      return {dgu.view(gate_shape), Tensor(), Tensor()};
    }
    const bool need_gate = ctx->needs_input_grad(0), need_up = ctx->needs_input_grad(1);
    if (!(need_gate || need_up)) return {Tensor(), Tensor(), Tensor()};
    auto [dgate, dup] = cpu::gated_act_bwd(dh, s[0], s[1], activation);
    return {need_gate ? dgate.view(gate_shape) : Tensor(),
            need_up ? dup.view(gate_shape) : Tensor(), Tensor()};
  }
};

Tensor gated_act_eager(const Tensor& gate, const std::optional<Tensor>& up,
                       const std::string& activation) {
  return GatedActFn::apply(gate, up, activation)[0];
}

// ---------------------------------------------------------------- linear on oneDNN
// fastattn/ops/_gemm.py's _OneDNNLinear (y = x @ w.T + b on oneDNN's matmul): dx = dy @ w on
// oneDNN too (w.T as its weight, read strided), dW = dy.T @ x on torch.mm, db = dy.sum(0).
// Operands come already in their autocast dtype; autocast is kept out of the inner calls.
Tensor onednn_linear(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                     c10::string_view, c10::List<std::optional<at::Scalar>>,
                                     std::optional<c10::string_view>)>();
  return op.call(x, w, b, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
}

struct OneDNNLinearFn : public torch::autograd::Function<OneDNNLinearFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& w,
                               const std::optional<Tensor>& b) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const Tensor x2 = rows(x, x.size(-1)).contiguous();
    Tensor y = onednn_linear(x2, w, b);
    auto y_shape = x.sizes().vec();
    y_shape.back() = w.size(0);
    ctx->saved_data["has_bias"] = b.has_value() && b->defined();
    ctx->save_for_backward({x, w});  // x itself: a double backward differentiates through it
    return {at::_unsafe_view(y, y_shape)};
  }

  // Not EagerFunction's backward: a Linear is differentiable twice (gradient penalties, Hessian-
  // vector products), so with create_graph=True the same products run on differentiable ATen
  // ops, as F.linear's backward does; otherwise on oneDNN, as the forward.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    if (!at::GradMode::is_enabled()) return input_grads(ctx, grads);
    const auto s = ctx->get_saved_variables();
    const Tensor& x = s[0];
    const Tensor& w = s[1];
    const Tensor dy = grads[0].reshape({-1, w.size(0)});
    Tensor dx, dw, db;
    if (ctx->needs_input_grad(0)) dx = at::mm(dy, w).reshape(x.sizes());
    if (ctx->needs_input_grad(1)) dw = at::mm(dy.t(), x.reshape({-1, w.size(1)}));
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) db = dy.sum(0);
    return {dx, dw, db};
  }

  static variable_list input_grads(AutogradContext* ctx, const variable_list& grads) {
    const auto s = ctx->get_saved_variables();
    const Tensor& w = s[1];
    const Tensor x2 = rows(s[0], w.size(1)).contiguous();
    const Tensor dy = rows(grads[0], w.size(0)).contiguous();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    Tensor dx, dw, db;
    if (ctx->needs_input_grad(0))
      dx = onednn_linear(dy, w.t(), std::nullopt).view(s[0].sizes());
    if (ctx->needs_input_grad(1)) dw = at::mm(dy.t(), x2);
    if (has_bias && ctx->needs_input_grad(2)) db = dy.sum(0);
    return {dx, dw, db};
  }
};

Tensor linear_onednn_eager(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
  return OneDNNLinearFn::apply(x, w, b)[0];
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_FRAGMENT(fastattn_C, m) {
  m.def(
      "layer_norm_eager(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, int cols, "
      "float eps, ScalarType? out_dtype, float dropout_p, int seed) -> (Tensor, Tensor)");
  m.def(
      "attention_eager(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, float scale, "
      "float softcap, int window_left, int window_right, int diag_offset, float dropout_p, "
      "int seed, int offset) -> Tensor");
  m.def("bias_gelu_eager(Tensor x, Tensor? bias, str approximate) -> Tensor");
  m.def(
      "rms_norm_eager(Tensor x, Tensor? weight, Tensor? residual, int cols, float eps, "
      "float weight_offset, bool cast_before_weight) -> (Tensor, Tensor)");
  m.def("gated_act_eager(Tensor gate, Tensor? up, str activation) -> Tensor");
  m.def("linear_onednn_eager(Tensor x, Tensor w, Tensor? b) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastattn_C, CompositeImplicitAutograd, m) {
  m.impl("layer_norm_eager", &fastattn::layer_norm_eager);
  m.impl("attention_eager", &fastattn::attention_eager);
  m.impl("bias_gelu_eager", &fastattn::bias_gelu_eager);
  m.impl("rms_norm_eager", &fastattn::rms_norm_eager);
  m.impl("gated_act_eager", &fastattn::gated_act_eager);
  m.impl("linear_onednn_eager", &fastattn::linear_onednn_eager);
}
