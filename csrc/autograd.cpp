// Autograd for the three forward ops (conv2d, depthwise_conv2d, max_pool2d), registered for the
// Autograd key in C++ (TORCH_LIBRARY_IMPL(fastconv, Autograd, ...)), as torchvision registers
// its ops'. Their fake kernels, and the autograd kernels of the backward ops (which make a
// double backward a clear error), are Python, in fastconv/_registrations.py.
//
// Why C++: a Python formula (torch.library.register_autograd) runs torch.autograd.Function's
// Python machinery twice per call (forward and backward). Measured in alternating processes (2
// threads, depthwise 3x3 channels_last, fwd+bwd through autograd): N=1, C=32, 16x16 took 61-72
// us with the Python formulas and takes 35-45 us with these (the two op calls alone: 21-28 us);
// N=8, C=32, 28x28: 145-166 -> 102-119 us.
//
// The formulas:
// - conv2d: grad_input = _conv2d_grad_input, grad_weight = _conv2d_grad_weight, grad_bias =
//   grad_output summed over (N, H, W); algo="auto" on a depthwise shape (groups == C_in > 1,
//   weight.size(0) a multiple of C_in) takes _depthwise_conv2d_backward for all three at once
//   when both grad_input and grad_weight are needed (its CPU kernels read grad_output once).
// - depthwise_conv2d: the same with the depthwise ops.
// - max_pool2d: _max_pool2d_backward from the forward's indices (an integer output, so never
//   differentiable; not marked as such, which compiled autograd does not accept).
// Each gradient is computed only when autograd needs it (needs_input_grad).
//
// Forward-mode AD (torch.autograd.forward_ad, torch.func.jvp / jacfwd): the ops are linear in
// each tensor argument, so an output's tangent is the op applied to the tangents (conv:
// conv(dx, w) + conv(x, dw) + db; max_pool2d: dx gathered at the forward's indices), computed
// with the ops themselves and attached to the output (level 0, as torch's own formulas do).
// The primal values run through the reverse-mode path above, so both modes compose.

#include "common/ops.h"

#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace fastconv {
namespace {

using at::IntArrayRef;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using namespace ops;

bool requires_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
bool requires_grad(const c10::optional<at::Tensor>& t) {
  return t.has_value() && requires_grad(*t);
}

// Whether the call needs an autograd node: grad mode on and some tensor argument requiring
// grad. Otherwise the op goes straight to its kernel, as the Python formulas did.
template <typename... Ts>
bool needs_graph(const Ts&... tensors) {
  return at::GradMode::is_enabled() && (requires_grad(tensors) || ...);
}

// The tangent a tensor argument carries for forward-mode AD (undefined if none), and the
// tensor without it (a view that keeps its reverse-mode history).
at::Tensor tangent(const at::Tensor& t) { return t.defined() ? t._fw_grad(/*level=*/0) : t; }
at::Tensor tangent(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? tangent(*t) : at::Tensor();
}
at::Tensor primal(const at::Tensor& t) {
  return tangent(t).defined() ? t._fw_primal(/*level=*/0) : t;
}
c10::optional<at::Tensor> primal(const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) return t;
  return primal(*t);
}

// The tangent of out = op(x, w) + b for tangents tx, tw, tb of its arguments (undefined ones
// are zero): op is linear in each, so it is op(tx, w) + op(x, tw) + tb, `op(a, b)` running the
// op without bias; attached to `out`.
template <typename Op>
void set_conv_tangent(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                      const at::Tensor& tx, const at::Tensor& tw, const at::Tensor& tb,
                      const Op& op) {
  at::Tensor t;
  if (tx.defined()) t = op(tx, w);
  if (tw.defined()) {
    const at::Tensor u = op(x, tw);
    t = t.defined() ? t.add(u) : u;
  }
  if (tb.defined()) {
    const at::Tensor b = tb.view({1, -1, 1, 1});
    t = t.defined() ? t.add(b) : b.expand(out.sizes()).clone(out.suggest_memory_format());
  }
  out._set_fw_grad(t, /*level=*/0, /*is_inplace_op=*/false);
}

// In a backward, grad mode is on only under create_graph=True. Then the backward ops run
// through their own autograd kernels (Python), which make a backward through them raise
// "double backward is not supported"; otherwise they go straight to their kernels.
struct BackwardCalls {
  std::optional<at::AutoDispatchBelowADInplaceOrView> below;
  BackwardCalls() {
    if (!at::GradMode::is_enabled()) below.emplace();
  }
};

void save_ints(AutogradContext* ctx, const char* key, IntArrayRef v) {
  ctx->saved_data[key] = v.vec();
}

std::vector<int64_t> ints(AutogradContext* ctx, const char* key) {
  return ctx->saved_data[key].toIntVector();
}

// groups == C_in > 1 and weight.size(0) a multiple of C_in: what conv2d's algo="auto" runs on
// the depthwise kernels (csrc/cpu/conv2d.cpp, csrc/cuda/conv2d.cu).
bool depthwise_shaped(const at::Tensor& input, const at::Tensor& weight, int64_t groups) {
  const c10::SymInt c_in = input.sym_size(1);
  return groups > 1 && c_in == groups && weight.sym_size(0) % c_in == 0;
}

// What both convolutions save for their backward (input, weight, stride, padding, dilation,
// whether there is a bias), and what ConvBackward reads back from it.
void save_conv(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
               const c10::optional<at::Tensor>& bias, IntArrayRef stride, IntArrayRef padding,
               IntArrayRef dilation) {
  ctx->save_for_backward({input, weight});
  save_ints(ctx, "stride", stride);
  save_ints(ctx, "padding", padding);
  save_ints(ctx, "dilation", dilation);
  ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
}

struct ConvBackward {
  variable_list saved;  // input, weight
  at::Tensor grad;
  std::vector<int64_t> stride, padding, dilation;
  bool need_input, need_weight, need_bias;

  ConvBackward(AutogradContext* ctx, const variable_list& grads)
      : saved(ctx->get_saved_variables()),
        grad(grads[0]),
        stride(ints(ctx, "stride")),
        padding(ints(ctx, "padding")),
        dilation(ints(ctx, "dilation")),
        need_input(ctx->needs_input_grad(0)),
        need_weight(ctx->needs_input_grad(1)),
        need_bias(ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) {}

  const at::Tensor& input() const { return saved[0]; }
  const at::Tensor& weight() const { return saved[1]; }

  // out[0..2] = grad_input, grad_weight (and the bias gradient) from one
  // _depthwise_conv2d_backward call
  void depthwise_fused(variable_list& out) const {
    std::vector<at::Tensor> g = depthwise_backward_op().call(grad, input(), weight(), stride,
                                                             padding, dilation, need_bias);
    out[0] = g[0];
    out[1] = g[1];
    if (need_bias) out[2] = g[2];
  }

  void bias(variable_list& out) const {
    if (need_bias) out[2] = grad.sum({0, 2, 3});
  }
};

// ---------------------------------------------------------------------------------------------
// conv2d
// ---------------------------------------------------------------------------------------------

struct Conv2dFunction : public torch::autograd::Function<Conv2dFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                            int64_t groups, c10::string_view algo) {
    save_conv(ctx, input, weight, bias, stride, padding, dilation);
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["algo"] = std::string(algo);
    at::AutoDispatchBelowADInplaceOrView below;
    return conv2d_op().call(input, weight, bias, stride, padding, dilation, groups, algo);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const ConvBackward b(ctx, grads);
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const std::string algo = ctx->saved_data["algo"].toStringRef();

    BackwardCalls calls;
    variable_list out(8);  // one per forward argument; the non-tensor ones stay undefined
    if (algo == "auto" && b.need_input && b.need_weight &&
        depthwise_shaped(b.input(), b.weight(), groups)) {
      b.depthwise_fused(out);
      return out;
    }
    if (b.need_input)
      out[0] = conv2d_grad_input_op().call(b.grad, b.weight(), b.input().sym_sizes(), b.stride,
                                           b.padding, b.dilation, groups, algo);
    if (b.need_weight)
      out[1] = conv2d_grad_weight_op().call(b.grad, b.input(), b.weight().sym_sizes(), b.stride,
                                            b.padding, b.dilation, groups, algo);
    b.bias(out);
    return out;
  }
};

at::Tensor conv2d_autograd(const at::Tensor& input, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, IntArrayRef stride,
                           IntArrayRef padding, IntArrayRef dilation, int64_t groups,
                           c10::string_view algo) {
  const at::Tensor tx = tangent(input), tw = tangent(weight), tb = tangent(bias);
  if (tx.defined() || tw.defined() || tb.defined()) {
    const at::Tensor x = primal(input), w = primal(weight);
    at::Tensor out = conv2d_autograd(x, w, primal(bias), stride, padding, dilation, groups, algo);
    set_conv_tangent(out, x, w, tx, tw, tb, [&](const at::Tensor& a, const at::Tensor& b) {
      return conv2d_op().call(a, b, c10::nullopt, stride, padding, dilation, groups, algo);
    });
    return out;
  }
  if (!needs_graph(input, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return conv2d_op().call(input, weight, bias, stride, padding, dilation, groups, algo);
  }
  return Conv2dFunction::apply(input, weight, bias, stride, padding, dilation, groups, algo);
}

// ---------------------------------------------------------------------------------------------
// depthwise_conv2d
// ---------------------------------------------------------------------------------------------

struct DepthwiseFunction : public torch::autograd::Function<DepthwiseFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation) {
    save_conv(ctx, input, weight, bias, stride, padding, dilation);
    at::AutoDispatchBelowADInplaceOrView below;
    return depthwise_op().call(input, weight, bias, stride, padding, dilation);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const ConvBackward b(ctx, grads);
    BackwardCalls calls;
    variable_list out(6);
    if (b.need_input && b.need_weight) {
      b.depthwise_fused(out);
      return out;
    }
    if (b.need_input)
      out[0] = depthwise_grad_input_op().call(b.grad, b.weight(), b.input().sym_sizes(),
                                              b.stride, b.padding, b.dilation);
    if (b.need_weight)
      out[1] = depthwise_grad_weight_op().call(b.grad, b.input(), b.weight().sym_sizes(),
                                               b.stride, b.padding, b.dilation);
    b.bias(out);
    return out;
  }
};

at::Tensor depthwise_autograd(const at::Tensor& input, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, IntArrayRef stride,
                              IntArrayRef padding, IntArrayRef dilation) {
  const at::Tensor tx = tangent(input), tw = tangent(weight), tb = tangent(bias);
  if (tx.defined() || tw.defined() || tb.defined()) {
    const at::Tensor x = primal(input), w = primal(weight);
    at::Tensor out = depthwise_autograd(x, w, primal(bias), stride, padding, dilation);
    set_conv_tangent(out, x, w, tx, tw, tb, [&](const at::Tensor& a, const at::Tensor& b) {
      return depthwise_op().call(a, b, c10::nullopt, stride, padding, dilation);
    });
    return out;
  }
  if (!needs_graph(input, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return depthwise_op().call(input, weight, bias, stride, padding, dilation);
  }
  return DepthwiseFunction::apply(input, weight, bias, stride, padding, dilation);
}

// ---------------------------------------------------------------------------------------------
// max_pool2d
// ---------------------------------------------------------------------------------------------

// Along one dimension: whether output position o's window has a tap inside [0, size).
// Tensor ops only (no data pointers): under torch.func the result is a functorch wrapper.
at::Tensor window_reads_input(int64_t out, int64_t size, int64_t k, int64_t s, int64_t p,
                              int64_t d, const at::TensorOptions& opts) {
  const at::Tensor start = at::arange(out, opts.dtype(at::kLong)).mul(s).sub(p);
  // the first tap at or past position 0: ceil(-start / d) for a window starting in padding
  const at::Tensor t0 = start.neg().add(d - 1).div(d, "floor").clamp_min(0);
  return t0.lt(k).logical_and(start.add(t0.mul(d)).lt(size));
}

struct MaxPool2dFunction : public torch::autograd::Function<MaxPool2dFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               IntArrayRef kernel_size, IntArrayRef stride, IntArrayRef padding,
                               IntArrayRef dilation, bool ceil_mode, c10::string_view indices) {
    at::Tensor out, idx;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(out, idx) = max_pool2d_op().call(input, kernel_size, stride, padding, dilation,
                                                ceil_mode, indices);
    }
    // The indices are an integer tensor (int64, or uint8 for 'compact'; an empty int64 one for
    // 'none'), which autograd never differentiates, so they need no mark_non_differentiable;
    // compiled autograd (torch._dynamo.compiled_autograd) rejects a C++ node whose context
    // marks any. They get no gradient: do not make autograd fill one with zeros.
    TORCH_INTERNAL_ASSERT(!at::isFloatingType(idx.scalar_type()) &&
                          !at::isComplexType(idx.scalar_type()));
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({input, idx});
    save_ints(ctx, "kernel_size", kernel_size);
    save_ints(ctx, "stride", stride);
    save_ints(ctx, "padding", padding);
    save_ints(ctx, "dilation", dilation);
    ctx->saved_data["ceil_mode"] = ceil_mode;
    ctx->saved_data["indices_none"] = indices == "none";
    return {out, idx};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!ctx->saved_data["indices_none"].toBool(),
                "max_pool2d: the backward needs the forward's indices, but the op was called "
                "with indices='none'; call it with indices='compact' (or 'full'), as "
                "fastconv.max_pool2d does when the input requires grad");
    variable_list out(7);
    const at::Tensor& grad = grads[0];
    if (!grad.defined() || !ctx->needs_input_grad(0)) return out;  // undefined: zero
    const variable_list saved = ctx->get_saved_variables();
    BackwardCalls calls;
    out[0] = max_pool2d_backward_op().call(
        grad, saved[0], saved[1], ints(ctx, "kernel_size"), ints(ctx, "stride"),
        ints(ctx, "padding"), ints(ctx, "dilation"), ctx->saved_data["ceil_mode"].toBool());
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> max_pool2d_autograd(const at::Tensor& input,
                                                       IntArrayRef kernel_size,
                                                       IntArrayRef stride, IntArrayRef padding,
                                                       IntArrayRef dilation, bool ceil_mode,
                                                       c10::string_view indices) {
  const at::Tensor tx = tangent(input);
  if (tx.defined()) {
    const at::Tensor x = primal(input);
    auto [out, idx] = max_pool2d_autograd(x, kernel_size, stride, padding, dilation, ceil_mode,
                                          indices);
    at::Tensor full = idx;
    if (indices != "full") {  // the tangent needs torch's indices; only dual inputs pay this
      at::AutoDispatchBelowADInplaceOrView below;
      full = std::get<1>(max_pool2d_op().call(x, kernel_size, stride, padding, dilation,
                                              ceil_mode, "full"));
    }
    // A window that reads no input (-inf; its index is where its scan would start, maybe
    // another element or past the plane) has tangent 0.
    const int64_t plane = x.size(2) * x.size(3);
    const at::Tensor reads =
        window_reads_input(out.size(2), x.size(2), kernel_size[0], stride[0], padding[0],
                           dilation[0], x.options())
            .view({-1, 1})
            .logical_and(window_reads_input(out.size(3), x.size(3), kernel_size[1], stride[1],
                                            padding[1], dilation[1], x.options()));
    const at::Tensor t = tx.flatten(2)
                             .gather(2, full.flatten(2).clamp(0, std::max<int64_t>(plane - 1, 0)))
                             .view(out.sizes())
                             .masked_fill(reads.logical_not(), 0);
    out._set_fw_grad(t, /*level=*/0, /*is_inplace_op=*/false);
    return {out, idx};
  }
  if (!needs_graph(input)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return max_pool2d_op().call(input, kernel_size, stride, padding, dilation, ceil_mode,
                                indices);
  }
  variable_list r = MaxPool2dFunction::apply(input, kernel_size, stride, padding, dilation,
                                             ceil_mode, indices);
  return {r[0], r[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, Autograd, m) {
  m.impl("conv2d", &conv2d_autograd);
  m.impl("depthwise_conv2d", &depthwise_autograd);
  m.impl("max_pool2d", &max_pool2d_autograd);
}

}  // namespace fastconv
