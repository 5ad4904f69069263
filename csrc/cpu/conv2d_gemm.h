#pragma once
// Small single-threaded GEMM kernels for the im2col algorithm (float32 / float64, AVX-512):
//   gemm:    C[M, N] (row-major, ldc) = (accumulate ? C : bias) + A[M, K] @ B[K, N]
//   gemm_nt: C[M, N] += A[M, K] @ B[N, K]^T                          (grad_weight)
//
// Why not at::mm: on the AMD EPYC this project targets, MKL's sgemm takes its AVX2 path and
// runs at about a third of this kernel's rate (about half of oneDNN's AVX-512 convolution),
// and a GEMM of our own can read B straight from the image / grad_output.
//
// gemm (Goto / BLIS, without B packing): A is packed once into MR-row panels ([K][MR] each);
// B is read in place, row by row, from any row-major [K, N] source (the image itself for a
// 1x1 convolution, grad_output, an im2col block). An MR x NR register-blocked micro-kernel
// walks A panel (outer, stays in L1: KC * MR elements) x B panel (inner, from L2: the B
// block is KC x NC). It keeps the 8 x 48 (float32; 8 x 24 float64) tile of C in 24 zmm
// registers and per k does 3 vector loads of B, 8 broadcasts of A and 24 FMAs, so it is
// FMA-bound as long as the B block stays in L2: measured 270 GFLOP/s from L1 and 240-280
// from L2 with strided B rows on one Zen 5 core (peak ~280), which is why B is not packed
// (packing cost more than it saved).
//
// gemm_nt: see dot_kernel below; about 180 GFLOP/s on the same core.

#if defined(__AVX512F__)
#define FASTCONV_HAVE_AVX512_GEMM 1
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace fastconv {
namespace gemm {

template <typename T>
struct Simd;

template <>
struct Simd<float> {
  using V = __m512;
  using Mask = __mmask16;
  static constexpr int kLanes = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float a) { return _mm512_set1_ps(a); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store(float* p, V v, Mask m) { _mm512_mask_storeu_ps(p, m, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static void stream(float* p, V v) { _mm512_stream_ps(p, v); }  // p 64-byte aligned
  // Horizontal sum in a fixed order. (GCC 12's _mm512_reduce_add_* and unmasked 512-bit
  // shuffles trip -Wmaybe-uninitialized inside its own headers; the maskz forms do not.)
  static float reduce(V v) {
    V t = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(0xFFFF, v, v, 0x4E));
    t = _mm512_add_ps(t, _mm512_maskz_shuffle_f32x4(0xFFFF, t, t, 0xB1));
    __m128 q = _mm512_maskz_extractf32x4_ps(0xF, t, 0);
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
  }
  // The empty asm keeps GCC from folding load + zeroing into a (slow) masked load.
  static V load_zero_masked(Mask m, const float* p) {
    V v = _mm512_loadu_ps(p);
    __asm__("" : "+v"(v));
    return _mm512_maskz_mov_ps(m, v);
  }
};

template <>
struct Simd<double> {
  using V = __m512d;
  using Mask = __mmask8;
  static constexpr int kLanes = 8;
  static V zero() { return _mm512_setzero_pd(); }
  static V set1(double a) { return _mm512_set1_pd(a); }
  static V load(const double* p) { return _mm512_loadu_pd(p); }
  static V load(const double* p, Mask m) { return _mm512_maskz_loadu_pd(m, p); }
  static void store(double* p, V v) { _mm512_storeu_pd(p, v); }
  static void store(double* p, V v, Mask m) { _mm512_mask_storeu_pd(p, m, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static V add(V a, V b) { return _mm512_add_pd(a, b); }
  static void stream(double* p, V v) { _mm512_stream_pd(p, v); }
  static double reduce(V v) {
    V t = _mm512_add_pd(v, _mm512_maskz_shuffle_f64x2(0xFF, v, v, 0x4E));
    t = _mm512_add_pd(t, _mm512_maskz_shuffle_f64x2(0xFF, t, t, 0xB1));
    const __m128d q = _mm_castps_pd(_mm512_maskz_extractf32x4_ps(0xF, _mm512_castpd_ps(t), 0));
    return _mm_cvtsd_f64(_mm_add_sd(q, _mm_unpackhi_pd(q, q)));
  }
  static V load_zero_masked(Mask m, const double* p) {
    V v = _mm512_loadu_pd(p);
    __asm__("" : "+v"(v));
    return _mm512_maskz_mov_pd(m, v);
  }
};

// Lanes [lo, hi) of a vector of L lanes as a mask (clamped to [0, L)).
template <typename T>
inline typename Simd<T>::Mask lane_mask(int64_t lo, int64_t hi) {
  constexpr int64_t L = Simd<T>::kLanes;
  lo = std::max<int64_t>(lo, 0);
  hi = std::min<int64_t>(hi, L);
  if (hi <= lo) return 0;
  return static_cast<typename Simd<T>::Mask>(((uint32_t{1} << hi) - 1u) ^ ((uint32_t{1} << lo) - 1u));
}

// MR rows x NV vectors of C live in registers: 8 x 3 = 24 accumulators + 3 B vectors + 1 A
// broadcast out of 32 zmm registers.
constexpr int kMR = 8;
constexpr int kNV = 3;
template <typename T, int NV = kNV>
constexpr int nr() { return NV * Simd<T>::kLanes; }
// The channels_last kernels (conv2d_nhwc.cpp), whose N is a channel count, also instantiate
// the micro-kernel with 6 x 4 and 8 x 2 vector tiles.
// Rows of B (K) per block: the A micro-panel (KC * MR elements, 8 KiB) stays in L1.
constexpr int64_t kKC = 256;

inline int64_t packed_a_size(int64_t M, int64_t K) { return (M + kMR - 1) / kMR * kMR * K; }

// How the micro-kernel reads its operands: A(r, k) is element (r, k) of the MR-row A panel,
// B(k) points at row k of the B panel (NR values), C(r) at row r of the C tile. The A panel
// comes packed ([k][kMR]), as columns of a row-major matrix (its k-th row holds the panel's MR
// values, rows lda apart), or as MR row pointers (the rows of an implicit im2col, a zero row
// where a tap reads padding); B and C as rows ld apart or as one pointer per row.
template <typename T>
struct PackedA {
  const T* a;
  T operator()(int r, int64_t k) const { return a[k * kMR + r]; }
};
template <typename T>
struct ColumnsA {
  const T* a;
  int64_t lda;
  T operator()(int r, int64_t k) const { return a[k * lda + r]; }
};
template <typename T, int MR = kMR>
struct PtrA {
  const T* p[MR];
  T operator()(int r, int64_t k) const { return p[r][k]; }
};
template <typename T>
struct RowsB {
  const T* b;
  int64_t ldb;
  const T* operator()(int64_t k) const { return b + k * ldb; }
};
template <typename T>
struct PtrB {
  const T* const* rows;
  int64_t off;  // column offset into every row
  const T* operator()(int64_t k) const { return rows[k] + off; }
};
template <typename T>
struct RowsC {
  T* c;
  int64_t ldc;
  T* operator()(int r) const { return c + r * ldc; }
};
template <typename T>
struct PtrC {
  T* const* rows;
  int64_t off;
  T* operator()(int r) const { return rows[r] + off; }
};
// PtrC whose whole vectors are written with streaming stores when the tile is not accumulated
// into (the caller guarantees 64-byte aligned vectors, that no later call adds to the tile,
// and fences).
template <typename T>
struct StreamPtrC : PtrC<T> {
  static constexpr bool kStream = true;
};
template <typename COp>
constexpr bool streams_c = requires { COp::kStream; };

// C[0:mr, 0:ncols] (= or +=) A_panel @ B_panel over kc, NR values of each B row (a packed
// panel, straight rows of a row-major matrix: the image, grad_output, an im2col block, or
// gathered rows). `bias` (per row) seeds a fresh tile.
// noinline: inlined into a big caller, GCC spills the 24 accumulators inside the k loop.
template <typename T, int MR = kMR, int NV = kNV, typename AOp, typename BOp, typename COp>
__attribute__((noinline)) void micro_kernel(int64_t kc, AOp a, BOp b, COp c, int mr, int ncols,
                                            bool accumulate, const T* bias) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int L = S::kLanes;
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = S::zero();
  }
  for (int64_t k = 0; k < kc; ++k) {
    const T* brow = b(k);
    V bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = S::load(brow + v * L);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const V av = S::set1(a(r, k));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = S::fma(av, bv[v], acc[r][v]);
    }
  }
  // r runs to the constant MR (and breaks at mr) so that the loops unroll and every acc[r][v]
  // is a register: with a bound known only at run time GCC keeps acc on the stack, which costs
  // 72 vector stores and loads per call, a sixth of a 24-deep reduction's time.
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    if (r >= mr) break;
    T* crow = c(r);
    const V seed = (!accumulate && bias != nullptr) ? S::set1(bias[r]) : S::zero();
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const int valid = ncols - v * L;
      if (valid <= 0) break;
      V out = S::add(acc[r][v], seed);
      if (valid >= L) {
        if constexpr (streams_c<COp>) {
          if (!accumulate) {
            S::stream(crow + v * L, out);
            continue;
          }
        }
        if (accumulate) out = S::add(out, S::load(crow + v * L));
        S::store(crow + v * L, out);
      } else {
        const typename S::Mask m = lane_mask<T>(0, valid);
        if (accumulate) out = S::add(out, S::load(crow + v * L, m));
        S::store(crow + v * L, out, m);
      }
    }
  }
}

// Panels [p0, p1) of pack_a below.
template <typename T>
void pack_a_panels(const T* a, int64_t rs, int64_t cs, int64_t M, int64_t K, T* ap, int64_t p0,
                   int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    T* dst = ap + p * K * kMR;
    const int64_t mr = std::min<int64_t>(kMR, M - p * kMR);
    const T* src = a + p * kMR * rs;
    if (rs == 1 && mr == kMR) {
      // A transposed in memory (a weight W^T): the panel's kMR rows are contiguous at each k,
      // so read and write kMR elements at a time (row by row, every read was cs apart)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t r = 0; r < kMR; ++r) dst[k * kMR + r] = src[k * cs + r];
      continue;
    }
    for (int64_t r = 0; r < kMR; ++r) {
      if (r >= mr) {
        for (int64_t k = 0; k < K; ++k) dst[k * kMR + r] = T(0);
        continue;
      }
      const T* row = src + r * rs;
      for (int64_t k = 0; k < K; ++k) dst[k * kMR + r] = row[k * cs];
    }
  }
}

// Packs A (element (m, k) at a[m * rs + k * cs]) into MR-row panels: ap[p][k][r], zero rows
// past M.
template <typename T>
void pack_a(const T* a, int64_t rs, int64_t cs, int64_t M, int64_t K, T* ap) {
  pack_a_panels(a, rs, cs, M, K, ap, 0, (M + kMR - 1) / kMR);
}

// Columns per block of N: the B block (kKC x kNC elements, 480 KiB in float32 and in float64)
// stays in L2 while every A panel runs over it.
template <typename T>
constexpr int64_t nc() { return 10 * nr<T>(); }

// A block of B handed to the driver: panel q (columns [q * NR, q * NR + NR) of the block)
// starts at ptr + q * panel_stride and its rows are ld apart. NR-wide packed panels
// ([panel][k][NR]): {bp, NR, kc * NR}; a row-major matrix read in place: {&B(k0, n0), ld, NR}.
template <typename T>
struct BBlock {
  const T* ptr;
  int64_t ld, panel_stride;
};

// The partial last panel of an in-place B (kc rows of `tail` < NR values, row k at b(k)) copied,
// zero-padded to NR, into edge: the micro-kernel then never reads past the end of B and needs
// no masked variant.
template <typename T, int NR = nr<T>(), typename BOp>
const T* edge_panel(BOp b, int64_t kc, int64_t tail, T* edge) {
  for (int64_t k = 0; k < kc; ++k) {
    const T* row = b(k);
    std::copy(row, row + tail, edge + k * NR);
    std::fill(edge + k * NR + tail, edge + (k + 1) * NR, T(0));
  }
  return edge;
}

// C = (accumulate ? C : bias) + A @ B, A prepacked by pack_a. B comes from
// `get_b(k0, kc, n0, ncols)` -> BBlock<T> for rows [k0, k0 + kc) and columns [n0, n0 + ncols)
// (n0 a multiple of nc<T>()); it may pack on demand, point into B packed ahead, or point
// straight into a row-major B.
template <typename T, typename GetB>
void gemm(int64_t M, int64_t N, int64_t K, const T* ap, GetB&& get_b, T* c, int64_t ldc,
          bool accumulate, const T* bias) {
  constexpr int NR = nr<T>();
  // A partial last panel of an in-place B is copied (zero-padded) here once per block, so
  // the micro-kernel never reads past the end of B and needs no masked variant.
  alignas(64) T edge[kKC * NR];
  for (int64_t n0 = 0; n0 < N; n0 += nc<T>()) {
    const int64_t ncols = std::min(nc<T>(), N - n0);
    const int64_t full = ncols / NR, tail = ncols % NR;
    for (int64_t k0 = 0; k0 < K; k0 += kKC) {
      const int64_t kc = std::min(kKC, K - k0);
      const BBlock<T> bb = get_b(k0, kc, n0, ncols);
      const T* tail_b = bb.ptr + full * bb.panel_stride;
      int64_t tail_ld = bb.ld;
      if (tail != 0 && bb.ld != NR) {
        tail_b = edge_panel(RowsB<T>{tail_b, bb.ld}, kc, tail, edge);
        tail_ld = NR;
      }
      const bool acc = accumulate || k0 > 0;
      for (int64_t p = 0; p * kMR < M; ++p) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, M - p * kMR));
        const T* a = ap + p * K * kMR + k0 * kMR;
        const T* bias_p = bias != nullptr ? bias + p * kMR : nullptr;
        T* cp = c + p * kMR * ldc + n0;
        for (int64_t q = 0; q < full; ++q) {
          micro_kernel<T>(kc, PackedA<T>{a}, RowsB<T>{bb.ptr + q * bb.panel_stride, bb.ld},
                          RowsC<T>{cp + q * NR, ldc}, mr, NR, acc, bias_p);
        }
        if (tail != 0) {
          micro_kernel<T>(kc, PackedA<T>{a}, RowsB<T>{tail_b, tail_ld},
                          RowsC<T>{cp + full * NR, ldc}, mr, static_cast<int>(tail), acc, bias_p);
        }
      }
    }
  }
}

// ---- C += A @ B^T with A and B both row-major along K (grad_weight) ----------------------
// dW = grad_output @ cols^T reduces over output positions, which both operands store
// contiguously; a kernel with vector lanes along K reads them in place (no packing, no
// transposition) and reduces each accumulator horizontally once at the end of a K block.

// C[m, n] += sum_k A[m, k] * B[n, k] for an MB x NB block, K elements per row.
// MB x NB = 4 x 6: 24 accumulators + 4 A vectors + 1 B vector in 32 zmm registers; per
// vector step 10 loads feed 24 FMAs.
template <typename T, int MB, int NB>
__attribute__((noinline)) void dot_kernel(int64_t K, const T* __restrict__ a, int64_t lda,
                                          const T* __restrict__ b, int64_t ldb,
                                          T* __restrict__ c, int64_t ldc) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int L = S::kLanes;
  V acc[MB][NB];
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m) {
#pragma GCC unroll 6
    for (int n = 0; n < NB; ++n) acc[m][n] = S::zero();
  }
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    V av[MB];
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) av[m] = S::load(a + m * lda + k);
#pragma GCC unroll 6
    for (int n = 0; n < NB; ++n) {
      V bv = S::load(b + n * ldb + k);
      // keep bv in a register: GCC would otherwise fold the load into all MB FMAs (MB loads)
      __asm__("" : "+v"(bv));
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) acc[m][n] = S::fma(av[m], bv, acc[m][n]);
    }
  }
  if (k < K) {
    const typename S::Mask mk = lane_mask<T>(0, K - k);
    V av[MB];
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) av[m] = S::load(a + m * lda + k, mk);
#pragma GCC unroll 6
    for (int n = 0; n < NB; ++n) {
      const V bv = S::load(b + n * ldb + k, mk);
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) acc[m][n] = S::fma(av[m], bv, acc[m][n]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    for (int n = 0; n < NB; ++n) c[m * ldc + n] += S::reduce(acc[m][n]);
  }
}

template <typename T, int MB>
void dot_kernel_rows(int nb, int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                     int64_t ldc) {
  switch (nb) {
    case 1: return dot_kernel<T, MB, 1>(K, a, lda, b, ldb, c, ldc);
    case 2: return dot_kernel<T, MB, 2>(K, a, lda, b, ldb, c, ldc);
    case 3: return dot_kernel<T, MB, 3>(K, a, lda, b, ldb, c, ldc);
    case 4: return dot_kernel<T, MB, 4>(K, a, lda, b, ldb, c, ldc);
    case 5: return dot_kernel<T, MB, 5>(K, a, lda, b, ldb, c, ldc);
    default: return dot_kernel<T, MB, 6>(K, a, lda, b, ldb, c, ldc);
  }
}

// C[M, N] (ldc) += A[M, K] (rows lda apart) @ B[N, K]^T (rows ldb apart). Blocks of 6 B rows
// (outer, kept in L1) by 4 A rows (inner); the caller keeps K near 512 so a block of B rows
// and all of A's rows stay in L1 / L2.
template <typename T>
void gemm_nt(int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb,
             T* c, int64_t ldc) {
  for (int64_t n = 0; n < N; n += 6) {
    const int nb = static_cast<int>(std::min<int64_t>(6, N - n));
    for (int64_t m = 0; m < M; m += 4) {
      const T* am = a + m * lda;
      const T* bn = b + n * ldb;
      T* cm = c + m * ldc + n;
      switch (std::min<int64_t>(4, M - m)) {
        case 1: dot_kernel_rows<T, 1>(nb, K, am, lda, bn, ldb, cm, ldc); break;
        case 2: dot_kernel_rows<T, 2>(nb, K, am, lda, bn, ldb, cm, ldc); break;
        case 3: dot_kernel_rows<T, 3>(nb, K, am, lda, bn, ldb, cm, ldc); break;
        default: dot_kernel_rows<T, 4>(nb, K, am, lda, bn, ldb, cm, ldc); break;
      }
    }
  }
}

}  // namespace gemm
}  // namespace fastconv

#endif  // __AVX512F__

// Runs the lambda with scalar_t = float or double (the dtypes the own GEMM is built for).
#ifdef FASTCONV_HAVE_AVX512_GEMM
#define FASTCONV_DISPATCH_OWN_GEMM(st, ...)                                  \
  if ((st) == at::kFloat) {                                                  \
    using scalar_t = float;                                                  \
    __VA_ARGS__();                                                           \
  } else {                                                                   \
    using scalar_t = double;                                                 \
    __VA_ARGS__();                                                           \
  }
#else
#define FASTCONV_DISPATCH_OWN_GEMM(st, ...)
#endif
