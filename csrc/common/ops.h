#pragma once
// Typed handles for calling fastconv's own ops through the dispatcher (autograd and autocast
// kernels redispatch to them): the C++ signatures of the schemas in csrc/fastconv.cpp, and one
// accessor per op that looks its handle up once.

#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>
#include <vector>

namespace fastconv {
namespace ops {

using at::IntArrayRef;

using Conv2dSig = at::Tensor(const at::Tensor&, const at::Tensor&,
                             const c10::optional<at::Tensor>&, IntArrayRef, IntArrayRef,
                             IntArrayRef, int64_t, c10::string_view);
using Conv2dGradSig = at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef,
                                 IntArrayRef, IntArrayRef, IntArrayRef, int64_t,
                                 c10::string_view);
using DepthwiseSig = at::Tensor(const at::Tensor&, const at::Tensor&,
                                const c10::optional<at::Tensor>&, IntArrayRef, IntArrayRef,
                                IntArrayRef);
using DepthwiseGradSig = at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef,
                                    IntArrayRef, IntArrayRef, IntArrayRef);
using DepthwiseBackwardSig = std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, IntArrayRef, IntArrayRef,
                                                     IntArrayRef, bool);
using MaxPoolSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, IntArrayRef,
                                                      IntArrayRef, IntArrayRef, IntArrayRef, bool,
                                                      c10::string_view);
using MaxPoolBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      IntArrayRef, IntArrayRef, IntArrayRef, IntArrayRef, bool);

template <typename Sig>
inline c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

#define FASTCONV_OP(fn, name, Sig)                                     \
  inline const c10::TypedOperatorHandle<Sig>& fn() {                  \
    static const c10::TypedOperatorHandle<Sig> h = find_op<Sig>(name); \
    return h;                                                          \
  }
FASTCONV_OP(conv2d_op, "fastconv::conv2d", Conv2dSig)
FASTCONV_OP(conv2d_grad_input_op, "fastconv::_conv2d_grad_input", Conv2dGradSig)
FASTCONV_OP(conv2d_grad_weight_op, "fastconv::_conv2d_grad_weight", Conv2dGradSig)
FASTCONV_OP(depthwise_op, "fastconv::depthwise_conv2d", DepthwiseSig)
FASTCONV_OP(depthwise_grad_input_op, "fastconv::_depthwise_conv2d_grad_input", DepthwiseGradSig)
FASTCONV_OP(depthwise_grad_weight_op, "fastconv::_depthwise_conv2d_grad_weight",
            DepthwiseGradSig)
FASTCONV_OP(depthwise_backward_op, "fastconv::_depthwise_conv2d_backward", DepthwiseBackwardSig)
FASTCONV_OP(max_pool2d_op, "fastconv::max_pool2d", MaxPoolSig)
FASTCONV_OP(max_pool2d_backward_op, "fastconv::_max_pool2d_backward", MaxPoolBackwardSig)
#undef FASTCONV_OP

}  // namespace ops
}  // namespace fastconv
