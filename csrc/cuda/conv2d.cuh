#pragma once
// conv2d on CUDA, shared between its translation units: conv2d.cu (entry points, validation,
// layout handling, registration), conv2d_im2col.cu (im2col / col2im + cuBLAS GEMMs) and
// conv2d_direct.cu (shared-memory tiled direct kernels).
//
// The algorithm functions below take tensors that the entry points have already validated and
// put on the right device (CUDAGuard). Activations (input, output, grad_output, grad_input) are
// dense in one memory format, NCHW-contiguous or channels_last-contiguous (`channels_last`);
// the weight may have any strides (each algorithm makes the layout it needs); grad_weight and
// bias are contiguous. The batch is never empty.

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>

#include "common/checks.h"

namespace fastconv {

at::Tensor conv2d_forward_cuda(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    c10::string_view algo);

at::Tensor conv2d_grad_input_cuda(
    const at::Tensor& grad_output, const at::Tensor& weight, at::IntArrayRef input_size,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    c10::string_view algo);

at::Tensor conv2d_grad_weight_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, at::IntArrayRef weight_size,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    c10::string_view algo);

namespace conv2d_cuda {

// Upper bound of the im2col column workspace (and, for the NCHW grad_weight, the transposed
// grad_output chunk next to it). A chunk is as many whole images as fit, or a band of output
// rows of one image when one image does not fit; it is never less than one output row of one
// image, so a single row of K * out_w elements larger than this is the only way past it.
constexpr int64_t kColumnWorkspaceBytes = int64_t{256} << 20;

// 32-bit index math is used when every element offset a kernel forms, plus the largest grid
// stride it adds, stays below this (room for `e += blockDim.x * gridDim.x` without overflow).
constexpr int64_t kInt32IndexLimit =
    int64_t{std::numeric_limits<int32_t>::max()} - (int64_t{1} << 28);

inline bool fits_int32(std::initializer_list<int64_t> values) {
  for (const int64_t v : values) {
    if (v < 0 || v >= kInt32IndexLimit) return false;
  }
  return true;
}

// Whether the channels_last path is taken: it is for every tensor argument of one call.
inline bool is_channels_last(const at::Tensor& t) {
  return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

// im2col + GEMM (conv2d_im2col.cu). `bias` may be undefined.
void im2col_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                    at::Tensor& output, const Conv2dShape& s, bool channels_last);
void im2col_grad_input(const at::Tensor& grad_output, const at::Tensor& weight,
                       at::Tensor& grad_input, const Conv2dShape& s, bool channels_last);
void im2col_grad_weight(const at::Tensor& grad_output, const at::Tensor& input,
                        at::Tensor& grad_weight, const Conv2dShape& s, bool channels_last);

// Direct kernels (conv2d_direct.cu). They read and write through the tensors' strides, so the
// same kernels serve both memory formats; `channels_last` only picks the coalesced order in
// which a block stages its tiles.
void direct_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                    at::Tensor& output, const Conv2dShape& s, bool channels_last);
void direct_grad_input(const at::Tensor& grad_output, const at::Tensor& weight,
                       at::Tensor& grad_input, const Conv2dShape& s, bool channels_last);
void direct_grad_weight(const at::Tensor& grad_output, const at::Tensor& input,
                        at::Tensor& grad_weight, const Conv2dShape& s, bool channels_last);

}  // namespace conv2d_cuda
}  // namespace fastconv
