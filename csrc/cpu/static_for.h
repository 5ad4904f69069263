#pragma once
// Compile-time loops and dispatch for the CPU kernels.
// static_for<N>(f): calls f(std::integral_constant<int, 0>()), ..., f(<N - 1>) — a loop whose
// index is a compile-time constant in the body (immediate operands such as valignd's shift,
// fully unrolled register-blocked kernels).
// with_fixed_kernel(k, f): calls f(std::integral_constant<int, k>()) for the kernel sizes that
// have specialised kernels (3, 5, 7) and returns true, else returns false without calling f.

#include <cstdint>
#include <type_traits>
#include <utility>

namespace fastconv {

template <typename F, int... I>
inline void static_for_impl(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>()), ...);
}

template <int N, typename F>
inline void static_for(F&& f) {
  static_for_impl(f, std::make_integer_sequence<int, N>());
}

template <typename F>
inline bool with_fixed_kernel(int64_t k, F&& f) {
  switch (k) {
    case 3: f(std::integral_constant<int, 3>()); return true;
    case 5: f(std::integral_constant<int, 5>()); return true;
    case 7: f(std::integral_constant<int, 7>()); return true;
    default: return false;
  }
}

}  // namespace fastconv
