// Declarations of the CPU kernels registered in csrc/ops.cpp.
// One op, one file: csrc/cpu/<op>.cpp implements the functions named after it.
// Shapes and contracts are those of the schemas in csrc/ops.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace fastattn {
namespace cpu {

// layernorm.cpp ---------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    double eps, std::optional<at::ScalarType> out_dtype, double dropout_p, int64_t seed);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
    const at::Tensor& dout, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& dsum,
    bool need_weight_grad, bool need_bias_grad, bool need_ds,
    std::optional<at::ScalarType> x_dtype, double dropout_p, int64_t seed);

// rms_norm.cpp ----------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& residual, double eps, double weight_offset,
    bool cast_before_weight);

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(
    const at::Tensor& dout, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& rstd, const std::optional<at::Tensor>& dsum, double weight_offset,
    bool cast_before_weight, bool need_weight_grad);

// attention.cpp ---------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale,
    double dropout_p, int64_t seed, int64_t offset);

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale,
    double dropout_p, int64_t seed, int64_t offset);

// The full contract (CPU only; see csrc/ops.cpp): window, diagonal offset, softcap, additive
// bias and its gradient (dbias = dS [B, Hq, Tq, Tk], empty unless need_bias_grad).
std::tuple<at::Tensor, at::Tensor> attention_fwd_features(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& bias,
    double scale, double softcap, int64_t window_left, int64_t window_right, int64_t diag_offset,
    double dropout_p, int64_t seed, int64_t offset);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_features(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& bias,
    double scale, double softcap, int64_t window_left, int64_t window_right, int64_t diag_offset,
    double dropout_p, int64_t seed, int64_t offset, bool need_bias_grad);

// True when bfloat16 attention can run its products on AVX512_BF16 here (built with it and the
// CPU has it); FASTATTN_CPU_BF16_DOT=0 still switches that path off per call.
bool attention_bf16_dot_available();

// True when the kernels' float -> bfloat16 stores round in hardware (vec.h's kHwBf16Cvt: the
// CPU has AVX512_BF16 and FASTATTN_CPU_BF16_CVT=0 was not set when the extension loaded).
bool bf16_hw_convert();

// gelu.cpp --------------------------------------------------------------------
at::Tensor bias_gelu_fwd(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                         const std::string& approximate);

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd(const at::Tensor& dout, const at::Tensor& x,
                                                 const std::optional<at::Tensor>& bias,
                                                 const std::string& approximate,
                                                 bool need_bias_grad);

// gated_act.cpp ---------------------------------------------------------------
at::Tensor gated_act_fwd(const at::Tensor& gate, const std::optional<at::Tensor>& up,
                         const std::string& activation);

std::tuple<at::Tensor, at::Tensor> gated_act_bwd(const at::Tensor& dh, const at::Tensor& gate,
                                                 const std::optional<at::Tensor>& up,
                                                 const std::string& activation);

// rotary.cpp ------------------------------------------------------------------
at::Tensor rotary_fwd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      at::ScalarType out_dtype);
at::Tensor rotary_bwd(const at::Tensor& dy, const at::Tensor& cos, const at::Tensor& sin,
                      at::ScalarType out_dtype);

}  // namespace cpu
}  // namespace fastattn
