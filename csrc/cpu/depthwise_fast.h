#pragma once
// The channels_last float32 AVX-512 fast path of depthwise conv2d (depthwise_nhwc_fast.cpp).
// Each function returns false, doing nothing, when the shape or build is not one it handles;
// the caller then runs the general kernels. Tensors: channels_last contiguous inputs and
// outputs, the (C, 1, K, K) weight contiguous.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "common/checks.h"

namespace fastconv {

// The grad_weight kernels of both depthwise files sum per fixed chunk of rows or images and
// then add the chunks. Returns partial[0, count) overwritten with, for each i, the sum from zero
// over the chunks, in chunk order, of partial[chunk * count + i]: chunk by chunk over contiguous
// memory, the elements split between the threads (element by element across the chunks it was a
// serial, strided walk that took most of the grad_weight op at small feature maps: C=576,
// 14x14, stride 2, N=8 has 56 chunks of 9 * 576 sums; see benchmarks/NOTES.md).
template <typename acc_t>
acc_t* add_chunks(std::vector<acc_t>& partial, int64_t chunks, int64_t count) {
  acc_t* sum = partial.data();
  at::parallel_for(0, count, 2048, [&](int64_t begin, int64_t end) {
    acc_t* __restrict dst = sum;
    for (int64_t i = begin; i < end; ++i) dst[i] = acc_t(0) + dst[i];
    for (int64_t chunk = 1; chunk < chunks; ++chunk) {
      const acc_t* __restrict src = partial.data() + chunk * count;
      for (int64_t i = begin; i < end; ++i) dst[i] += src[i];
    }
  });
  return sum;
}

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
