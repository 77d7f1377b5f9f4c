// Torch glue for the CUDA kernels in csrc/cuda/*.cu: TORCH_LIBRARY_IMPL(fastattn_C, CUDA).
//
// Built only where torch has CUDA (setup.py adds csrc/cuda/*.cu and this file, and defines
// FASTATTN_WITH_CUDA). Each function checks every input (device, dtype, shape, strides, head
// dim) with a message that says what was expected, allocates the outputs, takes the current
// stream and calls the launcher declared in csrc/cuda/kernels.cuh, then checks its
// cudaError_t. Contracts: csrc/ops.cpp. dtypes: float32, float16, bfloat16 (float64 is the CPU
// and reference backends' business; it is rejected here with a clear error).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "cuda/kernels.cuh"

namespace fastattn {
namespace cuda_glue {
namespace {

namespace k = ::fastattn::cuda;

k::DType kernel_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return k::DType::kFloat32;
    case at::kHalf: return k::DType::kFloat16;
    case at::kBFloat16: return k::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "fastattn_C.", op, " (cuda): ", name,
                  " must be float32, float16 or bfloat16, got ", t.scalar_type(),
                  " (float64 runs on the cpu and reference backends)");
  }
  return k::DType::kFloat32;  // unreachable
}

void check_cuda(const at::Tensor& t, const char* op, const char* name, const at::Device& dev) {
  TORCH_CHECK(t.is_cuda(), "fastattn_C.", op, " (cuda): ", name, " must be a CUDA tensor, got ",
              t.device());
  TORCH_CHECK(t.device() == dev, "fastattn_C.", op, " (cuda): ", name, " is on ", t.device(),
              " but the other inputs are on ", dev);
}

void check_same(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                const char* ref_name) {
  check_cuda(t, op, name, ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fastattn_C.", op, " (cuda): ", name,
              " must have the dtype of ", ref_name, " (", ref.scalar_type(), "), got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes(), "fastattn_C.", op, " (cuda): ", name,
              " must have the shape of ", ref_name, " ", ref.sizes(), ", got ", t.sizes());
}

// A per-column parameter ([M], any floating dtype) as a contiguous float tensor, or undefined.
at::Tensor param_f32(const std::optional<at::Tensor>& t, const at::Tensor& x, int64_t M,
                     const char* op, const char* name) {
  if (!t.has_value()) return at::Tensor();
  check_cuda(*t, op, name, x.device());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == M, "fastattn_C.", op, " (cuda): ", name,
              " must have shape [", M, "], got ", t->sizes());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "fastattn_C.", op, " (cuda): ", name,
              " must be floating point, got ", t->scalar_type());
  return t->to(at::kFloat).contiguous();
}

template <typename P>
P* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<P>() : nullptr;
}
const void* cptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastattn_C.", op, " (cuda): kernel failed: ",
              cudaGetErrorString(err));
}

// ------------------------------------------------------------------ layer norm
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    double eps, std::optional<at::ScalarType> out_dtype, double dropout_p, int64_t seed) {
  const char* op = "layer_norm_fwd";
  // The registry sends mixed dtypes and row dropout to the backends that declare them.
  TORCH_CHECK(dropout_p == 0 && (!out_dtype.has_value() || *out_dtype == x_in.scalar_type()),
              "fastattn_C.layer_norm_fwd (cuda): dropout and out_dtype are not supported");
  (void)seed;
  TORCH_CHECK(x_in.dim() == 2, "fastattn_C.layer_norm_fwd (cuda): x must be 2-D [rows, cols], got ",
              x_in.dim(), "-D");
  check_cuda(x_in, op, "x", x_in.device());
  const k::DType dt = kernel_dtype(x_in, op, "x");
  const int64_t N = x_in.size(0), M = x_in.size(1);
  TORCH_CHECK(M > 0 || N == 0, "fastattn_C.layer_norm_fwd (cuda): rows must not be empty");
  TORCH_CHECK(eps >= 0 && std::isfinite(eps), "fastattn_C.layer_norm_fwd (cuda): eps must be a finite value >= 0, got ", eps);
  if (residual.has_value()) check_same(*residual, x_in, op, "residual", "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor w = param_f32(weight, x_in, M, op, "weight");
  const at::Tensor b = param_f32(bias, x_in, M, op, "bias");

  const at::Tensor x = x_in.contiguous();
  const at::Tensor res = residual.has_value() ? residual->contiguous() : at::Tensor();
  at::Tensor out = at::empty({N, M}, x.options());
  at::Tensor sum = residual.has_value() ? at::empty({N, M}, x.options()) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({N}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({N}, x.options().dtype(at::kFloat));
  if (N == 0) return {out, sum, mean, rstd};
  check_launch(k::layer_norm_fwd(dt, x.data_ptr(), cptr_or_null(res), ptr_or_null<float>(w),
                                 ptr_or_null<float>(b), out.data_ptr(),
                                 residual.has_value() ? sum.data_ptr() : nullptr,
                                 mean.data_ptr<float>(), rstd.data_ptr<float>(), N, M,
                                 static_cast<float>(eps), c10::cuda::getCurrentCUDAStream()),
               op);
  return {out, sum, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
    const at::Tensor& dout_in, const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean_in, const at::Tensor& rstd_in, const std::optional<at::Tensor>& dsum,
    bool need_weight_grad, bool need_bias_grad, bool need_ds,
    std::optional<at::ScalarType> x_dtype, double dropout_p, int64_t seed) {
  TORCH_CHECK(dropout_p == 0 && (!x_dtype.has_value() || *x_dtype == x_in.scalar_type()),
              "fastattn_C.layer_norm_bwd (cuda): dropout and mixed dtypes are not supported");
  (void)seed;
  // The kernel's dx serves as ds and as x's gradient (they are equal here).
  const at::Tensor empty0 = at::empty({0}, x_in.options());
  const char* op = "layer_norm_bwd";
  TORCH_CHECK(x_in.dim() == 2, "fastattn_C.layer_norm_bwd (cuda): x must be 2-D, got ", x_in.dim(),
              "-D");
  check_cuda(x_in, op, "x", x_in.device());
  const k::DType dt = kernel_dtype(x_in, op, "x");
  const int64_t N = x_in.size(0), M = x_in.size(1);
  check_same(dout_in, x_in, op, "dout", "x");
  if (dsum.has_value()) check_same(*dsum, x_in, op, "dsum", "x");
  check_cuda(mean_in, op, "mean", x_in.device());
  check_cuda(rstd_in, op, "rstd", x_in.device());
  TORCH_CHECK(mean_in.numel() == N && rstd_in.numel() == N &&
                  mean_in.scalar_type() == at::kFloat && rstd_in.scalar_type() == at::kFloat,
              "fastattn_C.layer_norm_bwd (cuda): mean and rstd must hold ", N,
              " float32 values, got ", mean_in.sizes(), " ", mean_in.scalar_type(), " and ",
              rstd_in.sizes(), " ", rstd_in.scalar_type());
  TORCH_CHECK(!need_weight_grad || weight.has_value(),
              "fastattn_C.layer_norm_bwd (cuda): need_weight_grad without a weight");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor w = param_f32(weight, x_in, M, op, "weight");

  const at::Tensor dout = dout_in.contiguous(), x = x_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const at::Tensor ds = dsum.has_value() ? dsum->contiguous() : at::Tensor();
  at::Tensor dx = at::empty({N, M}, x.options());
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dw = need_weight_grad ? at::empty({M}, f32) : at::Tensor();
  at::Tensor db = need_bias_grad ? at::empty({M}, f32) : at::Tensor();
  const auto pdt = weight.has_value() ? weight->scalar_type() : x.scalar_type();
  auto finish = [&](const at::Tensor& t) {
    return t.defined() ? t.to(pdt) : at::empty({0}, x.options().dtype(pdt));
  };
  if (M == 0) return {need_ds ? dx : empty0, need_ds ? empty0 : dx, finish(dw), finish(db)};
  const size_t ws_floats = k::layer_norm_bwd_workspace(N, M, need_weight_grad, need_bias_grad);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_floats)}, f32);
  check_launch(k::layer_norm_bwd(dt, dout.data_ptr(), x.data_ptr(), ptr_or_null<float>(w),
                                 mean.data_ptr<float>(), rstd.data_ptr<float>(), cptr_or_null(ds),
                                 dx.data_ptr(), ptr_or_null<float>(dw), ptr_or_null<float>(db),
                                 ws_floats > 0 ? ws.data_ptr<float>() : nullptr, N, M,
                                 c10::cuda::getCurrentCUDAStream()),
               op);
  return {need_ds ? dx : empty0, need_ds ? empty0 : dx, finish(dw), finish(db)};
}

// ------------------------------------------------------------------ rms norm
// The scale weight + weight_offset as a contiguous float tensor ([M]), or undefined.
at::Tensor rms_scale(const std::optional<at::Tensor>& weight, double offset, const at::Tensor& x,
                     int64_t M, const char* op) {
  TORCH_CHECK(std::isfinite(offset), "fastattn_C.", op, " (cuda): weight_offset must be finite, got ",
              offset);
  at::Tensor c = param_f32(weight, x, M, op, "weight");
  if (c.defined() && offset != 0.0) c = c + offset;
  return c;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& residual, double eps, double weight_offset,
    bool cast_before_weight) {
  const char* op = "rms_norm_fwd";
  TORCH_CHECK(x_in.dim() == 2, "fastattn_C.rms_norm_fwd (cuda): x must be 2-D [rows, cols], got ",
              x_in.dim(), "-D");
  check_cuda(x_in, op, "x", x_in.device());
  const k::DType dt = kernel_dtype(x_in, op, "x");
  const int64_t N = x_in.size(0), M = x_in.size(1);
  TORCH_CHECK(M > 0 || N == 0, "fastattn_C.rms_norm_fwd (cuda): rows must not be empty");
  TORCH_CHECK(eps >= 0 && std::isfinite(eps),
              "fastattn_C.rms_norm_fwd (cuda): eps must be a finite value >= 0, got ", eps);
  if (residual.has_value()) check_same(*residual, x_in, op, "residual", "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor c = rms_scale(weight, weight_offset, x_in, M, op);

  const at::Tensor x = x_in.contiguous();
  const at::Tensor res = residual.has_value() ? residual->contiguous() : at::Tensor();
  at::Tensor out = at::empty({N, M}, x.options());
  at::Tensor sum = residual.has_value() ? at::empty({N, M}, x.options()) : at::empty({0}, x.options());
  at::Tensor rstd = at::empty({N}, x.options().dtype(at::kFloat));
  if (N == 0) return {out, sum, rstd};
  check_launch(k::rms_norm_fwd(dt, x.data_ptr(), cptr_or_null(res), ptr_or_null<float>(c),
                               out.data_ptr(), residual.has_value() ? sum.data_ptr() : nullptr,
                               rstd.data_ptr<float>(), N, M, static_cast<float>(eps),
                               cast_before_weight, c10::cuda::getCurrentCUDAStream()),
               op);
  return {out, sum, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(
    const at::Tensor& dout_in, const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const at::Tensor& rstd_in, const std::optional<at::Tensor>& dsum, double weight_offset,
    bool cast_before_weight, bool need_weight_grad) {
  const char* op = "rms_norm_bwd";
  TORCH_CHECK(x_in.dim() == 2, "fastattn_C.rms_norm_bwd (cuda): x must be 2-D, got ", x_in.dim(),
              "-D");
  check_cuda(x_in, op, "x", x_in.device());
  const k::DType dt = kernel_dtype(x_in, op, "x");
  const int64_t N = x_in.size(0), M = x_in.size(1);
  check_same(dout_in, x_in, op, "dout", "x");
  if (dsum.has_value()) check_same(*dsum, x_in, op, "dsum", "x");
  check_cuda(rstd_in, op, "rstd", x_in.device());
  TORCH_CHECK(rstd_in.numel() == N && rstd_in.scalar_type() == at::kFloat,
              "fastattn_C.rms_norm_bwd (cuda): rstd must hold ", N, " float32 values, got ",
              rstd_in.sizes(), " ", rstd_in.scalar_type());
  TORCH_CHECK(!need_weight_grad || weight.has_value(),
              "fastattn_C.rms_norm_bwd (cuda): need_weight_grad without a weight");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor c = rms_scale(weight, weight_offset, x_in, M, op);

  const at::Tensor dout = dout_in.contiguous(), x = x_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  const at::Tensor ds = dsum.has_value() ? dsum->contiguous() : at::Tensor();
  at::Tensor dx = at::empty({N, M}, x.options());
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dw = need_weight_grad ? at::empty({M}, f32) : at::Tensor();
  const auto pdt = weight.has_value() ? weight->scalar_type() : x.scalar_type();
  auto finish = [&](const at::Tensor& t) {
    return t.defined() ? t.to(pdt) : at::empty({0}, x.options().dtype(pdt));
  };
  if (M == 0) return {dx, finish(dw)};
  const size_t ws_floats = k::rms_norm_bwd_workspace(N, M, need_weight_grad);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_floats)}, f32);
  check_launch(k::rms_norm_bwd(dt, dout.data_ptr(), x.data_ptr(), ptr_or_null<float>(c),
                               rstd.data_ptr<float>(), cptr_or_null(ds), dx.data_ptr(),
                               ptr_or_null<float>(dw),
                               ws_floats > 0 ? ws.data_ptr<float>() : nullptr, N, M,
                               cast_before_weight, c10::cuda::getCurrentCUDAStream()),
               op);
  return {dx, finish(dw)};
}

// ------------------------------------------------------------------ attention
k::Strides3 strides3(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

int to_int(int64_t v, const char* op, const char* what) {
  TORCH_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), "fastattn_C.", op, " (cuda): ",
              what, " = ", v, " is too large for the kernel (max ", std::numeric_limits<int>::max(),
              ")");
  return static_cast<int>(v);
}

void check_bhtd(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 4, "fastattn_C.", op, " (cuda): ", name,
              " must be 4-D [batch, heads, seq, head_dim], got ", t.dim(), "-D");
  TORCH_CHECK(t.stride(3) == 1 || t.size(3) <= 1, "fastattn_C.", op, " (cuda): ", name,
              " must have stride 1 along head_dim, got strides ", t.strides());
}

struct AttnShape {
  k::DType dt;
  int B, Hq, Hkv, Tq, Tk, D;
};

// Checks q, k, v (and the key padding mask) and returns the dtype and shape; `mask` gets the contiguous
// bool mask or stays undefined.
AttnShape check_qkv(const at::Tensor& q, const at::Tensor& kt, const at::Tensor& v,
                    const std::optional<at::Tensor>& key_padding_mask, double scale,
                    double dropout_p, const char* op, at::Tensor& mask) {
  check_bhtd(q, op, "q");
  check_bhtd(kt, op, "k");
  check_bhtd(v, op, "v");
  check_cuda(q, op, "q", q.device());
  const k::DType dt = kernel_dtype(q, op, "q");
  check_cuda(kt, op, "k", q.device());
  check_cuda(v, op, "v", q.device());
  TORCH_CHECK(kt.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "fastattn_C.", op, " (cuda): q, k, v must share a dtype, got ", q.scalar_type(),
              ", ", kt.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(kt.sizes() == v.sizes(), "fastattn_C.", op, " (cuda): k and v must have the same shape, got ",
              kt.sizes(), " and ", v.sizes());
  TORCH_CHECK(kt.size(0) == q.size(0), "fastattn_C.", op, " (cuda): q and k must have the same batch size, got ",
              q.size(0), " and ", kt.size(0));
  TORCH_CHECK(kt.size(3) == q.size(3), "fastattn_C.", op, " (cuda): q and k must have the same head dim, got ",
              q.size(3), " and ", kt.size(3));
  TORCH_CHECK(kt.size(1) > 0 && q.size(1) % kt.size(1) == 0, "fastattn_C.", op,
              " (cuda): query heads (", q.size(1), ") must be a multiple of key/value heads (",
              kt.size(1), ")");
  const int64_t D = q.size(3);
  TORCH_CHECK(k::attention_head_dim_supported(dt, static_cast<int>(std::min<int64_t>(D, 1 << 20))),
              "fastattn_C.", op, " (cuda): head dim ", D, " not supported for ", q.scalar_type(),
              " (expected 1 to ", k::attention_max_head_dim(dt), ")");
  TORCH_CHECK(std::isfinite(scale), "fastattn_C.", op, " (cuda): scale must be finite, got ", scale);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "fastattn_C.", op,
              " (cuda): dropout_p must be in [0, 1), got ", dropout_p);
  AttnShape s;
  s.dt = dt;
  s.B = to_int(q.size(0), op, "batch");
  s.Hq = to_int(q.size(1), op, "query heads");
  s.Hkv = to_int(kt.size(1), op, "key/value heads");
  s.Tq = to_int(q.size(2), op, "query length");
  s.Tk = to_int(kt.size(2), op, "key length");
  s.D = static_cast<int>(D);
  to_int(q.size(0) * q.size(1), op, "batch * query heads");
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    check_cuda(m, op, "key_padding_mask", q.device());
    TORCH_CHECK(m.scalar_type() == at::kBool, "fastattn_C.", op,
                " (cuda): key_padding_mask must be bool (True = ignored), got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == q.size(0) && m.size(1) == kt.size(2), "fastattn_C.",
                op, " (cuda): key_padding_mask must have shape [", q.size(0), ", ", kt.size(2),
                "], got ", m.sizes());
    mask = m.contiguous();
  }
  return s;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(
    const at::Tensor& q, const at::Tensor& kt, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale,
    double dropout_p, int64_t seed, int64_t offset) {
  const char* op = "attention_fwd";
  at::Tensor mask;
  const AttnShape s = check_qkv(q, kt, v, key_padding_mask, scale, dropout_p, op, mask);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({s.B, s.Hq, s.Tq, s.D}, q.options());
  at::Tensor lse = at::empty({s.B, s.Hq, s.Tq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};

  k::AttentionFwdArgs a{};
  a.q = q.data_ptr();
  a.k = kt.data_ptr();
  a.v = v.data_ptr();
  a.q_stride = strides3(q);
  a.k_stride = strides3(kt);
  a.v_stride = strides3(v);
  a.key_padding_mask = mask.defined() ? reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()) : nullptr;
  a.mask_stride_b = mask.defined() ? mask.stride(0) : 0;
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  a.B = s.B;
  a.Hq = s.Hq;
  a.Hkv = s.Hkv;
  a.Tq = s.Tq;
  a.Tk = s.Tk;
  a.D = s.D;
  a.causal = causal;
  a.scale = static_cast<float>(scale);
  a.dropout_p = static_cast<float>(dropout_p);
  a.dropout_threshold = k::dropout_threshold_of(dropout_p);
  a.seed = static_cast<uint64_t>(seed);
  a.offset = static_cast<uint64_t>(offset);
  check_launch(k::attention_fwd(s.dt, a, c10::cuda::getCurrentCUDAStream()), op);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& kt, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse_in,
    const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale,
    double dropout_p, int64_t seed, int64_t offset) {
  const char* op = "attention_bwd";
  at::Tensor mask;
  const AttnShape s = check_qkv(q, kt, v, key_padding_mask, scale, dropout_p, op, mask);
  check_bhtd(dout, op, "dout");
  check_bhtd(out, op, "out");
  check_same(dout, q, op, "dout", "q");
  check_same(out, q, op, "out", "q");
  check_cuda(lse_in, op, "lse", q.device());
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.dim() == 3 &&
                  lse_in.size(0) == s.B && lse_in.size(1) == s.Hq && lse_in.size(2) == s.Tq,
              "fastattn_C.attention_bwd (cuda): lse must be float32 [", s.B, ", ", s.Hq, ", ",
              s.Tq, "], got ", lse_in.scalar_type(), " ", lse_in.sizes());
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dk = at::empty(kt.sizes(), kt.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dv = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  if (dq.numel() == 0 && dk.numel() == 0) return {dq, dk, dv};
  if (s.Tq == 0 || s.B == 0) {  // no query: no gradient reaches k and v
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  at::Tensor delta = at::empty({s.B, s.Hq, s.Tq}, q.options().dtype(at::kFloat));
  // fp16 / bf16: dq is accumulated in fp32 by atomics across key blocks, then rounded.
  const k::DType dt = s.dt;
  const size_t ws_floats = k::attention_bwd_workspace(dt, s.B, s.Hq, s.Tq, s.D);
  at::Tensor dq_accum = at::empty({static_cast<int64_t>(ws_floats)}, q.options().dtype(at::kFloat));

  k::AttentionBwdArgs a{};
  a.dout = dout.data_ptr();
  a.q = q.data_ptr();
  a.k = kt.data_ptr();
  a.v = v.data_ptr();
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  a.dout_stride = strides3(dout);
  a.q_stride = strides3(q);
  a.k_stride = strides3(kt);
  a.v_stride = strides3(v);
  a.out_stride = strides3(out);
  a.key_padding_mask = mask.defined() ? reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()) : nullptr;
  a.mask_stride_b = mask.defined() ? mask.stride(0) : 0;
  a.dq = dq.data_ptr();
  a.dk = dk.data_ptr();
  a.dv = dv.data_ptr();
  a.delta = delta.data_ptr<float>();
  a.dq_accum = ws_floats > 0 ? dq_accum.data_ptr<float>() : nullptr;
  a.B = s.B;
  a.Hq = s.Hq;
  a.Hkv = s.Hkv;
  a.Tq = s.Tq;
  a.Tk = s.Tk;
  a.D = s.D;
  a.causal = causal;
  a.scale = static_cast<float>(scale);
  a.dropout_p = static_cast<float>(dropout_p);
  a.dropout_threshold = k::dropout_threshold_of(dropout_p);
  a.seed = static_cast<uint64_t>(seed);
  a.offset = static_cast<uint64_t>(offset);
  check_launch(k::attention_bwd(dt, a, c10::cuda::getCurrentCUDAStream()), op);
  return {dq, dk, dv};
}

// ------------------------------------------------------------------ bias + GELU
bool parse_approximate(const std::string& approximate, const char* op) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh", "fastattn_C.", op,
              " (cuda): approximate must be 'none' or 'tanh', got '", approximate, "'");
  return approximate == "tanh";
}

at::Tensor bias_gelu_fwd(const at::Tensor& x_in, const std::optional<at::Tensor>& bias,
                         const std::string& approximate) {
  const char* op = "bias_gelu_fwd";
  const bool tanh_approx = parse_approximate(approximate, op);
  TORCH_CHECK(x_in.dim() == 2, "fastattn_C.bias_gelu_fwd (cuda): x must be 2-D [rows, cols], got ",
              x_in.dim(), "-D");
  check_cuda(x_in, op, "x", x_in.device());
  const k::DType dt = kernel_dtype(x_in, op, "x");
  const int64_t N = x_in.size(0), M = x_in.size(1);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor b = param_f32(bias, x_in, M, op, "bias");
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty({N, M}, x.options());
  if (out.numel() == 0) return out;
  check_launch(k::bias_gelu_fwd(dt, x.data_ptr(), ptr_or_null<float>(b), out.data_ptr(), N, M,
                                tanh_approx, c10::cuda::getCurrentCUDAStream()),
               op);
  return out;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd(const at::Tensor& dout_in, const at::Tensor& x_in,
                                                 const std::optional<at::Tensor>& bias,
                                                 const std::string& approximate,
                                                 bool need_bias_grad) {
  const char* op = "bias_gelu_bwd";
  const bool tanh_approx = parse_approximate(approximate, op);
  TORCH_CHECK(x_in.dim() == 2, "fastattn_C.bias_gelu_bwd (cuda): x must be 2-D [rows, cols], got ",
              x_in.dim(), "-D");
  check_cuda(x_in, op, "x", x_in.device());
  const k::DType dt = kernel_dtype(x_in, op, "x");
  check_same(dout_in, x_in, op, "dout", "x");
  const int64_t N = x_in.size(0), M = x_in.size(1);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor b = param_f32(bias, x_in, M, op, "bias");
  const at::Tensor dout = dout_in.contiguous(), x = x_in.contiguous();
  at::Tensor dx = at::empty({N, M}, x.options());
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor db = need_bias_grad ? at::empty({M}, f32) : at::Tensor();
  const auto pdt = bias.has_value() ? bias->scalar_type() : x.scalar_type();
  auto finish = [&](const at::Tensor& t) {
    return t.defined() ? t.to(pdt) : at::empty({0}, x.options().dtype(pdt));
  };
  if (M == 0) return {dx, finish(db)};
  const size_t ws_floats = k::bias_gelu_bwd_workspace(N, M, need_bias_grad);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_floats)}, f32);
  check_launch(k::bias_gelu_bwd(dt, dout.data_ptr(), x.data_ptr(), ptr_or_null<float>(b),
                                dx.data_ptr(), ptr_or_null<float>(db),
                                ws_floats > 0 ? ws.data_ptr<float>() : nullptr, N, M, tanh_approx,
                                c10::cuda::getCurrentCUDAStream()),
               op);
  return {dx, finish(db)};
}

// ------------------------------------------------------------------ gated activations
k::GatedAct parse_activation(const std::string& a, const char* op) {
  TORCH_CHECK(a == "silu" || a == "gelu" || a == "gelu_tanh", "fastattn_C.", op,
              " (cuda): activation must be 'silu', 'gelu' or 'gelu_tanh', got '", a, "'");
  return a == "silu" ? k::GatedAct::kSilu
                     : (a == "gelu" ? k::GatedAct::kGelu : k::GatedAct::kGeluTanh);
}

// Unit column stride (any row stride) is what the kernels read; anything else is copied once.
at::Tensor rows_ready(const at::Tensor& t) {
  return (t.stride(1) == 1 || t.size(1) <= 1) ? t : t.contiguous();
}

// (gate [N, H], up [N, H]) views, from separate tensors or from one packed [N, 2H] gate.
std::pair<at::Tensor, at::Tensor> gated_operands(const at::Tensor& gate,
                                                 const std::optional<at::Tensor>& up,
                                                 const char* op) {
  TORCH_CHECK(gate.dim() == 2, "fastattn_C.", op, " (cuda): gate must be 2-D [rows, cols], got ",
              gate.dim(), "-D");
  check_cuda(gate, op, "gate", gate.device());
  kernel_dtype(gate, op, "gate");
  if (!up.has_value()) {
    TORCH_CHECK(gate.size(1) % 2 == 0, "fastattn_C.", op,
                " (cuda): without `up`, gate is the packed [rows, 2 * cols] tensor and needs an "
                "even number of columns, got ",
                gate.size(1));
    const at::Tensor gu = rows_ready(gate);
    const int64_t H = gu.size(1) / 2;
    return {gu.narrow(1, 0, H), gu.narrow(1, H, H)};
  }
  check_same(*up, gate, op, "up", "gate");
  return {rows_ready(gate), rows_ready(*up)};
}

at::Tensor gated_act_fwd(const at::Tensor& gate, const std::optional<at::Tensor>& up,
                         const std::string& activation) {
  const char* op = "gated_act_fwd";
  const k::GatedAct act = parse_activation(activation, op);
  const auto [g, u] = gated_operands(gate, up, op);
  const c10::cuda::CUDAGuard guard(g.device());
  const int64_t N = g.size(0), H = g.size(1);
  at::Tensor h = at::empty({N, H}, g.options().memory_format(at::MemoryFormat::Contiguous));
  if (h.numel() == 0) return h;
  k::GatedActFwdArgs a{};
  a.gate = g.data_ptr();
  a.ld_gate = g.stride(0);
  a.up = u.data_ptr();
  a.ld_up = u.stride(0);
  a.h = h.data_ptr();
  a.N = N;
  a.H = H;
  check_launch(k::gated_act_fwd(kernel_dtype(g, op, "gate"), act, a,
                                c10::cuda::getCurrentCUDAStream()),
               op);
  return h;
}

std::tuple<at::Tensor, at::Tensor> gated_act_bwd(const at::Tensor& dh_in, const at::Tensor& gate,
                                                 const std::optional<at::Tensor>& up,
                                                 const std::string& activation) {
  const char* op = "gated_act_bwd";
  const k::GatedAct act = parse_activation(activation, op);
  const auto [g, u] = gated_operands(gate, up, op);
  const c10::cuda::CUDAGuard guard(g.device());
  const int64_t N = g.size(0), H = g.size(1);
  TORCH_CHECK(dh_in.dim() == 2, "fastattn_C.gated_act_bwd (cuda): dh must be 2-D, got ",
              dh_in.dim(), "-D");
  check_cuda(dh_in, op, "dh", g.device());
  TORCH_CHECK(dh_in.size(0) == N && dh_in.size(1) == H, "fastattn_C.gated_act_bwd (cuda): dh must have shape [",
              N, ", ", H, "], got ", dh_in.sizes());
  TORCH_CHECK(dh_in.scalar_type() == g.scalar_type(), "fastattn_C.gated_act_bwd (cuda): dh must have the dtype of gate (",
              g.scalar_type(), "), got ", dh_in.scalar_type());
  const at::Tensor dh = rows_ready(dh_in);
  const auto opts = g.options().memory_format(at::MemoryFormat::Contiguous);
  // Packed: one [N, 2H] gradient, dgate and dup its two halves; the second output is empty.
  const bool packed = !up.has_value();
  at::Tensor out1 = packed ? at::empty({N, 2 * H}, opts) : at::empty({N, H}, opts);
  at::Tensor out2 = packed ? at::empty({0}, opts) : at::empty({N, H}, opts);
  if (N == 0 || H == 0) return {out1, out2};
  k::GatedActBwdArgs a{};
  a.dh = dh.data_ptr();
  a.ld_dh = dh.stride(0);
  a.gate = g.data_ptr();
  a.ld_gate = g.stride(0);
  a.up = u.data_ptr();
  a.ld_up = u.stride(0);
  a.dgate = out1.data_ptr();
  a.dup = packed ? static_cast<void*>(static_cast<char*>(out1.data_ptr()) + H * out1.element_size())
                 : out2.data_ptr();
  a.ld_out = packed ? 2 * H : H;
  a.N = N;
  a.H = H;
  check_launch(k::gated_act_bwd(kernel_dtype(g, op, "gate"), act, a,
                                c10::cuda::getCurrentCUDAStream()),
               op);
  return {out1, out2};
}

// ------------------------------------------------------------------ rotary
k::DType rotary_dtype(at::ScalarType t, const char* op, const char* name) {
  switch (t) {
    case at::kFloat: return k::DType::kFloat32;
    case at::kHalf: return k::DType::kFloat16;
    case at::kBFloat16: return k::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "fastattn_C.", op, " (cuda): ", name,
                  " must be float32, float16 or bfloat16, got ", t,
                  " (float64 runs on the cpu and reference backends)");
  }
  return k::DType::kFloat32;  // unreachable
}

// y = rotary(x) (backward: dx = rotary^T(dy)) per the contract of csrc/ops.cpp; x is dy there.
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                  at::ScalarType out_dtype, bool backward) {
  const char* op = backward ? "rotary_bwd" : "rotary_fwd";
  const char* what = backward ? "dy" : "x";
  TORCH_CHECK(x.dim() == 4, "fastattn_C.", op, " (cuda): ", what,
              " must be 4-D [B, H, T, D], got ", x.dim(), "-D");
  TORCH_CHECK(cos.dim() == 3 && sin.sizes() == cos.sizes(), "fastattn_C.", op,
              " (cuda): cos and sin must be 3-D [Bc, T, R] of one shape, got ", cos.sizes(),
              " and ", sin.sizes());
  check_cuda(x, op, what, x.device());
  check_cuda(cos, op, "cos", x.device());
  check_cuda(sin, op, "sin", x.device());
  TORCH_CHECK(cos.scalar_type() == sin.scalar_type(), "fastattn_C.", op,
              " (cuda): cos and sin must have one dtype, got ", cos.scalar_type(), " and ",
              sin.scalar_type());
  const k::DType xdt = rotary_dtype(x.scalar_type(), op, what);
  const k::DType cdt = rotary_dtype(cos.scalar_type(), op, "cos / sin");
  const k::DType odt = rotary_dtype(out_dtype, op, "out_dtype");
  TORCH_CHECK(k::rotary_dtypes_supported(xdt, cdt, odt), "fastattn_C.", op, " (cuda): ", what,
              ", cos / sin and out_dtype may mix float32 with one 16-bit dtype only, got ",
              x.scalar_type(), ", ", cos.scalar_type(), " and ", out_dtype);
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), R = cos.size(2);
  TORCH_CHECK(cos.size(0) == 1 || cos.size(0) == B, "fastattn_C.", op,
              " (cuda): cos.size(0) must be 1 or B (", B, "), got ", cos.size(0));
  TORCH_CHECK(cos.size(1) == T, "fastattn_C.", op, " (cuda): cos.size(1) must be T (", T,
              "), got ", cos.size(1));
  TORCH_CHECK(R % 2 == 0 && R >= 2 && R <= D, "fastattn_C.", op,
              " (cuda): the rotary dim R = cos.size(2) must be even, >= 2 and <= D (", D,
              "), got ", R);
  TORCH_CHECK(x.stride(3) == 1, "fastattn_C.", op, " (cuda): ", what,
              " must have stride 1 along D, got strides ", x.strides());
  TORCH_CHECK(cos.stride(2) == 1 && sin.stride(2) == 1, "fastattn_C.", op,
              " (cuda): cos and sin must have stride 1 along R, got strides ", cos.strides(),
              " and ", sin.strides());
  const c10::cuda::CUDAGuard guard(x.device());
  // x's own strides when x is dense (the transposed q), contiguous otherwise.
  at::Tensor y = at::empty_like(x, x.options().dtype(out_dtype));
  if (y.stride(3) != 1 && D > 1) {  // not seen in practice: the kernel writes unit columns
    y = at::empty(x.sizes(),
                  x.options().dtype(out_dtype).memory_format(at::MemoryFormat::Contiguous));
  }
  if (y.numel() == 0) return y;
  k::RotaryArgs a{};
  a.x = x.data_ptr();
  a.x_stride = strides3(x);
  a.cos = cos.data_ptr();
  a.sin = sin.data_ptr();
  const bool bcast = cos.size(0) == 1;  // one cos row per t for every batch row
  a.cos_stride_b = bcast ? 0 : cos.stride(0);
  a.cos_stride_t = cos.stride(1);
  a.sin_stride_b = bcast ? 0 : sin.stride(0);
  a.sin_stride_t = sin.stride(1);
  a.out = y.data_ptr();
  a.out_stride = strides3(y);
  a.B = B;
  a.H = H;
  a.T = T;
  a.D = D;
  a.R = R;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(backward ? k::rotary_bwd(xdt, cdt, odt, a, stream)
                        : k::rotary_fwd(xdt, cdt, odt, a, stream),
               op);
  return y;
}

at::Tensor rotary_fwd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      at::ScalarType out_dtype) {
  return rotary(x, cos, sin, out_dtype, false);
}

at::Tensor rotary_bwd(const at::Tensor& dy, const at::Tensor& cos, const at::Tensor& sin,
                      at::ScalarType out_dtype) {
  return rotary(dy, cos, sin, out_dtype, true);
}

}  // namespace
}  // namespace cuda_glue
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn_C, CUDA, m) {
  m.impl("layer_norm_fwd", &fastattn::cuda_glue::layer_norm_fwd);
  m.impl("layer_norm_bwd", &fastattn::cuda_glue::layer_norm_bwd);
  m.impl("rms_norm_fwd", &fastattn::cuda_glue::rms_norm_fwd);
  m.impl("rms_norm_bwd", &fastattn::cuda_glue::rms_norm_bwd);
  m.impl("attention_fwd", &fastattn::cuda_glue::attention_fwd);
  m.impl("attention_bwd", &fastattn::cuda_glue::attention_bwd);
  m.impl("bias_gelu_fwd", &fastattn::cuda_glue::bias_gelu_fwd);
  m.impl("bias_gelu_bwd", &fastattn::cuda_glue::bias_gelu_bwd);
  m.impl("gated_act_fwd", &fastattn::cuda_glue::gated_act_fwd);
  m.impl("gated_act_bwd", &fastattn::cuda_glue::gated_act_bwd);
  m.impl("rotary_fwd", &fastattn::cuda_glue::rotary_fwd);
  m.impl("rotary_bwd", &fastattn::cuda_glue::rotary_bwd);
}
