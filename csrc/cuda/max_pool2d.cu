// max_pool2d on CUDA: forward with indices "none" / "full" (int64 h * W + w per plane, torch's)
// / "compact" (uint8 window-local tap kh_i * kW + kw_i), and a gather backward that accepts
// either index format. NCHW and channels_last kernels.
//
// Semantics are torch's: a window starts at (oh * s - p, ow * s - p); taps outside the input
// are skipped, never read; the running max starts at -inf with the index of the first valid
// tap, and a tap replaces it when `val > max || isnan(val)` (ties keep the first max, the last
// NaN wins). Every kernel tracks the winning tap (th, tw) and derives both index formats from
// it, so "full" = (h0 + th * d_h) * W + (w0 + tw * d_w) and "compact" = th * kW + tw name the
// same element, and the backward decodes a compact index to that same flat value before
// comparing: the two formats give bitwise-equal gradients.
//
// Index widths: kernels are templated on the index type; 32-bit when every tensor is below
// 2^31 elements and every size / geometry parameter below 2^24 (which bounds every
// intermediate below 2^31), else 64-bit.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/NumericUtils.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/shape.h"

namespace fastconv {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kSmall = int64_t(1) << 24;
constexpr int64_t kInt32Limit = int64_t(std::numeric_limits<int32_t>::max());

enum IndexMode : int { kNoIndex = 0, kFullIndex = 1, kCompactIndex = 2 };

template <typename T>
using opmath_t = at::opmath_type<T>;

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename T>
C10_HOST_DEVICE inline T imin(T a, T b) {
  return a < b ? a : b;
}

struct PoolGeom {
  int64_t n, c, h, w, oh, ow;
  int64_t k_h, k_w, s_h, s_w, p_h, p_w, d_h, d_w;
  int64_t cv;     // channel vectors per pixel (channels_last forward)
  int64_t total;  // work items
};

// The window of output (oh, ow): origin (h0, w0), first valid tap (th0, tw0), exclusive ends.
template <typename index_t>
struct Window {
  index_t h0, w0, th0, tw0, hs, ws, hend, wend;
};

template <typename index_t>
__device__ __forceinline__ Window<index_t> pool_window(index_t oh, index_t ow, index_t H,
                                                       index_t W, index_t KH, index_t KW,
                                                       index_t SH, index_t SW, index_t PH,
                                                       index_t PW, index_t DH, index_t DW) {
  Window<index_t> r;
  r.h0 = oh * SH - PH;
  r.w0 = ow * SW - PW;
  r.hend = imin(r.h0 + (KH - 1) * DH + 1, H);
  r.wend = imin(r.w0 + (KW - 1) * DW + 1, W);
  // torch: while (hstart < 0) hstart += dilation
  r.th0 = r.h0 < 0 ? (-r.h0 + DH - 1) / DH : 0;
  r.tw0 = r.w0 < 0 ? (-r.w0 + DW - 1) / DW : 0;
  r.hs = r.h0 + r.th0 * DH;
  r.ws = r.w0 + r.tw0 * DW;
  return r;
}

// Forward, NCHW.
// Thread mapping: one output per thread, flat NCHW output index (ow fastest), grid-stride.
// Tiling: none; overlapping windows of neighbouring threads share lines through L1.
// Speed: DRAM-bound (one read of the input, one write of output + index) as long as the
// window taps hit L1; kH * kW loads per output.
template <typename scalar_t, typename index_t, int MODE>
__global__ void __launch_bounds__(kThreads) max_pool2d_nchw_kernel(
    const scalar_t* __restrict__ input, scalar_t* __restrict__ out, void* __restrict__ indices,
    const PoolGeom g) {
  using acc_t = opmath_t<scalar_t>;
  const index_t H = g.h, W = g.w, OH = g.oh, OW = g.ow;
  const index_t KH = g.k_h, KW = g.k_w, SH = g.s_h, SW = g.s_w;
  const index_t PH = g.p_h, PW = g.p_w, DH = g.d_h, DW = g.d_w;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < g.total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const index_t ii = index_t(i);
    const index_t ow = ii % OW;
    const index_t t = ii / OW;
    const index_t oh = t % OH;
    const index_t plane = t / OH;
    const Window<index_t> win = pool_window(oh, ow, H, W, KH, KW, SH, SW, PH, PW, DH, DW);
    const scalar_t* p = input + plane * H * W;
    acc_t best = -std::numeric_limits<acc_t>::infinity();
    index_t bth = win.th0, btw = win.tw0;
    index_t th = win.th0;
    for (index_t h = win.hs; h < win.hend; h += DH, ++th) {
      index_t tw = win.tw0;
      for (index_t w = win.ws; w < win.wend; w += DW, ++tw) {
        const acc_t v = static_cast<acc_t>(p[h * W + w]);
        if (v > best || at::_isnan(v)) {
          best = v;
          bth = th;
          btw = tw;
        }
      }
    }
    out[ii] = static_cast<scalar_t>(best);
    if constexpr (MODE == kFullIndex) {
      static_cast<int64_t*>(indices)[ii] =
          int64_t(win.h0 + bth * DH) * int64_t(W) + int64_t(win.w0 + btw * DW);
    } else if constexpr (MODE == kCompactIndex) {
      static_cast<uint8_t*>(indices)[ii] = static_cast<uint8_t>(bth * KW + btw);
    }
  }
}

// Forward, channels_last.
// Thread mapping: thread = (n, oh, ow, vector of V channels), channels fastest, so every tap
// is one contiguous 32 * V-channel read per warp (16-byte loads when V > 1: channel count a
// multiple of 16 / sizeof(scalar_t) and the input aligned). Each lane keeps its own max / tap.
// Speed: DRAM-bound like the NCHW kernel; the vector loads keep the load count per byte low.
template <typename scalar_t, typename index_t, int MODE, int V>
__global__ void __launch_bounds__(kThreads) max_pool2d_nhwc_kernel(
    const scalar_t* __restrict__ input, scalar_t* __restrict__ out, void* __restrict__ indices,
    const PoolGeom g) {
  using acc_t = opmath_t<scalar_t>;
  const index_t C = g.c, H = g.h, W = g.w, OH = g.oh, OW = g.ow, CV = g.cv;
  const index_t KH = g.k_h, KW = g.k_w, SH = g.s_h, SW = g.s_w;
  const index_t PH = g.p_h, PW = g.p_w, DH = g.d_h, DW = g.d_w;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < g.total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const index_t ii = index_t(i);
    const index_t cvi = ii % CV;
    index_t t = ii / CV;
    const index_t ow = t % OW;
    t /= OW;
    const index_t oh = t % OH;
    const index_t n = t / OH;
    const index_t c = cvi * V;
    const Window<index_t> win = pool_window(oh, ow, H, W, KH, KW, SH, SW, PH, PW, DH, DW);
    const scalar_t* p = input + n * H * W * C + c;
    acc_t best[V];
    index_t btap[V];
    const index_t tap0 = win.th0 * KW + win.tw0;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      best[j] = -std::numeric_limits<acc_t>::infinity();
      btap[j] = tap0;
    }
    index_t th = win.th0;
    for (index_t h = win.hs; h < win.hend; h += DH, ++th) {
      index_t tap = th * KW + win.tw0;
      for (index_t w = win.ws; w < win.wend; w += DW, ++tap) {
        const scalar_t* q = p + (h * W + w) * C;
        scalar_t vals[V];
        if constexpr (V == 1) {
          vals[0] = *q;
        } else {
          const Vec<scalar_t, V> vv = *reinterpret_cast<const Vec<scalar_t, V>*>(q);
#pragma unroll
          for (int j = 0; j < V; ++j) vals[j] = vv.v[j];
        }
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const acc_t v = static_cast<acc_t>(vals[j]);
          if (v > best[j] || at::_isnan(v)) {
            best[j] = v;
            btap[j] = tap;
          }
        }
      }
    }
    const index_t off = ((n * OH + oh) * OW + ow) * C + c;
    if constexpr (V == 1) {
      out[off] = static_cast<scalar_t>(best[0]);
    } else {
      Vec<scalar_t, V> ov;
#pragma unroll
      for (int j = 0; j < V; ++j) ov.v[j] = static_cast<scalar_t>(best[j]);
      *reinterpret_cast<Vec<scalar_t, V>*>(out + off) = ov;
    }
    if constexpr (MODE == kFullIndex) {
      int64_t* ip = static_cast<int64_t*>(indices) + off;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const index_t th_j = btap[j] / KW;
        const index_t tw_j = btap[j] - th_j * KW;
        ip[j] = int64_t(win.h0 + th_j * DH) * int64_t(W) + int64_t(win.w0 + tw_j * DW);
      }
    } else if constexpr (MODE == kCompactIndex) {
      uint8_t* ip = static_cast<uint8_t*>(indices) + off;
      if constexpr (V == 1) {
        ip[0] = static_cast<uint8_t>(btap[0]);
      } else {
        Vec<uint8_t, V> iv;
#pragma unroll
        for (int j = 0; j < V; ++j) iv.v[j] = static_cast<uint8_t>(btap[j]);
        *reinterpret_cast<Vec<uint8_t, V>*>(ip) = iv;
      }
    }
  }
}

// Whether the output at window origin (h0, w0) with stored index `idx` took its max from the
// input element whose flat in-plane index is `target`.
template <typename index_t, typename idx_t>
__device__ __forceinline__ bool index_hits(idx_t idx, int64_t target, index_t ph, index_t pw,
                                           index_t W, index_t KW, index_t SH, index_t SW,
                                           index_t PH, index_t PW, index_t DH, index_t DW) {
  if constexpr (std::is_same<idx_t, uint8_t>::value) {
    const index_t tap = index_t(idx);
    const index_t th = tap / KW;
    const index_t tw = tap - th * KW;
    return int64_t(ph * SH - PH + th * DH) * int64_t(W) + int64_t(pw * SW - PW + tw * DW) ==
        target;
  } else {
    return int64_t(idx) == target;
  }
}

// Backward, NCHW, as a gather.
// Thread mapping: one input element per thread, flat NCHW index (w fastest). It visits the
// outputs whose window range covers (h, w), in torch's order (ph, then pw), and adds the
// gradient of those whose index names (h, w). Every element is written once: no zero fill,
// no atomics.
// Speed: DRAM-bound (read grad_output + indices ~ (k / s)^2 times through L1, write grad_input).
template <typename scalar_t, typename index_t, typename idx_t>
__global__ void __launch_bounds__(kThreads) max_pool2d_backward_nchw_kernel(
    const scalar_t* __restrict__ grad_out, const idx_t* __restrict__ indices,
    scalar_t* __restrict__ grad_in, const PoolGeom g) {
  using acc_t = opmath_t<scalar_t>;
  const index_t H = g.h, W = g.w, OH = g.oh, OW = g.ow;
  const index_t KH = g.k_h, KW = g.k_w, SH = g.s_h, SW = g.s_w;
  const index_t PH = g.p_h, PW = g.p_w, DH = g.d_h, DW = g.d_w;
  const index_t ekh = (KH - 1) * DH + 1, ekw = (KW - 1) * DW + 1;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < g.total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const index_t ii = index_t(i);
    const index_t w = ii % W;
    const index_t t = ii / W;
    const index_t h = t % H;
    const index_t plane = t / H;
    const index_t ph_lo = h + PH < ekh ? 0 : (h + PH - ekh) / SH + 1;
    const index_t ph_hi = imin((h + PH) / SH + 1, OH);
    const index_t pw_lo = w + PW < ekw ? 0 : (w + PW - ekw) / SW + 1;
    const index_t pw_hi = imin((w + PW) / SW + 1, OW);
    const int64_t target = int64_t(h) * int64_t(W) + int64_t(w);
    const index_t base = plane * OH * OW;
    acc_t acc = acc_t(0);
    for (index_t ph = ph_lo; ph < ph_hi; ++ph) {
      for (index_t pw = pw_lo; pw < pw_hi; ++pw) {
        const index_t o = base + ph * OW + pw;
        if (index_hits<index_t, idx_t>(indices[o], target, ph, pw, W, KW, SH, SW, PH, PW, DH, DW)) {
          acc += static_cast<acc_t>(grad_out[o]);
        }
      }
    }
    grad_in[ii] = static_cast<scalar_t>(acc);
  }
}

// Backward, channels_last, as a gather.
// Thread mapping: one input element per thread, flat NHWC index (channels fastest), so the
// grad_output / index reads of a warp are contiguous runs of channels.
// Speed: DRAM-bound, as the NCHW kernel.
template <typename scalar_t, typename index_t, typename idx_t>
__global__ void __launch_bounds__(kThreads) max_pool2d_backward_nhwc_kernel(
    const scalar_t* __restrict__ grad_out, const idx_t* __restrict__ indices,
    scalar_t* __restrict__ grad_in, const PoolGeom g) {
  using acc_t = opmath_t<scalar_t>;
  const index_t C = g.c, H = g.h, W = g.w, OH = g.oh, OW = g.ow;
  const index_t KH = g.k_h, KW = g.k_w, SH = g.s_h, SW = g.s_w;
  const index_t PH = g.p_h, PW = g.p_w, DH = g.d_h, DW = g.d_w;
  const index_t ekh = (KH - 1) * DH + 1, ekw = (KW - 1) * DW + 1;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < g.total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const index_t ii = index_t(i);
    const index_t c = ii % C;
    index_t t = ii / C;
    const index_t w = t % W;
    t /= W;
    const index_t h = t % H;
    const index_t n = t / H;
    const index_t ph_lo = h + PH < ekh ? 0 : (h + PH - ekh) / SH + 1;
    const index_t ph_hi = imin((h + PH) / SH + 1, OH);
    const index_t pw_lo = w + PW < ekw ? 0 : (w + PW - ekw) / SW + 1;
    const index_t pw_hi = imin((w + PW) / SW + 1, OW);
    const int64_t target = int64_t(h) * int64_t(W) + int64_t(w);
    acc_t acc = acc_t(0);
    for (index_t ph = ph_lo; ph < ph_hi; ++ph) {
      for (index_t pw = pw_lo; pw < pw_hi; ++pw) {
        const index_t o = ((n * OH + ph) * OW + pw) * C + c;
        if (index_hits<index_t, idx_t>(indices[o], target, ph, pw, W, KW, SH, SW, PH, PW, DH, DW)) {
          acc += static_cast<acc_t>(grad_out[o]);
        }
      }
    }
    grad_in[ii] = static_cast<scalar_t>(acc);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

PoolGeom pool_geom(const Pool2dShape& s) {
  PoolGeom g;
  g.n = s.batch;
  g.c = s.channels;
  g.h = s.in_h;
  g.w = s.in_w;
  g.oh = s.out_h;
  g.ow = s.out_w;
  g.k_h = s.kernel_h;
  g.k_w = s.kernel_w;
  g.s_h = s.stride_h;
  g.s_w = s.stride_w;
  g.p_h = s.pad_h;
  g.p_w = s.pad_w;
  g.d_h = s.dil_h;
  g.d_w = s.dil_w;
  g.cv = s.channels;
  g.total = 0;
  return g;
}

bool pool_fits_int32(const Pool2dShape& s) {
  for (int64_t v : {s.batch, s.channels, s.in_h, s.in_w, s.out_h, s.out_w, s.kernel_h,
                    s.kernel_w, s.stride_h, s.stride_w, s.pad_h, s.pad_w, s.dil_h, s.dil_w}) {
    if (v >= kSmall) return false;
  }
  return s.batch * s.channels * s.in_h * s.in_w <= kInt32Limit &&
      s.batch * s.channels * s.out_h * s.out_w <= kInt32Limit;
}

unsigned grid_for_items(int64_t items) {
  const int64_t cap =
      int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  const int64_t blocks = ceil_div(items, int64_t(kThreads));
  return unsigned(blocks < 1 ? 1 : (blocks < cap ? blocks : cap));
}

template <typename scalar_t, typename index_t, int MODE>
void launch_pool_forward(const Pool2dShape& s, bool cl, const scalar_t* x, scalar_t* out,
                         void* idx) {
  PoolGeom g = pool_geom(s);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (!cl) {
    g.total = s.batch * s.channels * s.out_h * s.out_w;
    max_pool2d_nchw_kernel<scalar_t, index_t, MODE>
        <<<grid_for_items(g.total), kThreads, 0, stream>>>(x, out, idx, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  constexpr int VEC = int(16 / sizeof(scalar_t));
  // out and idx are fresh allocations (aligned); the input may be a view at any offset
  const bool vec = std::is_same<index_t, int32_t>::value && s.channels % VEC == 0 &&
      reinterpret_cast<uintptr_t>(x) % 16 == 0;
  g.cv = vec ? s.channels / VEC : s.channels;
  g.total = s.batch * s.out_h * s.out_w * g.cv;
  if constexpr (std::is_same<index_t, int32_t>::value) {  // 64-bit sizes: scalar kernel only
    if (vec) {
      max_pool2d_nhwc_kernel<scalar_t, index_t, MODE, VEC>
          <<<grid_for_items(g.total), kThreads, 0, stream>>>(x, out, idx, g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  max_pool2d_nhwc_kernel<scalar_t, index_t, MODE, 1>
      <<<grid_for_items(g.total), kThreads, 0, stream>>>(x, out, idx, g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int MODE>
void pool_forward_index_width(const Pool2dShape& s, bool cl, const scalar_t* x, scalar_t* out,
                              void* idx) {
  if (pool_fits_int32(s)) {
    launch_pool_forward<scalar_t, int32_t, MODE>(s, cl, x, out, idx);
  } else {
    launch_pool_forward<scalar_t, int64_t, MODE>(s, cl, x, out, idx);
  }
}

template <typename scalar_t, typename index_t, typename idx_t>
void launch_pool_backward(const Pool2dShape& s, bool cl, const scalar_t* go, const idx_t* idx,
                          scalar_t* gi) {
  PoolGeom g = pool_geom(s);
  g.total = s.batch * s.channels * s.in_h * s.in_w;
  auto stream = at::cuda::getCurrentCUDAStream();
  if (cl) {
    max_pool2d_backward_nhwc_kernel<scalar_t, index_t, idx_t>
        <<<grid_for_items(g.total), kThreads, 0, stream>>>(go, idx, gi, g);
  } else {
    max_pool2d_backward_nchw_kernel<scalar_t, index_t, idx_t>
        <<<grid_for_items(g.total), kThreads, 0, stream>>>(go, idx, gi, g);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The backward's own argument checks, worded as fastconv/_registrations.py's
// _check_pool_backward_args (checks.h has no pooling-backward helper yet).
void check_max_pool2d_backward_args(const char* op, const at::Tensor& grad_output,
                                    const at::Tensor& input, const at::Tensor& indices,
                                    const Pool2dShape& s, at::IntArrayRef kernel_size) {
  const std::vector<int64_t> out_shape = {s.batch, s.channels, s.out_h, s.out_w};
  TORCH_CHECK_VALUE(
      grad_output.sizes() == at::IntArrayRef(out_shape), op, ": expected grad_output of shape ",
      at::IntArrayRef(out_shape), ", but got ", grad_output.sizes());
  const auto it = indices.scalar_type();
  TORCH_CHECK_VALUE(
      (it == at::kLong || it == at::kByte) && indices.sizes() == at::IntArrayRef(out_shape), op,
      ": expected indices of shape ", at::IntArrayRef(out_shape),
      " with dtype int64 (or uint8 compact indices), but got shape ", indices.sizes(),
      " and dtype ", py_dtype(it), "; the forward must be called with indices='full' or 'compact' for a "
      "backward");
  TORCH_CHECK_VALUE(
      it != at::kByte || max_pool2d_compact_fits(s), op,
      ": uint8 (compact) indices need a window of at most 256 taps, but kernel_size is ",
      kernel_size);
  TORCH_CHECK(
      indices.device() == input.device(), op,
      ": expected indices to be on the same device as input (", input.device(), "), but got ",
      indices.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> max_pool2d_forward_cuda(
    const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode,
    c10::string_view indices) {
  constexpr const char* op = "max_pool2d";
  const PoolIndices mode = parse_pool_indices(op, indices);
  check_dtype(op, "input", input);
  const Pool2dShape s =
      check_max_pool2d_shapes(op, input.sizes(), kernel_size, stride, padding, dilation, ceil_mode);
  // a single tensor argument: nothing to compare devices with
  c10::cuda::CUDAGuard guard(input.device());
  const at::MemoryFormat fmt = input.suggest_memory_format();
  const std::vector<int64_t> out_shape = {s.batch, s.channels, s.out_h, s.out_w};
  at::Tensor out = at::empty(out_shape, input.options().memory_format(fmt));
  const bool compact = mode == PoolIndices::kCompact && max_pool2d_compact_fits(s);
  at::Tensor idx = mode == PoolIndices::kNone
      ? at::empty({0}, input.options().dtype(at::kLong))
      : at::empty(out_shape,
                  input.options().dtype(compact ? at::kByte : at::kLong).memory_format(fmt));
  if (out.numel() == 0) return {out, idx};
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = input.contiguous(fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "max_pool2d_cuda", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    if (mode == PoolIndices::kNone) {
      pool_forward_index_width<scalar_t, kNoIndex>(s, cl, xp, outp, nullptr);
    } else if (compact) {
      pool_forward_index_width<scalar_t, kCompactIndex>(s, cl, xp, outp, idx.data_ptr());
    } else {
      pool_forward_index_width<scalar_t, kFullIndex>(s, cl, xp, outp, idx.data_ptr());
    }
  });
  return {out, idx};
}

at::Tensor max_pool2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& indices,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, bool ceil_mode) {
  constexpr const char* op = "_max_pool2d_backward";
  check_dtype(op, "input", input);
  // same dtype and device for grad_output and input; indices' device below
  check_same(op, "grad_output", grad_output, "input", input);
  const Pool2dShape s =
      check_max_pool2d_shapes(op, input.sizes(), kernel_size, stride, padding, dilation, ceil_mode);
  check_max_pool2d_backward_args(op, grad_output, input, indices, s, kernel_size);
  c10::cuda::CUDAGuard guard(input.device());
  const at::MemoryFormat fmt = input.suggest_memory_format();
  at::Tensor grad_input = at::empty(input.sizes(), input.options().memory_format(fmt));
  if (grad_input.numel() == 0) return grad_input;
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor go = grad_output.contiguous(fmt);
  const at::Tensor idx = indices.contiguous(fmt);
  const bool i32 = pool_fits_int32(s);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(),
                                  "max_pool2d_backward_cuda", [&] {
    const scalar_t* gp = go.data_ptr<scalar_t>();
    scalar_t* gip = grad_input.data_ptr<scalar_t>();
    if (idx.scalar_type() == at::kByte) {
      const uint8_t* ip = idx.data_ptr<uint8_t>();
      i32 ? launch_pool_backward<scalar_t, int32_t, uint8_t>(s, cl, gp, ip, gip)
          : launch_pool_backward<scalar_t, int64_t, uint8_t>(s, cl, gp, ip, gip);
    } else {
      const int64_t* ip = idx.data_ptr<int64_t>();
      i32 ? launch_pool_backward<scalar_t, int32_t, int64_t>(s, cl, gp, ip, gip)
          : launch_pool_backward<scalar_t, int64_t, int64_t>(s, cl, gp, ip, gip);
    }
  });
  return grad_input;
}

TORCH_LIBRARY_IMPL(fastconv, CUDA, m) {
  m.impl("max_pool2d", &max_pool2d_forward_cuda);
  m.impl("_max_pool2d_backward", &max_pool2d_backward_cuda);
}

}  // namespace fastconv
