"""Argument checks shared by the public functions and the fake (meta) kernels.

The wording matches csrc/common/checks.h, so a bad call reads the same whether it fails in
C++ (eager CPU / CUDA), in a fake kernel (torch.compile, opcheck) or in Python argument
normalisation.
"""

from __future__ import annotations

import operator
from typing import Sequence, Tuple

import torch

_ALGOS = ("auto", "im2col", "direct")
_POOL_INDICES = ("none", "full", "compact")


def dtype_list(device_type: str) -> str:
    if device_type == "cuda":
        return "float32, float64, float16 or bfloat16"
    return "float32, float64 or bfloat16"


def supported_dtypes(device_type: str):
    if device_type == "cuda":
        return (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    return (torch.float32, torch.float64, torch.bfloat16)


def check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: expected {name} to be a torch.Tensor, but got {type(t).__name__}")


def check_dtype(op: str, name: str, t: torch.Tensor) -> None:
    dev = t.device.type
    if dev == "meta":  # fake tensors on meta: accept every floating dtype a backend supports
        ok = t.dtype in supported_dtypes("cuda")
    else:
        ok = t.dtype in supported_dtypes(dev)
    if not ok:
        raise TypeError(
            f"{op}: expected {name} to have dtype {dtype_list(dev)} on {dev}, but got {t.dtype}"
        )


def check_same(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise RuntimeError(
            f"{op}: expected {name} to have the same dtype as {ref_name} ({ref.dtype}), "
            f"but got {t.dtype}"
        )
    if t.device != ref.device:
        raise RuntimeError(
            f"{op}: expected {name} to be on the same device as {ref_name} ({ref.device}), "
            f"but got {t.device}"
        )


def as_int(value):
    """value as a Python int (or the SymInt itself) if it is an integer as torch's int
    arguments take them: an int, a numpy integer, an integer tensor of one element (anything
    with __index__), but not a bool; None otherwise."""
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except (TypeError, RuntimeError):
        return None


def pair(op: str, name: str, value, min_value: int) -> Tuple[int, int]:
    """Normalise an int or a 1/2-element sequence to a pair of Python ints and range-check it."""
    def bad():
        return TypeError(f"{op}: expected {name} to be an int or a tuple of 2 ints, but got {value!r}")

    if isinstance(value, (tuple, list, torch.Size)):
        items = [as_int(x) for x in value]
        if any(x is None for x in items):
            raise bad()
        if len(items) == 1:
            v = (items[0], items[0])
        elif len(items) == 2:
            v = (items[0], items[1])
        else:
            raise ValueError(f"{op}: expected {name} to have 2 elements, but got {len(value)}: {list(value)}")
    else:
        one = as_int(value)
        if one is None:
            raise bad()
        v = (one, one)
    check_pair(op, name, v, min_value)
    return v


def check_pair(op: str, name: str, v: Sequence[int], min_value: int) -> None:
    if len(v) != 2:
        raise ValueError(f"{op}: expected {name} to have 2 elements, but got {len(v)}: {list(v)}")
    if not (v[0] >= min_value and v[1] >= min_value):
        kind = "positive" if min_value > 0 else "non-negative"
        raise ValueError(f"{op}: expected {name} to be {kind}, but got {list(v)}")


def check_algo(op: str, algo) -> str:
    if not isinstance(algo, str) or algo not in _ALGOS:
        raise ValueError(f"{op}: expected algo to be one of 'auto', 'im2col', 'direct', but got {algo!r}")
    return algo


def check_pool_indices(op: str, mode) -> str:
    if mode not in _POOL_INDICES:
        raise ValueError(
            f"{op}: expected indices to be one of 'none', 'full', 'compact', but got {mode!r}"
        )
    return mode


def conv_output_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def pool_output_size(size, k, s, p, d, ceil_mode):
    numer = size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)
    out = numer // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out = out - 1
    return out


_INT64_MAX = 2**63 - 1
_INT_MAX = 2**31 - 1


def check_window_fits(op, dim, size, kernel, padding, dilation):
    """Twin of checks.h: the padded size and the dilated kernel size must fit in int64."""
    if size + 2 * padding > _INT64_MAX or dilation * (kernel - 1) + 1 > _INT64_MAX:
        raise ValueError(
            f"{op}: expected the padded input {dim} ({size} + 2 * {padding}) and the dilated "
            f"kernel {dim} ({dilation} * ({kernel} - 1) + 1) to fit in int64"
        )


def conv2d_shapes(op, input_sizes, weight_sizes, stride, padding, dilation, groups):
    """Validate a conv2d call and return the output shape (N, O, OH, OW)."""
    input_sizes, weight_sizes = list(input_sizes), list(weight_sizes)
    if len(input_sizes) != 4:
        raise ValueError(
            f"{op}: expected input to be a 4-D tensor (N, C, H, W), but got a "
            f"{len(input_sizes)}-D tensor of shape {input_sizes}"
        )
    if len(weight_sizes) != 4:
        raise ValueError(
            f"{op}: expected weight to be a 4-D tensor (out_channels, in_channels / groups, kH, kW), "
            f"but got a {len(weight_sizes)}-D tensor of shape {weight_sizes}"
        )
    check_pair(op, "stride", stride, 1)
    check_pair(op, "padding", padding, 0)
    check_pair(op, "dilation", dilation, 1)
    if not groups > 0:
        raise ValueError(f"{op}: expected groups to be positive, but got {groups}")
    n, c, h, w = input_sizes
    o, cg, kh, kw = weight_sizes
    if not (c > 0 and h > 0 and w > 0):
        raise ValueError(
            f"{op}: expected input to have non-zero channels, height and width, but got shape {input_sizes}"
        )
    if not (o > 0 and cg > 0 and kh > 0 and kw > 0):
        raise ValueError(f"{op}: expected weight to have non-zero sizes, but got shape {weight_sizes}")
    if c % groups != 0:
        raise ValueError(f"{op}: expected input channels ({c}) to be divisible by groups ({groups})")
    if o % groups != 0:
        raise ValueError(
            f"{op}: expected out channels weight.size(0) ({o}) to be divisible by groups ({groups})"
        )
    if cg * groups != c:
        raise ValueError(
            f"{op}: expected weight.size(1) * groups == input channels, but got {cg} * {groups} != {c} "
            f"(input shape {input_sizes}, weight shape {weight_sizes})"
        )
    check_window_fits(op, "height", h, kh, padding[0], dilation[0])
    check_window_fits(op, "width", w, kw, padding[1], dilation[1])
    ekh, ekw = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    ph, pw = h + 2 * padding[0], w + 2 * padding[1]
    if not (ekh <= ph and ekw <= pw):
        raise ValueError(
            f"{op}: expected the (dilated) kernel size ({ekh} x {ekw}) to be at most the padded "
            f"input size ({ph} x {pw})"
        )
    oh = conv_output_size(h, kh, stride[0], padding[0], dilation[0])
    ow = conv_output_size(w, kw, stride[1], padding[1], dilation[1])
    return [n, o, oh, ow]


def depthwise_shapes(op, input_sizes, weight_sizes, stride, padding, dilation):
    input_sizes, weight_sizes = list(input_sizes), list(weight_sizes)
    if len(input_sizes) != 4:
        raise ValueError(
            f"{op}: expected input to be a 4-D tensor (N, C, H, W), but got a "
            f"{len(input_sizes)}-D tensor of shape {input_sizes}"
        )
    if len(weight_sizes) != 4 or weight_sizes[1] != 1:
        raise ValueError(
            f"{op}: expected weight to be a 4-D tensor (C * multiplier, 1, kH, kW), but got shape "
            f"{weight_sizes}"
        )
    c = input_sizes[1]
    if not (c > 0 and weight_sizes[0] > 0 and weight_sizes[0] % c == 0):
        raise ValueError(
            f"{op}: expected weight.size(0) to be a positive multiple of the input channels ({c}) "
            f"(channel multiplier >= 1), but got weight shape {weight_sizes}"
        )
    return conv2d_shapes(op, input_sizes, weight_sizes, stride, padding, dilation, c)


def check_bias(op, bias, input, out_channels):
    if bias is None:
        return
    if bias.dim() != 1 or bias.shape[0] != out_channels:
        raise ValueError(
            f"{op}: expected bias to be a 1-D tensor of size out_channels ({out_channels}), "
            f"but got shape {list(bias.shape)}"
        )
    check_same(op, "bias", bias, "input", input)


def check_grad_output(op, grad_output, other, other_name, expected_shape):
    check_dtype(op, "grad_output", grad_output)
    check_same(op, other_name, other, "grad_output", grad_output)
    if list(grad_output.shape) != list(expected_shape):
        raise ValueError(
            f"{op}: expected grad_output of shape {list(expected_shape)}, but got "
            f"{list(grad_output.shape)}"
        )


def max_pool2d_shapes(op, input_sizes, kernel_size, stride, padding, dilation, ceil_mode):
    input_sizes = list(input_sizes)
    if len(input_sizes) != 4:
        raise ValueError(
            f"{op}: expected input to be a 4-D tensor (N, C, H, W), but got a "
            f"{len(input_sizes)}-D tensor of shape {input_sizes}"
        )
    check_pair(op, "kernel_size", kernel_size, 1)
    check_pair(op, "stride", stride, 1)
    check_pair(op, "padding", padding, 0)
    check_pair(op, "dilation", dilation, 1)
    for name, v in (("kernel_size", kernel_size), ("stride", stride), ("padding", padding),
                    ("dilation", dilation)):
        if not (v[0] <= _INT_MAX and v[1] <= _INT_MAX):
            raise ValueError(
                f"{op}: expected {name} to be at most {_INT_MAX} (a C int, as in torch), but got "
                f"{list(v)}"
            )
    if not (padding[0] <= kernel_size[0] // 2 and padding[1] <= kernel_size[1] // 2):
        raise ValueError(
            f"{op}: expected padding to be at most half of kernel_size, but got padding "
            f"{list(padding)} and kernel_size {list(kernel_size)}"
        )
    n, c, h, w = input_sizes
    if not (c > 0 and h > 0 and w > 0):
        raise ValueError(
            f"{op}: expected input to have non-zero channels, height and width, but got shape {input_sizes}"
        )
    oh = pool_output_size(h, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode)
    ow = pool_output_size(w, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode)
    if not (oh > 0 and ow > 0):
        raise ValueError(
            f"{op}: the output would be empty: input size {h} x {w} with kernel_size "
            f"{list(kernel_size)}, stride {list(stride)}, padding {list(padding)}, dilation "
            f"{list(dilation)} gives output size {oh} x {ow}; expected a positive output size"
        )
    return [n, c, oh, ow]


def suggest_memory_format(t: torch.Tensor) -> torch.memory_format:
    """Python twin of at::Tensor::suggest_memory_format() for 4-D tensors."""
    from torch._prims_common import suggest_memory_format as _smf

    return _smf(t)


def conv_memory_format(input: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    if (suggest_memory_format(input) == torch.channels_last
            or suggest_memory_format(weight) == torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
