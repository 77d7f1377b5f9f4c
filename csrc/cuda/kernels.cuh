// Launchers of the framework-free CUDA kernels in csrc/cuda/*.cu.
//
// Plain C++: raw device pointers, sizes, strides (in elements) and a stream; every launcher
// returns the cudaError_t of its launches (cudaSuccess when nothing went wrong). The torch glue
// (csrc/cuda/bindings.cpp) checks inputs, allocates outputs and workspaces and calls these.
// Contracts are those of the kernel-op schemas in csrc/ops.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "kernel_limits.h"

namespace fastattn {
namespace cuda {

// Element type of the activations. Parameters (LayerNorm weight/bias, GELU bias) are passed as
// float; statistics (mean, rstd, lse) are float.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// layernorm.cu ----------------------------------------------------------------
// x, residual, out, sum: [N, M] contiguous rows of `dt`. residual/sum, weight, bias may be null
// (sum must be non-null iff residual is). mean, rstd: [N] float.
cudaError_t layer_norm_fwd(DType dt, const void* x, const void* residual, const float* weight,
                           const float* bias, void* out, void* sum, float* mean, float* rstd,
                           int64_t N, int64_t M, float eps, cudaStream_t stream);

// Floats of workspace layer_norm_bwd needs for dweight/dbias partials and, for dweight, a row
// mean per row (0 if neither is wanted).
size_t layer_norm_bwd_workspace(int64_t N, int64_t M, bool need_weight_grad, bool need_bias_grad);

// dout, x (the normalised input, i.e. sum), dsum (nullable), dx: [N, M] contiguous of `dt`.
// weight (nullable), dweight, dbias (nullable = not wanted): [M] float.
cudaError_t layer_norm_bwd(DType dt, const void* dout, const void* x, const float* weight,
                           const float* mean, const float* rstd, const void* dsum, void* dx,
                           float* dweight, float* dbias, float* workspace, int64_t N, int64_t M,
                           cudaStream_t stream);

// rms_norm.cu -----------------------------------------------------------------
// x, residual, out, sum: [N, M] contiguous rows of `dt`; residual/sum may be null (sum non-null
// iff residual is). scale: [M] float = weight + weight_offset, or null (no weight). rstd: [N]
// float. cast_before_weight: round xhat to `dt` before the scale (LlamaRMSNorm's order).
cudaError_t rms_norm_fwd(DType dt, const void* x, const void* residual, const float* scale,
                         void* out, void* sum, float* rstd, int64_t N, int64_t M, float eps,
                         bool cast_before_weight, cudaStream_t stream);

// Floats of workspace rms_norm_bwd needs for the dweight partials (0 if not wanted).
size_t rms_norm_bwd_workspace(int64_t N, int64_t M, bool need_weight_grad);

// dout, x (the normalised input, i.e. sum), dsum (nullable), dx: [N, M] contiguous of `dt`.
// scale as in rms_norm_fwd; dweight: [M] float, or null when not wanted.
cudaError_t rms_norm_bwd(DType dt, const void* dout, const void* x, const float* scale,
                         const float* rstd, const void* dsum, void* dx, float* dweight,
                         float* workspace, int64_t N, int64_t M, bool cast_before_weight,
                         cudaStream_t stream);

// attention.cu ----------------------------------------------------------------
// Largest head dims the attention kernels take (csrc/kernel_limits.h, which Python reads too):
// the FlashAttention-2 kernels (fp16 / bf16; head dims padded up to 16, 32, 64, 128 or 256) and
// the simple kernels (fp32, and the 16-bit reference; padded up to 128).
constexpr int kAttentionFa2MaxHeadDim = limits::kAttentionMaxHeadDimCuda;
constexpr int kAttentionSimpleMaxHeadDim = limits::kAttentionMaxHeadDimCudaFp32;

// Strides in elements of a [B, H, T, D] tensor whose D stride is 1.
struct Strides3 {
  int64_t b, h, t;
};

struct AttentionFwdArgs {
  const void* q;  // [B, Hq, Tq, D]
  const void* k;  // [B, Hkv, Tk, D]
  const void* v;  // [B, Hkv, Tk, D]
  Strides3 q_stride, k_stride, v_stride;
  const uint8_t* key_padding_mask;  // [B, Tk] bool (1 = ignored), rows mask_stride_b apart; or null
  int64_t mask_stride_b;
  void* out;   // [B, Hq, Tq, D] contiguous
  float* lse;  // [B, Hq, Tq] contiguous
  int B, Hq, Hkv, Tq, Tk, D;
  bool causal;  // bottom-right aligned: query i sees key j iff j <= i + Tk - Tq
  float scale;
  float dropout_p;
  uint32_t dropout_threshold;  // keep iff (word >> 8) >= this: dropout_threshold_of(p)
  uint64_t seed, offset;
};

// ceil(p * 2^24) from the double p: u = (word >> 8) 2^-24 >= p compared exactly as integers,
// as every other backend does (a float32 p would round first and could keep one more value).
inline uint32_t dropout_threshold_of(double p) {
  return static_cast<uint32_t>(std::ceil(p * 16777216.0));
}

struct AttentionBwdArgs {
  const void* dout;  // [B, Hq, Tq, D]
  const void* q;     // [B, Hq, Tq, D]
  const void* k;     // [B, Hkv, Tk, D]
  const void* v;     // [B, Hkv, Tk, D]
  const void* out;   // [B, Hq, Tq, D]
  const float* lse;  // [B, Hq, Tq] contiguous
  Strides3 dout_stride, q_stride, k_stride, v_stride, out_stride;
  const uint8_t* key_padding_mask;
  int64_t mask_stride_b;
  void* dq;      // [B, Hq, Tq, D] contiguous
  void* dk;      // [B, Hkv, Tk, D] contiguous
  void* dv;      // [B, Hkv, Tk, D] contiguous
  float* delta;  // workspace: [B, Hq, Tq] floats
  float* dq_accum;  // workspace: attention_bwd_workspace() floats (fp16 / bf16: [B, Hq, Tq, D])
  int B, Hq, Hkv, Tq, Tk, D;
  bool causal;
  float scale;
  float dropout_p;
  uint32_t dropout_threshold;  // keep iff (word >> 8) >= this: dropout_threshold_of(p)
  uint64_t seed, offset;
};

// attention_fwd / attention_bwd's head-dim limit for dtype dt, and whether 1 <= D <= it.
int attention_max_head_dim(DType dt);
bool attention_head_dim_supported(DType dt, int D);

cudaError_t attention_fwd(DType dt, const AttentionFwdArgs& args, cudaStream_t stream);
cudaError_t attention_bwd(DType dt, const AttentionBwdArgs& args, cudaStream_t stream);

// The kernels behind attention_fwd / attention_bwd, callable one by one (the host emulation
// checks each against float64 and against each other). attention_fwd: fp16 / bf16 on the
// FlashAttention-2 kernels (_fa2), fp32 on the first kernels (_simple).
cudaError_t attention_fwd_simple(DType dt, const AttentionFwdArgs& args, cudaStream_t stream);
cudaError_t attention_fwd_fa2(DType dt, const AttentionFwdArgs& args, cudaStream_t stream);
cudaError_t attention_bwd_simple(DType dt, const AttentionBwdArgs& args, cudaStream_t stream);
cudaError_t attention_bwd_fa2(DType dt, const AttentionBwdArgs& args, cudaStream_t stream);
// Floats of dq_accum attention_bwd needs (0 for fp32, whose kernels write dq directly).
size_t attention_bwd_workspace(DType dt, int B, int Hq, int Tq, int D);

// gelu.cu ---------------------------------------------------------------------
// approximate: false = erf ("none"), true = tanh. x, out, dout, dx: [N, M] contiguous of `dt`;
// bias: [M] float or null.
cudaError_t bias_gelu_fwd(DType dt, const void* x, const float* bias, void* out, int64_t N,
                          int64_t M, bool tanh_approx, cudaStream_t stream);

// Floats of workspace bias_gelu_bwd needs for the dbias partials (0 if !need_bias_grad).
size_t bias_gelu_bwd_workspace(int64_t N, int64_t M, bool need_bias_grad);

// dbias: [M] float, or null when not wanted.
cudaError_t bias_gelu_bwd(DType dt, const void* dout, const void* x, const float* bias, void* dx,
                          float* dbias, float* workspace, int64_t N, int64_t M, bool tanh_approx,
                          cudaStream_t stream);

// gated_act.cu ----------------------------------------------------------------
// act(gate) * up. Every operand is [N, H] of `dt` with its own row stride (ld_*, in elements)
// and unit column stride: the two halves of one packed [N, 2H] tensor are such operands.
enum class GatedAct : int { kSilu = 0, kGelu = 1, kGeluTanh = 2 };

struct GatedActFwdArgs {
  const void* gate;
  int64_t ld_gate;
  const void* up;
  int64_t ld_up;
  void* h;  // [N, H] contiguous
  int64_t N, H;
};

struct GatedActBwdArgs {
  const void* dh;
  int64_t ld_dh;
  const void* gate;
  int64_t ld_gate;
  const void* up;
  int64_t ld_up;
  void* dgate;  // dgate and dup share the row stride ld_out (H, or 2H when packed)
  void* dup;
  int64_t ld_out;
  int64_t N, H;
};

cudaError_t gated_act_fwd(DType dt, GatedAct act, const GatedActFwdArgs& args,
                          cudaStream_t stream);
cudaError_t gated_act_bwd(DType dt, GatedAct act, const GatedActBwdArgs& args,
                          cudaStream_t stream);

// rotary.cu -------------------------------------------------------------------
// Rotary position embedding (transformers' apply_rotary_pos_emb), forward or its transpose.
// x (dy) and out: [B, H, T, D] with the given (b, head, t) strides and unit column stride;
// cos, sin: [Bc, T, R] with their own (batch, time) strides and unit column stride, batch
// stride 0 when Bc == 1. R even, 2 <= R <= D; columns R..D are copied (converted) to out.
// Every operand's dtype is float32 or the call's one 16-bit type (rotary_dtypes_supported);
// otherwise, or for a bad R, the launchers return cudaErrorInvalidValue. Empty: no launch.
struct RotaryArgs {
  const void* x;
  Strides3 x_stride;
  const void* cos;
  const void* sin;
  int64_t cos_stride_b, cos_stride_t, sin_stride_b, sin_stride_t;
  void* out;
  Strides3 out_stride;
  int64_t B, H, T, D, R;
};

// At most one 16-bit type among the three, and no other type than float32 / fp16 / bf16.
bool rotary_dtypes_supported(DType x, DType cs, DType out);

cudaError_t rotary_fwd(DType x_dt, DType cs_dt, DType out_dt, const RotaryArgs& args,
                       cudaStream_t stream);
// The backward: args.x is dy, args.out is dx.
cudaError_t rotary_bwd(DType dy_dt, DType cs_dt, DType out_dt, const RotaryArgs& args,
                       cudaStream_t stream);

}  // namespace cuda
}  // namespace fastattn
