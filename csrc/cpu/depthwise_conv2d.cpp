// Depthwise conv2d on CPU: forward, grad_input and grad_weight for weight (C * m, 1, kH, kW),
// where output channel c * m + k reads input channel c (torch's groups == C semantics).
//
// Two layouts, picked by conv_memory_format() (the output's format):
//
// NCHW  One task per (n, c) plane (at::parallel_for). The plane is copied once into a
//       thread-local zero-padded buffer (converting bfloat16 to float on the way), with its
//       columns split into `stride_w` phases so that every tap reads a contiguous run of the
//       buffer whatever the stride. The kernels then have no border branches at all and their
//       inner loop runs along an output row (unit stride, vectorised). The buffer (a few tens
//       of KiB for typical feature maps) stays in L1/L2, so DRAM sees the input once and the
//       output once: the forward is bound by memory bandwidth for k <= 5 and by loads from L1
//       for k = 7.
// NHWC  One task per (n, output row) (grad_weight: per fixed chunk of rows). The inner loop runs
//       over a block of V channels (V = one 64-byte vector, then V/2, then 1 for the tail), the
//       taps unrolled around it; weights are pre-transposed to (k, tap, c) so they load as
//       vectors too. Channel multiplier m > 1 is handled in a "k-major" channel order
//       (index k * C + c): the output is written k-major and permuted once at the end, and
//       grad_output is permuted to k-major up front, so every inner loop stays contiguous.
//
// Kernel sizes 3, 5 and 7 (square) are compiled as templates with the taps unrolled; every
// other size (1..31, non-square) runs the same loop structure with runtime tap counts.
//
// Backward is deterministic: grad_input gathers, for each input pixel, the grad_output taps
// that reach it (the flipped kernel; for stride > 1 split into stride phases, each a small
// dense correlation); grad_weight accumulates all kH * kW tap sums while streaming each input
// row once, per (batch chunk, channel) or per row chunk, and combines the partial sums in a
// fixed order that depends only on the shape.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

// GCC 12 flags the deliberately undefined operand inside its own AVX-512 intrinsics
// (_mm512_undefined_*, reached through fc_shift16's valignd) as "used uninitialized" once they
// are inlined here (~350 warnings per build), and gw_plane_taps's shifted-vector array gs as
// "maybe uninitialized" (its static_for writes every tap the loop below reads, which GCC does
// not follow). max_pool2d.cpp silences the same.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "common/checks.h"
#include "common/depthwise_backward.h"
#include "common/shape.h"
#include "cpu/depthwise_fast.h"
#include "cpu/kernels.h"
#include "cpu/memory_hints.h"
#include "cpu/static_for.h"

#if defined(__clang__)
#define FC_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#define FC_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define FC_IVDEP _Pragma("GCC ivdep")
#define FC_UNROLL _Pragma("GCC unroll 32")
#else
#define FC_IVDEP
#define FC_UNROLL
#endif

namespace fastconv {
namespace {

using at::Tensor;


// Elements of T in one 64-byte vector (the channel block of the NHWC kernels and the lane count
// of the grad_weight accumulators).
template <typename T>
constexpr int kLanes = 64 / static_cast<int>(sizeof(T));

// GCC/Clang vector extensions: the NCHW kernels spell their vectors out (auto-vectorising the
// fully unrolled tap loops made GCC keep one spilled pointer per tap).
template <typename T, int V>
struct VecOf {
  typedef T type __attribute__((vector_size(sizeof(T) * V)));
};
template <typename T, int V>
using vec_t = typename VecOf<T, V>::type;
template <typename T>
struct MaskInt;
template <>
struct MaskInt<float> {
  using type = int32_t;
};
template <>
struct MaskInt<double> {
  using type = int64_t;
};

template <int V, typename T>
inline vec_t<T, V> vload(const T* p) {
  vec_t<T, V> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <int V, typename T>
inline void vstore(T* p, const vec_t<T, V>& v) {
  __builtin_memcpy(p, &v, sizeof(v));
}
template <int V, typename T>
inline vec_t<T, V> vsplat(T x) {
  return vec_t<T, V>{} + x;
}
// Lanes [0, n) of v, zeros elsewhere.
template <int V, typename T>
inline vec_t<T, V> vkeep(const vec_t<T, V>& v, int64_t n) {
  using I = typename MaskInt<T>::type;
  vec_t<I, V> lane;
  for (int l = 0; l < V; ++l) lane[l] = l;
  return (lane < static_cast<I>(n)) ? v : vec_t<T, V>{};
}

inline int64_t div_floor(int64_t a, int64_t b) {  // b > 0
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}
inline int64_t div_ceil(int64_t a, int64_t b) { return -div_floor(-a, b); }
inline int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return std::min(std::max(v, lo), hi); }

// Prefetches [b, b + bytes) a few lines per next() call, spread evenly over `steps` calls: a
// kernel calls it once per inner iteration so the requests trickle out alongside its FMAs
// instead of queueing up behind each other in one burst. Into L1, like prefetch_slice.
struct PrefetchStream {
  const char* p = nullptr;
  const char* end = nullptr;
  int64_t per = 0;
  PrefetchStream() = default;
  PrefetchStream(const char* b, int64_t bytes, int64_t steps)
      : p(b), end(b + bytes), per(steps > 0 ? ((bytes / steps + 63) & ~int64_t(63)) + 64 : 0) {}
  void next() {
    const char* e = std::min(end, p + per);
    for (; p < e; p += 64) {
      __builtin_prefetch(p, 0, 3);
      asm volatile("");
    }
  }
};

template <typename acc_t, typename scalar_t>
std::vector<acc_t> to_acc_vector(const Tensor& t) {
  const Tensor c = t.contiguous();
  const scalar_t* p = c.data_ptr<scalar_t>();
  std::vector<acc_t> v(static_cast<size_t>(c.numel()));
  for (int64_t i = 0; i < c.numel(); ++i) v[i] = static_cast<acc_t>(p[i]);
  return v;
}

template <typename acc_t, typename scalar_t>
std::vector<acc_t> bias_vector(const c10::optional<Tensor>& bias, int64_t oc) {
  if (bias.has_value() && bias->defined()) return to_acc_vector<acc_t, scalar_t>(*bias);
  return std::vector<acc_t>(static_cast<size_t>(oc), acc_t(0));
}

// ============================================================================================
// NCHW: padded plane buffer + row kernels
// ============================================================================================

// A zero-padded copy of one (H, W) plane: buf[r][x] = src[r - row_off][x - col_off] (zero
// outside the source and for x >= used_cols; see fill_plane), with column x stored at phase x % phases,
// position x / phases, so a stride-`phases` walk along a row becomes a unit-stride walk.
struct PlaneBuf {
  int64_t rows = 0, used_cols = 0, phases = 1, phase_len = 0, pitch = 0;
  int64_t row_off = 0, col_off = 0;
  // the last partial vector of a row may load up to V - 1 <= 15 elements past the end, the
  // AVX-512 row kernel up to 31 (one aligned vector past its last, partial one)
  int64_t size() const { return rows * pitch + 32; }
};

// Row pitch of a one-phase buffer: a whole number of 64-byte lines, so that every row of an
// aligned buffer starts aligned.
inline int64_t line_pitch(int64_t cols) { return (cols + 15) / 16 * 16; }

// Scratch memory whose data() is 64-byte aligned (the AVX-512 row kernel loads aligned).
template <typename T>
class AlignedScratch {
 public:
  explicit AlignedScratch(int64_t n) : v_(static_cast<size_t>(n) + 64 / sizeof(T)) {
    const auto a = reinterpret_cast<uintptr_t>(v_.data());
    p_ = reinterpret_cast<T*>((a + 63) & ~uintptr_t(63));
  }
  T* data() { return p_; }

 private:
  std::vector<T> v_;
  T* p_;
};

// NCHW outputs of at least kStreamingStoreBytes are computed plane by plane into an aligned
// scratch plane (L1) and then written with streaming stores. Needs every plane 64-byte aligned.
template <typename T>
inline bool stream_planes(const T* base, int64_t plane_elems, int64_t total_elems) {
#if defined(__AVX512F__)
  return std::is_same<T, float>::value &&
         stream_output(base, total_elems * static_cast<int64_t>(sizeof(T))) &&
         (plane_elems * static_cast<int64_t>(sizeof(T))) % 64 == 0;
#else
  (void)base, (void)plane_elems, (void)total_elems;
  return false;
#endif
}

// The streaming output of one thread's NCHW planes, double-buffered: a task computes its plane
// into one aligned scratch plane while the previous task's plane, in the other, is streamed out
// by the kernel's Trickle, a slice per block (see Trickle for why not in one burst at the end).
// Off (stream_planes false): the kernel writes the output plane directly.
class PlaneStreamer {
 public:
  PlaneStreamer(bool on, int64_t plane) : on_(on), plane_(plane), buf_(on ? 2 * plane : 0) {}
  // Where to compute the output plane `dst`; `tr` takes over streaming the previous one.
  template <typename T>
  T* begin(T* dst, Trickle& tr) {
    if (!on_) return dst;
    if (prev_ != nullptr) tr.stream(prev_, scratch(slot_ ^ 1), plane_);
    cur_ = reinterpret_cast<float*>(dst);
    return reinterpret_cast<T*>(scratch(slot_));
  }
  // After the kernel: completes the previous plane's copy.
  void end(const Trickle& tr) {
    if (!on_) return;
    tr.finish();
    prev_ = cur_;
    slot_ ^= 1;
  }
  // After the thread's last plane.
  void flush() {
    if (!on_) return;
    if (prev_ != nullptr) stream_copy(prev_, scratch(slot_ ^ 1), 0, plane_);
    prev_ = nullptr;
    nt_fence();
  }

 private:
  float* scratch(int slot) { return buf_.data() + slot * plane_; }
  bool on_;
  int64_t plane_;
  AlignedScratch<float> buf_;
  float* prev_ = nullptr;  // output plane waiting in scratch(slot_ ^ 1)
  float* cur_ = nullptr;
  int slot_ = 0;
};

// Copies one plane into its PlaneBuf layout, writing only the elements that come from the
// image. Everything else in the buffer (padding rows and columns, the slack) must already be
// zero: callers allocate it zeroed (AlignedScratch) once per geometry and only ever fill it
// through this function with the same PlaneBuf, so those elements stay zero. Rewriting the
// padding for every plane (as this once did, in short memset calls per row) made the copy
// three times slower than the plane's memcpy.
template <typename scalar_t, typename acc_t>
void fill_plane(const scalar_t* src, int64_t H, int64_t W, const PlaneBuf& b, acc_t* buf) {
  const int64_t P = b.phases;
  const int64_t x_end = std::min(W + b.col_off, b.used_cols);
  const int64_t r0 = std::max<int64_t>(0, b.row_off), r1 = std::min(b.rows, H + b.row_off);
  if (P == 1) {  // the common case, without the per-phase divisions
    const int64_t q0 = clamp64(b.col_off, 0, b.phase_len), q1 = clamp64(x_end, q0, b.phase_len);
    for (int64_t r = r0; r < r1; ++r) {
      acc_t* d = buf + r * b.pitch + q0;
      const scalar_t* sp = src + (r - b.row_off) * W + (q0 - b.col_off);
      for (int64_t q = 0; q < q1 - q0; ++q) d[q] = static_cast<acc_t>(sp[q]);
    }
    return;
  }
  for (int64_t p = 0; p < P; ++p) {
    const int64_t q0 = clamp64(div_ceil(b.col_off - p, P), 0, b.phase_len);
    const int64_t q1 = clamp64(div_ceil(x_end - p, P), q0, b.phase_len);
    for (int64_t r = r0; r < r1; ++r) {
      acc_t* d = buf + r * b.pitch + p * b.phase_len;
      const scalar_t* sp = src + (r - b.row_off) * W + (q0 * P + p - b.col_off);
      for (int64_t q = q0; q < q1; ++q) d[q] = static_cast<acc_t>(sp[(q - q0) * P]);
    }
  }
}

// out[r][j] (=|+=) init + sum_{kh, kw} w[kh][kw] * buf[(r * row_step + rowofs[kh]) * pitch +
// colofs[kw] + j] for r < rows, j < cols. Thread: the caller's plane. Loop: rows, then
// vectors of V output columns two at a time (two independent FMA chains), taps innermost;
// KH = KW = 0 means runtime tap counts (same loop, not unrolled). Each tap costs one unaligned
// load and one FMA per vector, the weight is a broadcast shared by both vectors. The last
// partial vector reads past the row end (the buffer has V elements of slack) and stores only
// its valid lanes. UNIT: colofs[kw] == colofs[0] + kw (stride 1 and dilation 1 along W), so
// the offsets are constants and only KH row pointers are live. Bound: L1 loads / FMA issue
// for k >= 5, DRAM bandwidth (input + output once) below that.
template <int KH, int KW, bool UNIT, bool ACCUM, typename T>
void conv_rows_impl(const T* buf, int64_t pitch, int64_t row_step, const int64_t* rowofs,
                    int64_t nkh, const int64_t* colofs, int64_t nkw, const T* wts, T init, T* out,
                    int64_t out_pitch, int64_t rows, int64_t cols, const Trickle& pf) {
  constexpr int V = kLanes<T>;
  using vec = vec_t<T, V>;
  constexpr bool kFixed = KH > 0;
  const int64_t nh = kFixed ? KH : nkh, nw = kFixed ? KW : nkw;
  std::vector<T> wdyn(kFixed ? 0 : nh * nw);
  std::vector<int64_t> codyn(kFixed ? 0 : nw);
  std::vector<const T*> rpdyn(kFixed ? 0 : nh);
  T wfix[kFixed ? KH * KW : 1];
  int64_t cofix[kFixed ? KW : 1];
  const T*  rpfix[kFixed ? KH : 1];
  T* w = kFixed ? wfix : wdyn.data();
  int64_t* co = kFixed ? cofix : codyn.data();
  const T** rp = kFixed ? rpfix : rpdyn.data();
  for (int64_t t = 0; t < nh * nw; ++t) w[t] = wts[t];
  for (int64_t kw = 0; kw < nw; ++kw) co[kw] = colofs[kw] - colofs[0];

  // acc[u] += sum over taps of w * buf[..., j + u * VW + lane]
  auto taps = [&](auto vw, auto u_count, auto* acc, int64_t j) {
    constexpr int VW = decltype(vw)::value;
    constexpr int U = decltype(u_count)::value;
    if constexpr (kFixed) {
      FC_UNROLL
      for (int kh = 0; kh < KH; ++kh) {
        const T* r = rp[kh] + j;
        FC_UNROLL
        for (int kw = 0; kw < KW; ++kw) {
          const T* p = r + (UNIT ? kw : co[kw]);
          const T wt = w[kh * KW + kw];
          for (int u = 0; u < U; ++u) acc[u] += wt * vload<VW>(p + u * VW);
        }
      }
    } else {
      for (int64_t kh = 0; kh < nh; ++kh) {
        const T* r = rp[kh] + j;
        for (int64_t kw = 0; kw < nw; ++kw) {
          const T* p = r + co[kw];
          const T wt = w[kh * nw + kw];
          for (int u = 0; u < U; ++u) acc[u] += wt * vload<VW>(p + u * VW);
        }
      }
    }
  };
  constexpr int H = V / 2;  // a half vector finishes rows like 56 = 2 * 16 + 16 + 8 exactly
  using hvec = vec_t<T, H>;
  using IV = std::integral_constant<int, V>;
  using IH = std::integral_constant<int, H>;
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;

  for (int64_t r = 0; r < rows; ++r) {
    pf.part(r, rows);
    for (int64_t kh = 0; kh < nh; ++kh) rp[kh] = buf + (r * row_step + rowofs[kh]) * pitch + colofs[0];
    T* o = out + r * out_pitch;
    int64_t j = 0;
    for (; j + 2 * V <= cols; j += 2 * V) {
      vec acc[2];
      acc[0] = ACCUM ? vload<V>(o + j) : vsplat<V>(init);
      acc[1] = ACCUM ? vload<V>(o + j + V) : vsplat<V>(init);
      taps(IV(), I2(), acc, j);
      vstore<V>(o + j, acc[0]);
      vstore<V>(o + j + V, acc[1]);
    }
    for (; j + V <= cols; j += V) {
      vec acc[1] = {ACCUM ? vload<V>(o + j) : vsplat<V>(init)};
      taps(IV(), I1(), acc, j);
      vstore<V>(o + j, acc[0]);
    }
    if (j + H <= cols) {
      hvec acc[1] = {ACCUM ? vload<H>(o + j) : vsplat<H>(init)};
      taps(IH(), I1(), acc, j);
      vstore<H>(o + j, acc[0]);
      j += H;
    }
    if (j < cols) {
      const int64_t rem = cols - j;
      hvec acc[1] = {vsplat<H>(init)};
      if (ACCUM) {
        for (int64_t l = 0; l < rem; ++l) acc[0][l] = o[j + l];
      }
      taps(IH(), I1(), acc, j);
      for (int64_t l = 0; l < rem; ++l) o[j + l] = acc[0][l];
    }
  }
}

#if defined(__AVX512F__)
// Register-blocked float kernel for the common case: KH x KW taps (3, 5 or 7) with unit row
// and column offsets (stride 1 and dilation 1: the forward of such a conv and every stride-1
// grad_input), a 64-byte aligned buffer whose pitch is a multiple of 16. R output rows and U
// vectors of 16 columns are computed together. Each input row is read with U + 1 aligned loads;
// the KW column shifts are made in registers (valignd) instead of by unaligned loads, which
// straddle two cache lines 15 times in 16 and had made the old kernel load-bound; each shifted
// vector then feeds the accumulators of up to KH output rows, with the weight as an embedded
// broadcast. The last vector may be partial: masked stores (and loads when accumulating); its
// loads read past the row into the next row or the buffer's slack (see PlaneBuf::size).
template <int S>
inline __m512 fc_shift(__m512 lo, __m512 hi) {
  if constexpr (S == 0) {
    return lo;
  } else {
    return _mm512_castsi512_ps(
        _mm512_alignr_epi32(_mm512_castps_si512(hi), _mm512_castps_si512(lo), S));
  }
}

template <int KH, int KW, bool ACCUM, int R, int U>
__attribute__((noinline)) void conv_block_avx512(const float* base, int64_t pitch,
                                                 const float* w, float init, float* o,
                                                 int64_t out_pitch, int64_t valid) {
  static_assert(KW <= 16, "column shifts must stay within one vector");
  const __mmask16 last =
      valid >= 16 * U ? __mmask16(0xFFFF) : __mmask16((1u << (valid - 16 * (U - 1))) - 1u);
  __m512 acc[R][U];
  for (int r = 0; r < R; ++r) {
    for (int u = 0; u < U; ++u) {
      float* d = o + r * out_pitch + u * 16;
      if (ACCUM)
        acc[r][u] = u + 1 < U ? _mm512_loadu_ps(d) : _mm512_maskz_loadu_ps(last, d);
      else
        acc[r][u] = _mm512_set1_ps(init);
    }
  }
  FC_UNROLL
  for (int i = 0; i < R + KH - 1; ++i) {
    const float* src = base + i * pitch;
    __m512 a[U + 1];
    FC_UNROLL
    for (int u = 0; u <= U; ++u) a[u] = _mm512_load_ps(src + u * 16);
    // a fresh weight pointer per input row: keeps GCC from hoisting every tap's broadcast into
    // a register of its own (49 for 7x7) and spilling them
    const float* wi = w;
    asm("" : "+r"(wi));
    static_for<KW>([&](auto kwc) {
      constexpr int kw = decltype(kwc)::value;
      __m512 xs[U];
      FC_UNROLL
      for (int u = 0; u < U; ++u) xs[u] = fc_shift<kw>(a[u], a[u + 1]);
      FC_UNROLL
      for (int r = 0; r < R; ++r) {
        const int kh = i - r;
        if (kh < 0 || kh >= KH) continue;
        const __m512 wv = _mm512_set1_ps(wi[kh * KW + kw]);
        FC_UNROLL
        for (int u = 0; u < U; ++u) acc[r][u] = _mm512_fmadd_ps(xs[u], wv, acc[r][u]);
      }
    });
  }
  for (int r = 0; r < R; ++r) {
    for (int u = 0; u < U; ++u) {
      float* d = o + r * out_pitch + u * 16;
      if (u + 1 < U)
        _mm512_storeu_ps(d, acc[r][u]);
      else
        _mm512_mask_storeu_ps(d, last, acc[r][u]);
    }
  }
}

template <int KH, int KW, bool ACCUM, int R>
inline void conv_block_cols(const float* base, int64_t pitch, const float* w, float init,
                            float* o, int64_t out_pitch, int64_t cols) {
  int64_t j = 0;
  for (; j + 64 < cols; j += 64)  // a partial chunk of 4 vectors is left to the switch
    conv_block_avx512<KH, KW, ACCUM, R, 4>(base + j, pitch, w, init, o + j, out_pitch, 64);
  const int64_t rem = cols - j, vectors = (rem + 15) / 16;  // 1..4 (0: nothing left)
  static_for<4>([&](auto uc) {
    constexpr int U = decltype(uc)::value + 1;
    if (vectors == U)
      conv_block_avx512<KH, KW, ACCUM, R, U>(base + j, pitch, w, init, o + j, out_pitch, rem);
  });
}

template <int KH, int KW, bool ACCUM>
void conv_rows_avx512(const float* buf, int64_t pitch, int64_t row0, const float* w, float init,
                      float* out, int64_t out_pitch, int64_t rows, int64_t cols,
                      const Trickle& pf) {
  constexpr int R = 4;
  const float* base = buf + row0 * pitch;
  const int64_t nblk = (rows + R - 1) / R;
  int64_t r = 0;
  for (int64_t b = 0; r + R <= rows; r += R, ++b) {
    pf.part(b, nblk);
    conv_block_cols<KH, KW, ACCUM, R>(base + r * pitch, pitch, w, init, out + r * out_pitch,
                                      out_pitch, cols);
  }
  pf.part(nblk - 1, nblk);
  for (; r + 2 <= rows; r += 2)
    conv_block_cols<KH, KW, ACCUM, 2>(base + r * pitch, pitch, w, init, out + r * out_pitch,
                                      out_pitch, cols);
  if (r < rows)
    conv_block_cols<KH, KW, ACCUM, 1>(base + r * pitch, pitch, w, init, out + r * out_pitch,
                                      out_pitch, cols);
}

// grad_weight of one NCHW plane, float, stride 1, dilation 1, square K (3, 5, 7), AVX-512:
// accv[(kh * K + kw) * 16 + lane] += lane partials of sum_{oh, ow} go[oh][ow] * x[oh + kh][ow + kw]
// with x the padded input plane (aligned rows of `pitch` floats) and gb the grad_output plane
// copied to aligned rows of `gpitch` floats at column offset 16, zeros around it. Substituting
// j = ow + kw makes every x load aligned and moves the column shift onto grad_output: the
// shifted grad_output row of tap column kw (one valignd per vector) then serves all K kernel
// rows. Taps kw, kw + 1 are done together (2K accumulators; each x vector feeds both). Lanes
// whose product the true sum does not contain (j outside [kw, kw + OW)) are masked out of the
// FMA, so an inf or nan there cannot leak in as 0 * inf.
template <int S>
inline __m512 fc_shift16(__m512 lo, __m512 hi) {  // S in [0, 16]
  if constexpr (S == 16)
    return hi;
  else
    return fc_shift<S>(lo, hi);
}

// Tap columns per pass: all three for 3x3 (9 accumulators), two for 5x5 and 7x7 (the register
// budget). One pass over the rows less for 3x3: NCHW grad_weight 0.70 -> 0.63 ms warm (N=8,
// C=144, 56x56).
template <int K>
constexpr int kGwTaps = K == 3 ? 3 : 2;

template <int K, int NW, int U>
__attribute__((noinline)) void gw_plane_taps(const float* x, int64_t pitch, const float* gb,
                                             int64_t gpitch, int64_t OH, int64_t OW, int kw0,
                                             float* accv, const Trickle& pf) {
  // the passes of gw_plane_avx512_u: pf is spread over all their rows
  constexpr int64_t passes = (K + kGwTaps<K> - 1) / kGwTaps<K>;
  __mmask16 mask[NW][U];
  for (int t = 0; t < NW; ++t) {
    for (int u = 0; u < U; ++u) {
      uint32_t m = 0;
      for (int l = 0; l < 16; ++l) {
        const int64_t j = 16 * u + l;
        if (j >= kw0 + t && j < kw0 + t + OW) m |= 1u << l;
      }
      mask[t][u] = static_cast<__mmask16>(m);
    }
  }
  __m512 acc[NW][K];
  for (int t = 0; t < NW; ++t)
    for (int kh = 0; kh < K; ++kh) acc[t][kh] = _mm512_setzero_ps();
  for (int64_t oh = 0; oh < OH; ++oh) {
    pf.part(kw0 / kGwTaps<K> * OH + oh, passes * OH);
    const float* grow = gb + oh * gpitch;
    __m512 g[U + 1];
    for (int u = 0; u <= U; ++u) g[u] = _mm512_load_ps(grow + 16 * u);
    __m512 gs[NW][U];
    // tap column kw needs grad_output column j - kw: lanes 16 - kw.. of the pair (u, u + 1)
    static_for<K>([&](auto kwc) {
      constexpr int kw = decltype(kwc)::value;
      if (kw < kw0 || kw >= kw0 + NW) return;
      for (int u = 0; u < U; ++u) gs[kw - kw0][u] = fc_shift16<16 - kw>(g[u], g[u + 1]);
    });
    for (int kh = 0; kh < K; ++kh) {
      const float* xr = x + (oh + kh) * pitch;
      for (int u = 0; u < U; ++u) {
        const __m512 xv = _mm512_load_ps(xr + 16 * u);
        for (int t = 0; t < NW; ++t)
          acc[t][kh] = _mm512_mask3_fmadd_ps(gs[t][u], xv, acc[t][kh], mask[t][u]);
      }
    }
  }
  for (int t = 0; t < NW; ++t) {
    for (int kh = 0; kh < K; ++kh) {
      float* d = accv + (kh * K + kw0 + t) * 16;
      _mm512_storeu_ps(d, _mm512_add_ps(_mm512_loadu_ps(d), acc[t][kh]));
    }
  }
}

template <int K, int U>
void gw_plane_avx512_u(const float* x, int64_t pitch, const float* gb, int64_t gpitch,
                       int64_t OH, int64_t OW, float* accv, const Trickle& pf) {
  constexpr int NW = kGwTaps<K>;
  int kw = 0;
  for (; kw + NW <= K; kw += NW)
    gw_plane_taps<K, NW, U>(x, pitch, gb, gpitch, OH, OW, kw, accv, pf);
  if (kw < K) gw_plane_taps<K, 1, U>(x, pitch, gb, gpitch, OH, OW, kw, accv, pf);
}

// U = the x vectors per row = ceil((OW + K - 1) / 16), 1..4 (OW <= 64 - K + 1); false if wider.
// pf (the next task's planes) is prefetched a slice per row, between the FMAs.
template <int K>
bool gw_plane_avx512(const float* x, int64_t pitch, const float* gb, int64_t gpitch, int64_t OH,
                     int64_t OW, float* accv, const Trickle& pf) {
  switch ((OW + K - 1 + 15) / 16) {
    case 1: gw_plane_avx512_u<K, 1>(x, pitch, gb, gpitch, OH, OW, accv, pf); return true;
    case 2: gw_plane_avx512_u<K, 2>(x, pitch, gb, gpitch, OH, OW, accv, pf); return true;
    case 3: gw_plane_avx512_u<K, 3>(x, pitch, gb, gpitch, OH, OW, accv, pf); return true;
    case 4: gw_plane_avx512_u<K, 4>(x, pitch, gb, gpitch, OH, OW, accv, pf); return true;
    default: return false;
  }
}
#endif  // __AVX512F__

// The shapes gw_plane_avx512 serves: float accumulators (checked by the callers), stride 1,
// dilation 1, square 3x3 / 5x5 / 7x7, rows up to 64 - K + 1 wide, input buffer rows of `pitch`
// floats a whole number of vectors.
inline bool gw_plane_fast_applies(const Conv2dShape& s, int64_t pitch) {
#if defined(__AVX512F__)
  const int64_t K = s.kernel_h;
  return s.stride_h == 1 && s.stride_w == 1 && s.dil_h == 1 && s.dil_w == 1 && s.kernel_w == K &&
         (K == 3 || K == 5 || K == 7) && s.out_w + K - 1 <= 64 && pitch % 16 == 0;
#else
  (void)s, (void)pitch;
  return false;
#endif
}

// The row pitch of the grad_output copy gw_plane_avx512 reads: a vector of zeros, the row, zeros
// up to a whole number of vectors.
inline int64_t shifted_pitch(int64_t OW, int64_t K) { return ((OW + K - 1 + 15) / 16 + 1) * 16; }

#if defined(__AVX512F__)
// accv += the tap sums of the grad_output plane g (OH x OW) against the padded input plane x
// (rows of `pitch`): copies g into gsh (rows of shifted_pitch at column offset 16; the rest of
// gsh is zero from its allocation and never written) and runs gw_plane_avx512. For shapes that
// gw_plane_fast_applies to.
inline void gw_plane_shifted(const float* x, int64_t pitch, const float* g, float* gsh,
                             int64_t OH, int64_t OW, int64_t K, float* accv, const Trickle& pf) {
  const int64_t gpitch = shifted_pitch(OW, K);
  for (int64_t oh = 0; oh < OH; ++oh)
    std::copy(g + oh * OW, g + (oh + 1) * OW, gsh + oh * gpitch + 16);
  with_fixed_kernel(K, [&](auto kc) {
    gw_plane_avx512<decltype(kc)::value>(x, pitch, gsh, gpitch, OH, OW, accv, pf);
  });
}
#endif

inline bool unit_cols(const int64_t* colofs, int64_t nkw) {
  for (int64_t kw = 0; kw < nkw; ++kw) {
    if (colofs[kw] != colofs[0] + kw) return false;
  }
  return true;
}

template <bool ACCUM, typename T>
void conv_rows(const T* buf, int64_t pitch, int64_t row_step, const int64_t* rowofs, int64_t nkh,
               const int64_t* colofs, int64_t nkw, const T* wts, T init, T* out,
               int64_t out_pitch, int64_t rows, int64_t cols, const Trickle& pf = Trickle()) {
  const bool unit = unit_cols(colofs, nkw);
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    bool row_unit = row_step == 1;
    for (int64_t kh = 0; kh < nkh; ++kh) row_unit = row_unit && rowofs[kh] == rowofs[0] + kh;
    if (unit && row_unit && colofs[0] == 0 && pitch % 16 == 0 &&
        reinterpret_cast<uintptr_t>(buf) % 64 == 0 && nkh == nkw &&
        with_fixed_kernel(nkh, [&](auto k) {
          conv_rows_avx512<decltype(k)::value, decltype(k)::value, ACCUM>(
              buf, pitch, rowofs[0], wts, init, out, out_pitch, rows, cols, pf);
        })) {
      return;
    }
  }
#endif
#define FC_CALL(KH_, KW_, UNIT_)                                                              \
  conv_rows_impl<KH_, KW_, UNIT_, ACCUM>(buf, pitch, row_step, rowofs, nkh, colofs, nkw, wts, \
                                         init, out, out_pitch, rows, cols, pf)
#define FC_FIXED(K)             \
  if (nkh == K && nkw == K) {   \
    if (unit)                   \
      FC_CALL(K, K, true);      \
    else                        \
      FC_CALL(K, K, false);     \
    return;                     \
  }
  FC_FIXED(3)
  FC_FIXED(5)
  FC_FIXED(7)
#undef FC_FIXED
  FC_CALL(0, 0, false);
#undef FC_CALL
}

// The buffer layout the forward and grad_weight read the input through: rows oh * sh + kh * dh,
// padded columns ow * sw + kw * dw (split into sw phases), `slack` zero columns past the end.
inline PlaneBuf input_plane_buf(const Conv2dShape& s, int64_t slack) {
  PlaneBuf b;
  b.rows = (s.out_h - 1) * s.stride_h + (s.kernel_h - 1) * s.dil_h + 1;
  b.used_cols = (s.out_w - 1) * s.stride_w + (s.kernel_w - 1) * s.dil_w + 1;
  b.phases = s.stride_w;
  b.phase_len = div_ceil(b.used_cols, b.phases) + slack;
  if (b.phases == 1) b.phase_len = line_pitch(b.phase_len);
  b.pitch = b.phases * b.phase_len;
  b.row_off = s.pad_h;
  b.col_off = s.pad_w;
  return b;
}

inline void input_tap_offsets(const Conv2dShape& s, const PlaneBuf& b,
                              std::vector<int64_t>& rowofs, std::vector<int64_t>& colofs) {
  rowofs.resize(s.kernel_h);
  colofs.resize(s.kernel_w);
  for (int64_t kh = 0; kh < s.kernel_h; ++kh) rowofs[kh] = kh * s.dil_h;
  for (int64_t kw = 0; kw < s.kernel_w; ++kw) {
    const int64_t x = kw * s.dil_w;
    colofs[kw] = (x % s.stride_w) * b.phase_len + x / s.stride_w;
  }
}

// Forward, NCHW. Task = (n, c) input plane: padded once, then all m output planes
// c * m + k computed from it with conv_rows (rows = OH, row step = stride_h).
template <typename scalar_t>
void forward_nchw(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
                  Tensor& out, const Conv2dShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSame = std::is_same<scalar_t, acc_t>::value;
  const int64_t C = s.in_channels, H = s.in_h, W = s.in_w, OC = s.out_channels;
  const int64_t m = OC / C, OH = s.out_h, OW = s.out_w, K2 = s.kernel_h * s.kernel_w;
  const auto wts = to_acc_vector<acc_t, scalar_t>(weight);
  const auto bvec = bias_vector<acc_t, scalar_t>(bias, OC);
  const PlaneBuf b = input_plane_buf(s, 0);
  std::vector<int64_t> rowofs, colofs;
  input_tap_offsets(s, b, rowofs, colofs);
  const scalar_t* x = input.data_ptr<scalar_t>();
  scalar_t* y = out.data_ptr<scalar_t>();
  const bool nt = stream_planes(y, OH * OW, out.numel());
  at::parallel_for(0, s.batch * C, 1, [&](int64_t begin, int64_t end) {
    AlignedScratch<acc_t> buf(b.size());
    std::vector<acc_t> tmp(kSame ? 0 : OH * OW);
    PlaneStreamer out(nt, OH * OW);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n = p / C, c = p % C;
      fill_plane(x + p * H * W, H, W, b, buf.data());
      for (int64_t k = 0; k < m; ++k) {
        const int64_t oc = c * m + k;
        scalar_t* yp = y + (n * OC + oc) * OH * OW;
        Trickle tr;  // the next input plane (prefetched while the first output plane is made)
        if (k == 0 && p + 1 < end) tr.add(x + (p + 1) * H * W, H * W);
        acc_t* dst;
        if constexpr (kSame) {
          dst = out.begin(yp, tr);
        } else {
          dst = tmp.data();
        }
        conv_rows<false>(buf.data(), b.pitch, s.stride_h, rowofs.data(), s.kernel_h,
                         colofs.data(), s.kernel_w, wts.data() + oc * K2, bvec[oc], dst, OW, OH,
                         OW, tr);
        if constexpr (!kSame) {
          for (int64_t i = 0; i < OH * OW; ++i) yp[i] = static_cast<scalar_t>(tmp[i]);
        }
        out.end(tr);
      }
    }
    out.flush();
  });
}

// The taps of one stride phase of grad_input along one dimension: input positions
// i = phase + stride * q receive grad_output[q + raw] * w[tap] for every tap with
// (phase + pad - tap * dil) divisible by stride, raw = (phase + pad - tap * dil) / stride.
// Taps are listed from the last to the first so the offsets increase (the flipped kernel).
struct PhaseTaps {
  int64_t count = 0;  // input positions in this phase
  std::vector<int64_t> taps, raw;
};

inline std::vector<PhaseTaps> phase_taps(int64_t in, int64_t out, int64_t k, int64_t stride,
                                         int64_t pad, int64_t dil, int64_t& min_raw,
                                         int64_t& max_raw_end) {
  std::vector<PhaseTaps> phases(static_cast<size_t>(std::min(stride, in)));
  min_raw = 0;
  max_raw_end = 0;
  bool any = false;
  for (int64_t ph = 0; ph < static_cast<int64_t>(phases.size()); ++ph) {
    PhaseTaps& pt = phases[ph];
    pt.count = div_ceil(in - ph, stride);
    for (int64_t t = k - 1; t >= 0; --t) {
      const int64_t num = ph + pad - t * dil;
      if (((num % stride) + stride) % stride != 0) continue;
      const int64_t raw = num / stride;
      // a tap whose rows are all outside [0, out) contributes nothing: skip it
      if (raw + pt.count - 1 < 0 || raw >= out) continue;
      pt.taps.push_back(t);
      pt.raw.push_back(raw);
      min_raw = any ? std::min(min_raw, raw) : raw;
      max_raw_end = any ? std::max(max_raw_end, raw + pt.count) : raw + pt.count;
      any = true;
    }
  }
  return phases;
}

// grad_input, NCHW, as correlations of the zero-padded grad_output plane (buffer b) with the
// taps of each stride phase.
struct GradInputPlan {
  PlaneBuf b;
  std::vector<PhaseTaps> ph_h, ph_w;
  int64_t min_h = 0, min_w = 0;

  explicit GradInputPlan(const Conv2dShape& s) {
    int64_t end_h, end_w;
    ph_h = phase_taps(s.in_h, s.out_h, s.kernel_h, s.stride_h, s.pad_h, s.dil_h, min_h, end_h);
    ph_w = phase_taps(s.in_w, s.out_w, s.kernel_w, s.stride_w, s.pad_w, s.dil_w, min_w, end_w);
    b.rows = std::max<int64_t>(end_h - min_h, 1);
    b.used_cols = std::max<int64_t>(end_w - min_w, 1);
    b.phases = 1;
    b.phase_len = line_pitch(b.used_cols);
    b.pitch = b.phase_len;
    b.row_off = -min_h;
    b.col_off = -min_w;
  }

  // The buffer offsets and weights (w: one output channel's kH x kW taps) of phase (th, tw).
  template <typename acc_t>
  void phase(const PhaseTaps& th, const PhaseTaps& tw, const acc_t* w, int64_t KW,
             std::vector<int64_t>& rowofs, std::vector<int64_t>& colofs,
             std::vector<acc_t>& wph) const {
    const int64_t nkh = static_cast<int64_t>(th.taps.size());
    const int64_t nkw = static_cast<int64_t>(tw.taps.size());
    rowofs.resize(nkh);
    colofs.resize(nkw);
    wph.resize(nkh * nkw);
    for (int64_t i = 0; i < nkh; ++i) rowofs[i] = th.raw[i] - min_h;
    for (int64_t j = 0; j < nkw; ++j) colofs[j] = tw.raw[j] - min_w;
    for (int64_t i = 0; i < nkh; ++i)
      for (int64_t j = 0; j < nkw; ++j) wph[i * nkw + j] = w[th.taps[i] * KW + tw.taps[j]];
  }
};

// grad_input, NCHW. Task = (n, c) input plane. For each k the grad_output plane c * m + k is
// copied into a zero-padded buffer; every stride phase (ph_h, ph_w) of the input plane is then
// a dense correlation of that buffer with the phase's sub-kernel (conv_rows, row step 1).
// With stride 1 there is one phase with the whole flipped kernel (the fixed 3/5/7 kernels
// apply) and it is written straight into the output plane, accumulating over k; with
// stride > 1 each phase is computed into a small buffer and interleaved into the plane.
// Every element is written by exactly one phase: no zero-fill pass, no atomics.
template <typename scalar_t>
void grad_input_nchw(const Tensor& grad_output, const Tensor& weight, Tensor& grad_input,
                     const Conv2dShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSame = std::is_same<scalar_t, acc_t>::value;
  const int64_t C = s.in_channels, H = s.in_h, W = s.in_w, OC = s.out_channels;
  const int64_t m = OC / C, OH = s.out_h, OW = s.out_w, KW = s.kernel_w;
  const int64_t K2 = s.kernel_h * s.kernel_w;
  const int64_t sh = s.stride_h, sw = s.stride_w;
  const auto wts = to_acc_vector<acc_t, scalar_t>(weight);
  const GradInputPlan plan(s);
  const PlaneBuf& b = plan.b;
  const auto& ph_h = plan.ph_h;
  const auto& ph_w = plan.ph_w;
  int64_t max_phase = 0;
  for (const auto& a : ph_h)
    for (const auto& c : ph_w) max_phase = std::max(max_phase, a.count * c.count);
  const bool direct = sh == 1 && sw == 1;
  const scalar_t* go = grad_output.data_ptr<scalar_t>();
  scalar_t* gi = grad_input.data_ptr<scalar_t>();
  const bool nt = direct && m == 1 && stream_planes(gi, H * W, grad_input.numel());
  at::parallel_for(0, s.batch * C, 1, [&](int64_t begin, int64_t end) {
    PlaneStreamer out(nt, H * W);  // nt: m == 1 and one phase, so one kernel call per plane
    AlignedScratch<acc_t> buf(b.size());
    std::vector<acc_t> plane(kSame ? 0 : H * W);
    std::vector<acc_t> tmp(direct ? 0 : max_phase);
    std::vector<acc_t> wph(K2);
    std::vector<int64_t> rowofs, colofs;
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n = p / C, c = p % C;
      acc_t* dst;
      if constexpr (kSame) {
        dst = gi + p * H * W;
      } else {
        dst = plane.data();
      }
      for (int64_t k = 0; k < m; ++k) {
        const int64_t oc = c * m + k;
        fill_plane(go + (n * OC + oc) * OH * OW, OH, OW, b, buf.data());
        // the next grad_output plane: (n, oc + 1) unless this task ends here
        Trickle next = k + 1 < m || p + 1 < end
                           ? Trickle(go + (n * OC + oc + 1) * OH * OW, OH * OW)
                           : Trickle();
        if constexpr (kSame) {
          if (nt) dst = out.begin(gi + p * H * W, next);
        }
        if (!direct) {
          for (int64_t i = 0; i < 4; ++i) next.part(i, 4);
        }
        const acc_t* w = wts.data() + oc * K2;
        for (int64_t a = 0; a < static_cast<int64_t>(ph_h.size()); ++a) {
          for (int64_t e = 0; e < static_cast<int64_t>(ph_w.size()); ++e) {
            const PhaseTaps& th = ph_h[a];
            const PhaseTaps& tw = ph_w[e];
            const int64_t nkh = static_cast<int64_t>(th.taps.size());
            const int64_t nkw = static_cast<int64_t>(tw.taps.size());
            if (nkh == 0 || nkw == 0) {
              if (k == 0) {  // no tap reaches this phase: its gradient is zero
                for (int64_t i = 0; i < th.count; ++i)
                  for (int64_t j = 0; j < tw.count; ++j) dst[(a + sh * i) * W + e + sw * j] = 0;
              }
              continue;
            }
            plan.phase(th, tw, w, KW, rowofs, colofs, wph);
            if (direct) {
              if (k == 0)
                conv_rows<false>(buf.data(), b.pitch, 1, rowofs.data(), nkh, colofs.data(), nkw,
                                 wph.data(), acc_t(0), dst, W, H, W, next);
              else
                conv_rows<true>(buf.data(), b.pitch, 1, rowofs.data(), nkh, colofs.data(), nkw,
                                wph.data(), acc_t(0), dst, W, H, W, next);
              continue;
            }
            conv_rows<false>(buf.data(), b.pitch, 1, rowofs.data(), nkh, colofs.data(), nkw,
                             wph.data(), acc_t(0), tmp.data(), tw.count, th.count, tw.count);
            for (int64_t i = 0; i < th.count; ++i) {
              acc_t* drow = dst + (a + sh * i) * W + e;
              const acc_t* trow = tmp.data() + i * tw.count;
              if (k == 0) {
                for (int64_t j = 0; j < tw.count; ++j) drow[sw * j] = trow[j];
              } else {
                for (int64_t j = 0; j < tw.count; ++j) drow[sw * j] += trow[j];
              }
            }
          }
        }
        out.end(next);
      }
      if constexpr (!kSame) {
        scalar_t* gp = gi + p * H * W;
        for (int64_t i = 0; i < H * W; ++i) gp[i] = static_cast<scalar_t>(plane[i]);
      }
    }
    out.flush();
  });
}

// grad_weight plane kernel: accv[kh][kw][lane] += sum_{r, j} g[r][j] *
// buf[(r * row_step + rowofs[kh]) * pitch + colofs[kw] + j], lanes j % V. Loop: kh, then all
// rows of the plane, then vectors of V columns; the KW tap sums of one kernel row stay in
// registers for the whole plane (two sets, for two independent FMA chains, plus a half-vector
// set for the row end), and each grad_output vector is loaded once per kernel row and reused by
// its KW taps. The input comes from the L1/L2-resident padded buffer, never from the tensor
// again. The partial last (half) vector zeroes the lanes past the row end in both operands (so an inf/nan that this tap never sees
// cannot leak in as 0 * inf). KH = KW = 0: runtime tap counts, one tap at a time.
// Bound: FMA issue / L1 loads (about 1 + 1/KW loads per FMA).
template <int KH, int KW, bool UNIT, typename T>
void gw_plane_impl(const T* buf, int64_t pitch, int64_t row_step, const int64_t* rowofs,
                   int64_t nkh, const int64_t* colofs, int64_t nkw, const T* g, int64_t rows,
                   int64_t cols, T* accv, const Trickle& pf) {
  constexpr int V = kLanes<T>;
  using vec = vec_t<T, V>;
  constexpr bool kFixed = KH > 0;
  constexpr int NW = kFixed ? KW : 1;  // taps handled together
  const int64_t nh = kFixed ? KH : nkh, nw = kFixed ? KW : nkw;
  constexpr int H = V / 2;  // finishes rows like 56 = 3 * 16 + 8 without a masked vector
  using hvec = vec_t<T, H>;
  const int64_t full = cols / V * V;
  for (int64_t kh = 0; kh < nh; ++kh) {
    for (int64_t kw0 = 0; kw0 < nw; kw0 += NW) {
      int64_t co[NW];
      for (int q = 0; q < NW; ++q) co[q] = UNIT ? kw0 + q : colofs[kw0 + q];
      vec a0[NW], a1[NW];
      hvec ah[NW];
      for (int q = 0; q < NW; ++q) {
        a0[q] = vload<V>(accv + ((kh * nw) + kw0 + q) * V);
        a1[q] = vec{};
        ah[q] = hvec{};
      }
      for (int64_t r = 0; r < rows; ++r) {
        if (kh == 0 && kw0 == 0) pf.part(r, rows);
        const T* xr = buf + (r * row_step + rowofs[kh]) * pitch + (UNIT ? colofs[0] : 0);
        const T* gr = g + r * cols;
        int64_t j = 0;
        for (; j + 2 * V <= full; j += 2 * V) {
          const vec g0 = vload<V>(gr + j), g1 = vload<V>(gr + j + V);
          FC_UNROLL
          for (int q = 0; q < NW; ++q) {
            const T* xp = xr + co[q] + j;
            a0[q] += g0 * vload<V>(xp);
            a1[q] += g1 * vload<V>(xp + V);
          }
        }
        if (j < full) {
          const vec g0 = vload<V>(gr + j);
          FC_UNROLL
          for (int q = 0; q < NW; ++q) a0[q] += g0 * vload<V>(xr + co[q] + j);
          j += V;
        }
        if (j + H <= cols) {
          const hvec g0 = vload<H>(gr + j);
          FC_UNROLL
          for (int q = 0; q < NW; ++q) ah[q] += g0 * vload<H>(xr + co[q] + j);
          j += H;
        }
        if (j < cols) {
          const int64_t n = cols - j;
          hvec gt{};
          for (int64_t l = 0; l < n; ++l) gt[l] = gr[j + l];
          FC_UNROLL
          for (int q = 0; q < NW; ++q) ah[q] += gt * vkeep<H, T>(vload<H>(xr + co[q] + j), n);
        }
      }
      for (int q = 0; q < NW; ++q) {
        vec sum = a0[q] + a1[q];
        for (int l = 0; l < H; ++l) sum[l] += ah[q][l];
        vstore<V>(accv + ((kh * nw) + kw0 + q) * V, sum);
      }
    }
  }
}

template <typename T>
void gw_plane(const T* buf, int64_t pitch, int64_t row_step, const int64_t* rowofs, int64_t nkh,
              const int64_t* colofs, int64_t nkw, const T* g, int64_t rows, int64_t cols,
              T* accv, const Trickle& pf) {
  const bool unit = unit_cols(colofs, nkw);
#define FC_CALL(KH_, KW_, UNIT_)                                                               \
  gw_plane_impl<KH_, KW_, UNIT_>(buf, pitch, row_step, rowofs, nkh, colofs, nkw, g, rows, cols, \
                                 accv, pf)
#define FC_FIXED(K)           \
  if (nkh == K && nkw == K) { \
    if (unit)                 \
      FC_CALL(K, K, true);    \
    else                      \
      FC_CALL(K, K, false);   \
    return;                   \
  }
  FC_FIXED(3)
  FC_FIXED(5)
  FC_FIXED(7)
#undef FC_FIXED
  FC_CALL(0, 0, false);
#undef FC_CALL
}

// dst[i] = the sum of the V lane partials acc[i * V + l], in lane order, for i < count.
template <int V, typename acc_t>
void sum_lanes(const acc_t* acc, int64_t count, acc_t* dst) {
  for (int64_t i = 0; i < count; ++i) {
    acc_t sum = 0;
    for (int l = 0; l < V; ++l) sum += acc[i * V + l];
    dst[i] = sum;
  }
}

// out[i] = the sum over chunks, in chunk order, of partial[chunk * count + i].
template <typename acc_t, typename scalar_t>
void sum_chunks(std::vector<acc_t>& partial, int64_t chunks, int64_t count, scalar_t* out) {
  const acc_t* sum = add_chunks(partial, chunks, count);
  for (int64_t i = 0; i < count; ++i) out[i] = static_cast<scalar_t>(sum[i]);
}

#if defined(__AVX512F__)
// Lane partials of the sum of p[0, n) (lane l: the elements i with i % 16 == l, in order).
inline __m512 lane_sums(const float* p, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_add_ps(acc, _mm512_loadu_ps(p + i));
  if (i < n) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(__mmask16((1u << (n - i)) - 1u), p + i));
  return acc;
}
#endif

// Fixed, shape-only number of batch chunks for the grad_weight reduction (so the summation
// order never depends on the thread count): enough (chunk, channel) tasks to keep threads busy.
// One chunk per image up to 64 images: consecutive tasks (chunk, c), (chunk, c + 1) then read
// adjacent planes, a stream the hardware prefetchers follow (one chunk of all 8 images read
// 8 planes 1.8 MB apart per task and ran at half the bandwidth).
inline int64_t batch_chunks(int64_t batch, int64_t /*channels*/) {
  return std::max<int64_t>(1, std::min<int64_t>(batch, 64));
}

// grad_weight, NCHW. Task = (batch chunk, input channel c): for each n in the chunk the input
// plane is padded once into the buffer; for each k and output row, gw_row accumulates all
// kH * kW tap sums. Lane partials are summed in order per task, tasks in chunk order.
template <typename scalar_t>
void grad_weight_nchw(const Tensor& grad_output, const Tensor& input, Tensor& grad_weight,
                      const Conv2dShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSame = std::is_same<scalar_t, acc_t>::value;
  constexpr int V = kLanes<acc_t>;
  const int64_t N = s.batch, C = s.in_channels, H = s.in_h, W = s.in_w, OC = s.out_channels;
  const int64_t m = OC / C, OH = s.out_h, OW = s.out_w, K2 = s.kernel_h * s.kernel_w;
  const PlaneBuf b = input_plane_buf(s, 0);
  std::vector<int64_t> rowofs, colofs;
  input_tap_offsets(s, b, rowofs, colofs);
  const int64_t B = batch_chunks(N, C);
  std::vector<acc_t> partial(static_cast<size_t>(B * OC * K2));
  const scalar_t* x = input.data_ptr<scalar_t>();
  const scalar_t* go = grad_output.data_ptr<scalar_t>();
  // the AVX-512 plane kernel (stride 1, dilation 1, square 3/5/7, rows up to 64 - K + 1 wide)
  const int64_t K = s.kernel_h;
  const bool fast = std::is_same<acc_t, float>::value && gw_plane_fast_applies(s, b.pitch);
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    AlignedScratch<acc_t> buf(b.size());
    std::vector<acc_t> gbuf(kSame ? 0 : OH * OW);  // bfloat16 grad_output plane as float
    std::vector<acc_t> accv(m * K2 * V);
    AlignedScratch<acc_t> gb(fast ? OH * shifted_pitch(OW, K) : 0);  // gw_plane_shifted's
    for (int64_t t = begin; t < end; ++t) {
      const int64_t chunk = t / C, c = t % C;
      const int64_t n0 = chunk * N / B, n1 = (chunk + 1) * N / B;
      std::fill(accv.begin(), accv.end(), acc_t(0));
      for (int64_t n = n0; n < n1; ++n) {
        fill_plane(x + (n * C + c) * H * W, H, W, b, buf.data());
        for (int64_t k = 0; k < m; ++k) {
          const scalar_t* gp = go + (n * OC + c * m + k) * OH * OW;
          const acc_t* g;
          if constexpr (kSame) {
            g = gp;
          } else {
            for (int64_t i = 0; i < OH * OW; ++i) gbuf[i] = static_cast<acc_t>(gp[i]);
            g = gbuf.data();
          }
          // next: this n's next grad_output plane, else the next input plane
          Trickle next;
          if (k + 1 < m) {
            next.add(gp + OH * OW, OH * OW);
          } else if (n + 1 < n1) {
            next.add(x + ((n + 1) * C + c) * H * W, H * W);
            next.add(go + ((n + 1) * OC + c * m) * OH * OW, OH * OW);
          } else if (t + 1 < end && c + 1 < C) {  // the next task: the same image, channel c + 1
            next.add(x + (n * C + c + 1) * H * W, H * W);
            next.add(go + (n * OC + (c + 1) * m) * OH * OW, OH * OW);
          }
          bool done = false;
#if defined(__AVX512F__)
          if constexpr (std::is_same<acc_t, float>::value) {
            if (fast) {
              gw_plane_shifted(buf.data(), b.pitch, g, gb.data(), OH, OW, K,
                               accv.data() + k * K2 * V, next);
              done = true;
            }
          }
#endif
          if (!done)
            gw_plane(buf.data(), b.pitch, s.stride_h, rowofs.data(), s.kernel_h, colofs.data(),
                     s.kernel_w, g, OH, OW, accv.data() + k * K2 * V, next);
        }
      }
      sum_lanes<V>(accv.data(), m * K2, partial.data() + (chunk * OC + c * m) * K2);
    }
  });
  sum_chunks(partial, B, OC * K2, grad_weight.data_ptr<scalar_t>());
}

#if defined(__AVX512F__)
// Fused backward, NCHW, float32: stride 1, dilation 1, channel multiplier 1, square K = 3, 5, 7,
// rows up to 64 - K + 1 wide (the limits of the grad_weight plane kernel). Tasks as in
// grad_weight_nchw: (batch chunk, channel). Per image of the chunk, the grad_output plane is read
// from memory once and copied twice within L1 (zero-padded for the grad_input correlation,
// column-shifted for the grad_weight kernel), the input plane once; grad_bias sums the plane on
// the way. grad_input and the grad_weight partial sums come from the same kernels, in the same
// order, as grad_input_nchw and grad_weight_nchw: the results are bit-identical to theirs.
// Returns false, doing nothing, outside those limits.
bool backward_nchw_fused(const Tensor& grad_output, const Tensor& input, const Tensor& weight,
                         Tensor& grad_input, Tensor& grad_weight, Tensor& grad_bias,
                         const Conv2dShape& s) {
  const PlaneBuf xb = input_plane_buf(s, 0);  // grad_weight's input plane
  if (input.scalar_type() != at::kFloat || s.out_channels != s.in_channels ||
      !gw_plane_fast_applies(s, xb.pitch))
    return false;
  const GradInputPlan plan(s);  // grad_input's grad_output plane (stride 1: one phase)
  const PhaseTaps& th = plan.ph_h[0];
  const PhaseTaps& tw = plan.ph_w[0];
  if (th.taps.empty() || tw.taps.empty()) return false;
  constexpr int V = 16;
  const int64_t N = s.batch, C = s.in_channels, H = s.in_h, W = s.in_w;
  const int64_t OH = s.out_h, OW = s.out_w, K = s.kernel_h, K2 = K * K;
  const auto wts = to_acc_vector<float, float>(weight);
  std::vector<int64_t> rowofs, colofs;
  std::vector<float> wflip;  // per channel: the flipped taps (grad_input_nchw's phase weights)
  for (int64_t c = 0; c < C; ++c) {
    std::vector<float> wph;
    plan.phase(th, tw, wts.data() + c * K2, K, rowofs, colofs, wph);
    wflip.insert(wflip.end(), wph.begin(), wph.end());
  }
  const int64_t nkh = static_cast<int64_t>(th.taps.size());
  const int64_t nkw = static_cast<int64_t>(tw.taps.size());
  const int64_t B = batch_chunks(N, C);
  std::vector<float> partial(static_cast<size_t>(B * C * K2));
  float* gbias = grad_bias.defined() ? grad_bias.data_ptr<float>() : nullptr;
  std::vector<float> bias_part(gbias ? static_cast<size_t>(B * C) : 0);
  const float* x = input.data_ptr<float>();
  const float* go = grad_output.data_ptr<float>();
  float* gi = grad_input.data_ptr<float>();
  const bool nt = stream_planes(gi, H * W, grad_input.numel());
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    AlignedScratch<float> xbuf(xb.size()), gbuf(plan.b.size());
    AlignedScratch<float> gsh(OH * shifted_pitch(OW, K));  // gw_plane_shifted's
    PlaneStreamer out(nt, H * W);
    std::vector<float> accv(K2 * V);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t chunk = t / C, c = t % C;
      const int64_t n0 = chunk * N / B, n1 = (chunk + 1) * N / B;
      std::fill(accv.begin(), accv.end(), 0.f);
      __m512 bsum = _mm512_setzero_ps();
      for (int64_t n = n0; n < n1; ++n) {
        const float* xp = x + (n * C + c) * H * W;
        const float* gp = go + (n * C + c) * OH * OW;
        // next: this chunk's next image, else the next task's first one (channel c + 1)
        Trickle next_x, next_g;
        if (n + 1 < n1 || t + 1 < end) {
          const int64_t t2 = n + 1 < n1 ? t : t + 1;
          const int64_t n2 = n + 1 < n1 ? n + 1 : (t2 / C) * N / B, c2 = t2 % C;
          next_x.add(x + (n2 * C + c2) * H * W, H * W);
          next_g.add(go + (n2 * C + c2) * OH * OW, OH * OW);
        }
        fill_plane(xp, H, W, xb, xbuf.data());
        fill_plane(gp, OH, OW, plan.b, gbuf.data());
        if (gbias) bsum = _mm512_add_ps(bsum, lane_sums(gp, OH * OW));
        gw_plane_shifted(xbuf.data(), xb.pitch, gp, gsh.data(), OH, OW, K, accv.data(), next_x);
        float* dst = out.begin(gi + (n * C + c) * H * W, next_g);
        conv_rows<false>(gbuf.data(), plan.b.pitch, 1, rowofs.data(), nkh, colofs.data(), nkw,
                         wflip.data() + c * nkh * nkw, 0.f, dst, W, H, W, next_g);
        out.end(next_g);
      }
      sum_lanes<V>(accv.data(), K2, partial.data() + (chunk * C + c) * K2);
      if (gbias) sum_lanes<V>(reinterpret_cast<const float*>(&bsum), 1, &bias_part[chunk * C + c]);
    }
    out.flush();
  });
  sum_chunks(partial, B, C * K2, grad_weight.data_ptr<float>());
  if (gbias) sum_chunks(bias_part, B, C, gbias);
  return true;
}
#else
bool backward_nchw_fused(const Tensor&, const Tensor&, const Tensor&, Tensor&, Tensor&, Tensor&,
                         const Conv2dShape&) {
  return false;
}
#endif

// ============================================================================================
// NHWC (channels_last): channel-vector kernels over zero-padded row caches
// ============================================================================================

struct NhwcShape {
  int64_t C, H, W, m, OH, OW, KH, KW, sh, sw, ph, pw, dh, dw;
  bool nt = false;  // streaming stores for the output
};

inline NhwcShape nhwc_shape(const Conv2dShape& s) {
  NhwcShape a;
  a.C = s.in_channels;
  a.H = s.in_h;
  a.W = s.in_w;
  a.m = s.out_channels / s.in_channels;
  a.OH = s.out_h;
  a.OW = s.out_w;
  a.KH = s.kernel_h;
  a.KW = s.kernel_w;
  a.sh = s.stride_h;
  a.sw = s.stride_w;
  a.ph = s.pad_h;
  a.pw = s.pad_w;
  a.dh = s.dil_h;
  a.dw = s.dil_w;
  return a;
}



// Calls f(V-constant, c0) over the channel blocks [c0, c0 + V) covering [0, C): full vectors,
// then one half vector, then single channels.
template <int V, typename F>
inline void for_channel_blocks(int64_t C, F&& f) {
  int64_t c0 = 0;
  for (; c0 + V <= C; c0 += V) f(std::integral_constant<int, V>(), c0);
  if constexpr (V / 2 > 1) {
    for (; c0 + V / 2 <= C; c0 += V / 2) f(std::integral_constant<int, V / 2>(), c0);
  }
  for (; c0 < C; ++c0) f(std::integral_constant<int, 1>(), c0);
}

// Weights (C * m, 1, KH, KW) regrouped per multiplier index k and channel block
// [c0, c0 + Vb) as (KH * KW, Vb) at nhwc_wblock(k, c0): one block's taps are one contiguous run.
inline int64_t nhwc_wblock(int64_t k, int64_t c0, int64_t C, int64_t K2) {
  return (k * C + c0) * K2;
}
template <typename acc_t, typename scalar_t>
std::vector<acc_t> nhwc_weights(const Tensor& weight, int64_t C, int64_t m, int64_t K2) {
  const auto w = to_acc_vector<acc_t, scalar_t>(weight);
  std::vector<acc_t> wt(static_cast<size_t>(m * K2 * C));
  for (int64_t k = 0; k < m; ++k) {
    for_channel_blocks<kLanes<acc_t>>(C, [&](auto v, int64_t c0) {
      constexpr int Vb = decltype(v)::value;
      for (int64_t t = 0; t < K2; ++t)
        for (int l = 0; l < Vb; ++l)
          wt[nhwc_wblock(k, c0, C, K2) + t * Vb + l] = w[((c0 + l) * m + k) * K2 + t];
    });
  }
  return wt;
}

template <int L>
inline int64_t count_channel_blocks(int64_t C) {
  int64_t n = 0;
  for_channel_blocks<L>(C, [&](auto, int64_t) { ++n; });
  return n;
}

// Loads V elements as accumulation-type lanes (bfloat16 widened to float) and stores them back.
template <int V, typename S>
inline auto vload_acc(const S* p) {
  if constexpr (std::is_same<S, c10::BFloat16>::value) {
    vec_t<uint16_t, V> h;
    __builtin_memcpy(&h, p, sizeof(h));
    const vec_t<uint32_t, V> u = __builtin_convertvector(h, vec_t<uint32_t, V>) << 16;
    vec_t<float, V> f;
    __builtin_memcpy(&f, &u, sizeof(f));
    return f;
  } else {
    return vload<V>(p);
  }
}
// nt: a non-temporal (streaming) store when the vector is one aligned 64-byte line. Outputs
// much larger than the caches are then written without each line first being read in
// (read-for-ownership) and without evicting the inputs still in use; callers end such a
// pass with nt_fence().
template <typename A, int V, typename S>
inline void vstore_from(S* p, const vec_t<A, V>& v, bool nt = false) {
  if constexpr (std::is_same<S, A>::value) {
#if defined(__AVX512F__)
    if constexpr (sizeof(S) * V == 64) {
      if (nt && (reinterpret_cast<uintptr_t>(p) & 63) == 0) {
        if constexpr (std::is_same<S, float>::value) {
          _mm512_stream_ps(p, (__m512)v);
        } else {
          _mm512_stream_pd(p, (__m512d)v);
        }
        return;
      }
    }
#endif
    vstore<V>(p, v);
  } else {
    for (int l = 0; l < V; ++l) p[l] = static_cast<S>(v[l]);
  }
}

// Rows of one NHWC image (rows x cols x groups * C channels), each copied once into a
// zero-padded accumulation-type row (lpad zero pixels, the row, rpad zero pixels) stored
// channel-block-major: for each group g and channel block [c0, c0 + Vb) (the blocks of
// for_channel_blocks) the padded pixels of that block lie contiguously, Vb channels each, at
// g * group_pitch() + block_offset(c0) + pixel * Vb. So a kernel working on one channel block
// steps Vb elements per pixel and its taps are constant offsets (kw * dw * Vb), and it never
// tests a tap against the border. Rows outside the image read a shared all-zero row.
// The cache holds `window + step` rows: the rows one kernel window spans plus the rows it
// advances by, so while the kernels work on the current window the rows of the next one can
// be copied in slices (fill_ahead) between their tiles. That keeps the DRAM stream of the
// image busy during the compute instead of stalling on it at the start of every output row.
template <typename acc_t>
class RowCache {
 public:
  RowCache(int64_t rows, int64_t cols, int64_t channels, int64_t groups, int64_t lpad,
           int64_t rpad, int64_t window, int64_t step)
      : rows_(rows), cols_(cols), ch_(channels), groups_(groups), lpad_(lpad),
        wp_(lpad + cols + rpad), pitch_(wp_ * channels * groups), slots_(window + step),
        data_(static_cast<size_t>(slots_ * pitch_ + 32), acc_t(0)),
        zero_(static_cast<size_t>(pitch_ + 32), acc_t(0)),
        tag_(static_cast<size_t>(slots_), -1), done_(static_cast<size_t>(slots_), 0),
        base_(align64(data_.data())), zbase_(align64(zero_.data())) {}

  int64_t block_offset(int64_t c0) const { return wp_ * c0; }
  int64_t group_pitch() const { return wp_ * ch_; }

  // Row r of image `image` (numbered image_id), complete.
  template <typename scalar_t>
  const acc_t* row(const scalar_t* image, int64_t image_id, int64_t r) {
    if (r < 0 || r >= rows_) return zbase_;
    return fill(image, image_id, r, cols_);
  }

  // Copies slice i of n of row r now and prefetches slice i + 1. Only for rows of the next
  // window of the same image, whose slots the current window does not use.
  template <typename scalar_t>
  void fill_ahead(const scalar_t* image, int64_t image_id, int64_t r, int64_t i, int64_t n) {
    if (r < 0 || r >= rows_) return;
    const int64_t p1 = cols_ * (i + 1) / n, p2 = cols_ * std::min(i + 2, n) / n;
    fill(image, image_id, r, p1);
    const int64_t ctot = groups_ * ch_;
    const scalar_t* src = image + r * cols_ * ctot;
    prefetch_slice(src + p1 * ctot,
                   (p2 - p1) * ctot * static_cast<int64_t>(sizeof(scalar_t)), 0, 1);
  }

 private:
  // Makes pixels [0, upto) of row r present in its slot.
  template <typename scalar_t>
  acc_t* fill(const scalar_t* image, int64_t image_id, int64_t r, int64_t upto) {
    const int64_t slot = r % slots_;
    acc_t* dst = base_ + slot * pitch_;
    const int64_t tag = image_id * rows_ + r;
    if (tag_[slot] != tag) {
      tag_[slot] = tag;
      done_[slot] = 0;
    }
    const int64_t ctot = groups_ * ch_;
    const scalar_t* src = image + r * cols_ * ctot;
    // pixel-major so the image row streams through once, in address order
    for (int64_t p = done_[slot]; p < upto; ++p) {
      for (int64_t g = 0; g < groups_; ++g) {
        const scalar_t* sp = src + p * ctot + g * ch_;
        acc_t* dg = dst + g * group_pitch();
        for_channel_blocks<kLanes<acc_t>>(ch_, [&](auto v, int64_t c0) {
          constexpr int Vb = decltype(v)::value;
          acc_t* d = dg + block_offset(c0) + (lpad_ + p) * Vb;
          for (int l = 0; l < Vb; ++l) d[l] = static_cast<acc_t>(sp[c0 + l]);
        });
      }
    }
    done_[slot] = std::max(done_[slot], upto);
    return dst;
  }

  // vector loads of a channel block then never straddle two cache lines (when pitch and block
  // offsets are multiples of 64 bytes, as they are for C % 16 == 0)
  static acc_t* align64(acc_t* p) {
    return reinterpret_cast<acc_t*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
  }

  int64_t rows_, cols_, ch_, groups_, lpad_, wp_, pitch_, slots_;
  std::vector<acc_t> data_, zero_;
  std::vector<int64_t> tag_, done_;
  acc_t* base_;
  acc_t* zbase_;
};

// Forward, NHWC: output pixels [ow0, ow1) of one row, multiplier index k, channels
// [c0, c0 + V). rp[kh] is the cached padded input row of kernel row kh and `blk` the offset of
// this channel block in it, so output pixel ow, tap (kh, kw) reads the V channels at
// rp[kh] + blk + (ow * sw + kw * dw) * V: no border test, and with dw == 1 (UNIT) the tap
// offsets are compile-time constants. Compiled sizes keep the KH * KW weight vectors in
// registers (spilling for 7x7) and do two pixels at a time (two FMA chains sharing each
// weight); runtime sizes loop over the taps. Bound: L1 loads / FMA issue (one input vector per
// FMA); for k = 3 close to DRAM bandwidth.
template <int KH_, int KW_, bool UNIT, int V, typename acc_t, typename scalar_t>
void fwd_nhwc_tile(const NhwcShape& a, const acc_t* const* rp, int64_t blk, const acc_t* wb,
                   const acc_t* bk, scalar_t* ybase, int64_t c0, int64_t ow0, int64_t ow1,
                   PrefetchStream& ps) {
  using vec = vec_t<acc_t, V>;
  const int64_t OCk = a.m * a.C, step = a.sw * V;
  const int64_t cs = UNIT ? V : a.dw * V;  // elements between neighbouring kernel columns
  const vec bv = vload<V>(bk + c0);
  if constexpr (KH_ > 0) {
    vec wv[KH_ * KW_];
    const acc_t* r0[KH_];
    for (int t = 0; t < KH_ * KW_; ++t) wv[t] = vload<V>(wb + t * V);
    for (int kh = 0; kh < KH_; ++kh) r0[kh] = rp[kh] + blk;
    int64_t ow = ow0;
    if (UNIT && a.sw == 1) {
      // Four pixels at a time: neighbouring pixels share input columns (pixel p, tap kw reads
      // column p + kw), so each kernel row loads its 3 + KW columns once for 4 * KW FMAs.
      constexpr int P = 4;
      for (; ow + P <= ow1; ow += P) {
        ps.next();
        vec acc[P];
        for (int p = 0; p < P; ++p) acc[p] = bv;
        FC_UNROLL
        for (int kh = 0; kh < KH_; ++kh) {
          const acc_t* r = r0[kh] + ow * V;
          vec col[P + KW_ - 1];
          FC_UNROLL
          for (int i = 0; i < P + KW_ - 1; ++i) col[i] = vload<V>(r + i * V);
          FC_UNROLL
          for (int kw = 0; kw < KW_; ++kw) {
            FC_UNROLL
            for (int p = 0; p < P; ++p) acc[p] += wv[kh * KW_ + kw] * col[p + kw];
          }
        }
        for (int p = 0; p < P; ++p) vstore_from<acc_t, V>(ybase + (ow + p) * OCk, acc[p], a.nt);
      }
    }
    for (; ow + 1 < ow1; ow += 2) {
      ps.next();
      vec acc0 = bv, acc1 = bv;
      FC_UNROLL
      for (int kh = 0; kh < KH_; ++kh) {
        const acc_t* r = r0[kh] + ow * step;
        FC_UNROLL
        for (int kw = 0; kw < KW_; ++kw) {
          const acc_t* q = r + kw * (UNIT ? V : cs);
          acc0 += wv[kh * KW_ + kw] * vload<V>(q);
          acc1 += wv[kh * KW_ + kw] * vload<V>(q + step);
        }
      }
      vstore_from<acc_t, V>(ybase + ow * OCk, acc0, a.nt);
      vstore_from<acc_t, V>(ybase + (ow + 1) * OCk, acc1, a.nt);
    }
    if (ow < ow1) {
      vec acc = bv;
      FC_UNROLL
      for (int kh = 0; kh < KH_; ++kh) {
        const acc_t* r = r0[kh] + ow * step;
        FC_UNROLL
        for (int kw = 0; kw < KW_; ++kw)
          acc += wv[kh * KW_ + kw] * vload<V>(r + kw * (UNIT ? V : cs));
      }
      vstore_from<acc_t, V>(ybase + ow * OCk, acc, a.nt);
    }
  } else {
    for (int64_t ow = ow0; ow < ow1; ++ow) {
      ps.next();
      vec acc = bv;
      for (int64_t kh = 0; kh < a.KH; ++kh) {
        const acc_t* r = rp[kh] + blk + ow * step;
        const acc_t* wr = wb + kh * a.KW * V;
        for (int64_t kw = 0; kw < a.KW; ++kw) acc += vload<V>(wr + kw * V) * vload<V>(r + kw * cs);
      }
      vstore_from<acc_t, V>(ybase + ow * OCk, acc, a.nt);
    }
  }
}

// A prefetch stream over image rows [r0, r1] (clamped to the image), spread over `steps`.
template <typename scalar_t>
PrefetchStream row_stream(const scalar_t* image, int64_t rows, int64_t row_elems, int64_t r0,
                          int64_t r1, int64_t steps) {
  r0 = std::max<int64_t>(r0, 0);
  r1 = std::min<int64_t>(r1, rows - 1);
  if (r0 > r1) return PrefetchStream();
  return PrefetchStream(reinterpret_cast<const char*>(image + r0 * row_elems),
                        (r1 - r0 + 1) * row_elems * static_cast<int64_t>(sizeof(scalar_t)), steps);
}

// Calls f(V-constant, UNIT-constant, c0) for each channel block; UNIT = (dilation_w == 1).
template <int L, typename F>
inline void for_channel_blocks_unit(int64_t C, bool unit, F&& f) {
  for_channel_blocks<L>(C, [&](auto v, int64_t c0) {
    if (unit)
      f(v, std::true_type(), c0);
    else
      f(v, std::false_type(), c0);
  });
}

// Task = a contiguous range of output rows (n, oh); each thread keeps a padded-row cache of
// the input. Per row: pixel tiles, then multiplier index k, then channel blocks.
template <int KH, int KW, typename scalar_t>
void forward_nhwc_impl(const NhwcShape& a, int64_t batch, const scalar_t* x,
                       const std::vector<at::opmath_type<scalar_t>>& wt,
                       const std::vector<at::opmath_type<scalar_t>>& bt, scalar_t* y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K2 = a.KH * a.KW, OCk = a.m * a.C;
  const int64_t rpad =
      std::max<int64_t>(0, (a.OW - 1) * a.sw + (a.KW - 1) * a.dw + 1 - a.pw - a.W);
  at::parallel_for(0, batch * a.OH, 1, [&](int64_t begin, int64_t end) {
    RowCache<acc_t> cache(a.H, a.W, a.C, 1, a.pw, rpad, (a.KH - 1) * a.dh + 1, a.sh);
    std::vector<const acc_t*> rp(a.KH);
    const int64_t nb = count_channel_blocks<kLanes<acc_t>>(a.C);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / a.OH, oh = row % a.OH;
      const scalar_t* xn = x + n * a.H * a.W * a.C;
      for (int64_t kh = 0; kh < a.KH; ++kh)
        rp[kh] = cache.row(xn, n, oh * a.sh - a.ph + kh * a.dh);
      // the next output row's new input rows are copied into the cache in slices between
      // the channel blocks; the rows after them are prefetched a few lines per pixel pair
      const bool ahead = row + 1 < end && oh + 1 < a.OH;
      PrefetchStream ps;
      if (row + 2 < end && oh + 2 < a.OH) {
        const int64_t last1 = (oh + 1) * a.sh - a.ph + (a.KH - 1) * a.dh;
        ps = row_stream(xn, a.H, a.W * a.C, last1 + 1, last1 + a.sh, nb * div_ceil(a.OW, 2));
      }
      scalar_t* yrow = y + row * a.OW * OCk;
      for (int64_t k = 0; k < a.m; ++k) {
        const acc_t* bk = bt.data() + k * a.C;
        int64_t bi = 0;
        for_channel_blocks_unit<kLanes<acc_t>>(a.C, a.dw == 1, [&](auto v, auto unit, int64_t c0) {
          for (int64_t kh = 0; ahead && k == 0 && kh < a.KH; ++kh)
            cache.fill_ahead(xn, n, (oh + 1) * a.sh - a.ph + kh * a.dh, bi, nb);
          ++bi;
          fwd_nhwc_tile<KH, KW, decltype(unit)::value, decltype(v)::value>(
              a, rp.data(), cache.block_offset(c0), wt.data() + nhwc_wblock(k, c0, a.C, K2), bk,
              yrow + k * a.C + c0, c0, 0, a.OW, ps);
        });
      }
    }
    nt_fence();
  });
}

// Runs F<KH, KW>::run() for the compiled square sizes, F<0, 0>::run() otherwise.
template <template <int, int> class F, typename... Args>
void dispatch_kernel_size(int64_t kh, int64_t kw, Args&&... args) {
  if (kh == kw && kh == 3) return F<3, 3>::run(std::forward<Args>(args)...);
  if (kh == kw && kh == 5) return F<5, 5>::run(std::forward<Args>(args)...);
  if (kh == kw && kh == 7) return F<7, 7>::run(std::forward<Args>(args)...);
  return F<0, 0>::run(std::forward<Args>(args)...);
}

template <int KH, int KW>
struct ForwardNhwc {
  template <typename... Args>
  static void run(Args&&... args) {
    forward_nhwc_impl<KH, KW>(std::forward<Args>(args)...);
  }
};

// k-major (N, OH, OW, m, C) view of a channels_last (N, C * m, OH, OW) tensor's data.
inline Tensor to_k_major(const Tensor& t_cl, int64_t C, int64_t m) {
  const Tensor nhwc = t_cl.permute({0, 2, 3, 1});  // (N, OH, OW, C * m), contiguous
  if (m == 1) return nhwc;
  return nhwc.reshape({t_cl.size(0), t_cl.size(2), t_cl.size(3), C, m}).transpose(3, 4).contiguous();
}

template <typename scalar_t>
void forward_nhwc(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
                  Tensor& out, const Conv2dShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  NhwcShape a = nhwc_shape(s);
  a.nt = a.m == 1 && out.nbytes() >= static_cast<size_t>(kStreamingStoreBytes);
  const int64_t K2 = a.KH * a.KW;
  const auto wt = nhwc_weights<acc_t, scalar_t>(weight, a.C, a.m, K2);
  const auto b = bias_vector<acc_t, scalar_t>(bias, s.out_channels);
  std::vector<acc_t> bt(b.size());
  for (int64_t c = 0; c < a.C; ++c)
    for (int64_t k = 0; k < a.m; ++k) bt[k * a.C + c] = b[c * a.m + k];
  // m == 1: write the output directly; otherwise k-major into a scratch tensor, permuted below
  Tensor ykm = a.m == 1 ? out : at::empty({s.batch, a.OH, a.OW, a.m, a.C}, out.options());
  dispatch_kernel_size<ForwardNhwc>(a.KH, a.KW, a, s.batch, input.data_ptr<scalar_t>(), wt, bt,
                                    ykm.data_ptr<scalar_t>());
  if (a.m > 1) {
    out.permute({0, 2, 3, 1})
        .view({s.batch, a.OH, a.OW, a.C, a.m})
        .copy_(ykm.transpose(3, 4));
  }
}

// For each input position i (one dimension), the taps t and output positions o with
// o * stride = i + pad - t * dil, 0 <= o < out: the gather list of grad_input.
struct TapList {
  std::vector<int64_t> start, tap, pos;  // entries [start[i], start[i + 1]) belong to i
};

inline TapList gather_taps(int64_t in, int64_t out, int64_t k, int64_t stride, int64_t pad,
                           int64_t dil) {
  TapList L;
  L.start.reserve(in + 1);
  for (int64_t i = 0; i < in; ++i) {
    L.start.push_back(static_cast<int64_t>(L.tap.size()));
    for (int64_t t = 0; t < k; ++t) {
      const int64_t o = output_for_tap(i, t, stride, pad, dil, out);
      if (o < 0) continue;
      L.tap.push_back(t);
      L.pos.push_back(o);
    }
  }
  L.start.push_back(static_cast<int64_t>(L.tap.size()));
  return L;
}

// grad_input, NHWC, stride 1: input pixels [iw0, iw1) of one row, channels [c0, c0 + V).
// rp[kh] is the cached padded grad_output row ih + ph - kh * dh (one group of C channels per
// multiplier index k) and `blk` this channel block's offset, so input pixel iw gathers tap
// (kh, kw) from padded column iw + pw - kw * dw + lpad, never out of range. m == 1 with a
// compiled size: weights in registers, two pixels at a time; otherwise the multiplier and tap
// loops run at runtime. Bound: L1 loads / FMA issue.
template <int KH_, int KW_, bool UNIT, int V, typename acc_t, typename scalar_t>
void gi_nhwc_tile(const NhwcShape& a, const acc_t* const* rp, int64_t blk, int64_t gpitch,
                  const acc_t* wt, scalar_t* dbase, int64_t c0, int64_t lpad, int64_t iw0,
                  int64_t iw1, PrefetchStream& ps) {
  using vec = vec_t<acc_t, V>;
  const int64_t C = a.C, K2 = a.KH * a.KW, col0 = a.pw + lpad;
  const int64_t cs = UNIT ? V : a.dw * V;
  if constexpr (KH_ > 0) {
    if (a.m == 1) {
      vec wv[KH_ * KW_];
      const acc_t* r0[KH_];
      for (int t = 0; t < KH_ * KW_; ++t) wv[t] = vload<V>(wt + nhwc_wblock(0, c0, C, K2) + t * V);
      for (int kh = 0; kh < KH_; ++kh) r0[kh] = rp[kh] + blk + col0 * V;
      int64_t iw = iw0;
      for (; iw + 1 < iw1; iw += 2) {
        ps.next();
        vec acc0{}, acc1{};
        FC_UNROLL
        for (int kh = 0; kh < KH_; ++kh) {
          const acc_t* r = r0[kh] + iw * V;
          FC_UNROLL
          for (int kw = 0; kw < KW_; ++kw) {
            const acc_t* q = r - kw * (UNIT ? V : cs);
            acc0 += wv[kh * KW_ + kw] * vload<V>(q);
            acc1 += wv[kh * KW_ + kw] * vload<V>(q + V);
          }
        }
        vstore_from<acc_t, V>(dbase + iw * C, acc0, a.nt);
        vstore_from<acc_t, V>(dbase + (iw + 1) * C, acc1, a.nt);
      }
      if (iw < iw1) {
        vec acc{};
        FC_UNROLL
        for (int kh = 0; kh < KH_; ++kh) {
          const acc_t* r = r0[kh] + iw * V;
          FC_UNROLL
          for (int kw = 0; kw < KW_; ++kw)
            acc += wv[kh * KW_ + kw] * vload<V>(r - kw * (UNIT ? V : cs));
        }
        vstore_from<acc_t, V>(dbase + iw * C, acc, a.nt);
      }
      return;
    }
  }
  for (int64_t iw = iw0; iw < iw1; ++iw) {
    ps.next();
    vec acc{};
    for (int64_t kh = 0; kh < a.KH; ++kh) {
      const acc_t* r = rp[kh] + blk + (iw + col0) * V;
      for (int64_t kw = 0; kw < a.KW; ++kw) {
        const acc_t* q = r - kw * cs;
        const acc_t* wq = wt + nhwc_wblock(0, c0, C, K2) + (kh * a.KW + kw) * V;
        for (int64_t k = 0; k < a.m; ++k)
          acc += vload<V>(wq + k * C * K2) * vload<V>(q + k * gpitch);
      }
    }
    vstore_from<acc_t, V>(dbase + iw * C, acc, a.nt);
  }
}

// grad_input, NHWC, any stride: one input row (n, ih), driven by the precomputed gather lists
// (the (tap, output) pairs that reach each input position; no divisions in the pixel loop),
// reading grad_output straight from the tensor. Pixel by pixel, all channel blocks of a pixel
// before the next, so grad_input is written and each grad_output pixel read in address order
// (channel block by channel block over the whole row, the reads and the streaming stores were
// 64-byte lines C * 4 bytes apart: C=144, 56x56, stride 2, N=8, the op alone 1.05 -> 0.75 ms;
// benchmarks/NOTES.md). Each element sums its taps in the same order.
template <typename acc_t, typename scalar_t>
void gi_nhwc_gather_row(const NhwcShape& a, const TapList& lh, const TapList& lw,
                        const scalar_t* gon, const acc_t* wt, scalar_t* girow, int64_t ih) {
  const int64_t KW = a.KW, K2 = a.KH * a.KW, C = a.C, OW = a.OW, OCk = a.m * a.C;
  const int64_t h0 = lh.start[ih], h1 = lh.start[ih + 1];
  for (int64_t iw = 0; iw < a.W; ++iw) {
    const int64_t w0 = lw.start[iw], w1 = lw.start[iw + 1];
    scalar_t* dst = girow + iw * C;
    for_channel_blocks<kLanes<acc_t>>(C, [&](auto v, int64_t c0) {
      constexpr int V = decltype(v)::value;
      vec_t<acc_t, V> acc{};
      const acc_t* wb = wt + nhwc_wblock(0, c0, C, K2);
      for (int64_t hi = h0; hi < h1; ++hi) {
        const int64_t kh = lh.tap[hi], oh = lh.pos[hi];
        for (int64_t wi = w0; wi < w1; ++wi) {
          const int64_t kw = lw.tap[wi], ow = lw.pos[wi];
          const scalar_t* gp = gon + (oh * OW + ow) * OCk + c0;
          const acc_t* wp = wb + (kh * KW + kw) * V;
          for (int64_t k = 0; k < a.m; ++k)
            acc += vload<V>(wp + k * C * K2) * vload_acc<V>(gp + k * C);
        }
      }
      vstore_from<acc_t, V>(dst + c0, acc, a.nt);
    });
  }
}

template <int KH, int KW>
struct GradInputNhwc {
  template <typename scalar_t, typename acc_t>
  static void run(const NhwcShape& a, int64_t batch, const scalar_t* go, const acc_t* wt,
                  scalar_t* gi) {
    const int64_t OCk = a.m * a.C;
    if (a.sh != 1 || a.sw != 1) {
      const TapList lh = gather_taps(a.H, a.OH, a.KH, a.sh, a.ph, a.dh);
      const TapList lw = gather_taps(a.W, a.OW, a.KW, a.sw, a.pw, a.dw);
      at::parallel_for(0, batch * a.H, 1, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const int64_t n = row / a.H, ih = row % a.H;
          const scalar_t* gon = go + n * a.OH * a.OW * OCk;
          gi_nhwc_gather_row(a, lh, lw, gon, wt, gi + row * a.W * a.C, ih);
        }
        nt_fence();
      });
      return;
    }
    // padded grad_output columns: input pixel iw, tap kw reads column iw + pw - kw * dw
    const int64_t lpad = std::max<int64_t>(0, (a.KW - 1) * a.dw - a.pw);
    const int64_t rpad = std::max<int64_t>(0, a.W + a.pw - a.OW);
    at::parallel_for(0, batch * a.H, 1, [&](int64_t begin, int64_t end) {
      RowCache<acc_t> cache(a.OH, a.OW, a.C, a.m, lpad, rpad, (a.KH - 1) * a.dh + 1, 1);
      std::vector<const acc_t*> rp(a.KH);
      const int64_t nb = count_channel_blocks<kLanes<acc_t>>(a.C);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / a.H, ih = row % a.H;
        const scalar_t* gon = go + n * a.OH * a.OW * OCk;
        for (int64_t kh = 0; kh < a.KH; ++kh) rp[kh] = cache.row(gon, n, ih + a.ph - kh * a.dh);
        const bool ahead = row + 1 < end && ih + 1 < a.H;
        PrefetchStream ps;
        if (row + 2 < end && ih + 2 < a.H)
          ps = row_stream(gon, a.OH, a.OW * OCk, ih + 2 + a.ph, ih + 2 + a.ph, nb * div_ceil(a.W, 2));
        scalar_t* girow = gi + row * a.W * a.C;
        int64_t bi = 0;
        for_channel_blocks_unit<kLanes<acc_t>>(a.C, a.dw == 1, [&](auto v, auto unit, int64_t c0) {
          for (int64_t kh = 0; ahead && kh < a.KH; ++kh)
            cache.fill_ahead(gon, n, ih + 1 + a.ph - kh * a.dh, bi, nb);
          ++bi;
          gi_nhwc_tile<KH, KW, decltype(unit)::value, decltype(v)::value>(
              a, rp.data(), cache.block_offset(c0), cache.group_pitch(), wt, girow + c0, c0, lpad,
              0, a.W, ps);
        });
      }
      nt_fence();
    });
  }
};

template <typename scalar_t>
void grad_input_nhwc(const Tensor& grad_output, const Tensor& weight, Tensor& grad_input,
                     const Conv2dShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  NhwcShape a = nhwc_shape(s);
  a.nt = grad_input.nbytes() >= static_cast<size_t>(kStreamingStoreBytes);
  const auto wt = nhwc_weights<acc_t, scalar_t>(weight, a.C, a.m, a.KH * a.KW);
  const Tensor gokm = to_k_major(grad_output, a.C, a.m);
  dispatch_kernel_size<GradInputNhwc>(a.KH, a.KW, a, s.batch, gokm.data_ptr<scalar_t>(),
                                      wt.data(), grad_input.data_ptr<scalar_t>());
}

// grad_weight, NHWC: output pixels [ow0, ow1) of one row, multiplier index k, channels
// [c0, c0 + V): part[tap][k * C + c] += sum_ow g[ow][k * C + c] * x_pad[row kh][ow * sw +
// kw * dw][c]. rp[kh] is the cached padded input row (nullptr when the kernel row falls
// outside the image: nothing to add) and `blk` this channel block's offset in it. Compiled
// sizes keep the KW tap sums of a kernel row in registers (two sets, even and odd pixels, for
// two FMA chains) and load each grad_output vector once for the KW taps; the sums go to the
// chunk's partial sums once per tile. Bound: L1 loads.
template <int KH_, int KW_, bool UNIT, int V, typename acc_t, typename scalar_t>
void gw_nhwc_tile(const NhwcShape& a, const acc_t* const* rp, int64_t blk,
                  const scalar_t* gbase, acc_t* pbase, int64_t ow0, int64_t ow1,
                  PrefetchStream& ps) {
  using vec = vec_t<acc_t, V>;
  const int64_t OCk = a.m * a.C, step = a.sw * V;
  const int64_t cs = UNIT ? V : a.dw * V;
  const int64_t KH = KH_ > 0 ? KH_ : a.KH, KW = KH_ > 0 ? KW_ : a.KW;
  for (int64_t kh = 0; kh < KH; ++kh) {
    if (rp[kh] == nullptr) continue;
    const acc_t* r0 = rp[kh] + blk;
    if constexpr (KH_ > 0) {
      vec acc0[KW_], acc1[KW_];
      for (int kw = 0; kw < KW_; ++kw) {
        acc0[kw] = vec{};
        acc1[kw] = vec{};
      }
      int64_t ow = ow0;
      for (; ow + 1 < ow1; ow += 2) {
        ps.next();
        const vec g0 = vload_acc<V>(gbase + ow * OCk), g1 = vload_acc<V>(gbase + (ow + 1) * OCk);
        const acc_t* r = r0 + ow * step;
        FC_UNROLL
        for (int kw = 0; kw < KW_; ++kw) {
          const acc_t* q = r + kw * (UNIT ? V : cs);
          acc0[kw] += g0 * vload<V>(q);
          acc1[kw] += g1 * vload<V>(q + step);
        }
      }
      if (ow < ow1) {
        const vec g0 = vload_acc<V>(gbase + ow * OCk);
        const acc_t* r = r0 + ow * step;
        FC_UNROLL
        for (int kw = 0; kw < KW_; ++kw) acc0[kw] += g0 * vload<V>(r + kw * (UNIT ? V : cs));
      }
      for (int kw = 0; kw < KW_; ++kw) {
        acc_t* pp = pbase + (kh * KW_ + kw) * OCk;
        vstore<V>(pp, vload<V>(pp) + (acc0[kw] + acc1[kw]));
      }
    } else {
      for (int64_t kw = 0; kw < KW; ++kw) {
        vec acc{};
        const acc_t* r = r0 + kw * cs;
        for (int64_t ow = ow0; ow < ow1; ++ow)
          acc += vload_acc<V>(gbase + ow * OCk) * vload<V>(r + ow * step);
        acc_t* pp = pbase + (kh * KW + kw) * OCk;
        vstore<V>(pp, vload<V>(pp) + acc);
      }
    }
  }
}

// Fixed, shape-only number of row chunks for the NHWC grad_weight reduction.
inline int64_t row_chunks(int64_t rows) { return std::max<int64_t>(1, std::min<int64_t>(rows, 64)); }

// Task = a fixed chunk of output rows with its own partial sums (K2 x m * C), combined in chunk
// order afterwards; each thread keeps a padded-row cache of the input.
template <int KH, int KW>
struct GradWeightNhwc {
  template <typename scalar_t, typename acc_t>
  static void run(const NhwcShape& a, int64_t batch, const scalar_t* x, const scalar_t* go,
                  std::vector<acc_t>& partial, int64_t T) {
    const int64_t R = batch * a.OH, OCk = a.m * a.C, K2 = a.KH * a.KW;
    const int64_t rpad =
        std::max<int64_t>(0, (a.OW - 1) * a.sw + (a.KW - 1) * a.dw + 1 - a.pw - a.W);
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      RowCache<acc_t> cache(a.H, a.W, a.C, 1, a.pw, rpad, (a.KH - 1) * a.dh + 1, a.sh);
      std::vector<const acc_t*> rp(a.KH);
      const int64_t end_row = end * R / T, nb = count_channel_blocks<kLanes<acc_t>>(a.C);
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        acc_t* part = partial.data() + chunk * K2 * OCk;
        std::fill(part, part + K2 * OCk, acc_t(0));
        for (int64_t row = chunk * R / T; row < (chunk + 1) * R / T; ++row) {
          const int64_t n = row / a.OH, oh = row % a.OH;
          const scalar_t* xn = x + n * a.H * a.W * a.C;
          for (int64_t kh = 0; kh < a.KH; ++kh) {
            const int64_t ih = oh * a.sh - a.ph + kh * a.dh;
            rp[kh] = ih < 0 || ih >= a.H ? nullptr : cache.row(xn, n, ih);
          }
          // the next row's input rows are copied, and its grad_output row prefetched, in
          // slices between this row's tiles
          const bool ahead = row + 1 < end_row && oh + 1 < a.OH;
          const Trickle next_g =
              row + 1 < end_row ? Trickle(go + (row + 1) * a.OW * OCk, a.OW * OCk) : Trickle();
          PrefetchStream ps;
          if (row + 2 < end_row && oh + 2 < a.OH) {
            const int64_t last1 = (oh + 1) * a.sh - a.ph + (a.KH - 1) * a.dh;
            ps = row_stream(xn, a.H, a.W * a.C, last1 + 1, last1 + a.sh,
                            nb * a.KH * div_ceil(a.OW, 2));
          }
          const scalar_t* gorow = go + row * a.OW * OCk;
          for (int64_t k = 0; k < a.m; ++k) {
            int64_t bi = 0;
            for_channel_blocks_unit<kLanes<acc_t>>(
                a.C, a.dw == 1, [&](auto v, auto unit, int64_t c0) {
                  if (k == 0) {
                    for (int64_t kh = 0; ahead && kh < a.KH; ++kh)
                      cache.fill_ahead(xn, n, (oh + 1) * a.sh - a.ph + kh * a.dh, bi, nb);
                    next_g.part(bi, nb);
                  }
                  ++bi;
                  gw_nhwc_tile<KH, KW, decltype(unit)::value, decltype(v)::value>(
                      a, rp.data(), cache.block_offset(c0), gorow + k * a.C + c0,
                      part + k * a.C + c0, 0, a.OW, ps);
                });
          }
        }
      }
    });
  }
};

template <typename scalar_t>
void grad_weight_nhwc(const Tensor& grad_output, const Tensor& input, Tensor& grad_weight,
                      const Conv2dShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const NhwcShape a = nhwc_shape(s);
  const int64_t K2 = a.KH * a.KW, OCk = a.m * a.C;
  const Tensor gokm = to_k_major(grad_output, a.C, a.m);
  const int64_t T = row_chunks(s.batch * a.OH);
  std::vector<acc_t> partial(static_cast<size_t>(T * K2 * OCk));
  dispatch_kernel_size<GradWeightNhwc>(a.KH, a.KW, a, s.batch, input.data_ptr<scalar_t>(),
                                       gokm.data_ptr<scalar_t>(), partial, T);
  const acc_t* sum = add_chunks(partial, T, K2 * OCk);
  scalar_t* gw = grad_weight.data_ptr<scalar_t>();
  for (int64_t c = 0; c < a.C; ++c)
    for (int64_t k = 0; k < a.m; ++k)
      for (int64_t t = 0; t < K2; ++t)
        gw[(c * a.m + k) * K2 + t] = static_cast<scalar_t>(sum[t * OCk + k * a.C + c]);
}

}  // namespace

// ============================================================================================
// entry points
// ============================================================================================

at::Tensor depthwise_conv2d_forward_cpu(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* op = "depthwise_conv2d";
  const Conv2dShape s = check_depthwise_conv2d(op, input, weight, bias, stride, padding, dilation);
  const auto fmt = conv_memory_format(input, weight);
  Tensor out = at::empty({s.batch, s.out_channels, s.out_h, s.out_w},
                         input.options().memory_format(fmt));
  advise_huge_pages(out);
  if (out.numel() == 0) return out;
  const Tensor w = weight.contiguous();
  c10::optional<Tensor> b;
  if (bias.has_value() && bias->defined()) b = bias->contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), op, [&] {
    if (fmt == at::MemoryFormat::ChannelsLast) {
      const Tensor x = input.contiguous(fmt);
      if (!depthwise_nhwc_fast_forward(x, w, b, out, s)) forward_nhwc<scalar_t>(x, w, b, out, s);
    } else {
      forward_nchw<scalar_t>(input.contiguous(), w, b, out, s);
    }
  });
  return out;
}

at::Tensor depthwise_conv2d_grad_input_cpu(
    const at::Tensor& grad_output, const at::Tensor& weight, at::IntArrayRef input_size,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* op = "_depthwise_conv2d_grad_input";
  const Conv2dShape s =
      check_depthwise_shapes(op, input_size, weight.sizes(), stride, padding, dilation);
  check_grad_output(op, grad_output, weight, "weight", s);
  const auto fmt = conv_memory_format(grad_output, weight);
  Tensor grad_input = at::empty(input_size, grad_output.options().memory_format(fmt));
  advise_huge_pages(grad_input);
  if (grad_input.numel() == 0) return grad_input;
  const Tensor w = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad_output.scalar_type(), op, [&] {
    if (fmt == at::MemoryFormat::ChannelsLast) {
      const Tensor go = grad_output.contiguous(fmt);
      if (!depthwise_nhwc_fast_grad_input(go, w, grad_input, s))
        grad_input_nhwc<scalar_t>(go, w, grad_input, s);
    } else {
      grad_input_nchw<scalar_t>(grad_output.contiguous(), w, grad_input, s);
    }
  });
  return grad_input;
}

at::Tensor depthwise_conv2d_grad_weight_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, at::IntArrayRef weight_size,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* op = "_depthwise_conv2d_grad_weight";
  const Conv2dShape s =
      check_depthwise_shapes(op, input.sizes(), weight_size, stride, padding, dilation);
  check_grad_output(op, grad_output, input, "input", s);
  Tensor grad_weight = at::empty(weight_size, grad_output.options());
  if (grad_output.numel() == 0) return grad_weight.zero_();
  // channels_last when either operand is, like the forward's rule
  const auto fmt = conv_memory_format(grad_output, input);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad_output.scalar_type(), op, [&] {
    if (fmt == at::MemoryFormat::ChannelsLast) {
      const Tensor go = grad_output.contiguous(fmt), x = input.contiguous(fmt);
      if (!depthwise_nhwc_fast_grad_weight(go, x, grad_weight, s))
        grad_weight_nhwc<scalar_t>(go, x, grad_weight, s);
    } else {
      grad_weight_nchw<scalar_t>(grad_output.contiguous(), input.contiguous(), grad_weight, s);
    }
  });
  return grad_weight;
}

// grad_input, grad_weight (and grad_bias) in one call: the autograd formula uses it when both
// gradients are needed. The fused float32 kernels read grad_output once instead of twice; other
// shapes and dtypes run the two kernels above.
std::vector<at::Tensor> depthwise_conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool bias_grad) {
  constexpr const char* op = "_depthwise_conv2d_backward";
  const Conv2dShape s =
      check_depthwise_backward(op, grad_output, input, weight, stride, padding, dilation);
  // the layouts the separate ops would produce and read (grad_input: grad_output's or weight's
  // format; grad_weight: grad_output's or input's); fused only when they agree
  const auto fmt = conv_memory_format(grad_output, weight);
  if (grad_output.numel() > 0 && grad_output.scalar_type() == at::kFloat &&
      fmt == conv_memory_format(grad_output, input)) {
    const Tensor go = grad_output.contiguous(fmt), x = input.contiguous(fmt);
    const Tensor w = weight.contiguous();
    Tensor grad_input = at::empty(input.sizes(), grad_output.options().memory_format(fmt));
    advise_huge_pages(grad_input);
    Tensor grad_weight = at::empty(weight.sizes(), grad_output.options());
    Tensor grad_bias = bias_grad ? at::empty({s.out_channels}, grad_output.options()) : Tensor();
    const bool done = fmt == at::MemoryFormat::ChannelsLast
                          ? depthwise_nhwc_fast_backward(go, x, w, grad_input, grad_weight,
                                                         grad_bias, s)
                          : backward_nchw_fused(go, x, w, grad_input, grad_weight, grad_bias, s);
    if (done) {
      std::vector<at::Tensor> grads{grad_input, grad_weight};
      if (bias_grad) grads.push_back(grad_bias);
      return grads;
    }
  }
  return depthwise_backward_unfused(grad_output, input, weight, stride, padding, dilation,
                                    bias_grad, depthwise_conv2d_grad_input_cpu,
                                    depthwise_conv2d_grad_weight_cpu);
}

TORCH_LIBRARY_IMPL(fastconv, CPU, m) {
  m.impl("depthwise_conv2d", &depthwise_conv2d_forward_cpu);
  m.impl("_depthwise_conv2d_grad_input", &depthwise_conv2d_grad_input_cpu);
  m.impl("_depthwise_conv2d_grad_weight", &depthwise_conv2d_grad_weight_cpu);
  m.impl("_depthwise_conv2d_backward", &depthwise_conv2d_backward_cpu);
}

}  // namespace fastconv
