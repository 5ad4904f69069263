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

}  // namespace fastconv
