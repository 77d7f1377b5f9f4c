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
// layer_norm_fwd(x[N,M], weight?[M], bias?[M], residual?[N,M], eps)
//     -> (out[N,M], sum[N,M] or [0] without residual, mean[N], rstd[N]: fp64 for fp64 x, else fp32)
//     sum = x + residual (in x's dtype), out = (sum - mean) * rstd * weight + bias.
// layer_norm_bwd(dout[N,M], x[N,M] (the normalised input, i.e. sum), weight?, mean, rstd,
//                dsum?[N,M], need_weight_grad, need_bias_grad)
//     -> (dx[N,M] (+ dsum when given), dweight[M] or [0], dbias[M] or [0])
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
      "layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_bwd(Tensor dout, Tensor x, Tensor? weight, Tensor mean, Tensor rstd,"
      " Tensor? dsum, bool need_weight_grad, bool need_bias_grad) -> (Tensor, Tensor, Tensor)");
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
}

TORCH_LIBRARY_IMPL(fastattn_C, CPU, m) {
  m.impl("layer_norm_fwd", &fastattn::cpu::layer_norm_fwd);
  m.impl("layer_norm_bwd", &fastattn::cpu::layer_norm_bwd);
  m.impl("attention_fwd", &fastattn::cpu::attention_fwd);
  m.impl("attention_bwd", &fastattn::cpu::attention_bwd);
  m.impl("attention_fwd_features", &fastattn::cpu::attention_fwd_features);
  m.impl("attention_bwd_features", &fastattn::cpu::attention_bwd_features);
  m.impl("bias_gelu_fwd", &fastattn::cpu::bias_gelu_fwd);
  m.impl("bias_gelu_bwd", &fastattn::cpu::bias_gelu_bwd);
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
  // The kernels' limits (csrc/kernel_limits.h), read by the op declarations in fastattn/ops/<op>.py.
  PyObject* limits = PyDict_New();
  if (limits == nullptr) return nullptr;
  const std::pair<const char*, long> entries[] = {
      {"attention_max_head_dim_cpu", fastattn::limits::kAttentionMaxHeadDimCpu},
      {"attention_max_head_dim_cuda", fastattn::limits::kAttentionMaxHeadDimCuda},
  };
  for (const auto& [name, value] : entries) {
    PyObject* v = PyLong_FromLong(value);
    PyDict_SetItemString(limits, name, v);
    Py_DECREF(v);
  }
  PyModule_AddObject(mod, "limits", limits);
  return mod;
}
