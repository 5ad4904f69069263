// conv2d as im2col + cuBLAS GEMM (at::bmm / at::baddbmm), for both memory formats.
//
// Column layouts (K = C * kH * kW, one "column" per output position of the chunk):
//   NCHW: [G, Cg * kH * kW, B, rows * OW]: k-major, so the group blocks are [Kg, B * P] matrices
//         (one GEMM sums grad_weight over the whole chunk) and, viewed per image, [Kg, P]
//         matrices with batch stride P (one batched GEMM per group covers every image).
//   NHWC: [B * rows * OW, G * kH * kW * Cg]: position-major with (kh, kw, c) inside a group, so
//         one output pixel's receptive field is one contiguous row; the GEMM output
//         [B * P, O] is exactly the channels_last output (no transposes for any of the 3 ops).
// The column buffer holds one chunk (kColumnWorkspaceBytes, see conv2d.cuh): several whole
// images, or a band of output rows of one image. A 1x1 stride-1 unpadded conv skips im2col: the
// input already is the column matrix in both layouts.
//
// grad_input is a GEMM into the column buffer followed by a gather-style col2im: every thread
// owns one grad_input element and sums the column entries that map to it (fixed order, no
// atomics, no zero-fill pass). Large images are split into bands of input rows; each band
// recomputes the few output rows it shares with its neighbour so every band is complete.
//
// grad_weight accumulates one GEMM per chunk into grad_weight (beta = 1 after the first chunk),
// in the tensor's dtype; cuBLAS accumulates each chunk in float32 for half/bfloat16.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/shape.h"
#include "cuda/conv2d.cuh"

namespace fastconv {
namespace conv2d_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // grid-stride loops cover the rest

unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>(
      std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, kThreads), kMaxBlocks)));
}

template <typename index_t>
struct Geom {
  index_t C, H, W, OH, OW, kh, kw, sh, sw, ph, pw, dh, dw, Cg, Kg, K;
};

template <typename index_t>
Geom<index_t> make_geom(const Conv2dShape& s) {
  Geom<index_t> g;
  g.C = static_cast<index_t>(s.in_channels);
  g.H = static_cast<index_t>(s.in_h);
  g.W = static_cast<index_t>(s.in_w);
  g.OH = static_cast<index_t>(s.out_h);
  g.OW = static_cast<index_t>(s.out_w);
  g.kh = static_cast<index_t>(s.kernel_h);
  g.kw = static_cast<index_t>(s.kernel_w);
  g.sh = static_cast<index_t>(s.stride_h);
  g.sw = static_cast<index_t>(s.stride_w);
  g.ph = static_cast<index_t>(s.pad_h);
  g.pw = static_cast<index_t>(s.pad_w);
  g.dh = static_cast<index_t>(s.dil_h);
  g.dw = static_cast<index_t>(s.dil_w);
  g.Cg = static_cast<index_t>(s.in_channels / s.groups);
  g.Kg = static_cast<index_t>(s.in_channels / s.groups * s.kernel_h * s.kernel_w);
  g.K = static_cast<index_t>(s.in_channels * s.kernel_h * s.kernel_w);
  return g;
}

template <typename F>
void dispatch_index(bool use32, const F& f) {
  if (use32) {
    f(int32_t{0});
  } else {
    f(int64_t{0});
  }
}

// ---------------------------------------------------------------------------------------------
// kernels
// ---------------------------------------------------------------------------------------------

// NCHW im2col of output rows [oh0, oh0 + rows) of `batch` images (x points at the first).
// One thread per (c, b, output position): it writes the kH * kW column rows of its input
// channel, each write coalesced across the warp (consecutive ow), each read coalesced for
// stride 1. Memory-bound: reads the input band ~once (L1/L2 absorb the kH * kW overlap) and
// writes K * B * rows * OW elements.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads) conv2d_im2col_nchw_kernel(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ col, const Geom<index_t> g,
    const index_t batch, const index_t oh0, const index_t rows) {
  const index_t ncols = rows * g.OW;
  const index_t k_stride = batch * ncols;  // distance between consecutive column rows k
  const index_t plane = g.H * g.W;
  const index_t taps = g.kh * g.kw;
  const index_t total = g.C * k_stride;
  const index_t step = static_cast<index_t>(blockDim.x) * static_cast<index_t>(gridDim.x);
  for (index_t e = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += step) {
    const index_t ow = e % g.OW;
    index_t t = e / g.OW;
    const index_t r = t % rows;
    t /= rows;
    const index_t b = t % batch;
    const index_t c = t / batch;
    const index_t ih0 = (oh0 + r) * g.sh - g.ph;
    const index_t iw0 = ow * g.sw - g.pw;
    const scalar_t* xp = x + (b * g.C + c) * plane;
    scalar_t* cp = col + c * taps * k_stride + b * ncols + r * g.OW + ow;
    for (index_t i = 0; i < g.kh; ++i) {
      const index_t ih = ih0 + i * g.dh;
      const bool row_in = ih >= 0 && ih < g.H;
      for (index_t j = 0; j < g.kw; ++j) {
        const index_t iw = iw0 + j * g.dw;
        *cp = (row_in && iw >= 0 && iw < g.W) ? xp[ih * g.W + iw] : scalar_t(0);
        cp += k_stride;
      }
    }
  }
}

// NHWC im2col: one thread per (output position, input channel), channel fastest, so a warp
// reads 32 consecutive channels of one input pixel and writes 32 consecutive column entries
// (within a group) per tap. Memory-bound like the NCHW kernel.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads) conv2d_im2col_nhwc_kernel(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ col, const Geom<index_t> g,
    const index_t batch, const index_t oh0, const index_t rows) {
  const index_t ncols = rows * g.OW;
  const index_t image = g.H * g.W * g.C;
  const index_t total = batch * ncols * g.C;
  const index_t step = static_cast<index_t>(blockDim.x) * static_cast<index_t>(gridDim.x);
  for (index_t e = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += step) {
    const index_t c = e % g.C;
    const index_t row = e / g.C;  // b * ncols + r * OW + ow
    const index_t ow = row % g.OW;
    const index_t t = row / g.OW;
    const index_t r = t % rows;
    const index_t b = t / rows;
    const index_t grp = c / g.Cg;
    const index_t cg = c - grp * g.Cg;
    const index_t ih0 = (oh0 + r) * g.sh - g.ph;
    const index_t iw0 = ow * g.sw - g.pw;
    const scalar_t* xp = x + b * image + c;
    scalar_t* cp = col + row * g.K + grp * g.Kg + cg;
    for (index_t i = 0; i < g.kh; ++i) {
      const index_t ih = ih0 + i * g.dh;
      const bool row_in = ih >= 0 && ih < g.H;
      for (index_t j = 0; j < g.kw; ++j) {
        const index_t iw = iw0 + j * g.dw;
        *cp = (row_in && iw >= 0 && iw < g.W) ? xp[(ih * g.W + iw) * g.C] : scalar_t(0);
        cp += g.Cg;
      }
    }
  }
}

// NCHW gather col2im: grad_input rows [ih0, ih0 + in_rows) of `batch` images (gi points at
// the first image) from a column chunk holding output rows [oh0, oh0 + out_rows) in the NCHW
// column layout. One thread per grad_input element, iw fastest: it visits the kH * kW taps, keeps
// those whose output position o = (i + p - t * d) / s is integral and inside the chunk, and
// writes the sum once (every element is written, so no zero-fill is needed). Reads are
// coalesced for stride 1; the kernel is memory-bound on the column reads (K * B * P elements).
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads) conv2d_col2im_nchw_kernel(
    const scalar_t* __restrict__ col, scalar_t* __restrict__ gi, const Geom<index_t> g,
    const index_t batch, const index_t ih0, const index_t in_rows, const index_t oh0,
    const index_t out_rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t ncols = out_rows * g.OW;
  const index_t k_stride = batch * ncols;
  const index_t taps = g.kh * g.kw;
  const index_t total = batch * g.C * in_rows * g.W;
  const index_t step = static_cast<index_t>(blockDim.x) * static_cast<index_t>(gridDim.x);
  for (index_t e = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += step) {
    const index_t iw = e % g.W;
    index_t t = e / g.W;
    const index_t rr = t % in_rows;
    t /= in_rows;
    const index_t c = t % g.C;
    const index_t b = t / g.C;
    const index_t ih = ih0 + rr;
    acc_t sum = acc_t(0);
    for (index_t i = 0; i < g.kh; ++i) {
      const index_t nh = ih + g.ph - i * g.dh;
      if (nh < 0) break;  // nh only decreases with i
      if (nh % g.sh != 0) continue;
      const index_t lr = nh / g.sh - oh0;
      if (lr < 0 || lr >= out_rows) continue;
      for (index_t j = 0; j < g.kw; ++j) {
        const index_t nw = iw + g.pw - j * g.dw;
        if (nw < 0) break;
        if (nw % g.sw != 0) continue;
        const index_t ow = nw / g.sw;
        if (ow >= g.OW) continue;
        sum += static_cast<acc_t>(
            col[(c * taps + i * g.kw + j) * k_stride + b * ncols + lr * g.OW + ow]);
      }
    }
    gi[((b * g.C + c) * g.H + ih) * g.W + iw] = static_cast<scalar_t>(sum);
  }
}

// NHWC gather col2im: like the NCHW kernel with channel fastest (coalesced column reads and
// grad_input writes across the warp).
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads) conv2d_col2im_nhwc_kernel(
    const scalar_t* __restrict__ col, scalar_t* __restrict__ gi, const Geom<index_t> g,
    const index_t batch, const index_t ih0, const index_t in_rows, const index_t oh0,
    const index_t out_rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t ncols = out_rows * g.OW;
  const index_t total = batch * in_rows * g.W * g.C;
  const index_t step = static_cast<index_t>(blockDim.x) * static_cast<index_t>(gridDim.x);
  for (index_t e = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += step) {
    const index_t c = e % g.C;
    index_t t = e / g.C;
    const index_t iw = t % g.W;
    t /= g.W;
    const index_t rr = t % in_rows;
    const index_t b = t / in_rows;
    const index_t grp = c / g.Cg;
    const index_t cg = c - grp * g.Cg;
    const index_t ih = ih0 + rr;
    const scalar_t* cb = col + b * ncols * g.K + grp * g.Kg + cg;
    acc_t sum = acc_t(0);
    for (index_t i = 0; i < g.kh; ++i) {
      const index_t nh = ih + g.ph - i * g.dh;
      if (nh < 0) break;
      if (nh % g.sh != 0) continue;
      const index_t lr = nh / g.sh - oh0;
      if (lr < 0 || lr >= out_rows) continue;
      for (index_t j = 0; j < g.kw; ++j) {
        const index_t nw = iw + g.pw - j * g.dw;
        if (nw < 0) break;
        if (nw % g.sw != 0) continue;
        const index_t ow = nw / g.sw;
        if (ow >= g.OW) continue;
        sum += static_cast<acc_t>(cb[(lr * g.OW + ow) * g.K + (i * g.kw + j) * g.Cg]);
      }
    }
    gi[((b * g.H + ih) * g.W + iw) * g.C + c] = static_cast<scalar_t>(sum);
  }
}

// ---------------------------------------------------------------------------------------------
// launchers
// ---------------------------------------------------------------------------------------------

// Writes the column matrix of output rows [oh0, oh0 + rows) of images [n0, n0 + batch) into
// `col` (at least K * batch * rows * OW elements) in the layout of the memory format.
void launch_im2col(const at::Tensor& x, const at::Tensor& col, const Conv2dShape& s, int64_t n0,
                   int64_t batch, int64_t oh0, int64_t rows, bool channels_last) {
  const int64_t image = s.in_channels * s.in_h * s.in_w;
  const int64_t ncols = rows * s.out_w;
  const int64_t col_elems = s.in_channels * s.kernel_h * s.kernel_w * batch * ncols;
  const int64_t threads_total = batch * ncols * s.in_channels;
  const bool use32 = fits_int32({batch * image, col_elems, s.out_h * s.stride_h + s.in_h,
                                 s.out_w * s.stride_w + s.in_w});
  const auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned int blocks = blocks_for(threads_total);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv2d_im2col", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>() + n0 * image;
    scalar_t* cp = col.mutable_data_ptr<scalar_t>();
    dispatch_index(use32, [&](auto tag) {
      using index_t = decltype(tag);
      const Geom<index_t> g = make_geom<index_t>(s);
      if (channels_last) {
        conv2d_im2col_nhwc_kernel<scalar_t, index_t><<<blocks, kThreads, 0, stream>>>(
            xp, cp, g, static_cast<index_t>(batch), static_cast<index_t>(oh0),
            static_cast<index_t>(rows));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        conv2d_im2col_nchw_kernel<scalar_t, index_t><<<blocks, kThreads, 0, stream>>>(
            xp, cp, g, static_cast<index_t>(batch), static_cast<index_t>(oh0),
            static_cast<index_t>(rows));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

// Gathers grad_input rows [ih0, ih0 + in_rows) of images [n0, n0 + batch) from `col`, which
// holds output rows [oh0, oh0 + out_rows) of those images (out_rows may be 0: zeros).
void launch_col2im(const at::Tensor& col, const at::Tensor& gi, const Conv2dShape& s, int64_t n0,
                   int64_t batch, int64_t ih0, int64_t in_rows, int64_t oh0, int64_t out_rows,
                   bool channels_last) {
  const int64_t image = s.in_channels * s.in_h * s.in_w;
  const int64_t col_elems =
      s.in_channels * s.kernel_h * s.kernel_w * batch * out_rows * s.out_w;
  const int64_t threads_total = batch * s.in_channels * in_rows * s.in_w;
  const bool use32 = fits_int32({batch * image, col_elems, s.in_h + s.pad_h + s.out_h,
                                 s.in_w + s.pad_w + s.out_w});
  const auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned int blocks = blocks_for(threads_total);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gi.scalar_type(), "conv2d_col2im", [&] {
    const scalar_t* cp = col.const_data_ptr<scalar_t>();
    scalar_t* gp = gi.mutable_data_ptr<scalar_t>() + n0 * image;
    dispatch_index(use32, [&](auto tag) {
      using index_t = decltype(tag);
      const Geom<index_t> g = make_geom<index_t>(s);
      if (channels_last) {
        conv2d_col2im_nhwc_kernel<scalar_t, index_t><<<blocks, kThreads, 0, stream>>>(
            cp, gp, g, static_cast<index_t>(batch), static_cast<index_t>(ih0),
            static_cast<index_t>(in_rows), static_cast<index_t>(oh0),
            static_cast<index_t>(out_rows));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        conv2d_col2im_nchw_kernel<scalar_t, index_t><<<blocks, kThreads, 0, stream>>>(
            cp, gp, g, static_cast<index_t>(batch), static_cast<index_t>(ih0),
            static_cast<index_t>(in_rows), static_cast<index_t>(oh0),
            static_cast<index_t>(out_rows));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------
// chunk planning
// ---------------------------------------------------------------------------------------------

// Images [n0, n0 + batch), output rows [row0, row0 + rows); batch > 1 only with all rows.
struct OutChunk {
  int64_t n0, batch, row0, rows;
};

// Splits N x out_h into chunks costing at most kColumnWorkspaceBytes at `row_bytes` per output
// row of one image (never less than one row). Chunks of whole images are balanced in size.
std::vector<OutChunk> plan_out_chunks(const Conv2dShape& s, int64_t row_bytes) {
  std::vector<OutChunk> chunks;
  row_bytes = std::max<int64_t>(1, row_bytes);
  const int64_t image_bytes = row_bytes * s.out_h;
  if (image_bytes <= kColumnWorkspaceBytes) {
    const int64_t fit = std::max<int64_t>(1, kColumnWorkspaceBytes / image_bytes);
    const int64_t count = ceil_div(s.batch, std::min(fit, s.batch));
    const int64_t per = ceil_div(s.batch, count);
    for (int64_t n0 = 0; n0 < s.batch; n0 += per) {
      chunks.push_back({n0, std::min(per, s.batch - n0), 0, s.out_h});
    }
  } else {
    const int64_t rows = std::max<int64_t>(1, kColumnWorkspaceBytes / row_bytes);
    for (int64_t n0 = 0; n0 < s.batch; ++n0) {
      for (int64_t r0 = 0; r0 < s.out_h; r0 += rows) {
        chunks.push_back({n0, 1, r0, std::min(rows, s.out_h - r0)});
      }
    }
  }
  return chunks;
}

// grad_input rows [ih0, ih0 + in_rows) of images [n0, n0 + batch), computed from output rows
// [oh0, oh0 + out_rows): every output row that reaches one of those input rows.
struct InChunk {
  int64_t n0, batch, ih0, in_rows, oh0, out_rows;
};

std::vector<InChunk> plan_in_chunks(const Conv2dShape& s, int64_t row_bytes) {
  std::vector<InChunk> chunks;
  row_bytes = std::max<int64_t>(1, row_bytes);
  const int64_t image_bytes = row_bytes * s.out_h;
  if (image_bytes <= kColumnWorkspaceBytes) {
    for (const OutChunk& c : plan_out_chunks(s, row_bytes)) {
      chunks.push_back({c.n0, c.batch, 0, s.in_h, 0, s.out_h});
    }
    return chunks;
  }
  // Output rows reaching a band of R input rows: at most floor((R - 1 + (kH-1) dH) / sH) + 1.
  const int64_t max_out = std::max<int64_t>(1, kColumnWorkspaceBytes / row_bytes);
  const int64_t reach = (s.kernel_h - 1) * s.dil_h;
  const int64_t band = std::min(
      s.in_h, std::max<int64_t>(1, (max_out - 1) * s.stride_h - reach + 1));
  for (int64_t n0 = 0; n0 < s.batch; ++n0) {
    for (int64_t ih0 = 0; ih0 < s.in_h; ih0 += band) {
      const int64_t rows = std::min(band, s.in_h - ih0);
      const int64_t lo = ih0 + s.pad_h - reach;
      const int64_t oh_lo = lo <= 0 ? 0 : ceil_div(lo, s.stride_h);
      const int64_t oh_hi = std::min(s.out_h - 1, (ih0 + rows - 1 + s.pad_h) / s.stride_h);
      const int64_t out_rows = std::max<int64_t>(0, oh_hi - oh_lo + 1);
      chunks.push_back({n0, 1, ih0, rows, out_rows > 0 ? oh_lo : 0, out_rows});
    }
  }
  return chunks;
}

// ---------------------------------------------------------------------------------------------
// GEMM helpers (NCHW): dst[b, g] = a[g] @ src[b, g] (+ bias[g]) for 4-D views
// dst [B, G, M, Nn], a [G, M, Kd], src [B, G, Kd, Nn], bias [G, M, 1] or undefined.
// One batched GEMM over the groups for a single image, else one over the images per group
// (the weight operand broadcast with batch stride 0).
// ---------------------------------------------------------------------------------------------

void gemm_nchw(const at::Tensor& dst, const at::Tensor& a, const at::Tensor& src,
               const at::Tensor& bias) {
  const int64_t batch = dst.size(0);
  const int64_t groups = dst.size(1);
  if (batch == 1) {
    at::Tensor d = dst.select(0, 0);
    const at::Tensor sv = src.select(0, 0);
    if (bias.defined()) {
      at::baddbmm_out(d, bias, a, sv);
    } else {
      at::bmm_out(d, a, sv);
    }
    return;
  }
  for (int64_t g = 0; g < groups; ++g) {
    at::Tensor d = dst.select(1, g);
    const at::Tensor av = a.select(0, g).expand({batch, a.size(1), a.size(2)});
    const at::Tensor sv = src.select(1, g);
    if (bias.defined()) {
      at::baddbmm_out(d, bias.select(0, g).unsqueeze(0), av, sv);
    } else {
      at::bmm_out(d, av, sv);
    }
  }
}

bool is_pointwise(const Conv2dShape& s) {
  return s.kernel_h == 1 && s.kernel_w == 1 && s.stride_h == 1 && s.stride_w == 1 &&
      s.pad_h == 0 && s.pad_w == 0;
}

struct Dims {
  int64_t N, C, O, G, Cg, Og, Kg, K, P, OW;
  explicit Dims(const Conv2dShape& s)
      : N(s.batch),
        C(s.in_channels),
        O(s.out_channels),
        G(s.groups),
        Cg(s.in_channels / s.groups),
        Og(s.out_channels / s.groups),
        Kg(s.in_channels / s.groups * s.kernel_h * s.kernel_w),
        K(s.in_channels * s.kernel_h * s.kernel_w),
        P(s.out_h * s.out_w),
        OW(s.out_w) {}
};

// A [rows, cols] channels_last view of a 4-D channels_last tensor: one row per pixel.
at::Tensor pixel_rows(const at::Tensor& t) {
  return t.permute({0, 2, 3, 1}).view({t.size(0) * t.size(2) * t.size(3), t.size(1)});
}

// The weight as [G, Og, kH * kW * Cg] in the NHWC column order (kh, kw, c).
at::Tensor weight_nhwc(const at::Tensor& weight, const Dims& d) {
  return weight.permute({0, 2, 3, 1}).contiguous().reshape({d.G, d.Og, d.Kg});
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------

void im2col_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                    at::Tensor& out, const Conv2dShape& s, bool channels_last) {
  const Dims d(s);
  const bool pointwise = is_pointwise(s);
  const std::vector<OutChunk> chunks = plan_out_chunks(s, d.K * d.OW * x.element_size());
  at::Tensor col;
  if (!pointwise) {
    int64_t most = 0;
    for (const OutChunk& c : chunks) most = std::max(most, d.K * c.batch * c.rows * d.OW);
    col = at::empty({most}, x.options());
  }

  if (channels_last) {
    const at::Tensor w3t = weight_nhwc(weight, d).transpose(1, 2);  // [G, Kg, Og]
    const at::Tensor b3 = bias.defined() ? bias.view({d.G, 1, d.Og}) : at::Tensor();
    const at::Tensor out2 = pixel_rows(out);                         // [N * P, O]
    const at::Tensor x2 = pointwise ? pixel_rows(x) : at::Tensor();  // [N * H * W, C]
    for (const OutChunk& c : chunks) {
      const int64_t row0 = c.n0 * d.P + c.row0 * d.OW;
      const int64_t m = c.batch * c.rows * d.OW;
      at::Tensor src;  // [m, K]
      if (pointwise) {
        src = x2.narrow(0, row0, m);
      } else {
        src = col.narrow(0, 0, m * d.K).view({m, d.K});
        launch_im2col(x, src, s, c.n0, c.batch, c.row0, c.rows, true);
      }
      at::Tensor dst = out2.narrow(0, row0, m).view({m, d.G, d.Og}).permute({1, 0, 2});
      const at::Tensor s3 = src.view({m, d.G, d.Kg}).permute({1, 0, 2});  // [G, m, Kg]
      if (b3.defined()) {
        at::baddbmm_out(dst, b3, s3, w3t);
      } else {
        at::bmm_out(dst, s3, w3t);
      }
    }
    return;
  }

  const at::Tensor w3 = weight.contiguous().view({d.G, d.Og, d.Kg});
  const at::Tensor b3 = bias.defined() ? bias.view({d.G, d.Og, 1}) : at::Tensor();
  const at::Tensor out4 = out.view({d.N, d.G, d.Og, d.P});
  const at::Tensor x4 = pointwise ? x.view({d.N, d.G, d.Cg, d.P}) : at::Tensor();
  for (const OutChunk& c : chunks) {
    const int64_t p0 = c.row0 * d.OW;
    const int64_t pc = c.rows * d.OW;
    at::Tensor src;  // [B, G, Kg, pc]
    if (pointwise) {
      src = x4.narrow(0, c.n0, c.batch).narrow(3, p0, pc);
    } else {
      const at::Tensor cc = col.narrow(0, 0, d.K * c.batch * pc);
      launch_im2col(x, cc, s, c.n0, c.batch, c.row0, c.rows, false);
      src = cc.view({d.G, d.Kg, c.batch, pc}).permute({2, 0, 1, 3});
    }
    gemm_nchw(out4.narrow(0, c.n0, c.batch).narrow(3, p0, pc), w3, src, b3);
  }
}

// ---------------------------------------------------------------------------------------------
// grad_input
// ---------------------------------------------------------------------------------------------

void im2col_grad_input(const at::Tensor& go, const at::Tensor& weight, at::Tensor& gi,
                       const Conv2dShape& s, bool channels_last) {
  const Dims d(s);
  const int64_t row_bytes = d.K * d.OW * go.element_size();

  if (channels_last) {
    const at::Tensor w3 = weight_nhwc(weight, d);  // [G, Og, Kg]
    const at::Tensor go2 = pixel_rows(go);         // [N * P, O]
    if (is_pointwise(s)) {
      // grad_input pixels are output pixels: one GEMM per chunk straight into grad_input.
      const at::Tensor gi2 = pixel_rows(gi);
      for (const OutChunk& c : plan_out_chunks(s, row_bytes)) {
        const int64_t row0 = c.n0 * d.P + c.row0 * d.OW;
        const int64_t m = c.batch * c.rows * d.OW;
        at::Tensor dst = gi2.narrow(0, row0, m).view({m, d.G, d.Cg}).permute({1, 0, 2});
        at::bmm_out(dst, go2.narrow(0, row0, m).view({m, d.G, d.Og}).permute({1, 0, 2}), w3);
      }
      return;
    }
    const std::vector<InChunk> chunks = plan_in_chunks(s, row_bytes);
    int64_t most = 1;
    for (const InChunk& c : chunks) most = std::max(most, d.K * c.batch * c.out_rows * d.OW);
    const at::Tensor col = at::empty({most}, go.options());
    for (const InChunk& c : chunks) {
      const int64_t m = c.batch * c.out_rows * d.OW;
      if (m > 0) {
        const int64_t row0 = c.n0 * d.P + c.oh0 * d.OW;
        at::Tensor dst = col.narrow(0, 0, m * d.K).view({m, d.G, d.Kg}).permute({1, 0, 2});
        at::bmm_out(dst, go2.narrow(0, row0, m).view({m, d.G, d.Og}).permute({1, 0, 2}), w3);
      }
      launch_col2im(col, gi, s, c.n0, c.batch, c.ih0, c.in_rows, c.oh0, c.out_rows, true);
    }
    return;
  }

  const at::Tensor w3t = weight.contiguous().view({d.G, d.Og, d.Kg}).transpose(1, 2);
  const at::Tensor go4 = go.view({d.N, d.G, d.Og, d.P});
  if (is_pointwise(s)) {
    const at::Tensor gi4 = gi.view({d.N, d.G, d.Cg, d.P});
    for (const OutChunk& c : plan_out_chunks(s, row_bytes)) {
      const int64_t p0 = c.row0 * d.OW;
      const int64_t pc = c.rows * d.OW;
      gemm_nchw(gi4.narrow(0, c.n0, c.batch).narrow(3, p0, pc), w3t,
                go4.narrow(0, c.n0, c.batch).narrow(3, p0, pc), at::Tensor());
    }
    return;
  }
  const std::vector<InChunk> chunks = plan_in_chunks(s, row_bytes);
  int64_t most = 1;
  for (const InChunk& c : chunks) most = std::max(most, d.K * c.batch * c.out_rows * d.OW);
  const at::Tensor col = at::empty({most}, go.options());
  for (const InChunk& c : chunks) {
    const int64_t pc = c.out_rows * d.OW;
    if (pc > 0) {
      const at::Tensor dst =
          col.narrow(0, 0, d.K * c.batch * pc).view({d.G, d.Kg, c.batch, pc}).permute({2, 0, 1, 3});
      gemm_nchw(dst, w3t, go4.narrow(0, c.n0, c.batch).narrow(3, c.oh0 * d.OW, pc),
                at::Tensor());
    }
    launch_col2im(col, gi, s, c.n0, c.batch, c.ih0, c.in_rows, c.oh0, c.out_rows, false);
  }
}

// ---------------------------------------------------------------------------------------------
// grad_weight
// ---------------------------------------------------------------------------------------------

void im2col_grad_weight(const at::Tensor& go, const at::Tensor& x, at::Tensor& gw,
                        const Conv2dShape& s, bool channels_last) {
  const Dims d(s);
  const bool pointwise = is_pointwise(s);
  const int64_t es = x.element_size();
  bool first = true;
  // gw3 (+)= a @ b for this chunk: the first chunk overwrites, later ones accumulate.
  auto accumulate = [&first](at::Tensor& gw3, const at::Tensor& a, const at::Tensor& b) {
    if (first) {
      at::bmm_out(gw3, a, b);
    } else {
      gw3.baddbmm_(a, b);
    }
    first = false;
  };

  if (channels_last) {
    const std::vector<OutChunk> chunks = plan_out_chunks(s, d.K * d.OW * es);
    at::Tensor col;
    if (!pointwise) {
      int64_t most = 0;
      for (const OutChunk& c : chunks) most = std::max(most, d.K * c.batch * c.rows * d.OW);
      col = at::empty({most}, x.options());
    }
    // Accumulated in the column order (kh, kw, c), permuted to NCHW once at the end.
    const at::Tensor gwr = at::empty({d.O, s.kernel_h, s.kernel_w, d.Cg}, gw.options());
    at::Tensor gw3 = gwr.view({d.G, d.Og, d.Kg});
    const at::Tensor go2 = pixel_rows(go);
    const at::Tensor x2 = pointwise ? pixel_rows(x) : at::Tensor();
    for (const OutChunk& c : chunks) {
      const int64_t row0 = c.n0 * d.P + c.row0 * d.OW;
      const int64_t m = c.batch * c.rows * d.OW;
      at::Tensor src;  // [m, K]
      if (pointwise) {
        src = x2.narrow(0, row0, m);
      } else {
        src = col.narrow(0, 0, m * d.K).view({m, d.K});
        launch_im2col(x, src, s, c.n0, c.batch, c.row0, c.rows, true);
      }
      accumulate(gw3, go2.narrow(0, row0, m).view({m, d.G, d.Og}).permute({1, 2, 0}),
                 src.view({m, d.G, d.Kg}).permute({1, 0, 2}));
    }
    gw.copy_(gwr.permute({0, 3, 1, 2}));
    return;
  }

  // NCHW: the sum over a chunk's images needs grad_output as [G, Og, B * pc] (one transposing
  // copy per chunk, counted in the workspace); the column matrix is already [G, Kg, B * pc].
  const std::vector<OutChunk> chunks = plan_out_chunks(s, (d.K + d.O) * d.OW * es);
  int64_t col_most = 0;
  int64_t got_most = 0;
  for (const OutChunk& c : chunks) {
    if (c.batch > 1 || !pointwise) col_most = std::max(col_most, d.K * c.batch * c.rows * d.OW);
    if (c.batch > 1) got_most = std::max(got_most, d.O * c.batch * c.rows * d.OW);
  }
  const at::Tensor col = col_most > 0 ? at::empty({col_most}, x.options()) : at::Tensor();
  const at::Tensor got = got_most > 0 ? at::empty({got_most}, go.options()) : at::Tensor();
  at::Tensor gw3 = gw.view({d.G, d.Og, d.Kg});
  const at::Tensor go4 = go.view({d.N, d.G, d.Og, d.P});
  const at::Tensor x4 = pointwise ? x.view({d.N, d.G, d.Cg, d.P}) : at::Tensor();
  for (const OutChunk& c : chunks) {
    const int64_t p0 = c.row0 * d.OW;
    const int64_t pc = c.rows * d.OW;
    const int64_t cols = c.batch * pc;
    at::Tensor a;  // [G, Og, B * pc]
    at::Tensor b;  // [G, B * pc, Kg]
    if (c.batch == 1) {
      a = go4.select(0, c.n0).narrow(2, p0, pc);
    } else {
      at::Tensor t = got.narrow(0, 0, d.O * cols).view({d.G, d.Og, c.batch, pc});
      t.copy_(go4.narrow(0, c.n0, c.batch).permute({1, 2, 0, 3}));
      a = t.view({d.G, d.Og, cols});
    }
    if (pointwise && c.batch == 1) {
      b = x4.select(0, c.n0).narrow(2, p0, pc).transpose(1, 2);
    } else {
      const at::Tensor cc = col.narrow(0, 0, d.K * cols);
      launch_im2col(x, cc, s, c.n0, c.batch, c.row0, c.rows, false);
      b = cc.view({d.G, d.Kg, cols}).transpose(1, 2);
    }
    accumulate(gw3, a, b);
  }
}

}  // namespace conv2d_cuda
}  // namespace fastconv
