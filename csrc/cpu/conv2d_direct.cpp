// conv2d, algo="direct": the convolution sums evaluated in place, no column buffer.
//
// Stride 1 (the common case) works on zero-padded planes laid out on a padded-width grid:
// with the source plane padded to Hs x Ws, one kernel tap (i, j) of a correlation is the whole
// source plane shifted by (i * dH + ro) * Ws + j * dW + co, so every tap is ONE contiguous
// axpy (or dot product) over the grid, which the compiler vectorises, instead of a short loop
// per output row. The grid carries Ws - OW junk columns per row (computed, never stored).
//   forward:     out = bias + sum_{c, i, j} w[o, c, i, j] * xpad shifted by (i, j).
//   grad_input:  the same correlation over grad_output padded by the (dilated) kernel extent,
//                with the kernel flipped and transposed: a gather (each input element is
//                produced once by its own work item), no atomics.
//   grad_weight: dW[o, c, i, j] = sum_n dot(grad_output, xpad shifted by (i, j)) over the
//                grid's real columns row by row (the junk ones are skipped, not multiplied by
//                zero: the input they meet may be inf), summed in a fixed order in 16 lanes:
//                deterministic and independent of the thread count.
// Work items: (image, block of 4 output planes) for the correlations, with the grid cut into
// chunks of rows so the 4 accumulator chunks and the source rows stay in L1; (o, c) pairs for
// grad_weight. All parallelised with at::parallel_for. bfloat16 is converted to float32 once
// while padding, so the inner loops are float (double for float64) throughout.
//
// Stride > 1 keeps per-row loops: per output row oy and tap, the contiguous range of ox
// whose taps fall inside the input row (no per-element bounds checks), strided source reads.
//
// Speed: every multiply-add loads the source and updates an accumulator in L1, so these
// kernels are bound by load/store bandwidth (about 0.1 cycle per multiply-add in float32 on
// AVX-512), not FLOPs. im2col + the register-blocked GEMM is faster wherever the reduction
// per output (C_in / groups * kH * kW) is large enough to fill the GEMM.

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


// ---- stride 1: padded-grid correlations ------------------------------------------------

// dst[plane][(r + top) * Ws + (c + left)] = src[plane][r][c] in acc_t, zero elsewhere. Each
// plane is Hs * Ws + slack elements (the slack absorbs the junk columns of the last row).
template <typename scalar_t, typename acc_t>
at::Tensor pad_planes(const scalar_t* src, int64_t planes, int64_t H, int64_t W, int64_t top,
                      int64_t left, int64_t Hs, int64_t Ws, int64_t plane_size,
                      const at::TensorOptions& opts) {
  at::Tensor out = at::empty({planes * plane_size}, opts);
  acc_t* dst = out.mutable_data_ptr<acc_t>();
  at::parallel_for(0, planes, parallel_grain(plane_size), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      acc_t* d = dst + p * plane_size;
      std::fill(d, d + plane_size, acc_t(0));
      const scalar_t* sp = src + p * H * W;
      for (int64_t r = 0; r < H; ++r) {
        acc_t* drow = d + (r + top) * Ws + left;
        for (int64_t c = 0; c < W; ++c) drow[c] = static_cast<acc_t>(sp[r * W + c]);
      }
    }
  });
  return out;
}

// dst[n, q, y, x] = bias[q] + sum_{p in group(q), i, j} wt[q][p][i][j] *
//                   src[n, p][(y + ro + i * dH) * Ws + x + co + j * dW]
// for y < OHg, x < OWg. src: [N][P] planes of plane_size elements, rows Ws apart; wt:
// [Q][P / groups][kH][kW] in acc_t.
template <typename scalar_t, typename acc_t>
void correlate_grid(const acc_t* src, int64_t N, int64_t P, int64_t Ws, int64_t plane_size,
                    const acc_t* wt, const acc_t* bias, int64_t Q, int64_t groups, int64_t OHg,
                    int64_t OWg, int64_t ro, int64_t co, const Conv2dShape& s, scalar_t* dst) {
  constexpr int64_t kBlock = 4;        // output planes per item: each source load feeds 4 FMAs
  constexpr int64_t kChunk = 1024;     // grid elements per chunk: 4 x 4 KiB accumulators in L1
  const int64_t Pg = P / groups, Qg = Q / groups, KK = s.kernel_h * s.kernel_w;
  const int64_t blocks_per_group = (Qg + kBlock - 1) / kBlock;
  const int64_t rows_per_chunk = std::max<int64_t>(1, kChunk / Ws);
  const int64_t items = N * groups * blocks_per_group;
  // The four accumulator chunks sit 2 KiB past a multiple of 4 KiB apart: at a distance just
  // under 4 KiB, a load of one would falsely depend on a recent store to another (4K aliasing)
  // and the loop ran several times slower.
  constexpr int64_t kPage = 4096 / sizeof(acc_t);
  const int64_t acc_stride = (rows_per_chunk * Ws + kPage - 1) / kPage * kPage + kPage / 2;
  at::parallel_for(0, items, parallel_grain(kBlock * Pg * KK * OHg * Ws),
                   [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc_buf(kBlock * acc_stride);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / (groups * blocks_per_group);
      const int64_t g = (item / blocks_per_group) % groups;
      const int64_t q0 = g * Qg + (item % blocks_per_group) * kBlock;
      const int64_t nq = std::min(kBlock, g * Qg + Qg - q0);
      for (int64_t y0 = 0; y0 < OHg; y0 += rows_per_chunk) {
        const int64_t rows = std::min(rows_per_chunk, OHg - y0);
        const int64_t len = rows * Ws;
        acc_t* acc[kBlock];
        for (int64_t b = 0; b < kBlock; ++b) acc[b] = acc_buf.data() + b * acc_stride;
        for (int64_t b = 0; b < nq; ++b) {
          std::fill(acc[b], acc[b] + len, bias != nullptr ? bias[q0 + b] : acc_t(0));
        }
        for (int64_t pl = 0; pl < Pg; ++pl) {
          const acc_t* plane = src + (n * P + g * Pg + pl) * plane_size + (y0 + ro) * Ws + co;
          for (int64_t i = 0; i < s.kernel_h; ++i) {
            for (int64_t j = 0; j < s.kernel_w; ++j) {
              const acc_t* sp = plane + i * s.dil_h * Ws + j * s.dil_w;
              const int64_t t = (pl * s.kernel_h + i) * s.kernel_w + j;
              if (nq == kBlock) {
                const acc_t w0 = wt[(q0 + 0) * Pg * KK + t], w1 = wt[(q0 + 1) * Pg * KK + t];
                const acc_t w2 = wt[(q0 + 2) * Pg * KK + t], w3 = wt[(q0 + 3) * Pg * KK + t];
                acc_t* __restrict__ a0 = acc[0];
                acc_t* __restrict__ a1 = acc[1];
                acc_t* __restrict__ a2 = acc[2];
                acc_t* __restrict__ a3 = acc[3];
                for (int64_t e = 0; e < len; ++e) {
                  const acc_t v = sp[e];
                  a0[e] += w0 * v;
                  a1[e] += w1 * v;
                  a2[e] += w2 * v;
                  a3[e] += w3 * v;
                }
              } else {
                for (int64_t b = 0; b < nq; ++b) {
                  const acc_t wv = wt[(q0 + b) * Pg * KK + t];
                  acc_t* __restrict__ a = acc[b];
                  for (int64_t e = 0; e < len; ++e) a[e] += wv * sp[e];
                }
              }
            }
          }
        }
        for (int64_t b = 0; b < nq; ++b) {
          scalar_t* out = dst + ((n * Q + q0 + b) * OHg + y0) * OWg;
          for (int64_t r = 0; r < rows; ++r) {
            for (int64_t x = 0; x < OWg; ++x) {
              out[r * OWg + x] = static_cast<scalar_t>(acc[b][r * Ws + x]);
            }
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void forward_grid(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                  at::Tensor& out, const Conv2dShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto opts = input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t Hs = s.in_h + 2 * s.pad_h, Ws = s.in_w + 2 * s.pad_w;
  const int64_t plane_size = Hs * Ws + Ws;
  const at::Tensor xpad = pad_planes<scalar_t, acc_t>(
      input.const_data_ptr<scalar_t>(), s.batch * s.in_channels, s.in_h, s.in_w, s.pad_h,
      s.pad_w, Hs, Ws, plane_size, opts);
  const at::Tensor wt = weight.to(opts.dtype()).contiguous();
  const at::Tensor bt = bias.defined() ? bias.to(opts.dtype()).contiguous() : at::Tensor();
  correlate_grid<scalar_t, acc_t>(
      xpad.const_data_ptr<acc_t>(), s.batch, s.in_channels, Ws, plane_size,
      wt.const_data_ptr<acc_t>(), bt.defined() ? bt.const_data_ptr<acc_t>() : nullptr,
      s.out_channels, s.groups, s.out_h, s.out_w, 0, 0, s, out.mutable_data_ptr<scalar_t>());
}

template <typename scalar_t>
void grad_input_grid(const at::Tensor& grad_output, const at::Tensor& weight,
                     at::Tensor& grad_input, const Conv2dShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto opts = grad_output.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  // grad_output placed at (ext_h, ext_w) = the dilated kernel extent minus one, so that
  // gi[y, x] = sum w_flipped * gopad[y + pH + i * dH][x + pW + j * dW] stays in bounds.
  const int64_t ext_h = (s.kernel_h - 1) * s.dil_h, ext_w = (s.kernel_w - 1) * s.dil_w;
  const int64_t Hs = std::max(s.in_h + s.pad_h + ext_h, ext_h + s.out_h);
  const int64_t Ws = std::max(s.in_w + s.pad_w + ext_w, ext_w + s.out_w);
  const int64_t plane_size = Hs * Ws + Ws;
  const at::Tensor gopad = pad_planes<scalar_t, acc_t>(
      grad_output.const_data_ptr<scalar_t>(), s.batch * s.out_channels, s.out_h, s.out_w,
      ext_h, ext_w, Hs, Ws, plane_size, opts);
  // wt[c][o_in_group][i][j] = w[o][c_in_group][kH - 1 - i][kW - 1 - j], per group
  const int64_t G = s.groups, Og = s.out_channels / G, Cg = s.in_channels / G;
  const at::Tensor wt = weight.to(opts.dtype())
                            .view({G, Og, Cg, s.kernel_h, s.kernel_w})
                            .flip({3, 4})
                            .transpose(1, 2)
                            .contiguous();
  correlate_grid<scalar_t, acc_t>(
      gopad.const_data_ptr<acc_t>(), s.batch, s.out_channels, Ws, plane_size,
      wt.const_data_ptr<acc_t>(), nullptr, s.in_channels, G, s.in_h, s.in_w, s.pad_h,
      s.pad_w, s, grad_input.mutable_data_ptr<scalar_t>());
}

template <typename scalar_t>
void grad_weight_grid(const at::Tensor& grad_output, const at::Tensor& input,
                      at::Tensor& grad_weight, const Conv2dShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kLanes = 16;
  const auto opts = input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t Hs = s.in_h + 2 * s.pad_h, Ws = s.in_w + 2 * s.pad_w;
  const int64_t plane_size = Hs * Ws + Ws;
  const at::Tensor xpad = pad_planes<scalar_t, acc_t>(
      input.const_data_ptr<scalar_t>(), s.batch * s.in_channels, s.in_h, s.in_w, s.pad_h,
      s.pad_w, Hs, Ws, plane_size, opts);
  // grad_output (NCHW-contiguous, rows OW apart) in acc_t: converted for bfloat16, as it is
  // otherwise. Only the grid's real columns are read.
  const int64_t grid = s.out_h * s.out_w;
  const at::Tensor gogrid = grad_output.to(opts.dtype());
  const acc_t* xp = xpad.const_data_ptr<acc_t>();
  const acc_t* gp = gogrid.const_data_ptr<acc_t>();
  const int64_t C = s.in_channels, O = s.out_channels, G = s.groups;
  const int64_t Cg = C / G, Og = O / G, KK = s.kernel_h * s.kernel_w;
  scalar_t* gw = grad_weight.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, O * Cg, parallel_grain(s.batch * KK * grid), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> lanes(KK * kLanes);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t o = item / Cg, c = (o / Og) * Cg + item % Cg;
      std::fill(lanes.begin(), lanes.end(), acc_t(0));
      for (int64_t n = 0; n < s.batch; ++n) {
        const acc_t* g = gp + (n * O + o) * grid;
        const acc_t* xplane = xp + (n * C + c) * plane_size;
        for (int64_t i = 0; i < s.kernel_h; ++i) {
          for (int64_t j = 0; j < s.kernel_w; ++j) {
            const acc_t* xs = xplane + i * s.dil_h * Ws + j * s.dil_w;
            // a local lane array (no aliasing with the inputs) becomes one vector register.
            // Row by row over the OW real columns: a junk column's grad_output is zero, but the
            // input it meets there may be inf or NaN, and 0 * inf must not reach the sum.
            acc_t part[kLanes] = {};
            for (int64_t r = 0; r < s.out_h; ++r) {
              const acc_t* gr = g + r * s.out_w;
              const acc_t* xr = xs + r * Ws;
              int64_t e = 0;
              for (; e + kLanes <= s.out_w; e += kLanes) {
                for (int64_t v = 0; v < kLanes; ++v) part[v] += gr[e + v] * xr[e + v];
              }
              for (int64_t v = 0; e + v < s.out_w; ++v) part[v] += gr[e + v] * xr[e + v];
            }
            acc_t* l = lanes.data() + (i * s.kernel_w + j) * kLanes;
            for (int64_t v = 0; v < kLanes; ++v) l[v] += part[v];
          }
        }
      }
      for (int64_t t = 0; t < KK; ++t) {
        acc_t sum = 0;
        for (int64_t v = 0; v < kLanes; ++v) sum += lanes[t * kLanes + v];
        gw[item * KK + t] = static_cast<scalar_t>(sum);
      }
    }
  });
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
                                 [&] {
    if (s.stride_h == 1 && s.stride_w == 1) {
      forward_grid<scalar_t>(input, weight, bias, out, s);
    } else {
      forward_impl<scalar_t>(input, weight, bias, out, s);
    }
  });
}

void direct_grad_input(const at::Tensor& grad_output, const at::Tensor& weight,
                       at::Tensor& grad_input, const Conv2dShape& s) {
  AT_DISPATCH_FLOATING_TYPES_AND(
      at::kBFloat16, grad_output.scalar_type(), "conv2d_direct_grad_input",
      [&] {
        if (s.stride_h == 1 && s.stride_w == 1) {
          grad_input_grid<scalar_t>(grad_output, weight, grad_input, s);
        } else {
          grad_input_impl<scalar_t>(grad_output, weight, grad_input, s);
        }
      });
}

void direct_grad_weight(const at::Tensor& grad_output, const at::Tensor& input,
                        at::Tensor& grad_weight, const Conv2dShape& s) {
  AT_DISPATCH_FLOATING_TYPES_AND(
      at::kBFloat16, grad_output.scalar_type(), "conv2d_direct_grad_weight",
      [&] {
        if (s.stride_h == 1 && s.stride_w == 1) {
          grad_weight_grid<scalar_t>(grad_output, input, grad_weight, s);
        } else {
          grad_weight_impl<scalar_t>(grad_output, input, grad_weight, s);
        }
      });
}

}  // namespace conv2d_cpu
}  // namespace fastconv
