// conv2d, algo="im2col": the convolution as GEMMs over the column matrix
// cols[(c, i, j), (n, oy, ox)] = padded_input[n, c, oy * sH + i * dH, ox * sW + j * dW],
// one tile at a time.
//
// Tiles: a group of `nb` whole images, or a block of one image's rows. They run in parallel
// (at::parallel_for, a contiguous range of tiles per thread, the tile count a multiple of the
// thread count where possible); inside a tile one thread builds, multiplies and consumes its
// own data, so it stays in that core's cache. Images are batched into one tile when an image
// has few output positions (kTileCols), so the GEMM's N dimension is not a sliver.
//
// Two GEMM back ends:
// * float32 / float64 where the build has AVX-512 (conv2d_gemm.h, a register-blocked GEMM
//   that reads B in place; about 3x MKL's sgemm on the target AMD EPYC, where MKL takes its
//   AVX2 path):
//   forward      out_g = W_g @ cols_g. cols are built per GEMM block (kKC rows x nc columns,
//                480 KiB, L2) by a table-driven im2col; a 1x1 / stride 1 / unpadded
//                convolution of whole images reads the input itself, no copy.
//   grad_input   cols_g = W_g^T @ grad_output_g (grad_output read in place), a block of a
//                few channels at a time (kColBlockBytes, L2), each block col2im'ed at once.
//   grad_weight  dW_g += grad_output_g @ cols_g^T with a dot-product kernel whose lanes run
//                along the output positions, so both operands are read row by row in place
//                (cols in blocks of kRows x kKT, L2; the input itself for 1x1).
//   Workspace per thread: one cols block (<= 1 MiB) plus, for batched small images, the
//   batch's output / grad_output planes (<= O x kTileCols elements).
// * bfloat16, and every dtype on a build without AVX-512: im2col into a column buffer, then
//   at::mm / at::addmm (MKL or oneDNN). Each tile's columns are at most kTileBytes and all
//   threads together hold at most kColumnCapBytes (32 MiB); a 1x1 / stride 1 / unpadded
//   convolution multiplies the input directly.
//
// Speed: the GEMM (2 * N * O * K * L FLOPs) bounds everything for large channel counts; the
// im2col copy (K * L elements, about 0.1 ns each) is the overhead, amortised over the output
// channels and kept cache resident by the blocking.
//
// grad_input, both back ends: with stride 1 and padding <= the dilated kernel extent it is
// the forward convolution of grad_output with the flipped, transposed kernel (no col2im, and
// the GEMM reduces over Og * kH * kW instead of Og). Otherwise GEMM to columns and a gather
// col2im: each input row sums the column entries that map onto it (float accumulator per
// row), so there are no atomics and no zero-fill pass. A tile owns a block of input rows and
// recomputes the few output rows its neighbour also needs (a halo of ceil((kH - 1) * dH / sH)
// rows).
//
// grad_weight: each part (one per thread) accumulates its tiles into its own dW, and the parts
// are summed in a fixed order, so the result is deterministic for a given thread count. On
// small feature maps (images batched into tiles) with at least 32 output channels per thread,
// the own-GEMM path splits the output channels between the threads instead
// (grad_weight_gemm_split_out): each element is summed by one thread, in tile order, so the
// result is the same for any thread count.
// bfloat16 accumulates in float32.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/conv2d.h"
#include "cpu/conv2d_gemm.h"

// kWorkerThreads: at::parallel_for's worker threads do not inherit the caller's dispatch state.
// The at::mm back end calls ATen ops there on views of the inputs, which may require grad; without
// the guard those calls would go through autograd (at::mm_out then refuses outright: "functions
// with out=... arguments don't support automatic differentiation"). The guard makes each worker
// dispatch below autograd, as the calling thread already does inside this kernel.
namespace fastconv {
namespace conv2d_cpu {
namespace {

// at::mm path: column bytes one tile may build: big enough that the GEMM's fixed costs
// (packing the weight panel, the call itself) are amortised, small enough to stay near the
// core's cache; and a hard cap on the columns held by all threads together.
constexpr int64_t kTileBytes = 4 << 20;
constexpr int64_t kColumnCapBytes = 32 << 20;
// Own-GEMM path: images are batched into one tile until it has about this many columns.
constexpr int64_t kTileCols = 1024;
// Own-GEMM grad_input: bytes of the column block one GEMM call produces (col2im then reads
// it from L2), and the most columns (output positions) a tile may span.
constexpr int64_t kColBlockBytes = 1 << 20;
constexpr int64_t kGradInputMaxCols = 4096;

int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool is_pointwise(const Conv2dShape& s) {
  return s.kernel_h == 1 && s.kernel_w == 1 && s.stride_h == 1 && s.stride_w == 1 &&
         s.pad_h == 0 && s.pad_w == 0;
}

// A tile is images [g * nb, min(N, (g + 1) * nb)) and rows [b * rows, (b + 1) * rows) of the
// "extent" (output rows for forward / grad_weight, input rows for grad_input); rows spans the
// whole extent whenever nb > 1.
struct Tiles {
  int64_t nb = 1, rows = 1, extent = 1, image_groups = 1, row_blocks = 1;
  int64_t count() const { return image_groups * row_blocks; }
};

int64_t gcd(int64_t a, int64_t b) { return b == 0 ? a : gcd(b, a % b); }

// Fills in the tile counts and, for one image per tile, splits rows further so that every
// thread gets the same number of tiles (when the batch alone does not give that).
Tiles balance(Tiles t, int64_t batch, int64_t threads) {
  t.image_groups = div_up(batch, t.nb);
  t.row_blocks = div_up(t.extent, t.rows);
  if (t.nb == 1 && t.count() % threads != 0 && t.count() < 8 * threads) {
    const int64_t want = t.row_blocks * (threads / gcd(t.count(), threads));
    t.rows = std::max<int64_t>(1, div_up(t.extent, want));
    t.row_blocks = div_up(t.extent, t.rows);
  }
  return t;
}

// `row_bytes`: column bytes per output row; `halo`: extra output rows a block of `rows` needs.
// `tiling_needed`: false when the tile needs no columns at all (1x1 without batching), so a
// whole image is one tile unless threads need more tiles.
Tiles plan_tiles(int64_t batch, int64_t extent, int64_t rows_to_out_num, int64_t rows_to_out_den,
                 int64_t halo, int64_t row_bytes, int64_t out_rows, bool tiling_needed) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t budget = std::min(kTileBytes, kColumnCapBytes / threads);
  const int64_t image_bytes = row_bytes * out_rows;
  Tiles t;
  t.extent = extent;
  t.rows = extent;
  if (image_bytes * 2 <= budget && batch > 1) {
    // Batch images per GEMM, but leave at least one image group per thread.
    t.nb = std::max<int64_t>(1, std::min({batch, budget / std::max<int64_t>(image_bytes, 1),
                                          div_up(batch, threads)}));
  } else if (tiling_needed && image_bytes > budget) {
    const int64_t out_rows_max = std::max<int64_t>(1, budget / row_bytes - halo);
    t.rows = std::max<int64_t>(1, out_rows_max * rows_to_out_den / rows_to_out_num);
  }
  return balance(t, batch, threads);
}

Tiles plan_output_tiles(const Conv2dShape& s, int64_t elem) {
  const int64_t k = s.in_channels * s.kernel_h * s.kernel_w;
  return plan_tiles(s.batch, s.out_h, 1, 1, 0, k * s.out_w * elem, s.out_h, !is_pointwise(s));
}

// Output rows [lo, hi) that contribute to input rows [y0, y1).
struct RowRange {
  int64_t lo, hi;
};
RowRange output_rows_for(int64_t y0, int64_t y1, const Conv2dShape& s) {
  const int64_t first = y0 + s.pad_h - (s.kernel_h - 1) * s.dil_h;
  int64_t lo = first <= 0 ? 0 : div_up(first, s.stride_h);
  int64_t hi = std::min(s.out_h, (y1 - 1 + s.pad_h) / s.stride_h + 1);
  if (lo > hi) lo = hi;
  return {lo, hi};
}

Tiles plan_input_tiles(const Conv2dShape& s, int64_t elem) {
  const int64_t k = s.in_channels * s.kernel_h * s.kernel_w;
  const int64_t halo = div_up((s.kernel_h - 1) * s.dil_h, s.stride_h);
  // A block of R input rows needs about R / stride + halo output rows.
  return plan_tiles(s.batch, s.in_h, 1, s.stride_h, halo, k * s.out_w * elem, s.out_h,
                    !is_pointwise(s));
}

// Own-GEMM path: no column buffer bounds the tile, so a tile is a whole image, or several
// small images; rows are split only to balance the threads.
[[maybe_unused]] Tiles plan_gemm_tiles(int64_t batch, int64_t extent, int64_t plane) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  Tiles t;
  t.extent = extent;
  t.rows = extent;
  if (batch > 1 && 2 * plane <= kTileCols) {
    t.nb = std::max<int64_t>(1, std::min({batch, kTileCols / plane, div_up(batch, threads)}));
  }
  return balance(t, batch, threads);
}

// cols[r * ldc + b * T + (oy - oy0) * OW + ox] for r = (c, i, j), images b < nb, rows [oy0, oy1)
// (T = (oy1 - oy0) * OW); zero where the tap falls in the padding.
template <typename scalar_t>
void im2col(const scalar_t* x, int64_t nb, int64_t oy0, int64_t oy1, scalar_t* cols, int64_t ldc,
            const Conv2dShape& s) {
  const int64_t H = s.in_h, W = s.in_w, OW = s.out_w, C = s.in_channels;
  const int64_t T = (oy1 - oy0) * OW;
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t i = 0; i < s.kernel_h; ++i) {
      for (int64_t j = 0; j < s.kernel_w; ++j) {
        const int64_t r = (c * s.kernel_h + i) * s.kernel_w + j;
        const int64_t xoff = j * s.dil_w - s.pad_w;
        const TapRange xr = tap_range(xoff, s.stride_w, W, OW);
        for (int64_t b = 0; b < nb; ++b) {
          const scalar_t* plane = x + (b * C + c) * H * W;
          scalar_t* dst = cols + r * ldc + b * T;
          for (int64_t oy = oy0; oy < oy1; ++oy) {
            scalar_t* d = dst + (oy - oy0) * OW;
            const int64_t iy = oy * s.stride_h - s.pad_h + i * s.dil_h;
            if (iy < 0 || iy >= H) {
              std::fill(d, d + OW, scalar_t(0));
              continue;
            }
            const scalar_t* src = plane + iy * W;
            std::fill(d, d + xr.lo, scalar_t(0));
            if (s.stride_w == 1) {
              std::copy(src + xr.lo + xoff, src + xr.hi + xoff, d + xr.lo);
            } else {
              for (int64_t ox = xr.lo; ox < xr.hi; ++ox) d[ox] = src[ox * s.stride_w + xoff];
            }
            std::fill(d + xr.hi, d + OW, scalar_t(0));
          }
        }
      }
    }
  }
}

// Gather col2im for one image and `channels` channels: gi[c, y, :] for y in [y0, y1) sums the
// columns (rows [oy_lo, oy_hi) of the tile, image offset col_off) whose taps land on row y.
template <typename scalar_t>
void col2im(const scalar_t* cols, int64_t ldc, int64_t col_off, int64_t oy_lo, int64_t oy_hi,
            int64_t y0, int64_t y1, scalar_t* gi, int64_t channels, const Conv2dShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = s.in_h, W = s.in_w, OW = s.out_w;
  std::vector<acc_t> acc(W);
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t y = y0; y < y1; ++y) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t i = 0; i < s.kernel_h; ++i) {
        const int64_t num = y + s.pad_h - i * s.dil_h;
        if (num < 0 || num % s.stride_h != 0) continue;
        const int64_t oy = num / s.stride_h;
        if (oy < oy_lo || oy >= oy_hi) continue;
        for (int64_t j = 0; j < s.kernel_w; ++j) {
          const int64_t r = (c * s.kernel_h + i) * s.kernel_w + j;
          const int64_t xoff = j * s.dil_w - s.pad_w;
          const TapRange xr = tap_range(xoff, s.stride_w, W, OW);
          const scalar_t* src = cols + r * ldc + col_off + (oy - oy_lo) * OW;
          if (s.stride_w == 1) {
            acc_t* a = acc.data() + xoff;
            for (int64_t ox = xr.lo; ox < xr.hi; ++ox) a[ox] += static_cast<acc_t>(src[ox]);
          } else {
            for (int64_t ox = xr.lo; ox < xr.hi; ++ox) {
              acc[ox * s.stride_w + xoff] += static_cast<acc_t>(src[ox]);
            }
          }
        }
      }
      scalar_t* dst = gi + (c * H + y) * W;
      for (int64_t x = 0; x < W; ++x) dst[x] = static_cast<scalar_t>(acc[x]);
    }
  }
}

// packed[o, b * L + l] = t[n0 + b, o, l]: several images' planes side by side for one GEMM.
template <typename scalar_t>
void pack_images(const scalar_t* t, int64_t nb, int64_t channels, int64_t L, scalar_t* packed) {
  for (int64_t o = 0; o < channels; ++o) {
    for (int64_t b = 0; b < nb; ++b) {
      const scalar_t* src = t + (b * channels + o) * L;
      std::copy(src, src + L, packed + (o * nb + b) * L);
    }
  }
}

// out[b, o, l] = packed[o, b * L + l] + bias[o], the inverse of pack_images plus the bias.
template <typename scalar_t>
void unpack_images(const scalar_t* packed, int64_t nb, int64_t channels, int64_t L,
                   const scalar_t* bias, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t o = 0; o < channels; ++o) {
      const scalar_t* src = packed + (o * nb + b) * L;
      scalar_t* dst = out + (b * channels + o) * L;
      if (bias == nullptr) {
        std::copy(src, src + L, dst);
      } else {
        const acc_t bv = static_cast<acc_t>(bias[o]);
        for (int64_t l = 0; l < L; ++l) dst[l] = static_cast<scalar_t>(static_cast<acc_t>(src[l]) + bv);
      }
    }
  }
}

template <typename scalar_t>
void add_bias_rows(scalar_t* out, int64_t ld, int64_t rows, int64_t len, const scalar_t* bias) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t o = 0; o < rows; ++o) {
    const acc_t bv = static_cast<acc_t>(bias[o]);
    scalar_t* d = out + o * ld;
    for (int64_t l = 0; l < len; ++l) d[l] = static_cast<scalar_t>(static_cast<acc_t>(d[l]) + bv);
  }
}

// Uninitialised 64-byte aligned scratch of n elements (a tensor, so the allocator aligns it).
template <typename scalar_t>
at::Tensor scratch(int64_t n, const at::Tensor& like) {
  return at::empty({std::max<int64_t>(n, 1)}, like.options());
}

// A [rows, cols] matrix view with leading dimension ld over a raw buffer of `like`'s dtype.
at::Tensor mat(void* data, int64_t rows, int64_t cols, int64_t ld, const at::Tensor& like) {
  return at::from_blob(data, {rows, cols}, {ld, 1}, like.options());
}

// Stride 1 with padding <= the dilated kernel extent: grad_input is the forward convolution of
// grad_output with the kernel transposed (per group) and flipped, padded by extent - padding.
// That runs the forward's GEMM (reduction Og * kH * kW instead of Og) and needs no col2im.
// Returns false (t untouched) when the rule does not apply.
bool grad_input_as_forward_shape(const Conv2dShape& s, Conv2dShape& t) {
  const int64_t ext_h = (s.kernel_h - 1) * s.dil_h, ext_w = (s.kernel_w - 1) * s.dil_w;
  if (s.stride_h != 1 || s.stride_w != 1 || s.pad_h > ext_h || s.pad_w > ext_w) return false;
  t = s;
  t.in_channels = s.out_channels;
  t.in_h = s.out_h;
  t.in_w = s.out_w;
  t.out_channels = s.in_channels;
  t.out_h = s.in_h;
  t.out_w = s.in_w;
  t.pad_h = ext_h - s.pad_h;
  t.pad_w = ext_w - s.pad_w;
  return true;
}

// w[g * Og + o, c, i, j] -> wt[g * Cg + c, o, kH - 1 - i, kW - 1 - j], one pass on all threads
// (ATen's flip, then a transposing copy, took a quarter of grad_input for 1x1 512 -> 2048 at
// 7x7: two strided copies of the 4 MiB weight; see benchmarks/NOTES.md). Each thread writes
// whole rows (g, c) of wt; the rows of neighbouring c read the same lines of w.
at::Tensor flipped_transposed_weight(const at::Tensor& weight, const Conv2dShape& s) {
  const int64_t G = s.groups, Og = s.out_channels / G, Cg = s.in_channels / G;
  const int64_t kk = s.kernel_h * s.kernel_w;
  const at::Tensor w = weight.contiguous();
  at::Tensor wt = at::empty({s.in_channels, Og, s.kernel_h, s.kernel_w}, w.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, w.scalar_type(), "flipped_transposed_weight", [&] {
    const scalar_t* src = w.const_data_ptr<scalar_t>();
    scalar_t* dst = wt.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, G * Cg, parallel_grain(Og * kk), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t g = row / Cg, c = row % Cg;
        scalar_t* d = dst + row * Og * kk;
        const scalar_t* sg = src + (g * Og * Cg + c) * kk;
        for (int64_t o = 0; o < Og; ++o) {
          const scalar_t* so = sg + o * Cg * kk;
          for (int64_t t = 0; t < kk; ++t) d[o * kk + (kk - 1 - t)] = so[t];
        }
      }
    });
  });
  return wt;
}

// ---- at::mm back end -------------------------------------------------------------------

template <typename scalar_t>
void forward_mm(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                  at::Tensor& out, const Conv2dShape& s) {
  const int64_t N = s.batch, C = s.in_channels, O = s.out_channels, G = s.groups;
  const int64_t Og = O / G, Kg = (C / G) * s.kernel_h * s.kernel_w, K = Kg * G;
  const int64_t L = s.out_h * s.out_w, OW = s.out_w;
  const bool pointwise = is_pointwise(s);
  const Tiles t = plan_output_tiles(s, sizeof(scalar_t));
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  scalar_t* y = out.mutable_data_ptr<scalar_t>();
  const scalar_t* bptr = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  const at::Tensor w2d = weight.view({O, Kg});

  const int64_t grain = parallel_grain(O * Kg * t.nb * t.rows * OW);
  at::parallel_for(0, t.count(), grain, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see kWorkerThreads
    const int64_t max_cols = K * t.nb * t.rows * OW;
    at::Tensor cols_buf = scratch<scalar_t>(pointwise && t.nb == 1 ? 0 : max_cols, out);
    at::Tensor packed_buf = scratch<scalar_t>(t.nb > 1 ? O * t.nb * L : 0, out);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n0 = (tile / t.row_blocks) * t.nb;
      const int64_t nb = std::min(t.nb, N - n0);
      const int64_t oy0 = (tile % t.row_blocks) * t.rows;
      const int64_t oy1 = std::min(s.out_h, oy0 + t.rows);
      const int64_t T = (oy1 - oy0) * OW;  // columns per image in this tile
      const scalar_t* xn = x + n0 * C * s.in_h * s.in_w;
      scalar_t* cols;
      int64_t ldc;
      if (pointwise && t.nb == 1) {
        cols = const_cast<scalar_t*>(xn) + oy0 * OW;  // read-only use below
        ldc = L;
      } else {
        cols = cols_buf.mutable_data_ptr<scalar_t>();
        ldc = nb * T;
        im2col(xn, nb, oy0, oy1, cols, ldc, s);
      }
      if (nb == 1 && t.nb == 1) {
        scalar_t* yn = y + n0 * O * L + oy0 * OW;
        for (int64_t g = 0; g < G; ++g) {
          at::Tensor dst = mat(yn + g * Og * L, Og, T, L, out);
          at::mm_out(dst, w2d.narrow(0, g * Og, Og), mat(cols + g * Kg * ldc, Kg, T, ldc, out));
        }
        if (bptr != nullptr) add_bias_rows(yn, L, O, T, bptr);
      } else {
        scalar_t* packed = packed_buf.mutable_data_ptr<scalar_t>();
        for (int64_t g = 0; g < G; ++g) {
          at::Tensor dst = mat(packed + g * Og * nb * L, Og, nb * L, nb * L, out);
          at::mm_out(dst, w2d.narrow(0, g * Og, Og),
                     mat(cols + g * Kg * ldc, Kg, nb * L, ldc, out));
        }
        unpack_images(packed, nb, O, L, bptr, y + n0 * O * L);
      }
    }
  });
}

template <typename scalar_t>
void grad_input_mm(const at::Tensor& grad_output, const at::Tensor& weight,
                     at::Tensor& grad_input, const Conv2dShape& s) {
  const int64_t N = s.batch, C = s.in_channels, O = s.out_channels, G = s.groups;
  const int64_t Og = O / G, Cg = C / G, Kg = Cg * s.kernel_h * s.kernel_w, K = Kg * G;
  const int64_t L = s.out_h * s.out_w, OW = s.out_w, HW = s.in_h * s.in_w;
  const bool pointwise = is_pointwise(s);
  const Tiles t = plan_input_tiles(s, sizeof(scalar_t));
  const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
  scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
  const at::Tensor w2d = weight.view({O, Kg});
  // Largest number of output rows one block of t.rows input rows needs.
  const int64_t halo = div_up((s.kernel_h - 1) * s.dil_h, s.stride_h);
  const int64_t max_out_rows =
      t.nb > 1 ? s.out_h : std::min(s.out_h, div_up(t.rows, s.stride_h) + halo + 1);

  const int64_t grain = parallel_grain(O * Kg * t.nb * max_out_rows * OW);
  at::parallel_for(0, t.count(), grain, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see kWorkerThreads
    at::Tensor cols_buf =
        scratch<scalar_t>(pointwise && t.nb == 1 ? 0 : K * t.nb * max_out_rows * OW, grad_input);
    at::Tensor packed_buf = scratch<scalar_t>(t.nb > 1 ? O * t.nb * L : 0, grad_input);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n0 = (tile / t.row_blocks) * t.nb;
      const int64_t nb = std::min(t.nb, N - n0);
      const int64_t y0 = (tile % t.row_blocks) * t.rows;
      const int64_t y1 = std::min(s.in_h, y0 + t.rows);
      scalar_t* gin = gi + n0 * C * HW;
      if (t.nb == 1) {
        const RowRange orows = output_rows_for(y0, y1, s);
        TORCH_INTERNAL_ASSERT(orows.hi - orows.lo <= max_out_rows);
        const int64_t T = (orows.hi - orows.lo) * OW;
        const scalar_t* gon = go + n0 * O * L + orows.lo * OW;
        if (pointwise) {  // input rows == output rows: the GEMM writes grad_input directly
          for (int64_t g = 0; g < G; ++g) {
            at::Tensor dst = mat(gin + g * Cg * HW + y0 * s.in_w, Cg, T, HW, grad_input);
            at::mm_out(dst, w2d.narrow(0, g * Og, Og).t(),
                       mat(const_cast<scalar_t*>(gon) + g * Og * L, Og, T, L, grad_input));
          }
          continue;
        }
        if (T == 0) {  // no output row reaches these input rows (stride > kernel extent)
          for (int64_t c = 0; c < C; ++c) {
            std::fill(gin + c * HW + y0 * s.in_w, gin + c * HW + y1 * s.in_w, scalar_t(0));
          }
          continue;
        }
        scalar_t* cols = cols_buf.mutable_data_ptr<scalar_t>();
        for (int64_t g = 0; g < G; ++g) {
          at::Tensor dst = mat(cols + g * Kg * T, Kg, T, T, grad_input);
          at::mm_out(dst, w2d.narrow(0, g * Og, Og).t(),
                     mat(const_cast<scalar_t*>(gon) + g * Og * L, Og, T, L, grad_input));
        }
        col2im(cols, T, 0, orows.lo, orows.hi, y0, y1, gin, C, s);
      } else {
        scalar_t* packed = packed_buf.mutable_data_ptr<scalar_t>();
        pack_images(go + n0 * O * L, nb, O, L, packed);
        scalar_t* cols = cols_buf.mutable_data_ptr<scalar_t>();
        const int64_t ldc = nb * L;
        for (int64_t g = 0; g < G; ++g) {
          at::Tensor dst = mat(cols + g * Kg * ldc, Kg, ldc, ldc, grad_input);
          at::mm_out(dst, w2d.narrow(0, g * Og, Og).t(),
                     mat(packed + g * Og * ldc, Og, ldc, ldc, grad_input));
        }
        for (int64_t b = 0; b < nb; ++b) {
          col2im(cols, ldc, b * L, 0, s.out_h, 0, s.in_h, gin + b * C * HW, C, s);
        }
      }
    }
  });
}

template <typename scalar_t>
void grad_weight_mm(const at::Tensor& grad_output, const at::Tensor& input,
                      at::Tensor& grad_weight, const Conv2dShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSameAcc = std::is_same<acc_t, scalar_t>::value;
  const int64_t N = s.batch, C = s.in_channels, O = s.out_channels, G = s.groups;
  const int64_t Og = O / G, Kg = (C / G) * s.kernel_h * s.kernel_w, K = Kg * G;
  const int64_t L = s.out_h * s.out_w, OW = s.out_w;
  const bool pointwise = is_pointwise(s);
  const Tiles t = plan_output_tiles(s, sizeof(scalar_t));
  const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = parallel_grain(O * Kg * t.nb * t.rows * OW);
  const int64_t parts = std::max<int64_t>(1, std::min(t.count() / grain, threads));
  // One accumulator per part, in acc_t (float for bfloat16); summed in part order below.
  at::Tensor partial = at::zeros({parts, O, Kg}, grad_output.options().dtype(
                                                       c10::CppTypeToScalarType<acc_t>::value));

  at::parallel_for(0, parts, 1, [&](int64_t pbegin, int64_t pend) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see kWorkerThreads
    at::Tensor cols_buf =
        scratch<scalar_t>(pointwise && t.nb == 1 ? 0 : K * t.nb * t.rows * OW, grad_output);
    at::Tensor packed_buf = scratch<scalar_t>(t.nb > 1 ? O * t.nb * L : 0, grad_output);
    for (int64_t p = pbegin; p < pend; ++p) {
      at::Tensor acc = partial[p];
      const int64_t tbegin = p * t.count() / parts, tend = (p + 1) * t.count() / parts;
      for (int64_t tile = tbegin; tile < tend; ++tile) {
        const int64_t n0 = (tile / t.row_blocks) * t.nb;
        const int64_t nb = std::min(t.nb, N - n0);
        const int64_t oy0 = (tile % t.row_blocks) * t.rows;
        const int64_t oy1 = std::min(s.out_h, oy0 + t.rows);
        const int64_t T = (oy1 - oy0) * OW;
        const scalar_t* xn = x + n0 * C * s.in_h * s.in_w;
        scalar_t* cols;
        int64_t ldc;
        const scalar_t* gsrc;
        int64_t ldg;
        if (pointwise && t.nb == 1) {
          cols = const_cast<scalar_t*>(xn) + oy0 * OW;
          ldc = L;
        } else {
          cols = cols_buf.mutable_data_ptr<scalar_t>();
          ldc = nb * T;
          im2col(xn, nb, oy0, oy1, cols, ldc, s);
        }
        if (t.nb == 1) {
          gsrc = go + n0 * O * L + oy0 * OW;
          ldg = L;
        } else {
          pack_images(go + n0 * O * L, nb, O, L, packed_buf.mutable_data_ptr<scalar_t>());
          gsrc = packed_buf.mutable_data_ptr<scalar_t>();
          ldg = nb * L;
        }
        const int64_t width = nb * T;
        for (int64_t g = 0; g < G; ++g) {
          at::Tensor a = mat(const_cast<scalar_t*>(gsrc) + g * Og * ldg, Og, width, ldg,
                             grad_output);
          at::Tensor b = mat(cols + g * Kg * ldc, Kg, width, ldc, grad_output).t();
          at::Tensor acc_g = acc.narrow(0, g * Og, Og);
          if constexpr (kSameAcc) {
            at::addmm_out(acc_g, acc_g, a, b);
          } else {
            acc_g.add_(at::mm(a, b));
          }
        }
      }
    }
  });
  at::Tensor total = partial[0];
  for (int64_t p = 1; p < parts; ++p) total.add_(partial[p]);
  grad_weight.view({O, Kg}).copy_(total);
}

// ---- own-GEMM back end (float32 / float64 with AVX-512) ----------------------------------

#ifdef FASTCONV_HAVE_AVX512_GEMM

// A run of consecutive tile columns inside one output row: columns [col, col + len) of the
// block are output positions (oy, ox .. ox + len) of image `image`.
struct Run {
  int64_t col, image, oy, ox, len;
};

// Input rows [first, last] of one image that a block reads from every channel plane.
struct Band {
  int64_t image, first, last;
};

// Per-thread tables of im2col_block, reused from block to block.
struct Im2colScratch {
  std::vector<Run> runs;
  std::vector<Band> bands;
  std::vector<const Run*> vrun;
  std::vector<int64_t> vfirst, vcol, rowoff, coloff;
  std::vector<uint16_t> lmask16, smask16;  // float masks (16 lanes)
  std::vector<uint8_t> lmask8, smask8;     // double masks (8 lanes)
  template <typename T>
  auto& lmask() {
    if constexpr (sizeof(T) == 4) return lmask16; else return lmask8;
  }
  template <typename T>
  auto& smask() {
    if constexpr (sizeof(T) == 4) return smask16; else return smask8;
  }
};

// Forward B operand: rows [k0, k0 + kc) (k = (c, i, j) within the group) and tile columns
// [n0, n0 + ncols) of the column matrix, written row-major to dst (row stride ld), which the
// GEMM then reads in place. x: first image of the tile, first channel of the group; images
// are img_stride apart. The column -> (image, oy, ox) walk is done once per block into runs;
// each row k then copies every run from one input row with vector loads / masked stores,
// zeroing the padding lanes in registers (stride 1), or a strided loop (stride > 1).
// [x_begin, x_end): the whole input tensor, which whole-vector loads must not leave.
template <typename T>
void im2col_block(const T* x, int64_t img_stride, int64_t oy0, int64_t oy1, int64_t k0,
                  int64_t kc, int64_t n0, int64_t ncols, T* dst, int64_t ld,
                  const Conv2dShape& s, Im2colScratch& scratch, const T* x_begin,
                  const T* x_end) {
  std::vector<Run>& runs = scratch.runs;
  std::vector<Band>& bands = scratch.bands;
  using S = gemm::Simd<T>;
  constexpr int64_t L = S::kLanes;
  const int64_t H = s.in_h, W = s.in_w, OW = s.out_w, HW = H * W;
  const int64_t kw = s.kernel_w, sw = s.stride_w;
  const int64_t per_image = (oy1 - oy0) * OW;
  runs.clear();
  {
    int64_t image = n0 / per_image, rem = n0 % per_image;
    int64_t oy = oy0 + rem / OW, ox = rem % OW;
    for (int64_t col = 0; col < ncols;) {
      const int64_t len = std::min(OW - ox, ncols - col);
      runs.push_back({col, image, oy, ox, len});
      col += len;
      ox += len;
      if (ox == OW) {
        ox = 0;
        if (++oy == oy1) {
          oy = oy0;
          ++image;
        }
      }
    }
  }
  // The block reads a band of input rows from each channel plane it visits, more concurrent
  // streams than the hardware prefetcher follows: prefetch the band of the channel
  // `ahead` channels on (about 8 rows k ahead) when a channel starts. One band per image.
  bands.clear();
  for (const Run& r : runs) {
    const int64_t lo = std::max<int64_t>(r.oy * s.stride_h - s.pad_h, 0);
    const int64_t hi = std::min<int64_t>(r.oy * s.stride_h - s.pad_h + (s.kernel_h - 1) * s.dil_h,
                                         H - 1);
    if (lo > hi) continue;
    if (!bands.empty() && bands.back().image == r.image) {
      bands.back().first = std::min(bands.back().first, lo);
      bands.back().last = std::max(bands.back().last, hi);
    } else {
      bands.push_back({r.image, lo, hi});
    }
  }
  const int64_t KK = s.kernel_h * kw;
  const int64_t ahead = std::max<int64_t>(1, 8 / KK);
  const int64_t channels = s.in_channels / s.groups;
  if (sw != 1) {
    int64_t c = k0 / KK, i = (k0 / kw) % s.kernel_h, j = k0 % kw;
    for (int64_t k = 0; k < kc; ++k) {
      const int64_t xoff = j * s.dil_w - s.pad_w;
      const TapRange xr = tap_range(xoff, sw, W, OW);
      for (const Run& r : runs) {
        T* o = dst + k * ld + r.col;
        const int64_t iy = r.oy * s.stride_h + i * s.dil_h - s.pad_h;
        if (iy < 0 || iy >= H) {
          std::fill(o, o + r.len, T(0));
          continue;
        }
        const T* row = x + c * HW + r.image * img_stride + iy * W;
        for (int64_t l = 0; l < r.len; ++l) {
          const int64_t ox = r.ox + l;
          o[l] = (ox >= xr.lo && ox < xr.hi) ? row[ox * sw + xoff] : T(0);
        }
      }
      if (++j == kw) {
        j = 0;
        if (++i == s.kernel_h) {
          i = 0;
          ++c;
        }
      }
    }
    return;
  }
  // Stride 1: split the runs into vectors of at most L lanes and tabulate, per vector, its
  // row offset for every kernel row i (-1: padding row) and its column offset and load mask
  // for every kernel column j, so each row k is a flat loop of load / mask / store.
  std::vector<int64_t>& vcol = scratch.vcol;
  std::vector<int64_t>& rowoff = scratch.rowoff;
  std::vector<int64_t>& coloff = scratch.coloff;
  std::vector<typename S::Mask>& lmask = scratch.lmask<T>();
  std::vector<typename S::Mask>& smask = scratch.smask<T>();
  vcol.clear();
  smask.clear();
  std::vector<const Run*>& vrun = scratch.vrun;
  std::vector<int64_t>& vfirst = scratch.vfirst;
  vrun.clear();
  vfirst.clear();
  for (const Run& r : runs) {
    for (int64_t v = 0; v < r.len; v += L) {
      vcol.push_back(r.col + v);
      smask.push_back(gemm::lane_mask<T>(0, r.len - v));
      vrun.push_back(&r);
      vfirst.push_back(v);
    }
  }
  const int64_t nv = static_cast<int64_t>(vcol.size());
  rowoff.resize(s.kernel_h * nv);
  coloff.resize(kw * nv);
  lmask.resize(kw * nv);
  for (int64_t i = 0; i < s.kernel_h; ++i) {
    for (int64_t v = 0; v < nv; ++v) {
      const Run& r = *vrun[v];
      const int64_t iy = r.oy * s.stride_h + i * s.dil_h - s.pad_h;
      rowoff[i * nv + v] = (iy < 0 || iy >= H) ? -1 : r.image * img_stride + iy * W;
    }
  }
  for (int64_t j = 0; j < kw; ++j) {
    const int64_t xoff = j * s.dil_w - s.pad_w;
    const TapRange xr = tap_range(xoff, 1, W, OW);
    for (int64_t v = 0; v < nv; ++v) {
      const Run& r = *vrun[v];
      const int64_t ox = r.ox + vfirst[v];
      const int64_t len = std::min<int64_t>(L, r.len - vfirst[v]);
      coloff[j * nv + v] = ox + xoff;
      lmask[j * nv + v] = gemm::lane_mask<T>(xr.lo - ox, std::min(xr.hi - ox, len));
    }
  }
  int64_t c = k0 / KK, i = (k0 / kw) % s.kernel_h, j = k0 % kw;
  for (int64_t k = 0; k < kc; ++k) {
    const T* plane = x + c * HW;
    T* d = dst + k * ld;
    if (i == 0 && j == 0 && c + ahead < channels) {
      for (const Band& b : bands) {
        const char* p = reinterpret_cast<const char*>(x + (c + ahead) * HW +
                                                      b.image * img_stride + b.first * W);
        const char* e = p + (b.last - b.first + 1) * W * int64_t(sizeof(T));
        for (; p < e; p += 64) _mm_prefetch(p, _MM_HINT_T0);
      }
    }
    const int64_t* ro = rowoff.data() + i * nv;
    const int64_t* co = coloff.data() + j * nv;
    const typename S::Mask* lm = lmask.data() + j * nv;
    for (int64_t v = 0; v < nv; ++v) {
      T* o = d + vcol[v];
      typename S::V val = S::zero();
      if (ro[v] >= 0) {
        // Masked loads are slow on this CPU: load the whole vector where it stays inside the
        // tensor (lanes past the row are neighbouring data) and zero the lanes outside the
        // input in registers; only a vector at the tensor's very ends uses a masked load.
        const T* p = plane + ro[v] + co[v];
        val = (p >= x_begin && p + L <= x_end) ? S::load_zero_masked(lm[v], p)
                                               : S::load(p, lm[v]);
      }
      S::store(o, val, smask[v]);
    }
    if (++j == kw) {
      j = 0;
      if (++i == s.kernel_h) {
        i = 0;
        ++c;
      }
    }
  }
}

// Every group's A operand packed once per call, shared read-only by the threads.
// transpose=false: A_g = W_g [Og, Kg]; true: A_g = W_g^T [Kg, Og].
template <typename T>
at::Tensor pack_weight(const at::Tensor& weight, const Conv2dShape& s, bool transpose) {
  const int64_t G = s.groups, Og = s.out_channels / G;
  const int64_t Kg = (s.in_channels / G) * s.kernel_h * s.kernel_w;
  const int64_t size = transpose ? gemm::packed_a_size(Kg, Og) : gemm::packed_a_size(Og, Kg);
  at::Tensor packed = at::empty({G * size}, weight.options());
  const T* w = weight.const_data_ptr<T>();
  T* ap = packed.mutable_data_ptr<T>();
  // (group, panel) units on all threads: one group's weight packed by one thread left the
  // other idle (1x1 512 -> 2048 grad_input: a fifth of the op; see benchmarks/NOTES.md)
  const int64_t M = transpose ? Kg : Og, K = transpose ? Og : Kg;
  const int64_t panels = (M + gemm::kMR - 1) / gemm::kMR;
  at::parallel_for(0, G * panels, parallel_grain(gemm::kMR * K), [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end;) {
      const int64_t g = u / panels, p0 = u % panels, p1 = std::min(panels, p0 + (end - u));
      if (transpose) {
        gemm::pack_a_panels(w + g * Og * Kg, int64_t(1), Kg, M, K, ap + g * size, p0, p1);
      } else {
        gemm::pack_a_panels(w + g * Og * Kg, Kg, int64_t(1), M, K, ap + g * size, p0, p1);
      }
      u += p1 - p0;
    }
  });
  return packed;
}

// packed_weight: the A operand already packed (grad_input of a 1x1 convolution), else the
// weight is packed here.
template <typename T>
void forward_gemm(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                  at::Tensor& out, const Conv2dShape& s,
                  const at::Tensor& packed_weight = at::Tensor()) {
  constexpr int64_t L16 = 16;  // im2col block rows start 64-byte aligned
  const int64_t N = s.batch, C = s.in_channels, O = s.out_channels, G = s.groups;
  const int64_t Og = O / G, Cg = C / G, Kg = Cg * s.kernel_h * s.kernel_w;
  const int64_t L = s.out_h * s.out_w, OW = s.out_w, HW = s.in_h * s.in_w;
  const bool pointwise = is_pointwise(s);
  const Tiles t = plan_gemm_tiles(N, s.out_h, L);
  const at::Tensor packed_w =
      packed_weight.defined() ? packed_weight : pack_weight<T>(weight, s, false);
  const int64_t a_size = gemm::packed_a_size(Og, Kg);
  const T* ap = packed_w.const_data_ptr<T>();
  const T* x = input.const_data_ptr<T>();
  T* y = out.mutable_data_ptr<T>();
  const T* bptr = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  const int64_t block_ld = div_up(gemm::nc<T>(), L16) * L16;

  at::parallel_for(0, t.count(), parallel_grain(O * Kg * t.nb * t.rows * OW),
                   [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see kWorkerThreads
    // a 1x1 / stride 1 / unpadded convolution of whole images reads the input in place
    const bool in_place = pointwise && t.nb == 1;
    at::Tensor cols_buf = scratch<T>(in_place ? 0 : gemm::kKC * block_ld, out);
    at::Tensor tmp_buf = scratch<T>(t.nb > 1 ? O * t.nb * L : 0, out);
    T* cols = cols_buf.mutable_data_ptr<T>();
    T* tmp = tmp_buf.mutable_data_ptr<T>();
    Im2colScratch im2col_scratch;
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n0 = (tile / t.row_blocks) * t.nb;
      const int64_t nb = std::min(t.nb, N - n0);
      const int64_t oy0 = (tile % t.row_blocks) * t.rows;
      const int64_t oy1 = std::min(s.out_h, oy0 + t.rows);
      const int64_t ncols = nb * (oy1 - oy0) * OW;
      for (int64_t g = 0; g < G; ++g) {
        const T* xg = x + (n0 * C + g * Cg) * HW;
        auto get_b = [&](int64_t k0, int64_t kc, int64_t c0, int64_t nc) -> gemm::BBlock<T> {
          if (in_place) return {xg + k0 * HW + oy0 * OW + c0, HW, gemm::nr<T>()};
          im2col_block(xg, C * HW, oy0, oy1, k0, kc, c0, nc, cols, block_ld, s, im2col_scratch,
                       x, x + N * C * HW);
          return {cols, block_ld, gemm::nr<T>()};
        };
        T* dst = t.nb == 1 ? y + (n0 * O + g * Og) * L + oy0 * OW : tmp + g * Og * ncols;
        gemm::gemm<T>(Og, ncols, Kg, ap + g * a_size, get_b, dst, t.nb == 1 ? L : ncols, false,
                      bptr != nullptr ? bptr + g * Og : nullptr);
      }
      if (t.nb > 1) unpack_images(tmp, nb, O, L, static_cast<const T*>(nullptr), y + n0 * O * L);
    }
  });
}

template <typename T>
void grad_input_gemm(const at::Tensor& grad_output, const at::Tensor& weight,
                     at::Tensor& grad_input, const Conv2dShape& s) {
  constexpr int64_t NR = gemm::nr<T>();
  const int64_t N = s.batch, C = s.in_channels, O = s.out_channels, G = s.groups;
  const int64_t Og = O / G, Cg = C / G, KK = s.kernel_h * s.kernel_w, Kg = Cg * KK;
  const int64_t L = s.out_h * s.out_w, OW = s.out_w, HW = s.in_h * s.in_w;
  const bool pointwise = is_pointwise(s);
  const int64_t halo = div_up((s.kernel_h - 1) * s.dil_h, s.stride_h);
  Tiles t = plan_gemm_tiles(N, s.in_h, L);
  if (t.nb == 1) {
    // Bound the columns of a tile (a block of input rows needs about rows / sH + halo
    // output rows) so a column block stays small on large images.
    const int64_t max_rows =
        std::max<int64_t>(1, (kGradInputMaxCols / OW - halo - 1) * s.stride_h);
    if (t.rows > max_rows) {
      t.rows = max_rows;
      t.row_blocks = div_up(s.in_h, t.rows);
    }
  }
  const at::Tensor packed_w = pack_weight<T>(weight, s, true);
  const int64_t a_size = gemm::packed_a_size(Kg, Og);
  const T* ap = packed_w.const_data_ptr<T>();
  const T* go = grad_output.const_data_ptr<T>();
  T* gi = grad_input.mutable_data_ptr<T>();
  const int64_t max_out_rows =
      t.nb > 1 ? s.out_h : std::min(s.out_h, div_up(t.rows, s.stride_h) + halo + 1);
  const int64_t max_cols = t.nb * max_out_rows * OW;
  // Channels per column block: as many as keep the block (channels x kH x kW rows by the
  // tile's columns) within kColBlockBytes, so col2im reads it back from L2; a multiple of 8,
  // so every block starts on an A panel (MR = 8).
  static_assert(gemm::kMR == 8, "block_channels assumes 8-row A panels");
  const int64_t block_channels = std::min(
      Cg, std::max<int64_t>(8, kColBlockBytes / (KK * max_cols * int64_t(sizeof(T))) / 8 * 8));

  at::parallel_for(0, t.count(), parallel_grain(O * Kg * max_cols),
                   [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see kWorkerThreads
    const bool direct_write = pointwise && t.nb == 1;
    at::Tensor cols_buf =
        scratch<T>(direct_write ? 0 : block_channels * KK * max_cols, grad_input);
    at::Tensor packed_buf = scratch<T>(t.nb > 1 ? O * t.nb * L : 0, grad_input);
    T* cols = cols_buf.mutable_data_ptr<T>();
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n0 = (tile / t.row_blocks) * t.nb;
      const int64_t nb = std::min(t.nb, N - n0);
      const int64_t y0 = (tile % t.row_blocks) * t.rows;
      const int64_t y1 = std::min(s.in_h, y0 + t.rows);
      T* gin = gi + n0 * C * HW;
      RowRange orows{0, s.out_h};
      const T* gsrc;
      int64_t ldg;
      if (t.nb == 1) {
        orows = output_rows_for(y0, y1, s);
        gsrc = go + n0 * O * L + orows.lo * OW;
        ldg = L;
      } else {
        T* packed = packed_buf.mutable_data_ptr<T>();
        pack_images(go + n0 * O * L, nb, O, L, packed);
        gsrc = packed;
        ldg = nb * L;
      }
      const int64_t ncols = nb * (orows.hi - orows.lo) * OW;
      TORCH_INTERNAL_ASSERT(ncols <= max_cols);
      if (ncols == 0) {  // no output row reaches these input rows (stride > kernel extent)
        for (int64_t c = 0; c < C; ++c) {
          std::fill(gin + c * HW + y0 * s.in_w, gin + c * HW + y1 * s.in_w, T(0));
        }
        continue;
      }
      for (int64_t g = 0; g < G; ++g) {
        const T* gg = gsrc + g * Og * ldg;  // B = grad_output rows, read in place
        auto get_b = [&](int64_t k0, int64_t, int64_t c0, int64_t) -> gemm::BBlock<T> {
          return {gg + k0 * ldg + c0, ldg, NR};
        };
        const T* ag = ap + g * a_size;
        if (direct_write) {  // input rows == output rows: the GEMM writes grad_input directly
          gemm::gemm<T>(Cg, ncols, Og, ag, get_b, gin + g * Cg * HW + y0 * s.in_w, HW, false,
                        static_cast<const T*>(nullptr));
          continue;
        }
        for (int64_t c0 = 0; c0 < Cg; c0 += block_channels) {
          const int64_t nch = std::min(block_channels, Cg - c0);
          gemm::gemm<T>(nch * KK, ncols, Og, ag + c0 * KK * Og, get_b, cols, ncols, false,
                        static_cast<const T*>(nullptr));
          T* gic = gin + (g * Cg + c0) * HW;
          if (t.nb == 1) {
            col2im(cols, ncols, 0, orows.lo, orows.hi, y0, y1, gic, nch, s);
          } else {
            for (int64_t b = 0; b < nb; ++b) {
              col2im(cols, ncols, b * L, 0, s.out_h, 0, s.in_h, gic + b * C * HW, nch, s);
            }
          }
        }
      }
    }
  });
}

// grad_weight for small feature maps (images batched into tiles): the threads split the output
// channels instead of the tiles. Each (group, block of output channels) unit runs over all the
// images, batched up to kKT output positions per tile, and writes its rows of grad_weight
// directly: long dot products (their horizontal sums were about a third of the work at 7x7
// with tiles of a thread's share of the images: 4 x 49 positions), no per-thread partial
// grad_weight to add up, and the same bits for any thread count (each element is summed by one
// thread in tile order). Every unit builds its tiles' columns itself (a few percent).
template <typename T>
void grad_weight_gemm_split_out(const T* go, const T* x, at::Tensor& grad_weight,
                                const Conv2dShape& s, int64_t kKT, int64_t kRows) {
  const int64_t N = s.batch, C = s.in_channels, O = s.out_channels, G = s.groups;
  const int64_t Og = O / G, Cg = C / G, Kg = Cg * s.kernel_h * s.kernel_w;
  const int64_t L = s.out_h * s.out_w, HW = s.in_h * s.in_w;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t nb = std::max<int64_t>(1, std::min(N, kKT / L));
  const int64_t tiles = div_up(N, nb);
  const int64_t oblocks = std::min(threads, div_up(Og, 32));
  T* dw = grad_weight.mutable_data_ptr<T>();
  std::fill(dw, dw + O * Kg, T(0));
  at::parallel_for(0, G * oblocks, 1, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see kWorkerThreads
    at::Tensor cols_buf = at::empty({kRows * kKT}, grad_weight.options());
    at::Tensor g_buf = at::empty({div_up(Og, oblocks) * nb * L}, grad_weight.options());
    T* cols = cols_buf.mutable_data_ptr<T>();
    T* gb = g_buf.mutable_data_ptr<T>();
    Im2colScratch im2col_scratch;
    for (int64_t u = begin; u < end; ++u) {
      const int64_t g = u / oblocks, ob = u % oblocks;
      const int64_t o0 = ob * Og / oblocks, o1 = (ob + 1) * Og / oblocks, om = o1 - o0;
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t n0 = tile * nb, nbt = std::min(nb, N - n0), ncols = nbt * L;
        // this unit's grad_output rows of the tile's images side by side: [om][nbt * L]
        for (int64_t o = 0; o < om; ++o)
          for (int64_t b = 0; b < nbt; ++b) {
            const T* src = go + ((n0 + b) * O + g * Og + o0 + o) * L;
            std::copy(src, src + L, gb + o * ncols + b * L);
          }
        const T* xg = x + (n0 * C + g * Cg) * HW;
        for (int64_t t0 = 0; t0 < ncols; t0 += kKT) {
          const int64_t kt = std::min(kKT, ncols - t0);
          for (int64_t r0 = 0; r0 < Kg; r0 += kRows) {
            const int64_t rows = std::min(kRows, Kg - r0);
            im2col_block(xg, C * HW, int64_t(0), s.out_h, r0, rows, t0, kt, cols, kKT, s,
                         im2col_scratch, x, x + N * C * HW);
            gemm::gemm_nt<T>(om, rows, kt, gb + t0, ncols, cols, kKT,
                             dw + (g * Og + o0) * Kg + r0, Kg);
          }
        }
      }
    }
  });
}

template <typename T>
void grad_weight_gemm(const at::Tensor& grad_output, const at::Tensor& input,
                      at::Tensor& grad_weight, const Conv2dShape& s) {
  // K (output positions) per dot-product block (long, so the horizontal sums at its end are
  // rare), and im2col rows per block: kKT x kRows elements (256 KiB in float32), kept in L2.
  constexpr int64_t kKT = 1024, kRows = 64;
  const int64_t N = s.batch, C = s.in_channels, O = s.out_channels, G = s.groups;
  const int64_t Og = O / G, Cg = C / G, Kg = Cg * s.kernel_h * s.kernel_w;
  const int64_t L = s.out_h * s.out_w, OW = s.out_w, HW = s.in_h * s.in_w;
  const bool pointwise = is_pointwise(s);
  const Tiles t = plan_gemm_tiles(N, s.out_h, L);
  const T* go = grad_output.const_data_ptr<T>();
  const T* x = input.const_data_ptr<T>();
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  if (threads > 1 && t.nb > 1 && Og >= 32 * threads && grad_weight.is_contiguous()) {
    grad_weight_gemm_split_out<T>(go, x, grad_weight, s, kKT, kRows);
    return;
  }
  const int64_t max_cols = t.nb * t.rows * OW;
  const int64_t grain = parallel_grain(O * Kg * max_cols);
  const int64_t parts = std::max<int64_t>(1, std::min(t.count() / grain, threads));
  // One accumulator per part, summed in part order below.
  at::Tensor partial = at::zeros({parts, O, Kg}, grad_output.options());

  at::parallel_for(0, parts, 1, [&](int64_t pbegin, int64_t pend) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see kWorkerThreads
    const bool in_place = pointwise && t.nb == 1;  // the input rows are the columns
    at::Tensor cols_buf = scratch<T>(in_place ? 0 : kRows * kKT, grad_output);
    at::Tensor packed_buf = scratch<T>(t.nb > 1 ? O * t.nb * L : 0, grad_output);
    T* cols = cols_buf.mutable_data_ptr<T>();
    Im2colScratch im2col_scratch;
    for (int64_t p = pbegin; p < pend; ++p) {
      T* acc = partial[p].mutable_data_ptr<T>();
      const int64_t tbegin = p * t.count() / parts, tend = (p + 1) * t.count() / parts;
      for (int64_t tile = tbegin; tile < tend; ++tile) {
        const int64_t n0 = (tile / t.row_blocks) * t.nb;
        const int64_t nb = std::min(t.nb, N - n0);
        const int64_t oy0 = (tile % t.row_blocks) * t.rows;
        const int64_t oy1 = std::min(s.out_h, oy0 + t.rows);
        const int64_t ncols = nb * (oy1 - oy0) * OW;
        const T* gsrc;
        int64_t ldg;
        if (t.nb == 1) {
          gsrc = go + n0 * O * L + oy0 * OW;
          ldg = L;
        } else {
          T* packed = packed_buf.mutable_data_ptr<T>();
          pack_images(go + n0 * O * L, nb, O, L, packed);
          gsrc = packed;
          ldg = ncols;
        }
        for (int64_t g = 0; g < G; ++g) {
          const T* xg = x + (n0 * C + g * Cg) * HW;
          const T* gg = gsrc + g * Og * ldg;
          T* accg = acc + g * Og * Kg;
          for (int64_t t0 = 0; t0 < ncols; t0 += kKT) {
            const int64_t kt = std::min(kKT, ncols - t0);
            for (int64_t r0 = 0; r0 < Kg; r0 += kRows) {
              const int64_t rows = std::min(kRows, Kg - r0);
              const T* b;
              int64_t ldb;
              if (in_place) {
                b = xg + r0 * HW + oy0 * OW + t0;
                ldb = HW;
              } else {
                im2col_block(xg, C * HW, oy0, oy1, r0, rows, t0, kt, cols, kKT, s,
                             im2col_scratch, x, x + N * C * HW);
                b = cols;
                ldb = kKT;
              }
              gemm::gemm_nt<T>(Og, rows, kt, gg + t0, ldg, b, ldb, accg + r0, Kg);
            }
          }
        }
      }
    }
  });
  at::Tensor total = partial[0];
  for (int64_t p = 1; p < parts; ++p) total.add_(partial[p]);
  grad_weight.view({O, Kg}).copy_(total);
}

#endif  // FASTCONV_HAVE_AVX512_GEMM

}  // namespace

// float32 / float64 take the own GEMM where the build has AVX-512; bfloat16 (and every dtype
// on other builds) the at::mm back end.
bool use_own_gemm(at::ScalarType st) {
#ifdef FASTCONV_HAVE_AVX512_GEMM
  return st == at::kFloat || st == at::kDouble;
#else
  (void)st;
  return false;
#endif
}

void im2col_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                    at::Tensor& out, const Conv2dShape& s) {
  const auto st = input.scalar_type();
  if (use_own_gemm(st)) {
    FASTCONV_DISPATCH_OWN_GEMM(st, [&] { forward_gemm<scalar_t>(input, weight, bias, out, s); })
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, st, "conv2d_im2col_forward",
                                 [&] { forward_mm<scalar_t>(input, weight, bias, out, s); });
}

void im2col_grad_input(const at::Tensor& grad_output, const at::Tensor& weight,
                       at::Tensor& grad_input, const Conv2dShape& s) {
  Conv2dShape t;
  if (grad_input_as_forward_shape(s, t)) {
    const auto st = grad_output.scalar_type();
    if (s.kernel_h * s.kernel_w == 1 && use_own_gemm(st)) {
      // 1x1: the forward's A operand is W_g^T, packed straight from the weight (no transposed
      // copy of it first)
      FASTCONV_DISPATCH_OWN_GEMM(st, [&] {
        forward_gemm<scalar_t>(grad_output, weight, at::Tensor(), grad_input, t,
                               pack_weight<scalar_t>(weight, s, true));
      })
      return;
    }
    im2col_forward(grad_output, flipped_transposed_weight(weight, s), at::Tensor(), grad_input,
                   t);
    return;
  }
  const auto st = grad_output.scalar_type();
  if (use_own_gemm(st)) {
    FASTCONV_DISPATCH_OWN_GEMM(
        st, [&] { grad_input_gemm<scalar_t>(grad_output, weight, grad_input, s); })
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND(
      at::kBFloat16, st, "conv2d_im2col_grad_input",
      [&] { grad_input_mm<scalar_t>(grad_output, weight, grad_input, s); });
}

void im2col_grad_weight(const at::Tensor& grad_output, const at::Tensor& input,
                        at::Tensor& grad_weight, const Conv2dShape& s) {
  const auto st = grad_output.scalar_type();
  if (use_own_gemm(st)) {
    FASTCONV_DISPATCH_OWN_GEMM(
        st, [&] { grad_weight_gemm<scalar_t>(grad_output, input, grad_weight, s); })
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND(
      at::kBFloat16, st, "conv2d_im2col_grad_weight",
      [&] { grad_weight_mm<scalar_t>(grad_output, input, grad_weight, s); });
}

}  // namespace conv2d_cpu
}  // namespace fastconv
