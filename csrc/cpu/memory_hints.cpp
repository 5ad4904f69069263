#include "cpu/memory_hints.h"

#include <ATen/core/Tensor.h>

#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastconv {

void advise_huge_pages(const at::Tensor& fresh) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  void* p = fresh.data_ptr();
  const int64_t bytes = static_cast<int64_t>(fresh.nbytes());
  if (p == nullptr || bytes < int64_t(4) << 20) return;
  // read at each call (after the size check, so small outputs skip it), so that a process can
  // switch it off at any time
  const char* setting = std::getenv("FASTCONV_HUGE_PAGES");
  if (setting != nullptr && std::strcmp(setting, "0") == 0) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes)) &
                        ~(kHuge - 1);
  // a hint: an older kernel or THP set to "never" refuses it, and nothing changes
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)fresh;
#endif
}

}  // namespace fastconv
