"""Fake (meta) kernels for the fastconv ops and the forward ops' vmap rules, through
torch.library.

The C++ side declares the schemas (csrc/fastconv.cpp), registers the CPU / CUDA kernels and
every op's autograd formulas, the backward ops' included, so that gradients of gradients work
(csrc/autograd.cpp: in C++ because Python's autograd.Function machinery cost more than the
kernels at small shapes); this module makes the ops traceable (torch.compile, FakeTensor,
opcheck).
"""

from __future__ import annotations

import torch

from . import _checks as C

lib = torch.library

# --------------------------------------------------------------------------------------------
# fake kernels: validate exactly like C++ and describe the output (shape, dtype, layout)
# --------------------------------------------------------------------------------------------


def _empty(shape, like, memory_format, dtype=None):
    return torch.empty(
        shape, dtype=like.dtype if dtype is None else dtype, device=like.device,
        memory_format=memory_format,
    )


@lib.register_fake("fastconv::conv2d")
def _conv2d_fake(input, weight, bias, stride, padding, dilation, groups, algo="auto"):
    op = "conv2d"
    C.check_algo(op, algo)
    C.check_dtype(op, "input", input)
    C.check_same(op, "weight", weight, "input", input)
    shape = C.conv2d_shapes(op, input.shape, weight.shape, stride, padding, dilation, groups)
    C.check_bias(op, bias, input, shape[1])
    return _empty(shape, input, C.conv_memory_format(input, weight))


@lib.register_fake("fastconv::_conv2d_grad_input")
def _conv2d_grad_input_fake(grad_output, weight, input_size, stride, padding, dilation, groups,
                            algo="auto"):
    op = "_conv2d_grad_input"
    C.check_algo(op, algo)
    out_shape = C.conv2d_shapes(op, input_size, weight.shape, stride, padding, dilation, groups)
    C.check_grad_output(op, grad_output, weight, "weight", out_shape)
    return _empty(list(input_size), grad_output, C.conv_memory_format(grad_output, weight))


@lib.register_fake("fastconv::_conv2d_grad_weight")
def _conv2d_grad_weight_fake(grad_output, input, weight_size, stride, padding, dilation, groups,
                             algo="auto"):
    op = "_conv2d_grad_weight"
    C.check_algo(op, algo)
    out_shape = C.conv2d_shapes(op, input.shape, weight_size, stride, padding, dilation, groups)
    C.check_grad_output(op, grad_output, input, "input", out_shape)
    return _empty(list(weight_size), grad_output, torch.contiguous_format)


@lib.register_fake("fastconv::depthwise_conv2d")
def _depthwise_fake(input, weight, bias, stride, padding, dilation):
    op = "depthwise_conv2d"
    C.check_dtype(op, "input", input)
    C.check_same(op, "weight", weight, "input", input)
    shape = C.depthwise_shapes(op, input.shape, weight.shape, stride, padding, dilation)
    C.check_bias(op, bias, input, shape[1])
    return _empty(shape, input, C.conv_memory_format(input, weight))


@lib.register_fake("fastconv::_depthwise_conv2d_grad_input")
def _depthwise_grad_input_fake(grad_output, weight, input_size, stride, padding, dilation):
    op = "_depthwise_conv2d_grad_input"
    out_shape = C.depthwise_shapes(op, input_size, weight.shape, stride, padding, dilation)
    C.check_grad_output(op, grad_output, weight, "weight", out_shape)
    return _empty(list(input_size), grad_output, C.conv_memory_format(grad_output, weight))


@lib.register_fake("fastconv::_depthwise_conv2d_grad_weight")
def _depthwise_grad_weight_fake(grad_output, input, weight_size, stride, padding, dilation):
    op = "_depthwise_conv2d_grad_weight"
    out_shape = C.depthwise_shapes(op, input.shape, weight_size, stride, padding, dilation)
    C.check_grad_output(op, grad_output, input, "input", out_shape)
    return _empty(list(weight_size), grad_output, torch.contiguous_format)


@lib.register_fake("fastconv::_depthwise_conv2d_backward")
def _depthwise_backward_fake(grad_output, input, weight, stride, padding, dilation,
                             bias_grad=False):
    op = "_depthwise_conv2d_backward"
    out_shape = C.depthwise_shapes(op, input.shape, weight.shape, stride, padding, dilation)
    C.check_grad_output(op, grad_output, input, "input", out_shape)
    C.check_same(op, "weight", weight, "grad_output", grad_output)
    grads = [_empty(list(input.shape), grad_output, C.conv_memory_format(grad_output, weight)),
             _empty(list(weight.shape), grad_output, torch.contiguous_format)]
    if bias_grad:
        grads.append(_empty([out_shape[1]], grad_output, torch.contiguous_format))
    return grads


def _index_dtype(mode, kernel_size):
    if mode == "compact" and kernel_size[0] * kernel_size[1] <= 256:
        return torch.uint8
    return torch.int64


@lib.register_fake("fastconv::max_pool2d")
def _max_pool2d_fake(input, kernel_size, stride, padding, dilation, ceil_mode=False,
                     indices="full"):
    op = "max_pool2d"
    C.check_pool_indices(op, indices)
    C.check_dtype(op, "input", input)
    shape = C.max_pool2d_shapes(op, input.shape, kernel_size, stride, padding, dilation, ceil_mode)
    fmt = C.suggest_memory_format(input)
    out = _empty(shape, input, fmt)
    if indices == "none":
        idx = torch.empty((0,), dtype=torch.int64, device=input.device)
    else:
        idx = _empty(shape, input, fmt, dtype=_index_dtype(indices, kernel_size))
    return out, idx


@lib.register_fake("fastconv::_max_pool2d_backward")
def _max_pool2d_backward_fake(grad_output, input, indices, kernel_size, stride, padding, dilation,
                              ceil_mode=False):
    op = "_max_pool2d_backward"
    C.check_dtype(op, "input", input)
    C.check_same(op, "grad_output", grad_output, "input", input)
    shape = C.max_pool2d_shapes(op, input.shape, kernel_size, stride, padding, dilation, ceil_mode)
    _check_pool_backward_args(op, grad_output, input, indices, shape, kernel_size)
    return _empty(list(input.shape), input, C.suggest_memory_format(input))


def _check_pool_backward_args(op, grad_output, input, indices, out_shape, kernel_size):
    if list(grad_output.shape) != list(out_shape):
        raise ValueError(
            f"{op}: expected grad_output of shape {list(out_shape)}, but got {list(grad_output.shape)}"
        )
    if indices.dtype not in (torch.int64, torch.uint8) or list(indices.shape) != list(out_shape):
        raise ValueError(
            f"{op}: expected indices of shape {list(out_shape)} with dtype int64 (or uint8 compact "
            f"indices), but got shape {list(indices.shape)} and dtype {indices.dtype}; the forward "
            f"must be called with indices='full' or 'compact' for a backward"
        )
    if indices.dtype == torch.uint8 and kernel_size[0] * kernel_size[1] > 256:
        raise ValueError(
            f"{op}: uint8 (compact) indices need a window of at most 256 taps, but kernel_size is "
            f"{list(kernel_size)}"
        )
    if indices.device != input.device:
        raise RuntimeError(
            f"{op}: expected indices to be on the same device as input ({input.device}), but got "
            f"{indices.device}"
        )


# --------------------------------------------------------------------------------------------
# vmap: the ops take a batch of images already, so a vmapped input folds into it; a vmapped
# weight becomes groups (torch.func.vmap, and the backward ops under torch.func's transforms)
# --------------------------------------------------------------------------------------------


def _fold(x, bdim):
    """x with its vmapped dim bdim merged into the image batch: (B * N, C, H, W), and B. A
    view when the two dims are adjacent in memory (vmap's usual dim 0, either layout)."""
    x = x.movedim(bdim, 0)
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]), x.shape[0]


def _unfold(y, batch):
    return y.reshape(batch, y.shape[0] // batch, *y.shape[1:])


def _batch_first(t, bdim, batch):
    """t with its vmapped dim (bdim) first; an argument the samples share (bdim None) is
    expanded to one per sample."""
    return t.movedim(bdim, 0) if bdim is not None else t.expand(batch, *t.shape)


def _to_groups(t, bdim, batch):
    """(N, C, H, W) images with a vmapped dim at bdim (None: the same for every sample) as one
    batch of N images of batch * C channels, sample b's channels in block b: what a convolution
    whose groups are multiplied by batch reads as batch independent convolutions."""
    t = _batch_first(t, bdim, batch)
    return t.transpose(0, 1).reshape(t.shape[1], batch * t.shape[2], *t.shape[3:])


def _from_groups(y, batch):
    """The inverse of _to_groups: (N, batch * C, H, W) -> (batch, N, C, H, W)."""
    return y.reshape(y.shape[0], batch, y.shape[1] // batch, *y.shape[2:]).transpose(0, 1)


def _stack(t, bdim, batch):
    """A weight or bias with a vmapped dim at bdim (None: shared) as the samples' weights
    stacked along dim 0, the weight of the grouped convolution that _to_groups feeds."""
    t = _batch_first(t, bdim, batch)
    return t.reshape(batch * t.shape[1], *t.shape[2:])


def _sample(t, bdim):
    """One sample of a vmapped argument (the argument itself when it is not vmapped)."""
    return t if t is None or bdim is None else t.select(bdim, 0)


def _conv_rules(depthwise):
    """The vmap rules of a convolution's three ops (forward, grad_input, grad_weight). Images
    vmapped over a shared weight fold into the image batch (one call); a vmapped weight, or
    grad_weight (which sums over the images), turns the vmapped dim into groups (one call)."""
    def times_groups(rest, batch):  # conv2d's (stride, padding, dilation, groups, algo)
        return rest if depthwise else (*rest[:3], rest[3] * batch, *rest[4:])

    def forward(op):
        def rule(info, in_dims, input, weight, bias, *rest):
            x_dim, w_dim, b_dim = in_dims[:3]
            batch = info.batch_size
            if x_dim is not None and w_dim is None and b_dim is None:
                x, _ = _fold(input, x_dim)
                return _unfold(op(x, weight, bias, *rest), batch), 0
            # the samples' own shapes are checked here, so that an error names the caller's
            # sizes rather than the grouped call's
            op_name = "depthwise_conv2d" if depthwise else "conv2d"
            x0, w0, b0 = _sample(input, x_dim), _sample(weight, w_dim), _sample(bias, b_dim)
            shape = (C.depthwise_shapes(op_name, x0.shape, w0.shape, *rest[:3]) if depthwise
                     else C.conv2d_shapes(op_name, x0.shape, w0.shape, *rest[:4]))
            C.check_bias(op_name, b0, x0, shape[1])
            b = None if bias is None else _stack(bias.unsqueeze(-1), b_dim, batch).flatten()
            out = op(_to_groups(input, x_dim, batch), _stack(weight, w_dim, batch), b,
                     *times_groups(rest, batch))
            return _from_groups(out, batch), 0
        return rule

    def grad_input(op):
        def rule(info, in_dims, grad_output, weight, input_size, *rest):
            g_dim, w_dim = in_dims[:2]
            batch = info.batch_size
            if w_dim is None:
                g, _ = _fold(grad_output, g_dim)
                size = [batch * input_size[0], *input_size[1:]]
                return _unfold(op(g, weight, size, *rest), batch), 0
            size = [input_size[0], batch * input_size[1], *input_size[2:]]
            out = op(_to_groups(grad_output, g_dim, batch), _stack(weight, w_dim, batch), size,
                     *times_groups(rest, batch))
            return _from_groups(out, batch), 0
        return rule

    def grad_weight(op):
        def rule(info, in_dims, grad_output, input, weight_size, *rest):
            batch = info.batch_size
            size = [batch * weight_size[0], *weight_size[1:]]
            out = op(_to_groups(grad_output, in_dims[0], batch),
                     _to_groups(input, in_dims[1], batch), size, *times_groups(rest, batch))
            return out.reshape(batch, *weight_size), 0
        return rule

    return forward, grad_input, grad_weight


@lib.register_vmap("fastconv::_depthwise_conv2d_backward")
def _depthwise_backward_vmap(info, in_dims, grad_output, input, weight, *rest):
    # the vmapped dim becomes channels (groups): grad_weight and grad_bias sum over the images
    batch = info.batch_size
    g_dim, x_dim, w_dim = in_dims[:3]
    grads = torch.ops.fastconv._depthwise_conv2d_backward(
        _to_groups(grad_output, g_dim, batch), _to_groups(input, x_dim, batch),
        _stack(weight, w_dim, batch), *rest)
    out = [_from_groups(grads[0], batch), grads[1].reshape(batch, *_sample(weight, w_dim).shape)]
    if len(grads) > 2:
        out.append(grads[2].reshape(batch, -1))
    return out, [0] * len(out)


for _names, _depthwise in (
        (("conv2d", "_conv2d_grad_input", "_conv2d_grad_weight"), False),
        (("depthwise_conv2d", "_depthwise_conv2d_grad_input", "_depthwise_conv2d_grad_weight"),
         True)):
    for _name, _make in zip(_names, _conv_rules(_depthwise)):
        lib.register_vmap(f"fastconv::{_name}", _make(getattr(torch.ops.fastconv, _name)))


@lib.register_vmap("fastconv::max_pool2d")
def _max_pool2d_vmap(info, in_dims, input, *rest):
    x, batch = _fold(input, in_dims[0])
    out, idx = torch.ops.fastconv.max_pool2d(x, *rest)
    if idx.dim() != 4:  # indices="none": one empty tensor, the same for every sample
        return (_unfold(out, batch), idx), (0, None)
    return (_unfold(out, batch), _unfold(idx, batch)), (0, 0)


@lib.register_vmap("fastconv::_max_pool2d_backward")
def _max_pool2d_backward_vmap(info, in_dims, grad_output, input, indices, *rest):
    batch = info.batch_size
    args = [_fold(_batch_first(t, d, batch), 0)[0]
            for t, d in zip((grad_output, input, indices), in_dims[:3])]
    return _unfold(torch.ops.fastconv._max_pool2d_backward(*args, *rest), batch), 0
