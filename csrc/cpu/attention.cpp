// Placeholder: the flash-attention CPU kernel lands here (issue 3).
#include "cpu/kernels.h"

namespace fastattn {
namespace cpu {

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&,
                                                 const std::optional<at::Tensor>&, bool, double,
                                                 double, int64_t, int64_t) {
  TORCH_CHECK(false, "fastattn: the cpu attention kernel is not built yet");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, bool, double,
    double, int64_t, int64_t) {
  TORCH_CHECK(false, "fastattn: the cpu attention kernel is not built yet");
}

}  // namespace cpu
}  // namespace fastattn
