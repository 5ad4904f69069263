// torch.autocast("cuda") for fastconv's convolutions: the same policy torch applies to its own
// conv2d (a "lower_precision_fp" op): every floating CUDA tensor argument (input, weight, bias)
// is cast to the autocast dtype (float16 unless the region chose bfloat16), float64 tensors are
// left alone, and casts of leaf weights are cached for the region (at::autocast::cached_cast).
// The op then runs in that dtype and returns it, as torch.nn.functional.conv2d does.
//
// max_pool2d needs no kernel here: it runs in its input's dtype, autocast or not.
//
// This file uses no CUDA header: it is built in CPU-only builds too, where the kernels are
// registered but never reached (AutocastCUDA only sees CUDA tensors).

#include "common/ops.h"

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>
#include <torch/version.h>

#include <cstdint>

namespace fastconv {
namespace {

at::ScalarType autocast_cuda_dtype() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
  return at::autocast::get_autocast_dtype(at::kCUDA);
#else
  return at::autocast::get_autocast_gpu_dtype();
#endif
}

at::Tensor conv2d_autocast_cuda(const at::Tensor& input, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups, c10::string_view algo) {
  // Below this guard the redispatch reaches autograd and the backend kernel, not us again.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  const at::ScalarType dtype = autocast_cuda_dtype();
  return ops::conv2d_op().call(at::autocast::cached_cast(dtype, input, c10::DeviceType::CUDA),
                               at::autocast::cached_cast(dtype, weight, c10::DeviceType::CUDA),
                               at::autocast::cached_cast(dtype, bias, c10::DeviceType::CUDA),
                               stride, padding, dilation, groups, algo);
}

at::Tensor depthwise_conv2d_autocast_cuda(const at::Tensor& input, const at::Tensor& weight,
                                          const c10::optional<at::Tensor>& bias,
                                          at::IntArrayRef stride, at::IntArrayRef padding,
                                          at::IntArrayRef dilation) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  const at::ScalarType dtype = autocast_cuda_dtype();
  return ops::depthwise_op().call(at::autocast::cached_cast(dtype, input, c10::DeviceType::CUDA),
                                  at::autocast::cached_cast(dtype, weight, c10::DeviceType::CUDA),
                                  at::autocast::cached_cast(dtype, bias, c10::DeviceType::CUDA),
                                  stride, padding, dilation);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, AutocastCUDA, m) {
  m.impl("conv2d", &conv2d_autocast_cuda);
  m.impl("depthwise_conv2d", &depthwise_conv2d_autocast_cuda);
}

}  // namespace fastconv
