#pragma once
// Output-size formulas and small index helpers shared by CPU and CUDA code (host + device).

#include <c10/macros/Macros.h>

#include <cstdint>

namespace fastconv {

// torch's convolution output size: floor((in + 2p - d(k-1) - 1) / s) + 1.
C10_HOST_DEVICE inline int64_t conv_output_size(
    int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
  return (in + 2 * p - d * (k - 1) - 1) / s + 1;
}

// torch's pooling output size (ATen pooling_output_shape): with ceil_mode the last window
// must start inside the input or the left padding, never in the right padding only.
C10_HOST_DEVICE inline int64_t pool_output_size(
    int64_t in, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil_mode) {
  const int64_t numer = in + 2 * p - d * (k - 1) - 1 + (ceil_mode ? s - 1 : 0);
  // floor division that is also right for a negative numerator
  int64_t out = (numer >= 0 ? numer / s : -((-numer + s - 1) / s)) + 1;
  if (ceil_mode && (out - 1) * s >= in + p) {
    --out;
  }
  return out;
}

C10_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Smallest o >= 0 with o * s - p + t * d >= 0 ... helpers for gather-style backward loops:
// the output positions whose window tap `t` lands on input position `i` satisfy
// o * s = i + p - t * d; this returns o when it is an integer in [0, out), else -1.
C10_HOST_DEVICE inline int64_t output_for_tap(
    int64_t i, int64_t t, int64_t s, int64_t p, int64_t d, int64_t out) {
  const int64_t num = i + p - t * d;
  if (num < 0 || num % s != 0) return -1;
  const int64_t o = num / s;
  return o < out ? o : -1;
}

}  // namespace fastconv
