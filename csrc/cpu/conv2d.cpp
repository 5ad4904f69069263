// conv2d CPU entry points: validation, algorithm choice, memory formats, batch 0, and the
// TORCH_LIBRARY_IMPL registration. The kernels live in conv2d_im2col.cpp and conv2d_direct.cpp
// and see NCHW-contiguous tensors, except one-group channels_last convolutions with the im2col
// algorithm, which run as GEMMs on the (pixels x channels) matrices (conv2d_nhwc.cpp) where the
// own GEMM is built (float32 / float64) and the shape suits it; algo="auto" sends depthwise
// shapes to the depthwise kernels (cpu/kernels.h) without a second trip through the dispatcher.

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cpu/conv2d.h"
#include "cpu/kernels.h"
#include "cpu/memory_hints.h"

namespace fastconv {
namespace {

at::Tensor defined_or_empty(const c10::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->contiguous() : at::Tensor();
}

// The kernels write NCHW; a channels_last result is filled by one copy at the end.
at::Tensor nchw_result(const at::Tensor& result) {
  return result.is_contiguous() ? result : at::empty(result.sizes(), result.options());
}

void finish(at::Tensor& result, const at::Tensor& nchw) {
  if (!nchw.is_same(result)) result.copy_(nchw);
}

// Whether an im2col call whose activations are laid out like `t` runs on the channels_last
// tensors themselves (conv2d_nhwc.cpp): t channels_last (and not also NCHW-contiguous), a shape
// and dtype the gathered GEMM takes, its GEMM n columns wide. Otherwise it runs on NCHW copies.
bool channels_last_gemm(ConvAlgo a, const Conv2dShape& s, const at::Tensor& t, int64_t n) {
  return a == ConvAlgo::kIm2col && t.is_contiguous(at::MemoryFormat::ChannelsLast) &&
         !t.is_contiguous() && conv2d_cpu::nhwc_applies(s, t.scalar_type(), n);
}

}  // namespace

at::Tensor conv2d_forward_cpu(const at::Tensor& input, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                              c10::string_view algo) {
  const char* op = "conv2d";
  const Conv2dShape s = check_conv2d(op, input, weight, bias, stride, padding, dilation, groups);
  const ConvAlgo a = choose_conv2d_algo(op, algo, s);
  if (a == ConvAlgo::kDepthwise) {
    return depthwise_conv2d_forward_cpu(input, weight, bias, stride, padding, dilation);
  }
  at::Tensor out = at::empty({s.batch, s.out_channels, s.out_h, s.out_w}, input.options(),
                             conv_memory_format(input, weight));
  advise_huge_pages(out);
  if (out.numel() == 0) return out;
  if (channels_last_gemm(a, s, out, s.out_channels)) {
    conv2d_cpu::nhwc_forward(input.contiguous(at::MemoryFormat::ChannelsLast), weight,
                             defined_or_empty(bias), out, s);
    return out;
  }
  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = defined_or_empty(bias);
  at::Tensor y = nchw_result(out);
  if (a == ConvAlgo::kIm2col) {
    conv2d_cpu::im2col_forward(x, w, b, y, s);
  } else {
    conv2d_cpu::direct_forward(x, w, b, y, s);
  }
  finish(out, y);
  return out;
}

at::Tensor conv2d_grad_input_cpu(const at::Tensor& grad_output, const at::Tensor& weight,
                                 at::IntArrayRef input_size, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups, c10::string_view algo) {
  const char* op = "_conv2d_grad_input";
  const Conv2dShape s = check_conv2d_shapes(op, input_size, weight.sizes(), stride, padding,
                                            dilation, groups);
  check_grad_output(op, grad_output, weight, "weight", s);
  const ConvAlgo a = choose_conv2d_algo(op, algo, s);
  if (a == ConvAlgo::kDepthwise) {
    return depthwise_conv2d_grad_input_cpu(grad_output, weight, input_size, stride, padding,
                                           dilation);
  }
  at::Tensor gi = at::empty(input_size, grad_output.options(),
                            conv_memory_format(grad_output, weight));
  advise_huge_pages(gi);
  if (gi.numel() == 0) return gi;
  // below 16 input channels the GEMM's columns are the (channel, tap) pairs (grad_input_cols)
  if (channels_last_gemm(a, s, gi, s.in_channels * s.kernel_h * s.kernel_w)) {
    conv2d_cpu::nhwc_grad_input(grad_output.contiguous(at::MemoryFormat::ChannelsLast), weight,
                                gi, s);
    return gi;
  }
  const at::Tensor go = grad_output.contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor r = nchw_result(gi);
  if (a == ConvAlgo::kIm2col) {
    conv2d_cpu::im2col_grad_input(go, w, r, s);
  } else {
    conv2d_cpu::direct_grad_input(go, w, r, s);
  }
  finish(gi, r);
  return gi;
}

at::Tensor conv2d_grad_weight_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                  at::IntArrayRef weight_size, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups, c10::string_view algo) {
  const char* op = "_conv2d_grad_weight";
  const Conv2dShape s = check_conv2d_shapes(op, input.sizes(), weight_size, stride, padding,
                                            dilation, groups);
  check_grad_output(op, grad_output, input, "input", s);
  const ConvAlgo a = choose_conv2d_algo(op, algo, s);
  if (a == ConvAlgo::kDepthwise) {
    return depthwise_conv2d_grad_weight_cpu(grad_output, input, weight_size, stride, padding,
                                            dilation);
  }
  if (s.batch == 0) return at::zeros(weight_size, grad_output.options());
  at::Tensor gw = at::empty(weight_size, grad_output.options());
  // with few input channels the GEMM's columns are the output channels (its transpose)
  if (channels_last_gemm(a, s, grad_output, std::max(s.in_channels, s.out_channels))) {
    conv2d_cpu::nhwc_grad_weight(grad_output, input.contiguous(at::MemoryFormat::ChannelsLast),
                                 gw, s);
    return gw;
  }
  const at::Tensor go = grad_output.contiguous();
  const at::Tensor x = input.contiguous();
  if (a == ConvAlgo::kIm2col) {
    conv2d_cpu::im2col_grad_weight(go, x, gw, s);
  } else {
    conv2d_cpu::direct_grad_weight(go, x, gw, s);
  }
  return gw;
}

TORCH_LIBRARY_IMPL(fastconv, CPU, m) {
  m.impl("conv2d", &conv2d_forward_cpu);
  m.impl("_conv2d_grad_input", &conv2d_grad_input_cpu);
  m.impl("_conv2d_grad_weight", &conv2d_grad_weight_cpu);
}

}  // namespace fastconv
