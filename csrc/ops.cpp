// Operator schemas of the kernel-level ops and their CPU registrations.
//
// These are the raw kernels, in the `fastattn_C` namespace (torch.ops.fastattn_C.*).
// The user-facing, differentiable ops (torch.ops.fastattn.*) are defined in Python in
// fastattn/ops/<op>.py: they validate, pick a backend through fastattn/_dispatch.py and,
// for the `cpu` / `cuda` backends, land here. Fake (meta) implementations of these kernel
// schemas are not needed: tracing stops at the differentiable fastattn:: ops, whose fake
// implementations live beside them.
//
// Contracts shared by every backend (cpu here, cuda in csrc/cuda/bindings.cpp, triton in
// fastattn/triton/<op>.py, reference in fastattn/ops/<op>.py):
//
// layer_norm_fwd(x[N,M], weight?[M], bias?[M], residual?[N,M], eps, out_dtype?, dropout_p, seed)
//     -> (out[N,M], sum[N,M] or [0] without residual and dropout, mean[N], rstd[N]: fp64 for
//         fp64 x, else fp32)
//     sum = dropout(x) + residual, in promote(x, residual)'s dtype (x's without a residual);
//     out = (sum - mean) * rstd * weight + bias, in out_dtype (default: sum's dtype). x and
//     residual may be float32 / bfloat16 in any mix (an autocast sublayer output added to a
//     float32 residual stream); float64 only unmixed. Dropout: row dropout of
//     csrc/cpu/philox.h (Philox4x32-10 keyed by seed; fastattn/ops/layernorm.py has the
//     reference mask), kept values scaled by 1/(1-p).
// layer_norm_bwd(dout[N,M], x[N,M] (the normalised input, i.e. sum), weight?, mean, rstd,
//                dsum?[N,M], need_weight_grad, need_bias_grad, need_ds, x_dtype?, dropout_p,
//                seed)
//     -> (ds[N,M] (+ dsum when given) or [0] without need_ds, dx[N,M] in x_dtype (ds through
//         the dropout mask) or [0] when need_ds and it would equal ds, dweight[M] or [0],
//         dbias[M] or [0]); dout may have any float32 / bfloat16 dtype.
// rms_norm_fwd(x[N,M], weight?[M], residual?[N,M], eps, weight_offset, cast_before_weight)
//     -> (out[N,M], sum[N,M] or [0] without residual, rstd[N]: fp64 for fp64 x, else fp32)
//     sum = x + residual (in x's dtype), xhat = sum * rstd, rstd = 1/sqrt(mean(sum^2) + eps),
//     out = r(xhat) * (weight + weight_offset) (no weight: r(xhat)), where r rounds to x's dtype
//     if cast_before_weight (LlamaRMSNorm's order) and is the identity otherwise.
// rms_norm_bwd(dout[N,M], x[N,M] (the normalised input, i.e. sum), weight?, rstd, dsum?[N,M],
//              weight_offset, cast_before_weight, need_weight_grad)
//     -> (dx[N,M] (+ dsum when given), dweight[M] (sum of dout * r(xhat)) or [0])
// attention_fwd(q[B,Hq,Tq,D], k[B,Hkv,Tk,D], v[B,Hkv,Tk,D], key_padding_mask?[B,Tk] bool
//               (True = padding, ignored: torch.nn.MultiheadAttention's meaning), causal,
//               scale, dropout_p, seed, offset)
//     -> (out[B,Hq,Tq,D] contiguous, lse[B,Hq,Tq] fp32 (fp64 for fp64 inputs), natural log)
//     q/k/v may have any strides with stride(-1) == 1; Hq % Hkv == 0 (head h reads kv head
//     h / (Hq / Hkv)). Causal is bottom-right aligned (flash-attn): query i sees key j iff
//     j <= i + Tk - Tq. A query row that sees no key gives out = 0 and lse = +inf (so the
//     backward gives zero gradients for it). Dropout: see fastattn/ops/attention.py
//     (Philox4x32-10; keep iff uniform >= dropout_p; kept values scaled by 1/(1-p)).
// attention_bwd(dout, q, k, v, out, lse, key_padding_mask?, causal, scale, dropout_p, seed,
//               offset) -> (dq, dk, dv) shaped like q, k, v
// attention_fwd_features(q, k, v, key_padding_mask?, bias?[B,Hq,Tq,Tk] (float32, float64 for
//               float64 inputs; broadcast dims with stride 0, unit last stride), scale, softcap
//               (0 = none), window_left, window_right (-1 = unbounded; causal is right = 0),
//               diag_offset (query i's diagonal key is i + diag_offset), dropout_p, seed, offset)
//     -> (out, lse): the whole of fastattn/ops/attention.py's maths; CPU only for now.
// attention_bwd_features(dout, q, k, v, out, lse, key_padding_mask?, bias?, scale, softcap,
//               window_left, window_right, diag_offset, dropout_p, seed, offset, need_bias_grad)
//     -> (dq, dk, dv, dbias = dS [B,Hq,Tq,Tk] float32 (float64) or [0] without need_bias_grad)
// bias_gelu_fwd(x[N,M], bias?[M], approximate) -> out[N,M]
// bias_gelu_bwd(dout[N,M], x[N,M], bias?[M], approximate, need_bias_grad)
//     -> (dx[N,M], dbias[M] or [0])
// gated_act_fwd(gate[N,H], up?[N,H], activation "silu" | "gelu" | "gelu_tanh") -> h[N,H]
//     h = act(gate) * up. gate / up: any row stride, unit column stride (e.g. the two halves of
//     one fused projection output). Without up, gate is that packed [N,2H] tensor: its first H
//     columns are the gate, the last H the up projection.
// gated_act_bwd(dh[N,H], gate, up?, activation)
//     -> (dgate[N,H], dup[N,H]); packed (no up): (dgu[N,2H] = [dgate | dup], [0])
//     dgate = dh * up * act'(gate), dup = dh * act(gate) (act recomputed, nothing saved).
// rotary_fwd(x[B,H,T,D], cos[Bc,T,R], sin[Bc,T,R], out_dtype) -> y like x (empty_like) in out_dtype
// rotary_bwd(dy[B,H,T,D], cos, sin, out_dtype) -> dx like dy in out_dtype
//     x: any strides, unit last stride; cos / sin: one shape and dtype, Bc = 1 or B (a batch
//     stride of 0 allowed), unit last stride; R even, 2 <= R <= D. h = R/2; per row and j < h,
//     a = x[j], b = x[j+h]: forward y[j] = a cos[j] - b sin[j], y[j+h] = b cos[j+h] + a sin[j+h];
//     backward (the transpose) y[j] = a cos[j] + b sin[j+h], y[j+h] = b cos[j+h] - a sin[j];
//     y[j] = x[j] for j >= R. x, cos and out each float32 or the call's one 16-bit dtype
//     (bfloat16; float16 on the GPU), or all float64 (CPU); math in float32 (float64), one
//     rounding.

#include <torch/library.h>
#include <Python.h>

#include <utility>

#include "cpu/kernels.h"
#include "kernel_limits.h"

// The vector width this file set was compiled for (see setup.py). Read by
// fastattn/_dispatch.py to tell whether this CPU can run the build.
#if defined(CPU_CAPABILITY_AVX512)
static const char* kCpuCapability = "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
static const char* kCpuCapability = "avx2";
#else
static const char* kCpuCapability = "generic";
#endif

#ifdef FASTATTN_WITH_CUDA
static const bool kWithCuda = true;
#else
static const bool kWithCuda = false;
#endif

TORCH_LIBRARY(fastattn_C, m) {
  m.def(
      "layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps,"
      " ScalarType? out_dtype, float dropout_p, int seed) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_bwd(Tensor dout, Tensor x, Tensor? weight, Tensor mean, Tensor rstd,"
      " Tensor? dsum, bool need_weight_grad, bool need_bias_grad, bool need_ds,"
      " ScalarType? x_dtype, float dropout_p, int seed) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "rms_norm_fwd(Tensor x, Tensor? weight, Tensor? residual, float eps, float weight_offset,"
      " bool cast_before_weight) -> (Tensor, Tensor, Tensor)");
  m.def(
      "rms_norm_bwd(Tensor dout, Tensor x, Tensor? weight, Tensor rstd, Tensor? dsum,"
      " float weight_offset, bool cast_before_weight, bool need_weight_grad) -> (Tensor, Tensor)");
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, bool causal,"
      " float scale, float dropout_p, int seed, int offset) -> (Tensor, Tensor)");
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
      " Tensor? key_padding_mask, bool causal, float scale, float dropout_p, int seed,"
      " int offset) -> (Tensor, Tensor, Tensor)");
  m.def(
      "attention_fwd_features(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask,"
      " Tensor? bias, float scale, float softcap, int window_left, int window_right,"
      " int diag_offset, float dropout_p, int seed, int offset) -> (Tensor, Tensor)");
  m.def(
      "attention_bwd_features(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
      " Tensor? key_padding_mask, Tensor? bias, float scale, float softcap, int window_left,"
      " int window_right, int diag_offset, float dropout_p, int seed, int offset,"
      " bool need_bias_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("bias_gelu_fwd(Tensor x, Tensor? bias, str approximate) -> Tensor");
  m.def(
      "bias_gelu_bwd(Tensor dout, Tensor x, Tensor? bias, str approximate,"
      " bool need_bias_grad) -> (Tensor, Tensor)");
  m.def("gated_act_fwd(Tensor gate, Tensor? up, str activation) -> Tensor");
  m.def("gated_act_bwd(Tensor dh, Tensor gate, Tensor? up, str activation) -> (Tensor, Tensor)");
  m.def("rotary_fwd(Tensor x, Tensor cos, Tensor sin, ScalarType out_dtype) -> Tensor");
  m.def("rotary_bwd(Tensor dy, Tensor cos, Tensor sin, ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastattn_C, CPU, m) {
  m.impl("layer_norm_fwd", &fastattn::cpu::layer_norm_fwd);
  m.impl("layer_norm_bwd", &fastattn::cpu::layer_norm_bwd);
  m.impl("rms_norm_fwd", &fastattn::cpu::rms_norm_fwd);
  m.impl("rms_norm_bwd", &fastattn::cpu::rms_norm_bwd);
  m.impl("attention_fwd", &fastattn::cpu::attention_fwd);
  m.impl("attention_bwd", &fastattn::cpu::attention_bwd);
  m.impl("attention_fwd_features", &fastattn::cpu::attention_fwd_features);
  m.impl("attention_bwd_features", &fastattn::cpu::attention_bwd_features);
  m.impl("bias_gelu_fwd", &fastattn::cpu::bias_gelu_fwd);
  m.impl("bias_gelu_bwd", &fastattn::cpu::bias_gelu_bwd);
  m.impl("gated_act_fwd", &fastattn::cpu::gated_act_fwd);
  m.impl("gated_act_bwd", &fastattn::cpu::gated_act_bwd);
  m.impl("rotary_fwd", &fastattn::cpu::rotary_fwd);
  m.impl("rotary_bwd", &fastattn::cpu::rotary_bwd);
}

// A plain Python module so `import fastattn._C` loads the library (and runs the
// registrations above). Its attributes describe the build.
static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "fastattn C++ kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&kModule);
  if (mod == nullptr) return nullptr;
  PyModule_AddStringConstant(mod, "cpu_capability", kCpuCapability);
  PyModule_AddObject(mod, "with_cuda", PyBool_FromLong(kWithCuda));
  PyModule_AddObject(mod, "cpu_bf16_dot", PyBool_FromLong(fastattn::cpu::attention_bf16_dot_available()));
  PyModule_AddObject(mod, "cpu_bf16_cvt", PyBool_FromLong(fastattn::cpu::bf16_hw_convert()));
  // The kernels' limits (csrc/kernel_limits.h), read by the op declarations in fastattn/ops/<op>.py.
  PyObject* limits = PyDict_New();
  if (limits == nullptr) return nullptr;
  const std::pair<const char*, long> entries[] = {
      {"attention_max_head_dim_cpu", fastattn::limits::kAttentionMaxHeadDimCpu},
      {"attention_max_head_dim_cuda", fastattn::limits::kAttentionMaxHeadDimCuda},
      {"attention_max_head_dim_cuda_fp32", fastattn::limits::kAttentionMaxHeadDimCudaFp32},
  };
  for (const auto& [name, value] : entries) {
    PyObject* v = PyLong_FromLong(value);
    PyDict_SetItemString(limits, name, v);
    Py_DECREF(v);
  }
  PyModule_AddObject(mod, "limits", limits);
  return mod;
}
