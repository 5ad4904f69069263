#pragma once
// CUDA entry points that other CUDA translation units call directly (conv2d's algo="auto"
// routes depthwise shapes to the depthwise kernels without a second trip through the dispatcher).

#include <ATen/ATen.h>

namespace fastconv {

at::Tensor depthwise_conv2d_forward_cuda(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation);

at::Tensor depthwise_conv2d_grad_input_cuda(
    const at::Tensor& grad_output, const at::Tensor& weight, at::IntArrayRef input_size,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation);

at::Tensor depthwise_conv2d_grad_weight_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, at::IntArrayRef weight_size,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation);

}  // namespace fastconv
