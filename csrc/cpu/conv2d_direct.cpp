// conv2d, algo="direct": the convolution sums evaluated in place, no column buffer.
//
// forward: one work item per (n, o) output plane, at::parallel_for over items. The plane is
//   accumulated in a float (double for float64) buffer of OH * OW: for every input channel of
//   the group, kernel row i and output row oy, each kernel column j adds w * input_row over the
//   contiguous range of ox whose taps are inside the row (no per-element bounds checks), so
//   the innermost loop is a unit-stride axpy the compiler vectorises (stride 1), or a strided
//   gather from the input row (stride > 1).
// grad_input: one item per (n, c) input plane, a gather: each input row y asks, per kernel row
//   i, which output row oy = (y + pH - i * dH) / sH reaches it, and adds w * grad_output_row
//   into the taps' columns. No two items write the same element: no atomics, deterministic.
// grad_weight: one item per (o, c) weight slice; for every (n, i, oy) the products
//   grad_output_row * input_row are added elementwise into kH * kW row accumulators of OW
//   lanes (vectorisable without reassociating a float reduction), which are summed once at
//   the end in a fixed order: deterministic, independent of the thread count.
//
// Speed: every FMA reads the input (or grad_output) row from L1/L2 and updates an accumulator
// row, so these kernels are bound by load/store bandwidth, not FLOPs. That beats im2col + GEMM
// only when the reduction per output (C_in / groups * kH * kW) is small, where the GEMM is a
// thin sliver and building the columns costs more than the arithmetic.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/conv2d.h"

namespace fastconv {
namespace conv2d_cpu {
namespace {

std::vector<TapRange> column_ranges(const Conv2dShape& s) {
  std::vector<TapRange> r(s.kernel_w);
  for (int64_t j = 0; j < s.kernel_w; ++j) {
    r[j] = tap_range(j * s.dil_w - s.pad_w, s.stride_w, s.in_w, s.out_w);
  }
  return r;
}

template <typename scalar_t>
void forward_impl(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                  at::Tensor& out, const Conv2dShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = s.in_channels, O = s.out_channels, G = s.groups;
  const int64_t Cg = C / G, Og = O / G, KK = s.kernel_h * s.kernel_w;
  const int64_t H = s.in_h, W = s.in_w, OH = s.out_h, OW = s.out_w, L = OH * OW;
  const int64_t sw = s.stride_w;
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  const scalar_t* w = weight.const_data_ptr<scalar_t>();
  const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* y = out.mutable_data_ptr<scalar_t>();
  const std::vector<TapRange> xr = column_ranges(s);

  at::parallel_for(0, s.batch * O, parallel_grain(Cg * KK * L), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(L);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / O, o = plane % O, g = o / Og;
      std::fill(acc.begin(), acc.end(), b != nullptr ? static_cast<acc_t>(b[o]) : acc_t(0));
      for (int64_t cl = 0; cl < Cg; ++cl) {
        const scalar_t* xp = x + (n * C + g * Cg + cl) * H * W;
        const scalar_t* wp = w + (o * Cg + cl) * KK;
        for (int64_t i = 0; i < s.kernel_h; ++i) {
          const TapRange yr = tap_range(i * s.dil_h - s.pad_h, s.stride_h, H, OH);
          for (int64_t oy = yr.lo; oy < yr.hi; ++oy) {
            const scalar_t* xrow = xp + (oy * s.stride_h - s.pad_h + i * s.dil_h) * W;
            acc_t* arow = acc.data() + oy * OW;
            for (int64_t j = 0; j < s.kernel_w; ++j) {
              const acc_t wv = static_cast<acc_t>(wp[i * s.kernel_w + j]);
              const int64_t xoff = j * s.dil_w - s.pad_w;
              if (sw == 1) {
                const scalar_t* src = xrow + xoff;
                for (int64_t ox = xr[j].lo; ox < xr[j].hi; ++ox) {
                  arow[ox] += wv * static_cast<acc_t>(src[ox]);
                }
              } else {
                for (int64_t ox = xr[j].lo; ox < xr[j].hi; ++ox) {
                  arow[ox] += wv * static_cast<acc_t>(xrow[ox * sw + xoff]);
                }
              }
            }
          }
        }
      }
      scalar_t* dst = y + plane * L;
      for (int64_t l = 0; l < L; ++l) dst[l] = static_cast<scalar_t>(acc[l]);
    }
  });
}

template <typename scalar_t>
void grad_input_impl(const at::Tensor& grad_output, const at::Tensor& weight,
                     at::Tensor& grad_input, const Conv2dShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = s.in_channels, O = s.out_channels, G = s.groups;
  const int64_t Cg = C / G, Og = O / G, KK = s.kernel_h * s.kernel_w;
  const int64_t H = s.in_h, W = s.in_w, OH = s.out_h, OW = s.out_w, L = OH * OW;
  const int64_t sw = s.stride_w;
  const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
  const scalar_t* w = weight.const_data_ptr<scalar_t>();
  scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
  const std::vector<TapRange> xr = column_ranges(s);

  at::parallel_for(0, s.batch * C, parallel_grain(Og * KK * L), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(H * W);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / C, c = plane % C, g = c / Cg, cl = c % Cg;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t ol = 0; ol < Og; ++ol) {
        const int64_t o = g * Og + ol;
        const scalar_t* gp = go + (n * O + o) * L;
        const scalar_t* wp = w + (o * Cg + cl) * KK;
        for (int64_t iy = 0; iy < H; ++iy) {
          acc_t* arow = acc.data() + iy * W;
          for (int64_t i = 0; i < s.kernel_h; ++i) {
            const int64_t num = iy + s.pad_h - i * s.dil_h;
            if (num < 0 || num % s.stride_h != 0) continue;
            const int64_t oy = num / s.stride_h;
            if (oy >= OH) continue;
            const scalar_t* grow = gp + oy * OW;
            for (int64_t j = 0; j < s.kernel_w; ++j) {
              const acc_t wv = static_cast<acc_t>(wp[i * s.kernel_w + j]);
              const int64_t xoff = j * s.dil_w - s.pad_w;
              if (sw == 1) {
                acc_t* dst = arow + xoff;
                for (int64_t ox = xr[j].lo; ox < xr[j].hi; ++ox) {
                  dst[ox] += wv * static_cast<acc_t>(grow[ox]);
                }
              } else {
                for (int64_t ox = xr[j].lo; ox < xr[j].hi; ++ox) {
                  arow[ox * sw + xoff] += wv * static_cast<acc_t>(grow[ox]);
                }
              }
            }
          }
        }
      }
      scalar_t* dst = gi + plane * H * W;
      for (int64_t l = 0; l < H * W; ++l) dst[l] = static_cast<scalar_t>(acc[l]);
    }
  });
}

template <typename scalar_t>
void grad_weight_impl(const at::Tensor& grad_output, const at::Tensor& input,
                      at::Tensor& grad_weight, const Conv2dShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = s.in_channels, O = s.out_channels, G = s.groups;
  const int64_t Cg = C / G, Og = O / G, KK = s.kernel_h * s.kernel_w;
  const int64_t H = s.in_h, W = s.in_w, OH = s.out_h, OW = s.out_w, L = OH * OW;
  const int64_t sw = s.stride_w;
  const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  scalar_t* gw = grad_weight.mutable_data_ptr<scalar_t>();
  const std::vector<TapRange> xr = column_ranges(s);

  at::parallel_for(0, O * Cg, parallel_grain(s.batch * KK * L), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(KK * OW);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t o = item / Cg, cl = item % Cg, c = (o / Og) * Cg + cl;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t n = 0; n < s.batch; ++n) {
        const scalar_t* gp = go + (n * O + o) * L;
        const scalar_t* xp = x + (n * C + c) * H * W;
        for (int64_t i = 0; i < s.kernel_h; ++i) {
          const TapRange yr = tap_range(i * s.dil_h - s.pad_h, s.stride_h, H, OH);
          for (int64_t oy = yr.lo; oy < yr.hi; ++oy) {
            const scalar_t* grow = gp + oy * OW;
            const scalar_t* xrow = xp + (oy * s.stride_h - s.pad_h + i * s.dil_h) * W;
            for (int64_t j = 0; j < s.kernel_w; ++j) {
              acc_t* arow = acc.data() + (i * s.kernel_w + j) * OW;
              const int64_t xoff = j * s.dil_w - s.pad_w;
              if (sw == 1) {
                const scalar_t* src = xrow + xoff;
                for (int64_t ox = xr[j].lo; ox < xr[j].hi; ++ox) {
                  arow[ox] += static_cast<acc_t>(grow[ox]) * static_cast<acc_t>(src[ox]);
                }
              } else {
                for (int64_t ox = xr[j].lo; ox < xr[j].hi; ++ox) {
                  arow[ox] += static_cast<acc_t>(grow[ox]) *
                              static_cast<acc_t>(xrow[ox * sw + xoff]);
                }
              }
            }
          }
        }
      }
      scalar_t* dst = gw + item * KK;
      for (int64_t t = 0; t < KK; ++t) {
        const acc_t* arow = acc.data() + t * OW;
        acc_t sum = 0;
        for (int64_t ox = 0; ox < OW; ++ox) sum += arow[ox];
        dst[t] = static_cast<scalar_t>(sum);
      }
    }
  });
}

}  // namespace

void direct_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                    at::Tensor& out, const Conv2dShape& s) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "conv2d_direct_forward",
                                 [&] { forward_impl<scalar_t>(input, weight, bias, out, s); });
}

void direct_grad_input(const at::Tensor& grad_output, const at::Tensor& weight,
                       at::Tensor& grad_input, const Conv2dShape& s) {
  AT_DISPATCH_FLOATING_TYPES_AND(
      at::kBFloat16, grad_output.scalar_type(), "conv2d_direct_grad_input",
      [&] { grad_input_impl<scalar_t>(grad_output, weight, grad_input, s); });
}

void direct_grad_weight(const at::Tensor& grad_output, const at::Tensor& input,
                        at::Tensor& grad_weight, const Conv2dShape& s) {
  AT_DISPATCH_FLOATING_TYPES_AND(
      at::kBFloat16, grad_output.scalar_type(), "conv2d_direct_grad_weight",
      [&] { grad_weight_impl<scalar_t>(grad_output, input, grad_weight, s); });
}

}  // namespace conv2d_cpu
}  // namespace fastconv
