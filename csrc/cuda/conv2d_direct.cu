// conv2d "direct" kernels: no column buffer. Meant for small reductions per output element
// (few channels per group x taps, the algo="auto" rule), where im2col's K-sized column matrix
// costs more memory traffic than the arithmetic it feeds.
//
// Every kernel reads and writes through the tensors' strides, so NCHW and channels_last share
// them; the memory format only picks the order in which a block stages a tile (the coalesced
// one). Accumulation is in at::opmath_type (float for half/bfloat16, double for double).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>

#include "common/shape.h"
#include "cuda/conv2d.cuh"

namespace fastconv {
namespace conv2d_cuda {
namespace {

constexpr int kDirectThreads = 128;
constexpr int kMaxRowsPerThread = 4;
constexpr int kOcPerBlock = 8;         // forward: output channels per block (each thread has all)
constexpr int kIcPerBlock = 8;         // grad_input: input channels per block
constexpr int kMaxStageChannels = 32;  // channels staged in shared memory per step
constexpr int64_t kSmemBudget = 48 * 1024;  // the default dynamic limit: no opt-in needed

constexpr int kGwThreads = 256;
constexpr int kGwOc = 4;     // grad_weight: output channels per block
constexpr int kGwElems = 8;  // grad_weight: (c, kh, kw) weight elements per block
constexpr int64_t kGwTargetBlocks = 1024;       // fixed (device-independent summation order)
constexpr int64_t kGwMinPositionsPerSplit = 4096;

constexpr int kSimpleThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 22;  // block-/grid-stride loops cover the rest

unsigned int grid_for(int64_t blocks) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(blocks, kMaxBlocks)));
}

template <typename F>
void dispatch_index(bool use32, const F& f) {
  if (use32) {
    f(int32_t{0});
  } else {
    f(int64_t{0});
  }
}

template <typename index_t>
C10_DEVICE inline index_t floor_div(index_t a, index_t b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

template <typename T>
C10_DEVICE inline T dmin(T a, T b) {
  return a < b ? a : b;
}

// Sizes and strides of one call. xs: strides of the input-sized tensor (input or grad_input),
// ys: strides of the output-sized tensor (output or grad_output), both in logical NCHW order.
template <typename index_t>
struct DirectGeom {
  index_t C, H, W, O, OH, OW;
  index_t kh, kw, sh, sw, ph, pw, dh, dw;
  index_t G, Cg, Og;
  index_t xs[4];
  index_t ys[4];
};

template <typename index_t>
DirectGeom<index_t> make_direct_geom(const Conv2dShape& s, const at::Tensor& in_like,
                                     const at::Tensor& out_like) {
  DirectGeom<index_t> g;
  g.C = static_cast<index_t>(s.in_channels);
  g.H = static_cast<index_t>(s.in_h);
  g.W = static_cast<index_t>(s.in_w);
  g.O = static_cast<index_t>(s.out_channels);
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
  g.G = static_cast<index_t>(s.groups);
  g.Cg = static_cast<index_t>(s.in_channels / s.groups);
  g.Og = static_cast<index_t>(s.out_channels / s.groups);
  for (int d = 0; d < 4; ++d) {
    g.xs[d] = static_cast<index_t>(in_like.stride(d));
    g.ys[d] = static_cast<index_t>(out_like.stride(d));
  }
  return g;
}

// Tiling of the forward / grad_input kernels: 128 threads as tile_w x thr_h, each thread owns
// `rpt` rows (thr_h apart) of one column of the tile and a block of 8 channels.
struct DirectTile {
  int tile_w, thr_h, rpt, tile_h;
  int in_h, in_w;  // the staged region (forward: input + halo; grad_input: grad_output rows)
  int stage_c;     // channels staged per step
  int64_t tiles_w, tiles_h, c_blocks, total_blocks;
  bool channels_last;
  int64_t bytes;   // dynamic shared memory per block
};

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------

// Block = (image n, group, block of 8 output channels, tile of tile_h x tile_w outputs).
// Per step it stages `stage_c` input channels of the tile's receptive field (halo included,
// zero outside the image) and their 8 x kH x kW weights in shared memory (converted to the
// accumulation type once), then every thread accumulates rpt x 8 outputs in registers: per tap
// 8 broadcast weight reads + rpt input reads feed 8 * rpt FMAs. Bound by shared-memory
// bandwidth for tiny channel counts, by FMA throughput once stage_c x taps is large; global
// traffic is ~1 read of the input per 8 output channels.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kDirectThreads) conv2d_direct_forward_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
    const scalar_t* __restrict__ bias, scalar_t* __restrict__ y, const DirectGeom<index_t> g,
    const DirectTile t) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char conv2d_direct_fwd_smem[];
  acc_t* in_s = reinterpret_cast<acc_t*>(conv2d_direct_fwd_smem);
  const int in_plane = t.in_h * t.in_w;
  acc_t* w_s = in_s + t.stage_c * in_plane;  // [(c, kh, kw)][kOcPerBlock]
  const int kh = static_cast<int>(g.kh);
  const int kw = static_cast<int>(g.kw);
  const int taps = kh * kw;
  const int sh = static_cast<int>(g.sh);
  const int sw = static_cast<int>(g.sw);
  const int dh = static_cast<int>(g.dh);
  const int dw = static_cast<int>(g.dw);
  const int tx = static_cast<int>(threadIdx.x) % t.tile_w;
  const int ty = static_cast<int>(threadIdx.x) / t.tile_w;
  const int q_step = t.thr_h * sh * t.in_w;  // smem distance between a thread's rows

  for (int64_t blk = blockIdx.x; blk < t.total_blocks; blk += gridDim.x) {
    int64_t r = blk;
    const int64_t cb = r % t.c_blocks;
    r /= t.c_blocks;
    const int64_t tile_x = r % t.tiles_w;
    r /= t.tiles_w;
    const int64_t tile_y = r % t.tiles_h;
    r /= t.tiles_h;
    const index_t grp = static_cast<index_t>(r % g.G);
    const index_t n = static_cast<index_t>(r / g.G);
    const index_t oc0 = static_cast<index_t>(cb) * kOcPerBlock;  // first channel, in group
    const int oc_n = static_cast<int>(dmin<index_t>(kOcPerBlock, g.Og - oc0));
    const index_t oh0 = static_cast<index_t>(tile_y) * t.tile_h;
    const index_t ow0 = static_cast<index_t>(tile_x) * t.tile_w;
    const index_t ih_base = oh0 * g.sh - g.ph;
    const index_t iw_base = ow0 * g.sw - g.pw;
    const scalar_t* xn = x + n * g.xs[0];
    const scalar_t* wg = w + (grp * g.Og + oc0) * g.Cg * taps;

    acc_t acc[kMaxRowsPerThread][kOcPerBlock];
#pragma unroll
    for (int q = 0; q < kMaxRowsPerThread; ++q) {
#pragma unroll
      for (int oc = 0; oc < kOcPerBlock; ++oc) acc[q][oc] = acc_t(0);
    }

    for (index_t c0 = 0; c0 < g.Cg; c0 += t.stage_c) {
      const int cn = static_cast<int>(dmin<index_t>(t.stage_c, g.Cg - c0));
      __syncthreads();  // the previous step's (or block's) reads are done
      const int in_elems = cn * in_plane;
      for (int e = threadIdx.x; e < in_elems; e += kDirectThreads) {
        int cc, rr, col;
        if (t.channels_last) {  // channel fastest: consecutive threads read consecutive memory
          cc = e % cn;
          const int q = e / cn;
          col = q % t.in_w;
          rr = q / t.in_w;
        } else {
          col = e % t.in_w;
          const int q = e / t.in_w;
          rr = q % t.in_h;
          cc = q / t.in_h;
        }
        const index_t ih = ih_base + rr;
        const index_t iw = iw_base + col;
        acc_t v = acc_t(0);
        if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) {
          const index_t c = grp * g.Cg + c0 + cc;
          v = static_cast<acc_t>(xn[c * g.xs[1] + ih * g.xs[2] + iw * g.xs[3]]);
        }
        in_s[cc * in_plane + rr * t.in_w + col] = v;
      }
      const int ct_n = cn * taps;
      for (int e = threadIdx.x; e < ct_n * kOcPerBlock; e += kDirectThreads) {
        const int ct = e % ct_n;  // (c, kh, kw) within the step: contiguous in the weight
        const int oc = e / ct_n;
        acc_t v = acc_t(0);
        if (oc < oc_n) v = static_cast<acc_t>(wg[(oc * g.Cg + c0) * taps + ct]);
        w_s[ct * kOcPerBlock + oc] = v;
      }
      __syncthreads();

      for (int cc = 0; cc < cn; ++cc) {
        for (int i = 0; i < kh; ++i) {
          const acc_t* in_row = in_s + cc * in_plane + (ty * sh + i * dh) * t.in_w + tx * sw;
          const acc_t* w_row = w_s + (cc * taps + i * kw) * kOcPerBlock;
          for (int j = 0; j < kw; ++j) {
            acc_t wv[kOcPerBlock];
#pragma unroll
            for (int oc = 0; oc < kOcPerBlock; ++oc) wv[oc] = w_row[j * kOcPerBlock + oc];
#pragma unroll
            for (int q = 0; q < kMaxRowsPerThread; ++q) {
              if (q < t.rpt) {
                const acc_t v = in_row[q * q_step + j * dw];
#pragma unroll
                for (int oc = 0; oc < kOcPerBlock; ++oc) acc[q][oc] += v * wv[oc];
              }
            }
          }
        }
      }
    }

    const index_t ow = ow0 + tx;
#pragma unroll
    for (int q = 0; q < kMaxRowsPerThread; ++q) {
      const index_t oh = oh0 + ty + q * t.thr_h;
      if (q < t.rpt && oh < g.OH && ow < g.OW) {
#pragma unroll
        for (int oc = 0; oc < kOcPerBlock; ++oc) {
          if (oc < oc_n) {
            const index_t o = grp * g.Og + oc0 + oc;
            acc_t v = acc[q][oc];
            if (bias != nullptr) v += static_cast<acc_t>(bias[o]);
            y[n * g.ys[0] + o * g.ys[1] + oh * g.ys[2] + ow * g.ys[3]] = static_cast<scalar_t>(v);
          }
        }
      }
    }
  }
}

// Fallback when even the smallest tile's receptive field does not fit in shared memory (huge
// dilated kernels): one thread per output element, every tap read from global memory.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kSimpleThreads) conv2d_direct_forward_simple_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
    const scalar_t* __restrict__ bias, scalar_t* __restrict__ y, const DirectGeom<index_t> g,
    const index_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  // the element counter is 64-bit whatever index_t is: with up to kMaxBlocks blocks the stride
  // (2^30) would carry a 32-bit counter past INT32_MAX before it passed `total`
  const int64_t step = int64_t{blockDim.x} * gridDim.x;
  for (int64_t e64 = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; e64 < total; e64 += step) {
    const index_t e = static_cast<index_t>(e64);
    const index_t ow = e % g.OW;
    index_t r = e / g.OW;
    const index_t oh = r % g.OH;
    r /= g.OH;
    const index_t o = r % g.O;
    const index_t n = r / g.O;
    const index_t grp = o / g.Og;
    acc_t sum = bias != nullptr ? static_cast<acc_t>(bias[o]) : acc_t(0);
    const scalar_t* wo = w + o * g.Cg * g.kh * g.kw;
    for (index_t cg = 0; cg < g.Cg; ++cg) {
      const scalar_t* xc = x + n * g.xs[0] + (grp * g.Cg + cg) * g.xs[1];
      for (index_t i = 0; i < g.kh; ++i) {
        const index_t ih = oh * g.sh - g.ph + i * g.dh;
        if (ih < 0 || ih >= g.H) continue;
        for (index_t j = 0; j < g.kw; ++j) {
          const index_t iw = ow * g.sw - g.pw + j * g.dw;
          if (iw < 0 || iw >= g.W) continue;
          sum += static_cast<acc_t>(xc[ih * g.xs[2] + iw * g.xs[3]]) *
              static_cast<acc_t>(wo[(cg * g.kh + i) * g.kw + j]);
        }
      }
    }
    y[n * g.ys[0] + o * g.ys[1] + oh * g.ys[2] + ow * g.ys[3]] = static_cast<scalar_t>(sum);
  }
}

// ---------------------------------------------------------------------------------------------
// grad_input: the transposed direct kernel, gather form
// ---------------------------------------------------------------------------------------------

// Block = (image n, group, block of 8 input channels, tile of tile_h x tile_w grad_input
// positions). Per step it stages `stage_c` grad_output channels over the output rows/columns
// that reach the tile (o = (i + p - t * d) / s for the tile's i and every tap t; zero outside
// the output) and their weights [(oc, kh, kw)][8 input channels]. Each thread sums, for its
// rpt x 8 grad_input elements, the taps whose output position is integral (any stride, any
// dilation); nothing is scattered, so no atomics and each element is written once. Same bounds
// as the forward kernel.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kDirectThreads) conv2d_direct_grad_input_kernel(
    const scalar_t* __restrict__ go, const scalar_t* __restrict__ w, scalar_t* __restrict__ gi,
    const DirectGeom<index_t> g, const DirectTile t) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char conv2d_direct_gi_smem[];
  acc_t* go_s = reinterpret_cast<acc_t*>(conv2d_direct_gi_smem);
  const int go_plane = t.in_h * t.in_w;
  acc_t* w_s = go_s + t.stage_c * go_plane;  // [(oc, kh, kw)][kIcPerBlock]
  const int kh = static_cast<int>(g.kh);
  const int kw = static_cast<int>(g.kw);
  const int taps = kh * kw;
  const int tx = static_cast<int>(threadIdx.x) % t.tile_w;
  const int ty = static_cast<int>(threadIdx.x) / t.tile_w;

  for (int64_t blk = blockIdx.x; blk < t.total_blocks; blk += gridDim.x) {
    int64_t r = blk;
    const int64_t cb = r % t.c_blocks;
    r /= t.c_blocks;
    const int64_t tile_x = r % t.tiles_w;
    r /= t.tiles_w;
    const int64_t tile_y = r % t.tiles_h;
    r /= t.tiles_h;
    const index_t grp = static_cast<index_t>(r % g.G);
    const index_t n = static_cast<index_t>(r / g.G);
    const index_t ic0 = static_cast<index_t>(cb) * kIcPerBlock;  // first channel, in group
    const int ic_n = static_cast<int>(dmin<index_t>(kIcPerBlock, g.Cg - ic0));
    const index_t ih0 = static_cast<index_t>(tile_y) * t.tile_h;
    const index_t iw0 = static_cast<index_t>(tile_x) * t.tile_w;
    // First output row / column that can reach the tile (floor, may be negative: zero-filled).
    const index_t oh_lo = floor_div<index_t>(ih0 + g.ph - (g.kh - 1) * g.dh, g.sh);
    const index_t ow_lo = floor_div<index_t>(iw0 + g.pw - (g.kw - 1) * g.dw, g.sw);
    const scalar_t* gon = go + n * g.ys[0];
    const index_t iw = iw0 + tx;

    acc_t acc[kMaxRowsPerThread][kIcPerBlock];
#pragma unroll
    for (int q = 0; q < kMaxRowsPerThread; ++q) {
#pragma unroll
      for (int ic = 0; ic < kIcPerBlock; ++ic) acc[q][ic] = acc_t(0);
    }

    for (index_t oc0 = 0; oc0 < g.Og; oc0 += t.stage_c) {
      const int on = static_cast<int>(dmin<index_t>(t.stage_c, g.Og - oc0));
      __syncthreads();
      for (int e = threadIdx.x; e < on * go_plane; e += kDirectThreads) {
        int oc, rr, col;
        if (t.channels_last) {
          oc = e % on;
          const int q = e / on;
          col = q % t.in_w;
          rr = q / t.in_w;
        } else {
          col = e % t.in_w;
          const int q = e / t.in_w;
          rr = q % t.in_h;
          oc = q / t.in_h;
        }
        const index_t oh = oh_lo + rr;
        const index_t ow = ow_lo + col;
        acc_t v = acc_t(0);
        if (oh >= 0 && oh < g.OH && ow >= 0 && ow < g.OW) {
          const index_t o = grp * g.Og + oc0 + oc;
          v = static_cast<acc_t>(gon[o * g.ys[1] + oh * g.ys[2] + ow * g.ys[3]]);
        }
        go_s[oc * go_plane + rr * t.in_w + col] = v;
      }
      const int it_n = kIcPerBlock * taps;
      for (int e = threadIdx.x; e < on * it_n; e += kDirectThreads) {
        const int it = e % it_n;  // (ic, kh, kw): contiguous in the weight for one oc
        const int oc = e / it_n;
        const int ic = it / taps;
        const int tap = it - ic * taps;
        acc_t v = acc_t(0);
        if (ic < ic_n) {
          const index_t o = grp * g.Og + oc0 + oc;
          v = static_cast<acc_t>(w[(o * g.Cg + ic0) * taps + it]);
        }
        w_s[(oc * taps + tap) * kIcPerBlock + ic] = v;
      }
      __syncthreads();

      for (int i = 0; i < kh; ++i) {
        bool row_ok[kMaxRowsPerThread];
        int lr[kMaxRowsPerThread];
#pragma unroll
        for (int q = 0; q < kMaxRowsPerThread; ++q) {
          const index_t nh = ih0 + ty + q * t.thr_h + g.ph - i * g.dh;
          row_ok[q] = q < t.rpt && nh >= 0 && (g.sh == 1 || nh % g.sh == 0);
          lr[q] = row_ok[q] ? static_cast<int>(nh / g.sh - oh_lo) : 0;
        }
        for (int j = 0; j < kw; ++j) {
          const index_t nw = iw + g.pw - j * g.dw;
          if (nw < 0 || (g.sw != 1 && nw % g.sw != 0)) continue;
          const int lc = static_cast<int>(nw / g.sw - ow_lo);
          for (int oc = 0; oc < on; ++oc) {
            const acc_t* wp = w_s + (oc * taps + i * kw + j) * kIcPerBlock;
            acc_t wv[kIcPerBlock];
#pragma unroll
            for (int ic = 0; ic < kIcPerBlock; ++ic) wv[ic] = wp[ic];
            const acc_t* gp = go_s + oc * go_plane + lc;
#pragma unroll
            for (int q = 0; q < kMaxRowsPerThread; ++q) {
              if (row_ok[q]) {
                const acc_t v = gp[lr[q] * t.in_w];
#pragma unroll
                for (int ic = 0; ic < kIcPerBlock; ++ic) acc[q][ic] += v * wv[ic];
              }
            }
          }
        }
      }
    }

#pragma unroll
    for (int q = 0; q < kMaxRowsPerThread; ++q) {
      const index_t ih = ih0 + ty + q * t.thr_h;
      if (q < t.rpt && ih < g.H && iw < g.W) {
#pragma unroll
        for (int ic = 0; ic < kIcPerBlock; ++ic) {
          if (ic < ic_n) {
            const index_t c = grp * g.Cg + ic0 + ic;
            gi[n * g.xs[0] + c * g.xs[1] + ih * g.xs[2] + iw * g.xs[3]] =
                static_cast<scalar_t>(acc[q][ic]);
          }
        }
      }
    }
  }
}

// Fallback twin of conv2d_direct_forward_simple_kernel: one thread per grad_input element.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kSimpleThreads) conv2d_direct_grad_input_simple_kernel(
    const scalar_t* __restrict__ go, const scalar_t* __restrict__ w, scalar_t* __restrict__ gi,
    const DirectGeom<index_t> g, const index_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t taps = g.kh * g.kw;
  const int64_t step = int64_t{blockDim.x} * gridDim.x;  // 64-bit: see the forward's
  for (int64_t e64 = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; e64 < total; e64 += step) {
    const index_t e = static_cast<index_t>(e64);
    const index_t iw = e % g.W;
    index_t r = e / g.W;
    const index_t ih = r % g.H;
    r /= g.H;
    const index_t c = r % g.C;
    const index_t n = r / g.C;
    const index_t grp = c / g.Cg;
    const index_t cg = c - grp * g.Cg;
    acc_t sum = acc_t(0);
    for (index_t i = 0; i < g.kh; ++i) {
      const index_t nh = ih + g.ph - i * g.dh;
      if (nh < 0) break;
      if (nh % g.sh != 0) continue;
      const index_t oh = nh / g.sh;
      if (oh >= g.OH) continue;
      for (index_t j = 0; j < g.kw; ++j) {
        const index_t nw = iw + g.pw - j * g.dw;
        if (nw < 0) break;
        if (nw % g.sw != 0) continue;
        const index_t ow = nw / g.sw;
        if (ow >= g.OW) continue;
        for (index_t oc = 0; oc < g.Og; ++oc) {
          const index_t o = grp * g.Og + oc;
          sum += static_cast<acc_t>(go[n * g.ys[0] + o * g.ys[1] + oh * g.ys[2] + ow * g.ys[3]]) *
              static_cast<acc_t>(w[(o * g.Cg + cg) * taps + i * g.kw + j]);
        }
      }
    }
    gi[n * g.xs[0] + c * g.xs[1] + ih * g.xs[2] + iw * g.xs[3]] = static_cast<scalar_t>(sum);
  }
}

// ---------------------------------------------------------------------------------------------
// grad_weight: deterministic tiled reduction
// ---------------------------------------------------------------------------------------------

struct GwPlan {
  int64_t oc_blocks, e_blocks, blocks_w, splits, total_blocks;
  int64_t positions, chunk;  // N * OH * OW, positions per split
};

// Block = (split s, group, 4 output channels, 8 weight elements (c, kh, kw)): it owns those 32
// grad_weight elements for the positions [s * chunk, (s + 1) * chunk) of N x OH x OW. Thread
// t visits positions t, t + 256, ... in order (4 grad_output + 8 input reads feed 32 FMAs into
// registers), then the block reduces its 256 partial sums per element in a fixed tree (warp
// shuffles, then warps in order). With one split the result goes straight to grad_weight;
// otherwise to partial[s] and a second kernel adds the splits in order: deterministic, no
// atomics. The splits exist so small weights still fill the GPU; their number depends on the
// shape only. Bound by L1/L2 bandwidth (12 loads per 32 FMAs).
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kGwThreads) conv2d_direct_grad_weight_kernel(
    const scalar_t* __restrict__ go, const scalar_t* __restrict__ x, scalar_t* __restrict__ gw,
    at::opmath_type<scalar_t>* __restrict__ partial, const DirectGeom<index_t> g,
    const GwPlan pl, const index_t step_n, const index_t step_h, const index_t step_w) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t red[kGwThreads / 32][kGwOc * kGwElems];
  const index_t taps = g.kh * g.kw;
  const index_t kg = g.Cg * taps;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;

  for (int64_t blk = blockIdx.x; blk < pl.total_blocks; blk += gridDim.x) {
    const int64_t s = blk / pl.blocks_w;
    int64_t r = blk % pl.blocks_w;
    const int64_t eb = r % pl.e_blocks;
    r /= pl.e_blocks;
    const int64_t ob = r % pl.oc_blocks;
    const index_t grp = static_cast<index_t>(r / pl.oc_blocks);

    index_t x_off[kGwElems];
    index_t h_off[kGwElems];
    index_t w_off[kGwElems];
    bool e_ok[kGwElems];
#pragma unroll
    for (int e = 0; e < kGwElems; ++e) {
      const index_t k = static_cast<index_t>(eb) * kGwElems + e;
      e_ok[e] = k < kg;
      const index_t kk = e_ok[e] ? k : 0;
      const index_t cg = kk / taps;
      const index_t tap = kk - cg * taps;
      const index_t i = tap / g.kw;
      const index_t j = tap - i * g.kw;
      x_off[e] = (grp * g.Cg + cg) * g.xs[1];
      h_off[e] = i * g.dh - g.ph;
      w_off[e] = j * g.dw - g.pw;
    }
    index_t go_off[kGwOc];
    bool o_ok[kGwOc];
#pragma unroll
    for (int u = 0; u < kGwOc; ++u) {
      const index_t oc = static_cast<index_t>(ob) * kGwOc + u;
      o_ok[u] = oc < g.Og;
      go_off[u] = (grp * g.Og + (o_ok[u] ? oc : 0)) * g.ys[1];
    }

    acc_t acc[kGwOc][kGwElems];
#pragma unroll
    for (int u = 0; u < kGwOc; ++u) {
#pragma unroll
      for (int e = 0; e < kGwElems; ++e) acc[u][e] = acc_t(0);
    }

    const index_t p_begin = static_cast<index_t>(s * pl.chunk);
    const index_t p_end = static_cast<index_t>(dmin<int64_t>(pl.positions, (s + 1) * pl.chunk));
    index_t p = p_begin + static_cast<index_t>(threadIdx.x);
    if (p < p_end) {
      index_t ow = p % g.OW;
      const index_t q = p / g.OW;
      index_t oh = q % g.OH;
      index_t n = q / g.OH;
      while (true) {
        acc_t gv[kGwOc];
#pragma unroll
        for (int u = 0; u < kGwOc; ++u) {
          gv[u] = o_ok[u] ? static_cast<acc_t>(go[n * g.ys[0] + go_off[u] + oh * g.ys[2] +
                                                  ow * g.ys[3]])
                          : acc_t(0);
        }
        const index_t ih_b = oh * g.sh;
        const index_t iw_b = ow * g.sw;
        const scalar_t* xn = x + n * g.xs[0];
#pragma unroll
        for (int e = 0; e < kGwElems; ++e) {
          const index_t ih = ih_b + h_off[e];
          const index_t iw = iw_b + w_off[e];
          acc_t xv = acc_t(0);
          if (e_ok[e] && ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) {
            xv = static_cast<acc_t>(xn[x_off[e] + ih * g.xs[2] + iw * g.xs[3]]);
          }
#pragma unroll
          for (int u = 0; u < kGwOc; ++u) acc[u][e] += gv[u] * xv;
        }
        p += kGwThreads;
        if (p >= p_end) break;
        // Advance (n, oh, ow) by kGwThreads positions: each carry happens at most once.
        ow += step_w;
        oh += step_h;
        n += step_n;
        if (ow >= g.OW) {
          ow -= g.OW;
          ++oh;
        }
        if (oh >= g.OH) {
          oh -= g.OH;
          ++n;
        }
      }
    }

#pragma unroll
    for (int u = 0; u < kGwOc; ++u) {
#pragma unroll
      for (int e = 0; e < kGwElems; ++e) {
        acc_t v = acc[u][e];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
        if (lane == 0) red[warp][u * kGwElems + e] = v;
      }
    }
    __syncthreads();
    if (threadIdx.x < kGwOc * kGwElems) {
      const int u = static_cast<int>(threadIdx.x) / kGwElems;
      const int e = static_cast<int>(threadIdx.x) % kGwElems;
      acc_t sum = acc_t(0);
#pragma unroll
      for (int wi = 0; wi < kGwThreads / 32; ++wi) sum += red[wi][threadIdx.x];
      const index_t oc = static_cast<index_t>(ob) * kGwOc + u;
      const index_t k = static_cast<index_t>(eb) * kGwElems + e;
      if (oc < g.Og && k < kg) {
        const index_t o = grp * g.Og + oc;
        if (partial != nullptr) {
          partial[(s * g.O + o) * kg + k] = sum;
        } else {
          gw[o * kg + k] = static_cast<scalar_t>(sum);
        }
      }
    }
    __syncthreads();  // red is reused by the next block of this loop
  }
}

// grad_weight[e] = sum over splits s (in order) of partial[s][e]. Memory-bound, tiny.
template <typename scalar_t>
__global__ void __launch_bounds__(kSimpleThreads) conv2d_direct_grad_weight_sum_kernel(
    const at::opmath_type<scalar_t>* __restrict__ partial, scalar_t* __restrict__ gw,
    const int64_t count, const int64_t splits) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < count;
       e += step) {
    acc_t sum = acc_t(0);
    for (int64_t s = 0; s < splits; ++s) sum += partial[s * count + e];
    gw[e] = static_cast<scalar_t>(sum);
  }
}

// ---------------------------------------------------------------------------------------------
// planning
// ---------------------------------------------------------------------------------------------

// Picks the tile for a dom_h x dom_w domain (forward: the output, grad_input: the input):
// 32, 16 or 8 columns (the narrowest that covers dom_w first), up to 4 rows per thread, and as
// many staged channels as fit kSmemBudget. `region(tile_h, tile_w)` gives the staged plane.
// Returns false when no tile fits (then the simple kernels run).
template <typename RegionFn>
bool plan_tile(int64_t dom_h, int64_t dom_w, int64_t channels, int64_t taps, int64_t cpb,
               int64_t acc_bytes, const RegionFn& region, DirectTile& t) {
  const int widths[3] = {32, 16, 8};
  const int first = dom_w > 16 ? 0 : (dom_w > 8 ? 1 : 2);
  for (int wi = first; wi < 3; ++wi) {
    const int tw = widths[wi];
    const int th = kDirectThreads / tw;
    const int best_rpt = static_cast<int>(
        std::min<int64_t>(kMaxRowsPerThread, std::max<int64_t>(1, ceil_div(dom_h, th))));
    for (int rpt = best_rpt; rpt >= 1; --rpt) {
      int64_t rh = 0;
      int64_t rw = 0;
      region(int64_t{th} * rpt, int64_t{tw}, rh, rw);
      const int64_t per_channel = (rh * rw + taps * cpb) * acc_bytes;
      if (per_channel > kSmemBudget) continue;
      t.tile_w = tw;
      t.thr_h = th;
      t.rpt = rpt;
      t.tile_h = th * rpt;
      t.in_h = static_cast<int>(rh);
      t.in_w = static_cast<int>(rw);
      t.stage_c = static_cast<int>(
          std::min<int64_t>({channels, int64_t{kMaxStageChannels}, kSmemBudget / per_channel}));
      t.tiles_w = ceil_div(dom_w, tw);
      t.tiles_h = ceil_div(dom_h, t.tile_h);
      t.bytes = t.stage_c * per_channel;
      return true;
    }
  }
  return false;
}

int64_t acc_bytes_for(at::ScalarType st) {
  return st == at::kDouble ? 8 : 4;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// launchers
// ---------------------------------------------------------------------------------------------

void direct_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                    at::Tensor& out, const Conv2dShape& s, bool channels_last) {
  const at::Tensor w = weight.contiguous();
  const int64_t cg = s.in_channels / s.groups;
  const int64_t og = s.out_channels / s.groups;
  const int64_t taps = s.kernel_h * s.kernel_w;
  DirectTile t{};
  const bool tiled = plan_tile(
      s.out_h, s.out_w, cg, taps, kOcPerBlock, acc_bytes_for(x.scalar_type()),
      [&](int64_t th, int64_t tw, int64_t& rh, int64_t& rw) {
        rh = (th - 1) * s.stride_h + (s.kernel_h - 1) * s.dil_h + 1;
        rw = (tw - 1) * s.stride_w + (s.kernel_w - 1) * s.dil_w + 1;
      },
      t);
  if (tiled) {
    t.c_blocks = ceil_div(og, kOcPerBlock);
    t.total_blocks = s.batch * s.groups * t.c_blocks * t.tiles_h * t.tiles_w;
    t.channels_last = channels_last;
  }
  // Coordinates reach about (out + tile) * stride + (kernel - 1) * dilation past the padding.
  const bool use32 = fits_int32(
      {x.numel(), out.numel(), w.numel(),
       (s.out_h + 256) * s.stride_h + s.kernel_h * s.dil_h + s.in_h + s.pad_h,
       (s.out_w + 256) * s.stride_w + s.kernel_w * s.dil_w + s.in_w + s.pad_w});
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv2d_direct_forward", [&] {
    const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    dispatch_index(use32, [&](auto tag) {
      using index_t = decltype(tag);
      const DirectGeom<index_t> g = make_direct_geom<index_t>(s, x, out);
      if (tiled) {
        conv2d_direct_forward_kernel<scalar_t, index_t>
            <<<grid_for(t.total_blocks), kDirectThreads, static_cast<size_t>(t.bytes), stream>>>(
                x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), bp,
                out.mutable_data_ptr<scalar_t>(), g, t);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        const int64_t total = out.numel();
        conv2d_direct_forward_simple_kernel<scalar_t, index_t>
            <<<grid_for(ceil_div(total, kSimpleThreads)), kSimpleThreads, 0, stream>>>(
                x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), bp,
                out.mutable_data_ptr<scalar_t>(), g, static_cast<index_t>(total));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

void direct_grad_input(const at::Tensor& go, const at::Tensor& weight, at::Tensor& gi,
                       const Conv2dShape& s, bool channels_last) {
  const at::Tensor w = weight.contiguous();
  const int64_t cg = s.in_channels / s.groups;
  const int64_t og = s.out_channels / s.groups;
  const int64_t taps = s.kernel_h * s.kernel_w;
  DirectTile t{};
  // The output rows reaching tile_h input rows: floor((tile_h - 1 + (kH-1) dH) / sH) + 1, plus
  // one for the floor of an unaligned start.
  const bool tiled = plan_tile(
      s.in_h, s.in_w, og, taps, kIcPerBlock, acc_bytes_for(go.scalar_type()),
      [&](int64_t th, int64_t tw, int64_t& rh, int64_t& rw) {
        rh = (th - 1 + (s.kernel_h - 1) * s.dil_h) / s.stride_h + 2;
        rw = (tw - 1 + (s.kernel_w - 1) * s.dil_w) / s.stride_w + 2;
      },
      t);
  if (tiled) {
    t.c_blocks = ceil_div(cg, kIcPerBlock);
    t.total_blocks = s.batch * s.groups * t.c_blocks * t.tiles_h * t.tiles_w;
    t.channels_last = channels_last;
  }
  const bool use32 = fits_int32(
      {go.numel(), gi.numel(), w.numel(),
       s.in_h + 256 + s.pad_h + s.kernel_h * s.dil_h + s.out_h,
       s.in_w + 256 + s.pad_w + s.kernel_w * s.dil_w + s.out_w});
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "conv2d_direct_grad_input", [&] {
    dispatch_index(use32, [&](auto tag) {
      using index_t = decltype(tag);
      const DirectGeom<index_t> g = make_direct_geom<index_t>(s, gi, go);
      if (tiled) {
        conv2d_direct_grad_input_kernel<scalar_t, index_t>
            <<<grid_for(t.total_blocks), kDirectThreads, static_cast<size_t>(t.bytes), stream>>>(
                go.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                gi.mutable_data_ptr<scalar_t>(), g, t);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        const int64_t total = gi.numel();
        conv2d_direct_grad_input_simple_kernel<scalar_t, index_t>
            <<<grid_for(ceil_div(total, kSimpleThreads)), kSimpleThreads, 0, stream>>>(
                go.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                gi.mutable_data_ptr<scalar_t>(), g, static_cast<index_t>(total));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

void direct_grad_weight(const at::Tensor& go, const at::Tensor& x, at::Tensor& gw,
                        const Conv2dShape& s, bool /*channels_last*/) {
  const int64_t og = s.out_channels / s.groups;
  const int64_t kg = s.in_channels / s.groups * s.kernel_h * s.kernel_w;
  GwPlan pl{};
  pl.oc_blocks = ceil_div(og, kGwOc);
  pl.e_blocks = ceil_div(kg, kGwElems);
  pl.blocks_w = s.groups * pl.oc_blocks * pl.e_blocks;
  pl.positions = s.batch * s.out_h * s.out_w;
  const int64_t want = std::min(ceil_div(kGwTargetBlocks, pl.blocks_w),
                                ceil_div(pl.positions, kGwMinPositionsPerSplit));
  pl.chunk = ceil_div(pl.positions, std::max<int64_t>(1, want));
  pl.splits = ceil_div(pl.positions, pl.chunk);
  pl.total_blocks = pl.splits * pl.blocks_w;
  const int64_t plane = s.out_h * s.out_w;
  const int64_t step_n = kGwThreads / plane;
  const int64_t step_h = (kGwThreads % plane) / s.out_w;
  const int64_t step_w = (kGwThreads % plane) % s.out_w;

  at::Tensor partial;
  if (pl.splits > 1) {
    // at::opmath_type of the dtype: double for double, float otherwise
    const at::ScalarType acc_type = go.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    partial = at::empty({pl.splits * s.out_channels * kg}, go.options().dtype(acc_type));
  }
  const bool use32 = fits_int32(
      {go.numel(), x.numel(), pl.positions + kGwThreads, partial.defined() ? partial.numel() : 0,
       (s.out_h + 1) * s.stride_h + s.kernel_h * s.dil_h + s.in_h,
       (s.out_w + 1) * s.stride_w + s.kernel_w * s.dil_w + s.in_w});
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "conv2d_direct_grad_weight", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* pp = partial.defined() ? partial.mutable_data_ptr<acc_t>() : nullptr;
    dispatch_index(use32, [&](auto tag) {
      using index_t = decltype(tag);
      const DirectGeom<index_t> g = make_direct_geom<index_t>(s, x, go);
      conv2d_direct_grad_weight_kernel<scalar_t, index_t>
          <<<grid_for(pl.total_blocks), kGwThreads, 0, stream>>>(
              go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
              gw.mutable_data_ptr<scalar_t>(), pp, g, pl, static_cast<index_t>(step_n),
              static_cast<index_t>(step_h), static_cast<index_t>(step_w));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (pp != nullptr) {
      const int64_t count = s.out_channels * kg;
      conv2d_direct_grad_weight_sum_kernel<scalar_t>
          <<<grid_for(ceil_div(count, kSimpleThreads)), kSimpleThreads, 0, stream>>>(
              pp, gw.mutable_data_ptr<scalar_t>(), count, pl.splits);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace conv2d_cuda
}  // namespace fastconv
