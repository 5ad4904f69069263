// conv2d on channels_last tensors without NCHW copies (float32 / float64, the own AVX-512 GEMM),
// one group. In channels_last an image is a (pixels x channels) matrix, so a convolution is a
// sum over its taps of products of such matrices with the weight's (kH, kW) slices:
//
//   forward      out[n, y, x, :] = sum_(i,j) x[n, y*sH + i*dH - pH, x*sW + j*dW - pW, :] @ W_ij^T
//   grad_input   gi[n, y, x, :]  = sum_(i,j) go[n, (y + pH - i*dH) / sH, ..., :] @ W_ij
//                                  (the taps where the division is exact and in range)
//   grad_weight  W_ij's gradient = sum_p go[p, :]^T x[n, y*sH + i*dH - pH, ..., :]
// with W_ij = W[:, :, i, j], an (O x C) matrix.
//
// Forward and grad_input are one kernel (gather_conv): an implicit im2col. The GEMM's A panel
// is MR destination pixels, and for each tap its rows are MR pointers into the source image
// (a zero row where the tap falls in the padding), read in place by the micro-kernel; B is the
// weight slice of that tap, (channels x N) row-major. Nothing is copied but the weight. A
// task owns a block of destination pixels, so each output element is summed by one thread in
// tap order: the same bits for any thread count. With a stride, grad_input visits a row's
// pixels phase by phase (x = 0, sW, 2 sW, ..., then 1, 1 + sW, ...), so a panel's pixels
// share their taps and a panel skips the taps that reach none of them.
//
// grad_weight: per tap, the product go^T (O x P) @ x_tap (P x C). go is read in place as the
// A operand (MR output channels per pixel, MR contiguous values), the tap's gathered input
// rows as B (one pointer per pixel). The threads split (tap, column panel, output channel
// range) units; each element is summed over all pixels in one order whatever the split.
//
// A 1x1 stride-1 convolution is the one-tap case: a plain product of the (pixels x channels)
// matrices. The micro-kernel's tile is 8 x 3 vectors or 6 x 4 vectors, whichever pads the
// GEMM's N (a channel count) less: 64 float32 channels fit the second exactly.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/conv2d.h"
#include "cpu/conv2d_gemm.h"
#include "cpu/memory_hints.h"

namespace fastconv {
namespace conv2d_cpu {
namespace {

int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Fetch p's line in a writable state (PREFETCHW). An asm statement: GCC treats
// __builtin_prefetch as free of side effects, so a helper whose only work is prefetching is
// deemed pure and its calls deleted.
inline void prefetch_for_write(const void* p) {
#if defined(__PRFCHW__)
  __asm__ volatile("prefetchw %0" : : "m"(*static_cast<const char*>(p)));
#else
  __asm__ volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#endif
}

// The weight [O][C][taps] rearranged tap by tap: [taps][C][O] (out_inner, the forward's B) or
// [taps][O][C] (grad_input's B). A parallel loop writing whole rows: ATen's copy of the
// permuted view walks it element by element on one thread (a fifth of a 512-channel layer's
// forward).
template <typename T>
at::Tensor weight_by_tap(const at::Tensor& weight, bool out_inner) {
  const int64_t O = weight.size(0), C = weight.size(1), taps = weight.size(2) * weight.size(3);
  const at::Tensor w = weight.contiguous();
  at::Tensor b = at::empty({taps, out_inner ? C : O, out_inner ? O : C}, w.options());
  const T* src = w.const_data_ptr<T>();
  T* dst = b.mutable_data_ptr<T>();
  // about 64 Ki elements per task: a c-block moves 16 * O * taps, an o row C * taps
  constexpr int64_t kPerTask = int64_t{1} << 16;
  if (out_inner) {
    // blocks of 16 output x 16 input channels: the block's source rows and the 16 * taps
    // destination lines it fills stay in L1 (a plain walk re-reads each source line per c)
    constexpr int64_t kB = 16;
    const int64_t blocks = div_up(C, kB);
    const int64_t grain = std::max<int64_t>(1, kPerTask / (kB * O * taps));
    at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t c0 = b0 * kB; c0 < std::min(C, b1 * kB); c0 += kB) {
        const int64_t c1 = std::min(C, c0 + kB);
        for (int64_t o0 = 0; o0 < O; o0 += kB) {
          const int64_t ob = std::min(kB, O - o0), ld = C * taps;
          for (int64_t c = c0; c < c1; ++c) {
            for (int64_t t = 0; t < taps; ++t) {
              T* d = dst + (t * C + c) * O + o0;
              const T* from = src + (o0 * C + c) * taps + t;
              for (int64_t o = 0; o < ob; ++o) d[o] = from[o * ld];
            }
          }
        }
      }
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, kPerTask / (C * taps));
    at::parallel_for(0, O, grain, [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o)
        for (int64_t c = 0; c < C; ++c)
          for (int64_t t = 0; t < taps; ++t) dst[(t * O + o) * C + c] = src[(o * C + c) * taps + t];
    });
  }
  return b;
}

// weight_by_tap's inverse: gw [O][C][taps] from R laid out tap by tap, [taps][C][O]
// (out_inner) or [taps][O][C]; whole rows of gw per task.
template <typename T>
void weight_from_taps(const T* R, bool out_inner, at::Tensor& gw) {
  const int64_t O = gw.size(0), C = gw.size(1), taps = gw.size(2) * gw.size(3);
  T* g = gw.mutable_data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (C * taps));
  at::parallel_for(0, O, grain, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t t = 0; t < taps; ++t) {
          g[(o * C + c) * taps + t] = out_inner ? R[(t * C + c) * O + o] : R[(t * O + o) * C + c];
        }
      }
    }
  });
}

#ifdef FASTCONV_HAVE_AVX512_GEMM

// dst[n, y, x, 0:N] = sum over the taps (i, j) whose source pixel exists of
// src[n, sy, sx, 0:K] @ B[(i * kw + j) * K : +K, 0:N] (+ bias[0:N]).
template <typename T>
struct Gather {
  const T* src = nullptr;
  int64_t SH = 0, SW = 0, K = 0;
  T* dst = nullptr;
  int64_t DH = 0, DW = 0, N = 0;
  const T* B = nullptr;
  const T* bias = nullptr;
  int64_t batch = 0, kh = 0, kw = 0;
  std::vector<int64_t> ymap;    // [y * kh + i]: the source row of destination row y's tap i, or -1
  std::vector<int64_t> xmap;    // [x * kw + j]: likewise for columns
  std::vector<int64_t> xorder;  // the destination columns of a row, in the order they are visited
  bool dense_taps = true;       // most taps of most pixels exist (not a strided grad_input)
  bool stream = false;          // one pass writes dst: streaming stores (set by gather_conv)
};

// The fewest columns (channels) a GEMM here takes: below 16 most of the micro-kernel's 32-64
// columns would be padding (nhwc_applies; grad_weight then takes its transposed product).
constexpr int64_t kMinColumns = 16;

// Channel counts (the reduction's slice per tap) up to which gather_task copies a panel's taps
// side by side. 64: 3x3 32->64 112x112 forward 10.3-10.4 ms against 11.0-11.5 tap by tap.
constexpr int64_t kPackedTapsMax = 64;
// The bytes of grad_input_cols's product built per pass (whole images, at least one). 1 and
// 4 MiB time the same on stems (3x3 3->64 224x224 N=8: 9.4 ms), 16 MiB 10.9, all at once 22.7.
constexpr int64_t kColsBytes = int64_t{4} << 20;
// Panels ahead whose source rows gather_task prefetches. Inputs not in cache (rotating input
// sets, 2 threads): 1x1 144->24 56x56 forward 1.34-1.40 -> 0.69-0.89 ms, 64->256 2.73-2.77 ->
// 2.30-2.47 ms.
constexpr int64_t kPrefetchPanels = 2;

// The micro-kernel tile for a GEMM of n columns (a channel count): the one that pads n least
// among 8 x 3, 6 x 4 and 8 x 2 vectors (48, 64 and 32 float32 columns; the first two do 24
// multiply-adds per 8 or 6 broadcasts, the last 16 per 8), preferring them in that order.
// 64 columns fit 6 x 4 exactly where 8 x 3 wastes a third, 24 take 8 x 2 at 75 % against 50 %;
// up to one vector (16 float32), 8 x 1.
enum class Tile { k8x3, k6x4, k8x2, k8x1 };
template <typename T>
Tile pick_tile(int64_t n) {
  // Up to one vector: 8 x 1 (8 multiply-adds per 8 broadcasts and a load) in place of an
  // 8 x 2 half padding. Alternating processes, 32x32 N=128: 1x1 32->16 forward 1.03 -> 0.85
  // ms, 16->64 grad_input 1.6 -> 1.3; 3x3 16->16 56x56 N=8 forward 0.71 -> 0.48.
  if (n <= gemm::nr<T, 1>()) return Tile::k8x1;
  const int64_t w[3] = {gemm::nr<T, 3>(), gemm::nr<T, 4>(), gemm::nr<T, 2>()};
  int best = 0;
  for (int t = 1; t < 3; ++t) {
    if (div_up(n, w[t]) * w[t] < div_up(n, w[best]) * w[best]) best = t;
  }
  return static_cast<Tile>(best);
}

// The cells a rows x cols product computes in pick_tile(cols)'s tiles, padding included, an
// 8 x 1 tile counted as an 8 x 2: it costs about 0.8 of one (1x1 32->16 forward 0.85 ms in
// 8 x 1 tiles, 1.03 in half-empty 8 x 2 ones; grad_weight 1x1 16->64 N=120 2.37 ms in 8 x 1
// tiles, 1.6-1.7 transposed in 6 x 4 ones, 13 % more cells).
template <typename T>
int64_t tile_area(int64_t rows, int64_t cols) {
  const Tile t = pick_tile<T>(cols);
  const int64_t mr = t == Tile::k6x4 ? 6 : 8;
  const int64_t w = t == Tile::k8x3 ? gemm::nr<T, 3>() : t == Tile::k6x4 ? gemm::nr<T, 4>()
                                                                          : gemm::nr<T, 2>();
  return div_up(rows, mr) * mr * div_up(cols, w) * w;
}

// dst[0:len] = src[0:len] (or zeros, src null) for the short rows of a packed panel, in whole
// vectors: the source's tail read masked (never past its end), dst written up to len rounded
// up to a vector (the caller's rows have that slack; a later copy overwrites it). memmove's
// call and dispatch, or masked stores (whose lines the micro-kernel then reads), cost more.
template <typename T>
void copy_short(T* dst, const T* src, int64_t len) {
  using S = gemm::Simd<T>;
  constexpr int64_t L = S::kLanes;
  int64_t e = 0;
  for (; e + L <= len; e += L) S::store(dst + e, src != nullptr ? S::load(src + e) : S::zero());
  if (e < len) {
    const auto m = gemm::lane_mask<T>(0, len - e);
    S::store(dst + e, src != nullptr ? S::load(src + e, m) : S::zero());
  }
}

// row[0 : taps * K] = the source rows of destination pixel (n, y, x) for every tap, side by
// side, zero in the padding: one row of an im2col. row needs copy_short's slack after it.
template <typename T>
__attribute__((always_inline)) inline void im2col_row(const Gather<T>& g, int64_t n, int64_t y,
                                                      int64_t x, T* row) {
  const int64_t* xm = g.xmap.data() + x * g.kw;
  // the row's taps read adjacent pixels (stride-1 taps, all inside): one copy
  const bool span = xm[0] >= 0 && xm[g.kw - 1] == xm[0] + g.kw - 1;
  for (int64_t i = 0; i < g.kh; ++i) {
    T* dst = row + i * g.kw * g.K;
    const int64_t sy = g.ymap[y * g.kh + i];
    const T* src = sy < 0 ? nullptr : g.src + (n * g.SH + sy) * g.SW * g.K;
    if (src == nullptr) {
      copy_short<T>(dst, nullptr, g.kw * g.K);
    } else if (span) {
      copy_short(dst, src + xm[0] * g.K, g.kw * g.K);
    } else {
      for (int64_t j = 0; j < g.kw; ++j, dst += g.K) {
        copy_short(dst, xm[j] < 0 ? nullptr : src + xm[j] * g.K, g.K);
      }
    }
  }
}

// Destination pixels [m0, m1) in visiting order (n, y, xorder[i]), in panels of MR, the
// micro-kernel's tile MR x NV vectors.
template <typename T, int MR, int NV>
void gather_task(const Gather<T>& g, int64_t m0, int64_t m1) {
  using gemm::kKC;
  constexpr int64_t NR = gemm::nr<T, NV>();
  constexpr int64_t NC = 10 * NR;
  const int64_t rows = m1 - m0, np = div_up(rows, MR);
  std::vector<int64_t> pn(rows), py(rows), px(rows);
  std::vector<T*> crow(np * MR, nullptr);
  {
    // (n, y, column index) of pixel m0, then counted up: a division per pixel costs as much
    // as a small reduction's multiply-adds
    int64_t n = m0 / (g.DH * g.DW), y = m0 % (g.DH * g.DW) / g.DW, i = m0 % g.DW;
    for (int64_t m = 0; m < rows; ++m) {
      const int64_t x = g.xorder[i];
      pn[m] = n, py[m] = y, px[m] = x;
      crow[m] = g.dst + ((n * g.DH + y) * g.DW + x) * g.N;
      if (++i == g.DW) {
        i = 0;
        if (++y == g.DH) y = 0, ++n;
      }
    }
  }
  std::vector<char> started(np);
  alignas(64) T zeros[kKC] = {};
  alignas(64) T edge[kKC * NR];
  // Few channels (a stem's 3): a tap's slice of the reduction would be a few multiply-adds per
  // micro-kernel call. Then a panel's rows for all taps are copied side by side ([MR][taps *
  // K], zero in the padding: an im2col of MR pixels, in L1) and reduced in one pass, B being
  // the whole tap-major weight. Not for a strided grad_input, whose panels skip most taps.
  const bool packed = g.K <= kPackedTapsMax && g.kh * g.kw > 1 && g.dense_taps;
  const int64_t Kt = g.kh * g.kw * g.K;
  constexpr int64_t L = gemm::Simd<T>::kLanes;
  const int64_t ldp = div_up(Kt, L) * L + L;  // copy_short's slack
  std::vector<T> panel(packed ? MR * ldp : 0);
  std::vector<T> edges(packed && g.N % NR != 0 ? Kt * NR : 0);
  // The destination rows a later panel writes first, prefetched for writing: their lines come
  // from memory, and stores that miss fill the store buffer and stall the micro-kernel.
  auto prefetch_dst = [&](int64_t p2, int64_t n0, int64_t ncols) {
    if (p2 >= np) return;
    const int mr2 = static_cast<int>(std::min<int64_t>(MR, rows - p2 * MR));
    for (int r = 0; r < mr2; ++r) {
      const T* c = crow[p2 * MR + r] + n0;
      for (int64_t e = 0; e < ncols; e += 64 / int64_t(sizeof(T))) prefetch_for_write(c + e);
    }
  };
  for (int64_t n0 = 0; n0 < g.N; n0 += NC) {
    const int64_t ncols = std::min(NC, g.N - n0);
    const int64_t full = ncols / NR, tail = ncols % NR;
    // columns [n0, n0 + ncols) of the rows cr (+)= the A panel @ B's rows b (g.N apart, from
    // column n0), the partial last NR columns from tail_b (NR apart)
    auto multiply = [&](int64_t kc, const gemm::PtrA<T, MR>& a, const T* b, const T* tail_b,
                        T* const* cr, int mr, bool acc) {
      auto run = [&](auto c) {  // c: the C accessor type, PtrC or StreamPtrC
        auto at = [&](int64_t off) { c.rows = cr, c.off = off; return c; };
        for (int64_t q = 0; q < full; ++q) {
          gemm::micro_kernel<T, MR, NV>(kc, a, gemm::RowsB<T>{b + q * NR, g.N}, at(n0 + q * NR),
                                        mr, NR, acc, nullptr);
        }
        if (tail != 0) {
          gemm::micro_kernel<T, MR, NV>(kc, a, gemm::RowsB<T>{tail_b, NR}, at(n0 + full * NR),
                                        mr, static_cast<int>(tail), acc, nullptr);
        }
      };
      if (g.stream) {
        run(gemm::StreamPtrC<T>{});
      } else {
        run(gemm::PtrC<T>{});
      }
    };
    std::fill(started.begin(), started.end(), 0);
    if (packed) {
      if (tail != 0) gemm::edge_panel<T, NR>(gemm::RowsB<T>{g.B + n0 + full * NR, g.N}, Kt, tail,
                                             edges.data());
      const int64_t Kr = g.kw * g.K;  // one tap row's share of the reduction
      for (int64_t p = 0; p < np; ++p) {
        const int mr = static_cast<int>(std::min<int64_t>(MR, rows - p * MR));
        // MR adjacent pixels of one row whose taps all lie inside the row, undilated: each tap
        // row's kw * K values of a pixel are adjacent in x, so A reads them in place, one
        // product per tap row, instead of copying them side by side. Alternating processes,
        // float32 N=8 224x224: 3x3 s2 3->32 forward 2.41-2.73 -> 1.29-1.55 ms, 3x3 3->32 32x32
        // N=128 1.64-2.25 -> 1.31-1.42, 3x3 32->64 112x112 9.6-9.7 -> 8.6-8.8, 3x3 64->64 56x56
        // 4.7-5.3 -> 4.2-4.9; 7x7 s2 3->64 and 4x4 s4 3->96 within the noise.
        if (mr == MR) {
          const int64_t a0 = p * MR, a1 = a0 + MR - 1;
          const int64_t* xf = g.xmap.data() + px[a0] * g.kw;
          const int64_t* xl = g.xmap.data() + px[a1] * g.kw;
          if (pn[a0] == pn[a1] && py[a0] == py[a1] && px[a1] - px[a0] == MR - 1 && xf[0] >= 0 &&
              xl[g.kw - 1] >= 0 && xf[g.kw - 1] == xf[0] + g.kw - 1) {
            prefetch_dst(p + kPrefetchPanels, n0, ncols);
            if (p + kPrefetchPanels < np) {
              // a later panel's input spans, one per tap row, as the tap-by-tap path prefetches
              // its rows (the copies had many loads in flight; the micro-kernel's broadcasts
              // wait on each miss): 3x3 s2 64->128 56x56 forward 2.49-2.52 -> 2.25-2.39 ms
              // (copying: 2.35-2.59), 3x3 s2 3->32 224x224 1.30-1.85 -> 1.14-1.23
              const int64_t b0 = (p + kPrefetchPanels) * MR;
              const int64_t b1 = std::min(rows, b0 + MR) - 1;
              if (pn[b0] == pn[b1] && py[b0] == py[b1]) {
                const int64_t* yf = g.ymap.data() + py[b0] * g.kh;
                const int64_t lo = std::max<int64_t>(0, g.xmap[px[b0] * g.kw]);
                int64_t hi = -1;
                for (int64_t j = 0; j < g.kw; ++j) hi = std::max(hi, g.xmap[px[b1] * g.kw + j]);
                for (int64_t i = 0; i < g.kh && hi >= lo; ++i) {
                  if (yf[i] < 0) continue;
                  const T* row = g.src + ((pn[b0] * g.SH + yf[i]) * g.SW) * g.K;
                  for (int64_t e = lo * g.K; e < (hi + 1) * g.K; e += 64 / int64_t(sizeof(T))) {
                    __builtin_prefetch(row + e);
                  }
                }
              }
            }
            T* const* cr = crow.data() + p * MR;
            bool acc = false;
            for (int64_t i = 0; i < g.kh; ++i) {
              const int64_t sy = g.ymap[py[a0] * g.kh + i];
              if (sy < 0) continue;
              const T* base = g.src + (pn[a0] * g.SH + sy) * g.SW * g.K;
              gemm::PtrA<T, MR> a;
              for (int r = 0; r < MR; ++r) a.p[r] = base + g.xmap[(px[a0] + r) * g.kw] * g.K;
              for (int64_t k0 = 0; k0 < Kr; k0 += kKC) {
                const int64_t kc = std::min(kKC, Kr - k0);
                gemm::PtrA<T, MR> ak = a;
                for (int r = 0; r < MR; ++r) ak.p[r] += k0;
                const T* tail_b = tail != 0 ? edges.data() + (i * Kr + k0) * NR : nullptr;
                multiply(kc, ak, g.B + (i * Kr + k0) * g.N + n0, tail_b, cr, mr, acc);
                acc = true;
              }
            }
            started[p] = acc;
            continue;
          }
        }
        gemm::PtrA<T, MR> a;
        for (int r = 0; r < MR; ++r) {
          T* row = panel.data() + r * ldp;
          a.p[r] = row;
          if (r >= mr) {
            copy_short<T>(row, nullptr, Kt);
            continue;
          }
          const int64_t at = p * MR + r;
          im2col_row(g, pn[at], py[at], px[at], row);
        }
        started[p] = 1;
        prefetch_dst(p + kPrefetchPanels, n0, ncols);
        T* const* cr = crow.data() + p * MR;
        for (int64_t k0 = 0; k0 < Kt; k0 += kKC) {
          const int64_t kc = std::min(kKC, Kt - k0);
          gemm::PtrA<T, MR> ak = a;
          for (int r = 0; r < MR; ++r) ak.p[r] += k0;
          const T* tail_b = tail != 0 ? edges.data() + k0 * NR : nullptr;
          multiply(kc, ak, g.B + k0 * g.N + n0, tail_b, cr, mr, k0 > 0);
        }
      }
    }
    for (int64_t i = 0; i < g.kh && !packed; ++i) {  // tap by tap
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t tap = i * g.kw + j;
        for (int64_t k0 = 0; k0 < g.K; k0 += kKC) {
          const int64_t kc = std::min(kKC, g.K - k0);
          const T* bk = g.B + (tap * g.K + k0) * g.N + n0;
          const T* tail_b = nullptr;
          if (tail != 0) {
            tail_b = gemm::edge_panel<T, NR>(gemm::RowsB<T>{bk + full * NR, g.N}, kc, tail, edge);
          }
          // the source row of row `at` for this tap, or null in the padding
          auto source = [&](int64_t at) -> const T* {
            const int64_t sy = g.ymap[py[at] * g.kh + i], sx = g.xmap[px[at] * g.kw + j];
            if (sy < 0 || sx < 0) return nullptr;
            return g.src + ((pn[at] * g.SH + sy) * g.SW + sx) * g.K + k0;
          };
          for (int64_t p = 0; p < np; ++p) {
            const int mr = static_cast<int>(std::min<int64_t>(MR, rows - p * MR));
            gemm::PtrA<T, MR> a;
            bool any = false;
            for (int r = 0; r < MR; ++r) {
              const T* src = r < mr ? source(p * MR + r) : nullptr;
              a.p[r] = src != nullptr ? src : zeros;
              any = any || src != nullptr;
            }
            if (p + kPrefetchPanels < np) {
              // the rows a later panel reads: the hardware prefetchers do not run ahead of
              // MR interleaved row streams
              const int64_t p2 = p + kPrefetchPanels;
              const int mr2 = static_cast<int>(std::min<int64_t>(MR, rows - p2 * MR));
              for (int r = 0; r < mr2; ++r) {
                const T* src = source(p2 * MR + r);
                if (src == nullptr) continue;
                for (int64_t e = 0; e < kc; e += 64 / int64_t(sizeof(T))) {
                  __builtin_prefetch(src + e);
                }
              }
            }
            if (tap == 0 && k0 == 0 && !g.stream) prefetch_dst(p + kPrefetchPanels, n0, ncols);
            if (!any) continue;
            multiply(kc, a, bk, tail_b, crow.data() + p * MR, mr, started[p] != 0);
            started[p] = 1;
          }
        }
      }
    }
    // pixels no tap reaches (grad_input with a stride larger than the kernel) are zero
    for (int64_t at = 0; at < rows; ++at) {
      T* c = crow[at] + n0;
      if (started[at / MR] == 0) std::fill(c, c + ncols, T(0));
      if (g.bias != nullptr) {
        for (int64_t n = 0; n < ncols; ++n) c[n] += g.bias[n0 + n];
      }
    }
  }
  if (g.stream) _mm_sfence();
}

// Tasks of whole panels whose output block (rows x min(N, nc) values, ~256 KiB) stays in L2
// while every tap's weight slice streams past it; at least one task per thread.
template <typename T, int MR, int NV>
void gather_conv_tiled(const Gather<T>& g) {
  const int64_t M = g.batch * g.DH * g.DW;
  const int64_t panels = div_up(M, MR);
  const int64_t block_cols = std::min<int64_t>(g.N, 10 * gemm::nr<T, NV>());
  const int64_t rows = std::clamp<int64_t>((int64_t{256} << 10) / int64_t(sizeof(T)) / block_cols,
                                           64, 1024);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t tasks = std::max(div_up(M, rows), threads);
  tasks = std::min(panels, div_up(tasks, threads) * threads);
  const int64_t per = div_up(panels, tasks);
  tasks = div_up(panels, per);
  const int64_t work = per * MR * g.N * g.K * g.kh * g.kw;
  at::parallel_for(0, tasks, parallel_grain(work), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      gather_task<T, MR, NV>(g, t * per * MR, std::min(M, (t + 1) * per * MR));
    }
  });
}

template <typename T>
void gather_conv(Gather<T>& g) {
  // One tap and one block of the reduction, no bias pass: each tile of dst is written once, by
  // one micro-kernel call, so a large dst takes streaming stores (whole 64-byte lines: rows of
  // N values a multiple of 64 bytes apart).
  g.stream = g.kh * g.kw == 1 && g.K <= gemm::kKC && g.bias == nullptr &&
             g.N * int64_t(sizeof(T)) % 64 == 0 &&
             stream_output(g.dst, g.batch * g.DH * g.DW * g.N * int64_t(sizeof(T)));
  switch (pick_tile<T>(g.N)) {
    case Tile::k8x3: return gather_conv_tiled<T, 8, 3>(g);
    case Tile::k6x4: return gather_conv_tiled<T, 6, 4>(g);
    case Tile::k8x2: return gather_conv_tiled<T, 8, 2>(g);
    case Tile::k8x1: return gather_conv_tiled<T, 8, 1>(g);
  }
}

// Gather's ymap / xmap along one axis: [y * taps + i] = the source index of destination y's
// tap i, or -1. Forward: input y * stride + i * dil - pad. Backward (grad_input, y an input
// index): output (y + pad - i * dil) / stride where that is exact.
std::vector<int64_t> tap_map(bool backward, int64_t dst, int64_t taps, int64_t src,
                             int64_t stride, int64_t dil, int64_t pad) {
  std::vector<int64_t> m(dst * taps);
  for (int64_t y = 0; y < dst; ++y) {
    for (int64_t i = 0; i < taps; ++i) {
      int64_t v = y * stride + i * dil - pad;
      if (backward) {
        const int64_t num = y + pad - i * dil;
        v = (num >= 0 && num % stride == 0) ? num / stride : -1;
      }
      m[y * taps + i] = (v >= 0 && v < src) ? v : -1;
    }
  }
  return m;
}

// The forward's geometry: destination = output pixels, source = x's rows.
template <typename T>
Gather<T> forward_geometry(const at::Tensor& x, const Conv2dShape& s) {
  Gather<T> g;
  g.src = x.const_data_ptr<T>(), g.SH = s.in_h, g.SW = s.in_w, g.K = s.in_channels;
  g.DH = s.out_h, g.DW = s.out_w;
  g.batch = s.batch, g.kh = s.kernel_h, g.kw = s.kernel_w;
  g.ymap = tap_map(false, s.out_h, s.kernel_h, s.in_h, s.stride_h, s.dil_h, s.pad_h);
  g.xmap = tap_map(false, s.out_w, s.kernel_w, s.in_w, s.stride_w, s.dil_w, s.pad_w);
  g.xorder.resize(s.out_w);
  for (int64_t x0 = 0; x0 < s.out_w; ++x0) g.xorder[x0] = x0;
  return g;
}

template <typename T>
void forward_gather(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                    at::Tensor& out, const Conv2dShape& s) {
  const at::Tensor B = weight_by_tap<T>(weight, true);  // [kh * kw][C][O]
  Gather<T> g = forward_geometry<T>(x, s);
  g.dst = out.mutable_data_ptr<T>(), g.N = s.out_channels;
  g.B = B.const_data_ptr<T>();
  g.bias = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  gather_conv(g);
}

template <typename T>
void grad_input_gather(const at::Tensor& go, const at::Tensor& weight, at::Tensor& gi,
                       const Conv2dShape& s) {
  const at::Tensor B = weight_by_tap<T>(weight, false);  // [kh * kw][O][C]
  Gather<T> g;
  g.src = go.const_data_ptr<T>(), g.SH = s.out_h, g.SW = s.out_w, g.K = s.out_channels;
  g.dst = gi.mutable_data_ptr<T>(), g.DH = s.in_h, g.DW = s.in_w, g.N = s.in_channels;
  g.B = B.const_data_ptr<T>();
  g.batch = s.batch, g.kh = s.kernel_h, g.kw = s.kernel_w;
  g.ymap = tap_map(true, s.in_h, s.kernel_h, s.out_h, s.stride_h, s.dil_h, s.pad_h);
  g.xmap = tap_map(true, s.in_w, s.kernel_w, s.out_w, s.stride_w, s.dil_w, s.pad_w);
  g.dense_taps = s.stride_h == 1 && s.stride_w == 1;
  for (int64_t phase = 0; phase < s.stride_w; ++phase) {
    for (int64_t x0 = phase; x0 < s.in_w; x0 += s.stride_w) g.xorder.push_back(x0);
  }
  gather_conv(g);
}

// col2im as a gather, for rows [r0, r1) of nb images: gi[n, y, x, c] = the sum over the taps
// (i, j) that reach (y, x) of cols[n, oy, ox, (i * kw + j) * C + c], in that order, in
// registers (C < kMinColumns; CC > 0: C known at compile time).
template <typename T, int CC>
void col2im_rows(const T* cols, T* gi, int64_t r0, int64_t r1, int64_t C_,
                 const Conv2dShape& s, const std::vector<int64_t>& ymap,
                 const std::vector<int64_t>& xmap) {
  const int64_t C = CC > 0 ? CC : C_, kh = s.kernel_h, kw = s.kernel_w;
  const int64_t KC = C * kh * kw;
  std::vector<const T*> rows(kh);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / s.in_h, y = r % s.in_h;
    int64_t nr = 0;  // the taps' rows of cols that reach row y (tap i's columns)
    for (int64_t i = 0; i < kh; ++i) {
      const int64_t oy = ymap[y * kh + i];
      if (oy >= 0) rows[nr++] = cols + (n * s.out_h + oy) * s.out_w * KC + i * kw * C;
    }
    T* dst = gi + r * s.in_w * C;
    for (int64_t x = 0; x < s.in_w; ++x) {
      T acc[CC > 0 ? CC : kMinColumns] = {};
      const int64_t* xm = xmap.data() + x * kw;
      for (int64_t v = 0; v < nr; ++v) {
        for (int64_t j = 0; j < kw; ++j) {
          if (xm[j] < 0) continue;
          const T* src = rows[v] + xm[j] * KC + j * C;
          for (int64_t c = 0; c < C; ++c) acc[c] += src[c];
        }
      }
      for (int64_t c = 0; c < C; ++c) dst[x * C + c] = acc[c];
    }
  }
}

// grad_input with fewer than kMinColumns input channels (a stem's 3): the gathered GEMM's C
// columns would be mostly padding, so it takes the other order. cols = go (P x O) times the
// weight as O x (taps * C) -- a 1x1 forward over go -- then each input pixel sums its taps'
// entries of cols (col2im_rows). cols is built for a few images at a time, so it stays in
// cache. Alternating processes, float32 N=8 224x224, NCHW copies -> this (torch): 3x3 3->64
// 76-216 -> 8.4-8.9 ms (18-22), 7x7 s2 3->64 12.9-21.6 -> 8.7-10.0 (25-28).
template <typename T>
void grad_input_cols(const at::Tensor& go, const at::Tensor& weight, at::Tensor& gi,
                     const Conv2dShape& s) {
  const int64_t C = s.in_channels, taps = s.kernel_h * s.kernel_w;
  const int64_t KC = C * taps, plane = s.out_h * s.out_w;
  const at::Tensor w = weight.permute({0, 2, 3, 1}).contiguous();  // B: [O][kh][kw][C]
  const int64_t per = std::clamp<int64_t>(
      kColsBytes / std::max<int64_t>(1, plane * KC * int64_t(sizeof(T))), 1, s.batch);
  at::Tensor cols_t = at::empty({per * plane * KC}, w.options());
  T* cols = cols_t.mutable_data_ptr<T>();
  const T* gop = go.const_data_ptr<T>();
  T* gip = gi.mutable_data_ptr<T>();
  const std::vector<int64_t> ymap = tap_map(true, s.in_h, s.kernel_h, s.out_h, s.stride_h,
                                            s.dil_h, s.pad_h);
  const std::vector<int64_t> xmap = tap_map(true, s.in_w, s.kernel_w, s.out_w, s.stride_w,
                                            s.dil_w, s.pad_w);
  // the product: a 1x1 forward over go with KC output channels, per block of images
  Conv2dShape s1 = s;
  s1.in_channels = s.out_channels, s1.in_h = s.out_h, s1.in_w = s.out_w, s1.out_channels = KC;
  s1.kernel_h = s1.kernel_w = s1.stride_h = s1.stride_w = s1.dil_h = s1.dil_w = 1;
  s1.pad_h = s1.pad_w = 0;
  Gather<T> g = forward_geometry<T>(go, s1);
  g.dst = cols, g.N = KC, g.B = w.const_data_ptr<T>();
  for (int64_t n0 = 0; n0 < s.batch; n0 += per) {
    const int64_t nb = std::min(per, s.batch - n0);
    g.src = gop + n0 * plane * s.out_channels, g.batch = nb;
    gather_conv(g);
    T* dst = gip + n0 * s.in_h * s.in_w * C;
    at::parallel_for(0, nb * s.in_h, parallel_grain(s.in_w * KC), [&](int64_t r0, int64_t r1) {
      switch (C) {
        case 1: return col2im_rows<T, 1>(cols, dst, r0, r1, C, s, ymap, xmap);
        case 2: return col2im_rows<T, 2>(cols, dst, r0, r1, C, s, ymap, xmap);
        case 3: return col2im_rows<T, 3>(cols, dst, r0, r1, C, s, ymap, xmap);
        case 4: return col2im_rows<T, 4>(cols, dst, r0, r1, C, s, ymap, xmap);
        default: return col2im_rows<T, 0>(cols, dst, r0, r1, C, s, ymap, xmap);
      }
    });
  }
}

// R[tap][o][c] = sum_p go[p, o] * x_tap[p, c] over the P output pixels, x_tap[p] the input
// pixel tap reads for output pixel p (zero in the padding).
template <typename T, int MR, int NV>
void grad_weight_gather_tiled(const at::Tensor& go, const at::Tensor& x, at::Tensor& gw,
                              const Conv2dShape& s) {
  using gemm::kKC;
  constexpr int64_t NR = gemm::nr<T, NV>();
  const int64_t O = s.out_channels, C = s.in_channels, taps = s.kernel_h * s.kernel_w;
  const int64_t plane = s.out_h * s.out_w, P = s.batch * plane;
  at::Tensor result = at::empty({taps, O, C}, gw.options());
  T* R = result.mutable_data_ptr<T>();
  const T* gop = go.const_data_ptr<T>();
  const T* xp = x.const_data_ptr<T>();
  const Gather<T> geo = forward_geometry<T>(x, s);  // the input pixel each tap reads
  const int64_t col_panels = div_up(C, NR), o_panels = div_up(O, MR);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t units = taps * col_panels;
  const int64_t o_split = std::clamp<int64_t>(div_up(2 * threads, units), 1, o_panels);
  const int64_t o_per = div_up(o_panels, o_split);
  // A 1x1 stride-1 convolution without padding reads x's rows in order: B is x itself.
  const bool direct = taps == 1 && s.stride_h == 1 && s.stride_w == 1 && s.pad_h == 0 &&
                      s.pad_w == 0 && s.in_h == s.out_h && s.in_w == s.out_w;
  at::parallel_for(0, units * o_split, 1, [&](int64_t u0, int64_t u1) {
    std::vector<const T*> brows(kKC);
    std::vector<T> zeros(C, T(0));
    std::vector<int64_t> pn(kKC), py(kKC), px(kKC);
    alignas(64) T edge[kKC * NR];
    alignas(64) T abuf[kKC * MR];
    int64_t cn = 0, cy = 0, cx = 0;  // the coordinates of pixel k0, counted up
    for (int64_t k0 = 0; k0 < P; k0 += kKC) {
      const int64_t kc = std::min(kKC, P - k0);
      for (int64_t k = 0; k < kc && !direct; ++k) {
        pn[k] = cn, py[k] = cy, px[k] = cx;
        if (++cx == s.out_w) {
          cx = 0;
          if (++cy == s.out_h) cy = 0, ++cn;
        }
      }
      int64_t built = direct ? 0 : -1;
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t tap = u / (col_panels * o_split);
        const int64_t q = u / o_split % col_panels, os = u % o_split;
        if (tap != built) {
          const int64_t i = tap / s.kernel_w, j = tap % s.kernel_w;
          for (int64_t k = 0; k < kc; ++k) {
            const int64_t iy = geo.ymap[py[k] * s.kernel_h + i];
            const int64_t ix = geo.xmap[px[k] * s.kernel_w + j];
            brows[k] = iy >= 0 && ix >= 0 ? xp + ((pn[k] * s.in_h + iy) * s.in_w + ix) * C
                                          : zeros.data();
          }
          built = tap;
        }
        const int64_t n0 = q * NR, ncols = std::min(NR, C - n0);
        const gemm::PtrB<T> b{brows.data(), n0};
        const gemm::RowsB<T> rb{xp + k0 * C + n0, C};  // direct
        const T* eb = ncols == NR ? nullptr
                      : direct    ? gemm::edge_panel<T, NR>(rb, kc, ncols, edge)
                                  : gemm::edge_panel<T, NR>(b, kc, ncols, edge);
        for (int64_t op = os * o_per; op < std::min(o_panels, (os + 1) * o_per); ++op) {
          const int64_t o0 = op * MR;
          const int mr = static_cast<int>(std::min<int64_t>(MR, O - o0));
          gemm::ColumnsA<T> a{gop + k0 * O + o0, O};
          if (mr < MR) {  // the last output channels: a zero-padded copy, not past go's end
            for (int64_t k = 0; k < kc; ++k) {
              for (int r = 0; r < MR; ++r) abuf[k * MR + r] = r < mr ? a(r, k) : T(0);
            }
            a = gemm::ColumnsA<T>{abuf, MR};
          }
          const gemm::RowsC<T> c{R + (tap * O + o0) * C + n0, C};
          if (eb != nullptr) {
            gemm::micro_kernel<T, MR, NV>(kc, a, gemm::RowsB<T>{eb, NR}, c, mr,
                                          static_cast<int>(ncols), k0 > 0, nullptr);
          } else if (direct) {
            gemm::micro_kernel<T, MR, NV>(kc, a, rb, c, mr, NR, k0 > 0, nullptr);
          } else {
            gemm::micro_kernel<T, MR, NV>(kc, a, b, c, mr, NR, k0 > 0, nullptr);
          }
        }
      }
    }
  });
  weight_from_taps(R, false, gw);  // R is [taps][O][C]
}

// grad_weight with few input channels (a stem's 3, or 16 float32 ones, where the product's
// N = C would be mostly padding): its transpose,
// gw^T [(tap, c)][o] = sum_p im2col(x)[p][(tap, c)] * go[p][o], with the im2col rows of a
// block of pixels built in L2 (taps * C values each) and read as A's columns, go read in place
// as B. The threads split the pixels in chunks of a fixed size, each chunk's im2col built once
// and its partial product kept apart; the partials are summed in chunk order: the same bits for
// any thread count. (Splitting the rows instead made each thread build every block, and a
// stem's 27 rows are 5 panels, 3 for one thread and 2 for the other.)
template <typename T, int MR, int NV>
void grad_weight_transposed(const at::Tensor& go, const at::Tensor& x, at::Tensor& gw,
                            const Conv2dShape& s) {
  using gemm::kKC;
  constexpr int64_t NR = gemm::nr<T, NV>();
  constexpr int64_t L = gemm::Simd<T>::kLanes;
  constexpr int64_t kChunk = 8 * kKC;  // pixels: a stem's 27 x 32 partial per 2048 pixels
  const Gather<T> g = forward_geometry<T>(x, s);
  const int64_t O = s.out_channels, C = s.in_channels, taps = s.kernel_h * s.kernel_w;
  const int64_t Kt = taps * C, ldp = div_up(Kt, L) * L + L;
  const int64_t plane = s.out_h * s.out_w, P = s.batch * plane;
  const int64_t full = O / NR, tail = O % NR, panels = div_up(Kt, MR);
  const int64_t chunks = div_up(P, kChunk);
  at::Tensor parts = at::empty({chunks, Kt, O}, gw.options());
  T* R = parts.mutable_data_ptr<T>();
  const T* gop = go.const_data_ptr<T>();
  // Fewer chunks than threads (small maps): each chunk's row panels split among threads too,
  // each part building the chunk's im2col itself (the sums stay the same).
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t row_split = std::clamp<int64_t>(div_up(threads, chunks), 1, panels);
  const int64_t per_split = div_up(panels, row_split);
  at::parallel_for(0, chunks * row_split, 1, [&](int64_t u0, int64_t u1) {
    std::vector<T> cols(kKC * ldp);
    std::vector<T> edge(tail != 0 ? kKC * NR : 0);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t chunk = u / row_split, split = u % row_split;
      const int64_t pp0 = split * per_split, pp1 = std::min(panels, pp0 + per_split);
      const int64_t first = chunk * kChunk, last = std::min(P, first + kChunk);
      T* dst = R + chunk * Kt * O;
      int64_t n = first / plane, y = first % plane / s.out_w, xo = first % s.out_w;
      for (int64_t k0 = first; k0 < last; k0 += kKC) {
        const int64_t kc = std::min(kKC, last - k0);
        for (int64_t k = 0; k < kc; ++k) {
          im2col_row(g, n, y, xo, cols.data() + k * ldp);
          if (++xo == s.out_w) {
            xo = 0;
            if (++y == s.out_h) y = 0, ++n;
          }
        }
        const T* gk = gop + k0 * O;
        if (tail != 0) {
          gemm::edge_panel<T, NR>(gemm::RowsB<T>{gk + full * NR, O}, kc, tail, edge.data());
        }
        const bool accumulate = k0 > first;
        for (int64_t pp = pp0; pp < pp1; ++pp) {
          const int64_t r0 = pp * MR;
          const int mr = static_cast<int>(std::min<int64_t>(MR, Kt - r0));
          const gemm::ColumnsA<T> a{cols.data() + r0, ldp};  // rows past Kt read the slack
          for (int64_t q = 0; q < full; ++q) {
            gemm::micro_kernel<T, MR, NV>(kc, a, gemm::RowsB<T>{gk + q * NR, O},
                                          gemm::RowsC<T>{dst + r0 * O + q * NR, O}, mr, NR,
                                          accumulate, nullptr);
          }
          if (tail != 0) {
            gemm::micro_kernel<T, MR, NV>(kc, a, gemm::RowsB<T>{edge.data(), NR},
                                          gemm::RowsC<T>{dst + r0 * O + full * NR, O}, mr,
                                          static_cast<int>(tail), accumulate, nullptr);
          }
        }
      }
    }
  });
  // chunk 0's slice += each later chunk's, in chunk order
  const int64_t size = Kt * O;
  at::parallel_for(0, size, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t chunk = 1; chunk < chunks; ++chunk) {
      const T* src = R + chunk * size;
      for (int64_t i = i0; i < i1; ++i) R[i] += src[i];
    }
  });
  weight_from_taps(R, true, gw);  // R is [taps][C][O]
}

template <typename T>
void grad_weight_gather(const at::Tensor& go, const at::Tensor& x, at::Tensor& gw,
                        const Conv2dShape& s) {
  // Its transpose, whose GEMM columns are the output channels, where its tiles pad less:
  // O x C per tap against (taps * C) x O. Alternating processes, float32 on AVX-512 (tiles of
  // 32, 48 or 64 columns): 1x1 24->96 16x16 N=128 1.39 -> 0.93 ms, 40->160 8x8 0.65 -> 0.55,
  // 16->64 32x32 N=120 3.9-4.1 -> 1.74, 3x3 16->64 56x56 N=8 2.7 -> 1.5; 3x3 32->64 (even)
  // about the same either way, 1x1 32->16 (the transpose pads O to 32) 0.8 -> 2.2 ms.
  // Only by a clear margin (1/8 fewer cells): it builds im2col rows of taps * C values where
  // the other reads x's rows in place. (Taken at 0.8 % fewer cells, 3x3 256->256 14x14 N=8
  // fell from 0.88x to 0.68x torch fwd+bwd in the bench, its 1568 pixels one chunk, one thread.)
  const int64_t taps = s.kernel_h * s.kernel_w;
  if (s.in_channels < kMinColumns ||
      8 * tile_area<T>(taps * s.in_channels, s.out_channels) <
          7 * taps * tile_area<T>(s.out_channels, s.in_channels)) {
    switch (pick_tile<T>(s.out_channels)) {
      case Tile::k8x3: return grad_weight_transposed<T, 8, 3>(go, x, gw, s);
      case Tile::k6x4: return grad_weight_transposed<T, 6, 4>(go, x, gw, s);
      case Tile::k8x2: return grad_weight_transposed<T, 8, 2>(go, x, gw, s);
      case Tile::k8x1: return grad_weight_transposed<T, 8, 1>(go, x, gw, s);
    }
  }
  switch (pick_tile<T>(s.in_channels)) {
    case Tile::k8x3: return grad_weight_gather_tiled<T, 8, 3>(go, x, gw, s);
    case Tile::k6x4: return grad_weight_gather_tiled<T, 6, 4>(go, x, gw, s);
    case Tile::k8x2: return grad_weight_gather_tiled<T, 8, 2>(go, x, gw, s);
    case Tile::k8x1: return grad_weight_gather_tiled<T, 8, 1>(go, x, gw, s);
  }
}

#endif  // FASTCONV_HAVE_AVX512_GEMM

}  // namespace

bool nhwc_applies(const Conv2dShape& s, at::ScalarType st, int64_t n) {
  return use_own_gemm(st) && s.groups == 1 && n >= kMinColumns;
}

#ifdef FASTCONV_HAVE_AVX512_GEMM
void nhwc_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                  at::Tensor& out, const Conv2dShape& s) {
  FASTCONV_DISPATCH_OWN_GEMM(x.scalar_type(),
                             [&] { forward_gather<scalar_t>(x, weight, bias, out, s); })
}

void nhwc_grad_input(const at::Tensor& grad_output, const at::Tensor& weight,
                     at::Tensor& grad_input, const Conv2dShape& s) {
  FASTCONV_DISPATCH_OWN_GEMM(grad_output.scalar_type(), [&] {
    if (s.in_channels < kMinColumns) {
      grad_input_cols<scalar_t>(grad_output, weight, grad_input, s);
    } else {
      grad_input_gather<scalar_t>(grad_output, weight, grad_input, s);
    }
  })
}

void nhwc_grad_weight(const at::Tensor& grad_output, const at::Tensor& input,
                      at::Tensor& grad_weight, const Conv2dShape& s) {
  FASTCONV_DISPATCH_OWN_GEMM(grad_output.scalar_type(), [&] {
    grad_weight_gather<scalar_t>(grad_output, input, grad_weight, s);
  })
}
#else
// Without the own GEMM nhwc_applies is false and these are never called.
void nhwc_forward(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                  const Conv2dShape&) {
  TORCH_INTERNAL_ASSERT(false, "the channels_last conv2d GEMM needs the AVX-512 build");
}
void nhwc_grad_input(const at::Tensor&, const at::Tensor&, at::Tensor&, const Conv2dShape&) {
  TORCH_INTERNAL_ASSERT(false, "the channels_last conv2d GEMM needs the AVX-512 build");
}
void nhwc_grad_weight(const at::Tensor&, const at::Tensor&, at::Tensor&, const Conv2dShape&) {
  TORCH_INTERNAL_ASSERT(false, "the channels_last conv2d GEMM needs the AVX-512 build");
}
#endif

}  // namespace conv2d_cpu
}  // namespace fastconv
