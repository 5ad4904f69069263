"""The teaching material's CNNs, written with plain torch.nn layers.

Every model here is built the way a tutorial writes it — nn.Conv2d, nn.BatchNorm2d,
nn.ReLU, nn.MaxPool2d, nn.Linear, nn.AdaptiveAvgPool2d — and knows nothing about fastconv.
`fastconv.convert(model)` is the way in: it swaps the convolutions and max-pools for
fastconv's layers and leaves everything else alone.

All constructors take `in_channels` and `num_classes` and work on small images (8x8 up to
32x32 and beyond). The defaults are the canonical widths; `MODELS` holds narrow variants,
one factory `f(in_channels, num_classes)` per name, sized to train on 8x8 digits upsampled
to 32x32 on a couple of CPU cores in seconds per epoch.

    from fastconv.models import resnet18
    import fastconv
    model = fastconv.convert(resnet18(in_channels=1, num_classes=10, base_width=16))
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Type, Union

import torch
from torch import nn

__all__ = [
    "SimpleCNN",
    "VGG",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet_bottleneck",
    "DepthwiseSeparableConv",
    "SqueezeExcitation",
    "MBConv",
    "MobileNet",
    "MODELS",
]


def _pooled_size(size: int, times: int) -> int:
    """Spatial size after `times` MaxPool2d(2, ceil_mode=True): ceil(size / 2) each time."""
    for _ in range(times):
        size = math.ceil(size / 2)
    return size


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round a scaled channel count to a multiple of `divisor`, never more than 10% below
    the request (MobileNet's rule, so width multipliers keep SIMD-friendly widths)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


# --------------------------------------------------------------------------------------------
# SimpleCNN: the first CNN of every tutorial
# --------------------------------------------------------------------------------------------


class SimpleCNN(nn.Module):
    """3 x [Conv2d 3x3 (padding 1) + ReLU + MaxPool2d(2)], then Linear + ReLU + Linear.

    The pools use ceil_mode=True so that odd sizes round up instead of dropping the last
    row/column: 32 -> 16 -> 8 -> 4, 28 -> 14 -> 7 -> 4, 8 -> 4 -> 2 -> 1. `input_size`
    (an int or an (H, W) pair) sizes the first Linear layer, which therefore expects exactly
    that input size — as in the tutorials, where the flatten size is written by hand.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, input_size=32,
                 widths: Sequence[int] = (32, 64, 128), hidden: int = 128):
        super().__init__()
        if len(widths) != 3:
            raise ValueError(f"SimpleCNN: expected 3 widths, but got {list(widths)}")
        h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        layers = []
        c = in_channels
        for width in widths:
            layers += [
                nn.Conv2d(c, width, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            c = width
        self.features = nn.Sequential(*layers)
        self.input_size = (h, w)
        flat = c * _pooled_size(h, 3) * _pooled_size(w, 3)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# --------------------------------------------------------------------------------------------
# VGG: stacks of 3x3 conv + BatchNorm + ReLU, halved by max-pooling
# --------------------------------------------------------------------------------------------


class VGG(nn.Module):
    """VGG-style network: per width, `convs_per_block` x [Conv2d 3x3 + BatchNorm2d + ReLU]
    then MaxPool2d(2, ceil_mode=True); then AdaptiveAvgPool2d(1) and a two-layer classifier.

    The global average pool (instead of VGG's fixed 7x7 flatten) makes the network work for
    any input size that survives the pooling; ceil_mode keeps tiny inputs alive
    (8 -> 4 -> 2 -> 1 -> 1 with four blocks).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10,
                 widths: Sequence[int] = (64, 128, 256, 512), convs_per_block: int = 2,
                 hidden: int = 512, dropout: float = 0.5, batch_norm: bool = True):
        super().__init__()
        layers = []
        c = in_channels
        for width in widths:
            for _ in range(convs_per_block):
                # bias is redundant right before BatchNorm (its shift absorbs it)
                layers.append(nn.Conv2d(c, width, kernel_size=3, padding=1, bias=not batch_norm))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(width))
                layers.append(nn.ReLU(inplace=True))
                c = width
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


# --------------------------------------------------------------------------------------------
# ResNet: BasicBlock (ResNet-18/34) and Bottleneck (ResNet-50) residual blocks
# --------------------------------------------------------------------------------------------


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1,
                     groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm; identity shortcut, or `downsample` (1x1 conv + BN) when
    the stride or the width changes."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (stride here, as in torchvision's "ResNet v1.5") -> 1x1 expand by
    `expansion` = 4, each with BatchNorm; shortcut as in BasicBlock."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1):
        super().__init__()
        self.conv1 = conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, groups)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with four stages of `layers[i]` blocks; stage widths base_width * (1, 2, 4, 8).

    small_input=True (the default, for 8x8 .. 64x64 images, as in the CIFAR ResNets): the
    stem is one 3x3 stride-1 conv + BN + ReLU, and only stages 2-4 downsample
    (32 -> 32, 16, 8, 4). small_input=False: ImageNet's 7x7 stride-2 conv + BN + ReLU +
    3x3 stride-2 max-pool stem (224 -> 56 before the first stage).
    base_width=64 is the canonical width; smaller values make narrow, fast variants.
    zero_init_residual zeroes each block's last BN scale so blocks start as identities.
    """

    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: Sequence[int],
                 in_channels: int = 3, num_classes: int = 1000, small_input: bool = True,
                 base_width: int = 64, zero_init_residual: bool = False):
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"ResNet: expected 4 stage depths, but got {list(layers)}")
        self.in_planes = base_width
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, base_width, kernel_size=3, stride=1, padding=1,
                                   bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, base_width, kernel_size=7, stride=2, padding=3,
                                   bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = (nn.Identity() if small_input
                        else nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.layer1 = self._make_layer(block, base_width, layers[0], stride=1)
        self.layer2 = self._make_layer(block, base_width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, base_width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, base_width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(base_width * 8 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_planes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.in_planes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.in_planes, planes, stride, downsample)]
        self.in_planes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.in_planes, planes))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(in_channels: int = 3, num_classes: int = 1000, **kw) -> ResNet:
    """ResNet-18: BasicBlock x [2, 2, 2, 2]. kw: small_input, base_width, zero_init_residual."""
    return ResNet(BasicBlock, [2, 2, 2, 2], in_channels, num_classes, **kw)


def resnet34(in_channels: int = 3, num_classes: int = 1000, **kw) -> ResNet:
    """ResNet-34: BasicBlock x [3, 4, 6, 3]."""
    return ResNet(BasicBlock, [3, 4, 6, 3], in_channels, num_classes, **kw)


def resnet_bottleneck(in_channels: int = 3, num_classes: int = 1000,
                      layers: Sequence[int] = (3, 4, 6, 3), **kw) -> ResNet:
    """Bottleneck ResNet; the default `layers` is ResNet-50's, (1, 1, 1, 1) a small one."""
    return ResNet(Bottleneck, list(layers), in_channels, num_classes, **kw)


def resnet50(in_channels: int = 3, num_classes: int = 1000, **kw) -> ResNet:
    """ResNet-50: Bottleneck x [3, 4, 6, 3]."""
    return resnet_bottleneck(in_channels, num_classes, (3, 4, 6, 3), **kw)


# --------------------------------------------------------------------------------------------
# MobileNet family: depthwise separable convs, inverted residuals, squeeze-and-excitation
# --------------------------------------------------------------------------------------------


class DepthwiseSeparableConv(nn.Module):
    """MobileNet-v1 block: depthwise kxk conv (groups = channels) + BN + ReLU, then a
    pointwise 1x1 conv + BN + ReLU that mixes the channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 kernel_size: int = 3):
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, kernel_size, stride=stride,
                                   padding=kernel_size // 2, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.pointwise = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.depthwise(x)))
        return self.relu2(self.bn2(self.pointwise(x)))


class SqueezeExcitation(nn.Module):
    """Channel attention: global average pool -> 1x1 conv (squeeze) -> ReLU -> 1x1 conv
    (excite) -> sigmoid, which scales the input per channel. The FC layers are 1x1 convs, as in
    torchvision, so the block stays in (N, C, H, W) form."""

    def __init__(self, channels: int, squeeze_channels: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, kernel_size=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, kernel_size=1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.sigmoid(self.fc2(self.relu(self.fc1(self.avgpool(x)))))
        return x * scale


class MBConv(nn.Module):
    """Inverted residual (MobileNet-v2 / EfficientNet): 1x1 expand (skipped when
    expand_ratio == 1) -> depthwise kxk -> squeeze-and-excitation (when se_ratio > 0) ->
    1x1 project with no activation; the input is added back when stride == 1 and the
    channel count is unchanged."""

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: int = 4,
                 kernel_size: int = 3, stride: int = 1, se_ratio: float = 0.25,
                 activation: Callable[..., nn.Module] = nn.SiLU):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        layers = []
        if expand_ratio != 1:
            layers += [
                nn.Conv2d(in_channels, hidden, kernel_size=1, bias=False),
                nn.BatchNorm2d(hidden),
                activation(inplace=True),
            ]
        layers += [
            nn.Conv2d(hidden, hidden, kernel_size, stride=stride, padding=kernel_size // 2,
                      groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            activation(inplace=True),
        ]
        if se_ratio > 0:
            # squeeze relative to the block's input width, as EfficientNet does
            layers.append(SqueezeExcitation(hidden, max(1, int(in_channels * se_ratio))))
        layers += [
            nn.Conv2d(hidden, out_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_residual else out


class MobileNet(nn.Module):
    """A small MobileNet-style network: conv stem, one depthwise separable block, then MBConv
    stages (expand 4, SE on the later ones), a 1x1 head conv, global pool and a Linear.

    Stage layout (channels at width_mult=1, stride): stem 32; DS 16 s1; MBConv 24 s2 x2;
    MBConv 40 k5 s2 +SE x2; MBConv 80 s2 +SE x2; head 320. small_input=True uses a stride-1
    stem (32 -> 32, 16, 8, 4); False a stride-2 stem as in ImageNet MobileNets.
    width_mult scales every width (rounded to a multiple of 8).
    """

    # (block, out_channels, expand_ratio, kernel_size, stride, repeats, se_ratio)
    CONFIG = (
        ("ds", 16, 1, 3, 1, 1, 0.0),
        ("mb", 24, 4, 3, 2, 2, 0.0),
        ("mb", 40, 4, 5, 2, 2, 0.25),
        ("mb", 80, 4, 3, 2, 2, 0.25),
    )

    def __init__(self, in_channels: int = 3, num_classes: int = 1000, width_mult: float = 1.0,
                 small_input: bool = True, head_channels: int = 320, dropout: float = 0.2):
        super().__init__()
        stem = _make_divisible(32 * width_mult)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem, kernel_size=3, stride=1 if small_input else 2,
                      padding=1, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
        )
        blocks = []
        c = stem
        for kind, out, expand, k, stride, repeats, se in self.CONFIG:
            out = _make_divisible(out * width_mult)
            for i in range(repeats):
                s = stride if i == 0 else 1
                if kind == "ds":
                    blocks.append(DepthwiseSeparableConv(c, out, stride=s, kernel_size=k))
                else:
                    blocks.append(MBConv(c, out, expand_ratio=expand, kernel_size=k, stride=s,
                                         se_ratio=se))
                c = out
        self.blocks = nn.Sequential(*blocks)
        head = _make_divisible(head_channels * width_mult)
        self.head = nn.Sequential(
            nn.Conv2d(c, head, kernel_size=1, bias=False),
            nn.BatchNorm2d(head),
            nn.ReLU(inplace=True),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout),
                                        nn.Linear(head, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.avgpool(x))


# --------------------------------------------------------------------------------------------
# the demo's registry: narrow variants, f(in_channels, num_classes)
# --------------------------------------------------------------------------------------------


def _simplecnn(in_channels: int, num_classes: int) -> SimpleCNN:
    return SimpleCNN(in_channels, num_classes, input_size=32, widths=(16, 32, 64), hidden=128)


def _vgg(in_channels: int, num_classes: int) -> VGG:
    return VGG(in_channels, num_classes, widths=(16, 32, 64), hidden=128, dropout=0.2)


def _resnet18(in_channels: int, num_classes: int) -> ResNet:
    return resnet18(in_channels, num_classes, base_width=16, small_input=False)


def _resnet_bottleneck(in_channels: int, num_classes: int) -> ResNet:
    return resnet_bottleneck(in_channels, num_classes, layers=(1, 1, 1, 1), base_width=16,
                             small_input=False)


def _mobilenet(in_channels: int, num_classes: int) -> MobileNet:
    return MobileNet(in_channels, num_classes, width_mult=0.5, head_channels=256,
                     small_input=False)


# The demo's models, for 32x32 input (SimpleCNN's Linear is sized for 32x32; the others take
# any size, 8x8 included). Narrow on purpose, and the ResNets / MobileNet use the strided
# ImageNet stem: 8x8 digits upsampled to 32x32 carry no detail that a 4x downsampled stem
# loses, and it makes an epoch of the 1797 digits cost about 1-2 s with torch.nn layers on
# one CPU thread (the stride-1 stem costs 5-10x more).
MODELS: Dict[str, Callable[[int, int], nn.Module]] = {
    "simplecnn": _simplecnn,
    "vgg": _vgg,
    "resnet18": _resnet18,
    "resnet_bottleneck": _resnet_bottleneck,
    "mobilenet": _mobilenet,
}
