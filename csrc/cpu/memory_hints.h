#pragma once
// Memory-traffic helpers shared by the CPU depthwise kernels: software prefetch into L1, and the
// streaming (non-temporal) store threshold and fence.

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace at {
class Tensor;
}

namespace fastconv {

// Software prefetch of memory a kernel will read next (the next plane or image row) while it
// computes on the current one: the hardware prefetchers follow a stream only while it is being
// read, and these kernels alternate short copy bursts with long compute phases (or read a row
// in strided passes), so without this every burst would wait for DRAM. Prefetches slice i of n
// of [p, p + bytes) into L1 (T0), so a caller can spread the requests over its loop. T0 against
// the T1 (L2) used before, in one process, alternating (bench shape, 2 threads, cold): the
// channels_last 3x3 forward 0.584 -> 0.459 ms (20 rounds; a streaming copy of its bytes 0.432),
// 7x7 0.939 -> 0.889, the 3x3 grad_weight op 0.729 -> 0.672, the fused 3x3 backward the same
// (0.944 / 0.965, 0.885 / 0.873); through autograd, NCHW 3x3 forward 0.713 -> 0.599 ms. The
// empty asm keeps GCC from deeming the function pure (__builtin_prefetch has no side effects of
// its own) and deleting calls to it.
inline void prefetch_slice(const void* p, int64_t bytes, int64_t i, int64_t n) {
  if (p == nullptr || n <= 0) return;
  const char* b = static_cast<const char*>(p);
  const int64_t chunk = (bytes / n + 64) & ~int64_t(63);
  const int64_t end = std::min(bytes, (i + 1) * chunk);
  for (int64_t o = i * chunk; o < end; o += 64) {
    __builtin_prefetch(b + o, 0, 3);
    asm volatile("");
  }
}

// Outputs at least this large are written with streaming stores: they would not stay in cache
// anyway, and streaming skips reading every line before it is written (a third of the traffic
// of a memory-bound layer). Stores need 64-byte aligned addresses.
constexpr int64_t kStreamingStoreBytes = int64_t(8) << 20;

// Whether an output of `bytes` bytes at `out` takes the streaming stores (large enough, and
// 64-byte aligned).
inline bool stream_output(const void* out, int64_t bytes) {
  return bytes >= kStreamingStoreBytes && reinterpret_cast<uintptr_t>(out) % 64 == 0;
}

// dst (64-byte aligned) = src (64-byte aligned) for [begin, end), multiples of 16 floats, with
// streaming stores; the caller fences.
inline void stream_copy(float* dst, const float* src, int64_t begin, int64_t end) {
#if defined(__AVX512F__)
  for (int64_t i = begin; i < end; i += 16) _mm512_stream_ps(dst + i, _mm512_load_ps(src + i));
#else
  std::copy(src + begin, src + end, dst + begin);
#endif
}

// Memory traffic a kernel spreads over the blocks of one task: prefetches of up to two byte
// ranges (the data the next task will read) and the streaming copy of one finished plane (the
// previous task's output, from an aligned scratch buffer). part(i, n) does the i-th of n slices
// of each; kernels call it once per block of work, with n of the order of the task's blocks, so
// that requests and stores trickle out between the FMAs. In one burst they stall the core:
// prefetching a whole 12-32 KiB plane or row at once fills the core's miss buffers and stalls
// the loads behind it (measured: a burst per task made the cold NCHW grad_weight 1.14 ms, one
// slice per row of its plane 0.85), and 12 KiB of streaming stores at the end of a task wait
// for the write-combining buffers to drain. The output slices are tracked (`streamed`), so
// finish() completes the copy whatever slices the kernel asked for; a Trickle that streams is
// passed by reference, never copied.
struct Trickle {
  const char* base[2] = {nullptr, nullptr};
  int64_t bytes[2] = {0, 0};
  float* out = nullptr;          // streaming copy: out[0, count) = from[0, count)
  const float* from = nullptr;
  int64_t count = 0;
  mutable int64_t streamed = 0;  // elements copied so far

  Trickle() = default;
  template <typename T>
  Trickle(const T* p, int64_t n) {
    add(p, n);
  }
  template <typename T>
  Trickle& add(const T* p, int64_t n) {
    const int i = base[0] == nullptr ? 0 : 1;
    base[i] = reinterpret_cast<const char*>(p);
    bytes[i] = n * static_cast<int64_t>(sizeof(T));
    return *this;
  }
  // dst and src 64-byte aligned, n a multiple of 16
  Trickle& stream(float* dst, const float* src, int64_t n) {
    out = dst;
    from = src;
    count = n;
    streamed = 0;
    return *this;
  }
  void part(int64_t i, int64_t n) const {
    prefetch_slice(base[0], bytes[0], i, n);
    prefetch_slice(base[1], bytes[1], i, n);
    if (out != nullptr && n > 0) {
      const int64_t upto = std::min(count, ((i + 1) * count / n + 15) / 16 * 16);
      if (upto > streamed) {
        stream_copy(out, from, streamed, upto);
        streamed = upto;
      }
    }
  }
  void finish() const {
    if (out != nullptr && streamed < count) {
      stream_copy(out, from, streamed, count);
      streamed = count;
    }
  }
};

// Asks the OS (Linux, transparent huge pages in "madvise" mode) to back the 2 MiB-aligned part
// of a CPU tensor just allocated (at::empty) with huge pages before it is first written. An
// output that glibc hands out fresh from the OS is otherwise faulted in 4 KiB at a time: 3,500
// page faults for a 14 MiB output, which measured 6.5 ms single-threaded here, 1.2-2.0 ms with
// huge pages. Memory the process already holds is unaffected. Outputs under 4 MiB are left
// alone; FASTCONV_HUGE_PAGES=0 in the environment turns this off.
void advise_huge_pages(const at::Tensor& fresh);

// After a thread's last streaming store.
inline void nt_fence() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}

}  // namespace fastconv
