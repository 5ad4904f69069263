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
// added in chunk order: the result is the same bits for any number of threads. The 3x3 backward
// walks two rows at a time pixel block by pixel block instead, all channel blocks of one block
// first (backward3).

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
// the hardware prefetchers do not run ahead of (backward3 reads rows in memory order, but
// measured slower without the prefetches too): each task prefetches (Trickle, add_next_rows)
// the rows the next task will need that it has not read, spread over its blocks.
struct Geometry {
  int64_t H, W, C;    // input of the correlation (x, or grad_output for grad_input)
  int64_t OH, OW;     // its output
  int64_t ph, pw;     // padding (may be negative for grad_input when p > K - 1)
};

// xv[q] = row[(col0 + q) * C .. + 16) for q < N: the N input vectors of one row that a block of
// pixels reads, zero for columns outside [0, W) unless INTERIOR (every column inside). OPAQUE
// passes each vector through an empty asm, opaque to the optimiser: the grad_weight blocks need
// it, or GCC re-reads each vector from memory for every FMA that uses it (K times), which made
// their loops load-bound.
template <int N, bool INTERIOR, bool OPAQUE = false>
__attribute__((always_inline)) inline void load_columns(const float* row, int64_t col0, int64_t W,
                                                        int64_t C, __m512* xv) {
#pragma GCC unroll 16
  for (int q = 0; q < N; ++q) {
    const int64_t col = col0 + q;
    xv[q] = (INTERIOR || (col >= 0 && col < W)) ? _mm512_loadu_ps(row + col * C)
                                                 : _mm512_setzero_ps();
    if (OPAQUE) asm("" : "+v"(xv[q]));
  }
}

// Calls f(std::integral_constant<int, n>()) for a block size n in [1, N), nothing for n == 0.
template <int N, typename F>
inline void with_tail(int64_t n, F&& f) {
  static_for<N>([&](auto i) {
    if (decltype(i)::value > 0 && n == decltype(i)::value) f(i);
  });
}

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
    load_columns<P + K - 1, INTERIOR>(r, iw0, W, C, xv);
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
  // the last OW % 8 pixels as one block: 4 + 1 + 1 + 1 blocks loaded their input columns and
  // weights once per block, which made the narrow rows of late stages (OW = 7, 14) load-bound
  with_tail<8>(g.OW - ow, [&](auto p) {
    corr_blocks<K, decltype(p)::value, NT>(r, g, wk + c0, init, orow + c0, ow, Trickle(), 0, 0);
  });
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

template <int K, int S, bool INTERIOR, int P = kGwBlock>
__attribute__((always_inline)) inline void gw_block(const float* xr, const float* gr, int64_t W,
                                                    int64_t C, int64_t pw, int64_t ow,
                                                    __m512 (*acc)[K]) {
  __m512 gv[P], xv[P + K - 1];
  for (int p = 0; p < P; ++p) gv[p] = _mm512_loadu_ps(gr + (ow + p) * C);
  load_columns<P + K - 1, INTERIOR, true>(xr, ow - pw, W, C, xv);
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

// The same sums for the P < 8 pixels [ow, ow + P) as one block, one set of sums (each sum takes
// the pixels in column order, as one pixel at a time did: the same bits).
template <int K, int P>
__attribute__((noinline)) void gw_tail(const float* xr, const float* gr, int64_t W, int64_t C,
                                       int64_t pw, int64_t ow, float* part) {
  __m512 acc[1][K];
  for (int kw = 0; kw < K; ++kw) acc[0][kw] = _mm512_loadu_ps(part + kw * 16);
  if (ow - pw >= 0 && ow - pw + P + K - 1 <= W)
    gw_block<K, 1, true, P>(xr, gr, W, C, pw, ow, acc);
  else
    gw_block<K, 1, false, P>(xr, gr, W, C, pw, ow, acc);
  for (int kw = 0; kw < K; ++kw) _mm512_storeu_ps(part + kw * 16, acc[0][kw]);
}

// One grad_output row against one kernel row: full blocks, then the last OW % 8 pixels as one
// block (pixel by pixel, they were load-bound on the narrow rows of late stages).
template <int K>
void gw_row(const float* xr, const float* gr, const Geometry& g, float* part) {
  const int64_t nblk = g.OW / kGwBlock;
  if (nblk > 0) gw_blocks<K>(xr, gr, g.W, g.C, g.pw, nblk, part);
  with_tail<kGwBlock>(g.OW - nblk * kGwBlock, [&](auto p) {
    gw_tail<K, decltype(p)::value>(xr, gr, g.W, g.C, g.pw, nblk * kGwBlock, part);
  });
}

// gw[c][kh][kw] = the sum over chunks, in chunk order, of partial[chunk][c / 16][kh][kw][c % 16].
template <int K>
void reduce_chunks(std::vector<float>& partial, int64_t T, int64_t C, float* gw) {
  const float* sum = add_chunks(partial, T, C * K * K);
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

// 3x3 backward, two output rows at a time. A task is output rows t and t + 1 of one image (one
// row where a chunk or an image ends), walked pixel block by pixel block with all channel
// blocks of a pixel block before the next, so the rows are read in memory order. Per block of
// 8 pixels and 16 channels it computes grad_input rows t and t + 1 (corr3_rows2) and adds the
// grad_weight tap sums and the bias sums of both grad_output rows (gw3_rows2). The two output
// rows share three of the four input rows each needs, so every x and grad_output line comes
// from L2 twice instead of three times, and each loaded vector feeds twice the FMAs: 5.5 (tap
// sums) and 6.0 (grad_input) cycles per output vector with the data in L1, against 7.5 for the
// one-row tap sums. The next task's rows are prefetched in two slices per block, one before
// each half. Measured in one process against the one-row kernels (bench shape, 2 threads, 4
// rotating input sets, alternating order, 40 rounds over 8 minutes): 0.66-0.78 against
// 0.88-1.19 ms while a streaming copy of the same bytes took 0.38-0.45 ms, and 0.86-1.16
// against 0.85-1.14 ms while it took 0.72-0.84 ms (memory-bound). With a single prefetch burst
// per block instead of two slices the two-row kernel lost to the one-row one in the slow phase.
// Its arithmetic is off the critical path: on one thread it takes 1.33-1.44 ms at the bench
// shape against 0.68 ms for the two kernels below with their data in L1, and taking a third of
// the FMAs out made it no faster; without the prefetches one thread takes 5.0 ms (README,
// "depthwise 3x3 channels_last").

// grad_input rows t (o0) and t + 1 (o1, when TWO) at output pixels [ow, ow + P) of one channel
// block: gr[r] is grad_output row t - 1 + r at the channel block (nullptr outside the image),
// iw0 = ow - pw its first column, w the flipped taps. Each grad_output row is loaded once and
// applied to both output rows. Per output vector the FMAs run in corr_block's order (kernel
// rows, then columns, from zero), so the bits are the grad_input op's.
template <int P, bool TWO, bool INTERIOR, bool NT>
__attribute__((noinline)) void corr3_rows2(const float* const* gr, int64_t W, int64_t C,
                                           int64_t iw0, const float* w, float* o0, float* o1) {
  __m512 a0[P], a1[P];
#pragma GCC unroll 8
  for (int p = 0; p < P; ++p) a0[p] = a1[p] = _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int r = 0; r < (TWO ? 4 : 3); ++r) {
    const float* row = gr[r];
    if (row == nullptr) continue;
    __m512 xv[P + 2];
    load_columns<P + 2, INTERIOR>(row, iw0, W, C, xv);
#pragma GCC unroll 3
    for (int kw = 0; kw < 3; ++kw) {
      if (r <= 2) {  // kernel row r of output row t
        const __m512 wv = _mm512_loadu_ps(w + (r * 3 + kw) * C);
#pragma GCC unroll 8
        for (int p = 0; p < P; ++p) a0[p] = _mm512_fmadd_ps(xv[p + kw], wv, a0[p]);
      }
      if (TWO && r >= 1) {  // kernel row r - 1 of output row t + 1
        const __m512 wv = _mm512_loadu_ps(w + ((r - 1) * 3 + kw) * C);
#pragma GCC unroll 8
        for (int p = 0; p < P; ++p) a1[p] = _mm512_fmadd_ps(xv[p + kw], wv, a1[p]);
      }
    }
  }
#pragma GCC unroll 8
  for (int p = 0; p < P; ++p) {
    if (NT)
      _mm512_stream_ps(o0 + p * C, a0[p]);
    else
      _mm512_storeu_ps(o0 + p * C, a0[p]);
    if (TWO) {
      if (NT)
        _mm512_stream_ps(o1 + p * C, a1[p]);
      else
        _mm512_storeu_ps(o1 + p * C, a1[p]);
    }
  }
}

// The grad_weight tap sums part[kh][kw][16] (and the bias sums bp[16] unless nullptr) of
// grad_output rows t (g0) and t + 1 (g1, when TWO) at pixels [ow, ow + P) of one channel block:
// x4[r] is input row t - ph + r at the channel block (nullptr outside the image), ix0 = ow - pw
// the first column read. The nine sums stay in registers for the block, one chain each, in
// sub-blocks of 4 pixels (9 sums + 8 grad_output + 6 input vectors: two sets of sums, which the
// one-row kernel used against the FMA latency, do not fit; each sum's 16 FMAs per block are
// spread over the sub-blocks' other chains). Columns outside the image read as zeros.
template <int P, bool TWO, bool INTERIOR>
__attribute__((noinline)) void gw3_rows2(const float* const* x4, const float* g0,
                                         const float* g1, int64_t W, int64_t C, int64_t ix0,
                                         float* part, float* bp) {
  constexpr int Q = P < 4 ? P : 4;
  __m512 acc[9];
#pragma GCC unroll 9
  for (int i = 0; i < 9; ++i) acc[i] = _mm512_loadu_ps(part + i * 16);
  __m512 sb = bp ? _mm512_loadu_ps(bp) : _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int h = 0; h < P; h += Q) {
    __m512 gv0[Q], gv1[Q];
#pragma GCC unroll 4
    for (int p = 0; p < Q; ++p) {
      gv0[p] = _mm512_loadu_ps(g0 + (h + p) * C);
      gv1[p] = TWO ? _mm512_loadu_ps(g1 + (h + p) * C) : _mm512_setzero_ps();
    }
#pragma GCC unroll 4
    for (int r = 0; r < (TWO ? 4 : 3); ++r) {
      const float* row = x4[r];
      if (row == nullptr) continue;
      __m512 xv[Q + 2];
      load_columns<Q + 2, INTERIOR, true>(row, ix0 + h, W, C, xv);
      if (r <= 2) {  // kernel row r of output row t
#pragma GCC unroll 4
        for (int p = 0; p < Q; ++p)
#pragma GCC unroll 3
          for (int kw = 0; kw < 3; ++kw)
            acc[r * 3 + kw] = _mm512_fmadd_ps(gv0[p], xv[p + kw], acc[r * 3 + kw]);
      }
      if (TWO && r >= 1) {  // kernel row r - 1 of output row t + 1
#pragma GCC unroll 4
        for (int p = 0; p < Q; ++p)
#pragma GCC unroll 3
          for (int kw = 0; kw < 3; ++kw)
            acc[(r - 1) * 3 + kw] = _mm512_fmadd_ps(gv1[p], xv[p + kw], acc[(r - 1) * 3 + kw]);
      }
    }
    if (bp) {
#pragma GCC unroll 4
      for (int p = 0; p < Q; ++p) sb = _mm512_add_ps(sb, gv0[p]);
      if (TWO) {
#pragma GCC unroll 4
        for (int p = 0; p < Q; ++p) sb = _mm512_add_ps(sb, gv1[p]);
      }
    }
  }
#pragma GCC unroll 9
  for (int i = 0; i < 9; ++i) _mm512_storeu_ps(part + i * 16, acc[i]);
  if (bp) _mm512_storeu_ps(bp, sb);
}

// The rows of one task (see above) at the blocks of P pixels that fit in [ow, OW), advancing ow.
// xrows[r]: input row t - ph + r at channel 0; grows[r]: grad_output row t - (K - 1 - ph) + r
// (GI only); go0 / go1: grad_output rows t / t + 1; gi0 / gi1: grad_input rows t / t + 1.
struct Rows3 {
  const float* xrows[4];
  const float* grows[4];
  const float* go0;
  const float* go1;
  float* gi0;
  float* gi1;
};

template <int P, bool TWO, bool GI, bool NT>
inline void rows3_blocks(const Rows3& rw, const Geometry& g, const Geometry& gg,
                         const float* wflip, float* part, float* bp, int64_t& ow,
                         const Trickle& next, int64_t slices) {
  const int64_t C = g.C, ncb = C / 16;
  for (; ow + P <= g.OW; ow += P) {
    const int64_t ix0 = ow - g.pw, iw0 = ow - gg.pw;
    const bool gw_interior = ix0 >= 0 && ix0 + P + 2 <= g.W;
    const bool gi_interior = iw0 >= 0 && iw0 + P + 2 <= gg.W;
    for (int64_t c0 = 0; c0 < C; c0 += 16) {
      const int64_t slice = ow / 8 * ncb + c0 / 16;  // P == 8 only
      if (GI) {
        if (P == 8) next.part(2 * slice, 2 * slices);
        const float* r[4];
        for (int k = 0; k < 4; ++k) r[k] = rw.grows[k] ? rw.grows[k] + c0 : nullptr;
        float* o0 = rw.gi0 + ow * C + c0;
        float* o1 = TWO ? rw.gi1 + ow * C + c0 : nullptr;
        if (gi_interior)
          corr3_rows2<P, TWO, true, NT>(r, gg.W, C, iw0, wflip + c0, o0, o1);
        else
          corr3_rows2<P, TWO, false, NT>(r, gg.W, C, iw0, wflip + c0, o0, o1);
      }
      if (P == 8) {
        if (GI)
          next.part(2 * slice + 1, 2 * slices);
        else
          next.part(slice, slices);
      }
      const float* xr[4];
      for (int k = 0; k < 4; ++k) xr[k] = rw.xrows[k] ? rw.xrows[k] + c0 : nullptr;
      const float* g0 = rw.go0 + ow * C + c0;
      const float* g1 = TWO ? rw.go1 + ow * C + c0 : nullptr;
      float* pt = part + c0 * 9;
      float* bc = bp ? bp + c0 : nullptr;
      if (gw_interior)
        gw3_rows2<P, TWO, true>(xr, g0, g1, g.W, C, ix0, pt, bc);
      else
        gw3_rows2<P, TWO, false>(xr, g0, g1, g.W, C, ix0, pt, bc);
    }
  }
}

// All pixels of one task: blocks of 8, then 4, then the last OW % 4 pixels as one block.
template <bool TWO, bool GI, bool NT>
void rows3(const Rows3& rw, const Geometry& g, const Geometry& gg, const float* wflip,
           float* part, float* bp, const Trickle& next) {
  const int64_t slices = std::max<int64_t>(g.OW / 8, 1) * (g.C / 16);
  int64_t ow = 0;
  rows3_blocks<8, TWO, GI, NT>(rw, g, gg, wflip, part, bp, ow, next, slices);
  rows3_blocks<4, TWO, GI, NT>(rw, g, gg, wflip, part, bp, ow, next, slices);
  with_tail<4>(g.OW - ow, [&](auto p) {
    rows3_blocks<decltype(p)::value, TWO, GI, NT>(rw, g, gg, wflip, part, bp, ow, next, slices);
  });
}

// Fixed number of row chunks for the deterministic grad_weight reduction.
constexpr int64_t kChunks = 32;

// Splits the R output rows into min(kChunks, R) chunks (a fixed split, independent of the thread
// count), runs body(r0, r1, last, part, bp) for each chunk's rows [r0, r1) in parallel (last:
// where the calling thread's rows end; part: the chunk's zeroed [C / 16][K][K][16] tap sums; bp:
// its zeroed bias sums, or nullptr without gb), then adds the chunks in chunk order into gw (and
// gb): the same bits for any number of threads.
template <int K, typename Body>
void chunked_sums(int64_t R, int64_t C, float* gw, float* gb, const Body& body) {
  const int64_t T = std::min<int64_t>(kChunks, R);
  std::vector<float> partial(static_cast<size_t>(T * C * K * K));
  std::vector<float> bias_part(gb ? static_cast<size_t>(T * C) : 0);
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    const int64_t last = end * R / T;
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      float* part = partial.data() + chunk * C * K * K;
      std::fill(part, part + C * K * K, 0.f);
      float* bp = gb ? bias_part.data() + chunk * C : nullptr;
      if (bp) std::fill(bp, bp + C, 0.f);
      body(chunk * R / T, (chunk + 1) * R / T, last, part, bp);
    }
  });
  reduce_chunks<K>(partial, T, C, gw);
  if (gb) {
    const float* sum = add_chunks(bias_part, T, C);
    std::copy(sum, sum + C, gb);
  }
}

// 3x3: the grad_weight (and bias) sums, and with GI grad_input too ('same' padding: OH == H and
// OW == W, so grad_input row t is image row t). The tasks are pairs of rows within a chunk and
// an image; the grad_weight op (GI false) walks the same pairs with the same code, so it gives
// the fused backward's bits.
template <bool GI, bool NT>
void backward3(const float* x, const float* go, const float* wflip, float* gi, float* gw,
               float* gb, int64_t N, const Geometry& g) {
  constexpr int K = 3;
  const int64_t C = g.C;
  const Geometry gg{g.OH, g.OW, C, g.H, g.W, K - 1 - g.ph, K - 1 - g.pw};  // grad_input's
  chunked_sums<K>(N * g.OH, C, gw, gb, [&](int64_t r0, int64_t r1, int64_t last, float* part,
                                           float* bp) {
    for (int64_t t = r0; t < r1;) {
      const int64_t n = t / g.OH, oh = t % g.OH;
      const bool two = t + 1 < r1 && oh + 1 < g.OH;
      const int64_t rows = two ? 2 : 1;
      // the rows the next task (up to two rows) reads that this one does not
      Trickle next;
      const int64_t tn = t + rows;
      if (tn < last) {
        const int64_t m = tn / g.OH, p0 = tn % g.OH, p1 = std::min<int64_t>(p0 + 2, g.OH);
        add_next_rows(next, x, g.H, g.W * C, K, g.ph, n, oh + rows, m, p0, p1);
        if (GI)
          add_next_rows(next, go, g.OH, g.OW * C, K, gg.ph, n, oh + rows, m, p0, p1);
        else
          next.add(go + tn * g.OW * C, (p1 - p0) * g.OW * C);
      }
      Rows3 rw;
      for (int r = 0; r < 4; ++r) {
        rw.xrows[r] = image_row(x, g, n, oh - g.ph + r);
        rw.grows[r] = GI ? image_row(go, gg, n, oh - gg.ph + r) : nullptr;
      }
      rw.go0 = go + t * g.OW * C;
      rw.go1 = two ? rw.go0 + g.OW * C : nullptr;
      rw.gi0 = GI ? gi + t * g.W * C : nullptr;
      rw.gi1 = GI && two ? rw.gi0 + g.W * C : nullptr;
      if (two)
        rows3<true, GI, NT>(rw, g, gg, wflip, part, bp, next);
      else
        rows3<false, GI, NT>(rw, g, gg, wflip, part, bp, next);
      t += rows;
    }
    if (NT) nt_fence();
  });
}

template <int K>
void grad_weight_rows(const float* x, const float* go, float* gw, int64_t N, const Geometry& g) {
  if constexpr (K == 3) {
    backward3<false, false>(x, go, nullptr, nullptr, gw, nullptr, N, g);
  } else {
    const int64_t C = g.C, R = N * g.OH;
    chunked_sums<K>(R, C, gw, nullptr, [&](int64_t r0, int64_t r1, int64_t last, float* part,
                                           float*) {
      for (int64_t t = r0; t < r1; ++t) {
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
        for (int64_t c0 = 0; c0 < C; c0 += 16) {
          next.part(c0 / 16, C / 16);
          const float* xr[K];
          for (int kh = 0; kh < K; ++kh) xr[kh] = xrows[kh] ? xrows[kh] + c0 : nullptr;
          gw_rows<K>(xr, go + t * g.OW * C + c0, g, part + c0 * K * K);
        }
      }
    });
  }
}

// Fused backward for 'same' padding (OH == H, OW == W, so grad_input row t and grad_output row t
// are the same (n, row)): one pass over the rows computes, per row t and channel block, the
// grad_weight tap sums of grad_output row t against input rows r - p .. r + p, the bias sum of
// grad_output row t, and grad_input row t (grad_output rows r - p .. r + p correlated with the
// flipped kernel). The rows both need stay in L1/L2 between the two, so DRAM sees x and
// grad_output once each instead of grad_output twice. Chunks and summation order are those of
// grad_weight_rows, and grad_input rows are computed by the same code as the correlation's rows:
// the results are bit-identical to the two separate kernels. 3x3 takes backward3.
template <int K, bool NT>
void backward_rows(const float* x, const float* go, const float* wflip, float* gi, float* gw,
                   float* gb, int64_t N, const Geometry& g) {
  if constexpr (K == 3) {
    backward3<true, NT>(x, go, wflip, gi, gw, gb, N, g);
  } else {
    const int64_t C = g.C;
    const Geometry gg{g.OH, g.OW, C, g.H, g.W, K - 1 - g.ph, K - 1 - g.pw};  // grad_input's
    chunked_sums<K>(N * g.OH, C, gw, gb, [&](int64_t r0, int64_t r1, int64_t last, float* part,
                                             float* bp) {
      const float* grows[K];
      for (int64_t t = r0; t < r1; ++t) {
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
        for (int64_t c0 = 0; c0 < C; c0 += 16) {
          const float* xr[K];
          for (int kh = 0; kh < K; ++kh) xr[kh] = xrows[kh] ? xrows[kh] + c0 : nullptr;
          gw_rows<K>(xr, grow + c0, g, part + c0 * K * K);
          if (bp) bias_sums(bp, grow, C, c0, 0, g.OW);
          corr_row_block<K, NT>(grows, gg, wflip, nullptr, gi + t * g.W * C, next, c0);
        }
      }
      if (NT) nt_fence();
    });
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
