// (Not "limits.h": csrc/ is on the include path, and that name would shadow the C header.)
// Limits the kernels enforce, stated once: the C++ / CUDA checks use these constants and
// csrc/ops.cpp exports them to Python as fastattn._C.limits, from which fastattn/_dispatch.py's
// op declarations read them (so `auto` never sends a kernel a case it would refuse).
// Framework-free (no torch headers): the CUDA kernels include it too.
#pragma once

namespace fastattn {
namespace limits {

// Attention head dim: the CPU kernel keeps a query row's accumulator in registers / L1 up to 256;
// the CUDA FlashAttention-2 kernels (fp16 / bf16) pad head dims up to 256, the fp32 kernels'
// shared-memory tiles are sized for 128.
constexpr int kAttentionMaxHeadDimCpu = 256;
constexpr int kAttentionMaxHeadDimCuda = 256;
constexpr int kAttentionMaxHeadDimCudaFp32 = 128;

}  // namespace limits
}  // namespace fastattn
