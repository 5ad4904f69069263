#pragma once
// Memory-traffic helpers shared by the CPU depthwise kernels: software prefetch into L2, and the
// streaming (non-temporal) store threshold and fence.

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace fastconv {

// Software prefetch of memory a kernel will read next (the next plane or image row) while it
// computes on the current one: the hardware prefetchers follow a stream only while it is being
// read, and these kernels alternate short copy bursts with long compute phases (or read a row
// in strided passes), so without this every burst would wait for DRAM. Prefetches slice i of n
// of [p, p + bytes) into L2, so a caller can spread the requests over its loop. The empty asm
// keeps GCC from deeming the function pure (__builtin_prefetch has no side effects of its own)
// and deleting calls to it.
inline void prefetch_slice(const void* p, int64_t bytes, int64_t i, int64_t n) {
  if (p == nullptr || n <= 0) return;
  const char* b = static_cast<const char*>(p);
  const int64_t chunk = (bytes / n + 64) & ~int64_t(63);
  const int64_t end = std::min(bytes, (i + 1) * chunk);
  for (int64_t o = i * chunk; o < end; o += 64) {
    __builtin_prefetch(b + o, 0, 2);
    asm volatile("");
  }
}

// Outputs at least this large are written with streaming stores: they would not stay in cache
// anyway, and streaming skips reading every line before it is written (a third of the traffic
// of a memory-bound layer). Stores need 64-byte aligned addresses.
constexpr int64_t kStreamingStoreBytes = int64_t(8) << 20;

// After a thread's last streaming store.
inline void nt_fence() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}

}  // namespace fastconv
