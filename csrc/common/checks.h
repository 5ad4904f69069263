#pragma once
// Argument validation shared by the CPU and CUDA entry points, so every backend (and the
// Python fake kernels in fastconv/_checks.py, which use the same wording) rejects bad input
// with the same message: the op, the argument, what was expected and what was given.

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

#include <algorithm>
#include <limits>
#include <string>
#include <utility>

#include "common/shape.h"

namespace fastconv {

struct Conv2dShape {
  int64_t batch, in_channels, in_h, in_w;
  int64_t out_channels, kernel_h, kernel_w;
  int64_t out_h, out_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups;
};

struct Pool2dShape {
  int64_t batch, channels, in_h, in_w, out_h, out_w;
  // kernel_h / kernel_w: the taps that can reach the input (see check_max_pool2d_shapes);
  // window_taps: kernel_size[0] * kernel_size[1] as given, which decides whether compact
  // indices fit (as in the fake kernel, which does not know the input's size).
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t window_taps;
};

// torch's Python spelling of a dtype, so C++ messages read like the fake kernel's.
inline std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline std::string dtype_list(bool cuda) {
  return cuda ? "float32, float64, float16 or bfloat16" : "float32, float64 or bfloat16";
}

// Floating dtypes each backend has kernels for: CPU float32/float64/bfloat16, CUDA adds float16.
inline void check_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto st = t.scalar_type();
  const bool cuda = t.is_cuda();
  const bool ok = st == at::kFloat || st == at::kDouble || st == at::kBFloat16 ||
      (cuda && st == at::kHalf);
  TORCH_CHECK_TYPE(
      ok, op, ": expected ", name, " to have dtype ", dtype_list(cuda), " on ",
      t.device().type(), ", but got ", py_dtype(st));
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                      const char* layout) {
  TORCH_CHECK_VALUE(
      t.dim() == dim, op, ": expected ", name, " to be a ", dim, "-D tensor ", layout,
      ", but got a ", t.dim(), "-D tensor of shape ", t.sizes());
}

inline void check_same(const char* op, const char* name, const at::Tensor& t,
                       const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(
      t.scalar_type() == ref.scalar_type(), op, ": expected ", name, " to have the same dtype as ",
      ref_name, " (", py_dtype(ref.scalar_type()), "), but got ", py_dtype(t.scalar_type()));
  TORCH_CHECK(
      t.device() == ref.device(), op, ": expected ", name, " to be on the same device as ",
      ref_name, " (", ref.device(), "), but got ", t.device());
}

inline void check_pair(const char* op, const char* name, at::IntArrayRef v, int64_t min_value) {
  TORCH_CHECK_VALUE(
      v.size() == 2, op, ": expected ", name, " to have 2 elements, but got ", v.size(), ": ", v);
  TORCH_CHECK_VALUE(
      v[0] >= min_value && v[1] >= min_value, op, ": expected ", name, " to be ",
      (min_value > 0 ? "positive" : "non-negative"), ", but got ", v);
}

// One dimension's padded input size (size + 2 * padding) and dilated kernel size
// (dilation * (kernel - 1) + 1) must fit in int64, or the output-size formulas overflow and a
// bad call would run with garbage sizes.
inline void check_window_fits(const char* op, const char* dim, int64_t size, int64_t kernel,
                              int64_t padding, int64_t dilation) {
  int64_t twice = 0, padded = 0, extent = 0;
  const bool overflow = c10::mul_overflows(padding, int64_t{2}, &twice) ||
      c10::add_overflows(size, twice, &padded) ||
      c10::mul_overflows(dilation, kernel - 1, &extent) ||
      c10::add_overflows(extent, int64_t{1}, &extent);
  TORCH_CHECK_VALUE(
      !overflow, op, ": expected the padded input ", dim, " (", size, " + 2 * ", padding,
      ") and the dilated kernel ", dim, " (", dilation, " * (", kernel, " - 1) + 1) to fit in "
      "int64");
}

// Validates a (grouped) conv2d call and returns its sizes. `input_sizes`/`weight_sizes` are
// passed separately so the backward ops (which get a size list instead of a tensor) share it.
inline Conv2dShape check_conv2d_shapes(
    const char* op, at::IntArrayRef input_sizes, at::IntArrayRef weight_sizes,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK_VALUE(
      input_sizes.size() == 4, op, ": expected input to be a 4-D tensor (N, C, H, W), but got a ",
      input_sizes.size(), "-D tensor of shape ", input_sizes);
  TORCH_CHECK_VALUE(
      weight_sizes.size() == 4, op,
      ": expected weight to be a 4-D tensor (out_channels, in_channels / groups, kH, kW), but "
      "got a ", weight_sizes.size(), "-D tensor of shape ", weight_sizes);
  check_pair(op, "stride", stride, 1);
  check_pair(op, "padding", padding, 0);
  check_pair(op, "dilation", dilation, 1);
  TORCH_CHECK_VALUE(groups > 0, op, ": expected groups to be positive, but got ", groups);
  Conv2dShape s;
  s.batch = input_sizes[0];
  s.in_channels = input_sizes[1];
  s.in_h = input_sizes[2];
  s.in_w = input_sizes[3];
  s.out_channels = weight_sizes[0];
  s.kernel_h = weight_sizes[2];
  s.kernel_w = weight_sizes[3];
  s.stride_h = stride[0];
  s.stride_w = stride[1];
  s.pad_h = padding[0];
  s.pad_w = padding[1];
  s.dil_h = dilation[0];
  s.dil_w = dilation[1];
  s.groups = groups;
  TORCH_CHECK_VALUE(
      s.in_channels > 0 && s.in_h > 0 && s.in_w > 0, op,
      ": expected input to have non-zero channels, height and width, but got shape ", input_sizes);
  TORCH_CHECK_VALUE(
      s.out_channels > 0 && weight_sizes[1] > 0 && s.kernel_h > 0 && s.kernel_w > 0, op,
      ": expected weight to have non-zero sizes, but got shape ", weight_sizes);
  TORCH_CHECK_VALUE(
      s.in_channels % groups == 0, op, ": expected input channels (", s.in_channels,
      ") to be divisible by groups (", groups, ")");
  TORCH_CHECK_VALUE(
      s.out_channels % groups == 0, op, ": expected out channels weight.size(0) (",
      s.out_channels, ") to be divisible by groups (", groups, ")");
  TORCH_CHECK_VALUE(
      weight_sizes[1] * groups == s.in_channels, op,
      ": expected weight.size(1) * groups == input channels, but got ", weight_sizes[1], " * ",
      groups, " != ", s.in_channels, " (input shape ", input_sizes, ", weight shape ",
      weight_sizes, ")");
  check_window_fits(op, "height", s.in_h, s.kernel_h, s.pad_h, s.dil_h);
  check_window_fits(op, "width", s.in_w, s.kernel_w, s.pad_w, s.dil_w);
  const int64_t ekh = s.dil_h * (s.kernel_h - 1) + 1;
  const int64_t ekw = s.dil_w * (s.kernel_w - 1) + 1;
  TORCH_CHECK_VALUE(
      ekh <= s.in_h + 2 * s.pad_h && ekw <= s.in_w + 2 * s.pad_w, op,
      ": expected the (dilated) kernel size (", ekh, " x ", ekw,
      ") to be at most the padded input size (", s.in_h + 2 * s.pad_h, " x ",
      s.in_w + 2 * s.pad_w, ")");
  s.out_h = conv_output_size(s.in_h, s.kernel_h, s.stride_h, s.pad_h, s.dil_h);
  s.out_w = conv_output_size(s.in_w, s.kernel_w, s.stride_w, s.pad_w, s.dil_w);
  return s;
}

inline void check_bias(const char* op, const c10::optional<at::Tensor>& bias,
                       const at::Tensor& input, int64_t out_channels) {
  if (!bias.has_value() || !bias->defined()) return;
  const at::Tensor& b = *bias;
  TORCH_CHECK_VALUE(
      b.dim() == 1 && b.size(0) == out_channels, op,
      ": expected bias to be a 1-D tensor of size out_channels (", out_channels, "), but got shape ",
      b.sizes());
  check_same(op, "bias", b, "input", input);
}

inline Conv2dShape check_conv2d(
    const char* op, const at::Tensor& input, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups) {
  check_dtype(op, "input", input);
  check_same(op, "weight", weight, "input", input);
  auto s = check_conv2d_shapes(op, input.sizes(), weight.sizes(), stride, padding, dilation,
                               groups);
  check_bias(op, bias, input, s.out_channels);
  return s;
}

// Extra rules for the depthwise op: weight (C * m, 1, kH, kW) and groups == C.
inline Conv2dShape check_depthwise_shapes(
    const char* op, at::IntArrayRef input_sizes, at::IntArrayRef weight_sizes,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK_VALUE(
      input_sizes.size() == 4, op, ": expected input to be a 4-D tensor (N, C, H, W), but got a ",
      input_sizes.size(), "-D tensor of shape ", input_sizes);
  TORCH_CHECK_VALUE(
      weight_sizes.size() == 4 && weight_sizes[1] == 1, op,
      ": expected weight to be a 4-D tensor (C * multiplier, 1, kH, kW), but got shape ",
      weight_sizes);
  const int64_t c = input_sizes[1];
  TORCH_CHECK_VALUE(
      c > 0 && weight_sizes[0] > 0 && weight_sizes[0] % c == 0, op,
      ": expected weight.size(0) to be a positive multiple of the input channels (", c,
      ") (channel multiplier >= 1), but got weight shape ", weight_sizes);
  return check_conv2d_shapes(op, input_sizes, weight_sizes, stride, padding, dilation, c);
}

inline Conv2dShape check_depthwise_conv2d(
    const char* op, const at::Tensor& input, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation) {
  check_dtype(op, "input", input);
  check_same(op, "weight", weight, "input", input);
  auto s = check_depthwise_shapes(op, input.sizes(), weight.sizes(), stride, padding, dilation);
  check_bias(op, bias, input, s.out_channels);
  return s;
}

inline void check_grad_output(const char* op, const at::Tensor& grad_output,
                              const at::Tensor& other, const char* other_name,
                              const Conv2dShape& s) {
  check_dtype(op, "grad_output", grad_output);
  check_same(op, other_name, other, "grad_output", grad_output);
  TORCH_CHECK_VALUE(
      grad_output.dim() == 4 && grad_output.size(0) == s.batch &&
          grad_output.size(1) == s.out_channels && grad_output.size(2) == s.out_h &&
          grad_output.size(3) == s.out_w,
      op, ": expected grad_output of shape [", s.batch, ", ", s.out_channels, ", ", s.out_h, ", ",
      s.out_w, "], but got ", grad_output.sizes());
}

// The fused depthwise backward: input and weight give the shapes, grad_output must match them,
// all three share a dtype and device.
inline Conv2dShape check_depthwise_backward(const char* op, const at::Tensor& grad_output,
                                            const at::Tensor& input, const at::Tensor& weight,
                                            at::IntArrayRef stride, at::IntArrayRef padding,
                                            at::IntArrayRef dilation) {
  const Conv2dShape s =
      check_depthwise_shapes(op, input.sizes(), weight.sizes(), stride, padding, dilation);
  check_grad_output(op, grad_output, input, "input", s);
  check_same(op, "weight", weight, "grad_output", grad_output);
  return s;
}

inline Pool2dShape check_max_pool2d_shapes(
    const char* op, at::IntArrayRef input_sizes, at::IntArrayRef kernel_size,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  TORCH_CHECK_VALUE(
      input_sizes.size() == 4, op, ": expected input to be a 4-D tensor (N, C, H, W), but got a ",
      input_sizes.size(), "-D tensor of shape ", input_sizes);
  check_pair(op, "kernel_size", kernel_size, 1);
  check_pair(op, "stride", stride, 1);
  check_pair(op, "padding", padding, 0);
  check_pair(op, "dilation", dilation, 1);
  // torch's max_pool2d takes these as C ints; so do the kernels' int32 tap arithmetic.
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  using Arg = std::pair<const char*, at::IntArrayRef>;
  for (const auto& [name, v] : {Arg{"kernel_size", kernel_size}, Arg{"stride", stride},
                                Arg{"padding", padding}, Arg{"dilation", dilation}}) {
    TORCH_CHECK_VALUE(
        v[0] <= kIntMax && v[1] <= kIntMax, op, ": expected ", name, " to be at most ",
        kIntMax, " (a C int, as in torch), but got ", v);
  }
  TORCH_CHECK_VALUE(
      padding[0] <= kernel_size[0] / 2 && padding[1] <= kernel_size[1] / 2, op,
      ": expected padding to be at most half of kernel_size, but got padding ", padding,
      " and kernel_size ", kernel_size);
  Pool2dShape s;
  s.batch = input_sizes[0];
  s.channels = input_sizes[1];
  s.in_h = input_sizes[2];
  s.in_w = input_sizes[3];
  TORCH_CHECK_VALUE(
      s.channels > 0 && s.in_h > 0 && s.in_w > 0, op,
      ": expected input to have non-zero channels, height and width, but got shape ", input_sizes);
  s.kernel_h = kernel_size[0];
  s.kernel_w = kernel_size[1];
  s.window_taps = s.kernel_h * s.kernel_w;  // both at most a C int: no overflow
  s.stride_h = stride[0];
  s.stride_w = stride[1];
  s.pad_h = padding[0];
  s.pad_w = padding[1];
  s.dil_h = dilation[0];
  s.dil_w = dilation[1];
  s.out_h = pool_output_size(s.in_h, s.kernel_h, s.stride_h, s.pad_h, s.dil_h, ceil_mode);
  s.out_w = pool_output_size(s.in_w, s.kernel_w, s.stride_w, s.pad_w, s.dil_w, ceil_mode);
  TORCH_CHECK_VALUE(
      s.out_h > 0 && s.out_w > 0, op, ": the output would be empty: input size ", s.in_h, " x ",
      s.in_w, " with kernel_size ", kernel_size, ", stride ", stride, ", padding ", padding,
      ", dilation ", dilation, " gives output size ", s.out_h, " x ", s.out_w,
      "; expected a positive output size");
  // Kernel taps t with t * dilation - padding >= size lie past the input for every window
  // (each starts at o * stride - padding >= -padding): they only ever see padding, which never
  // wins. Dropping them changes no value or index and keeps the kernels' per-tap tables and
  // loops at the input's size when a huge kernel_size covers the whole input.
  s.kernel_h = std::min(s.kernel_h, (s.in_h - 1 + s.pad_h) / s.dil_h + 1);
  s.kernel_w = std::min(s.kernel_w, (s.in_w - 1 + s.pad_w) / s.dil_w + 1);
  return s;
}

// The taps a window can read (a cost estimate for the kernels' work split).
inline int64_t max_pool2d_taps(const Pool2dShape& s) { return s.kernel_h * s.kernel_w; }

// "compact" indices are stored as uint8 window-local tap numbers when the window as given
// has at most 256 taps (its tap numbers under the trimmed kernel are smaller still).
inline bool max_pool2d_compact_fits(const Pool2dShape& s) { return s.window_taps <= 256; }

enum class PoolIndices { kNone, kFull, kCompact };

inline PoolIndices parse_pool_indices(const char* op, c10::string_view mode) {
  if (mode == "none") return PoolIndices::kNone;
  if (mode == "full") return PoolIndices::kFull;
  if (mode == "compact") return PoolIndices::kCompact;
  TORCH_CHECK_VALUE(false, op, ": expected indices to be one of 'none', 'full', 'compact', but got '",
                    std::string(mode), "'");
}

enum class ConvAlgo { kIm2col, kDirect, kDepthwise };

inline bool is_depthwise_shape(const Conv2dShape& s) {
  return s.groups == s.in_channels && s.groups > 1 && s.out_channels % s.in_channels == 0;
}

// The rule behind algo="auto" (documented in README): depthwise shapes (groups == C_in,
// weight.size(1) == 1) go to the depthwise kernels; everything else to im2col + GEMM.
// Measured on the target AVX-512 EPYC (float32 and bfloat16, forward and both grads, one
// thread, 16 shapes down to C_in / groups * kH * kW = 4): forward + backward was faster with
// im2col for every non-depthwise shape; direct won only single ops on tiny problems (under
// 0.15 ms) and one grouped forward (16 -> 16, groups 4, 3x3, 56x56: 0.59 vs 0.75 ms, whose
// grads were slower). So "direct" is only ever used when asked for.
inline ConvAlgo choose_conv2d_algo(const char* op, c10::string_view algo, const Conv2dShape& s) {
  if (algo == "im2col") return ConvAlgo::kIm2col;
  if (algo == "direct") return ConvAlgo::kDirect;
  TORCH_CHECK_VALUE(
      algo == "auto", op, ": expected algo to be one of 'auto', 'im2col', 'direct', but got '",
      std::string(algo), "'");
  if (is_depthwise_shape(s)) return ConvAlgo::kDepthwise;
  return ConvAlgo::kIm2col;
}

// torch's rule: the output is channels_last when the input or the weight is.
inline at::MemoryFormat conv_memory_format(const at::Tensor& input, const at::Tensor& weight) {
  if (input.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
      weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

}  // namespace fastconv
