#pragma once
// static_for<N>(f): calls f(std::integral_constant<int, 0>()), ..., f(<N - 1>) — a loop whose
// index is a compile-time constant in the body (immediate operands such as valignd's shift,
// fully unrolled register-blocked kernels).

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

}  // namespace fastconv
