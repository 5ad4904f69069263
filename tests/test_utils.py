"""fastconv.utils: the size helpers against what the layers (torch's and fastconv's) really do."""

import random

import pytest
import torch
from torch import nn

import fastconv
from fastconv import utils
from fastconv.utils import conv2d_output_size, layer_shapes, pool2d_output_size, receptive_field


def _conv_layer(impl, **kw):
    cls = fastconv.nn.Conv2d if impl == "fastconv" else nn.Conv2d
    return cls(2, 3, **kw)


def _pool_layer(impl, **kw):
    if impl == "avg":
        kw.pop("dilation", None)
        return nn.AvgPool2d(**kw)
    cls = fastconv.nn.MaxPool2d if impl == "fastconv" else nn.MaxPool2d
    return cls(**kw)


def _real_size(layer, h, w):
    """The layer's output (H, W), or None when the layer refuses the input."""
    try:
        with torch.no_grad():
            return tuple(layer(torch.zeros(1, 2, h, w)).shape[2:])
    except (RuntimeError, ValueError):
        return None


def _predicted(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except ValueError:
        return None


def _conv_configs(n=120, seed=1):
    rng = random.Random(seed)
    configs = [  # hand-picked edges: 1x1, stride > kernel, kernel == padded input, dilation
        dict(size=(1, 1), kernel_size=1),
        dict(size=(5, 7), kernel_size=1, stride=3),
        dict(size=(4, 4), kernel_size=5, stride=1, padding=1),   # 6 >= 5: one output
        dict(size=(3, 3), kernel_size=5),                        # too small: both refuse
        dict(size=(9, 6), kernel_size=(3, 2), stride=(2, 3), padding=(1, 0), dilation=(2, 1)),
        dict(size=(8, 8), kernel_size=3, stride=4, padding=0),
        dict(size=(7, 7), kernel_size=3, dilation=3),            # 7 = effective kernel
        dict(size=(6, 6), kernel_size=3, dilation=3),            # 7 > 6: refused
    ]
    for _ in range(n):
        k = (rng.randint(1, 5), rng.randint(1, 5))
        d = (rng.randint(1, 3), rng.randint(1, 3))
        configs.append(dict(
            size=(rng.randint(1, 20), rng.randint(1, 20)), kernel_size=k,
            stride=(rng.randint(1, 4), rng.randint(1, 4)),
            padding=(rng.randint(0, 3), rng.randint(0, 3)), dilation=d))
    return configs


@pytest.mark.parametrize("impl", ["torch", "fastconv"])
def test_conv2d_output_size_matches_layers(impl):
    checked = refused = 0
    for cfg in _conv_configs():
        cfg = dict(cfg)
        h, w = cfg.pop("size")
        real = _real_size(_conv_layer(impl, **cfg), h, w)
        pred = _predicted(conv2d_output_size, (h, w), **cfg)
        assert pred == real, f"{impl} conv {cfg} on {h}x{w}: predicted {pred}, layer gives {real}"
        checked += 1
        refused += real is None
    assert checked > 100 and 0 < refused < checked  # both outcomes were exercised


@pytest.mark.parametrize("impl", ["torch", "fastconv"])
@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("kernel_size,dilation", [(1, 1), (2, 1), (3, 1), (4, 2), ((3, 4), (2, 1))])
def test_conv2d_output_size_padding_strings(impl, padding, kernel_size, dilation):
    layer = _conv_layer(impl, kernel_size=kernel_size, padding=padding, dilation=dilation)
    for h, w in [(9, 9), (10, 13)]:
        real = _real_size(layer, h, w)
        assert conv2d_output_size((h, w), kernel_size, 1, padding, dilation) == real
    if padding == "same":
        assert conv2d_output_size(10, 3, padding="same") == 10


def test_conv2d_output_size_types_and_errors():
    assert conv2d_output_size(8, 3, 1, 1) == 8
    assert isinstance(conv2d_output_size(8, 3), int)
    assert conv2d_output_size((8, 9), 3, 2, 1) == (4, 5)
    assert conv2d_output_size(8, (3, 1)) == (6, 8)
    assert conv2d_output_size(32, 7, 2, 3) == 16
    with pytest.raises(ValueError, match="not supported for strided"):
        conv2d_output_size(8, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="larger than the padded input"):
        conv2d_output_size(2, 3)
    with pytest.raises(ValueError, match="expected padding to be an int, a pair, 'same'"):
        conv2d_output_size(8, 3, padding="full")
    with pytest.raises(ValueError, match="expected stride to be positive"):
        conv2d_output_size(8, 3, stride=0)
    with pytest.raises(ValueError, match="expected padding to be non-negative"):
        conv2d_output_size(8, 3, padding=-1)
    with pytest.raises(TypeError, match="expected kernel_size to be an int or a pair"):
        conv2d_output_size(8, 3.0)
    with pytest.raises(TypeError, match="expected size to be an int or a pair"):
        conv2d_output_size(True, 3)


def _pool_configs(n=150, seed=2):
    rng = random.Random(seed)
    configs = [
        # ceil_mode's extra window would start in the right padding only: torch drops it
        dict(size=(5, 5), kernel_size=2, stride=2, padding=1, ceil_mode=True),
        dict(size=(6, 6), kernel_size=3, stride=2, padding=1, ceil_mode=True),
        dict(size=(7, 7), kernel_size=2, stride=2, ceil_mode=True),
        dict(size=(7, 7), kernel_size=2, stride=2, ceil_mode=False),
        dict(size=(1, 1), kernel_size=1),
        dict(size=(2, 9), kernel_size=(2, 3), stride=(1, 4), padding=(1, 1), ceil_mode=True),
        dict(size=(3, 3), kernel_size=3, padding=2),             # padding > k // 2: refused
        dict(size=(2, 2), kernel_size=3, dilation=2),            # empty output: refused
    ]
    for _ in range(n):
        k = (rng.randint(1, 4), rng.randint(1, 4))
        configs.append(dict(
            size=(rng.randint(1, 17), rng.randint(1, 17)), kernel_size=k,
            stride=rng.choice([None, (rng.randint(1, 4), rng.randint(1, 4))]),
            padding=(rng.randint(0, k[0] // 2), rng.randint(0, k[1] // 2)),
            dilation=(rng.randint(1, 3), rng.randint(1, 3)),
            ceil_mode=rng.random() < 0.5))
    return configs


@pytest.mark.parametrize("impl", ["torch", "fastconv", "avg"])
def test_pool2d_output_size_matches_layers(impl):
    checked = refused = ceil_differs = 0
    for cfg in _pool_configs():
        cfg = dict(cfg)
        h, w = cfg.pop("size")
        if impl == "avg":
            cfg["dilation"] = 1
        real = _real_size(_pool_layer(impl, **cfg), h, w)
        pred = _predicted(pool2d_output_size, (h, w), **cfg)
        assert pred == real, f"{impl} pool {cfg} on {h}x{w}: predicted {pred}, layer gives {real}"
        checked += 1
        refused += real is None
        if real is not None and cfg.get("ceil_mode"):
            floor = _predicted(pool2d_output_size, (h, w), **{**cfg, "ceil_mode": False})
            ceil_differs += floor != real
    assert checked > 100 and 0 < refused < checked and ceil_differs > 5


def test_pool2d_output_size_types_and_errors():
    assert pool2d_output_size(8, 2) == 4
    assert pool2d_output_size(7, 2) == 3
    assert pool2d_output_size(7, 2, ceil_mode=True) == 4
    assert pool2d_output_size(5, 2, 2, 1, ceil_mode=True) == 3  # not 4: last window dropped
    assert pool2d_output_size((8, 7), 2, ceil_mode=True) == (4, 4)
    assert pool2d_output_size(112, 3, 2, 1) == 56
    with pytest.raises(ValueError, match="pad should be at most half of kernel size"):
        pool2d_output_size(8, 3, padding=2)
    with pytest.raises(ValueError, match="the output would be empty"):
        pool2d_output_size(2, 3, dilation=2)


# --------------------------------------------------------------------------------------------
# receptive fields
# --------------------------------------------------------------------------------------------


def test_receptive_field_known_values():
    # three 3x3 convs: 7x7 (VGG's argument for stacking small kernels)
    rf = receptive_field([nn.Conv2d(1, 1, 3, padding=1) for _ in range(3)], 16)
    assert [r.receptive_field for r in rf] == [(3, 3), (5, 5), (7, 7)]
    assert all(r.jump == (1, 1) and r.start == (0.0, 0.0) and r.output_size == (16, 16)
               for r in rf)
    # conv 3x3 p1 -> pool 2 -> conv 3x3 p1 -> pool 2
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 4, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(16, 2), nn.Conv2d(1, 1, 3))  # nothing after Flatten counts
    rf = receptive_field(net, 8)
    assert [r.name for r in rf] == ["0", "2", "3", "4"]
    assert [r.kind for r in rf] == ["Conv2d", "MaxPool2d", "Conv2d", "MaxPool2d"]
    assert [r.receptive_field[0] for r in rf] == [3, 4, 8, 10]
    assert [r.jump[0] for r in rf] == [1, 2, 2, 4]
    assert [r.start[0] for r in rf] == [0.0, 0.5, 0.5, 1.5]
    assert [r.output_size for r in rf] == [(8, 8), (4, 4), (4, 4), (2, 2)]
    # ImageNet ResNet stem: 7x7/2 p3 then 3x3/2 p1 max-pool: field 11, jump 4
    stem = receptive_field([nn.Conv2d(3, 8, 7, 2, 3), nn.MaxPool2d(3, 2, 1)], 224)
    assert stem[-1].receptive_field == (11, 11) and stem[-1].jump == (4, 4)
    assert stem[-1].output_size == (56, 56) and stem[-1].start == (0.0, 0.0)


def _support_proxy(layers):
    """A copy of a conv / pool stack whose gradient support is exactly the receptive field:
    convs and pools become depthwise convs of ones (same kernel, stride, padding, dilation) on
    one channel, so every tap contributes a positive amount and nothing cancels."""
    proxy = []
    for m in layers:
        if isinstance(m, nn.Conv2d):
            k, s, p, d = m.kernel_size, m.stride, m.padding, m.dilation
        else:
            k = utils._pair("k", m.kernel_size, 1)
            s = utils._pair("s", m.stride, 1)
            p = utils._pair("p", m.padding, 0)
            d = utils._pair("d", getattr(m, "dilation", 1), 1)
        c = nn.Conv2d(1, 1, k, s, p, d, bias=False)
        nn.init.ones_(c.weight)
        proxy.append(c)
    return nn.Sequential(*proxy).double()


@pytest.mark.parametrize("seed", range(12))
def test_receptive_field_matches_gradient_support(seed):
    """Backprop one output unit in the middle of the map: the input pixels it depends on span
    exactly [start + i * jump - (rf - 1) / 2, start + i * jump + (rf - 1) / 2]."""
    rng = random.Random(seed)
    layers = []
    for _ in range(rng.randint(2, 5)):
        kind = rng.choice(["conv", "conv", "max", "avg"])
        k = (rng.randint(1, 4), rng.randint(1, 4))
        s = (rng.randint(1, 2), rng.randint(1, 2))
        if kind == "conv":
            d = (rng.randint(1, 2), rng.randint(1, 2))
            p = (rng.randint(0, 2), rng.randint(0, 2))
            layers.append(nn.Conv2d(1, 1, k, s, p, d))
        elif kind == "max":
            p = (rng.randint(0, k[0] // 2), rng.randint(0, k[1] // 2))
            layers.append(nn.MaxPool2d(k, s, p, dilation=rng.randint(1, 2), ceil_mode=True))
        else:
            p = (rng.randint(0, k[0] // 2), rng.randint(0, k[1] // 2))
            layers.append(nn.AvgPool2d(k, s, p))
    size = (301, 307)
    rf = receptive_field(layers, size)[-1]
    x = torch.zeros(1, 1, *size, dtype=torch.float64, requires_grad=True)
    out = _support_proxy(layers)(x)
    i, j = out.shape[2] // 2, out.shape[3] // 2
    out[0, 0, i, j].backward()
    rows = x.grad[0, 0].abs().sum(1).nonzero().flatten()
    cols = x.grad[0, 0].abs().sum(0).nonzero().flatten()
    for dim, idx, found in ((0, i, rows), (1, j, cols)):
        centre = rf.start[dim] + idx * rf.jump[dim]
        half = (rf.receptive_field[dim] - 1) / 2
        lo, hi = centre - half, centre + half
        assert 0 <= lo and hi < size[dim], "test setup: field must lie inside the input"
        assert (found.min().item(), found.max().item()) == (lo, hi), (layers, dim)


@pytest.mark.parametrize("impl", ["torch", "fastconv"])
def test_receptive_field_output_sizes_match_real_layers(impl):
    rng = random.Random(7)
    for _ in range(20):
        layers, c = [], 2
        for _ in range(rng.randint(1, 5)):
            k = rng.randint(1, 3)
            if rng.random() < 0.6:
                layers.append(nn.Conv2d(c, 3, k, rng.randint(1, 2), rng.randint(0, 1),
                                        rng.randint(1, 2)))
                c = 3
            else:
                layers.append(nn.MaxPool2d(k, rng.randint(1, 2), rng.randint(0, k // 2),
                                           ceil_mode=rng.random() < 0.5))
        model = nn.Sequential(*layers)
        if impl == "fastconv":
            model = fastconv.convert(model)
        size = (rng.randint(24, 40), rng.randint(24, 40))
        rf = receptive_field(model, size)
        real = {r.name: r.output_shape[2:] for r in layer_shapes(model, (1, 2) + size)}
        assert len(rf) == len(layers)
        for r in rf:
            assert r.output_size == real[r.name], (model, r)


class _Residual(nn.Module):
    def __init__(self, stride, branch_name="downsample"):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, stride, 1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, 1, 1)
        self.branch_name = branch_name
        setattr(self, branch_name, nn.Conv2d(4, 4, 1, stride))

    def forward(self, x):
        return self.conv2(self.relu(self.conv1(x))) + getattr(self, self.branch_name)(x)


def test_receptive_field_follows_main_path():
    block = _Residual(stride=2)
    rf = receptive_field(block, 16)
    assert [r.name for r in rf] == ["conv1", "conv2"]
    assert rf[-1].receptive_field == (7, 7) and rf[-1].jump == (2, 2)
    assert rf[-1].output_size == tuple(block(torch.zeros(1, 4, 16, 16)).shape[2:])
    # with no branch names the shortcut is walked as if it were in series: a different answer
    assert [r.name for r in receptive_field(block, 16, branches=())] == [
        "conv1", "conv2", "downsample"]
    assert [r.name for r in receptive_field(_Residual(1, "shortcut"), 16)] == ["conv1", "conv2"]


def test_receptive_field_models():
    from fastconv import models

    torch.manual_seed(0)
    for name, factory in models.MODELS.items():
        model = factory(1, 10)
        rf = receptive_field(model, 32)
        real = {r.name: r.output_shape[2:] for r in layer_shapes(model, (2, 1, 32, 32))}
        assert rf, name
        for r in rf:
            assert r.output_size == real[r.name], (name, r)
        # ends with global pooling (or SimpleCNN's 4x4 map): one unit sees the whole image
        assert rf[-1].receptive_field[0] >= 32 or name == "simplecnn", (name, rf[-1])
        # SE pools and shortcut projections are not on the main path
        assert not any(".downsample" in r.name or r.name.startswith("downsample") for r in rf)
        if name == "mobilenet":
            assert sum(r.kind == "AdaptiveAvgPool2d" for r in rf) == 1
    simple = receptive_field(models.MODELS["simplecnn"](1, 10), 32)
    assert [r.receptive_field[0] for r in simple] == [3, 4, 8, 10, 18, 22]
    assert [r.output_size[0] for r in simple] == [32, 16, 16, 8, 8, 4]


def test_receptive_field_adaptive_pools_and_errors():
    rf = receptive_field([nn.Conv2d(1, 1, 3, padding=1), nn.AdaptiveAvgPool2d(1)], (8, 6))
    assert rf[-1].output_size == (1, 1) and rf[-1].receptive_field == (10, 8)
    rf = receptive_field([nn.AdaptiveMaxPool2d((4, None))], (8, 6))
    assert rf[-1].output_size == (4, 6) and rf[-1].receptive_field == (2, 1)
    with pytest.raises(ValueError, match="windows of unequal sizes"):
        receptive_field([nn.AdaptiveAvgPool2d(3)], 8)
    with pytest.raises(TypeError, match="item 1 is int"):
        receptive_field([nn.Conv2d(1, 1, 3), 5], 8)
    with pytest.raises(ValueError, match="larger than the padded input"):
        receptive_field([nn.Conv2d(1, 1, 3), nn.Conv2d(1, 1, 3)], 4)
    named = receptive_field([("stem", nn.Conv2d(1, 1, 3)), ("body", nn.Sequential(
        nn.ReLU(), nn.Conv2d(1, 1, 3, padding="same")))], 8)
    assert [r.name for r in named] == ["stem", "body.1"]
    assert named[-1].output_size == (6, 6) and named[-1].receptive_field == (5, 5)


def test_layer_shapes_records_in_order_and_leaves_model_alone():
    bn = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), bn, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 3 * 3, 5))
    model.train()
    before = bn.running_mean.clone(), int(bn.num_batches_tracked)
    rec = layer_shapes(model, (2, 1, 8, 8))
    assert [r.name for r in rec] == ["0", "1", "2", "3", "4", "5"]
    assert rec[0].input_shape == (2, 1, 8, 8) and rec[0].output_shape == (2, 4, 6, 6)
    assert rec[3].output_shape == (2, 4, 3, 3) and rec[5].output_shape == (2, 5)
    assert model.training and bn.training
    assert torch.equal(bn.running_mean, before[0]) and int(bn.num_batches_tracked) == before[1]
    assert all(h == {} for h in [m._forward_hooks for m in model.modules()])
    with_containers = layer_shapes(model, (1, 1, 8, 8), leaves_only=False)
    assert with_containers[-1].name == "" and with_containers[-1].output_shape == (1, 5)
    with pytest.raises(TypeError, match="expected an nn.Module"):
        layer_shapes([nn.ReLU()], (1, 1, 8, 8))
