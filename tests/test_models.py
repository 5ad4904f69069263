"""fastconv.models: the tutorial architectures build from plain torch.nn layers and give the
expected shapes on small inputs. (Numerics after conversion: test_convert.py.)"""

import pytest
import torch
from torch import nn

from fastconv import models
from fastconv.models import (
    MODELS,
    VGG,
    BasicBlock,
    Bottleneck,
    DepthwiseSeparableConv,
    MBConv,
    MobileNet,
    SimpleCNN,
    SqueezeExcitation,
    resnet18,
    resnet34,
    resnet50,
    resnet_bottleneck,
)

SIZES = [8, 32]
CHANNELS = [1, 3]

# narrow variants of every architecture (the canonical widths are checked separately)
SMALL = {
    "vgg": lambda c, k: VGG(c, k, widths=(8, 16, 16, 32), hidden=32),
    "resnet18": lambda c, k: resnet18(c, k, base_width=8),
    "resnet18_imagenet_stem": lambda c, k: resnet18(c, k, base_width=8, small_input=False),
    "resnet_bottleneck": lambda c, k: resnet_bottleneck(c, k, layers=(1, 1, 1, 1), base_width=8),
    "resnet_bottleneck_imagenet_stem": lambda c, k: resnet_bottleneck(
        c, k, layers=(1, 2, 1, 1), base_width=8, small_input=False),
    "mobilenet": lambda c, k: MobileNet(c, k, width_mult=0.5),
    "mobilenet_imagenet_stem": lambda c, k: MobileNet(c, k, width_mult=0.5, small_input=False),
}


def _only_plain_torch_layers(model):
    for m in model.modules():
        assert type(m).__module__.startswith(("torch.nn", "fastconv.models")), type(m)
        assert "fastconv.nn" not in type(m).__module__


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("in_channels", CHANNELS)
def test_simplecnn_shapes(size, in_channels):
    model = SimpleCNN(in_channels, 10, input_size=size)
    _only_plain_torch_layers(model)
    assert model(torch.randn(2, in_channels, size, size)).shape == (2, 10)
    # ceil_mode pooling: 32 -> 16 -> 8 -> 4, 8 -> 4 -> 2 -> 1
    assert model.features(torch.randn(1, in_channels, size, size)).shape[-1] == size // 8
    assert all(m.ceil_mode for m in model.modules() if isinstance(m, nn.MaxPool2d))


def test_simplecnn_odd_and_rectangular_sizes():
    model = SimpleCNN(3, 4, input_size=(28, 9), widths=(4, 8, 8), hidden=16)
    x = torch.randn(2, 3, 28, 9)
    assert model.features(x).shape == (2, 8, 4, 2)  # ceil(28/8), ceil(9/8)
    assert model(x).shape == (2, 4)
    assert model.classifier[1].in_features == 8 * 4 * 2
    with pytest.raises(RuntimeError):  # the Linear is sized for input_size, as in tutorials
        model(torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("in_channels", CHANNELS)
def test_small_variants_shapes(name, size, in_channels):
    torch.manual_seed(0)
    model = SMALL[name](in_channels, 7)
    _only_plain_torch_layers(model)
    model.train()  # BatchNorm in training mode needs > 1 value per channel: batch 2 does it
    assert model(torch.randn(2, in_channels, size, size)).shape == (2, 7)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, in_channels, size, size)).shape == (1, 7)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("in_channels", CHANNELS)
def test_demo_registry(name, in_channels):
    model = MODELS[name](in_channels, 10)
    _only_plain_torch_layers(model)
    assert model(torch.randn(2, in_channels, 32, 32)).shape == (2, 10)
    if name != "simplecnn":  # SimpleCNN's Linear is sized for 32x32
        assert model(torch.randn(2, in_channels, 8, 8)).shape == (2, 10)
    # small enough to train in seconds per epoch on a couple of CPU cores
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_registry_names():
    assert set(MODELS) == {"simplecnn", "vgg", "resnet18", "resnet_bottleneck", "mobilenet"}


def test_canonical_widths():
    r18 = resnet18(3, 1000)
    assert sum(p.numel() for p in r18.parameters()) == 11_689_512 - 9_408 + 1_728  # 3x3 stem
    r18_imagenet = resnet18(3, 1000, small_input=False)
    assert sum(p.numel() for p in r18_imagenet.parameters()) == 11_689_512  # torchvision's count
    assert r18_imagenet.conv1.kernel_size == (7, 7) and r18_imagenet.conv1.stride == (2, 2)
    assert isinstance(r18_imagenet.maxpool, nn.MaxPool2d)
    r50 = resnet50(3, 1000, small_input=False)
    assert sum(p.numel() for p in r50.parameters()) == 25_557_032  # torchvision's count
    assert [len(getattr(r50, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert [len(getattr(resnet34(), f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    with torch.no_grad():
        assert r50.eval()(torch.randn(1, 3, 8, 8)).shape == (1, 1000)
    vgg = VGG()
    assert [m.out_channels for m in vgg.modules() if isinstance(m, nn.Conv2d)] == \
        [64, 64, 128, 128, 256, 256, 512, 512]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in vgg.modules()) == 8


def test_resnet_blocks():
    block = BasicBlock(8, 8)
    assert block.downsample is None
    x = torch.randn(2, 8, 6, 6)
    assert block(x).shape == x.shape
    r = resnet18(3, 10, base_width=8)
    assert r.layer1[0].downsample is None
    down = r.layer2[0].downsample
    assert isinstance(down[0], nn.Conv2d) and down[0].stride == (2, 2) and down[0].kernel_size == (1, 1)
    bott = Bottleneck(16, 4)
    assert bott.conv3.out_channels == 16 and bott(torch.randn(2, 16, 5, 5)).shape == (2, 16, 5, 5)
    rb = resnet_bottleneck(3, 10, layers=(1, 1, 1, 1), base_width=8)
    assert rb.fc.in_features == 8 * 8 * Bottleneck.expansion
    assert rb.layer1[0].downsample is not None  # 8 -> 32 channels needs a projection
    z = resnet18(3, 10, base_width=8, zero_init_residual=True)
    assert all(torch.all(b.bn2.weight == 0) for b in z.modules() if isinstance(b, BasicBlock))
    with pytest.raises(ValueError, match="4 stage depths"):
        models.ResNet(BasicBlock, [2, 2, 2])


def test_depthwise_separable_block():
    block = DepthwiseSeparableConv(6, 10, stride=2, kernel_size=5)
    dw, pw = block.depthwise, block.pointwise
    assert dw.groups == 6 and dw.weight.shape == (6, 1, 5, 5) and dw.padding == (2, 2)
    assert pw.kernel_size == (1, 1) and pw.out_channels == 10
    assert block(torch.randn(2, 6, 9, 9)).shape == (2, 10, 5, 5)


def test_squeeze_excitation():
    se = SqueezeExcitation(8, 2)
    x = torch.randn(2, 8, 5, 5)
    y = se(x)
    assert y.shape == x.shape
    scale = y / x
    # one sigmoid factor per (sample, channel), in (0, 1)
    assert torch.allclose(scale, scale[:, :, :1, :1].expand_as(scale), atol=1e-5)
    assert torch.all((scale > 0) & (scale < 1))


def test_mbconv_residual_and_layout():
    same = MBConv(8, 8, expand_ratio=4, kernel_size=3, se_ratio=0.25)
    assert same.use_residual
    convs = [m for m in same.block if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (1, 1)]
    assert convs[1].groups == 32 and convs[1].weight.shape[1] == 1
    assert any(isinstance(m, SqueezeExcitation) for m in same.block)
    x = torch.randn(2, 8, 6, 6)
    same.eval()
    with torch.no_grad():
        # the residual really is added: zeroing the projection leaves the input
        same.block[-1].weight.zero_()
        same.block[-1].bias.zero_()
        assert torch.equal(same(x), x)
    down = MBConv(8, 16, expand_ratio=1, stride=2, se_ratio=0)
    assert not down.use_residual
    assert not any(isinstance(m, SqueezeExcitation) for m in down.block)
    assert sum(isinstance(m, nn.Conv2d) for m in down.block) == 2  # no expand conv
    assert down(torch.randn(2, 8, 7, 7)).shape == (2, 16, 4, 4)


def test_mobilenet_width_mult():
    full, half = MobileNet(3, 10), MobileNet(3, 10, width_mult=0.5)
    def widths(model):  # the stage widths; the SE squeeze widths are not rounded
        se = {id(c) for m in model.modules() if isinstance(m, SqueezeExcitation)
              for c in m.modules()}
        return [c.out_channels for c in model.modules()
                if isinstance(c, nn.Conv2d) and id(c) not in se]

    assert all(w % 8 == 0 for w in widths(half))
    assert sum(widths(half)) < sum(widths(full))
    assert any(isinstance(m, DepthwiseSeparableConv) for m in full.modules())
    assert sum(isinstance(m, MBConv) for m in full.modules()) == 6
