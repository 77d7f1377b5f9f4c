// Placeholder: the bias+GELU CPU kernel lands here (issue 4).
#include "cpu/kernels.h"

namespace fastattn {
namespace cpu {

at::Tensor bias_gelu_fwd(const at::Tensor&, const std::optional<at::Tensor>&,
                         const std::string&) {
  TORCH_CHECK(false, "fastattn: the cpu bias_gelu kernel is not built yet");
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd(const at::Tensor&, const at::Tensor&,
                                                 const std::optional<at::Tensor>&,
                                                 const std::string&, bool) {
  TORCH_CHECK(false, "fastattn: the cpu bias_gelu kernel is not built yet");
}

}  // namespace cpu
}  // namespace fastattn
