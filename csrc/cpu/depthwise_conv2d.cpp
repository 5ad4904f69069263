// PLACEHOLDER during development: replaced by the real depthwise kernels before anything lands.
#include "cpu/kernels.h"

namespace fastconv {
at::Tensor depthwise_conv2d_forward_cpu(const at::Tensor&, const at::Tensor&,
    const c10::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef) {
  TORCH_CHECK(false, "depthwise_conv2d: CPU kernel not written yet");
}
at::Tensor depthwise_conv2d_grad_input_cpu(const at::Tensor&, const at::Tensor&,
    at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef) {
  TORCH_CHECK(false, "depthwise_conv2d: CPU kernel not written yet");
}
at::Tensor depthwise_conv2d_grad_weight_cpu(const at::Tensor&, const at::Tensor&,
    at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef) {
  TORCH_CHECK(false, "depthwise_conv2d: CPU kernel not written yet");
}
}  // namespace fastconv
