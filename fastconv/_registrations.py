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
# vmap: the forward ops take a batch of images already, so a vmapped input folds into it
# --------------------------------------------------------------------------------------------


def _fold(x, bdim):
    """x with its vmapped dim bdim merged into the image batch: (B * N, C, H, W), and B. A
    view when the two dims are adjacent in memory (vmap's usual dim 0, either layout)."""
    x = x.movedim(bdim, 0)
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]), x.shape[0]


def _unfold(y, batch):
    return y.reshape(batch, y.shape[0] // batch, *y.shape[1:])


def _per_sample(op, info, in_dims, args):
    """op over the vmapped dim one sample at a time, outputs stacked at dim 0: for a vmapped
    weight or bias, where the samples do not share a kernel."""
    def sample(i):  # in_dims has a (nested) None for each non-tensor argument
        return [a.select(d, i) if isinstance(a, torch.Tensor) and d is not None else a
                for a, d in zip(args, in_dims)]

    outs = [op(*sample(i)) for i in range(info.batch_size)]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
    return torch.stack(outs), 0


def _conv_vmap(op):
    def rule(info, in_dims, input, weight, bias, *rest):
        x_dim, w_dim, b_dim = in_dims[:3]
        if x_dim is None or w_dim is not None or b_dim is not None:
            return _per_sample(op, info, in_dims, (input, weight, bias, *rest))
        x, batch = _fold(input, x_dim)
        return _unfold(op(x, weight, bias, *rest), batch), 0
    return rule


lib.register_vmap("fastconv::conv2d", _conv_vmap(torch.ops.fastconv.conv2d))
lib.register_vmap("fastconv::depthwise_conv2d", _conv_vmap(torch.ops.fastconv.depthwise_conv2d))


@lib.register_vmap("fastconv::max_pool2d")
def _max_pool2d_vmap(info, in_dims, input, *rest):
    x, batch = _fold(input, in_dims[0])
    out, idx = torch.ops.fastconv.max_pool2d(x, *rest)
    if idx.dim() != 4:  # indices="none": one empty tensor, the same for every sample
        return (_unfold(out, batch), idx), (0, None)
    return (_unfold(out, batch), _unfold(idx, batch)), (0, 0)
