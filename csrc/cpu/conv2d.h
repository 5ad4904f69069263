#pragma once
// Internal interface between the conv2d CPU entry points (conv2d.cpp) and the two algorithms
// (conv2d_im2col.cpp, conv2d_direct.cpp). The entry points validate, route, handle batch 0 and
// memory formats; the kernels below see NCHW-contiguous tensors (but the nhwc_* ones:
// channels_last), a batch >= 1 and a validated shape, and write into a preallocated result of
// the right dtype and layout.

#include <ATen/ATen.h>

#include <algorithm>

#include "common/checks.h"

namespace fastconv {
namespace conv2d_cpu {

// out = conv(input, weight) + bias; bias may be undefined.
void im2col_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                    at::Tensor& out, const Conv2dShape& s);
void im2col_grad_input(const at::Tensor& grad_output, const at::Tensor& weight,
                       at::Tensor& grad_input, const Conv2dShape& s);
void im2col_grad_weight(const at::Tensor& grad_output, const at::Tensor& input,
                        at::Tensor& grad_weight, const Conv2dShape& s);

// float32 / float64 where the build has the own AVX-512 GEMM (conv2d_gemm.h).
bool use_own_gemm(at::ScalarType st);

// channels_last convolutions without NCHW copies (conv2d_nhwc.cpp): one group, float32 /
// float64 with the own GEMM, at least 16 columns in the GEMM (n: out_channels for the forward,
// in_channels * taps for grad_input, the larger of in / out_channels for grad_weight). x,
// grad_output and the results channels_last contiguous, grad_weight contiguous. A sum over the
// taps of products of (pixels x channels) matrices with the weight, the activations' rows
// gathered in place; grad_input with < 16 input channels: go times the weight as O x (C * taps),
// then a col2im gather.
bool nhwc_applies(const Conv2dShape& s, at::ScalarType st, int64_t n);
void nhwc_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                  at::Tensor& out, const Conv2dShape& s);
void nhwc_grad_input(const at::Tensor& grad_output, const at::Tensor& weight,
                     at::Tensor& grad_input, const Conv2dShape& s);
void nhwc_grad_weight(const at::Tensor& grad_output, const at::Tensor& input,
                      at::Tensor& grad_weight, const Conv2dShape& s);

void direct_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                    at::Tensor& out, const Conv2dShape& s);
void direct_grad_input(const at::Tensor& grad_output, const at::Tensor& weight,
                       at::Tensor& grad_input, const Conv2dShape& s);
void direct_grad_weight(const at::Tensor& grad_output, const at::Tensor& input,
                        at::Tensor& grad_weight, const Conv2dShape& s);

// The output columns [lo, hi) whose tap at offset `off` (= j * dil - pad) lands inside an input
// row of `in` elements: lo * stride + off >= 0 and (hi - 1) * stride + off < in.
struct TapRange {
  int64_t lo, hi;
};
inline TapRange tap_range(int64_t off, int64_t stride, int64_t in, int64_t out) {
  int64_t lo = off >= 0 ? 0 : (-off + stride - 1) / stride;
  const int64_t last = in - 1 - off;  // largest ox * stride allowed
  int64_t hi = last < 0 ? 0 : last / stride + 1;
  if (hi > out) hi = out;
  if (lo > hi) lo = hi;
  return {lo, hi};
}

// at::parallel_for grain for `items` work items of `work_per_item` multiply-adds each: small
// problems run on the calling thread, where a parallel region would cost more than it saves.
inline int64_t parallel_grain(int64_t work_per_item) {
  constexpr int64_t kMinWorkPerTask = int64_t{1} << 16;
  return std::max<int64_t>(1, kMinWorkPerTask / std::max<int64_t>(work_per_item, 1));
}

}  // namespace conv2d_cpu
}  // namespace fastconv
