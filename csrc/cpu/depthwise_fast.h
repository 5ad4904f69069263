#pragma once
// The channels_last float32 AVX-512 fast path of depthwise conv2d (depthwise_nhwc_fast.cpp).
// Each function returns false, doing nothing, when the shape or build is not one it handles;
// the caller then runs the general kernels. Tensors: channels_last contiguous inputs and
// outputs, the (C, 1, K, K) weight contiguous.

#include <ATen/ATen.h>

#include "common/checks.h"

namespace fastconv {

bool depthwise_nhwc_fast_forward(const at::Tensor& x, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, at::Tensor& out,
                                 const Conv2dShape& s);

bool depthwise_nhwc_fast_grad_input(const at::Tensor& grad_output, const at::Tensor& weight,
                                    at::Tensor& grad_input, const Conv2dShape& s);

bool depthwise_nhwc_fast_grad_weight(const at::Tensor& grad_output, const at::Tensor& x,
                                     at::Tensor& grad_weight, const Conv2dShape& s);

// grad_input, grad_weight and (when grad_bias is defined, a float (C,) tensor) grad_bias in one
// pass, for 'same' padding; bit-identical to the grad_input and grad_weight kernels above.
bool depthwise_nhwc_fast_backward(const at::Tensor& grad_output, const at::Tensor& x,
                                  const at::Tensor& weight, at::Tensor& grad_input,
                                  at::Tensor& grad_weight, at::Tensor& grad_bias,
                                  const Conv2dShape& s);

}  // namespace fastconv
