// Autograd for all of fastconv's ops, registered for the Autograd key in C++
// (TORCH_LIBRARY_IMPL(fastconv, Autograd, ...)), as torchvision registers its ops'. Their fake
// kernels are Python, in fastconv/_registrations.py.
//
// Why C++: a Python formula (torch.library.register_autograd) runs torch.autograd.Function's
// Python machinery twice per call (forward and backward). Measured in alternating processes (2
// threads, depthwise 3x3 channels_last, fwd+bwd through autograd): N=1, C=32, 16x16 took 61-72
// us with the Python formulas and takes 35-45 us with these (the two op calls alone: 21-28 us);
// N=8, C=32, 28x28: 145-166 -> 102-119 us.
//
// The formulas of the forward ops:
// - conv2d: grad_input = _conv2d_grad_input, grad_weight = _conv2d_grad_weight, grad_bias =
//   grad_output summed over (N, H, W); algo="auto" on a depthwise shape (groups == C_in > 1,
//   weight.size(0) a multiple of C_in) takes _depthwise_conv2d_backward for all three at once
//   when both grad_input and grad_weight are needed (its CPU kernels read grad_output once).
// - depthwise_conv2d: the same with the depthwise ops.
// - max_pool2d: _max_pool2d_backward from the forward's indices (an integer output, so never
//   differentiable; not marked as such, which compiled autograd does not accept).
// Each gradient is computed only when autograd needs it (needs_input_grad).
//
// The backward ops have formulas of their own, so gradients of gradients work
// (torch.autograd.grad(..., create_graph=True), gradcheck's gradgradcheck): each is linear in
// each tensor argument it differentiates. With F the forward op without bias, GI its grad_input
// op and GW its grad_weight op, <g, GI(go, w)> = <F(g, w), go> and <g, GW(go, x)> = <F(x, g),
// go>, so
//   GI(go, w):  go <- F(g, w),        w <- GW(go, g)
//   GW(go, x):  go <- F(x, g),        x <- GI(go, g)
// and the fused depthwise backward sums the two (plus the bias gradient's broadcast into go).
// _max_pool2d_backward scatters go to the indices, so go's gradient gathers g at them (0 for a
// window that reads no input); its value does not depend on the input's (zero gradient, as
// torch's).
//
// Every formula calls the ops through the dispatcher, their autograd kernels included: under
// create_graph=True those record the calls, so gradients of any order work, and a tangent on
// grad_output (forward-over-reverse, as in a Hessian-vector product) flows through them; with
// neither, they go straight to the op's kernel.
//
// Forward-mode AD (torch.autograd.forward_ad, torch.func.jvp / jacfwd): for the same reason an
// output's tangent is the op applied to the tangents (conv: F(dx, w) + F(x, dw) + db; GI(dgo,
// w) + GI(go, dw); max_pool2d: dx gathered at the forward's indices; its backward: the backward
// of dgo), computed with the ops themselves and attached to the output (level 0, as torch's own
// formulas do). The primal values run through the reverse-mode path, so both modes compose.
//
// torch.func's transforms refuse C++ autograd functions: under them fastconv's Python functions
// use the Python autograd.Functions of fastconv/_functorch.py instead (the same formulas).

#include "common/ops.h"

#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
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

// The dual tensors (forward-mode AD) among those a Function saves for its backward. The
// Functions run on primals, so their saved variables carry no tangent, where torch's own
// formulas keep them: a backward run inside the dual level (forward-over-reverse: the tangent of
// a gradient, as in a Hessian-vector product) must see the dual tensors. The duals ride in the
// context, and their tangents are put back on the saved primals while they still have them
// (leaving the level takes every tangent of that level away).
struct Duals {
  variable_list of;  // one per saved tensor: the argument if it carries a tangent, else undefined

  explicit Duals(std::initializer_list<at::Tensor> args) {
    for (const at::Tensor& t : args) of.push_back(tangent(t).defined() ? t : at::Tensor());
  }
};

void save_for_backward(AutogradContext* ctx, const variable_list& primals, const Duals& duals) {
  ctx->save_for_backward(primals);
  for (size_t i = 0; i < duals.of.size(); ++i)
    if (duals.of[i].defined()) ctx->saved_data["dual" + std::to_string(i)] = duals.of[i];
}

variable_list saved_variables(AutogradContext* ctx) {
  variable_list saved = ctx->get_saved_variables();
  for (size_t i = 0; i < saved.size(); ++i) {
    const auto it = ctx->saved_data.find("dual" + std::to_string(i));
    if (it == ctx->saved_data.end()) continue;
    const at::Tensor t = tangent(it->second.toTensor());
    if (t.defined()) saved[i] = at::_make_dual(saved[i], t, /*level=*/0);
  }
  return saved;
}

// Whether t is batched by torch's legacy vmap: torch.autograd.grad(is_grads_batched=True) and
// torch.autograd.functional's vectorize=True batch the gradients with it, and its per-sample
// fallback cannot run an op that returns a list (_depthwise_conv2d_backward), so there the
// fused backward is replaced by its ops one by one.
bool legacy_batched(const at::Tensor& t) {
  return t.defined() && t.key_set().has(c10::DispatchKey::Batched);
}

// a + b, either alone when the other is undefined (an undefined tensor is zero)
at::Tensor add_defined(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined()) return b;
  if (!b.defined()) return a;
  return a.add(b);
}

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

// One convolution's three ops with its parameters bound: F (the forward without bias), GI
// (grad_input) and GW (grad_weight), of conv2d (groups, algo) or of depthwise_conv2d. Kept in an
// autograd context as plain values (what compiled autograd lifts).
struct ConvOps {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
  std::string algo;
  bool depthwise;

  static ConvOps conv2d(IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                        int64_t groups, c10::string_view algo) {
    return {stride.vec(), padding.vec(), dilation.vec(), groups, std::string(algo), false};
  }
  static ConvOps depthwise_conv2d(IntArrayRef stride, IntArrayRef padding,
                                  IntArrayRef dilation) {
    return {stride.vec(), padding.vec(), dilation.vec(), 1, "", true};
  }

  at::Tensor forward(const at::Tensor& x, const at::Tensor& w) const {
    if (depthwise) return depthwise_op().call(x, w, c10::nullopt, stride, padding, dilation);
    return conv2d_op().call(x, w, c10::nullopt, stride, padding, dilation, groups, algo);
  }
  at::Tensor grad_input(const at::Tensor& go, const at::Tensor& w,
                        c10::SymIntArrayRef input_size) const {
    if (depthwise)
      return depthwise_grad_input_op().call(go, w, input_size, stride, padding, dilation);
    return conv2d_grad_input_op().call(go, w, input_size, stride, padding, dilation, groups,
                                       algo);
  }
  at::Tensor grad_weight(const at::Tensor& go, const at::Tensor& x,
                         c10::SymIntArrayRef weight_size) const {
    if (depthwise)
      return depthwise_grad_weight_op().call(go, x, weight_size, stride, padding, dilation);
    return conv2d_grad_weight_op().call(go, x, weight_size, stride, padding, dilation, groups,
                                        algo);
  }
  // GI(go, other = w, size = the input's) when of_input, else GW(go, other = x, size = the
  // weight's)
  at::Tensor grad(bool of_input, const at::Tensor& go, const at::Tensor& other,
                  c10::SymIntArrayRef size) const {
    return of_input ? grad_input(go, other, size) : grad_weight(go, other, size);
  }
  // grad_input, grad_weight and (bias_grad) grad_bias of one _depthwise_conv2d_backward call
  std::vector<at::Tensor> depthwise_backward(const at::Tensor& go, const at::Tensor& x,
                                             const at::Tensor& w, bool bias_grad) const {
    return depthwise_backward_op().call(go, x, w, stride, padding, dilation, bias_grad);
  }

  void save(AutogradContext* ctx) const {
    save_ints(ctx, "stride", stride);
    save_ints(ctx, "padding", padding);
    save_ints(ctx, "dilation", dilation);
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["algo"] = algo;
    ctx->saved_data["depthwise"] = depthwise;
  }
  static ConvOps load(AutogradContext* ctx) {
    return {ints(ctx, "stride"),
            ints(ctx, "padding"),
            ints(ctx, "dilation"),
            ctx->saved_data["groups"].toInt(),
            ctx->saved_data["algo"].toStringRef(),
            ctx->saved_data["depthwise"].toBool()};
  }
};

// A bias gradient gb (C) as a term of a gradient shaped like `like` (N, C, H, W).
at::Tensor bias_term(const at::Tensor& gb, const at::Tensor& like) {
  return gb.view({1, -1, 1, 1}).expand_symint(like.sym_sizes());
}

// The tangent of F(x, w) + b for tangents tx, tw, tb of its arguments (undefined ones are
// zero): F(tx, w) + F(x, tw) + tb; undefined if all three are.
at::Tensor conv_tangent(const ConvOps& f, const at::Tensor& x, const at::Tensor& w,
                        const at::Tensor& tx, const at::Tensor& tw, const at::Tensor& tb,
                        const at::Tensor& out) {
  at::Tensor t = add_defined(tx.defined() ? f.forward(tx, w) : at::Tensor(),
                             tw.defined() ? f.forward(x, tw) : at::Tensor());
  if (!tb.defined()) return t;
  return t.defined() ? t.add(tb.view({1, -1, 1, 1}))
                     : bias_term(tb, out).clone(out.suggest_memory_format());
}

// What the convolutions' backward reads from their context: input, weight, the ops, whether
// there is a bias, and which gradients autograd needs.
struct ConvBackward {
  variable_list saved;  // input, weight
  at::Tensor grad;
  ConvOps f;
  bool need_input, need_weight, need_bias;

  ConvBackward(AutogradContext* ctx, const variable_list& grads)
      : saved(saved_variables(ctx)),
        grad(grads[0]),
        f(ConvOps::load(ctx)),
        need_input(ctx->needs_input_grad(0)),
        need_weight(ctx->needs_input_grad(1)),
        need_bias(ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) {}

  static void save(AutogradContext* ctx, const ConvOps& f, const at::Tensor& input,
                   const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                   const Duals& duals) {
    save_for_backward(ctx, {input, weight}, duals);
    f.save(ctx);
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
  }

  const at::Tensor& input() const { return saved[0]; }
  const at::Tensor& weight() const { return saved[1]; }

  // grad_input, grad_weight and the bias gradient: from one _depthwise_conv2d_backward call
  // when `fused` (and both of the first two are needed), else from the ops one by one
  variable_list gradients(size_t num_args, bool fused) const {
    variable_list out(num_args);  // one per forward argument; the non-tensor ones stay undefined
    if (fused && need_input && need_weight && !legacy_batched(grad)) {
      std::vector<at::Tensor> g = f.depthwise_backward(grad, input(), weight(), need_bias);
      std::copy(g.begin(), g.end(), out.begin());
      return out;
    }
    if (need_input) out[0] = f.grad_input(grad, weight(), input().sym_sizes());
    if (need_weight) out[1] = f.grad_weight(grad, input(), weight().sym_sizes());
    if (need_bias) out[2] = grad.sum({0, 2, 3});
    return out;
  }
};

// ---------------------------------------------------------------------------------------------
// conv2d and depthwise_conv2d
// ---------------------------------------------------------------------------------------------

struct Conv2dFunction : public torch::autograd::Function<Conv2dFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                            int64_t groups, c10::string_view algo, const Duals& duals) {
    ConvBackward::save(ctx, ConvOps::conv2d(stride, padding, dilation, groups, algo), input,
                       weight, bias, duals);
    at::AutoDispatchBelowADInplaceOrView below;
    return conv2d_op().call(input, weight, bias, stride, padding, dilation, groups, algo);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const ConvBackward b(ctx, grads);
    return b.gradients(9, b.f.algo == "auto" &&
                              depthwise_shaped(b.input(), b.weight(), b.f.groups));
  }
};

at::Tensor conv2d_autograd(const at::Tensor& input, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, IntArrayRef stride,
                           IntArrayRef padding, IntArrayRef dilation, int64_t groups,
                           c10::string_view algo) {
  const at::Tensor tx = tangent(input), tw = tangent(weight), tb = tangent(bias);
  const at::Tensor x = primal(input), w = primal(weight);
  const c10::optional<at::Tensor> b = primal(bias);
  at::Tensor out;
  if (needs_graph(x, w, b)) {
    out = Conv2dFunction::apply(x, w, b, stride, padding, dilation, groups, algo,
                                Duals{input, weight});
  } else {
    at::AutoDispatchBelowADInplaceOrView below;
    out = conv2d_op().call(x, w, b, stride, padding, dilation, groups, algo);
  }
  if (tx.defined() || tw.defined() || tb.defined()) {
    const ConvOps f = ConvOps::conv2d(stride, padding, dilation, groups, algo);
    out._set_fw_grad(conv_tangent(f, x, w, tx, tw, tb, out), /*level=*/0,
                     /*is_inplace_op=*/false);
  }
  return out;
}

struct DepthwiseFunction : public torch::autograd::Function<DepthwiseFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                            const Duals& duals) {
    ConvBackward::save(ctx, ConvOps::depthwise_conv2d(stride, padding, dilation), input, weight,
                       bias, duals);
    at::AutoDispatchBelowADInplaceOrView below;
    return depthwise_op().call(input, weight, bias, stride, padding, dilation);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return ConvBackward(ctx, grads).gradients(7, /*fused=*/true);
  }
};

at::Tensor depthwise_autograd(const at::Tensor& input, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, IntArrayRef stride,
                              IntArrayRef padding, IntArrayRef dilation) {
  const at::Tensor tx = tangent(input), tw = tangent(weight), tb = tangent(bias);
  const at::Tensor x = primal(input), w = primal(weight);
  const c10::optional<at::Tensor> b = primal(bias);
  at::Tensor out;
  if (needs_graph(x, w, b)) {
    out = DepthwiseFunction::apply(x, w, b, stride, padding, dilation, Duals{input, weight});
  } else {
    at::AutoDispatchBelowADInplaceOrView below;
    out = depthwise_op().call(x, w, b, stride, padding, dilation);
  }
  if (tx.defined() || tw.defined() || tb.defined()) {
    const ConvOps f = ConvOps::depthwise_conv2d(stride, padding, dilation);
    out._set_fw_grad(conv_tangent(f, x, w, tx, tw, tb, out), /*level=*/0,
                     /*is_inplace_op=*/false);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// The convolutions' backward ops: GI(go, w), GW(go, x) and the fused depthwise backward
// ---------------------------------------------------------------------------------------------

// GI(go, w) (of_input) and GW(go, x): one Function, since each is the other's derivative.
struct ConvGradFunction : public torch::autograd::Function<ConvGradFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_output,
                            const at::Tensor& other, c10::SymIntArrayRef size, const ConvOps& f,
                            bool of_input, const Duals& duals) {
    save_for_backward(ctx, {grad_output, other}, duals);
    f.save(ctx);
    ctx->saved_data["of_input"] = of_input;
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView below;
    return f.grad(of_input, grad_output, other, size);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(6);  // one per forward argument
    const at::Tensor& g = grads[0];
    if (!g.defined()) return out;
    const ConvOps f = ConvOps::load(ctx);
    const bool of_input = ctx->saved_data["of_input"].toBool();
    const variable_list saved = saved_variables(ctx);
    const at::Tensor &go = saved[0], &other = saved[1];  // other: the weight, or the input
    if (ctx->needs_input_grad(0)) out[0] = of_input ? f.forward(g, other) : f.forward(other, g);
    if (ctx->needs_input_grad(1)) out[1] = f.grad(!of_input, go, g, other.sym_sizes());
    return out;
  }
};

at::Tensor conv_grad_autograd(const ConvOps& f, bool of_input, const at::Tensor& grad_output,
                              const at::Tensor& other, c10::SymIntArrayRef size) {
  const at::Tensor tgo = tangent(grad_output), tother = tangent(other);
  const at::Tensor go = primal(grad_output), o = primal(other);
  at::Tensor out;
  if (needs_graph(go, o)) {
    out = ConvGradFunction::apply(go, o, size, f, of_input, Duals{grad_output, other});
  } else {
    at::AutoDispatchBelowADInplaceOrView below;
    out = f.grad(of_input, go, o, size);
  }
  if (tgo.defined() || tother.defined())
    out._set_fw_grad(add_defined(tgo.defined() ? f.grad(of_input, tgo, o, size) : at::Tensor(),
                                 tother.defined() ? f.grad(of_input, go, tother, size)
                                                  : at::Tensor()),
                     /*level=*/0, /*is_inplace_op=*/false);
  return out;
}

at::Tensor conv2d_grad_input_autograd(const at::Tensor& grad_output, const at::Tensor& weight,
                                      c10::SymIntArrayRef input_size, IntArrayRef stride,
                                      IntArrayRef padding, IntArrayRef dilation, int64_t groups,
                                      c10::string_view algo) {
  return conv_grad_autograd(ConvOps::conv2d(stride, padding, dilation, groups, algo),
                            /*of_input=*/true, grad_output, weight, input_size);
}

at::Tensor conv2d_grad_weight_autograd(const at::Tensor& grad_output, const at::Tensor& input,
                                       c10::SymIntArrayRef weight_size, IntArrayRef stride,
                                       IntArrayRef padding, IntArrayRef dilation, int64_t groups,
                                       c10::string_view algo) {
  return conv_grad_autograd(ConvOps::conv2d(stride, padding, dilation, groups, algo),
                            /*of_input=*/false, grad_output, input, weight_size);
}

at::Tensor depthwise_grad_input_autograd(const at::Tensor& grad_output, const at::Tensor& weight,
                                         c10::SymIntArrayRef input_size, IntArrayRef stride,
                                         IntArrayRef padding, IntArrayRef dilation) {
  return conv_grad_autograd(ConvOps::depthwise_conv2d(stride, padding, dilation),
                            /*of_input=*/true, grad_output, weight, input_size);
}

at::Tensor depthwise_grad_weight_autograd(const at::Tensor& grad_output, const at::Tensor& input,
                                          c10::SymIntArrayRef weight_size, IntArrayRef stride,
                                          IntArrayRef padding, IntArrayRef dilation) {
  return conv_grad_autograd(ConvOps::depthwise_conv2d(stride, padding, dilation),
                            /*of_input=*/false, grad_output, input, weight_size);
}

// _depthwise_conv2d_backward: (GI(go, w), GW(go, x)[, sum of go]); the gradients of its
// outputs add up as the two ops' do, the bias gradient's broadcast into go's.
struct DepthwiseBackwardFunction : public torch::autograd::Function<DepthwiseBackwardFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_output,
                               const at::Tensor& input, const at::Tensor& weight,
                               IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                               bool bias_grad, const Duals& duals) {
    save_for_backward(ctx, {grad_output, input, weight}, duals);
    ConvOps::depthwise_conv2d(stride, padding, dilation).save(ctx);
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView below;
    return depthwise_backward_op().call(grad_output, input, weight, stride, padding, dilation,
                                        bias_grad);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const ConvOps f = ConvOps::load(ctx);
    const variable_list saved = saved_variables(ctx);
    const at::Tensor &go = saved[0], &x = saved[1], &w = saved[2];
    const at::Tensor& g_input = grads[0];
    const at::Tensor& g_weight = grads[1];
    const at::Tensor g_bias = grads.size() > 2 ? grads[2] : at::Tensor();
    variable_list out(8);  // one per forward argument
    if (ctx->needs_input_grad(0)) {
      at::Tensor t = add_defined(g_input.defined() ? f.forward(g_input, w) : at::Tensor(),
                                 g_weight.defined() ? f.forward(x, g_weight) : at::Tensor());
      if (g_bias.defined())
        t = t.defined() ? t.add(g_bias.view({1, -1, 1, 1})) : bias_term(g_bias, go);
      out[0] = t;
    }
    if (ctx->needs_input_grad(1) && g_weight.defined())
      out[1] = f.grad_input(go, g_weight, x.sym_sizes());
    if (ctx->needs_input_grad(2) && g_input.defined())
      out[2] = f.grad_weight(go, g_input, w.sym_sizes());
    return out;
  }
};

std::vector<at::Tensor> depthwise_backward_autograd(const at::Tensor& grad_output,
                                                    const at::Tensor& input,
                                                    const at::Tensor& weight, IntArrayRef stride,
                                                    IntArrayRef padding, IntArrayRef dilation,
                                                    bool bias_grad) {
  const at::Tensor tgo = tangent(grad_output), tx = tangent(input), tw = tangent(weight);
  const at::Tensor go = primal(grad_output), x = primal(input), w = primal(weight);
  const ConvOps f = ConvOps::depthwise_conv2d(stride, padding, dilation);
  std::vector<at::Tensor> out;
  if (needs_graph(go, x, w)) {
    out = DepthwiseBackwardFunction::apply(go, x, w, stride, padding, dilation, bias_grad,
                                           Duals{grad_output, input, weight});
  } else {
    at::AutoDispatchBelowADInplaceOrView below;
    out = f.depthwise_backward(go, x, w, bias_grad);
  }
  if (tgo.defined() || tx.defined() || tw.defined()) {
    std::vector<at::Tensor> t(out.size());
    if (tgo.defined() && !legacy_batched(tgo)) {
      t = f.depthwise_backward(tgo, x, w, bias_grad);
    } else if (tgo.defined()) {
      t = {f.grad_input(tgo, w, x.sym_sizes()), f.grad_weight(tgo, x, w.sym_sizes())};
      if (bias_grad) t.push_back(tgo.sum({0, 2, 3}));
    }
    if (tw.defined()) t[0] = add_defined(t[0], f.grad_input(go, tw, x.sym_sizes()));
    if (tx.defined()) t[1] = add_defined(t[1], f.grad_weight(go, tx, w.sym_sizes()));
    for (size_t i = 0; i < out.size(); ++i)
      if (t[i].defined()) out[i]._set_fw_grad(t[i], /*level=*/0, /*is_inplace_op=*/false);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// max_pool2d and its backward
// ---------------------------------------------------------------------------------------------

// max_pool2d's arguments after the input, as the ops take them.
struct PoolArgs {
  std::vector<int64_t> kernel_size, stride, padding, dilation;
  bool ceil_mode;

  void save(AutogradContext* ctx) const {
    save_ints(ctx, "kernel_size", kernel_size);
    save_ints(ctx, "stride", stride);
    save_ints(ctx, "padding", padding);
    save_ints(ctx, "dilation", dilation);
    ctx->saved_data["ceil_mode"] = ceil_mode;
  }
  static PoolArgs load(AutogradContext* ctx) {
    return {ints(ctx, "kernel_size"), ints(ctx, "stride"), ints(ctx, "padding"),
            ints(ctx, "dilation"), ctx->saved_data["ceil_mode"].toBool()};
  }

  at::Tensor backward(const at::Tensor& grad_output, const at::Tensor& input,
                      const at::Tensor& indices) const {
    return max_pool2d_backward_op().call(grad_output, input, indices, kernel_size, stride,
                                         padding, dilation, ceil_mode);
  }

  // torch's flat indices of the forward on `input` (no graph): `indices` itself when it has
  // that format (int64, 4-D), else (uint8 'compact' ones, or the empty tensor of 'none') those
  // the same kernel finds in 'full' mode
  at::Tensor full_indices(const at::Tensor& input, const at::Tensor& indices) const {
    if (indices.scalar_type() == at::kLong && indices.dim() == 4) return indices;
    at::AutoDispatchBelowADInplaceOrView below;
    return std::get<1>(max_pool2d_op().call(input, kernel_size, stride, padding, dilation,
                                            ceil_mode, "full"));
  }

  // Along one dimension: whether each output position's window has a tap inside [0, size).
  // Tensor ops only (no data pointers): under torch.func the result is a functorch wrapper.
  at::Tensor window_reads_input(int dim, int64_t out, int64_t size,
                                const at::TensorOptions& opts) const {
    const int64_t k = kernel_size[dim], s = stride[dim], p = padding[dim], d = dilation[dim];
    const at::Tensor start = at::arange(out, opts.dtype(at::kLong)).mul(s).sub(p);
    // the first tap at or past position 0: ceil(-start / d) for a window starting in padding
    const at::Tensor t0 = start.neg().add(d - 1).div(d, "floor").clamp_min(0);
    return t0.lt(k).logical_and(start.add(t0.mul(d)).lt(size));
  }

  // src (shaped like the input) read at each window's max: the tangent of the pooled output
  // for an input tangent src, and the gradient of the backward's grad_output for a gradient
  // src of its result. 0 for a window that reads no input (-inf; its index is where its scan
  // would start, maybe another element or past the plane).
  at::Tensor gather(const at::Tensor& src, const at::Tensor& input,
                    const at::Tensor& indices) const {
    const at::Tensor full = full_indices(input, indices);
    const int64_t plane = input.size(2) * input.size(3);
    const at::Tensor reads =
        window_reads_input(0, full.size(2), input.size(2), input.options())
            .view({-1, 1})
            .logical_and(window_reads_input(1, full.size(3), input.size(3), input.options()));
    // reshape, not flatten: torch.autograd.functional's vectorize=True (a vmap of its own)
    // has no batching rule for flatten
    const int64_t n = full.size(0), c = full.size(1);
    return src.reshape({n, c, plane})
        .gather(2, full.reshape({n, c, -1}).clamp(0, std::max<int64_t>(plane - 1, 0)))
        .view(full.sizes())
        .masked_fill(reads.logical_not(), 0);
  }
};

struct MaxPool2dFunction : public torch::autograd::Function<MaxPool2dFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const PoolArgs& args, c10::string_view indices) {
    at::Tensor out, idx;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(out, idx) =
          max_pool2d_op().call(input, args.kernel_size, args.stride, args.padding,
                               args.dilation, args.ceil_mode, indices);
    }
    // The indices are an integer tensor (int64, or uint8 for 'compact'; an empty int64 one for
    // 'none'), which autograd never differentiates, so they need no mark_non_differentiable;
    // compiled autograd (torch._dynamo.compiled_autograd) rejects a C++ node whose context
    // marks any. They get no gradient: do not make autograd fill one with zeros.
    TORCH_INTERNAL_ASSERT(!at::isFloatingType(idx.scalar_type()) &&
                          !at::isComplexType(idx.scalar_type()));
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({input, idx});
    args.save(ctx);
    ctx->saved_data["indices_none"] = indices == "none";
    return {out, idx};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!ctx->saved_data["indices_none"].toBool(),
                "max_pool2d: the backward needs the forward's indices, but the op was called "
                "with indices='none'; call it with indices='compact' (or 'full'), as "
                "fastconv.max_pool2d does when the input requires grad");
    variable_list out(3);
    const at::Tensor& grad = grads[0];
    if (!grad.defined() || !ctx->needs_input_grad(0)) return out;  // undefined: zero
    const variable_list saved = ctx->get_saved_variables();
    out[0] = PoolArgs::load(ctx).backward(grad, saved[0], saved[1]);
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
    // the tangent needs torch's indices; with 'none' or 'compact' only dual inputs pay for them
    const PoolArgs args{kernel_size.vec(), stride.vec(), padding.vec(), dilation.vec(), ceil_mode};
    out._set_fw_grad(args.gather(tx, x, idx), /*level=*/0, /*is_inplace_op=*/false);
    return {out, idx};
  }
  if (!needs_graph(input)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return max_pool2d_op().call(input, kernel_size, stride, padding, dilation, ceil_mode,
                                indices);
  }
  const PoolArgs args{kernel_size.vec(), stride.vec(), padding.vec(), dilation.vec(), ceil_mode};
  variable_list r = MaxPool2dFunction::apply(input, args, indices);
  return {r[0], r[1]};
}

// _max_pool2d_backward scatters grad_output to the indices: grad_output's gradient gathers
// the result's gradient there; the input only gives the shape (and, for compact indices, the
// plane the taps are in), so its gradient is zero, as torch's is for its pooling backward.
struct MaxPool2dBackwardFunction : public torch::autograd::Function<MaxPool2dBackwardFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_output,
                            const at::Tensor& input, const at::Tensor& indices,
                            const PoolArgs& args) {
    ctx->save_for_backward({input, indices});
    args.save(ctx);
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView below;
    return args.backward(grad_output, input, indices);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(4);
    const variable_list saved = ctx->get_saved_variables();  // input, indices
    const at::Tensor& g = grads[0];
    if (ctx->needs_input_grad(1)) out[1] = at::zeros_like(saved[0]);
    if (!g.defined() || !ctx->needs_input_grad(0)) return out;
    const PoolArgs args = PoolArgs::load(ctx);
    out[0] = args.gather(g, saved[0].detach(), saved[1]);
    return out;
  }
};

at::Tensor max_pool2d_backward_autograd(const at::Tensor& grad_output, const at::Tensor& input,
                                        const at::Tensor& indices, IntArrayRef kernel_size,
                                        IntArrayRef stride, IntArrayRef padding,
                                        IntArrayRef dilation, bool ceil_mode) {
  const PoolArgs args{kernel_size.vec(), stride.vec(), padding.vec(), dilation.vec(), ceil_mode};
  const at::Tensor tgo = tangent(grad_output);
  if (tgo.defined() || tangent(input).defined()) {
    const at::Tensor go = primal(grad_output), x = primal(input);
    at::Tensor out = max_pool2d_backward_autograd(go, x, indices, kernel_size, stride, padding,
                                                  dilation, ceil_mode);
    // linear in grad_output; the input's tangent moves nothing
    out._set_fw_grad(tgo.defined() ? args.backward(tgo, x, indices) : at::zeros_like(out),
                     /*level=*/0, /*is_inplace_op=*/false);
    return out;
  }
  if (!needs_graph(grad_output, input)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return args.backward(grad_output, input, indices);
  }
  return MaxPool2dBackwardFunction::apply(grad_output, input, indices, args);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, Autograd, m) {
  m.impl("conv2d", &conv2d_autograd);
  m.impl("_conv2d_grad_input", &conv2d_grad_input_autograd);
  m.impl("_conv2d_grad_weight", &conv2d_grad_weight_autograd);
  m.impl("depthwise_conv2d", &depthwise_autograd);
  m.impl("_depthwise_conv2d_grad_input", &depthwise_grad_input_autograd);
  m.impl("_depthwise_conv2d_grad_weight", &depthwise_grad_weight_autograd);
  m.impl("_depthwise_conv2d_backward", &depthwise_backward_autograd);
  m.impl("max_pool2d", &max_pool2d_autograd);
  m.impl("_max_pool2d_backward", &max_pool2d_backward_autograd);
}

}  // namespace fastconv
