// CPU kernels for fastconv::max_pool2d and fastconv::_max_pool2d_backward.
//
// Semantics are torch's, bit for bit: a window scans its taps row-major, starting from
// (-inf, first valid tap) and taking a tap when `val > max || isnan(val)`, so ties keep the
// first max and the last NaN wins; taps in the padding are never read; indices are h * W + w
// ("full") or the window-local tap i * kW + j as one byte ("compact").
//
// The row-major scan is an ordered reduction with the operator
//   f((m, t), (v, u)) = (v > m || isnan(v)) ? (v, u) : (m, t),
// and f gives the same winner however the ordered sequence is split, as long as the pieces are
// combined in order: per row the winner is the last NaN or else the first max, and combining
// row winners in row order picks the last NaN of the last row that has one, or the first max of
// the first row that reaches it -- exactly the row-major winner. The NCHW kernels therefore
// reduce each input row horizontally first (contiguous, reused by every output row that needs
// it) and then combine kH row results vertically. (Vertical-first would be column-major and
// would pick a different tie / NaN.) Channels-last kernels scan the window directly with the
// channel as the vector axis.
//
// The backward is a gather: every grad_input element is written exactly once with the sum, in
// row-major output order like torch's scatter, of the grad_output entries whose window chose
// it. No zero-fill pass, no atomics, deterministic.
//
// Each kernel exists twice: portable loops written for the auto-vectoriser (float64, builds
// without AVX-512, stride_w > 2 in NCHW), and AVX-512 versions for float lanes (float32, and
// bfloat16 widened to float) in namespace simd, which keep rows in registers, use whole-vector
// loads and stores wherever they stay in bounds (masked memory accesses run ~2x slower on the
// Zen 4 machines this was tuned on; the auto-vectoriser emits them for every short loop tail
// and conditional load) and the same ordered reductions lane by lane.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/shape.h"
#include "cpu/memory_hints.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define FASTCONV_MP_AVX512 1
#include <immintrin.h>
// GCC 12 flags the deliberately undefined pass-through operand inside its own AVX-512
// intrinsics (_mm512_undefined_*) as "maybe uninitialized" once they are inlined here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#endif

namespace fastconv {
namespace {

constexpr const char* kFwdOp = "max_pool2d";
constexpr const char* kBwdOp = "_max_pool2d_backward";


template <typename acc_t, typename scalar_t>
inline acc_t to_acc(scalar_t v) {
  return static_cast<acc_t>(v);
}

// A max of bfloat16 values is a bfloat16 value, so the store only truncates; NaN becomes
// 0x7FC0 as c10::BFloat16(float) (torch's own conversion) makes it.
template <typename scalar_t, typename acc_t>
inline scalar_t store_max(acc_t v) {
  if constexpr (std::is_same<scalar_t, c10::BFloat16>::value) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    const uint16_t b = (v != v) ? uint16_t(0x7FC0) : uint16_t(u >> 16);
    return c10::BFloat16(b, c10::BFloat16::from_bits());
  } else {
    return static_cast<scalar_t>(v);
  }
}

// Gradient sums do need rounding.
template <typename scalar_t, typename acc_t>
inline scalar_t store_sum(acc_t v) {
  return static_cast<scalar_t>(v);
}

// The update rule, as a mask (bitwise | so the compiler if-converts and vectorises it).
template <typename acc_t>
inline bool takes(acc_t v, acc_t m) {
  return (v > m) | (v != v);
}

// Taps t in [lo, hi) of an output position along one dimension that land inside [0, in).
struct TapRange {
  int64_t lo, hi;
};

inline TapRange tap_range(int64_t o, int64_t s, int64_t p, int64_t d, int64_t k, int64_t in) {
  const int64_t start = o * s - p;
  const int64_t lo = start < 0 ? ceil_div(-start, d) : 0;
  const int64_t last = in - 1 - start;
  const int64_t hi = last < 0 ? 0 : std::min(k, last / d + 1);
  return {lo, hi};
}

// Whether some window along this dimension has no tap inside the input (possible only with a
// dilation larger than the input plus padding). torch then outputs -inf with an index past the
// skipped taps; the scalar kernel below reproduces that, the fast kernels assume it never happens.
inline bool has_empty_window(int64_t out, int64_t s, int64_t p, int64_t d, int64_t k, int64_t in) {
  for (int64_t o = 0; o < out; ++o) {
    const TapRange r = tap_range(o, s, p, d, k, in);
    if (r.lo >= r.hi) return true;
  }
  return false;
}

// Windows whose taps all lie inside the input: o in [a, b).
struct Interior {
  int64_t a, b;
};

inline Interior interior(int64_t out, int64_t s, int64_t p, int64_t d, int64_t k, int64_t in) {
  const int64_t a = std::min(out, ceil_div(p, s));
  const int64_t num = in - 1 + p - (k - 1) * d;  // o * s <= num
  int64_t b = num < 0 ? 0 : std::min(out, num / s + 1);
  b = std::max(a, b);
  return {a, b};
}

// at::parallel_for grain for units of `work` element visits each: small calls stay on the
// calling thread, like ATen's own kernels (at::internal::GRAIN_SIZE).
inline int64_t grain_for(int64_t work) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work));
}

// Work units for the NCHW kernels: (plane, block of rows). Rows are split only when the planes
// alone cannot keep every thread busy (a split costs the ring / candidate set-up per block).
struct RowSplit {
  int64_t blocks, rows_per_block, grain;
};

inline RowSplit split_rows(int64_t planes, int64_t rows, int64_t work_per_row) {
  const int64_t want_units = 4 * static_cast<int64_t>(at::get_num_threads());
  int64_t blocks = planes >= want_units ? 1 : std::min(rows, ceil_div(want_units, planes));
  const int64_t rows_per_block = ceil_div(rows, blocks);
  blocks = ceil_div(rows, rows_per_block);
  return {blocks, rows_per_block, grain_for(rows_per_block * work_per_row)};
}

// ------------------------------------------------------------------------------------------
// Forward, scalar reference scan (any layout via element strides). Used only for geometries
// with empty windows; one thread per plane, no vectorisation: correctness over speed.
// ------------------------------------------------------------------------------------------
template <typename scalar_t, PoolIndices M>
void max_pool2d_scalar(const scalar_t* in, scalar_t* out, void* idx_ptr, const Pool2dShape& s,
                       int64_t in_sn, int64_t in_sc, int64_t in_sh, int64_t in_sw,
                       int64_t out_sn, int64_t out_sc, int64_t out_sh, int64_t out_sw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t grain = grain_for(s.out_h * s.out_w * max_pool2d_taps(s));
  at::parallel_for(0, s.batch * s.channels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t pl = begin; pl < end; ++pl) {
      const int64_t n = pl / s.channels, c = pl % s.channels;
      const scalar_t* x = in + n * in_sn + c * in_sc;
      for (int64_t oh = 0; oh < s.out_h; ++oh) {
        const TapRange ri = tap_range(oh, s.stride_h, s.pad_h, s.dil_h, s.kernel_h, s.in_h);
        for (int64_t ow = 0; ow < s.out_w; ++ow) {
          const TapRange rj = tap_range(ow, s.stride_w, s.pad_w, s.dil_w, s.kernel_w, s.in_w);
          acc_t m = -std::numeric_limits<acc_t>::infinity();
          int64_t ti = ri.lo, tj = rj.lo;
          for (int64_t i = ri.lo; i < ri.hi; ++i) {
            const int64_t h = oh * s.stride_h - s.pad_h + i * s.dil_h;
            for (int64_t j = rj.lo; j < rj.hi; ++j) {
              const int64_t w = ow * s.stride_w - s.pad_w + j * s.dil_w;
              const acc_t v = to_acc<acc_t>(x[h * in_sh + w * in_sw]);
              if (takes(v, m)) {
                m = v;
                ti = i;
                tj = j;
              }
            }
          }
          const int64_t o = n * out_sn + c * out_sc + oh * out_sh + ow * out_sw;
          out[o] = store_max<scalar_t>(m);
          if constexpr (M == PoolIndices::kCompact) {
            static_cast<uint8_t*>(idx_ptr)[o] = static_cast<uint8_t>(ti * s.kernel_w + tj);
          } else if constexpr (M == PoolIndices::kFull) {
            const int64_t h = oh * s.stride_h - s.pad_h + ti * s.dil_h;
            const int64_t w = ow * s.stride_w - s.pad_w + tj * s.dil_w;
            static_cast<int64_t*>(idx_ptr)[o] = h * s.in_w + w;
          }
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------
// Forward, NCHW.
//
// Mapping: at::parallel_for over (plane, block of output rows); one plane per unit when there
// are enough planes, else the plane's output rows are split into blocks. Per unit, a ring of
// (kH - 1) * dH + 1 (rounded up to a power of two) row buffers holds the horizontal reduction
// (value, winning column tap) of each input row it needs, computed once and reused by every
// output row whose window covers it (1.5x for 3x3/s2). The horizontal pass vectorises over
// output columns with loads at stride sW (kW and sW compile-time for the common 2x2/s2,
// 3x3/s2, 3x3/s1 windows); the vertical pass combines the kH buffered rows contiguously. The
// "none" path carries no index lanes at all, "compact" int32 tap lanes narrowed to a byte on
// store. Bound: reading the input once (the ring stays in L1); the AVX-512 version runs at
// ~12-15 GB/s of input per core here, torch's scalar NCHW loop at ~1 GB/s.
// ------------------------------------------------------------------------------------------
template <int KW, int SW, bool IDX, typename scalar_t, typename acc_t>
inline void hmax_interior(const scalar_t* __restrict x, int64_t n, int64_t kW_rt, int64_t sW_rt,
                          int64_t dW, acc_t* __restrict hv, int32_t* __restrict hj) {
  if constexpr (KW != 0 && SW != 0) {
    for (int64_t q = 0; q < n; ++q) {
      const scalar_t* p = x + q * SW;
      acc_t m = to_acc<acc_t>(p[0]);
      int32_t t = 0;
      for (int j = 1; j < KW; ++j) {
        const acc_t v = to_acc<acc_t>(p[j * dW]);
        const bool tk = takes(v, m);
        m = tk ? v : m;
        if constexpr (IDX) t = tk ? j : t;
      }
      hv[q] = m;
      if constexpr (IDX) hj[q] = t;
    }
  } else {
    const int64_t sW = sW_rt;
    for (int64_t q = 0; q < n; ++q) {
      hv[q] = to_acc<acc_t>(x[q * sW]);
      if constexpr (IDX) hj[q] = 0;
    }
    for (int64_t j = 1; j < kW_rt; ++j) {
      const scalar_t* xj = x + j * dW;
      const int32_t jj = static_cast<int32_t>(j);
      for (int64_t q = 0; q < n; ++q) {
        const acc_t v = to_acc<acc_t>(xj[q * sW]);
        const bool tk = takes(v, hv[q]);
        hv[q] = tk ? v : hv[q];
        if constexpr (IDX) hj[q] = tk ? jj : hj[q];
      }
    }
  }
}

template <int KW, int SW, bool IDX, typename scalar_t, typename acc_t>
void hmax_row(const scalar_t* x, const Pool2dShape& s, const Interior& iw, acc_t* hv,
              int32_t* hj) {
  auto edge = [&](int64_t ow) {
    const TapRange r = tap_range(ow, s.stride_w, s.pad_w, s.dil_w, s.kernel_w, s.in_w);
    const int64_t w0 = ow * s.stride_w - s.pad_w;
    acc_t m = to_acc<acc_t>(x[w0 + r.lo * s.dil_w]);
    int32_t t = static_cast<int32_t>(r.lo);
    for (int64_t j = r.lo + 1; j < r.hi; ++j) {
      const acc_t v = to_acc<acc_t>(x[w0 + j * s.dil_w]);
      if (takes(v, m)) {
        m = v;
        t = static_cast<int32_t>(j);
      }
    }
    hv[ow] = m;
    if constexpr (IDX) hj[ow] = t;
  };
  for (int64_t ow = 0; ow < iw.a; ++ow) edge(ow);
  if (iw.b > iw.a) {
    hmax_interior<KW, SW, IDX>(x + iw.a * s.stride_w - s.pad_w, iw.b - iw.a, s.kernel_w,
                               s.stride_w, s.dil_w, hv + iw.a, hj + iw.a);
  }
  for (int64_t ow = iw.b; ow < s.out_w; ++ow) edge(ow);
}

template <int KW, int SW, typename scalar_t, PoolIndices M>
void max_pool2d_nchw(const scalar_t* in, scalar_t* out, void* idx_ptr, const Pool2dShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool IDX = M != PoolIndices::kNone;
  const int64_t planes = s.batch * s.channels;
  const int64_t H = s.in_h, W = s.in_w, OH = s.out_h, OW = s.out_w;
  int64_t R = 1;
  while (R < (s.kernel_h - 1) * s.dil_h + 1) R *= 2;
  const Interior iw = interior(OW, s.stride_w, s.pad_w, s.dil_w, s.kernel_w, W);
  std::vector<TapRange> row_taps(OH);
  for (int64_t oh = 0; oh < OH; ++oh) {
    row_taps[oh] = tap_range(oh, s.stride_h, s.pad_h, s.dil_h, s.kernel_h, H);
  }
  const RowSplit split = split_rows(planes, OH, OW * max_pool2d_taps(s));
  const int64_t blocks = split.blocks, rows_per_block = split.rows_per_block;

  at::parallel_for(0, planes * blocks, split.grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> ring_v(R * OW), ov(OW);
    std::vector<int32_t> ring_j(IDX ? R * OW : 0), ot(IDX ? OW : 0), oj(IDX ? OW : 0);
    std::vector<int64_t> tag(R);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t pl = u / blocks, blk = u % blocks;
      const scalar_t* x = in + pl * H * W;
      std::fill(tag.begin(), tag.end(), -1);
      const int64_t oh_end = std::min(OH, (blk + 1) * rows_per_block);
      for (int64_t oh = blk * rows_per_block; oh < oh_end; ++oh) {
        const TapRange ri = row_taps[oh];
        const int64_t h0 = oh * s.stride_h - s.pad_h;
        acc_t* __restrict vo = ov.data();
        int32_t* __restrict to = IDX ? ot.data() : nullptr;
        int32_t* __restrict tj = IDX ? oj.data() : nullptr;
        for (int64_t i = ri.lo; i < ri.hi; ++i) {
          const int64_t h = h0 + i * s.dil_h;
          const int64_t slot = h & (R - 1);
          acc_t* __restrict rv = ring_v.data() + slot * OW;
          int32_t* __restrict rj = IDX ? ring_j.data() + slot * OW : nullptr;
          if (tag[slot] != h) {
            hmax_row<KW, SW, IDX>(x + h * W, s, iw, rv, rj);
            tag[slot] = h;
          }
          const int32_t ii = static_cast<int32_t>(i);
          if (i == ri.lo) {
            for (int64_t q = 0; q < OW; ++q) vo[q] = rv[q];
            if constexpr (IDX) {
              for (int64_t q = 0; q < OW; ++q) {
                to[q] = ii;
                tj[q] = rj[q];
              }
            }
          } else {
            for (int64_t q = 0; q < OW; ++q) {
              const acc_t v = rv[q];
              const bool tk = takes(v, vo[q]);
              vo[q] = tk ? v : vo[q];
              if constexpr (IDX) {
                to[q] = tk ? ii : to[q];
                tj[q] = tk ? rj[q] : tj[q];
              }
            }
          }
        }
        scalar_t* __restrict yo = out + (pl * OH + oh) * OW;
        for (int64_t q = 0; q < OW; ++q) yo[q] = store_max<scalar_t>(vo[q]);
        if constexpr (M == PoolIndices::kCompact) {
          uint8_t* __restrict io = static_cast<uint8_t*>(idx_ptr) + (pl * OH + oh) * OW;
          const int32_t kW = static_cast<int32_t>(s.kernel_w);
          for (int64_t q = 0; q < OW; ++q) io[q] = static_cast<uint8_t>(to[q] * kW + tj[q]);
        } else if constexpr (M == PoolIndices::kFull) {
          int64_t* __restrict io = static_cast<int64_t*>(idx_ptr) + (pl * OH + oh) * OW;
          for (int64_t q = 0; q < OW; ++q) {
            const int64_t h = h0 + static_cast<int64_t>(to[q]) * s.dil_h;
            const int64_t w = q * s.stride_w - s.pad_w + static_cast<int64_t>(tj[q]) * s.dil_w;
            io[q] = h * W + w;
          }
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------
// Forward, channels_last (NHWC).
//
// Mapping: at::parallel_for over (n, output row); per output pixel the window's taps are
// scanned row-major with the channels as the vector axis, in blocks of CB channels whose
// running (max, index) live in registers across all taps (compile-time CB; a runtime-length
// tail block). Index lanes: int32 tap number for "compact", int64 position for "full", none
// for "none". Bound: reading the input (each input pixel is loaded by ~kH*kW/(sH*sW) windows,
// served from L1/L2 since a window's rows are adjacent).
// ------------------------------------------------------------------------------------------
constexpr int kMaxCB = 64;  // channels per register-resident block (32 for float64)

template <int CB, typename scalar_t, PoolIndices M>
inline void cl_window(const scalar_t* __restrict xn, scalar_t* __restrict y, void* idx_out,
                      int64_t cb, const Pool2dShape& s, int64_t h0, int64_t w0,
                      const TapRange& ri, const TapRange& rj) {
  using acc_t = at::opmath_type<scalar_t>;
  using idx_t = std::conditional_t<M == PoolIndices::kFull, int64_t, int32_t>;
  constexpr bool IDX = M != PoolIndices::kNone;
  const int64_t n = CB ? CB : cb;  // CB == 0: a tail block of cb < kMaxCB channels
  const int64_t C = s.channels;
  acc_t mm[CB ? CB : kMaxCB];
  idx_t tt[CB ? CB : kMaxCB];
  bool first = true;
  for (int64_t i = ri.lo; i < ri.hi; ++i) {
    const int64_t h = h0 + i * s.dil_h;
    for (int64_t j = rj.lo; j < rj.hi; ++j) {
      const int64_t w = w0 + j * s.dil_w;
      const scalar_t* __restrict p = xn + (h * s.in_w + w) * C;
      idx_t tap;
      if constexpr (M == PoolIndices::kFull) {
        tap = h * s.in_w + w;
      } else {
        tap = static_cast<idx_t>(i * s.kernel_w + j);
      }
      if (first) {
        for (int64_t c = 0; c < n; ++c) {
          mm[c] = to_acc<acc_t>(p[c]);
          if constexpr (IDX) tt[c] = tap;
        }
        first = false;
      } else {
        for (int64_t c = 0; c < n; ++c) {
          const acc_t v = to_acc<acc_t>(p[c]);
          const bool tk = takes(v, mm[c]);
          mm[c] = tk ? v : mm[c];
          if constexpr (IDX) tt[c] = tk ? tap : tt[c];
        }
      }
    }
  }
  for (int64_t c = 0; c < n; ++c) y[c] = store_max<scalar_t>(mm[c]);
  if constexpr (M == PoolIndices::kCompact) {
    uint8_t* __restrict io = static_cast<uint8_t*>(idx_out);
    for (int64_t c = 0; c < n; ++c) io[c] = static_cast<uint8_t>(tt[c]);
  } else if constexpr (M == PoolIndices::kFull) {
    int64_t* __restrict io = static_cast<int64_t*>(idx_out);
    for (int64_t c = 0; c < n; ++c) io[c] = tt[c];
  }
}

template <typename scalar_t, PoolIndices M>
void max_pool2d_channels_last(const scalar_t* in, scalar_t* out, void* idx_ptr,
                              const Pool2dShape& s) {
  constexpr int CB = std::is_same<scalar_t, double>::value ? kMaxCB / 2 : kMaxCB;
  const int64_t C = s.channels;
  const size_t isz = M == PoolIndices::kCompact ? 1 : (M == PoolIndices::kFull ? 8 : 0);
  const int64_t grain = grain_for(s.out_w * s.channels * max_pool2d_taps(s));
  at::parallel_for(0, s.batch * s.out_h, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t nb = u / s.out_h, oh = u % s.out_h;
      const scalar_t* xn = in + nb * s.in_h * s.in_w * C;
      const TapRange ri = tap_range(oh, s.stride_h, s.pad_h, s.dil_h, s.kernel_h, s.in_h);
      const int64_t h0 = oh * s.stride_h - s.pad_h;
      for (int64_t ow = 0; ow < s.out_w; ++ow) {
        const TapRange rj = tap_range(ow, s.stride_w, s.pad_w, s.dil_w, s.kernel_w, s.in_w);
        const int64_t w0 = ow * s.stride_w - s.pad_w;
        const int64_t o = (u * s.out_w + ow) * C;
        int64_t c0 = 0;
        for (; c0 + CB <= C; c0 += CB) {
          cl_window<CB, scalar_t, M>(xn + c0, out + o + c0,
                                     static_cast<char*>(idx_ptr) + (o + c0) * isz, CB, s, h0, w0,
                                     ri, rj);
        }
        if (c0 < C) {
          cl_window<0, scalar_t, M>(xn + c0, out + o + c0,
                                    static_cast<char*>(idx_ptr) + (o + c0) * isz, C - c0, s, h0,
                                    w0, ri, rj);
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------
// Backward helpers: the output positions whose windows contain an input position.
// ------------------------------------------------------------------------------------------
struct Cand {
  int64_t o;  // output position along the dimension
  int64_t t;  // the window's tap that lands on the input position
};

// For input position `x`: (o, t) with o * s - p + t * d == x, 0 <= o < out, in increasing o.
inline int gather_candidates(int64_t x, int64_t out, int64_t s, int64_t p, int64_t d, int64_t k,
                             Cand* c) {
  int cnt = 0;
  for (int64_t t = k - 1; t >= 0; --t) {
    const int64_t o = output_for_tap(x, t, s, p, d, out);
    if (o >= 0) c[cnt++] = {o, t};
  }
  return cnt;
}

// gather_candidates for every position of a dimension, computed once per call (the loops
// over rows would otherwise pay a few integer divisions per row).
class CandTable {
 public:
  CandTable(int64_t in, int64_t out, int64_t s, int64_t p, int64_t d, int64_t k)
      : width_(std::min(k, ceil_div(k * d, s) + 1)), cands_(in * width_), counts_(in) {
    std::vector<Cand> tmp(k);
    for (int64_t x = 0; x < in; ++x) {
      const int n = gather_candidates(x, out, s, p, d, k, tmp.data());
      TORCH_INTERNAL_ASSERT(n <= width_);
      std::copy(tmp.begin(), tmp.begin() + n, cands_.begin() + x * width_);
      counts_[x] = n;
    }
  }
  const Cand* at(int64_t x) const { return cands_.data() + x * width_; }
  int count(int64_t x) const { return counts_[x]; }

 private:
  int64_t width_;
  std::vector<Cand> cands_;
  std::vector<int> counts_;
};

// ------------------------------------------------------------------------------------------
// Backward, NCHW.
//
// Mapping: at::parallel_for over (plane, block of input rows). Input columns split into sW
// residue classes w = r + sW * q; within a class every column is reached by the same set of
// window taps j, from output column ow = q + c_j, so for each (output row, tap j) the class's
// contributions are a contiguous, vectorisable pass over q: acc[q] += idx == tap ? g : 0.
// Terms are added in increasing (oh, ow), the order torch's scatter uses, and the row is
// written once. Index compare: uint8 against the tap number, or int64 against h * W + w.
// Bound: instruction issue, ~(kH/sH)*(kW/sW) compare-and-add lanes per input element (2.25 for
// 3x3/s2; ~2.4 ms per core for a 25.7 MB grad_input in the AVX-512 version, against 0.4 ms to
// merely write it); grad_output and index rows are re-read from L1/L2.
// ------------------------------------------------------------------------------------------
struct ColTap {
  int64_t j, c, q_lo, q_hi;  // tap, output column offset (ow = q + c), valid q range
};

// Input columns w = r + sW * q of residue class r (r < min(sW, W)) and, per class, the taps that
// reach them in decreasing j (increasing output column), with the q range where ow is valid.
std::vector<std::vector<ColTap>> column_classes(const Pool2dShape& s) {
  const int64_t W = s.in_w, OW = s.out_w, sW = s.stride_w;
  const int64_t nres = std::min(sW, W);
  std::vector<std::vector<ColTap>> cls(nres);
  for (int64_t r = 0; r < nres; ++r) {
    const int64_t qn = ceil_div(W - r, sW);
    for (int64_t j = s.kernel_w - 1; j >= 0; --j) {
      const int64_t num = r + s.pad_w - j * s.dil_w;
      const int64_t rem = ((num % sW) + sW) % sW;
      if (rem != 0) continue;
      const int64_t c = (num - rem) / sW;  // exact
      const int64_t lo = std::max<int64_t>(0, -c), hi = std::min(qn, OW - c);
      if (lo < hi) cls[r].push_back({j, c, lo, hi});
    }
  }
  return cls;
}

template <typename scalar_t, typename index_t>
void max_pool2d_backward_nchw(const scalar_t* g, const index_t* idx, scalar_t* gi,
                              const Pool2dShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kFull = std::is_same<index_t, int64_t>::value;
  const int64_t planes = s.batch * s.channels;
  const int64_t H = s.in_h, W = s.in_w, OH = s.out_h, OW = s.out_w;
  const int64_t sW = s.stride_w;
  const int64_t nres = std::min(sW, W);
  const int64_t qmax = ceil_div(W, sW);

  const std::vector<std::vector<ColTap>> cls = column_classes(s);
  const CandTable rows(H, OH, s.stride_h, s.pad_h, s.dil_h, s.kernel_h);
  const RowSplit split = split_rows(planes, H, W * 4);
  const int64_t blocks = split.blocks, rows_per_block = split.rows_per_block;

  at::parallel_for(0, planes * blocks, split.grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> accbuf(nres * qmax);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t pl = u / blocks, blk = u % blocks;
      const scalar_t* gp = g + pl * OH * OW;
      const index_t* ip = idx + pl * OH * OW;
      scalar_t* gip = gi + pl * H * W;
      const int64_t h_end = std::min(H, (blk + 1) * rows_per_block);
      for (int64_t h = blk * rows_per_block; h < h_end; ++h) {
        const Cand* hc = rows.at(h);
        const int nh = rows.count(h);
        for (int64_t r = 0; r < nres; ++r) {
          acc_t* __restrict acc = accbuf.data() + r * qmax;
          const int64_t qn = ceil_div(W - r, sW);
          for (int64_t q = 0; q < qn; ++q) acc[q] = acc_t(0);
          for (int a = 0; a < nh; ++a) {
            const int64_t oh = hc[a].o;
            const scalar_t* __restrict grow = gp + oh * OW;
            const index_t* __restrict irow = ip + oh * OW;
            for (const ColTap& ct : cls[r]) {
              const scalar_t* __restrict gq = grow + ct.c;
              const index_t* __restrict iq = irow + ct.c;
              if constexpr (kFull) {
                // idx == h * W + r + sW * q  <=>  idx - sW * q == base
                const int64_t base = h * W + r;
                for (int64_t q = ct.q_lo; q < ct.q_hi; ++q) {
                  acc[q] += (iq[q] - sW * q == base) ? to_acc<acc_t>(gq[q]) : acc_t(0);
                }
              } else {
                const index_t tap = static_cast<index_t>(hc[a].t * s.kernel_w + ct.j);
                for (int64_t q = ct.q_lo; q < ct.q_hi; ++q) {
                  acc[q] += (iq[q] == tap) ? to_acc<acc_t>(gq[q]) : acc_t(0);
                }
              }
            }
          }
        }
        scalar_t* __restrict out_row = gip + h * W;
        if (sW == 1) {
          const acc_t* __restrict a0 = accbuf.data();
          for (int64_t w = 0; w < W; ++w) out_row[w] = store_sum<scalar_t>(a0[w]);
        } else if (sW == 2 && nres == 2) {
          const acc_t* __restrict a0 = accbuf.data();
          const acc_t* __restrict a1 = accbuf.data() + qmax;
          const int64_t pairs = W / 2;
          for (int64_t q = 0; q < pairs; ++q) {
            out_row[2 * q] = store_sum<scalar_t>(a0[q]);
            out_row[2 * q + 1] = store_sum<scalar_t>(a1[q]);
          }
          if (W & 1) out_row[W - 1] = store_sum<scalar_t>(a0[pairs]);
        } else {
          for (int64_t r = 0; r < nres; ++r) {
            const acc_t* __restrict a = accbuf.data() + r * qmax;
            const int64_t qn = ceil_div(W - r, sW);
            for (int64_t q = 0; q < qn; ++q) out_row[r + sW * q] = store_sum<scalar_t>(a[q]);
          }
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------
// Backward, channels_last.
//
// Mapping: at::parallel_for over (n, input row). Per input pixel, the (at most
// ceil(kH/sH) * ceil(kW/sW)) windows containing it are visited in increasing (oh, ow); for
// each, a contiguous pass over channels adds grad_output where the index names this pixel,
// accumulating in registers per CB-channel block; each grad_input pixel is stored once.
// Bound: instruction issue as for NCHW (one compare-and-add per candidate window per channel).
// ------------------------------------------------------------------------------------------
template <int CB, typename scalar_t, typename index_t>
inline void cl_gather(const scalar_t* __restrict gn, const index_t* __restrict in_idx,
                      scalar_t* __restrict y, int64_t cb, const Pool2dShape& s, int64_t h,
                      int64_t w, const Cand* hc, int nh, const Cand* wc, int nw) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kFull = std::is_same<index_t, int64_t>::value;
  const int64_t n = CB ? CB : cb;  // CB == 0: a tail block of cb < kMaxCB channels
  const int64_t C = s.channels;
  acc_t aa[CB ? CB : kMaxCB];
  for (int64_t c = 0; c < n; ++c) aa[c] = acc_t(0);
  for (int x = 0; x < nh; ++x) {
    for (int z = 0; z < nw; ++z) {
      const int64_t o = (hc[x].o * s.out_w + wc[z].o) * C;
      index_t target;
      if constexpr (kFull) {
        target = h * s.in_w + w;
      } else {
        target = static_cast<index_t>(hc[x].t * s.kernel_w + wc[z].t);
      }
      const scalar_t* __restrict gp = gn + o;
      const index_t* __restrict ip = in_idx + o;
      for (int64_t c = 0; c < n; ++c) {
        aa[c] += (ip[c] == target) ? to_acc<acc_t>(gp[c]) : acc_t(0);
      }
    }
  }
  for (int64_t c = 0; c < n; ++c) y[c] = store_sum<scalar_t>(aa[c]);
}

template <typename scalar_t, typename index_t>
void max_pool2d_backward_channels_last(const scalar_t* g, const index_t* idx, scalar_t* gi,
                                       const Pool2dShape& s) {
  constexpr int CB = std::is_same<scalar_t, double>::value ? kMaxCB / 2 : kMaxCB;
  const int64_t C = s.channels, W = s.in_w;
  const CandTable rows(s.in_h, s.out_h, s.stride_h, s.pad_h, s.dil_h, s.kernel_h);
  const CandTable cols(W, s.out_w, s.stride_w, s.pad_w, s.dil_w, s.kernel_w);
  const int64_t grain = grain_for(s.in_w * s.channels * 4);
  at::parallel_for(0, s.batch * s.in_h, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t nb = u / s.in_h, h = u % s.in_h;
      const Cand* hc = rows.at(h);
      const int nh = rows.count(h);
      const int64_t off = nb * s.out_h * s.out_w * C;
      for (int64_t w = 0; w < W; ++w) {
        scalar_t* y = gi + (u * W + w) * C;
        const Cand* wc = cols.at(w);
        const int nw = cols.count(w);
        int64_t c0 = 0;
        for (; c0 + CB <= C; c0 += CB) {
          cl_gather<CB>(g + off + c0, idx + off + c0, y + c0, CB, s, h, w, hc, nh, wc, nw);
        }
        if (c0 < C) {
          cl_gather<0>(g + off + c0, idx + off + c0, y + c0, C - c0, s, h, w, hc, nh, wc, nw);
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------
// AVX-512 versions of all four kernels for float lanes (float32, and bfloat16 widened to
// float); NCHW ones for stride_w 1 or 2. The portable loops above leave the short rows of
// real networks (28..112 outputs) mostly to scalar epilogues with a branch per element, and
// GCC turns their conditional adds into masked loads; these keep each 16-lane block in
// registers, touch memory with whole vectors except at a tensor's ends and a row's tail, and
// compute the same ordered reductions as the portable code, lane by lane.
// ------------------------------------------------------------------------------------------
#ifdef FASTCONV_MP_AVX512
namespace simd {

inline __mmask16 head_mask(int64_t n) {
  return n <= 0 ? __mmask16(0) : (n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1));
}

// Lanes [lo, hi) of a 16-lane vector.
inline __mmask16 range_mask(int64_t lo, int64_t hi) { return head_mask(hi) & ~head_mask(lo); }

// The memory a kernel may read: one tensor. Loads that lie inside it read whole vectors even
// when only some lanes are wanted (the others are left out of every compare, add and store);
// only loads that cross its ends are masked. Masked loads from memory stream about 2x slower
// than plain ones on the AMD EPYC (Zen 4) these kernels were tuned on.
template <typename T>
struct Region {
  uintptr_t lo, hi;
  Region(const T* p, int64_t n)
      : lo(reinterpret_cast<uintptr_t>(p)), hi(reinterpret_cast<uintptr_t>(p + n)) {}
  bool holds(const T* p, int64_t n) const {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    return a >= lo && a + n * sizeof(T) <= hi;
  }
};

inline __m512 widen(__m256i bf16) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16));
}

inline __m512 loadu(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 loadu(const c10::BFloat16* p) {
  return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// 16 float lanes p[0..16); lanes outside k are unspecified.
inline __m512 load(const Region<float>& r, const float* p, __mmask16 k) {
  return r.holds(p, 16) ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(k, p);
}
inline __m512 load(const Region<c10::BFloat16>& r, const c10::BFloat16* p, __mmask16 k) {
  return widen(r.holds(p, 16) ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                              : _mm256_maskz_loadu_epi16(k, p));
}

// 16 lanes p[0], p[SW], ..., p[15 * SW] of which only lanes whose element lies in p[lo, hi)
// are specified; nothing outside the region is read.
template <int SW, typename T>
inline __m512 load_strided(const Region<T>& r, const T* p, int64_t lo, int64_t hi) {
  if constexpr (SW == 1) {
    return load(r, p, range_mask(lo, hi));
  } else {
    static_assert(SW == 2, "stride 1 or 2");
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                           28, 30);
    return _mm512_permutex2var_ps(load(r, p, range_mask(lo, hi)), even,
                                  load(r, p + 16, range_mask(lo - 16, hi - 16)));
  }
}

inline __mmask16 takes(__m512 v, __m512 m) {
  return _mm512_cmp_ps_mask(v, m, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
}

// The updated max as a single instruction dependent on m (the running max is the loop-carried
// chain): vmaxps(v, m) is v > m ? v : m, so ties and a NaN m keep m; lanes where v is NaN take
// v. Same result as selecting with takes(v, m), which the index lanes still use.
inline __m512 combine(__m512 m, __m512 v) {
  return _mm512_mask_max_ps(v, _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), v, m);
}

// Stores of the lanes in k: whole-vector stores when k is full (masked stores to memory are
// as slow as masked loads on Zen 4), masked ones only for a row's tail.
inline void store(float* p, __m512 v, __mmask16 k) {
  if (k == 0xFFFF) {
    _mm512_storeu_ps(p, v);
  } else if (k) {
    _mm512_mask_storeu_ps(p, k, v);
  }
}
inline void store(c10::BFloat16* p, __m256i b, __mmask16 k) {
  if (k == 0xFFFF) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), b);
  } else if (k) {
    _mm256_mask_storeu_epi16(p, k, b);
  }
}
inline void store_bytes(uint8_t* p, __m512i v, __mmask16 k) {
  if (k == 0xFFFF) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(v));
  } else if (k) {
    _mm512_mask_cvtepi32_storeu_epi8(p, k, v);
  }
}
inline void store_int64(int64_t* p, __m512i v, __mmask8 k) {
  if (k == 0xFF) {
    _mm512_storeu_si512(p, v);
  } else if (k) {
    _mm512_mask_storeu_epi64(p, k, v);
  }
}

inline void store_max(float* p, __m512 v, __mmask16 k) { store(p, v, k); }
inline void store_max(c10::BFloat16* p, __m512 v, __mmask16 k) {
  // exact (the max is a bfloat16 value); NaN -> 0x7FC0 like c10::BFloat16(float)
  __m512i b = _mm512_srli_epi32(_mm512_castps_si512(v), 16);
  b = _mm512_mask_mov_epi32(b, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  store(p, _mm512_cvtepi32_epi16(b), k);
}

inline void store_sum(float* p, __m512 v, __mmask16 k) { store(p, v, k); }

inline void store_sum(c10::BFloat16* p, __m512 v, __mmask16 k) {
  // round to nearest even, NaN -> 0x7FC0: c10::BFloat16(float), lane by lane
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i b = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)),
                                                 lsb), 16);
  b = _mm512_mask_mov_epi32(b, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  store(p, _mm512_cvtepi32_epi16(b), k);
}

// grad_input is written once and not read back by the kernel: whole aligned vectors bypass the
// cache (no read-for-ownership of the destination line). Callers end with _mm_sfence().
inline void stream_sum(float* p, __m512 v, __mmask16 k) {
  if (k == 0xFFFF && (reinterpret_cast<uintptr_t>(p) & 63) == 0) {
    _mm512_stream_ps(p, v);
  } else {
    store(p, v, k);
  }
}
inline void stream_sum(c10::BFloat16* p, __m512 v, __mmask16 k) { store_sum(p, v, k); }

// Horizontal pass over one input row: (max, winning column tap) of every output column's
// window, 16 columns per step. Blocks whose windows all lie inside the row start from tap 0;
// edge blocks give each lane only its in-row taps (padding skipped): a lane starts at
// (-inf, first in-row tap) and takes later taps by the usual rule, which is exactly the scan
// from its first in-row tap.
template <int SW, int KW, bool IDX, typename scalar_t>
inline void hmax_row(const Region<scalar_t>& reg, const scalar_t* xr, const Pool2dShape& s,
                     const Interior& iw, float* hv, int32_t* hj) {
  const int64_t OW = s.out_w, W = s.in_w, dW = s.dil_w, pW = s.pad_w;
  const int64_t kW = KW ? KW : s.kernel_w;
  for (int64_t q0 = 0; q0 < OW; q0 += 16) {
    const int64_t cnt = std::min<int64_t>(16, OW - q0);
    const __mmask16 k = head_mask(cnt);
    const scalar_t* p = xr + q0 * SW - pW;  // tap 0 of lane 0 (may lie in the padding)
    __m512 m;
    __m512i t = _mm512_setzero_si512();
    if (q0 >= iw.a && q0 + cnt <= iw.b) {
      const int64_t span = SW * (cnt - 1) + 1;
      m = load_strided<SW>(reg, p, 0, span);
      for (int64_t j = 1; j < kW; ++j) {
        const __m512 v = load_strided<SW>(reg, p + j * dW, 0, span);
        if constexpr (IDX) {
          t = _mm512_mask_mov_epi32(t, takes(v, m), _mm512_set1_epi32(int32_t(j)));
        }
        m = combine(m, v);
      }
    } else {
      m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      __mmask16 seen = 0;
      for (int64_t j = 0; j < kW; ++j) {
        const int64_t base = q0 * SW - pW + j * dW;  // input column of lane 0's tap j
        // in-row elements p[lo, hi) of this tap, and the lanes that read them
        const int64_t lo = std::max<int64_t>(0, -base);
        const int64_t hi = std::min<int64_t>(SW * (cnt - 1) + 1, W - base);
        if (lo >= hi) continue;
        const __mmask16 valid = range_mask(ceil_div(lo, SW), ceil_div(hi, SW)) & k;
        const __m512 v = load_strided<SW>(reg, p + j * dW, lo, hi);
        if constexpr (IDX) {
          const __mmask16 tk = takes(v, m) & valid;
          t = _mm512_mask_mov_epi32(t, tk | (valid & ~seen), _mm512_set1_epi32(int32_t(j)));
        }
        m = _mm512_mask_mov_ps(m, valid, combine(m, v));
        seen |= valid;
      }
    }
    _mm512_storeu_ps(hv + q0, m);  // hv, hj: scratch rows padded to whole vectors
    if constexpr (IDX) _mm512_storeu_si512(hj + q0, t);
  }
}

// Forward NCHW: same mapping as max_pool2d_nchw; the ring holds a power-of-two number of rows
// (slot = h & mask) and the vertical combine of the buffered rows is fused with the stores
// (value, byte tap or int64 position) per 16 lanes.
template <int SW, int KW, typename scalar_t, PoolIndices M>
void max_pool2d_nchw(const scalar_t* in, scalar_t* out, void* idx_ptr, const Pool2dShape& s) {
  constexpr bool IDX = M != PoolIndices::kNone;
  const int64_t planes = s.batch * s.channels;
  const int64_t H = s.in_h, W = s.in_w, OH = s.out_h, OW = s.out_w;
  const Region<scalar_t> reg(in, planes * H * W);
  int64_t R = 1;
  while (R < (s.kernel_h - 1) * s.dil_h + 1) R *= 2;
  const Interior iw = interior(OW, s.stride_w, s.pad_w, s.dil_w, s.kernel_w, W);
  std::vector<TapRange> row_taps(OH);
  for (int64_t oh = 0; oh < OH; ++oh) {
    row_taps[oh] = tap_range(oh, s.stride_h, s.pad_h, s.dil_h, s.kernel_h, H);
  }
  const RowSplit split = split_rows(planes, OH, OW * max_pool2d_taps(s));
  const int64_t blocks = split.blocks, rows_per_block = split.rows_per_block;
  const int32_t kW32 = static_cast<int32_t>(s.kernel_w);
  const int64_t OWP = ceil_div(OW, 16) * 16;

  at::parallel_for(0, planes * blocks, split.grain, [&](int64_t begin, int64_t end) {
    // ring rows padded to whole vectors: plain loads and stores on the scratch
    std::vector<float> ring_v(R * OWP);
    std::vector<int32_t> ring_j(IDX ? R * OWP : 0);
    std::vector<int64_t> tag(R);
    std::vector<const float*> rows_v(s.kernel_h);
    std::vector<const int32_t*> rows_j(s.kernel_h);
    std::vector<int32_t> rows_i(s.kernel_h);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t pl = u / blocks, blk = u % blocks;
      const scalar_t* x = in + pl * H * W;
      std::fill(tag.begin(), tag.end(), -1);
      const int64_t oh_end = std::min(OH, (blk + 1) * rows_per_block);
      for (int64_t oh = blk * rows_per_block; oh < oh_end; ++oh) {
        const TapRange ri = row_taps[oh];
        const int64_t h0 = oh * s.stride_h - s.pad_h;
        int nr = 0;
        for (int64_t i = ri.lo; i < ri.hi; ++i, ++nr) {
          const int64_t h = h0 + i * s.dil_h;
          const int64_t slot = h & (R - 1);
          float* rv = ring_v.data() + slot * OWP;
          int32_t* rj = IDX ? ring_j.data() + slot * OWP : nullptr;
          if (tag[slot] != h) {
            hmax_row<SW, KW, IDX>(reg, x + h * W, s, iw, rv, rj);
            tag[slot] = h;
          }
          rows_v[nr] = rv;
          rows_j[nr] = rj;
          rows_i[nr] = static_cast<int32_t>(i);
        }
        const int64_t o_row = (pl * OH + oh) * OW;
        for (int64_t q = 0; q < OW; q += 16) {
          const __mmask16 k = head_mask(OW - q);
          __m512 m = _mm512_loadu_ps(rows_v[0] + q);
          __m512i ti = _mm512_setzero_si512(), tj = _mm512_setzero_si512();
          if constexpr (IDX) {
            ti = _mm512_set1_epi32(rows_i[0]);
            tj = _mm512_loadu_si512(rows_j[0] + q);
          }
          for (int r = 1; r < nr; ++r) {
            const __m512 v = _mm512_loadu_ps(rows_v[r] + q);
            if constexpr (IDX) {
              const __mmask16 tk = takes(v, m);
              ti = _mm512_mask_mov_epi32(ti, tk, _mm512_set1_epi32(rows_i[r]));
              tj = _mm512_mask_mov_epi32(tj, tk, _mm512_loadu_si512(rows_j[r] + q));
            }
            m = combine(m, v);
          }
          store_max(out + o_row + q, m, k);
          if constexpr (M == PoolIndices::kCompact) {
            const __m512i tap =
                _mm512_add_epi32(_mm512_mullo_epi32(ti, _mm512_set1_epi32(kW32)), tj);
            store_bytes(static_cast<uint8_t*>(idx_ptr) + o_row + q, tap, k);
          } else if constexpr (M == PoolIndices::kFull) {
            int64_t* io = static_cast<int64_t*>(idx_ptr) + o_row + q;
            const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
            for (int half = 0; half < 2; ++half) {
              const __m256i ti8 =
                  half ? _mm512_extracti64x4_epi64(ti, 1) : _mm512_castsi512_si256(ti);
              const __m256i tj8 =
                  half ? _mm512_extracti64x4_epi64(tj, 1) : _mm512_castsi512_si256(tj);
              const __m512i h = _mm512_add_epi64(
                  _mm512_set1_epi64(h0), _mm512_mullo_epi64(_mm512_cvtepi32_epi64(ti8),
                                                            _mm512_set1_epi64(s.dil_h)));
              const __m512i ow = _mm512_add_epi64(_mm512_set1_epi64(q + 8 * half), lane);
              const __m512i w = _mm512_add_epi64(
                  _mm512_sub_epi64(_mm512_mullo_epi64(ow, _mm512_set1_epi64(SW)),
                                   _mm512_set1_epi64(s.pad_w)),
                  _mm512_mullo_epi64(_mm512_cvtepi32_epi64(tj8), _mm512_set1_epi64(s.dil_w)));
              const __m512i pos = _mm512_add_epi64(_mm512_mullo_epi64(h, _mm512_set1_epi64(W)), w);
              store_int64(io + 8 * half, pos, __mmask8(half ? (k >> 8) : (k & 0xFF)));
            }
          }
        }
      }
    }
  });
}

// Lanes in k whose index at p equals `tap` (uint8 compact) or base + SW * lane (int64 full).
// WHOLE: all 16 lanes are wanted and known to be in bounds (no region check).
template <bool WHOLE>
inline __mmask16 index_hits(const Region<uint8_t>& r, const uint8_t* p, __mmask16 k,
                            int32_t tap) {
  const __m128i b = WHOLE || r.holds(p, 16)
      ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
      : _mm_maskz_loadu_epi8(k, p);
  return _mm512_mask_cmpeq_epi32_mask(k, _mm512_cvtepu8_epi32(b), _mm512_set1_epi32(tap));
}
template <int SW, bool WHOLE>
inline __mmask16 index_hits(const Region<int64_t>& r, const int64_t* p, __mmask16 k,
                            int64_t base) {
  const __m512i step = _mm512_setr_epi64(0, SW, 2 * SW, 3 * SW, 4 * SW, 5 * SW, 6 * SW, 7 * SW);
  const __m512i t0 = _mm512_add_epi64(_mm512_set1_epi64(base), step);
  const __m512i t1 = _mm512_add_epi64(t0, _mm512_set1_epi64(8 * SW));
  const __mmask8 k0 = __mmask8(k & 0xFF), k1 = __mmask8(k >> 8);
  const __m512i v0 =
      WHOLE || r.holds(p, 8) ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi64(k0, p);
  const __m512i v1 = WHOLE || r.holds(p + 8, 8) ? _mm512_loadu_si512(p + 8)
                                                : _mm512_maskz_loadu_epi64(k1, p + 8);
  const __mmask8 h0 = _mm512_mask_cmpeq_epi64_mask(k0, v0, t0);
  const __mmask8 h1 = _mm512_mask_cmpeq_epi64_mask(k1, v1, t1);
  return __mmask16(h0 | (unsigned(h1) << 8));
}

// Backward NCHW: same mapping, residue classes and summation order as
// max_pool2d_backward_nchw. Per (output row, tap) the class's contributions are one pass of
// whole 16-lane blocks over an L1 row of sums (only the last block of a pass is masked), then
// sW == 2 interleaves the two classes into contiguous grad_input columns.
template <int SW, typename scalar_t, typename index_t>
void max_pool2d_backward_nchw(const scalar_t* g, const index_t* idx, scalar_t* gi,
                              const Pool2dShape& s) {
  constexpr bool kFull = std::is_same<index_t, int64_t>::value;
  const int64_t planes = s.batch * s.channels;
  const int64_t H = s.in_h, W = s.in_w, OH = s.out_h, OW = s.out_w;
  const Region<scalar_t> greg(g, planes * OH * OW);
  const Region<index_t> ireg(idx, planes * OH * OW);
  const int64_t nres = std::min<int64_t>(SW, W);
  const std::vector<std::vector<ColTap>> cls = column_classes(s);
  const CandTable rows(H, OH, s.stride_h, s.pad_h, s.dil_h, s.kernel_h);
  const RowSplit split = split_rows(planes, H, W * 4);
  const int64_t blocks = split.blocks, rows_per_block = split.rows_per_block;
  const int64_t qn = ceil_div(W, SW);          // q's of class 0 (the longest)
  const int64_t qpad = ceil_div(qn, 16) * 16 + 16;  // whole blocks from any start
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30,
                                           15, 31);

  at::parallel_for(0, planes * blocks, split.grain, [&](int64_t begin, int64_t end) {
    std::vector<float> accbuf(2 * qpad);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t pl = u / blocks, blk = u % blocks;
      const scalar_t* gp = g + pl * OH * OW;
      const index_t* ip = idx + pl * OH * OW;
      const int64_t h_end = std::min(H, (blk + 1) * rows_per_block);
      for (int64_t h = blk * rows_per_block; h < h_end; ++h) {
        const Cand* hc = rows.at(h);
        const int nh = rows.count(h);
        for (int64_t r = 0; r < nres; ++r) {
          float* acc = accbuf.data() + r * qpad;
          for (int64_t q = 0; q < qn; q += 16) _mm512_storeu_ps(acc + q, _mm512_setzero_ps());
          for (int x = 0; x < nh; ++x) {
            const int64_t oh = hc[x].o;
            for (const ColTap& ct : cls[r]) {
              const scalar_t* gq = gp + oh * OW + ct.c;  // lane q reads output column q + c
              const index_t* iq = ip + oh * OW + ct.c;
              const int32_t tap = static_cast<int32_t>(hc[x].t * s.kernel_w + ct.j);
              auto step = [&](int64_t q, __mmask16 k, auto whole) {
                __mmask16 hit;
                if constexpr (kFull) {
                  hit = index_hits<SW, whole.value>(ireg, iq + q, k, h * W + r + SW * q);
                } else {
                  hit = index_hits<whole.value>(ireg, iq + q, k, tap);
                }
                const __m512 gv = whole.value ? loadu(gq + q) : load(greg, gq + q, hit);
                const __m512 a = _mm512_loadu_ps(acc + q);
                _mm512_storeu_ps(acc + q, _mm512_mask_add_ps(a, hit, a, gv));
              };
              int64_t q = ct.q_lo;
              for (; q + 16 <= ct.q_hi; q += 16) step(q, __mmask16(0xFFFF), std::true_type{});
              if (q < ct.q_hi) step(q, head_mask(ct.q_hi - q), std::false_type{});
            }
          }
        }
        scalar_t* out_row = gi + (pl * H + h) * W;
        const float* a0 = accbuf.data();
        const float* a1 = accbuf.data() + qpad;  // zeros past class 1's end (W odd) are unused
        if (nres < SW) _mm512_storeu_ps(accbuf.data() + qpad, _mm512_setzero_ps());
        for (int64_t q0 = 0; q0 < qn; q0 += 16) {
          const __m512 v0 = _mm512_loadu_ps(a0 + q0);
          if constexpr (SW == 1) {
            stream_sum(out_row + q0, v0, head_mask(W - q0));
          } else {
            const __m512 v1 = _mm512_loadu_ps(a1 + q0);
            const int64_t w0 = 2 * q0;
            stream_sum(out_row + w0, _mm512_permutex2var_ps(v0, lo_idx, v1), head_mask(W - w0));
            stream_sum(out_row + w0 + 16, _mm512_permutex2var_ps(v0, hi_idx, v1),
                       head_mask(W - w0 - 16));
          }
        }
      }
    }
    _mm_sfence();
  });
}

// Forward channels_last: same mapping as max_pool2d_channels_last; NB * 16 channels per step
// with the running (max, index) of every lane in registers across the window's taps. Index
// lanes hold the tap number (compact) or the int32 position h * W + w (full, planes below
// 2^31 elements), widened to int64 on store.
template <int NB, typename scalar_t, PoolIndices M>
inline void cl_window(const Region<scalar_t>& reg, const scalar_t* const* taps,
                      const int32_t* tap_ids, int ntaps, int64_t c0, int64_t C, scalar_t* y,
                      void* idx_out) {
  constexpr bool IDX = M != PoolIndices::kNone;
  __m512 m[NB];
  __m512i t[NB];
  __mmask16 k[NB];
#pragma GCC unroll 4
  for (int v = 0; v < NB; ++v) {
    k[v] = head_mask(C - c0 - 16 * v);
    m[v] = load(reg, taps[0] + c0 + 16 * v, k[v]);
    t[v] = _mm512_set1_epi32(tap_ids[0]);
  }
  for (int a = 1; a < ntaps; ++a) {
    const __m512i id = _mm512_set1_epi32(tap_ids[a]);
#pragma GCC unroll 4
    for (int v = 0; v < NB; ++v) {
      const __m512 x = load(reg, taps[a] + c0 + 16 * v, k[v]);
      if constexpr (IDX) t[v] = _mm512_mask_mov_epi32(t[v], takes(x, m[v]), id);
      m[v] = combine(m[v], x);
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < NB; ++v) {
    const int64_t c = c0 + 16 * v;
    store_max(y + c, m[v], k[v]);
    if constexpr (M == PoolIndices::kCompact) {
      store_bytes(static_cast<uint8_t*>(idx_out) + c, t[v], k[v]);
    } else if constexpr (M == PoolIndices::kFull) {
      int64_t* io = static_cast<int64_t*>(idx_out) + c;
      store_int64(io, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(t[v])), __mmask8(k[v] & 0xFF));
      store_int64(io + 8, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(t[v], 1)),
                  __mmask8(k[v] >> 8));
    }
  }
}

template <typename scalar_t, PoolIndices M>
void max_pool2d_channels_last(const scalar_t* in, scalar_t* out, void* idx_ptr,
                              const Pool2dShape& s) {
  const int64_t C = s.channels, W = s.in_w;
  const Region<scalar_t> reg(in, s.batch * s.in_h * W * C);
  const int64_t taps_max = s.kernel_h * s.kernel_w;
  const size_t isz = M == PoolIndices::kCompact ? 1 : (M == PoolIndices::kFull ? 8 : 0);
  const int64_t grain = grain_for(s.out_w * s.channels * max_pool2d_taps(s));
  at::parallel_for(0, s.batch * s.out_h, grain, [&](int64_t begin, int64_t end) {
    std::vector<const scalar_t*> taps(taps_max);
    std::vector<int32_t> ids(taps_max);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t nb = u / s.out_h, oh = u % s.out_h;
      const scalar_t* xn = in + nb * s.in_h * W * C;
      const TapRange ri = tap_range(oh, s.stride_h, s.pad_h, s.dil_h, s.kernel_h, s.in_h);
      const int64_t h0 = oh * s.stride_h - s.pad_h;
      for (int64_t ow = 0; ow < s.out_w; ++ow) {
        const TapRange rj = tap_range(ow, s.stride_w, s.pad_w, s.dil_w, s.kernel_w, W);
        const int64_t w0 = ow * s.stride_w - s.pad_w;
        int n = 0;  // the window's in-input taps, row-major
        for (int64_t i = ri.lo; i < ri.hi; ++i) {
          const int64_t h = h0 + i * s.dil_h;
          for (int64_t j = rj.lo; j < rj.hi; ++j, ++n) {
            const int64_t w = w0 + j * s.dil_w;
            taps[n] = xn + (h * W + w) * C;
            ids[n] = static_cast<int32_t>(M == PoolIndices::kFull ? h * W + w
                                                                   : i * s.kernel_w + j);
          }
        }
        const int64_t o = (u * s.out_w + ow) * C;
        char* io = static_cast<char*>(idx_ptr) + o * isz;
        int64_t c0 = 0;
        for (; c0 + 64 <= C; c0 += 64) {
          cl_window<4, scalar_t, M>(reg, taps.data(), ids.data(), n, c0, C, out + o, io);
        }
        for (; c0 < C; c0 += 16) {
          cl_window<1, scalar_t, M>(reg, taps.data(), ids.data(), n, c0, C, out + o, io);
        }
      }
    }
  });
}

// Backward channels_last: same mapping as max_pool2d_backward_channels_last; the windows
// containing each pixel of an input row are listed first (grad_output / index offset and the tap
// number or position, in increasing (oh, ow)), then per pixel NB * 16 channels at a time sum the
// hits in registers.
// WHOLE: all NB * 16 channels exist (no masks, no bounds checks).
template <int NB, bool WHOLE, typename scalar_t, typename index_t>
inline void cl_gather(const Region<scalar_t>& greg, const Region<index_t>& ireg,
                      const scalar_t* g, const index_t* idx, const int64_t* offs,
                      const int32_t* taps, int n, int64_t target, int64_t c0, int64_t C,
                      scalar_t* y) {
  constexpr bool kFull = std::is_same<index_t, int64_t>::value;
  __m512 a[NB];
  __mmask16 k[NB];
#pragma GCC unroll 4
  for (int v = 0; v < NB; ++v) {
    a[v] = _mm512_setzero_ps();
    k[v] = WHOLE ? __mmask16(0xFFFF) : head_mask(C - c0 - 16 * v);
  }
  for (int e = 0; e < n; ++e) {
    const index_t* ip = idx + offs[e] + c0;
    const scalar_t* gp = g + offs[e] + c0;
#pragma GCC unroll 4
    for (int v = 0; v < NB; ++v) {
      __mmask16 hit;
      if constexpr (kFull) {
        hit = index_hits<0, WHOLE>(ireg, ip + 16 * v, k[v], target);
      } else {
        hit = index_hits<WHOLE>(ireg, ip + 16 * v, k[v], taps[e]);
      }
      const __m512 gv = WHOLE ? loadu(gp + 16 * v) : load(greg, gp + 16 * v, hit);
      a[v] = _mm512_mask_add_ps(a[v], hit, a[v], gv);
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < NB; ++v) stream_sum(y + c0 + 16 * v, a[v], k[v]);
}

template <typename scalar_t, typename index_t>
void max_pool2d_backward_channels_last(const scalar_t* g, const index_t* idx, scalar_t* gi,
                                       const Pool2dShape& s) {
  const int64_t C = s.channels, W = s.in_w;
  const int64_t out_numel = s.batch * s.out_h * s.out_w * C;
  const Region<scalar_t> greg(g, out_numel);
  const Region<index_t> ireg(idx, out_numel);
  const CandTable rows(s.in_h, s.out_h, s.stride_h, s.pad_h, s.dil_h, s.kernel_h);
  const CandTable cols(W, s.out_w, s.stride_w, s.pad_w, s.dil_w, s.kernel_w);
  const int64_t grain = grain_for(s.in_w * s.channels * 4);
  // every input column's windows along the row, once per call: (ow * C, column tap), and the
  // offset of each column's first entry in them
  std::vector<int64_t> col_off;
  std::vector<int32_t> col_tap;
  std::vector<int64_t> col_first(W + 1, 0);
  for (int64_t w = 0; w < W; ++w) {
    for (int z = 0; z < cols.count(w); ++z) {
      col_off.push_back(cols.at(w)[z].o * C);
      col_tap.push_back(static_cast<int32_t>(cols.at(w)[z].t));
    }
    col_first[w + 1] = static_cast<int64_t>(col_off.size());
  }
  at::parallel_for(0, s.batch * s.in_h, grain, [&](int64_t begin, int64_t end) {
    // the windows of every pixel of one input row, in increasing (oh, ow): pixel w's are the
    // next nh * (its column count) entries. Listed for the whole row before any pixel is summed
    // (per pixel, listing and summing alternated and the sums waited on the list just written:
    // same-process A/B, 3x3 s2 C=64 112x112 N=8: backward 1.25-1.53 -> 0.96-1.12 ms,
    // fwd+bwd 2.89-3.09 -> 2.38-2.47 ms).
    std::vector<int64_t> offs(col_off.size() * s.kernel_h);
    std::vector<int32_t> taps(col_off.size() * s.kernel_h);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t nb = u / s.in_h, h = u % s.in_h;
      const Cand* hc = rows.at(h);
      const int nh = rows.count(h);
      const int64_t base = nb * s.out_h * s.out_w * C;
      int64_t n = 0;
      for (int64_t w = 0; w < W; ++w) {
        for (int x = 0; x < nh; ++x) {
          const int64_t row_off = base + hc[x].o * s.out_w * C;
          const int32_t row_tap = static_cast<int32_t>(hc[x].t * s.kernel_w);
          for (int64_t z = col_first[w]; z < col_first[w + 1]; ++z, ++n) {
            offs[n] = row_off + col_off[z];
            taps[n] = row_tap + col_tap[z];
          }
        }
      }
      int64_t e = 0;  // pixel w's first entry
      for (int64_t w = 0; w < W; ++w) {
        const int64_t* po = offs.data() + e;
        const int32_t* pt = taps.data() + e;
        const int cnt = nh * static_cast<int>(col_first[w + 1] - col_first[w]);
        e += cnt;
        const int64_t target = h * W + w;
        scalar_t* y = gi + (u * W + w) * C;
        int64_t c0 = 0;
        for (; c0 + 64 <= C; c0 += 64) {
          cl_gather<4, true>(greg, ireg, g, idx, po, pt, cnt, target, c0, C, y);
        }
        for (; c0 + 16 <= C; c0 += 16) {
          cl_gather<1, true>(greg, ireg, g, idx, po, pt, cnt, target, c0, C, y);
        }
        if (c0 < C) {
          cl_gather<1, false>(greg, ireg, g, idx, po, pt, cnt, target, c0, C, y);
        }
      }
    }
    _mm_sfence();
  });
}

}  // namespace simd
#endif  // FASTCONV_MP_AVX512

// ------------------------------------------------------------------------------------------
// Entry points
// ------------------------------------------------------------------------------------------

template <typename scalar_t, PoolIndices M>
void forward_nchw_dispatch(const scalar_t* x, scalar_t* y, void* ip, const Pool2dShape& s) {
#ifdef FASTCONV_MP_AVX512
  if constexpr (std::is_same<at::opmath_type<scalar_t>, float>::value) {
    if (s.stride_w == 2) {
      if (s.kernel_w == 3) return simd::max_pool2d_nchw<2, 3, scalar_t, M>(x, y, ip, s);
      if (s.kernel_w == 2) return simd::max_pool2d_nchw<2, 2, scalar_t, M>(x, y, ip, s);
      return simd::max_pool2d_nchw<2, 0, scalar_t, M>(x, y, ip, s);
    }
    if (s.stride_w == 1) {
      if (s.kernel_w == 3) return simd::max_pool2d_nchw<1, 3, scalar_t, M>(x, y, ip, s);
      return simd::max_pool2d_nchw<1, 0, scalar_t, M>(x, y, ip, s);
    }
  }
#endif
  if (s.kernel_w == 3 && s.stride_w == 2) {
    max_pool2d_nchw<3, 2, scalar_t, M>(x, y, ip, s);
  } else if (s.kernel_w == 2 && s.stride_w == 2) {
    max_pool2d_nchw<2, 2, scalar_t, M>(x, y, ip, s);
  } else if (s.kernel_w == 3 && s.stride_w == 1) {
    max_pool2d_nchw<3, 1, scalar_t, M>(x, y, ip, s);
  } else {
    max_pool2d_nchw<0, 0, scalar_t, M>(x, y, ip, s);
  }
}

template <typename scalar_t, typename index_t>
void backward_nchw_dispatch(const scalar_t* g, const index_t* ix, scalar_t* gi,
                            const Pool2dShape& s) {
#ifdef FASTCONV_MP_AVX512
  if constexpr (std::is_same<at::opmath_type<scalar_t>, float>::value) {
    if (s.stride_w == 1) return simd::max_pool2d_backward_nchw<1>(g, ix, gi, s);
    if (s.stride_w == 2) return simd::max_pool2d_backward_nchw<2>(g, ix, gi, s);
  }
#endif
  max_pool2d_backward_nchw<scalar_t, index_t>(g, ix, gi, s);
}

template <typename scalar_t, typename index_t>
void backward_channels_last_dispatch(const scalar_t* g, const index_t* ix, scalar_t* gi,
                                     const Pool2dShape& s) {
#ifdef FASTCONV_MP_AVX512
  if constexpr (std::is_same<at::opmath_type<scalar_t>, float>::value) {
    return simd::max_pool2d_backward_channels_last(g, ix, gi, s);
  }
#endif
  max_pool2d_backward_channels_last<scalar_t, index_t>(g, ix, gi, s);
}

template <typename scalar_t, PoolIndices M>
void forward_impl(const at::Tensor& x, at::Tensor& out, at::Tensor& idx, const Pool2dShape& s,
                  bool channels_last, bool degenerate) {
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = out.mutable_data_ptr<scalar_t>();
  void* ip = M == PoolIndices::kNone ? nullptr : idx.mutable_data_ptr();
  if (degenerate) {
    max_pool2d_scalar<scalar_t, M>(xp, yp, ip, s, x.stride(0), x.stride(1), x.stride(2),
                                   x.stride(3), out.stride(0), out.stride(1), out.stride(2),
                                   out.stride(3));
  } else if (channels_last) {
#ifdef FASTCONV_MP_AVX512
    if constexpr (std::is_same<at::opmath_type<scalar_t>, float>::value) {
      if (M != PoolIndices::kFull || s.in_h * s.in_w <= std::numeric_limits<int32_t>::max()) {
        return simd::max_pool2d_channels_last<scalar_t, M>(xp, yp, ip, s);
      }
    }
#endif
    max_pool2d_channels_last<scalar_t, M>(xp, yp, ip, s);
  } else {
    forward_nchw_dispatch<scalar_t, M>(xp, yp, ip, s);
  }
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_forward_cpu(
    const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode, c10::string_view indices) {
  PoolIndices mode = parse_pool_indices(kFwdOp, indices);
  check_dtype(kFwdOp, "input", input);
  const Pool2dShape s = check_max_pool2d_shapes(kFwdOp, input.sizes(), kernel_size, stride,
                                                padding, dilation, ceil_mode);
  if (mode == PoolIndices::kCompact && !max_pool2d_compact_fits(s)) mode = PoolIndices::kFull;
  const auto fmt = input.suggest_memory_format();
  const std::vector<int64_t> out_shape{s.batch, s.channels, s.out_h, s.out_w};
  at::Tensor out = at::empty(out_shape, input.options().memory_format(fmt));
  advise_huge_pages(out);
  at::Tensor idx;
  if (mode == PoolIndices::kNone) {
    idx = at::empty({0}, input.options().dtype(at::kLong));
  } else {
    const auto idt = mode == PoolIndices::kCompact ? at::kByte : at::kLong;
    idx = at::empty(out_shape, input.options().dtype(idt).memory_format(fmt));
    advise_huge_pages(idx);
  }
  if (out.numel() == 0) return {out, idx};

  const at::Tensor x = input.contiguous(fmt);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const bool degenerate =
      has_empty_window(s.out_h, s.stride_h, s.pad_h, s.dil_h, s.kernel_h, s.in_h) ||
      has_empty_window(s.out_w, s.stride_w, s.pad_w, s.dil_w, s.kernel_w, s.in_w);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "max_pool2d_cpu", [&] {
    switch (mode) {
      case PoolIndices::kNone:
        forward_impl<scalar_t, PoolIndices::kNone>(x, out, idx, s, cl, degenerate);
        break;
      case PoolIndices::kFull:
        forward_impl<scalar_t, PoolIndices::kFull>(x, out, idx, s, cl, degenerate);
        break;
      case PoolIndices::kCompact:
        forward_impl<scalar_t, PoolIndices::kCompact>(x, out, idx, s, cl, degenerate);
        break;
    }
  });
  return {out, idx};
}

// Same checks, order and wording as _check_pool_backward_args in fastconv/_registrations.py.
void check_pool_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                              const at::Tensor& indices, const Pool2dShape& s,
                              at::IntArrayRef kernel_size) {
  const std::vector<int64_t> out_shape{s.batch, s.channels, s.out_h, s.out_w};
  TORCH_CHECK_VALUE(
      grad_output.sizes().equals(out_shape), kBwdOp,
      ": expected grad_output of shape ", at::IntArrayRef(out_shape), ", but got ",
      grad_output.sizes());
  const auto it = indices.scalar_type();
  TORCH_CHECK_VALUE(
      (it == at::kLong || it == at::kByte) && indices.sizes().equals(out_shape),
      kBwdOp, ": expected indices of shape ", at::IntArrayRef(out_shape),
      " with dtype int64 (or uint8 compact indices), but got shape ", indices.sizes(),
      " and dtype ", py_dtype(it),
      "; the forward must be called with indices='full' or 'compact' for a backward");
  TORCH_CHECK_VALUE(
      !(it == at::kByte && !max_pool2d_compact_fits(s)), kBwdOp,
      ": uint8 (compact) indices need a window of at most 256 taps, but kernel_size is ",
      kernel_size);
  TORCH_CHECK(
      indices.device() == input.device(), kBwdOp,
      ": expected indices to be on the same device as input (", input.device(), "), but got ",
      indices.device());
}

at::Tensor max_pool2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& indices,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, bool ceil_mode) {
  check_dtype(kBwdOp, "input", input);
  check_same(kBwdOp, "grad_output", grad_output, "input", input);
  const Pool2dShape s = check_max_pool2d_shapes(kBwdOp, input.sizes(), kernel_size, stride,
                                                padding, dilation, ceil_mode);
  check_pool_backward_args(grad_output, input, indices, s, kernel_size);
  const auto fmt = input.suggest_memory_format();
  at::Tensor grad_input = at::empty(input.sizes(), input.options().memory_format(fmt));
  advise_huge_pages(grad_input);
  if (grad_input.numel() == 0) return grad_input;

  const at::Tensor g = grad_output.contiguous(fmt);
  const at::Tensor ix = indices.contiguous(fmt);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g.scalar_type(), "max_pool2d_backward_cpu", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* op = grad_input.mutable_data_ptr<scalar_t>();
    if (ix.scalar_type() == at::kByte) {
      const uint8_t* ip = ix.const_data_ptr<uint8_t>();
      if (cl) {
        backward_channels_last_dispatch<scalar_t, uint8_t>(gp, ip, op, s);
      } else {
        backward_nchw_dispatch<scalar_t, uint8_t>(gp, ip, op, s);
      }
    } else {
      const int64_t* ip = ix.const_data_ptr<int64_t>();
      if (cl) {
        backward_channels_last_dispatch<scalar_t, int64_t>(gp, ip, op, s);
      } else {
        backward_nchw_dispatch<scalar_t, int64_t>(gp, ip, op, s);
      }
    }
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, CPU, m) {
  m.impl("max_pool2d", &max_pool2d_forward_cpu);
  m.impl("_max_pool2d_backward", &max_pool2d_backward_cpu);
}

}  // namespace fastconv
