#include "cpu/memory_hints.h"

#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastconv {

namespace {
bool huge_pages_enabled() {
  const char* e = std::getenv("FASTCONV_HUGE_PAGES");
  return e == nullptr || std::strcmp(e, "0") != 0;
}
}  // namespace

void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (p == nullptr || bytes < int64_t(4) << 20 || !huge_pages_enabled()) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes)) &
                        ~(kHuge - 1);
  // a hint: an older kernel or THP set to "never" refuses it, and nothing changes
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

}  // namespace fastconv
