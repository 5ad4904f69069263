#pragma once
// The depthwise backward op (_depthwise_conv2d_backward) composed of the grad_input and
// grad_weight kernels of one backend, for the shapes a backend has no fused kernel for.

#include <ATen/ATen.h>

#include <vector>

namespace fastconv {

// [grad_input, grad_weight] and, when bias_grad, grad_bias (grad_output summed over N, H, W in
// its own dtype, as torch's convolution backward does).
template <typename GradInputFn, typename GradWeightFn>
std::vector<at::Tensor> depthwise_backward_unfused(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool bias_grad,
    GradInputFn grad_input_fn, GradWeightFn grad_weight_fn) {
  std::vector<at::Tensor> grads;
  grads.push_back(grad_input_fn(grad_output, weight, input.sizes(), stride, padding, dilation));
  grads.push_back(grad_weight_fn(grad_output, input, weight.sizes(), stride, padding, dilation));
  if (bias_grad) grads.push_back(grad_output.sum({0, 2, 3}));
  return grads;
}

}  // namespace fastconv
