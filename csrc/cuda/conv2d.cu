// conv2d CUDA entry points: validation (common/checks.h, the CPU side's messages), algorithm
// choice, device guard, memory formats, empty batches, and the TORCH_LIBRARY_IMPL registration.
// The kernels live in conv2d_im2col.cu and conv2d_direct.cu; algo="auto" sends depthwise shapes
// to the depthwise kernels (cuda/kernels.cuh) without a second trip through the dispatcher.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cuda/conv2d.cuh"
#include "cuda/kernels.cuh"

namespace fastconv {

at::Tensor conv2d_forward_cuda(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    c10::string_view algo) {
  const char* op = "conv2d";
  // Also checks that weight and bias share input's dtype and device (values in the message).
  const Conv2dShape s = check_conv2d(op, input, weight, bias, stride, padding, dilation, groups);
  const ConvAlgo a = choose_conv2d_algo(op, algo, s);
  if (a == ConvAlgo::kDepthwise) {
    return depthwise_conv2d_forward_cuda(input, weight, bias, stride, padding, dilation);
  }
  c10::cuda::CUDAGuard guard(input.device());
  const at::MemoryFormat fmt = conv_memory_format(input, weight);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = input.contiguous(fmt);
  at::Tensor output = at::empty({s.batch, s.out_channels, s.out_h, s.out_w},
                                input.options().memory_format(fmt));
  if (output.numel() == 0) return output;
  const at::Tensor b = (bias.has_value() && bias->defined()) ? bias->contiguous() : at::Tensor();
  if (a == ConvAlgo::kIm2col) {
    conv2d_cuda::im2col_forward(x, weight, b, output, s, cl);
  } else {
    conv2d_cuda::direct_forward(x, weight, b, output, s, cl);
  }
  return output;
}

at::Tensor conv2d_grad_input_cuda(
    const at::Tensor& grad_output, const at::Tensor& weight, at::IntArrayRef input_size,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    c10::string_view algo) {
  const char* op = "_conv2d_grad_input";
  const Conv2dShape s = check_conv2d_shapes(op, input_size, weight.sizes(), stride, padding,
                                            dilation, groups);
  check_grad_output(op, grad_output, weight, "weight", s);
  const ConvAlgo a = choose_conv2d_algo(op, algo, s);
  if (a == ConvAlgo::kDepthwise) {
    return depthwise_conv2d_grad_input_cuda(grad_output, weight, input_size, stride, padding,
                                            dilation);
  }
  c10::cuda::CUDAGuard guard(grad_output.device());
  const at::MemoryFormat fmt = conv_memory_format(grad_output, weight);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor go = grad_output.contiguous(fmt);
  at::Tensor grad_input = at::empty(input_size, grad_output.options().memory_format(fmt));
  if (grad_input.numel() == 0) return grad_input;
  if (a == ConvAlgo::kIm2col) {
    conv2d_cuda::im2col_grad_input(go, weight, grad_input, s, cl);
  } else {
    conv2d_cuda::direct_grad_input(go, weight, grad_input, s, cl);
  }
  return grad_input;
}

at::Tensor conv2d_grad_weight_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, at::IntArrayRef weight_size,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    c10::string_view algo) {
  const char* op = "_conv2d_grad_weight";
  const Conv2dShape s = check_conv2d_shapes(op, input.sizes(), weight_size, stride, padding,
                                            dilation, groups);
  check_grad_output(op, grad_output, input, "input", s);
  const ConvAlgo a = choose_conv2d_algo(op, algo, s);
  if (a == ConvAlgo::kDepthwise) {
    return depthwise_conv2d_grad_weight_cuda(grad_output, input, weight_size, stride, padding,
                                             dilation);
  }
  c10::cuda::CUDAGuard guard(grad_output.device());
  // Both operands are read in one format: channels_last when either of them is.
  const at::MemoryFormat fmt = conv_memory_format(grad_output, input);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor go = grad_output.contiguous(fmt);
  const at::Tensor x = input.contiguous(fmt);
  at::Tensor grad_weight = at::empty(weight_size, grad_output.options());
  if (go.numel() == 0) return grad_weight.zero_();  // empty batch: nothing was summed
  if (a == ConvAlgo::kIm2col) {
    conv2d_cuda::im2col_grad_weight(go, x, grad_weight, s, cl);
  } else {
    conv2d_cuda::direct_grad_weight(go, x, grad_weight, s, cl);
  }
  return grad_weight;
}

TORCH_LIBRARY_IMPL(fastconv, CUDA, m) {
  m.impl("conv2d", &conv2d_forward_cuda);
  m.impl("_conv2d_grad_input", &conv2d_grad_input_cuda);
  m.impl("_conv2d_grad_weight", &conv2d_grad_weight_cuda);
}

}  // namespace fastconv
