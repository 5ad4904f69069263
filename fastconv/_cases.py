"""The benchmark cases: layer shapes from real networks, shared by `fastconv bench`
(fastconv/benchmark.py) and the pytest-benchmark suite in benchmarks/.

A Case is one layer: an op (conv2d, depthwise_conv2d or max_pool2d), its shape and arguments,
and where it comes from (network and layer name). `suite(name, device_type)` returns a list
of cases; batch sizes depend on the device (8 on a CPU, 64-128 on a GPU), except in the
'cpu-targets' suite, whose shapes are exactly the CPU targets of the project (N=8, float32).

The implementations compared for a case come from `fastconv_impls(case)` (name -> callable)
and `torch_impl(case)`. Test hook: the benchmark looks both up through this module at run
time, so a test can monkeypatch `fastconv._cases.fastconv_impls` to inject a deliberately
wrong implementation and check that it is reported as FAIL.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Optional, Tuple

OPS = ("conv2d", "depthwise_conv2d", "max_pool2d")
# What users may type for --ops; maps to the canonical op name.
OP_ALIASES = {
    "conv2d": "conv2d", "conv": "conv2d",
    "depthwise_conv2d": "depthwise_conv2d", "depthwise": "depthwise_conv2d",
    "dw": "depthwise_conv2d",
    "max_pool2d": "max_pool2d", "maxpool": "max_pool2d", "pool": "max_pool2d",
}
NETWORKS = ("resnet18", "resnet50", "mobilenet_v2", "convnext", "replknet", "vgg16")
# 'tiny' is for the test suite (seconds on a CPU); it is accepted but not advertised.
SUITES = ("quick", "full", "cpu-targets") + NETWORKS
HIDDEN_SUITES = ("tiny",)


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    network: str
    layer: str
    n: int
    c: int
    h: int
    w: int
    kernel: Tuple[int, int]
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    out_channels: int = 0  # conv2d / depthwise: weight.size(0); max_pool2d: ignored (= c)
    groups: int = 1
    bias: bool = False
    ceil_mode: bool = False
    # None: the run's --channels-last setting decides; True/False: this case's layout is fixed
    # (the 'cpu-targets' suite measures both layouts of some shapes in one run).
    channels_last: Optional[bool] = None

    # ---- shapes ------------------------------------------------------------------------
    @property
    def out_hw(self) -> Tuple[int, int]:
        if self.op == "max_pool2d":
            return tuple(_pool_out(s, k, st, p, d, self.ceil_mode) for s, k, st, p, d in zip(
                (self.h, self.w), self.kernel, self.stride, self.padding, self.dilation))
        return tuple((s + 2 * p - d * (k - 1) - 1) // st + 1 for s, k, st, p, d in zip(
            (self.h, self.w), self.kernel, self.stride, self.padding, self.dilation))

    @property
    def input_shape(self):
        return (self.n, self.c, self.h, self.w)

    @property
    def weight_shape(self):
        if self.op == "max_pool2d":
            return None
        return (self.out_channels, self.c // self.groups) + tuple(self.kernel)

    @property
    def output_shape(self):
        oc = self.c if self.op == "max_pool2d" else self.out_channels
        return (self.n, oc) + self.out_hw

    @property
    def kind(self) -> str:
        """'compute' (reported in TFLOP/s) or 'memory' (GB/s against copy bandwidth)."""
        return "compute" if self.op == "conv2d" else "memory"

    @property
    def label(self) -> str:
        """The shape in a few characters, e.g. '3x3 s2 p1 64>128 56x56 N8'."""
        k = "x".join(map(str, self.kernel))
        parts = [("dw" if self.op == "depthwise_conv2d" else "") + k]
        if self.stride != (1, 1):
            parts.append("s" + _pair_str(self.stride))
        if self.padding != (0, 0):
            parts.append("p" + _pair_str(self.padding))
        if self.dilation != (1, 1):
            parts.append("d" + _pair_str(self.dilation))
        if self.op == "conv2d":
            g = f" g{self.groups}" if self.groups > 1 else ""
            parts.append(f"{self.c}>{self.out_channels}{g}")
        else:
            parts.append(f"C{self.c}" + (f">{self.out_channels}" if self.op == "depthwise_conv2d"
                                         and self.out_channels != self.c else ""))
        parts.append(f"{self.h}x{self.w} N{self.n}")
        if self.channels_last is not None:
            parts.append("NHWC" if self.channels_last else "NCHW")
        return " ".join(parts)

    @property
    def name(self) -> str:
        return f"{self.network}.{self.layer}"

    def reductions(self):
        """Products summed per element of (output, grad_input, grad_weight, grad_bias): the
        correctness tolerance grows with them."""
        kh, kw = self.kernel
        sh, sw = self.stride
        oh, ow = self.out_hw
        if self.op == "max_pool2d":
            # a grad_input element sums the windows that overlap it (at most ceil(k/s) per axis)
            return {"out": 1, "grad_input": math.ceil(kh / sh) * math.ceil(kw / sw)}
        return {
            "out": (self.c // self.groups) * kh * kw,
            "grad_input": ((self.out_channels // self.groups)
                           * math.ceil(kh / sh) * math.ceil(kw / sw)),
            "grad_weight": self.n * oh * ow,
            "grad_bias": self.n * oh * ow,
        }

    # ---- work --------------------------------------------------------------------------
    def flops(self, direction: str) -> float:
        """Multiply-adds x 2 of the forward (x3 for forward + backward: grad_input and
        grad_weight each cost one forward); max_pool2d counts no FLOPs."""
        if self.op == "max_pool2d":
            return 0.0
        oh, ow = self.out_hw
        f = 2.0 * self.n * self.out_channels * oh * ow * (self.c // self.groups)
        f *= self.kernel[0] * self.kernel[1]
        return f * (3 if direction == "fwd+bwd" else 1)

    def bytes(self, direction: str, itemsize: int) -> float:
        """The traffic every implementation needs at least: each tensor read or written once
        per pass (forward: input, weight, output; backward: grad_output read by both grad
        ops, input and weight read, grad_input and grad_weight written). Pooling indices are
        left out (their format is the implementation's choice)."""
        x = math.prod(self.input_shape)
        y = math.prod(self.output_shape)
        w = math.prod(self.weight_shape) if self.weight_shape else 0
        fwd = x + w + y
        if direction == "fwd":
            return float(fwd * itemsize)
        if self.op == "max_pool2d":
            bwd = y + x  # read grad_output, write grad_input
        else:
            bwd = 2 * y + x + w + x + w  # grad_out x2, input, weight, grad_input, grad_weight
        return float((fwd + bwd) * itemsize)

    def key(self):
        """Shape identity: two networks with the same layer shape share one case."""
        d = dataclasses.asdict(self)
        d.pop("network")
        d.pop("layer")
        return tuple(sorted(d.items()))


def _pool_out(size, k, s, p, d, ceil_mode):
    numer = size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)
    out = numer // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _pair_str(p):
    return str(p[0]) if p[0] == p[1] else f"{p[0]},{p[1]}"


def _p(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def conv(net, layer, n, cin, cout, hw, k, s=1, p=0, d=1, groups=1, bias=False, **kw):
    op = "depthwise_conv2d" if groups == cin and groups > 1 and cout % cin == 0 else "conv2d"
    h, w = _p(hw)
    return Case(op, net, layer, n, cin, h, w, _p(k), _p(s), _p(p), _p(d), out_channels=cout,
                groups=groups, bias=bias, **kw)


def dw(net, layer, n, c, hw, k, s=1, p=None, bias=False, **kw):
    k = _p(k)
    p = (k[0] // 2, k[1] // 2) if p is None else _p(p)
    return conv(net, layer, n, c, c, hw, k, s, p, groups=c, bias=bias, **kw)


def pool(net, layer, n, c, hw, k, s=None, p=0, d=1, ceil_mode=False, **kw):
    h, w = _p(hw)
    return Case("max_pool2d", net, layer, n, c, h, w, _p(k), _p(k if s is None else s), _p(p),
                _p(d), out_channels=c, ceil_mode=ceil_mode, **kw)


# --------------------------------------------------------------------------------------------
# networks (224x224 ImageNet inputs; layer names as in torchvision / timm)
# --------------------------------------------------------------------------------------------


def resnet18(n):
    r = "resnet18"
    return [
        conv(r, "conv1 (stem)", n, 3, 64, 224, 7, 2, 3),
        pool(r, "maxpool", n, 64, 112, 3, 2, 1),
        conv(r, "layer1.0.conv1", n, 64, 64, 56, 3, 1, 1),
        conv(r, "layer2.0.conv1", n, 64, 128, 56, 3, 2, 1),
        conv(r, "layer2.0.downsample", n, 64, 128, 56, 1, 2, 0),
        conv(r, "layer2.0.conv2", n, 128, 128, 28, 3, 1, 1),
        conv(r, "layer3.0.conv2", n, 256, 256, 14, 3, 1, 1),
        conv(r, "layer4.0.conv2", n, 512, 512, 7, 3, 1, 1),
    ]


def resnet50(n):
    r = "resnet50"
    return [
        conv(r, "conv1 (stem)", n, 3, 64, 224, 7, 2, 3),
        pool(r, "maxpool", n, 64, 112, 3, 2, 1),
        conv(r, "layer1.0.conv1", n, 64, 64, 56, 1),
        conv(r, "layer1.0.conv2", n, 64, 64, 56, 3, 1, 1),
        conv(r, "layer1.0.conv3", n, 64, 256, 56, 1),
        conv(r, "layer1.1.conv1", n, 256, 64, 56, 1),
        conv(r, "layer2.0.conv2", n, 128, 128, 56, 3, 2, 1),
        conv(r, "layer2.0.downsample", n, 256, 512, 56, 1, 2, 0),
        conv(r, "layer3.1.conv2", n, 256, 256, 14, 3, 1, 1),
        conv(r, "layer3.1.conv1", n, 1024, 256, 14, 1),
        conv(r, "layer4.0.conv3", n, 512, 2048, 7, 1),
    ]


def mobilenet_v2(n):
    m = "mobilenet_v2"
    return [
        dw(m, "features.1.conv.0", n, 32, 112, 3, 1),
        dw(m, "features.2.conv.1", n, 96, 112, 3, 2),
        dw(m, "features.3.conv.1", n, 144, 56, 3, 1),
        dw(m, "features.4.conv.1", n, 144, 56, 3, 2),
        dw(m, "features.14.conv.1", n, 576, 14, 3, 2),
        dw(m, "features.17.conv.1", n, 960, 7, 3, 1),
        conv(m, "features.3.conv.2 (project)", n, 144, 24, 56, 1),
    ]


def convnext(n):
    c = "convnext_tiny"
    return [
        conv(c, "stem.0 (4x4 patchify)", n, 3, 96, 224, 4, 4, 0, bias=True),
        dw(c, "stages.0.blocks.0.dwconv", n, 96, 56, 7, bias=True),
        dw(c, "stages.1.blocks.0.dwconv", n, 192, 28, 7, bias=True),
        dw(c, "stages.2.blocks.0.dwconv", n, 384, 14, 7, bias=True),
        dw(c, "stages.3.blocks.0.dwconv", n, 768, 7, 7, bias=True),
    ]


def replknet(n):
    r = "replknet31b"
    return [
        dw(r, "stages.0.lk (31x31)", n, 128, 56, 31),
        dw(r, "stages.1.lk (29x29)", n, 256, 28, 29),
        dw(r, "stages.2.lk (27x27)", n, 512, 14, 27),
        dw(r, "stages.3.lk (13x13)", n, 1024, 7, 13),
    ]


def vgg16(n):
    v = "vgg16"
    return [
        conv(v, "features.0", n, 3, 64, 224, 3, 1, 1, bias=True),
        conv(v, "features.2", n, 64, 64, 224, 3, 1, 1, bias=True),
        pool(v, "features.4 (pool1)", n, 64, 224, 2, 2),
        pool(v, "features.9 (pool2)", n, 128, 112, 2, 2),
        pool(v, "features.16 (pool3)", n, 256, 56, 2, 2),
        conv(v, "features.19", n, 512, 512, 28, 3, 1, 1, bias=True),
        pool(v, "features.23 (pool4)", n, 512, 28, 2, 2),
        pool(v, "features.30 (pool5)", n, 512, 14, 2, 2),
    ]


NETWORK_FNS: Dict[str, Callable[[int], List[Case]]] = {
    "resnet18": resnet18, "resnet50": resnet50, "mobilenet_v2": mobilenet_v2,
    "convnext": convnext, "replknet": replknet, "vgg16": vgg16,
}


def cpu_targets():
    """The shapes of the CPU speed targets (issue 6): N=8, both layouts where they are named."""
    t = "target"
    out = []
    for cl in (False, True):
        out.append(pool(t, "resnet maxpool", 8, 64, 112, 3, 2, 1, channels_last=cl))
    for k in (3, 7):
        for cl in (False, True):
            out.append(dw(t, f"depthwise {k}x{k}", 8, 144, 56, k, channels_last=cl))
    out += [
        conv(t, "resnet 3x3 64", 8, 64, 64, 56, 3, 1, 1),
        conv(t, "resnet 3x3 256", 8, 256, 256, 14, 3, 1, 1),
        conv(t, "resnet 1x1 256>64", 8, 256, 64, 56, 1),
    ]
    return out


def tiny():
    """Small shapes for the test suite: every op, strides, padding, bias, a ceil_mode pool."""
    t = "tiny"
    return [
        conv(t, "conv3x3", 2, 8, 8, 10, 3, 1, 1, bias=True),
        conv(t, "conv1x1s2", 2, 8, 16, 9, 1, 2, 0),
        dw(t, "dw3x3", 2, 8, 12, 3, 1),
        dw(t, "dw5x5s2", 2, 4, 11, 5, 2),
        pool(t, "pool3x3s2p1", 2, 4, 12, 3, 2, 1),
        pool(t, "pool2x2ceil", 2, 3, 9, 2, 2, ceil_mode=True),
    ]


def _quick(device_type):
    """The default suite: one or two layers per kind. On a CPU (2 cores, ~3 minutes for both
    directions) these are the NCHW CPU targets' shapes plus a stem, a strided depthwise, a
    large kernel (RepLKNet's 13x13; the 31x31 layers, whose backward takes torch seconds on a
    CPU, are in 'replknet' and 'full') and a VGG pool, at batch 8."""
    if device_type == "cpu":
        n = 8
        return [
            conv("resnet50", "layer1.0.conv2", n, 64, 64, 56, 3, 1, 1),
            conv("resnet50", "layer3.1.conv2", n, 256, 256, 14, 3, 1, 1),
            conv("resnet50", "layer1.1.conv1", n, 256, 64, 56, 1),
            conv("resnet18", "conv1 (stem)", n, 3, 64, 224, 7, 2, 3),
            dw("mobilenet_v2", "features.3.conv.1 (C144)", n, 144, 56, 3, 1),
            dw("mobilenet_v2", "features.4.conv.1", n, 144, 56, 3, 2),
            dw("convnext-like", "dwconv 7x7 (C144)", n, 144, 56, 7),
            dw("replknet31b", "stages.3.lk (13x13)", n, 1024, 7, 13),
            pool("resnet18", "maxpool", n, 64, 112, 3, 2, 1),
            pool("vgg16", "features.9 (pool2)", n, 128, 112, 2, 2),
        ]
    n = 128
    return [
        conv("resnet50", "layer1.0.conv2", n, 64, 64, 56, 3, 1, 1),
        conv("resnet50", "layer3.1.conv2", n, 256, 256, 14, 3, 1, 1),
        conv("resnet50", "layer1.1.conv1", n, 256, 64, 56, 1),
        conv("resnet18", "conv1 (stem)", n, 3, 64, 224, 7, 2, 3),
        dw("mobilenet_v2", "features.3.conv.1", n, 144, 56, 3, 1),
        dw("mobilenet_v2", "features.4.conv.1", n, 144, 56, 3, 2),
        dw("convnext_tiny", "stages.0.blocks.0.dwconv", n, 96, 56, 7, bias=True),
        dw("replknet31b", "stages.0.lk (31x31)", 64, 128, 56, 31),
        dw("replknet31b", "stages.3.lk (13x13)", n, 1024, 7, 13),
        pool("resnet18", "maxpool", n, 64, 112, 3, 2, 1),
        pool("vgg16", "features.9 (pool2)", n, 128, 112, 2, 2),
    ]


def default_batch(device_type: str) -> int:
    return 8 if device_type == "cpu" else 128


def _dedupe(cases):
    """One case per shape; a shape several networks share keeps the first name."""
    seen, out = set(), []
    for c in cases:
        k = c.key()
        if k not in seen:
            seen.add(k)
            out.append(c)
    return out


def suite(name: str, device_type: str = "cpu", batch: Optional[int] = None) -> List[Case]:
    """The cases of suite `name` for a device type ('cpu' or 'cuda'). `batch` overrides the
    device's batch size for the network suites (not for 'cpu-targets', 'tiny', 'quick')."""
    n = batch or default_batch(device_type)
    if name == "tiny":
        return tiny()
    if name == "quick":
        return _quick(device_type)
    if name == "cpu-targets":
        return cpu_targets()
    if name in NETWORK_FNS:
        cases = NETWORK_FNS[name](n)
        if name == "replknet" and device_type != "cpu" and batch is None:
            cases = [dataclasses.replace(c, n=64) for c in cases]
        return cases
    if name == "full":
        cases = []
        for net in NETWORKS:
            cases += suite(net, device_type, batch)
        if device_type == "cpu":
            cases += cpu_targets()
        return _dedupe(cases)
    raise ValueError(
        f"unknown suite {name!r}; expected one of {', '.join(SUITES)}")


def parse_ops(text_or_list) -> Tuple[str, ...]:
    """'conv2d,max_pool2d' or ['conv2d', 'pool'] -> canonical op names, in OPS order."""
    items = text_or_list if isinstance(text_or_list, (list, tuple)) else [text_or_list]
    names = [t.strip() for item in items for t in str(item).split(",") if t.strip()]
    if not names:
        raise ValueError("--ops: expected at least one op")
    ops = set()
    for t in names:
        if t == "all":
            ops.update(OPS)
        elif t.lower() in OP_ALIASES:
            ops.add(OP_ALIASES[t.lower()])
        else:
            raise ValueError(
                f"--ops: unknown op {t!r}; expected a comma-separated list of "
                f"{', '.join(OPS)} (or all)")
    return tuple(o for o in OPS if o in ops)


# --------------------------------------------------------------------------------------------
# inputs and implementations
# --------------------------------------------------------------------------------------------


def make_inputs(case: Case, device, dtype, channels_last: bool, requires_grad=False, seed=0):
    """Fresh random inputs (never zeros): input ~ N(0, 1), weight scaled by 1/sqrt(fan_in) so
    outputs stay O(1) in every dtype, bias ~ N(0, 0.1). Returns (x,) or (x, w, b)."""
    import torch

    device = torch.device(device)
    # generated on the device itself: GPU inputs of a few GB would take seconds on the CPU
    g = torch.Generator(device=device).manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def t(shape, scale=1.0, fmt=torch.contiguous_format):
        v = torch.randn(shape, generator=g, dtype=torch.float32, device=device) * scale
        v = v.to(dtype).contiguous(memory_format=fmt)
        return v.requires_grad_(requires_grad)

    x = t(case.input_shape, fmt=fmt)
    if case.op == "max_pool2d":
        return (x,)
    fan_in = (case.c // case.groups) * case.kernel[0] * case.kernel[1]
    w = t(case.weight_shape, 1.0 / math.sqrt(fan_in), fmt=fmt)
    b = t((case.out_channels,), 0.1) if case.bias else None
    return (x, w, b)


def torch_impl(case: Case) -> Callable:
    """torch's own op for the case: F.conv2d or F.max_pool2d, called like a network does."""
    import torch.nn.functional as F

    if case.op == "max_pool2d":
        k, s, p, d, cm = case.kernel, case.stride, case.padding, case.dilation, case.ceil_mode
        return lambda x: F.max_pool2d(x, k, s, p, d, cm)
    s, p, d, g = case.stride, case.padding, case.dilation, case.groups
    return lambda x, w, b: F.conv2d(x, w, b, s, p, d, g)


def fastconv_impls(case: Case) -> Dict[str, Callable]:
    """fastconv's implementations of the case, by name: every algo that applies
    (conv2d: im2col, direct, auto; depthwise shapes: the depthwise op, and conv2d's im2col,
    direct and auto (which picks the depthwise kernels); max_pool2d: the op)."""
    import fastconv

    if case.op == "max_pool2d":
        k, s, p, d, cm = case.kernel, case.stride, case.padding, case.dilation, case.ceil_mode
        return {"max_pool2d": lambda x: fastconv.max_pool2d(x, k, s, p, d, cm)}
    s, p, d, g = case.stride, case.padding, case.dilation, case.groups
    impls = {}
    if case.op == "depthwise_conv2d":
        impls["depthwise"] = lambda x, w, b: fastconv.depthwise_conv2d(x, w, b, s, p, d)
    for algo in ("im2col", "direct", "auto"):
        impls[algo] = (lambda a: lambda x, w, b: fastconv.conv2d(x, w, b, s, p, d, g, algo=a))(algo)
    return impls
