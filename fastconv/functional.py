"""fastconv's public functions: torch.nn.functional's argument conventions, fastconv's kernels.

Each function normalises its arguments the way torch.nn.functional does (ints or tuples,
padding strings, unbatched (C, H, W) input) and calls the registered op
`torch.ops.fastconv.*`; the dispatcher picks the CPU or CUDA kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _checks as C
from . import _functorch

__all__ = ["conv2d", "depthwise_conv2d", "max_pool2d"]


def _batched(op: str, input: torch.Tensor):
    C.check_tensor(op, "input", input)
    if input.dim() == 4:
        return input, False
    if input.dim() == 3:
        return input.unsqueeze(0), True
    raise ValueError(
        f"{op}: expected input to be a 3-D (C, H, W) or 4-D (N, C, H, W) tensor, but got a "
        f"{input.dim()}-D tensor of shape {list(input.shape)}"
    )


def _resolve_padding(op, input, weight, padding, stride, dilation):
    """Turn padding (int, tuple, 'same', 'valid') into a symmetric pair, padding the input
    explicitly where 'same' needs one extra row/column (on the bottom/right, as torch does)."""
    if isinstance(padding, str):
        if padding == "valid":
            return input, (0, 0)
        if padding != "same":
            raise ValueError(
                f"{op}: expected padding to be an int, a tuple of 2 ints, 'same' or 'valid', "
                f"but got {padding!r}"
            )
        if stride != (1, 1):
            raise ValueError(
                f"{op}: padding='same' is not supported for strided convolutions, but got stride "
                f"{list(stride)}"
            )
        C.check_tensor(op, "weight", weight)
        if weight.dim() != 4:
            raise ValueError(
                f"{op}: expected weight to be a 4-D tensor, but got a {weight.dim()}-D tensor of "
                f"shape {list(weight.shape)}"
            )
        total = [dilation[i] * (weight.shape[2 + i] - 1) for i in range(2)]
        left = [t // 2 for t in total]
        extra = [t - l for t, l in zip(total, left)]
        extra = [e - l for e, l in zip(extra, left)]
        if extra[0] or extra[1]:
            padded = F.pad(input, [0, extra[1], 0, extra[0]])
            if _functorch.transforming():  # vmap cannot ask a tensor its layout: keep F.pad's
                input = padded
            else:
                input = padded.contiguous(memory_format=C.suggest_memory_format(input))
        return input, (left[0], left[1])
    return input, C.pair(op, "padding", padding, 0)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, algo="auto"):
    """2-D convolution, same semantics as torch.nn.functional.conv2d.

    algo: "im2col" (im2col + GEMM), "direct" (no column buffer) or "auto": depthwise shapes
    (groups == in_channels, weight.size(1) == 1) use the depthwise kernels, other shapes pick
    im2col or direct by the rule in README ("Choosing an algorithm").
    """
    op = "conv2d"
    C.check_algo(op, algo)
    x, unbatched = _batched(op, input)
    C.check_tensor(op, "weight", weight)
    if bias is not None:
        C.check_tensor(op, "bias", bias)
    groups_int = C.as_int(groups)
    if groups_int is None:
        raise TypeError(f"{op}: expected groups to be an int, but got {groups!r}")
    groups = groups_int
    stride = C.pair(op, "stride", stride, 1)
    dilation = C.pair(op, "dilation", dilation, 1)
    x, pad = _resolve_padding(op, x, weight, padding, stride, dilation)
    if _functorch.active():  # torch.func: see fastconv/_functorch.py
        spec = _functorch.Params("conv2d", stride, pad, dilation, groups, algo)
        out = _functorch.Conv.apply(x, weight, bias, spec)
    else:
        out = torch.ops.fastconv.conv2d(x, weight, bias, stride, pad, dilation, groups, algo)
    return out.squeeze(0) if unbatched else out


def depthwise_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1):
    """Depthwise 2-D convolution: weight (C * multiplier, 1, kH, kW); equal to
    torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation, groups=C)."""
    op = "depthwise_conv2d"
    x, unbatched = _batched(op, input)
    C.check_tensor(op, "weight", weight)
    if bias is not None:
        C.check_tensor(op, "bias", bias)
    stride = C.pair(op, "stride", stride, 1)
    dilation = C.pair(op, "dilation", dilation, 1)
    x, pad = _resolve_padding(op, x, weight, padding, stride, dilation)
    if _functorch.active():
        spec = _functorch.Params("depthwise", stride, pad, dilation)
        out = _functorch.Conv.apply(x, weight, bias, spec)
    else:
        out = torch.ops.fastconv.depthwise_conv2d(x, weight, bias, stride, pad, dilation)
    return out.squeeze(0) if unbatched else out


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """2-D max pooling, same semantics as torch.nn.functional.max_pool2d (indices are int64
    flat positions h * W + w inside each (H, W) plane).

    Indices are computed only when something needs them: the caller (return_indices=True),
    or the backward, which gets compact window-local indices (1 byte per output).
    """
    op = "max_pool2d"
    x, unbatched = _batched(op, input)
    kernel_size = C.pair(op, "kernel_size", kernel_size, 1)
    if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0):
        stride = kernel_size
    stride = C.pair(op, "stride", stride, 1)
    padding = C.pair(op, "padding", padding, 0)
    dilation = C.pair(op, "dilation", dilation, 1)
    args = (kernel_size, stride, padding, dilation, bool(ceil_mode))
    if _functorch.active():  # torch's indices, which every transform's formulas read
        out, idx = _functorch.MaxPool.apply(x, _functorch.Params(*args))
    else:
        if return_indices:
            mode = "full"
        elif torch.is_grad_enabled() and _functorch.requires_grad(x):
            mode = "compact"
        else:
            mode = "none"
        out, idx = torch.ops.fastconv.max_pool2d(x, *args, mode)
    if unbatched:
        out = out.squeeze(0)
        if return_indices:
            idx = idx.squeeze(0)
    return (out, idx) if return_indices else out
