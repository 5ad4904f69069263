"""Size arithmetic for CNNs: conv / pool output sizes, receptive fields, per-layer shapes.

The formulas are the ones the layers really use (torch's, and fastconv's, which match torch):

    conv:  out = floor((in + 2p - d(k - 1) - 1) / s) + 1
    pool:  the same with floor, or with ceil_mode the ceiling -- except that the last window
           must start inside the input or the left padding (torch drops a window that would
           start in the right padding only)

Receptive-field arithmetic (per spatial dimension, for a layer with kernel k, stride s,
padding p, dilation d, effective kernel k' = d(k - 1) + 1, applied to an input with jump j
and receptive field r):

    jump   j_out = j * s                       input pixels between neighbouring outputs
    rf     r_out = r + (k' - 1) * j            input pixels one output depends on (before
                                               clipping at the border)
    start  c_out = c + ((k' - 1) / 2 - p) * j  input coordinate of the centre of output 0's
                                               field (input pixel i has centre i; negative
                                               when padding makes the field stick out)

Output unit i then sees input pixels [c + i*j - (r - 1)/2, c + i*j + (r - 1)/2] (clipped to the
image; dilated kernels skip some pixels inside that span).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Iterable, List, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = [
    "conv2d_output_size",
    "pool2d_output_size",
    "receptive_field",
    "layer_shapes",
    "LayerRF",
    "LayerShape",
    "BRANCH_NAMES",
]

IntOrPair = Union[int, Sequence[int]]


def _pair(name: str, value, min_value: int) -> Tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"expected {name} to be an int or a pair of ints, but got {value!r}")
    if isinstance(value, numbers.Integral):
        v = (int(value), int(value))
    elif isinstance(value, (tuple, list, torch.Size)) and len(value) in (1, 2) and all(
        isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in value
    ):
        v = (int(value[0]), int(value[-1]))
    else:
        raise TypeError(f"expected {name} to be an int or a pair of ints, but got {value!r}")
    if v[0] < min_value or v[1] < min_value:
        kind = "positive" if min_value > 0 else "non-negative"
        raise ValueError(f"expected {name} to be {kind}, but got {value!r}")
    return v


def _all_scalar(*values) -> bool:
    return all(isinstance(v, numbers.Integral) or isinstance(v, str) for v in values)


def _conv1d_size(size, k, s, p, d):
    ek = d * (k - 1) + 1
    if size + 2 * p < ek:
        raise ValueError(
            f"the (dilated) kernel size {ek} is larger than the padded input size {size + 2 * p} "
            f"(input {size}, padding {p}): the layer would fail"
        )
    return (size + 2 * p - ek) // s + 1


def conv2d_output_size(size: IntOrPair, kernel_size: IntOrPair, stride: IntOrPair = 1,
                       padding: Union[IntOrPair, str] = 0, dilation: IntOrPair = 1):
    """Output size of torch.nn.Conv2d / fastconv.nn.Conv2d (and of the functional forms).

    Arguments are ints or (h, w) pairs, padding may also be 'valid' or 'same' (stride 1 only,
    as in torch). Returns an int when every argument is a single int (or a padding string),
    else an (h, w) tuple. Raises ValueError where the layer itself would raise.
    """
    scalar = _all_scalar(size, kernel_size, stride, padding, dilation)
    hw = _pair("size", size, 1)
    k = _pair("kernel_size", kernel_size, 1)
    s = _pair("stride", stride, 1)
    d = _pair("dilation", dilation, 1)
    if isinstance(padding, str):
        if padding == "valid":
            p = (0, 0)
        elif padding == "same":
            if s != (1, 1):
                raise ValueError(
                    f"padding='same' is not supported for strided convolutions (stride {stride!r})"
                )
            # torch pads d(k-1) in total (the extra one on the bottom/right): size is kept
            return hw[0] if scalar else hw
        else:
            raise ValueError(
                f"expected padding to be an int, a pair, 'same' or 'valid', but got {padding!r}"
            )
    else:
        p = _pair("padding", padding, 0)
    out = tuple(_conv1d_size(hw[i], k[i], s[i], p[i], d[i]) for i in range(2))
    return out[0] if scalar else out


def _pool1d_size(size, k, s, p, d, ceil_mode):
    numer = size + 2 * p - d * (k - 1) - 1
    out = (numer + (s - 1 if ceil_mode else 0)) // s + 1
    # ceil mode: the last window has to start inside the input or the left padding
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    if out < 1:
        raise ValueError(
            f"the output would be empty: input size {size}, kernel_size {k}, stride {s}, "
            f"padding {p}, dilation {d} give output size {out}"
        )
    return out


def pool2d_output_size(size: IntOrPair, kernel_size: IntOrPair, stride: IntOrPair = None,
                       padding: IntOrPair = 0, dilation: IntOrPair = 1, ceil_mode: bool = False):
    """Output size of MaxPool2d (torch's or fastconv's) and AvgPool2d (dilation 1).

    stride defaults to kernel_size, as in the layers. Returns an int when every argument is a
    single int, else an (h, w) tuple. Raises ValueError where the layer itself would raise
    (padding larger than half the kernel, empty output).
    """
    if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0):
        stride = kernel_size
    scalar = _all_scalar(size, kernel_size, stride, padding, dilation)
    hw = _pair("size", size, 1)
    k = _pair("kernel_size", kernel_size, 1)
    s = _pair("stride", stride, 1)
    p = _pair("padding", padding, 0)
    d = _pair("dilation", dilation, 1)
    # torch's ATen check compares with the undilated kernel (the Python-side message mentions
    # the "effective" size, but a dilated kernel gets no extra allowance)
    for i in range(2):
        if p[i] > k[i] // 2:
            raise ValueError(
                f"pad should be at most half of kernel size, but got padding {padding!r} and "
                f"kernel_size {kernel_size!r}"
            )
    out = tuple(_pool1d_size(hw[i], k[i], s[i], p[i], d[i], bool(ceil_mode)) for i in range(2))
    return out[0] if scalar else out


# --------------------------------------------------------------------------------------------
# receptive fields
# --------------------------------------------------------------------------------------------

# Children whose attribute name or class name is one of these are side branches, not the main
# path: the shortcut projection of a residual block (added back after the main path, so it
# never widens the field) and squeeze-and-excitation blocks (a global pool whose result only
# rescales channels).
BRANCH_NAMES = frozenset({"downsample", "shortcut", "skip", "se", "SqueezeExcitation",
                          "SqueezeExcite", "SELayer", "SEBlock"})

# Layers that end the spatial part of a network: from here on every unit sees the whole input.
_STOP = (nn.Flatten, nn.Linear)


@dataclass(frozen=True)
class LayerRF:
    """One spatial layer on the main path, with the geometry after it (all (h, w) pairs)."""
    name: str
    kind: str
    output_size: Tuple[int, int]
    receptive_field: Tuple[int, int]
    jump: Tuple[int, int]
    start: Tuple[float, float]


def _geometry(module: nn.Module, size: Tuple[int, int]):
    """(k, s, p, d, output size) per dimension for a spatial layer, or None for layers that keep
    the spatial geometry (activations, normalisation, dropout, ...)."""
    if isinstance(module, nn.Conv2d):
        k, s, d = module.kernel_size, module.stride, module.dilation
        if isinstance(module.padding, str):
            if module.padding == "valid":
                p = (0, 0)
            else:  # 'same': torch puts d(k-1)//2 on the top/left, the rest on the bottom/right
                p = tuple(d[i] * (k[i] - 1) // 2 for i in range(2))
        else:
            p = module.padding
        out = conv2d_output_size(tuple(size), k, s, module.padding, d)
        return k, s, p, d, out
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        k = _pair("kernel_size", module.kernel_size, 1)
        s = _pair("stride", module.stride if module.stride is not None else k, 1)
        p = _pair("padding", module.padding, 0)
        d = _pair("dilation", getattr(module, "dilation", 1), 1)
        out = pool2d_output_size(tuple(size), k, s, p, d, module.ceil_mode)
        return k, s, p, d, out
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        osz = module.output_size
        if not isinstance(osz, (tuple, list)):
            osz = (osz, osz)
        osz = tuple(size[i] if osz[i] is None else int(osz[i]) for i in range(2))
        if size[0] % osz[0] or size[1] % osz[1]:
            # windows of unequal sizes: no single (k, s) describes them
            raise ValueError(
                f"receptive_field: {type(module).__name__} from {tuple(size)} to {osz} uses "
                "windows of unequal sizes; only sizes that divide evenly are supported"
            )
        k = (size[0] // osz[0], size[1] // osz[1])
        return k, k, (0, 0), (1, 1), osz
    return None


def _walk(module: nn.Module, prefix: str, branches):
    """Yield (qualified name, leaf module) in registration order, skipping side branches.

    Registration order is taken as execution order: true of nn.Sequential and of the usual
    hand-written blocks (conv1, bn1, conv2, ...). Spatial layers are yielded whole even when a
    subclass has children of its own."""
    children = list(module.named_children())
    if not children or _geometry_kind(module):
        yield prefix, module
        return
    for name, child in children:
        if name in branches or type(child).__name__ in branches:
            continue
        yield from _walk(child, f"{prefix}.{name}" if prefix else name, branches)


def _geometry_kind(module) -> bool:
    return isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                               nn.AdaptiveMaxPool2d) + _STOP)


def _as_layers(model_or_layers, branches):
    if isinstance(model_or_layers, nn.Module):
        return list(_walk(model_or_layers, "", branches))
    layers = []
    for i, item in enumerate(model_or_layers):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], nn.Module):
            name, mod = item
        elif isinstance(item, nn.Module):
            name, mod = str(i), item
        else:
            raise TypeError(
                "receptive_field: expected an nn.Module or an iterable of modules / "
                f"(name, module) pairs, but item {i} is {type(item).__name__}"
            )
        layers.extend(_walk(mod, name, branches))
    return layers


def receptive_field(model_or_layers: Union[nn.Module, Iterable], input_size: IntOrPair,
                    branches: Iterable[str] = BRANCH_NAMES) -> List[LayerRF]:
    """Receptive field after every spatial layer on a network's main path.

    model_or_layers: an nn.Module (walked recursively: nn.Sequential, nn.ModuleList and custom
    blocks, in registration order) or an iterable of modules or (name, module) pairs.
    input_size: the input's (H, W) (an int for square inputs).

    Spatial layers: Conv2d (torch's and fastconv's subclass, any padding mode / string),
    MaxPool2d, AvgPool2d, and AdaptiveAvg/MaxPool2d when the sizes divide evenly (global
    pooling included). Activations, normalisation and other layers without children keep the
    geometry. The walk stops at the first Flatten or Linear.

    Branches: a residual block computes main(x) + shortcut(x); the shortcut (1x1 projection,
    possibly strided) reaches the same output positions with a field no larger than the main
    path's, so the field is the main path's. Children whose attribute name or class name is in
    `branches` (default BRANCH_NAMES: downsample, shortcut, skip, se, SqueezeExcitation, ...)
    are therefore skipped; squeeze-and-excitation blocks are skipped too, since their global
    pool only rescales channels (strictly it makes every output depend on the whole feature
    map; the field reported is the spatial one). This is the *theoretical* field; the
    effective one (where the gradient is large) is smaller.

    Returns one LayerRF per spatial layer (name, kind, output_size, receptive_field, jump,
    start), each an (h, w) pair.
    """
    size = _pair("input_size", input_size, 1)
    branches = frozenset(branches)
    rf, jump, start = [1, 1], [1, 1], [0.0, 0.0]
    result = []
    for name, mod in _as_layers(model_or_layers, branches):
        if isinstance(mod, _STOP):
            break
        geo = _geometry(mod, size)
        if geo is None:
            continue
        k, s, p, d, out = geo
        for i in range(2):
            ek = d[i] * (k[i] - 1) + 1
            start[i] = start[i] + ((ek - 1) / 2 - p[i]) * jump[i]
            rf[i] = rf[i] + (ek - 1) * jump[i]
            jump[i] = jump[i] * s[i]
        size = tuple(out)
        result.append(LayerRF(name, type(mod).__name__, size, tuple(rf), tuple(jump),
                              tuple(start)))
    return result


# --------------------------------------------------------------------------------------------
# real shapes, layer by layer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerShape:
    name: str
    kind: str
    input_shape: Tuple[int, ...]
    output_shape: Tuple[int, ...]


def _shape(x):
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return tuple(x[0].shape)
    return ()


def layer_shapes(model: nn.Module, input_shape: Sequence[int], leaves_only: bool = True,
                 device=None, dtype=None) -> List[LayerShape]:
    """Run one forward pass on zeros of `input_shape` and record every module's input and output
    shape in execution order (through forward hooks; leaf modules only unless leaves_only=False,
    then containers too, recorded when they finish).

    The model is run in eval mode under no_grad (BatchNorm running statistics are left alone)
    and its training flags are restored afterwards. Modules called several times appear once per
    call.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"layer_shapes: expected an nn.Module, but got {type(model).__name__}")
    shape = tuple(int(v) for v in input_shape)
    if any(v < 0 for v in shape):
        raise ValueError(f"layer_shapes: expected a non-negative input shape, but got {shape}")
    p = next(model.parameters(), None)
    device = device if device is not None else (p.device if p is not None else "cpu")
    dtype = dtype if dtype is not None else (p.dtype if p is not None else torch.float32)
    records: List[LayerShape] = []
    handles = []
    for name, mod in model.named_modules():
        if leaves_only and next(mod.children(), None) is not None:
            continue

        def hook(m, inputs, output, name=name):
            records.append(LayerShape(name, type(m).__name__, _shape(inputs), _shape(output)))

        handles.append(mod.register_forward_hook(hook))
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(shape, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m, t in flags.items():
            m.training = t
    return records
