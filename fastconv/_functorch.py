"""fastconv's ops under torch.func transforms (grad, vjp, jacrev, jacfwd, hessian, vmap of
any of them).

The ops' autograd formulas are C++ autograd functions (csrc/autograd.cpp), which torch refuses
under functorch's differentiating transforms: a C++ function does not know functorch's levels.
While one is active, fastconv's public functions therefore go through the Python
autograd.Functions below instead, which functorch runs level by level (torch.func's "extending"
rules: forward without ctx, setup_context, and a generated vmap rule). They hold the same
formulas as the C++ ones and call the same kernels; their backward and jvp call these Functions
again, so every order of differentiation works under the transforms too. Outside transforms,
and under vmap alone (the ops' vmap rules batch them), nothing here runs.
"""

from __future__ import annotations

import torch
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

ops = torch.ops.fastconv


def transforming() -> bool:
    """Whether any torch.func transform is running."""
    return torch._C._are_functorch_transforms_active()


def active() -> bool:
    """Whether a torch.func transform other than vmap is running (fastconv's functions then come
    here). Under vmap alone the ops run as they are: their vmap rules batch them, and autograd
    records them below the transform as usual."""
    if not transforming():
        return False
    return any(i.key() != TransformType.Vmap for i in retrieve_all_functorch_interpreters())


def requires_grad(t: torch.Tensor) -> bool:
    """t.requires_grad, also under vmap, where a batched tensor reports False for an input
    that requires grad below the transform."""
    while torch._C._functorch.is_batchedtensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t.requires_grad


class Params:
    """A Function's non-tensor arguments as one opaque value: functorch flattens tuple arguments
    as pytrees, which its jvp-under-vmap rules (jacfwd(jacrev), hessian) do not expect."""

    __slots__ = ("v",)

    def __init__(self, *v):
        self.v = v


# A convolution's Params: ("conv2d", stride, padding, dilation, groups, algo) or
# ("depthwise", stride, padding, dilation); F is its forward without bias, GI / GW its grad ops.

def _forward(spec, x, w, b=None):
    kind, *args = spec.v
    if kind == "depthwise":
        return ops.depthwise_conv2d(x, w, b, *args)
    return ops.conv2d(x, w, b, *args)


def _grad(spec, of_input, go, other, size):
    kind, *args = spec.v
    if kind == "depthwise":
        op = ops._depthwise_conv2d_grad_input if of_input else ops._depthwise_conv2d_grad_weight
    else:
        op = ops._conv2d_grad_input if of_input else ops._conv2d_grad_weight
    return op(go, other, list(size), *args)


def _add(a, b):
    if a is None:
        return b
    return a if b is None else a + b


class Conv(torch.autograd.Function):
    """F(x, w) + b."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, w, b, spec):
        return _forward(spec, x, w, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, spec = inputs
        ctx.save_for_backward(x, w)
        ctx.save_for_forward(x, w)
        ctx.spec, ctx.has_bias, ctx.out_shape = spec, b is not None, output.shape

    @staticmethod
    def backward(ctx, go):
        x, w = ctx.saved_tensors
        gx = grad(go, w, x.shape, ctx.spec, True) if ctx.needs_input_grad[0] else None
        gw = grad(go, x, w.shape, ctx.spec, False) if ctx.needs_input_grad[1] else None
        gb = go.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None

    @staticmethod
    def jvp(ctx, tx, tw, tb, _):
        x, w = ctx.saved_tensors
        t = _add(Conv.apply(tx, w, None, ctx.spec) if tx is not None else None,
                 Conv.apply(x, tw, None, ctx.spec) if tw is not None else None)
        if tb is not None:
            tb = tb.view(1, -1, 1, 1)
            t = tb.expand(ctx.out_shape).clone() if t is None else t + tb
        return t


class Grad(torch.autograd.Function):
    """GI(go, w) (of_input) or GW(go, x); each is the other's derivative:
    GI: go <- F(g, w), w <- GW(go, g); GW: go <- F(x, g), x <- GI(go, g)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(go, other, params):
        spec, of_input, size = params.v
        return _grad(spec, of_input, go, other, size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        go, other, params = inputs
        ctx.save_for_backward(go, other)
        ctx.save_for_forward(go, other)
        ctx.spec, ctx.of_input, ctx.size = params.v

    @staticmethod
    def backward(ctx, g):
        go, other = ctx.saved_tensors
        ggo = gother = None
        if ctx.needs_input_grad[0]:
            ggo = (Conv.apply(g, other, None, ctx.spec) if ctx.of_input
                   else Conv.apply(other, g, None, ctx.spec))
        if ctx.needs_input_grad[1]:
            gother = grad(go, g, other.shape, ctx.spec, not ctx.of_input)
        return ggo, gother, None

    @staticmethod
    def jvp(ctx, tgo, tother, _):
        go, other = ctx.saved_tensors
        spec, of_input, size = ctx.spec, ctx.of_input, ctx.size
        return _add(grad(tgo, other, size, spec, of_input) if tgo is not None else None,
                    grad(go, tother, size, spec, of_input) if tother is not None else None)


def grad(go, other, size, spec, of_input):
    """GI(go, other = w) with the input's size, or GW(go, other = x) with the weight's."""
    return Grad.apply(go, other, Params(spec, of_input, tuple(size)))


# max_pool2d: Params(kernel_size, stride, padding, dilation, ceil_mode)

def _window_reads_input(out, size, k, s, p, d, device):
    """Along one dimension: whether each output position's window has a tap inside [0, size)."""
    start = torch.arange(out, device=device) * s - p
    t0 = torch.div(-start + (d - 1), d, rounding_mode="floor").clamp_min(0)
    return (t0 < k) & (start + t0 * d < size)


def _gather(src, x, idx, args):
    """src (shaped like x) read at each window's max (idx: torch's flat indices); 0 for a
    window that reads no input."""
    k, s, p, d, _ = args.v
    n, c, oh, ow = idx.shape
    plane = x.shape[2] * x.shape[3]
    reads = (_window_reads_input(oh, x.shape[2], k[0], s[0], p[0], d[0], x.device).view(-1, 1)
             & _window_reads_input(ow, x.shape[3], k[1], s[1], p[1], d[1], x.device))
    out = src.reshape(n, c, plane).gather(2, idx.reshape(n, c, -1).clamp(0, max(plane - 1, 0)))
    return out.view(n, c, oh, ow).masked_fill(~reads, 0)


class MaxPool(torch.autograd.Function):
    """max_pool2d with torch's (full) indices; the indices are not differentiable."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, args):
        return ops.max_pool2d(x, *args.v, "full")

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, args = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, output[1])
        ctx.save_for_forward(x, output[1])
        ctx.args = args

    @staticmethod
    def backward(ctx, gout, _):
        x, idx = ctx.saved_tensors
        return MaxPoolBackward.apply(gout, x, idx, ctx.args), None

    @staticmethod
    def jvp(ctx, tx, _):
        x, idx = ctx.saved_tensors
        return _gather(tx, x, idx, ctx.args), None


class MaxPoolBackward(torch.autograd.Function):
    """go scattered to the indices: go's gradient gathers g there; the input's is zero."""

    generate_vmap_rule = True

    @staticmethod
    def forward(go, x, idx, args):
        return ops._max_pool2d_backward(go, x, idx, *args.v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        go, x, idx, args = inputs
        ctx.save_for_backward(x, idx)
        ctx.save_for_forward(x, idx)
        ctx.args = args

    @staticmethod
    def backward(ctx, g):
        x, idx = ctx.saved_tensors
        ggo = _gather(g, x, idx, ctx.args) if ctx.needs_input_grad[0] else None
        return ggo, None, None, None

    @staticmethod
    def jvp(ctx, tgo, *_):
        x, idx = ctx.saved_tensors
        return MaxPoolBackward.apply(tgo, x, idx, ctx.args) if tgo is not None else None
