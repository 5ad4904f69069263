// Depthwise conv2d on CUDA: forward, grad_input and grad_weight, NCHW and channels_last.
//
// Output channel oc = c * m + k reads input channel c (m = weight.size(0) / C, the channel
// multiplier). The forward and the stride-1 grad_input share one computation, written in
// "forward form": a destination plane is the correlation of source planes with a kernel,
//   dst[y, x] = sum_{kh, kw} src[y * s_h - p_h + kh * d_h, x * s_w - p_w + kw * d_w] * w[kh, kw].
// The forward is that directly (one source plane feeds m destination planes). grad_input with
// stride 1 is that on grad_output with the taps flipped and padding (k - 1) * d - p, which can
// be negative (m source planes summed into one destination plane). Strided grad_input is a
// gather that visits only the taps landing on an output position. grad_weight reduces over
// (n, oh, ow) per (oc, tap): blocks own (channel, slice of tiles), keep every tap's partial sum
// and write one partial per slice; a second kernel adds the slices in a fixed order. Nothing
// uses atomics: results are bitwise reproducible for a given shape.
//
// Index widths: the tiled and channels_last kernels use 32-bit offsets inside a plane or image
// and 64-bit plane / image bases and block counters; they are chosen only when every size and
// geometry parameter is below 2^24 and every tensor below 2^31 elements, which bounds every
// intermediate (e.g. (out + 64) * stride) below 2^31. Otherwise the generic kernels run,
// templated on the index type (int32 or int64).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <numeric>
#include <vector>

#include "common/checks.h"
#include "common/depthwise_backward.h"
#include "common/shape.h"
#include "cuda/kernels.cuh"

namespace fastconv {
namespace {

constexpr int kThreads = 256;
constexpr int kRows = 4;                // output rows per thread in the NCHW tile kernels
constexpr int kNhwcRw = 4;              // outputs per thread along W in the channels_last kernel
// Output columns per tile in the channels_last grad_weight: 8, or 4 for k = 7, whose 49 partial
// sums plus 8 x (8 + 6) staged values per tile row would not fit 128 registers.
C10_HOST_DEVICE constexpr int gw_tile_w(int k) { return k >= 7 ? 4 : 8; }
constexpr int64_t kSmemBudget = 48 * 1024;  // no opt-in needed below this
constexpr int64_t kGwTargetBlocks = 1024;   // grad_weight work units (fixed: shape-only slicing)
constexpr int64_t kSmall = int64_t(1) << 24;
constexpr int64_t kInt32Limit = int64_t(std::numeric_limits<int32_t>::max());

template <typename T>
using opmath_t = at::opmath_type<T>;

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename T>
constexpr int vec16() {
  return int(16 / sizeof(T));
}

template <typename T>
C10_HOST_DEVICE inline T imin(T a, T b) {
  return a < b ? a : b;
}
template <typename T>
C10_HOST_DEVICE inline T imax(T a, T b) {
  return a > b ? a : b;
}

// floor(a / b) for b > 0 and any sign of a.
C10_HOST_DEVICE inline int floor_div_int(int a, int b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

template <typename scalar_t, int V>
__device__ __forceinline__ void load_vec(const scalar_t* p, opmath_t<scalar_t> (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = static_cast<opmath_t<scalar_t>>(*p);
  } else {
    const Vec<scalar_t, V> v = *reinterpret_cast<const Vec<scalar_t, V>*>(p);
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = static_cast<opmath_t<scalar_t>>(v.v[j]);
  }
}

template <typename scalar_t, int V>
__device__ __forceinline__ void store_vec(scalar_t* p, const opmath_t<scalar_t> (&in)[V]) {
  if constexpr (V == 1) {
    *p = static_cast<scalar_t>(in[0]);
  } else {
    Vec<scalar_t, V> v;
#pragma unroll
    for (int j = 0; j < V; ++j) v.v[j] = static_cast<scalar_t>(in[j]);
    *reinterpret_cast<Vec<scalar_t, V>*>(p) = v;
  }
}

// ---------------------------------------------------------------------------------------------
// Geometry
// ---------------------------------------------------------------------------------------------

// A correlation in forward form (see the file comment).
struct ConvForm {
  int64_t n, c, mult;            // batch, input channels, channel multiplier
  int64_t src_c, src_h, src_w;   // input (forward) or grad_output (grad_input)
  int64_t dst_c, dst_h, dst_w;   // output (forward) or grad_input
  int64_t k_h, k_w, s_h, s_w, p_h, p_w, d_h, d_w;
  bool grad_input;               // flipped taps; m source channels summed per destination
};

ConvForm forward_form(const Conv2dShape& s) {
  ConvForm f;
  f.n = s.batch;
  f.c = s.in_channels;
  f.mult = s.out_channels / s.in_channels;
  f.src_c = s.in_channels;
  f.src_h = s.in_h;
  f.src_w = s.in_w;
  f.dst_c = s.out_channels;
  f.dst_h = s.out_h;
  f.dst_w = s.out_w;
  f.k_h = s.kernel_h;
  f.k_w = s.kernel_w;
  f.s_h = s.stride_h;
  f.s_w = s.stride_w;
  f.p_h = s.pad_h;
  f.p_w = s.pad_w;
  f.d_h = s.dil_h;
  f.d_w = s.dil_w;
  f.grad_input = false;
  return f;
}

// Stride-1 grad_input as a forward-form correlation over grad_output.
ConvForm grad_input_form(const Conv2dShape& s) {
  ConvForm f;
  f.n = s.batch;
  f.c = s.in_channels;
  f.mult = s.out_channels / s.in_channels;
  f.src_c = s.out_channels;
  f.src_h = s.out_h;
  f.src_w = s.out_w;
  f.dst_c = s.in_channels;
  f.dst_h = s.in_h;
  f.dst_w = s.in_w;
  f.k_h = s.kernel_h;
  f.k_w = s.kernel_w;
  f.s_h = 1;
  f.s_w = 1;
  f.p_h = (s.kernel_h - 1) * s.dil_h - s.pad_h;
  f.p_w = (s.kernel_w - 1) * s.dil_w - s.pad_w;
  f.d_h = s.dil_h;
  f.d_w = s.dil_w;
  f.grad_input = true;
  return f;
}

bool is_small(int64_t v) { return v > -kSmall && v < kSmall; }

// The 32-bit tiled / channels_last kernels' precondition (see the file comment).
bool form_is_small(const ConvForm& f) {
  for (int64_t v : {f.n, f.c, f.mult, f.src_c, f.src_h, f.src_w, f.dst_c, f.dst_h, f.dst_w, f.k_h,
                    f.k_w, f.s_h, f.s_w, f.p_h, f.p_w, f.d_h, f.d_w}) {
    if (!is_small(v)) return false;
  }
  return f.n * f.src_c * f.src_h * f.src_w <= kInt32Limit &&
      f.n * f.dst_c * f.dst_h * f.dst_w <= kInt32Limit &&
      f.c * f.mult * f.k_h * f.k_w <= kInt32Limit;  // the weight
}

bool use_int32(std::initializer_list<int64_t> numels) {
  for (int64_t v : numels) {
    if (v > kInt32Limit) return false;
  }
  return true;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int64_t grid_cap() {
  return int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
}

unsigned grid_for_blocks(int64_t blocks) {
  return unsigned(imax<int64_t>(1, imin<int64_t>(blocks, grid_cap())));
}

unsigned grid_for_items(int64_t items, int threads) {
  return grid_for_blocks(ceil_div(items, threads));
}

int compile_time_k(const ConvForm& f) {
  if (f.k_h == f.k_w && (f.k_h == 3 || f.k_h == 5 || f.k_h == 7)) return int(f.k_h);
  return 0;
}

int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// ---------------------------------------------------------------------------------------------
// NCHW tiles: shared by the forward-form kernel and the NCHW grad_weight kernel
// ---------------------------------------------------------------------------------------------

// A block computes an output tile of tile_w x (row_groups * kRows) outputs on pz planes. The
// source tile (with halo) of each plane is staged in shared memory with row pitch `pitch`.
struct TileGeom {
  int64_t planes;        // plane units: (n, c) pairs, or batch items for grad_weight
  int64_t tiles_w, tiles_h, plane_groups, total_blocks;
  int channels, mult;
  int src_h, src_w, dst_h, dst_w;
  int s_h, s_w, p_h, p_w, d_h, d_w, k_h, k_w;
  int tile_w, row_groups, pz;
  int in_tile_h, in_tile_w, pitch;
  int red_offset;        // byte offset of the grad_weight reduction buffer
  bool vec;              // 16-byte source loads (aligned base, src_w % (16 / elem) == 0)
  bool unit_h;           // s_h == d_h == 1: register reuse along rows
};

// Picks the largest tile (up to 256 threads, 4 rows each) whose source tile fits kSmemBudget
// together with `extra` bytes; false when even an 8 x 4 tile of one plane does not fit.
bool plan_nchw_tile(TileGeom& g, const ConvForm& f, int64_t planes, int64_t elem, bool vec,
                    int64_t extra, int64_t& smem_bytes, int& threads) {
  const int64_t v = 16 / elem;
  int64_t tw = f.dst_w <= 8 ? 8 : (f.dst_w <= 16 ? 16 : 32);
  int64_t rg = imin<int64_t>(imax<int64_t>(ceil_div(f.dst_h, kRows), 1), kThreads / tw);
  int64_t pz = imin<int64_t>(imax<int64_t>(kThreads / (tw * rg), 1), planes);
  int64_t in_h = 0, in_w = 0, pitch = 0, tile_bytes = 0;
  for (;;) {
    in_h = (rg * kRows - 1) * f.s_h + (f.k_h - 1) * f.d_h + 1;
    in_w = (tw - 1) * f.s_w + (f.k_w - 1) * f.d_w + 1;
    pitch = round_up(in_w + (vec ? v - 1 : 0), v);
    if ((pitch * elem) % 128 == 0) pitch += v;  // rows of different row groups on other banks
    tile_bytes = round_up(pz * in_h * pitch * elem, 16);
    if (tile_bytes + extra <= kSmemBudget) break;
    if (pz > 1) {
      pz = (pz + 1) / 2;
    } else if (rg > 1) {
      rg = (rg + 1) / 2;
    } else if (tw > 8) {
      tw /= 2;
    } else {
      return false;
    }
  }
  g.planes = planes;
  g.channels = int(f.c);
  g.mult = int(f.mult);
  g.src_h = int(f.src_h);
  g.src_w = int(f.src_w);
  g.dst_h = int(f.dst_h);
  g.dst_w = int(f.dst_w);
  g.s_h = int(f.s_h);
  g.s_w = int(f.s_w);
  g.p_h = int(f.p_h);
  g.p_w = int(f.p_w);
  g.d_h = int(f.d_h);
  g.d_w = int(f.d_w);
  g.k_h = int(f.k_h);
  g.k_w = int(f.k_w);
  g.tile_w = int(tw);
  g.row_groups = int(rg);
  g.pz = int(pz);
  g.in_tile_h = int(in_h);
  g.in_tile_w = int(in_w);
  g.pitch = int(pitch);
  g.red_offset = int(tile_bytes);
  g.vec = vec;
  g.unit_h = f.s_h == 1 && f.d_h == 1;
  g.tiles_w = ceil_div(f.dst_w, tw);
  g.tiles_h = ceil_div(f.dst_h, rg * kRows);
  g.plane_groups = ceil_div(planes, pz);
  g.total_blocks = g.tiles_w * g.tiles_h * g.plane_groups;
  smem_bytes = tile_bytes + extra;
  threads = int(round_up(tw * rg * pz, 32));
  return true;
}

// Copies source rows [ih0, ih0 + in_tile_h) x columns [iw0, iw0 + in_tile_w) of the planes
// plane0 + z * plane_step (z < nz) into the tile, zeros outside the plane. With g.vec it moves
// 16-byte vectors starting at the aligned column at or left of iw0 (every vector then lies
// wholly inside or outside a row, since src_w is a multiple of the vector width) and returns
// the column shift of iw0 inside the tile; the scalar path returns 0.
template <typename scalar_t>
__device__ __forceinline__ int load_tile(scalar_t* tile, const scalar_t* __restrict__ src,
                                         const TileGeom& g, int64_t plane0, int64_t plane_step,
                                         int nz, int ih0, int iw0) {
  const int64_t plane_size = int64_t(g.src_h) * g.src_w;
  if (g.vec) {
    constexpr int V = vec16<scalar_t>();
    const int iw_al = floor_div_int(iw0, V) * V;
    const int shift = iw0 - iw_al;
    const int nvec = (shift + g.in_tile_w + V - 1) / V;
    const int per_plane = g.in_tile_h * nvec;
    const int count = g.pz * per_plane;
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
      const int z = i / per_plane;
      const int rem = i - z * per_plane;
      const int row = rem / nvec;
      const int vi = rem - row * nvec;
      const int ih = ih0 + row;
      const int iw = iw_al + vi * V;
      Vec<scalar_t, V> val;
      if (z < nz && ih >= 0 && ih < g.src_h && iw >= 0 && iw < g.src_w) {
        val = *reinterpret_cast<const Vec<scalar_t, V>*>(
            src + (plane0 + z * plane_step) * plane_size + ih * g.src_w + iw);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) val.v[j] = scalar_t(0);
      }
      *reinterpret_cast<Vec<scalar_t, V>*>(tile + (z * g.in_tile_h + row) * g.pitch + vi * V) =
          val;
    }
    return shift;
  }
  const int per_plane = g.in_tile_h * g.in_tile_w;
  const int count = g.pz * per_plane;
  for (int i = threadIdx.x; i < count; i += blockDim.x) {
    const int z = i / per_plane;
    const int rem = i - z * per_plane;
    const int row = rem / g.in_tile_w;
    const int col = rem - row * g.in_tile_w;
    const int ih = ih0 + row;
    const int iw = iw0 + col;
    scalar_t val = scalar_t(0);
    if (z < nz && ih >= 0 && ih < g.src_h && iw >= 0 && iw < g.src_w) {
      val = src[(plane0 + z * plane_step) * plane_size + ih * g.src_w + iw];
    }
    tile[(z * g.in_tile_h + row) * g.pitch + col] = val;
  }
  return 0;
}

// Adds this thread's kRows outputs (rows rg * kRows + r, column col of the tile) for one
// kernel: weights wp[taps] (read flipped when FLIP). tile_z points at the thread's plane slot.
template <typename scalar_t, int K, bool FLIP>
__device__ __forceinline__ void tile_accumulate(opmath_t<scalar_t> (&acc)[kRows],
                                                const scalar_t* tile_z,
                                                const scalar_t* __restrict__ wp,
                                                const TileGeom& g, int rg, int col, int shift) {
  using acc_t = opmath_t<scalar_t>;
  if constexpr (K > 0) {
    if (g.unit_h) {
      constexpr int KK = K * K;
      acc_t w[KK];
#pragma unroll
      for (int i = 0; i < KK; ++i) w[i] = static_cast<acc_t>(wp[FLIP ? KK - 1 - i : i]);
      // Source row j of the thread's window serves output r through tap kh = j - r: each
      // shared-memory value is loaded once and used up to K times.
      const scalar_t* base = tile_z + (rg * kRows) * g.pitch + shift + col * g.s_w;
#pragma unroll
      for (int j = 0; j < kRows + K - 1; ++j) {
        const scalar_t* rowp = base + j * g.pitch;
#pragma unroll
        for (int kw = 0; kw < K; ++kw) {
          const acc_t x = static_cast<acc_t>(rowp[kw * g.d_w]);
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            const int kh = j - r;
            if (kh >= 0 && kh < K) acc[r] += x * w[kh * K + kw];
          }
        }
      }
      return;
    }
  }
  // Runtime kernel size, or strided / dilated rows: one tap row at a time (a fully unrolled
  // k x k x kRows body lets the scheduler hoist every shared load and doubles the registers),
  // each weight read once (L1 broadcast) for the thread's kRows outputs.
  const int kh_n = K > 0 ? K : g.k_h;
  const int kw_n = K > 0 ? K : g.k_w;
  const int taps = kh_n * kw_n;
  const scalar_t* base = tile_z + (rg * kRows * g.s_h) * g.pitch + shift + col * g.s_w;
  const int rstep = g.s_h * g.pitch;
#pragma unroll 1
  for (int kh = 0; kh < kh_n; ++kh) {
    const scalar_t* rowp = base + kh * g.d_h * g.pitch;
    for (int kw = 0; kw < kw_n; ++kw) {
      const int tap = kh * kw_n + kw;
      const acc_t wv = static_cast<acc_t>(wp[FLIP ? taps - 1 - tap : tap]);
      const scalar_t* p = rowp + kw * g.d_w;
#pragma unroll
      for (int r = 0; r < kRows; ++r) acc[r] += static_cast<acc_t>(p[r * rstep]) * wv;
    }
  }
}

// Forward-form correlation, NCHW.
// Thread mapping: thread = (plane slot z, row group rg, column col), col fastest so a warp
// reads consecutive shared-memory words; each thread owns kRows vertically adjacent outputs.
// Tiling: a block stages the source tile + halo of pz planes ((tile-1)*s + (k-1)*d + 1 on each
// side) with 16-byte loads when aligned, then every tap reads shared memory. For the forward
// the tile is loaded once and reused for the m output channels of its input channel; for
// grad_input m grad_output tiles are loaded in turn and summed into the same registers.
// Speed: for k <= 5 in float the global traffic (one read of the source, one write of the
// destination, plus the halo) bounds it; for larger k the shared-memory loads (about
// (kRows + k - 1) * k per kRows outputs with unit stride, k^2 otherwise) do.
template <typename scalar_t, int K, bool GI>
__global__ void __launch_bounds__(kThreads)
    dw_conv_tile_nchw_kernel(
    const scalar_t* __restrict__ src, const scalar_t* __restrict__ weight,
    const scalar_t* __restrict__ bias, scalar_t* __restrict__ dst, const TileGeom g) {
  using acc_t = opmath_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  scalar_t* tile = reinterpret_cast<scalar_t*>(smem_raw);

  const int tid = threadIdx.x;
  const int col = tid % g.tile_w;
  const int rg = (tid / g.tile_w) % g.row_groups;
  const int z = tid / (g.tile_w * g.row_groups);  // >= pz for the threads rounding up to a warp
  const int tile_h = g.row_groups * kRows;
  const int taps = g.k_h * g.k_w;
  const int64_t dst_plane_size = int64_t(g.dst_h) * g.dst_w;
  const scalar_t* tile_z = tile + z * g.in_tile_h * g.pitch;

  for (int64_t b = blockIdx.x; b < g.total_blocks; b += gridDim.x) {
    const int tx = int(b % g.tiles_w);
    const int64_t t = b / g.tiles_w;
    const int ty = int(t % g.tiles_h);
    const int64_t unit0 = (t / g.tiles_h) * g.pz;
    const int nz = int(imin<int64_t>(g.pz, g.planes - unit0));
    const bool active = z < nz;
    const int64_t unit = unit0 + z;  // (n, c) plane of the input / grad_input
    const int c = active ? int(unit % g.channels) : 0;
    const int oh0 = ty * tile_h;
    const int ow0 = tx * g.tile_w;
    const int ih0 = oh0 * g.s_h - g.p_h;
    const int iw0 = ow0 * g.s_w - g.p_w;
    const int ow = ow0 + col;

    acc_t acc[kRows];
    if constexpr (!GI) {
      const int shift = load_tile(tile, src, g, unit0, 1, nz, ih0, iw0);
      __syncthreads();
#pragma unroll 1
      for (int k = 0; k < g.mult; ++k) {
        if (active) {
          const int oc = c * g.mult + k;
#pragma unroll
          for (int r = 0; r < kRows; ++r) acc[r] = acc_t(0);
          tile_accumulate<scalar_t, K, false>(acc, tile_z, weight + int64_t(oc) * taps, g, rg,
                                              col, shift);
          const acc_t bv = bias != nullptr ? static_cast<acc_t>(bias[oc]) : acc_t(0);
          scalar_t* out = dst + (unit * g.mult + k) * dst_plane_size;
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            const int oh = oh0 + rg * kRows + r;
            if (oh < g.dst_h && ow < g.dst_w) {
              out[oh * g.dst_w + ow] = static_cast<scalar_t>(acc[r] + bv);
            }
          }
        }
        // Keeps the compiler from hoisting the (k-invariant) tile loads out of the k loop,
        // which would hold every tap's source value in registers at once; the last one also
        // lets the next block's tile overwrite shared memory.
        __syncthreads();
      }
    } else {
#pragma unroll
      for (int r = 0; r < kRows; ++r) acc[r] = acc_t(0);
      for (int k = 0; k < g.mult; ++k) {
        const int shift = load_tile(tile, src, g, unit0 * g.mult + k, g.mult, nz, ih0, iw0);
        __syncthreads();
        if (active) {
          tile_accumulate<scalar_t, K, true>(acc, tile_z, weight + int64_t(c * g.mult + k) * taps,
                                             g, rg, col, shift);
        }
        __syncthreads();
      }
      if (active) {
        scalar_t* out = dst + unit * dst_plane_size;
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const int oh = oh0 + rg * kRows + r;
          if (oh < g.dst_h && ow < g.dst_w) out[oh * g.dst_w + ow] = static_cast<scalar_t>(acc[r]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// channels_last forward form
// ---------------------------------------------------------------------------------------------

struct NhwcGeom {
  int n, mult, wc;                 // batch, multiplier, weight channels (transposed row)
  int src_h, src_w, src_c, dst_h, dst_w, dst_c;
  int s_h, s_w, p_h, p_w, d_h, d_w, k_h, k_w;
  int cv, owg;                     // channel vectors per pixel, output groups per row
  int64_t items;                   // n * dst_h * owg * cv (< 2^31)
  bool unit_w;                     // s_w == d_w == 1: register reuse along W
};

// Forward-form correlation, channels_last.
// Thread mapping: thread = (n, oh, group of kNhwcRw outputs along W, vector of V channels),
// channels fastest, so a warp's loads for one tap are one contiguous run of 32 * V channels
// (16-byte loads when V > 1: multiplier 1, channel count and pointers aligned). Weights come
// from a (taps, channels) transposed copy so they load as vectors too.
// Tiling: none in shared memory: channels-innermost rows are already contiguous, and a thread
// reuses each loaded source vector for up to k of its outputs along W (unit stride along W), so
// a tap row costs k weight loads plus kNhwcRw + k - 1 source loads for k * kNhwcRw vector FMAs.
// Speed: DRAM traffic for k = 3, L1 load throughput for larger k.
template <typename scalar_t, int K, int V, bool GI>
__global__ void __launch_bounds__(kThreads) dw_conv_nhwc_kernel(
    const scalar_t* __restrict__ src, const scalar_t* __restrict__ wt,
    const scalar_t* __restrict__ bias, scalar_t* __restrict__ dst, const NhwcGeom g) {
  using acc_t = opmath_t<scalar_t>;
  const int ksum = GI ? g.mult : 1;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < g.items;
       i += int64_t(gridDim.x) * blockDim.x) {
    int t = int(i);
    const int cvi = t % g.cv;
    t /= g.cv;
    const int owg = t % g.owg;
    t /= g.owg;
    const int oh = t % g.dst_h;
    const int n = t / g.dst_h;
    const int dc = cvi * V;
    const int ow0 = owg * kNhwcRw;

    acc_t acc[kNhwcRw][V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const acc_t bv = (!GI && bias != nullptr) ? static_cast<acc_t>(bias[dc + j]) : acc_t(0);
#pragma unroll
      for (int r = 0; r < kNhwcRw; ++r) acc[r][j] = bv;
    }
    const scalar_t* src_img = src + int64_t(n) * g.src_h * g.src_w * g.src_c;
    for (int k = 0; k < ksum; ++k) {
      // V > 1 only with multiplier 1, so lane j always maps to channel sc + j / wc + j.
      const int sc = GI ? dc * g.mult + k : dc / g.mult;
      const int wch = GI ? dc * g.mult + k : dc;
      for (int kh = 0; kh < (K > 0 ? K : g.k_h); ++kh) {
        const int ih = oh * g.s_h - g.p_h + kh * g.d_h;
        if (ih < 0 || ih >= g.src_h) continue;
        const scalar_t* rowp = src_img + ih * g.src_w * g.src_c + sc;
        if constexpr (K > 0) {
          acc_t wv[K][V];
#pragma unroll
          for (int kw = 0; kw < K; ++kw) {
            const int tap = kh * K + kw;
            load_vec<scalar_t, V>(wt + (GI ? K * K - 1 - tap : tap) * g.wc + wch, wv[kw]);
          }
          if (g.unit_w) {
#pragma unroll
            for (int j = 0; j < kNhwcRw + K - 1; ++j) {
              const int iw = ow0 - g.p_w + j;
              acc_t x[V];
              if (iw >= 0 && iw < g.src_w) {
                load_vec<scalar_t, V>(rowp + iw * g.src_c, x);
              } else {
#pragma unroll
                for (int l = 0; l < V; ++l) x[l] = acc_t(0);
              }
#pragma unroll
              for (int r = 0; r < kNhwcRw; ++r) {
                const int kw = j - r;
                if (kw >= 0 && kw < K) {
#pragma unroll
                  for (int l = 0; l < V; ++l) acc[r][l] += x[l] * wv[kw][l];
                }
              }
            }
          } else {
#pragma unroll
            for (int kw = 0; kw < K; ++kw) {
#pragma unroll
              for (int r = 0; r < kNhwcRw; ++r) {
                const int iw = (ow0 + r) * g.s_w - g.p_w + kw * g.d_w;
                if (iw >= 0 && iw < g.src_w) {
                  acc_t x[V];
                  load_vec<scalar_t, V>(rowp + iw * g.src_c, x);
#pragma unroll
                  for (int l = 0; l < V; ++l) acc[r][l] += x[l] * wv[kw][l];
                }
              }
            }
          }
        } else {
          const int taps = g.k_h * g.k_w;
          for (int kw = 0; kw < g.k_w; ++kw) {
            const int tap = kh * g.k_w + kw;
            acc_t wv[V];
            load_vec<scalar_t, V>(wt + (GI ? taps - 1 - tap : tap) * g.wc + wch, wv);
#pragma unroll
            for (int r = 0; r < kNhwcRw; ++r) {
              const int iw = (ow0 + r) * g.s_w - g.p_w + kw * g.d_w;
              if (iw >= 0 && iw < g.src_w) {
                acc_t x[V];
                load_vec<scalar_t, V>(rowp + iw * g.src_c, x);
#pragma unroll
                for (int l = 0; l < V; ++l) acc[r][l] += x[l] * wv[l];
              }
            }
          }
        }
      }
    }
    scalar_t* out = dst + (int64_t(n) * g.dst_h + oh) * g.dst_w * g.dst_c + dc;
#pragma unroll
    for (int r = 0; r < kNhwcRw; ++r) {
      if (ow0 + r < g.dst_w) store_vec<scalar_t, V>(out + (ow0 + r) * g.dst_c, acc[r]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Generic kernels (any size, 32- or 64-bit indices)
// ---------------------------------------------------------------------------------------------

struct GenericGeom {
  int64_t n, c, mult, o, h, w, oh, ow;
  int64_t k_h, k_w, s_h, s_w, p_h, p_w, d_h, d_w;
  int64_t step_h, step_w;  // grad_input gather: taps between two that hit an output row / column
  int64_t total;
};

// Forward, one output per thread (fallback for halos too large for shared memory or tensors
// past 2^31 elements). Thread mapping: flat output index in memory order (ow or oc fastest).
// Speed: every tap is a load through L1, k^2 loads per output.
template <typename scalar_t, typename index_t, bool CL>
__global__ void __launch_bounds__(kThreads) dw_conv_direct_kernel(
    const scalar_t* __restrict__ input, const scalar_t* __restrict__ weight,
    const scalar_t* __restrict__ bias, scalar_t* __restrict__ out, const GenericGeom g) {
  using acc_t = opmath_t<scalar_t>;
  const index_t C = g.c, O = g.o, H = g.h, W = g.w, OH = g.oh, OW = g.ow, M = g.mult;
  const index_t KH = g.k_h, KW = g.k_w;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < g.total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const index_t ii = index_t(i);
    index_t n, oc, oh, ow;
    if constexpr (CL) {
      oc = ii % O;
      index_t t = ii / O;
      ow = t % OW;
      t /= OW;
      oh = t % OH;
      n = t / OH;
    } else {
      ow = ii % OW;
      index_t t = ii / OW;
      oh = t % OH;
      t /= OH;
      oc = t % O;
      n = t / O;
    }
    const index_t c = oc / M;
    acc_t acc = bias != nullptr ? static_cast<acc_t>(bias[oc]) : acc_t(0);
    const scalar_t* wp = weight + oc * KH * KW;
    for (index_t kh = 0; kh < KH; ++kh) {
      const index_t ih = oh * index_t(g.s_h) - index_t(g.p_h) + kh * index_t(g.d_h);
      if (ih < 0 || ih >= H) continue;
      for (index_t kw = 0; kw < KW; ++kw) {
        const index_t iw = ow * index_t(g.s_w) - index_t(g.p_w) + kw * index_t(g.d_w);
        if (iw < 0 || iw >= W) continue;
        const index_t off = CL ? ((n * H + ih) * W + iw) * C + c : ((n * C + c) * H + ih) * W + iw;
        acc += static_cast<acc_t>(input[off]) * static_cast<acc_t>(wp[kh * KW + kw]);
      }
    }
    out[ii] = static_cast<scalar_t>(acc);
  }
}

// grad_input as a gather, one input element per thread (strided convolutions, and the fallback).
// Thread mapping: flat grad_input index in memory order. For stride s and dilation d only every
// s / gcd(s, d)-th tap lands on an output position; the loops start at the first such tap and
// step over the rest, so a thread touches about (k / s)^2 * m grad_output values.
// Speed: L1 / L2 loads of grad_output; writes every grad_input element once (no zero fill).
template <typename scalar_t, typename index_t, bool CL>
__global__ void __launch_bounds__(kThreads) dw_grad_input_gather_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ weight,
    scalar_t* __restrict__ grad_in, const GenericGeom g) {
  using acc_t = opmath_t<scalar_t>;
  const index_t C = g.c, O = g.o, H = g.h, W = g.w, OH = g.oh, OW = g.ow, M = g.mult;
  const index_t KH = g.k_h, KW = g.k_w, SH = g.s_h, SW = g.s_w, PH = g.p_h, PW = g.p_w;
  const index_t DH = g.d_h, DW = g.d_w, STH = g.step_h, STW = g.step_w;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < g.total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const index_t ii = index_t(i);
    index_t n, c, ih, iw;
    if constexpr (CL) {
      c = ii % C;
      index_t t = ii / C;
      iw = t % W;
      t /= W;
      ih = t % H;
      n = t / H;
    } else {
      iw = ii % W;
      index_t t = ii / W;
      ih = t % H;
      t /= H;
      c = t % C;
      n = t / C;
    }
    // First taps whose offset makes (i + p - tap * d) a multiple of s; none when no tap in the
    // first period does.
    index_t kh0 = -1, kw0 = -1;
    for (index_t kh = 0; kh < imin(STH, KH); ++kh) {
      if ((ih + PH - kh * DH) % SH == 0) {
        kh0 = kh;
        break;
      }
    }
    for (index_t kw = 0; kw < imin(STW, KW); ++kw) {
      if ((iw + PW - kw * DW) % SW == 0) {
        kw0 = kw;
        break;
      }
    }
    acc_t acc = acc_t(0);
    if (kh0 >= 0 && kw0 >= 0) {
      for (index_t kh = kh0; kh < KH; kh += STH) {
        const index_t nh = ih + PH - kh * DH;
        if (nh < 0) break;  // later taps only move further up
        const index_t oh = nh / SH;
        if (oh >= OH) continue;
        for (index_t kw = kw0; kw < KW; kw += STW) {
          const index_t nw = iw + PW - kw * DW;
          if (nw < 0) break;
          const index_t ow = nw / SW;
          if (ow >= OW) continue;
          for (index_t k = 0; k < M; ++k) {
            const index_t oc = c * M + k;
            const index_t off =
                CL ? ((n * OH + oh) * OW + ow) * O + oc : ((n * O + oc) * OH + oh) * OW + ow;
            acc += static_cast<acc_t>(grad_out[off]) *
                static_cast<acc_t>(weight[(oc * KH + kh) * KW + kw]);
          }
        }
      }
    }
    grad_in[ii] = static_cast<scalar_t>(acc);
  }
}

// ---------------------------------------------------------------------------------------------
// grad_weight
// ---------------------------------------------------------------------------------------------

// Deterministic in-block sum of K*K per-thread partials (warp shuffles in a fixed pattern, then
// warps in order), written to out[0, K*K). blockDim.x must be a multiple of 32.
template <typename acc_t, int KK>
__device__ __forceinline__ void block_reduce_taps(const acc_t (&acc)[KK], acc_t* red,
                                                  acc_t* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
#pragma unroll
  for (int i = 0; i < KK; ++i) {
    acc_t v = acc[i];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) red[warp * KK + i] = v;
  }
  __syncthreads();
  // a block can be a single warp, fewer threads than the 49 taps of k = 7
  for (int i = threadIdx.x; i < KK; i += blockDim.x) {
    acc_t s = acc_t(0);
    for (int w = 0; w < nwarps; ++w) s += red[w * KK + i];
    out[i] = s;
  }
  __syncthreads();
}

// grad_weight, NCHW, k in {3, 5, 7}.
// Thread mapping: as the forward tile (plane slot z = batch item, row group, column); every
// thread keeps all k*k partial sums of one output channel in registers.
// Tiling: a block owns (output channel, slice of the (batch group, tile) items, taken with
// stride `slices`); per item it stages the input tile + halo of pz batch items in shared
// memory (each input element read from DRAM once per tile, not k^2 times), reads its kRows
// grad_output values once into registers and forms all k*k products. The block sum goes to
// partial[slice][oc][tap]; dw_grad_weight_finish_kernel adds the slices.
// Speed: DRAM traffic (input + grad_output, once each per output channel) for small k;
// shared-memory loads otherwise.
template <typename scalar_t, int K>
__global__ void __launch_bounds__(kThreads) dw_grad_weight_tile_nchw_kernel(
    const scalar_t* __restrict__ input, const scalar_t* __restrict__ grad_out,
    opmath_t<scalar_t>* __restrict__ partial, const TileGeom g, int64_t slices, int out_channels) {
  using acc_t = opmath_t<scalar_t>;
  constexpr int KK = K * K;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  scalar_t* tile = reinterpret_cast<scalar_t*>(smem_raw);
  acc_t* red = reinterpret_cast<acc_t*>(smem_raw + g.red_offset);

  const int tid = threadIdx.x;
  const int col = tid % g.tile_w;
  const int rg = (tid / g.tile_w) % g.row_groups;
  const int z = tid / (g.tile_w * g.row_groups);
  const int tile_h = g.row_groups * kRows;
  const scalar_t* tile_z = tile + z * g.in_tile_h * g.pitch;
  const int64_t out_plane = int64_t(g.dst_h) * g.dst_w;
  const int64_t units = int64_t(out_channels) * slices;

  for (int64_t q = blockIdx.x; q < units; q += gridDim.x) {
    const int oc = int(q % out_channels);  // channels fastest: concurrent blocks share a slice
    const int64_t slice = q / out_channels;
    const int c = oc / g.mult;
    acc_t acc[KK];
#pragma unroll
    for (int i = 0; i < KK; ++i) acc[i] = acc_t(0);

    for (int64_t it = slice; it < g.total_blocks; it += slices) {
      const int tx = int(it % g.tiles_w);
      const int64_t t = it / g.tiles_w;
      const int ty = int(t % g.tiles_h);
      const int64_t n0 = (t / g.tiles_h) * g.pz;
      const int nz = int(imin<int64_t>(g.pz, g.planes - n0));
      const int oh0 = ty * tile_h;
      const int ow0 = tx * g.tile_w;
      const int shift = load_tile(tile, input, g, n0 * g.channels + c, g.channels, nz,
                                  oh0 * g.s_h - g.p_h, ow0 * g.s_w - g.p_w);
      __syncthreads();
      if (z < nz) {
        const scalar_t* go = grad_out + ((n0 + z) * out_channels + oc) * out_plane;
        const int ow = ow0 + col;
        acc_t gv[kRows];
        bool valid[kRows];
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const int oh = oh0 + rg * kRows + r;
          // outputs past the edge contribute nothing. Their products are skipped, not
          // multiplied by zero: the tile cells they would read can hold input that no output
          // reads, and 0 * inf would put a NaN in grad_weight where torch's is finite.
          valid[r] = oh < g.dst_h && ow < g.dst_w;
          gv[r] = valid[r] ? static_cast<acc_t>(go[oh * g.dst_w + ow]) : acc_t(0);
        }
        if (g.unit_h) {
          const scalar_t* base = tile_z + (rg * kRows) * g.pitch + shift + col * g.s_w;
#pragma unroll
          for (int j = 0; j < kRows + K - 1; ++j) {
            const scalar_t* rowp = base + j * g.pitch;
#pragma unroll
            for (int kw = 0; kw < K; ++kw) {
              const acc_t x = static_cast<acc_t>(rowp[kw * g.d_w]);
#pragma unroll
              for (int r = 0; r < kRows; ++r) {
                const int kh = j - r;
                if (kh >= 0 && kh < K && valid[r]) acc[kh * K + kw] += gv[r] * x;
              }
            }
          }
        } else {
          const scalar_t* base = tile_z + (rg * kRows * g.s_h) * g.pitch + shift + col * g.s_w;
          const int rstep = g.s_h * g.pitch;
#pragma unroll
          for (int kh = 0; kh < K; ++kh) {
#pragma unroll
            for (int kw = 0; kw < K; ++kw) {
              const scalar_t* p = base + kh * g.d_h * g.pitch + kw * g.d_w;
#pragma unroll
              for (int r = 0; r < kRows; ++r) {
                if (valid[r]) acc[kh * K + kw] += gv[r] * static_cast<acc_t>(p[r * rstep]);
              }
            }
          }
        }
      }
      __syncthreads();
    }
    block_reduce_taps<acc_t, KK>(acc, red, partial + (slice * out_channels + oc) * KK);
  }
}

struct GwNhwcGeom {
  int n, h, w, c, o, oh, ow, mult;
  int s_h, s_w, p_h, p_w, d_h, d_w;
  int cb, rows, in_rows, in_cols;  // channel lanes, output rows per tile, staged tile size
  int tiles_h, tiles_w;
  int red_offset;
  int64_t items, chunks, slices;   // items per channel chunk: n * tiles_h * tiles_w
  bool unit_w;
};

// grad_weight, channels_last, k in {3, 5, 7}.
// Thread mapping: thread = (spatial lane = output row of the tile, channel lane), channels
// fastest; each thread keeps the k*k partial sums of one output channel.
// Tiling: a block owns (chunk of cb output channels, slice of (n, tile) items); per item it
// stages the input tile + halo for the chunk's input channels in shared memory ([row][col][ch],
// so a warp reads consecutive channels), each input element read once per tile; a thread
// then walks its output row of gw_tile_w(k) outputs, reusing each staged value for up to k
// outputs along W (unit stride along W). Partial sums are added across spatial lanes in
// lane order, tap by tap.
// Speed: DRAM traffic for k = 3; shared-memory loads for larger k.
// Two blocks per SM (<= 128 registers) except in double, whose k*k partial sums take twice
// the registers.
template <typename scalar_t, int K>
__global__ void __launch_bounds__(kThreads, sizeof(opmath_t<scalar_t>) == 8 ? 1 : 2)
    dw_grad_weight_nhwc_kernel(
    const scalar_t* __restrict__ input, const scalar_t* __restrict__ grad_out,
    opmath_t<scalar_t>* __restrict__ partial, const GwNhwcGeom g) {
  using acc_t = opmath_t<scalar_t>;
  constexpr int KK = K * K;
  constexpr int TW = gw_tile_w(K);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  scalar_t* tile = reinterpret_cast<scalar_t*>(smem_raw);
  acc_t* red = reinterpret_cast<acc_t*>(smem_raw + g.red_offset);
  const int tid = threadIdx.x;
  const int cl = tid % g.cb;
  const int sl = tid / g.cb;
  const int64_t units = g.chunks * g.slices;
  const int row_elems = g.in_cols * g.cb;

  for (int64_t q = blockIdx.x; q < units; q += gridDim.x) {
    const int chunk = int(q % g.chunks);  // channels fastest: concurrent blocks share a slice
    const int64_t slice = q / g.chunks;
    const int oc_lo = chunk * g.cb;
    const int oc = oc_lo + cl;
    const bool active = oc < g.o;
    const int c_lo = oc_lo / g.mult;
    const int nci = (imin(oc_lo + g.cb, g.o) - 1) / g.mult - c_lo + 1;
    const int cs = active ? oc / g.mult - c_lo : 0;
    acc_t acc[KK];
#pragma unroll
    for (int i = 0; i < KK; ++i) acc[i] = acc_t(0);

    for (int64_t it = slice; it < g.items; it += g.slices) {
      const int tx = int(it % g.tiles_w);
      const int64_t t = it / g.tiles_w;
      const int ty = int(t % g.tiles_h);
      const int n = int(t / g.tiles_h);
      const int oh0 = ty * g.rows;
      const int ow0 = tx * TW;
      const int ih0 = oh0 * g.s_h - g.p_h;
      const int iw0 = ow0 * g.s_w - g.p_w;
      const scalar_t* in_img = input + int64_t(n) * g.h * g.w * g.c + c_lo;
      const int per_row = g.in_cols * nci;
      const int count = g.in_rows * per_row;
      for (int i = tid; i < count; i += blockDim.x) {
        const int row = i / per_row;
        const int rem = i - row * per_row;
        const int col = rem / nci;
        const int ch = rem - col * nci;
        const int ih = ih0 + row;
        const int iw = iw0 + col;
        scalar_t v = scalar_t(0);
        if (ih >= 0 && ih < g.h && iw >= 0 && iw < g.w) v = in_img[(ih * g.w + iw) * g.c + ch];
        tile[row * row_elems + col * g.cb + ch] = v;
      }
      __syncthreads();
      const int oh = oh0 + sl;
      if (active && oh < g.oh) {
        const scalar_t* go = grad_out + (int64_t(n) * g.oh + oh) * g.ow * g.o + oc;
        acc_t gv[TW];
        bool valid[TW];  // as in the NCHW kernel: past-the-edge products skipped, not zeroed
#pragma unroll
        for (int e = 0; e < TW; ++e) {
          const int ow = ow0 + e;
          valid[e] = ow < g.ow;
          gv[e] = valid[e] ? static_cast<acc_t>(go[ow * g.o]) : acc_t(0);
        }
        const scalar_t* tz = tile + cs;
        if (g.unit_w) {
#pragma unroll
          for (int kh = 0; kh < K; ++kh) {
            const scalar_t* rowp = tz + (sl * g.s_h + kh * g.d_h) * row_elems;
#pragma unroll
            for (int j = 0; j < TW + K - 1; ++j) {
              const acc_t x = static_cast<acc_t>(rowp[j * g.cb]);
#pragma unroll
              for (int e = 0; e < TW; ++e) {
                const int kw = j - e;
                if (kw >= 0 && kw < K && valid[e]) acc[kh * K + kw] += gv[e] * x;
              }
            }
          }
        } else {
#pragma unroll
          for (int kh = 0; kh < K; ++kh) {
            const scalar_t* rowp = tz + (sl * g.s_h + kh * g.d_h) * row_elems;
#pragma unroll
            for (int kw = 0; kw < K; ++kw) {
#pragma unroll
              for (int e = 0; e < TW; ++e) {
                if (valid[e])
                  acc[kh * K + kw] +=
                      gv[e] * static_cast<acc_t>(rowp[(e * g.s_w + kw * g.d_w) * g.cb]);
              }
            }
          }
        }
      }
      __syncthreads();
    }
    // Sum over spatial lanes in lane order, one tap at a time.
#pragma unroll
    for (int i = 0; i < KK; ++i) {
      red[tid] = acc[i];
      __syncthreads();
      if (sl == 0 && active) {
        acc_t s = acc_t(0);
        for (int j = 0; j < g.rows; ++j) s += red[j * g.cb + cl];
        partial[(slice * g.o + oc) * KK + i] = s;
      }
      __syncthreads();
    }
  }
}

struct GwGenericGeom {
  int64_t n, c, o, h, w, oh, ow, mult;
  int64_t k_h, k_w, s_h, s_w, p_h, p_w, d_h, d_w;
  int64_t in_sn, in_sc, in_sh, in_sw;  // element strides of the input
  int64_t go_sn, go_sc, go_sh, go_sw;  // and of grad_output
  int64_t slices, rows_per_slice, tap_chunks;
  int tap_lanes, pos_lanes;
};

// grad_weight for any kernel size, stride, dilation and layout (strides), 32- or 64-bit.
// Thread mapping: thread = (tap lane, position lane), positions fastest; a block owns
// (output channel, chunk of tap_lanes taps, slice of (n, oh) rows), each thread summing one
// tap over the slice's output positions ow = lane, lane + pos_lanes, ... of every row; the
// position lanes are then added in order and partial[slice][oc][tap] written.
// Speed: two loads (L1-cached) per multiply-add; meant for the shapes the tiled kernels do not
// take (large or non-square kernels, huge dilation, tensors past 2^31 elements).
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads) dw_grad_weight_generic_kernel(
    const scalar_t* __restrict__ input, const scalar_t* __restrict__ grad_out,
    opmath_t<scalar_t>* __restrict__ partial, const GwGenericGeom g) {
  using acc_t = opmath_t<scalar_t>;
  __shared__ acc_t red[kThreads];
  const int tid = threadIdx.x;
  const int tl = tid / g.pos_lanes;
  const int pl = tid % g.pos_lanes;
  const index_t taps = index_t(g.k_h * g.k_w);
  const index_t OW = g.ow, H = g.h, W = g.w;
  const index_t SH = g.s_h, SW = g.s_w, PH = g.p_h, PW = g.p_w, DH = g.d_h, DW = g.d_w;
  const int64_t rows_total = g.n * g.oh;
  const int64_t units = g.o * g.tap_chunks * g.slices;
  for (int64_t q = blockIdx.x; q < units; q += gridDim.x) {
    const index_t oc = index_t(q % g.o);
    const int64_t rest = q / g.o;
    const index_t chunk = index_t(rest % g.tap_chunks);
    const int64_t slice = rest / g.tap_chunks;
    const index_t tap = chunk * g.tap_lanes + tl;
    const bool active = tap < taps;
    acc_t acc = acc_t(0);
    if (active) {
      const index_t kh = tap / index_t(g.k_w);
      const index_t kw = tap - kh * index_t(g.k_w);
      const index_t c = oc / index_t(g.mult);
      // output columns whose tap kw lands inside the input
      const index_t a = PW - kw * DW;
      const index_t ow_lo = a > 0 ? (a + SW - 1) / SW : 0;
      const index_t bnum = W - 1 + PW - kw * DW;
      const index_t ow_hi = bnum < 0 ? 0 : imin(OW, bnum / SW + 1);
      const int64_t row_lo = slice * g.rows_per_slice;
      const int64_t row_hi = imin(row_lo + g.rows_per_slice, rows_total);
      for (int64_t row = row_lo; row < row_hi; ++row) {
        const index_t n = index_t(row / g.oh);
        const index_t oh = index_t(row - int64_t(n) * g.oh);
        const index_t ih = oh * SH - PH + kh * DH;
        if (ih < 0 || ih >= H) continue;
        const scalar_t* in_row = input + n * index_t(g.in_sn) + c * index_t(g.in_sc) +
            ih * index_t(g.in_sh);
        const scalar_t* go_row = grad_out + n * index_t(g.go_sn) + oc * index_t(g.go_sc) +
            oh * index_t(g.go_sh);
        for (index_t ow = ow_lo + pl; ow < ow_hi; ow += g.pos_lanes) {
          const index_t iw = ow * SW - PW + kw * DW;
          acc += static_cast<acc_t>(go_row[ow * index_t(g.go_sw)]) *
              static_cast<acc_t>(in_row[iw * index_t(g.in_sw)]);
        }
      }
    }
    red[tid] = acc;
    __syncthreads();
    if (active && pl == 0) {
      acc_t s = acc_t(0);
      for (int j = 0; j < g.pos_lanes; ++j) s += red[tl * g.pos_lanes + j];
      partial[(slice * g.o + oc) * taps + tap] = s;
    }
    __syncthreads();
  }
}

// Adds the per-slice partial sums in slice order. Thread mapping: one weight element per
// thread, consecutive threads on consecutive elements. Speed: negligible (reads slices * |w|).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) dw_grad_weight_finish_kernel(
    const opmath_t<scalar_t>* __restrict__ partial, scalar_t* __restrict__ grad_weight,
    int64_t slices, int64_t count) {
  using acc_t = opmath_t<scalar_t>;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < count;
       e += int64_t(gridDim.x) * blockDim.x) {
    acc_t s = acc_t(0);
    for (int64_t sl = 0; sl < slices; ++sl) s += partial[sl * count + e];
    grad_weight[e] = static_cast<scalar_t>(s);
  }
}

// ---------------------------------------------------------------------------------------------
// Host launchers
// ---------------------------------------------------------------------------------------------

GenericGeom generic_geom(const Conv2dShape& s, int64_t total) {
  GenericGeom g;
  g.n = s.batch;
  g.c = s.in_channels;
  g.mult = s.out_channels / s.in_channels;
  g.o = s.out_channels;
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
  g.step_h = s.stride_h / std::gcd(s.stride_h, s.dil_h);
  g.step_w = s.stride_w / std::gcd(s.stride_w, s.dil_w);
  g.total = total;
  return g;
}

// Forward-form correlation on the tiled NCHW kernel; false when the tile does not fit.
template <typename scalar_t>
bool launch_tile_nchw(const ConvForm& f, const scalar_t* src, const scalar_t* w,
                      const scalar_t* b, scalar_t* dst) {
  if (!form_is_small(f)) return false;
  constexpr int V = vec16<scalar_t>();
  const bool vec = aligned16(src) && f.src_w % V == 0;
  TileGeom g;
  int64_t smem = 0;
  int threads = 0;
  if (!plan_nchw_tile(g, f, f.n * f.c, sizeof(scalar_t), vec, 0, smem, threads)) return false;
  const unsigned grid = grid_for_blocks(g.total_blocks);
  auto stream = at::cuda::getCurrentCUDAStream();
  auto go = [&](auto kernel) {
    kernel<<<grid, threads, size_t(smem), stream>>>(src, w, b, dst, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  const int k = compile_time_k(f);
  if (f.grad_input) {
    switch (k) {
      case 3: go(dw_conv_tile_nchw_kernel<scalar_t, 3, true>); break;
      case 5: go(dw_conv_tile_nchw_kernel<scalar_t, 5, true>); break;
      case 7: go(dw_conv_tile_nchw_kernel<scalar_t, 7, true>); break;
      default: go(dw_conv_tile_nchw_kernel<scalar_t, 0, true>); break;
    }
  } else {
    switch (k) {
      case 3: go(dw_conv_tile_nchw_kernel<scalar_t, 3, false>); break;
      case 5: go(dw_conv_tile_nchw_kernel<scalar_t, 5, false>); break;
      case 7: go(dw_conv_tile_nchw_kernel<scalar_t, 7, false>); break;
      default: go(dw_conv_tile_nchw_kernel<scalar_t, 0, false>); break;
    }
  }
  return true;
}

// Forward-form correlation on the channels_last kernel; false when sizes need 64-bit indices.
// wt is the (taps, dst or src channels) transposed weight.
template <typename scalar_t>
bool launch_nhwc(const ConvForm& f, const scalar_t* src, const scalar_t* wt, const scalar_t* b,
                 scalar_t* dst) {
  if (!form_is_small(f)) return false;
  constexpr int VEC = vec16<scalar_t>();
  const bool vec = f.mult == 1 && f.c % VEC == 0 && aligned16(src) && aligned16(wt) &&
      aligned16(dst);
  const int v = vec ? VEC : 1;
  NhwcGeom g;
  g.n = int(f.n);
  g.mult = int(f.mult);
  g.wc = int(f.c * f.mult);
  g.src_h = int(f.src_h);
  g.src_w = int(f.src_w);
  g.src_c = int(f.src_c);
  g.dst_h = int(f.dst_h);
  g.dst_w = int(f.dst_w);
  g.dst_c = int(f.dst_c);
  g.s_h = int(f.s_h);
  g.s_w = int(f.s_w);
  g.p_h = int(f.p_h);
  g.p_w = int(f.p_w);
  g.d_h = int(f.d_h);
  g.d_w = int(f.d_w);
  g.k_h = int(f.k_h);
  g.k_w = int(f.k_w);
  g.cv = int(f.dst_c / v);
  g.owg = int(ceil_div(f.dst_w, kNhwcRw));
  g.items = f.n * f.dst_h * g.owg * g.cv;
  g.unit_w = f.s_w == 1 && f.d_w == 1;
  const unsigned grid = grid_for_items(g.items, kThreads);
  auto stream = at::cuda::getCurrentCUDAStream();
  auto go = [&](auto kernel) {
    kernel<<<grid, kThreads, 0, stream>>>(src, wt, b, dst, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  const int k = vec ? compile_time_k(f) : 0;
  if (f.grad_input) {
    if (!vec) {
      go(dw_conv_nhwc_kernel<scalar_t, 0, 1, true>);
    } else {
      switch (k) {
        case 3: go(dw_conv_nhwc_kernel<scalar_t, 3, VEC, true>); break;
        case 5: go(dw_conv_nhwc_kernel<scalar_t, 5, VEC, true>); break;
        case 7: go(dw_conv_nhwc_kernel<scalar_t, 7, VEC, true>); break;
        default: go(dw_conv_nhwc_kernel<scalar_t, 0, VEC, true>); break;
      }
    }
  } else {
    if (!vec) {
      go(dw_conv_nhwc_kernel<scalar_t, 0, 1, false>);
    } else {
      switch (k) {
        case 3: go(dw_conv_nhwc_kernel<scalar_t, 3, VEC, false>); break;
        case 5: go(dw_conv_nhwc_kernel<scalar_t, 5, VEC, false>); break;
        case 7: go(dw_conv_nhwc_kernel<scalar_t, 7, VEC, false>); break;
        default: go(dw_conv_nhwc_kernel<scalar_t, 0, VEC, false>); break;
      }
    }
  }
  return true;
}

template <typename scalar_t>
void launch_direct(const Conv2dShape& s, bool cl, const scalar_t* x, const scalar_t* w,
                   const scalar_t* b, scalar_t* out) {
  const int64_t total = s.batch * s.out_channels * s.out_h * s.out_w;
  const GenericGeom g = generic_geom(s, total);
  const unsigned grid = grid_for_items(total, kThreads);
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool i32 = use_int32({s.batch * s.in_channels * s.in_h * s.in_w, total,
                              s.out_channels * s.kernel_h * s.kernel_w}) &&
      is_small(s.stride_h) && is_small(s.stride_w) && is_small(s.pad_h) && is_small(s.pad_w) &&
      is_small(s.dil_h) && is_small(s.dil_w) && is_small(s.kernel_h) && is_small(s.kernel_w);
  auto go = [&](auto kernel) {
    kernel<<<grid, kThreads, 0, stream>>>(x, w, b, out, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (i32) {
    cl ? go(dw_conv_direct_kernel<scalar_t, int32_t, true>)
       : go(dw_conv_direct_kernel<scalar_t, int32_t, false>);
  } else {
    cl ? go(dw_conv_direct_kernel<scalar_t, int64_t, true>)
       : go(dw_conv_direct_kernel<scalar_t, int64_t, false>);
  }
}

template <typename scalar_t>
void launch_gather(const Conv2dShape& s, bool cl, const scalar_t* go_ptr, const scalar_t* w,
                   scalar_t* gi) {
  const int64_t total = s.batch * s.in_channels * s.in_h * s.in_w;
  const GenericGeom g = generic_geom(s, total);
  const unsigned grid = grid_for_items(total, kThreads);
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool i32 = use_int32({s.batch * s.out_channels * s.out_h * s.out_w, total,
                              s.out_channels * s.kernel_h * s.kernel_w}) &&
      is_small(s.stride_h) && is_small(s.stride_w) && is_small(s.pad_h) && is_small(s.pad_w) &&
      is_small(s.dil_h) && is_small(s.dil_w) && is_small(s.kernel_h) && is_small(s.kernel_w);
  auto go = [&](auto kernel) {
    kernel<<<grid, kThreads, 0, stream>>>(go_ptr, w, gi, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (i32) {
    cl ? go(dw_grad_input_gather_kernel<scalar_t, int32_t, true>)
       : go(dw_grad_input_gather_kernel<scalar_t, int32_t, false>);
  } else {
    cl ? go(dw_grad_input_gather_kernel<scalar_t, int64_t, true>)
       : go(dw_grad_input_gather_kernel<scalar_t, int64_t, false>);
  }
}

// The (taps, O) transposed weight the channels_last kernels read as channel vectors.
at::Tensor transposed_weight(const at::Tensor& w) {
  return w.reshape({w.size(0), w.size(2) * w.size(3)}).t().contiguous();
}

// grad_weight partials: returns the (slices, O, taps) buffer's slice count after launching.
template <typename scalar_t>
bool launch_grad_weight_tile_nchw(const Conv2dShape& s, const ConvForm& f,
                                  const scalar_t* x, const scalar_t* go,
                                  const at::TensorOptions& acc_opts, at::Tensor& partial,
                                  int64_t& slices) {
  using acc_t = opmath_t<scalar_t>;
  const int k = compile_time_k(f);
  if (k == 0 || !form_is_small(f)) return false;
  constexpr int V = vec16<scalar_t>();
  const bool vec = aligned16(x) && f.src_w % V == 0;
  TileGeom g;
  int64_t smem = 0;
  int threads = 0;
  const int64_t extra = int64_t(kThreads / 32) * k * k * int64_t(sizeof(acc_t));
  if (!plan_nchw_tile(g, f, f.n, sizeof(scalar_t), vec, extra, smem, threads)) return false;
  const int64_t taps = int64_t(k) * k;
  slices = imin<int64_t>(imax<int64_t>(ceil_div(kGwTargetBlocks, s.out_channels), 1),
                         g.total_blocks);
  partial = at::empty({slices, s.out_channels, taps}, acc_opts);
  acc_t* part = partial.data_ptr<acc_t>();
  const unsigned grid = grid_for_blocks(slices * s.out_channels);
  auto stream = at::cuda::getCurrentCUDAStream();
  const int oc = int(s.out_channels);
  auto go_k = [&](auto kernel) {
    kernel<<<grid, threads, size_t(smem), stream>>>(x, go, part, g, slices, oc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (k) {
    case 3: go_k(dw_grad_weight_tile_nchw_kernel<scalar_t, 3>); break;
    case 5: go_k(dw_grad_weight_tile_nchw_kernel<scalar_t, 5>); break;
    default: go_k(dw_grad_weight_tile_nchw_kernel<scalar_t, 7>); break;
  }
  return true;
}

template <typename scalar_t>
bool launch_grad_weight_nhwc(const Conv2dShape& s, const ConvForm& f, const scalar_t* x,
                             const scalar_t* go, const at::TensorOptions& acc_opts,
                             at::Tensor& partial, int64_t& slices) {
  using acc_t = opmath_t<scalar_t>;
  const int k = compile_time_k(f);
  if (k == 0 || !form_is_small(f)) return false;
  const int64_t elem = sizeof(scalar_t);
  int64_t cb = 1;
  while (cb < 32 && cb < s.out_channels) cb *= 2;
  int64_t rows = imin<int64_t>(kThreads / cb, 32);
  int64_t in_rows = 0, in_cols = 0, tile_bytes = 0;
  for (;;) {
    in_rows = (rows - 1) * s.stride_h + (k - 1) * s.dil_h + 1;
    in_cols = (gw_tile_w(k) - 1) * s.stride_w + (k - 1) * s.dil_w + 1;
    tile_bytes = round_up(in_rows * in_cols * cb * elem, 16);
    if (tile_bytes + kThreads * int64_t(sizeof(acc_t)) <= kSmemBudget) break;
    if (rows > 1) {
      rows /= 2;
    } else if (cb > 1) {
      cb /= 2;
    } else {
      return false;
    }
  }
  GwNhwcGeom g;
  g.n = int(s.batch);
  g.h = int(s.in_h);
  g.w = int(s.in_w);
  g.c = int(s.in_channels);
  g.o = int(s.out_channels);
  g.oh = int(s.out_h);
  g.ow = int(s.out_w);
  g.mult = int(s.out_channels / s.in_channels);
  g.s_h = int(s.stride_h);
  g.s_w = int(s.stride_w);
  g.p_h = int(s.pad_h);
  g.p_w = int(s.pad_w);
  g.d_h = int(s.dil_h);
  g.d_w = int(s.dil_w);
  g.cb = int(cb);
  g.rows = int(rows);
  g.in_rows = int(in_rows);
  g.in_cols = int(in_cols);
  g.tiles_h = int(ceil_div(s.out_h, rows));
  g.tiles_w = int(ceil_div(s.out_w, gw_tile_w(k)));
  g.red_offset = int(tile_bytes);
  g.items = s.batch * g.tiles_h * g.tiles_w;
  g.chunks = ceil_div(s.out_channels, cb);
  g.unit_w = s.stride_w == 1 && s.dil_w == 1;
  slices = imin<int64_t>(imax<int64_t>(ceil_div(kGwTargetBlocks, g.chunks), 1), g.items);
  g.slices = slices;
  const int64_t taps = int64_t(k) * k;
  partial = at::empty({slices, s.out_channels, taps}, acc_opts);
  acc_t* part = partial.data_ptr<acc_t>();
  const size_t smem = size_t(tile_bytes + kThreads * int64_t(sizeof(acc_t)));
  const unsigned grid = grid_for_blocks(g.chunks * slices);
  const int threads = int(cb * rows);
  auto stream = at::cuda::getCurrentCUDAStream();
  auto go_k = [&](auto kernel) {
    kernel<<<grid, threads, smem, stream>>>(x, go, part, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (k) {
    case 3: go_k(dw_grad_weight_nhwc_kernel<scalar_t, 3>); break;
    case 5: go_k(dw_grad_weight_nhwc_kernel<scalar_t, 5>); break;
    default: go_k(dw_grad_weight_nhwc_kernel<scalar_t, 7>); break;
  }
  return true;
}

template <typename scalar_t>
void launch_grad_weight_generic(const Conv2dShape& s, const at::Tensor& x, const at::Tensor& go,
                                const at::TensorOptions& acc_opts, at::Tensor& partial,
                                int64_t& slices) {
  using acc_t = opmath_t<scalar_t>;
  GwGenericGeom g;
  g.n = s.batch;
  g.c = s.in_channels;
  g.o = s.out_channels;
  g.h = s.in_h;
  g.w = s.in_w;
  g.oh = s.out_h;
  g.ow = s.out_w;
  g.mult = s.out_channels / s.in_channels;
  g.k_h = s.kernel_h;
  g.k_w = s.kernel_w;
  g.s_h = s.stride_h;
  g.s_w = s.stride_w;
  g.p_h = s.pad_h;
  g.p_w = s.pad_w;
  g.d_h = s.dil_h;
  g.d_w = s.dil_w;
  g.in_sn = x.stride(0);
  g.in_sc = x.stride(1);
  g.in_sh = x.stride(2);
  g.in_sw = x.stride(3);
  g.go_sn = go.stride(0);
  g.go_sc = go.stride(1);
  g.go_sh = go.stride(2);
  g.go_sw = go.stride(3);
  const int64_t taps = s.kernel_h * s.kernel_w;
  int64_t pos_lanes = 1;
  while (pos_lanes * 2 * taps <= kThreads) pos_lanes *= 2;
  g.pos_lanes = int(pos_lanes);
  g.tap_lanes = int(kThreads / pos_lanes);
  g.tap_chunks = ceil_div(taps, g.tap_lanes);
  const int64_t rows_total = s.batch * s.out_h;
  int64_t want = imin<int64_t>(
      imax<int64_t>(ceil_div(kGwTargetBlocks, s.out_channels * g.tap_chunks), 1), rows_total);
  g.rows_per_slice = ceil_div(rows_total, want);
  g.slices = ceil_div(rows_total, g.rows_per_slice);
  slices = g.slices;
  partial = at::empty({slices, s.out_channels, taps}, acc_opts);
  acc_t* part = partial.data_ptr<acc_t>();
  const unsigned grid = grid_for_blocks(s.out_channels * g.tap_chunks * slices);
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool i32 = use_int32({x.numel(), go.numel()}) && is_small(s.stride_h) &&
      is_small(s.stride_w) && is_small(s.pad_h) && is_small(s.pad_w) && is_small(s.dil_h) &&
      is_small(s.dil_w) && is_small(s.kernel_h) && is_small(s.kernel_w) &&
      is_small(s.out_channels) && is_small(s.in_h) && is_small(s.in_w) && is_small(s.out_h) &&
      is_small(s.out_w);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* gp = go.data_ptr<scalar_t>();
  if (i32) {
    dw_grad_weight_generic_kernel<scalar_t, int32_t>
        <<<grid, kThreads, 0, stream>>>(xp, gp, part, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    dw_grad_weight_generic_kernel<scalar_t, int64_t>
        <<<grid, kThreads, 0, stream>>>(xp, gp, part, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

at::Tensor depthwise_conv2d_forward_cuda(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* op = "depthwise_conv2d";
  // dtype and same-device checks for weight and bias against input
  const Conv2dShape s = check_depthwise_conv2d(op, input, weight, bias, stride, padding, dilation);
  c10::cuda::CUDAGuard guard(input.device());
  const at::MemoryFormat fmt = conv_memory_format(input, weight);
  at::Tensor out = at::empty({s.batch, s.out_channels, s.out_h, s.out_w},
                             input.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = input.contiguous(fmt);
  const at::Tensor w = weight.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  const at::Tensor wt = cl ? transposed_weight(w) : at::Tensor();
  const ConvForm f = forward_form(s);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "depthwise_conv2d_cuda", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* bp = has_bias ? b.data_ptr<scalar_t>() : nullptr;
    scalar_t* op_ = out.data_ptr<scalar_t>();
    const bool done = cl ? launch_nhwc<scalar_t>(f, xp, wt.data_ptr<scalar_t>(), bp, op_)
                         : launch_tile_nchw<scalar_t>(f, xp, wp, bp, op_);
    if (!done) launch_direct<scalar_t>(s, cl, xp, wp, bp, op_);
  });
  return out;
}

at::Tensor depthwise_conv2d_grad_input_cuda(
    const at::Tensor& grad_output, const at::Tensor& weight, at::IntArrayRef input_size,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* op = "_depthwise_conv2d_grad_input";
  const Conv2dShape s =
      check_depthwise_shapes(op, input_size, weight.sizes(), stride, padding, dilation);
  // dtype of grad_output; weight's dtype and device against grad_output
  check_grad_output(op, grad_output, weight, "weight", s);
  c10::cuda::CUDAGuard guard(grad_output.device());
  const at::MemoryFormat fmt = conv_memory_format(grad_output, weight);
  at::Tensor grad_input = at::empty(input_size, grad_output.options().memory_format(fmt));
  if (grad_input.numel() == 0) return grad_input;
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor go = grad_output.contiguous(fmt);
  const at::Tensor w = weight.contiguous();
  const bool strided = s.stride_h != 1 || s.stride_w != 1;
  const at::Tensor wt = cl && !strided ? transposed_weight(w) : at::Tensor();
  const ConvForm f = grad_input_form(s);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(),
                                  "depthwise_conv2d_grad_input_cuda", [&] {
    const scalar_t* gp = go.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* gip = grad_input.data_ptr<scalar_t>();
    bool done = false;
    if (!strided) {
      done = cl ? launch_nhwc<scalar_t>(f, gp, wt.data_ptr<scalar_t>(), nullptr, gip)
                : launch_tile_nchw<scalar_t>(f, gp, wp, nullptr, gip);
    }
    if (!done) launch_gather<scalar_t>(s, cl, gp, wp, gip);
  });
  return grad_input;
}

at::Tensor depthwise_conv2d_grad_weight_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, at::IntArrayRef weight_size,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* op = "_depthwise_conv2d_grad_weight";
  const Conv2dShape s =
      check_depthwise_shapes(op, input.sizes(), weight_size, stride, padding, dilation);
  // dtype of grad_output; input's dtype and device against grad_output
  check_grad_output(op, grad_output, input, "input", s);
  c10::cuda::CUDAGuard guard(grad_output.device());
  const at::MemoryFormat fmt = conv_memory_format(input, grad_output);
  at::Tensor grad_weight = at::empty(weight_size, grad_output.options());
  if (grad_output.numel() == 0) return grad_weight.zero_();  // batch 0: the sum is empty
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = input.contiguous(fmt);
  const at::Tensor go = grad_output.contiguous(fmt);
  const ConvForm f = forward_form(s);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(),
                                  "depthwise_conv2d_grad_weight_cuda", [&] {
    using acc_t = opmath_t<scalar_t>;
    const auto acc_opts = go.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = go.data_ptr<scalar_t>();
    at::Tensor partial;
    int64_t slices = 0;
    const bool done =
        cl ? launch_grad_weight_nhwc<scalar_t>(s, f, xp, gp, acc_opts, partial, slices)
           : launch_grad_weight_tile_nchw<scalar_t>(s, f, xp, gp, acc_opts, partial, slices);
    if (!done) launch_grad_weight_generic<scalar_t>(s, x, go, acc_opts, partial, slices);
    const int64_t count = grad_weight.numel();
    dw_grad_weight_finish_kernel<scalar_t>
        <<<grid_for_items(count, kThreads), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            partial.data_ptr<acc_t>(), grad_weight.data_ptr<scalar_t>(), slices, count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_weight;
}

// No fused CUDA kernel: the two backward kernels (each already one pass over grad_output).
std::vector<at::Tensor> depthwise_conv2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool bias_grad) {
  check_depthwise_backward("_depthwise_conv2d_backward", grad_output, input, weight, stride,
                           padding, dilation);
  c10::cuda::CUDAGuard guard(grad_output.device());
  return depthwise_backward_unfused(grad_output, input, weight, stride, padding, dilation,
                                    bias_grad, depthwise_conv2d_grad_input_cuda,
                                    depthwise_conv2d_grad_weight_cuda);
}

TORCH_LIBRARY_IMPL(fastconv, CUDA, m) {
  m.impl("_depthwise_conv2d_backward", &depthwise_conv2d_backward_cuda);
  m.impl("depthwise_conv2d", &depthwise_conv2d_forward_cuda);
  m.impl("_depthwise_conv2d_grad_input", &depthwise_conv2d_grad_input_cuda);
  m.impl("_depthwise_conv2d_grad_weight", &depthwise_conv2d_grad_weight_cuda);
}

}  // namespace fastconv
