// torch.autocast for fastconv's convolutions, on CUDA and on CPU: the same policy torch applies
// to its own conv2d (a "lower_precision_fp" op on both devices): every floating tensor argument
// of the region's device (input, weight, bias) is cast to the autocast dtype (CUDA: float16
// unless the region chose bfloat16; CPU: bfloat16 unless it chose otherwise), float64 tensors
// are left alone, and casts of leaf weights are cached for the region
// (at::autocast::cached_cast). The op then runs in that dtype and returns it, as
// torch.nn.functional.conv2d does. A CPU region that asks for float16 gets a clear error:
// fastconv has no float16 CPU kernels (torch's CPU conv2d does run in float16 there).
//
// max_pool2d needs no kernel here: it runs in its input's dtype, autocast or not.
//
// This file uses no CUDA header: it is built in CPU-only builds too, where the CUDA kernels
// are registered but never reached (AutocastCUDA only sees CUDA tensors).

#include "common/ops.h"

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>
#include <torch/version.h>

#include <cstdint>

namespace fastconv {
namespace {

template <c10::DeviceType D>
constexpr c10::DispatchKey autocast_key() {
  return D == c10::DeviceType::CUDA ? c10::DispatchKey::AutocastCUDA
                                    : c10::DispatchKey::AutocastCPU;
}

template <c10::DeviceType D>
at::ScalarType autocast_dtype(const char* op, const at::Tensor& input) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(D);
#else
  const at::ScalarType dtype = D == c10::DeviceType::CUDA ? at::autocast::get_autocast_gpu_dtype()
                                                          : at::autocast::get_autocast_cpu_dtype();
#endif
  // Only an argument autocast would really cast can end up in float16 (a float64 input stays).
  TORCH_CHECK_TYPE(
      D != c10::DeviceType::CPU || dtype != at::kHalf || !input.is_floating_point() ||
          input.scalar_type() == at::kDouble,
      op, ": torch.autocast(\"cpu\", dtype=torch.float16) would cast input to float16, but "
      "fastconv has no float16 kernels on cpu; use dtype=torch.bfloat16 (the CPU default) or "
      "run this op outside the autocast region");
  return dtype;
}

template <c10::DeviceType D>
at::Tensor conv2d_autocast(const at::Tensor& input, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           c10::string_view algo) {
  // Below this guard the redispatch reaches autograd and the backend kernel, not us again.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key<D>());
  const at::ScalarType dtype = autocast_dtype<D>("conv2d", input);
  return ops::conv2d_op().call(at::autocast::cached_cast(dtype, input, D),
                               at::autocast::cached_cast(dtype, weight, D),
                               at::autocast::cached_cast(dtype, bias, D), stride, padding,
                               dilation, groups, algo);
}

template <c10::DeviceType D>
at::Tensor depthwise_conv2d_autocast(const at::Tensor& input, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias,
                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key<D>());
  const at::ScalarType dtype = autocast_dtype<D>("depthwise_conv2d", input);
  return ops::depthwise_op().call(at::autocast::cached_cast(dtype, input, D),
                                  at::autocast::cached_cast(dtype, weight, D),
                                  at::autocast::cached_cast(dtype, bias, D), stride, padding,
                                  dilation);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, AutocastCUDA, m) {
  m.impl("conv2d", &conv2d_autocast<c10::DeviceType::CUDA>);
  m.impl("depthwise_conv2d", &depthwise_conv2d_autocast<c10::DeviceType::CUDA>);
}

TORCH_LIBRARY_IMPL(fastconv, AutocastCPU, m) {
  m.impl("conv2d", &conv2d_autocast<c10::DeviceType::CPU>);
  m.impl("depthwise_conv2d", &depthwise_conv2d_autocast<c10::DeviceType::CPU>);
}

}  // namespace fastconv
