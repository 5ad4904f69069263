// Depthwise conv2d, channels_last (NHWC), float32, AVX-512: the fast path for the shape that
// MobileNet-style networks use almost exclusively: stride 1, dilation 1, channel multiplier 1,
// a square 3x3, 5x5 or 7x7 kernel, channels a multiple of 16. Other shapes (and builds without
// AVX-512) take the general kernels in depthwise_conv2d.cpp; each entry point here returns
// false when it does not apply.
//
// Forward: out[n][oh][ow][c] = b[c] + sum_{kh,kw} w[kh][kw][c] * x[n][oh - ph + kh][ow - pw + kw][c]
// (zero outside the image). grad_input with stride 1 is the same correlation of grad_output
// with the flipped kernel and padding K - 1 - p, so one kernel serves both.
//
// Blocking (forward / grad_input): one task = one output row; per 16-channel block, blocks of P
// output pixels. For each kernel row the P + K - 1 input vectors the block needs are loaded
// once into registers (zero vectors for columns outside the image, so there is no padded copy),
// then each of the K weight vectors of that row is loaded once and applied to all P pixels:
// P + 2K - 1 loads per P * K FMAs (21 per 56 for 7x7, P = 8), all loads 64-byte aligned when C
// is a multiple of 16. The input rows of a task (K rows of W * C floats) stay in L2.
//
// grad_weight: gw[c][kh][kw] = sum_{n,oh,ow} go[n][oh][ow][c] * x[n][oh - ph + kh][ow - pw + kw][c].
// Per (row, channel block, kh) the K tap sums stay in registers for the whole row; per block of
// P pixels the P grad_output vectors and the P + K - 1 input vectors are loaded once. Rows are
// split into a fixed number of chunks (independent of the thread count) whose partial sums are
// added in chunk order: the result is the same bits for any number of threads. 3x3 walks each
// row pixel block by pixel block instead, all channel blocks of one block first (pm3_row).

#include "cpu/depthwise_fast.h"
#include "cpu/memory_hints.h"
#include "cpu/static_for.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fastconv {

#if defined(__AVX512F__)
namespace {

// Most kernels here read each image row in C / 16 strided passes (one per channel block), which
// the hardware prefetchers do not run ahead of (pm3_row reads rows in memory order, but measured
// slower without the prefetches too): each task prefetches (Trickle, add_next_rows) the
// rows the next task will need that it has not read, spread over its blocks.
struct Geometry {
  int64_t H, W, C;    // input of the correlation (x, or grad_output for grad_input)
  int64_t OH, OW;     // its output
  int64_t ph, pw;     // padding (may be negative for grad_input when p > K - 1)
};

// Output pixels [ow0, ow0 + P) of one row, one channel block. rows[kh]: the input row oh - ph +
// kh at this channel block, nullptr outside the image. INTERIOR: every column the block reads
// is inside the image.
template <int K, int P, bool INTERIOR, bool NT>
__attribute__((noinline)) void corr_block(const float* const* rows, int64_t W, int64_t C,
                                          int64_t iw0, const float* w, __m512 init, float* o) {
  // plain loops that GCC unrolls before register allocation (the pragmas): written with the
  // lambda-based static_for, GCC kept acc[] on the stack and stored and reloaded all P
  // accumulators for every kernel row
  __m512 acc[P];
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) acc[p] = init;
#pragma GCC unroll 8
  for (int kh = 0; kh < K; ++kh) {
    const float* r = rows[kh];
    if (r == nullptr) continue;
    __m512 xv[P + K - 1];
#pragma GCC unroll 16
    for (int q = 0; q < P + K - 1; ++q) {
      const int64_t iw = iw0 + q;
      xv[q] = (INTERIOR || (iw >= 0 && iw < W)) ? _mm512_loadu_ps(r + iw * C)
                                                 : _mm512_setzero_ps();
    }
#pragma GCC unroll 8
    for (int kw = 0; kw < K; ++kw) {
      const __m512 wv = _mm512_loadu_ps(w + (kh * K + kw) * C);
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) acc[p] = _mm512_fmadd_ps(xv[p + kw], wv, acc[p]);
    }
  }
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) {
    if (NT)
      _mm512_stream_ps(o + p * C, acc[p]);
    else
      _mm512_storeu_ps(o + p * C, acc[p]);
  }
}

// All blocks of P pixels that fit in [ow, OW), one channel block. Each block also prefetches
// slice (slice0 + block) of `pf` (the rows the next task needs), so the prefetches trickle out
// between the FMAs.
template <int K, int P, bool NT>
inline void corr_blocks(const float* const* rows, const Geometry& g, const float* w, __m512 init,
                        float* orow, int64_t& ow, const Trickle& pf, int64_t slice0,
                        int64_t slices) {
  for (; ow + P <= g.OW; ow += P) {
    pf.part(slice0 + ow / P, slices);
    const int64_t iw0 = ow - g.pw;
    if (iw0 >= 0 && iw0 + P + K - 1 <= g.W)
      corr_block<K, P, true, NT>(rows, g.W, g.C, iw0, w, init, orow + ow * g.C);
    else
      corr_block<K, P, false, NT>(rows, g.W, g.C, iw0, w, init, orow + ow * g.C);
  }
}

// Channel block c0 of one output row of the correlation: rows[kh] = input row oh - ph + kh at
// channel 0 (nullptr outside the image). pf: what the next task will need, spread over this
// task's blocks: the task is `rows_per_task` output rows (`row` is this one's index among them)
// of all channel blocks.
template <int K, bool NT>
inline void corr_row_block(const float* const* rows, const Geometry& g, const float* wk,
                           const float* bias, float* orow, const Trickle& pf, int64_t c0,
                           int64_t row = 0, int64_t rows_per_task = 1) {
  const int64_t nb = std::max<int64_t>(g.OW / 8, 1);
  const float* r[K];
  for (int kh = 0; kh < K; ++kh) r[kh] = rows[kh] ? rows[kh] + c0 : nullptr;
  const __m512 init = bias ? _mm512_loadu_ps(bias + c0) : _mm512_setzero_ps();
  const int64_t slice0 = (c0 / 16 * rows_per_task + row) * nb,
                slices = g.C / 16 * rows_per_task * nb;
  int64_t ow = 0;
  corr_blocks<K, 8, NT>(r, g, wk + c0, init, orow + c0, ow, pf, slice0, slices);
  corr_blocks<K, 4, NT>(r, g, wk + c0, init, orow + c0, ow, Trickle(), 0, 0);
  corr_blocks<K, 1, NT>(r, g, wk + c0, init, orow + c0, ow, Trickle(), 0, 0);
}

// Row ih of image n of an (N, H, W, C) tensor, or nullptr outside the image.
inline const float* image_row(const float* base, const Geometry& g, int64_t n, int64_t ih) {
  return ih < 0 || ih >= g.H ? nullptr : base + (n * g.H + ih) * g.W * g.C;
}

// Adds to `pf` the rows of `in` (H rows of W * C floats per image) that the next task reads and
// the current one has not. The current task's output rows end at o1 (exclusive) in image n, the
// next task's are [p0, p1) of image m (none if p1 <= p0); output row oh reads input rows
// oh - pad .. oh - pad + K - 1. A next task in another image gets that image's first rows
// (without them each image's first rows came from DRAM in strided passes: the fused backward
// measured 1.085 -> 1.061 ms for 3x3, 2.228 -> 2.129 for 7x7).
inline void add_next_rows(Trickle& pf, const float* in, int64_t H, int64_t row_elems, int64_t K,
                          int64_t pad, int64_t n, int64_t o1, int64_t m, int64_t p0, int64_t p1) {
  if (p1 <= p0) return;
  int64_t lo = std::max<int64_t>(p0 - pad, 0);
  const int64_t hi = std::min<int64_t>(p1 - 1 - pad + K, H);
  if (m == n) lo = std::max<int64_t>(lo, o1 - 1 - pad + K);
  if (hi > lo) pf.add(in + (m * H + lo) * row_elems, (hi - lo) * row_elems);
}

// The 3x3 correlation's tasks are bands of 4 output rows of one image, done channel block by
// channel block, the band's rows in order within each block. A channel block's slices of the 3
// input rows (3 * W lines of 64 bytes, 10.5 KiB at W = 56) then stay in L1 from one output row
// to the next, so each input line comes from L2 about once per band and channel block instead of
// 3 times: row by row, a task's input rows (96 KiB at C = 144) do not fit in L1. Measured with
// the data in L2 (C = 144, W = 56): 8.8 -> 5.9 cycles per output vector; cold, in one process,
// interleaved (bench shape, channels_last forward): 0.733 -> 0.648, 0.371 -> 0.329 and
// 0.634 -> 0.581 ms at three memory speeds, 2 and 6 rows per band in between. 5x5 gained
// nothing and 7x7 lost 4 % (0.915 -> 0.954 ms: compute-bound, and 7 row slices crowd L1), so
// they keep one row per task. The fused backward kept its row order: bands of 1-3 rows measured
// no faster there (1.118 / 1.117 / 1.147 / 1.181 ms).
template <int K>
constexpr int64_t band_rows() {
  return K == 3 ? 4 : 1;
}

// wk[(kh * K + kw) * C + c]: the tap weights, channel-contiguous; bias[c] or nullptr.
template <int K, bool NT>
void correlate_impl(const float* x, const float* wk, const float* bias, float* out, int64_t N,
                    const Geometry& g) {
  constexpr int64_t kBandRows = band_rows<K>();
  const int64_t per_image = (g.OH + kBandRows - 1) / kBandRows;
  at::parallel_for(0, N * per_image, 1, [&](int64_t begin, int64_t end) {
    const float* rows[K];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = b / per_image, oh0 = b % per_image * kBandRows;
      const int64_t oh1 = std::min(oh0 + kBandRows, g.OH);
      Trickle next;
      if (b + 1 < end) {
        const int64_t m = (b + 1) / per_image, p0 = (b + 1) % per_image * kBandRows;
        add_next_rows(next, x, g.H, g.W * g.C, K, g.ph, n, oh1, m, p0,
                      std::min(p0 + kBandRows, g.OH));
      }
      for (int64_t c0 = 0; c0 < g.C; c0 += 16)
        for (int64_t oh = oh0; oh < oh1; ++oh) {
          for (int kh = 0; kh < K; ++kh) rows[kh] = image_row(x, g, n, oh - g.ph + kh);
          corr_row_block<K, NT>(rows, g, wk, bias, out + (n * g.OH + oh) * g.OW * g.C, next, c0,
                                oh - oh0, oh1 - oh0);
        }
    }
    if (NT) nt_fence();
  });
}

template <int K>
void correlate(const float* x, const float* wk, const float* bias, float* out, int64_t N,
               const Geometry& g) {
  if (stream_output(out, N * g.OH * g.OW * g.C * int64_t(sizeof(float))))
    correlate_impl<K, true>(x, wk, bias, out, N, g);
  else
    correlate_impl<K, false>(x, wk, bias, out, N, g);
}

// grad_weight, one grad_output row `gr` against one kernel row (input row xr) of one channel
// block: acc[kw] += go[ow] * x[ow - pw + kw]. Blocks of P = 8 pixels: the 8 grad_output vectors
// and the P + K - 1 input vectors are loaded once for all K taps (measured faster than two
// kernel rows per pass with blocks of 4: 1.23 vs 1.37 ms for 7x7). INTERIOR: every column read
// is inside the image; otherwise columns outside read as zero.
constexpr int kGwBlock = 8;

template <int K, int S, bool INTERIOR>
__attribute__((always_inline)) inline void gw_block(const float* xr, const float* gr, int64_t W,
                                                    int64_t C, int64_t pw, int64_t ow,
                                                    __m512 (*acc)[K]) {
  constexpr int P = kGwBlock;
  __m512 gv[P], xv[P + K - 1];
  for (int p = 0; p < P; ++p) gv[p] = _mm512_loadu_ps(gr + (ow + p) * C);
  for (int q = 0; q < P + K - 1; ++q) {
    const int64_t iw = ow - pw + q;
    xv[q] = INTERIOR || (iw >= 0 && iw < W) ? _mm512_loadu_ps(xr + iw * C) : _mm512_setzero_ps();
    // opaque to the optimiser: GCC would otherwise re-read each vector from memory for every
    // FMA that uses it (K times), which made this loop load-bound
    asm("" : "+v"(xv[q]));
  }
  for (int p = 0; p < P; ++p)  // consecutive FMAs feed different accumulators
    for (int kw = 0; kw < K; ++kw)
      acc[p % S][kw] = _mm512_fmadd_ps(gv[p], xv[p + kw], acc[p % S][kw]);
}

// Full blocks [b0, b1) (pixels [b0 * P, b1 * P)) of one row; the K tap sums (16 lanes each, in
// part) stay in registers over the blocks, in S sets (pixel p feeds set p % S), added at the end.
template <int K, int S>
__attribute__((always_inline)) inline void gw_block_range(const float* xr, const float* gr,
                                                          int64_t W, int64_t C, int64_t pw,
                                                          int64_t b0, int64_t b1, float* part) {
  constexpr int P = kGwBlock;
  __m512 acc[S][K];
  for (int kw = 0; kw < K; ++kw) {
    acc[0][kw] = _mm512_loadu_ps(part + kw * 16);
    for (int s = 1; s < S; ++s) acc[s][kw] = _mm512_setzero_ps();
  }
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t ow = b * P;
    if (ow - pw >= 0 && ow - pw + P + K - 1 <= W)
      gw_block<K, S, true>(xr, gr, W, C, pw, ow, acc);
    else
      gw_block<K, S, false>(xr, gr, W, C, pw, ow, acc);
  }
  for (int kw = 0; kw < K; ++kw) {
    __m512 sum = acc[0][kw];
    for (int s = 1; s < S; ++s) sum = _mm512_add_ps(sum, acc[s][kw]);
    _mm512_storeu_ps(part + kw * 16, sum);
  }
}

// A whole row's full blocks, the sums in registers throughout.
template <int K, int S>
__attribute__((noinline)) void gw_blocks_s(const float* xr, const float* gr, int64_t W,
                                           int64_t C, int64_t pw, int64_t nblk, float* part) {
  gw_block_range<K, S>(xr, gr, W, C, pw, 0, nblk, part);
}

// Two accumulator sets (even and odd pixels) for 3x3 and 5x5: with one, the K FMA chains are
// bound by the 4-cycle FMA latency (measured, warm: 3x3 0.59 -> 0.53 ms, 5x5 1.02 -> 0.95);
// 7x7 has 7 chains already and no registers for a second set.
template <int K>
void gw_blocks(const float* xr, const float* gr, int64_t W, int64_t C, int64_t pw, int64_t nblk,
               float* part) {
  gw_blocks_s<K, (K <= 5 ? 2 : 1)>(xr, gr, W, C, pw, nblk, part);
}

// The same sums for single pixels [ow0, ow1) with bounds checks.
template <int K>
__attribute__((noinline)) void gw_pixels(const float* xr, const float* gr, int64_t W, int64_t C,
                                         int64_t pw, int64_t ow0, int64_t ow1, float* part) {
  if (ow1 <= ow0) return;
  __m512 acc[K];
  for (int kw = 0; kw < K; ++kw) acc[kw] = _mm512_loadu_ps(part + kw * 16);
  for (int64_t ow = ow0; ow < ow1; ++ow) {
    const __m512 gv = _mm512_loadu_ps(gr + ow * C);
    for (int kw = 0; kw < K; ++kw) {
      const int64_t iw = ow - pw + kw;
      const __m512 xv = iw >= 0 && iw < W ? _mm512_loadu_ps(xr + iw * C) : _mm512_setzero_ps();
      acc[kw] = _mm512_fmadd_ps(gv, xv, acc[kw]);
    }
  }
  for (int kw = 0; kw < K; ++kw) _mm512_storeu_ps(part + kw * 16, acc[kw]);
}

// One grad_output row against one kernel row: full blocks, then the last OW % P pixels one by
// one (in column order, so the sums are the same for any split of the work).
template <int K>
void gw_row(const float* xr, const float* gr, const Geometry& g, float* part) {
  const int64_t nblk = g.OW / kGwBlock;
  if (nblk > 0) gw_blocks<K>(xr, gr, g.W, g.C, g.pw, nblk, part);
  gw_pixels<K>(xr, gr, g.W, g.C, g.pw, nblk * kGwBlock, g.OW, part);
}

// gw[c][kh][kw] = the sum over chunks, in chunk order, of partial[chunk][c / 16][kh][kw][c % 16]
// (chunk by chunk over contiguous memory: an element-by-element walk across the chunks' partials
// was a serial tail of ~0.1 ms).
template <int K>
void reduce_chunks(std::vector<float>& partial, int64_t T, int64_t C, float* gw) {
  const int64_t per = C * K * K;
  float* sum = partial.data();  // chunk 0 accumulates the others
  for (int64_t chunk = 1; chunk < T; ++chunk) {
    const float* src = partial.data() + chunk * per;
    for (int64_t i = 0; i < per; i += 16)
      _mm512_storeu_ps(sum + i, _mm512_add_ps(_mm512_loadu_ps(sum + i), _mm512_loadu_ps(src + i)));
  }
  for (int64_t c = 0; c < C; ++c) {
    const int64_t cb = c / 16, lane = c % 16;
    for (int64_t tap = 0; tap < K * K; ++tap)
      gw[c * K * K + tap] = sum[(cb * 16) * K * K + tap * 16 + lane];
  }
}

// grad_output row `gr` against the K input rows oh - ph + kh (xr[kh], nullptr outside the
// image), one channel block; part: its [kh][kw][16] tap sums.
template <int K>
void gw_rows(const float* const* xr, const float* gr, const Geometry& g, float* part) {
  for (int kh = 0; kh < K; ++kh)
    if (xr[kh] != nullptr) gw_row<K>(xr[kh], gr, g, part + kh * K * 16);
}

// bp[c0, c0 + 16) += the grad_output vectors of row `grow` at pixels [ow0, ow1), in pixel order.
inline void bias_sums(float* bp, const float* grow, int64_t C, int64_t c0, int64_t ow0,
                      int64_t ow1) {
  __m512 acc = _mm512_loadu_ps(bp + c0);
  for (int64_t ow = ow0; ow < ow1; ++ow)
    acc = _mm512_add_ps(acc, _mm512_loadu_ps(grow + ow * C + c0));
  _mm512_storeu_ps(bp + c0, acc);
}

// Loads the vector at `r` and steps `r` one column (C floats) on. The empty asm takes the vector
// as a scalar (an array element there made GCC keep the whole array on the stack) and keeps
// GCC from folding the load into the FMAs that use it, or the walk into one offset register
// per column.
__attribute__((always_inline)) inline __m512 walk_load(const float*& r, int64_t C) {
  __m512 v = _mm512_loadu_ps(r);
  r += C;
  asm("" : "+r"(r), "+v"(v));
  return v;
}

// The 3x3 grad_weight sums (and the bias sum when bp) of one block of 8 pixels and one channel
// block whose three input rows are inside the image: the work of three gw_block_range calls and
// bias_sums in one straight run, the grad_output vectors loaded once instead of four times. The
// same operations in the same order, so the same bits. EDGE 0: all ten input columns inside
// the image; 1: the first is column -1; 2: the last is column W (those read as zeros, as in
// gw_block). x[kh]: input row kh at the first column read and the channel block; gr:
// grad_output at (ow, c0); part: [kh][kw][16]; bp: the bias sums at c0, or nullptr. Fused
// backward with the data in L3 (bench shape at N = 2): 0.243 -> 0.209 ms; cold, the in-process
// comparisons at the bench shape ranged from 13 % faster to 7 % slower (README).
template <int EDGE>
__attribute__((noinline)) void gw3_block(const float* const* x, const float* gr, int64_t C,
                                         float* part, float* bp) {
  constexpr int K = 3, P = kGwBlock;
  __m512 gv[P];
#pragma GCC unroll 8
  for (int p = 0; p < P; ++p) gv[p] = walk_load(gr, C);
#pragma GCC unroll 3
  for (int kh = 0; kh < K; ++kh) {
    const float* r = x[kh];
    __m512 xv[P + K - 1];
#pragma GCC unroll 10
    for (int q = 0; q < P + K - 1; ++q)
      xv[q] = (EDGE == 1 && q == 0) || (EDGE == 2 && q == P + K - 2) ? _mm512_setzero_ps()
                                                                      : walk_load(r, C);
    __m512 acc[2][K];
#pragma GCC unroll 3
    for (int kw = 0; kw < K; ++kw) {
      acc[0][kw] = _mm512_loadu_ps(part + (kh * K + kw) * 16);
      acc[1][kw] = _mm512_setzero_ps();
    }
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 3
      for (int kw = 0; kw < K; ++kw)
        acc[p % 2][kw] = _mm512_fmadd_ps(gv[p], xv[p + kw], acc[p % 2][kw]);
#pragma GCC unroll 3
    for (int kw = 0; kw < K; ++kw)
      _mm512_storeu_ps(part + (kh * K + kw) * 16, _mm512_add_ps(acc[0][kw], acc[1][kw]));
  }
  if (bp) {
    __m512 sb = _mm512_loadu_ps(bp);
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) sb = _mm512_add_ps(sb, gv[p]);
    _mm512_storeu_ps(bp, sb);
  }
}

// 3x3, one row t of the grad_weight sums (and, with GI, of grad_input and the bias sums), pixel
// block by pixel block with all channel blocks of a pixel block before the next: the rows are
// then read in memory order, 8 pixels * C channels at a time, rather than in C / 16 passes
// with a 64-byte line every C * 4 bytes. Same process, cold inputs, bench shape (fused
// backward): 1.050 -> 0.884 ms median over 16 interleaved rounds. 5x5 and 7x7 lost (2.2 ->
// 3.1 ms for 7x7: their per-block work is longer, and the tap sums go through memory once per
// block) and keep the channel-block passes of gw_rows / corr_row_block.
// xrows[kh]: input row t - ph + kh at channel 0 (nullptr outside the image); grow: grad_output
// row t; grows[kh]: grad_output rows for grad_input (gg's geometry); girow: grad_input row t.
// part[c0 / 16][kh][kw][16]: the chunk's tap sums; per block and kernel row the even and odd
// pixels go to two sets of sums, added into part at the end of the block (grad_weight_rows
// runs this same code for 3x3, so the fused backward and the grad_weight op give the same
// bits). bp: the chunk's bias sums or nullptr.
template <bool GI, bool NT>
void pm3_row(const float* const* xrows, const float* grow, const float* const* grows,
             const Geometry& g, const Geometry& gg, const float* wflip, float* girow,
             float* part, float* bp, const Trickle& next) {
  constexpr int K = 3, S = 2;
  const int64_t C = g.C, nblk = g.OW / kGwBlock, ncb = C / 16;
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t ow = b * kGwBlock, iw0 = ow - gg.pw;
    const bool gi_interior = iw0 >= 0 && iw0 + kGwBlock + K - 1 <= gg.W;
    // gw3_block's cases: every column inside the image (0), or all but the first (1: the
    // block's first column is -1) or all but the last (2: its last column is W)
    const int64_t ix0 = ow - g.pw, ix1 = ix0 + kGwBlock + K - 1;
    const int gw_edge = ix0 >= 0 && ix1 <= g.W ? 0 : ix0 == -1 && ix1 <= g.W ? 1
                        : ix0 >= 0 && ix1 == g.W + 1 ? 2 : -1;
    const bool gw_fast = xrows[0] && xrows[1] && xrows[2] && gw_edge >= 0;
    for (int64_t c0 = 0; c0 < C; c0 += 16) {
      next.part(b * ncb + c0 / 16, nblk * ncb);
      if (gw_fast) {
        const int64_t col = std::max<int64_t>(ix0, 0);  // the first column read
        const float* xr[K] = {xrows[0] + col * C + c0, xrows[1] + col * C + c0,
                              xrows[2] + col * C + c0};
        const float* go_b = grow + ow * C + c0;
        float* pt = part + c0 * K * K;
        float* bc = bp ? bp + c0 : nullptr;
        if (gw_edge == 0)
          gw3_block<0>(xr, go_b, C, pt, bc);
        else if (gw_edge == 1)
          gw3_block<1>(xr, go_b, C, pt, bc);
        else
          gw3_block<2>(xr, go_b, C, pt, bc);
      } else {
        for (int kh = 0; kh < K; ++kh)
          if (xrows[kh] != nullptr)
            gw_block_range<K, S>(xrows[kh] + c0, grow + c0, g.W, C, g.pw, b, b + 1,
                                 part + c0 * K * K + kh * K * 16);
        if (bp) bias_sums(bp, grow, C, c0, ow, ow + kGwBlock);
      }
      if (GI) {
        const float* r[K];
        for (int kh = 0; kh < K; ++kh) r[kh] = grows[kh] ? grows[kh] + c0 : nullptr;
        float* o = girow + ow * C + c0;
        if (gi_interior)
          corr_block<K, kGwBlock, true, NT>(r, gg.W, C, iw0, wflip + c0, _mm512_setzero_ps(), o);
        else
          corr_block<K, kGwBlock, false, NT>(r, gg.W, C, iw0, wflip + c0, _mm512_setzero_ps(), o);
      }
    }
  }
  const int64_t ow0 = nblk * kGwBlock;  // the last OW % 8 pixels, one by one
  if (ow0 == g.OW) return;
  for (int64_t c0 = 0; c0 < C; c0 += 16) {
    for (int kh = 0; kh < K; ++kh)
      if (xrows[kh] != nullptr)
        gw_pixels<K>(xrows[kh] + c0, grow + c0, g.W, C, g.pw, ow0, g.OW,
                     part + c0 * K * K + kh * K * 16);
    if (bp) bias_sums(bp, grow, C, c0, ow0, g.OW);
    if (GI) {
      const float* r[K];
      for (int kh = 0; kh < K; ++kh) r[kh] = grows[kh] ? grows[kh] + c0 : nullptr;
      int64_t ow = ow0;
      corr_blocks<K, 4, NT>(r, gg, wflip + c0, _mm512_setzero_ps(), girow + c0, ow, Trickle(), 0,
                            0);
      corr_blocks<K, 1, NT>(r, gg, wflip + c0, _mm512_setzero_ps(), girow + c0, ow, Trickle(), 0,
                            0);
    }
  }
}

// Fixed number of row chunks for the deterministic grad_weight reduction.
constexpr int64_t kChunks = 32;

template <int K>
void grad_weight_rows(const float* x, const float* go, float* gw, int64_t N, const Geometry& g) {
  const int64_t C = g.C, R = N * g.OH, T = std::min<int64_t>(kChunks, R);
  // partial[chunk][cb][kh][kw][16]
  std::vector<float> partial(static_cast<size_t>(T * C * K * K));
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    const int64_t last = end * R / T;  // this thread's rows end here
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      float* part = partial.data() + chunk * C * K * K;
      std::fill(part, part + C * K * K, 0.f);
      for (int64_t t = chunk * R / T; t < (chunk + 1) * R / T; ++t) {
        const int64_t n = t / g.OH, oh = t % g.OH;
        // the next row's new input row (or a new image's first rows) and grad_output row
        Trickle next;
        if (t + 1 < last) {
          const int64_t m = (t + 1) / g.OH, p0 = (t + 1) % g.OH;
          add_next_rows(next, x, g.H, g.W * C, K, g.ph, n, oh + 1, m, p0, p0 + 1);
          next.add(go + (t + 1) * g.OW * C, g.OW * C);
        }
        const float* xrows[K];  // the kernel rows inside the image
        for (int kh = 0; kh < K; ++kh) xrows[kh] = image_row(x, g, n, oh - g.ph + kh);
        if constexpr (K == 3) {
          pm3_row<false, false>(xrows, go + t * g.OW * C, nullptr, g, g, nullptr, nullptr, part,
                                nullptr, next);
          continue;
        }
        for (int64_t c0 = 0; c0 < C; c0 += 16) {
          next.part(c0 / 16, C / 16);
          const float* xr[K];
          for (int kh = 0; kh < K; ++kh) xr[kh] = xrows[kh] ? xrows[kh] + c0 : nullptr;
          gw_rows<K>(xr, go + t * g.OW * C + c0, g, part + c0 * K * K);
        }
      }
    }
  });
  reduce_chunks<K>(partial, T, C, gw);
}

// Fused backward for 'same' padding (OH == H, OW == W, so grad_input row t and grad_output row t
// are the same (n, row)): one pass over the rows computes, per row t and channel block, the
// grad_weight tap sums of grad_output row t against input rows r - p .. r + p, the bias sum of
// grad_output row t, and grad_input row t (grad_output rows r - p .. r + p correlated with the
// flipped kernel). The rows both need stay in L1/L2 between the two, so DRAM sees x and
// grad_output once each instead of grad_output twice. Chunks and summation order are those of
// grad_weight_rows, and grad_input rows are computed by the same code as the correlation's rows:
// the results are bit-identical to the two separate kernels.
template <int K, bool NT>
void backward_rows(const float* x, const float* go, const float* wflip, float* gi, float* gw,
                   float* gb, int64_t N, const Geometry& g) {
  const int64_t C = g.C, R = N * g.OH, T = std::min<int64_t>(kChunks, R);
  const Geometry gg{g.OH, g.OW, C, g.H, g.W, K - 1 - g.ph, K - 1 - g.pw};  // grad_input's
  std::vector<float> partial(static_cast<size_t>(T * C * K * K));
  std::vector<float> bias_part(gb ? static_cast<size_t>(T * C) : 0);
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    const float* grows[K];
    const int64_t last = end * R / T;  // this thread's rows end here
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      float* part = partial.data() + chunk * C * K * K;
      std::fill(part, part + C * K * K, 0.f);
      float* bp = gb ? bias_part.data() + chunk * C : nullptr;
      if (bp) std::fill(bp, bp + C, 0.f);
      for (int64_t t = chunk * R / T; t < (chunk + 1) * R / T; ++t) {
        const int64_t n = t / g.OH, oh = t % g.OH;
        for (int kh = 0; kh < K; ++kh) grows[kh] = image_row(go, gg, n, oh - gg.ph + kh);
        // the next row reads one new input row and one new grad_output row
        Trickle next;
        if (t + 1 < last) {
          const int64_t m = (t + 1) / g.OH, p0 = (t + 1) % g.OH;
          add_next_rows(next, x, g.H, g.W * C, K, g.ph, n, oh + 1, m, p0, p0 + 1);
          add_next_rows(next, go, g.OH, g.OW * C, K, gg.ph, n, oh + 1, m, p0, p0 + 1);
        }
        const float* grow = go + t * g.OW * C;
        const float* xrows[K];
        for (int kh = 0; kh < K; ++kh) xrows[kh] = image_row(x, g, n, oh - g.ph + kh);
        if constexpr (K == 3) {
          pm3_row<true, NT>(xrows, grow, grows, g, gg, wflip, gi + t * g.W * C, part, bp, next);
          continue;
        }
        for (int64_t c0 = 0; c0 < C; c0 += 16) {
          const float* xr[K];
          for (int kh = 0; kh < K; ++kh) xr[kh] = xrows[kh] ? xrows[kh] + c0 : nullptr;
          gw_rows<K>(xr, grow + c0, g, part + c0 * K * K);
          if (bp) bias_sums(bp, grow, C, c0, 0, g.OW);
          corr_row_block<K, NT>(grows, gg, wflip, nullptr, gi + t * g.W * C, next, c0);
        }
      }
    }
    if (NT) nt_fence();
  });
  reduce_chunks<K>(partial, T, C, gw);
  if (gb) {
    for (int64_t c = 0; c < C; ++c) {
      float sum = 0.f;
      for (int64_t chunk = 0; chunk < T; ++chunk) sum += bias_part[chunk * C + c];
      gb[c] = sum;
    }
  }
}

// w: the (C, 1, K, K) weight, contiguous. wk[(kh * K + kw) * C + c], flipped if asked.
std::vector<float> taps_by_channel(const at::Tensor& weight, int64_t C, int64_t K, bool flip) {
  std::vector<float> wk(static_cast<size_t>(K * K * C));
  const float* w = weight.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c)
    for (int64_t t = 0; t < K * K; ++t) wk[(flip ? K * K - 1 - t : t) * C + c] = w[c * K * K + t];
  return wk;
}

bool depthwise_nhwc_fast_applies(const at::Tensor& t, const Conv2dShape& s) {
  return t.scalar_type() == at::kFloat && s.stride_h == 1 && s.stride_w == 1 && s.dil_h == 1 &&
         s.dil_w == 1 && s.out_channels == s.in_channels && s.in_channels % 16 == 0 &&
         s.kernel_h == s.kernel_w && (s.kernel_h == 3 || s.kernel_h == 5 || s.kernel_h == 7);
}

}  // namespace

bool depthwise_nhwc_fast_forward(const at::Tensor& x, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, at::Tensor& out,
                                 const Conv2dShape& s) {
  if (!depthwise_nhwc_fast_applies(x, s)) return false;
  const int64_t C = s.in_channels, K = s.kernel_h;
  const Geometry g{s.in_h, s.in_w, C, s.out_h, s.out_w, s.pad_h, s.pad_w};
  const std::vector<float> wk = taps_by_channel(weight, C, K, false);
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  return with_fixed_kernel(K, [&](auto kc) {
    correlate<decltype(kc)::value>(x.data_ptr<float>(), wk.data(), b, out.data_ptr<float>(),
                                   s.batch, g);
  });
}

bool depthwise_nhwc_fast_grad_input(const at::Tensor& grad_output, const at::Tensor& weight,
                                    at::Tensor& grad_input, const Conv2dShape& s) {
  if (!depthwise_nhwc_fast_applies(grad_output, s)) return false;
  const int64_t C = s.in_channels, K = s.kernel_h;
  // correlation of grad_output (OH x OW) with the flipped kernel, padding K - 1 - p
  const Geometry g{s.out_h, s.out_w, C, s.in_h, s.in_w, K - 1 - s.pad_h, K - 1 - s.pad_w};
  const std::vector<float> wk = taps_by_channel(weight, C, K, true);
  return with_fixed_kernel(K, [&](auto kc) {
    correlate<decltype(kc)::value>(grad_output.data_ptr<float>(), wk.data(), nullptr,
                                   grad_input.data_ptr<float>(), s.batch, g);
  });
}

bool depthwise_nhwc_fast_grad_weight(const at::Tensor& grad_output, const at::Tensor& x,
                                     at::Tensor& grad_weight, const Conv2dShape& s) {
  if (!depthwise_nhwc_fast_applies(x, s) || !grad_weight.is_contiguous()) return false;
  const Geometry g{s.in_h, s.in_w, s.in_channels, s.out_h, s.out_w, s.pad_h, s.pad_w};
  return with_fixed_kernel(s.kernel_h, [&](auto kc) {
    grad_weight_rows<decltype(kc)::value>(x.data_ptr<float>(), grad_output.data_ptr<float>(),
                                          grad_weight.data_ptr<float>(), s.batch, g);
  });
}

bool depthwise_nhwc_fast_backward(const at::Tensor& grad_output, const at::Tensor& x,
                                  const at::Tensor& weight, at::Tensor& grad_input,
                                  at::Tensor& grad_weight, at::Tensor& grad_bias,
                                  const Conv2dShape& s) {
  // 'same' padding only: grad_input row t and grad_output row t are then the same image row
  if (!depthwise_nhwc_fast_applies(x, s) || s.out_h != s.in_h || s.out_w != s.in_w ||
      !grad_weight.is_contiguous())
    return false;
  const int64_t C = s.in_channels, K = s.kernel_h;
  const Geometry g{s.in_h, s.in_w, C, s.out_h, s.out_w, s.pad_h, s.pad_w};
  const std::vector<float> wflip = taps_by_channel(weight, C, K, true);
  float* gb = grad_bias.defined() ? grad_bias.data_ptr<float>() : nullptr;
  const bool nt = stream_output(grad_input.data_ptr<float>(),
                                static_cast<int64_t>(grad_input.nbytes()));
  return with_fixed_kernel(K, [&](auto kc) {
    constexpr int KK = decltype(kc)::value;
    const float* xp = x.data_ptr<float>();
    const float* gp = grad_output.data_ptr<float>();
    float* gip = grad_input.data_ptr<float>();
    float* gwp = grad_weight.data_ptr<float>();
    if (nt)
      backward_rows<KK, true>(xp, gp, wflip.data(), gip, gwp, gb, s.batch, g);
    else
      backward_rows<KK, false>(xp, gp, wflip.data(), gip, gwp, gb, s.batch, g);
  });
}

#else  // no AVX-512: the general kernels handle everything

bool depthwise_nhwc_fast_forward(const at::Tensor&, const at::Tensor&,
                                 const c10::optional<at::Tensor>&, at::Tensor&,
                                 const Conv2dShape&) {
  return false;
}
bool depthwise_nhwc_fast_grad_input(const at::Tensor&, const at::Tensor&, at::Tensor&,
                                    const Conv2dShape&) {
  return false;
}
bool depthwise_nhwc_fast_grad_weight(const at::Tensor&, const at::Tensor&, at::Tensor&,
                                     const Conv2dShape&) {
  return false;
}
bool depthwise_nhwc_fast_backward(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  at::Tensor&, at::Tensor&, at::Tensor&, const Conv2dShape&) {
  return false;
}

#endif

}  // namespace fastconv
