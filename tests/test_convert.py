"""fastconv.convert / revert on the tutorial models: same outputs and gradients as the
unconverted model (float64), what is swapped or skipped and why, what carries over."""

import copy
import logging

import pytest
import torch
from torch import nn

import fastconv
from fastconv import nn as fnn
from fastconv.convert import ConversionReport, Skipped, Swapped
from fastconv.models import (
    VGG,
    Bottleneck,
    DepthwiseSeparableConv,
    MBConv,
    MobileNet,
    SimpleCNN,
    SqueezeExcitation,
    conv1x1,
    resnet18,
    resnet_bottleneck,
)
from conftest import DEVICES, assert_close

F64 = torch.float64
FAST_TYPES = (fnn.Conv2d, fnn.DepthwiseConv2d, fnn.MaxPool2d)

# name -> (factory, input shape); small enough for float64 on two cores
MODELS = {
    "simplecnn": (lambda: SimpleCNN(3, 5, input_size=8, widths=(4, 6, 8), hidden=16), (3, 3, 8, 8)),
    "simplecnn_odd": (lambda: SimpleCNN(1, 5, input_size=(9, 7), widths=(3, 4, 5), hidden=8),
                      (2, 1, 9, 7)),
    "vgg": (lambda: VGG(3, 5, widths=(4, 8), hidden=16, dropout=0.5), (3, 3, 8, 8)),
    "resnet18": (lambda: resnet18(3, 5, base_width=4), (3, 3, 8, 8)),
    "resnet18_imagenet_stem": (lambda: resnet18(1, 5, base_width=4, small_input=False),
                               (3, 1, 16, 16)),
    "bottleneck_block": (lambda: Bottleneck(8, 4, stride=2, downsample=nn.Sequential(
        conv1x1(8, 16, 2), nn.BatchNorm2d(16))), (3, 8, 7, 7)),
    "resnet_bottleneck": (lambda: resnet_bottleneck(3, 5, layers=(1, 1, 1, 1), base_width=4),
                          (3, 3, 8, 8)),
    "depthwise_separable": (lambda: DepthwiseSeparableConv(4, 8, stride=2), (3, 4, 9, 9)),
    "mbconv_se": (lambda: MBConv(8, 8, expand_ratio=4, kernel_size=5, se_ratio=0.25),
                  (3, 8, 6, 6)),
    "mbconv_stride": (lambda: MBConv(8, 12, expand_ratio=1, stride=2), (3, 8, 7, 7)),
    "mobilenet": (lambda: MobileNet(3, 5, width_mult=0.25, head_channels=64), (3, 3, 8, 8)),
}


def _make(name, dtype=F64):
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model = factory().to(dtype)
    x = torch.randn(shape, dtype=dtype)
    return model, x


def _torch_layers(model):
    """Qualified names of the modules convert should swap (exact torch types)."""
    return [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.MaxPool2d)]


def _run(model, x, grad_seed=1):
    """Output, input grad and parameter grads of one forward/backward; the RNG is seeded so
    dropout draws the same masks for both models."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(grad_seed)
    y = model(x)
    g = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(grad_seed))
    y.backward(g)
    grads = {n: p.grad for n, p in model.named_parameters()}
    return y.detach(), x.grad, grads


def _assert_same_run(ref, fast, x):
    y1, gx1, gp1 = _run(ref, x)
    y2, gx2, gp2 = _run(fast, x)
    assert_close(y2, y1)
    assert_close(gx2, gx1)
    assert gp1.keys() == gp2.keys()
    for n in gp1:
        if gp1[n] is None:  # a parameter the forward does not use
            assert gp2[n] is None, n
        else:
            assert_close(gp2[n], gp1[n], msg=lambda m: f"grad of {n}: {m}")
    for (n, b1), (_, b2) in zip(ref.named_buffers(), fast.named_buffers()):
        if b1.is_floating_point():
            assert_close(b2, b1, msg=lambda m: f"buffer {n}: {m}")
        else:  # BatchNorm's num_batches_tracked
            assert torch.equal(b2, b1), n


# --------------------------------------------------------------------------------------------
# numerics on the tutorial models
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(MODELS))
def test_converted_model_matches(name, train):
    model, x = _make(name)
    model.train(train)
    expected_names = _torch_layers(model)
    assert expected_names, "the model should have something to convert"
    fast, report = fastconv.convert(model, report=True)
    assert [s.name for s in report.swapped] == expected_names
    assert report.skipped == []
    assert not [n for n, m in fast.named_modules() if type(m) in (nn.Conv2d, nn.MaxPool2d)]
    for n, m in fast.named_modules():
        if isinstance(m, nn.Conv2d):
            depthwise = m.groups == m.in_channels > 1 and m.weight.size(1) == 1
            assert type(m) is (fnn.DepthwiseConv2d if depthwise else fnn.Conv2d), n
    assert fast.training == train
    _assert_same_run(model, fast, x)
    # a second step (BatchNorm running statistics updated once already) still agrees
    _assert_same_run(model, fast, x * 0.5 + 0.25)


def test_original_untouched_by_default():
    model, x = _make("resnet18")
    before = {n: type(m) for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fast = fastconv.convert(model)
    assert fast is not model
    assert {n: type(m) for n, m in model.named_modules()} == before
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert not ptrs & {p.data_ptr() for p in fast.parameters()}
    # training the converted copy leaves the original's parameters and statistics alone
    fast.train()
    fast(x).sum().backward()
    torch.optim.SGD(fast.parameters(), lr=0.1).step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_state_dict_unchanged_by_conversion():
    model, _ = _make("mobilenet")
    fast = fastconv.convert(model)
    sd, fsd = model.state_dict(), fast.state_dict()
    assert list(sd) == list(fsd)
    for k in sd:
        assert torch.equal(sd[k], fsd[k]), k
    # and loads both ways
    model.load_state_dict(fsd, strict=True)
    fast.load_state_dict(sd, strict=True)


def test_inplace_keeps_parameters_and_optimizer():
    model, x = _make("vgg")
    model.train()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    params = list(model.parameters())
    named = dict(model.named_parameters())
    out = fastconv.convert(model, inplace=True)
    assert out is model
    assert all(a is b for a, b in zip(params, model.parameters()))
    assert all(named[n] is p for n, p in model.named_parameters())
    assert isinstance(model.features[0], fnn.Conv2d)
    target = torch.tensor([0, 3, 1])
    for step in range(3):
        for m, o in ((model, opt), (ref, opt_ref)):
            o.zero_grad()
            torch.manual_seed(step)
            nn.functional.cross_entropy(m(x), target).backward()
            o.step()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert_close(p.detach(), q.detach(), msg=lambda m: f"{n}: {m}")


# --------------------------------------------------------------------------------------------
# what carries over: device, dtype, training flags, hooks, attributes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_device_and_dtype_kept(device, dtype):
    model = SimpleCNN(2, 3, input_size=8, widths=(4, 4, 4), hidden=8).to(device, dtype)
    fast = fastconv.convert(model)
    assert all(p.device.type == device and p.dtype == dtype for p in fast.parameters())
    x = torch.randn(2, 2, 8, 8, device=device, dtype=dtype)
    y = fast(x)
    assert y.device.type == device and y.dtype == dtype
    assert_close(y.float(), model(x).float(), dtype=dtype, reduction=8 * 9)


def test_meta_device_model():
    # fastconv's fake kernels run meta tensors: a model can be converted before it is
    # materialised, and shape inference works.
    with torch.device("meta"):
        model = resnet18(3, 7, base_width=4)
    fast, report = fastconv.convert(model, report=True)
    assert not report.skipped
    y = fast(torch.empty(2, 3, 16, 16, device="meta"))
    assert y.shape == (2, 7) and y.device.type == "meta"


def test_training_flags_kept_per_module():
    model, _ = _make("resnet18")
    model.train()
    model.layer2.eval()
    fast = fastconv.convert(model)
    for (n, m), (_, f) in zip(model.named_modules(), fast.named_modules()):
        assert m.training == f.training, n
    assert fast.layer2[0].conv1.training is False and fast.layer1[0].conv1.training is True


def test_hooks_and_attributes_kept():
    # no in-place ReLU after the conv: torch forbids that with full backward hooks
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(4, 3, 1))
    x = torch.randn(2, 2, 6, 6)
    conv, pool = model[0], model[1]
    calls = []
    conv.register_forward_pre_hook(lambda m, i: calls.append(("pre", type(m))))
    conv.register_forward_hook(lambda m, i, o: calls.append(("fwd", type(m))))
    conv.register_full_backward_hook(lambda m, gi, go: calls.append(("bwd", type(m))))
    pool.register_forward_hook(lambda m, i, o: calls.append(("pool", type(m))))
    conv.register_state_dict_pre_hook(lambda m, prefix, keep_vars: calls.append(("sd", prefix)))
    conv.register_load_state_dict_post_hook(lambda m, keys: calls.append(("load", type(m))))
    conv.note = "first layer"
    fast = fastconv.convert(model)
    f_conv = fast[0]
    assert type(f_conv) is fnn.Conv2d and f_conv.note == "first layer"
    fast(x.requires_grad_()).sum().backward()
    assert calls == [("pre", fnn.Conv2d), ("fwd", fnn.Conv2d), ("pool", fnn.MaxPool2d),
                     ("bwd", fnn.Conv2d)]
    calls.clear()
    sd = fast.state_dict()
    fast.load_state_dict(sd)
    assert ("sd", "0.") in calls and ("load", fnn.Conv2d) in calls
    model(x)  # the original keeps its own hooks
    assert calls[-3:] == [("pre", nn.Conv2d), ("fwd", nn.Conv2d), ("pool", nn.MaxPool2d)]


def test_inplace_hook_handles_still_work():
    model, x = _make("simplecnn")
    calls = []
    handle = model.features[0].register_forward_hook(lambda m, i, o: calls.append(1))
    fastconv.convert(model, inplace=True)
    model(x)
    assert calls == [1]
    handle.remove()
    model(x)
    assert calls == [1]


# --------------------------------------------------------------------------------------------
# selection: filter_fn, subclasses, unsupported layers, shared modules
# --------------------------------------------------------------------------------------------


def test_filter_fn_selects():
    model, x = _make("resnet18")
    seen = []

    def only_layer1(name, module):
        seen.append((name, type(module)))
        return name.startswith("layer1.")

    fast, report = fastconv.convert(model, filter_fn=only_layer1, report=True)
    assert [n for n, _ in seen] == _torch_layers(model)
    assert all(t is nn.Conv2d for _, t in seen)
    for n, m in fast.named_modules():
        if isinstance(m, nn.Conv2d):
            assert (type(m) is fnn.Conv2d) == n.startswith("layer1."), n
    assert {s.name for s in report.swapped} == {n for n, _ in seen if n.startswith("layer1.")}
    assert {s.name for s in report.skipped} == {n for n, _ in seen if not n.startswith("layer1.")}
    assert all(s.reason == "filter_fn returned False" for s in report.skipped)
    _assert_same_run(model, fast, x)


class ShiftedConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) + 1.0


class PlainSubclassConv(nn.Conv2d):
    pass


class LoggingPool(nn.MaxPool2d):
    def forward(self, x):
        return super().forward(x) * 2.0


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.shifted = ShiftedConv(2, 4, 3, padding=1)
        self.plain_sub = PlainSubclassConv(4, 4, 3, padding=1)
        self.pool = LoggingPool(2)
        self.convs = nn.ModuleList([nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=4)])
        self.heads = nn.ModuleDict({"a": nn.Conv2d(4, 3, 1), "b": nn.MaxPool2d(2)})
        self.other = nn.Conv1d(2, 2, 3)
        self.avg = nn.AvgPool2d(2)

    def forward(self, x):
        x = self.pool(self.plain_sub(self.shifted(x)))
        for c in self.convs:
            x = c(x)
        return self.heads["b"](self.heads["a"](x))


def test_subclasses_skipped_and_reported():
    torch.manual_seed(0)
    model = Mixed().double()
    x = torch.randn(2, 2, 8, 8, dtype=F64)
    fast, report = fastconv.convert(model, report=True)
    assert type(fast.shifted) is ShiftedConv
    assert type(fast.plain_sub) is PlainSubclassConv
    assert type(fast.pool) is LoggingPool
    assert type(fast.convs[0]) is fnn.Conv2d
    assert type(fast.convs[1]) is fnn.DepthwiseConv2d
    assert type(fast.heads["a"]) is fnn.Conv2d and type(fast.heads["b"]) is fnn.MaxPool2d
    assert type(fast.other) is nn.Conv1d and type(fast.avg) is nn.AvgPool2d
    assert report.swapped == [
        Swapped("convs.0", nn.Conv2d, fnn.Conv2d),
        Swapped("convs.1", nn.Conv2d, fnn.DepthwiseConv2d),
        Swapped("heads.a", nn.Conv2d, fnn.Conv2d),
        Swapped("heads.b", nn.MaxPool2d, fnn.MaxPool2d),
    ]
    skipped = {s.name: s for s in report.skipped}
    assert set(skipped) == {"shifted", "plain_sub", "pool"}
    assert "overrides forward" in skipped["shifted"].reason
    assert skipped["shifted"].type is ShiftedConv
    assert "overrides forward" not in skipped["plain_sub"].reason
    assert "only exact torch.nn.Conv2d" in skipped["plain_sub"].reason
    assert "overrides forward" in skipped["pool"].reason
    _assert_same_run(model, fast, x)


def test_replaced_instance_forward_skipped():
    conv = nn.Conv2d(2, 2, 3)
    conv.forward = lambda x: x
    model = nn.Sequential(conv, nn.Conv2d(2, 2, 1))
    fast, report = fastconv.convert(model, report=True)
    assert type(fast[0]) is nn.Conv2d and type(fast[1]) is fnn.Conv2d
    assert report.skipped[0].name == "0" and "forward was replaced" in report.skipped[0].reason


def test_lazy_modules():
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU())
    _, report = fastconv.convert(model, report=True)
    assert report.skipped[0].name == "0" and "lazy" in report.skipped[0].reason
    model(torch.randn(1, 2, 5, 5))  # materialises: the module becomes a plain nn.Conv2d
    fast = fastconv.convert(model)
    assert type(fast[0]) is fnn.Conv2d


def test_unsupported_dtype_skipped():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.MaxPool2d(2), nn.Conv2d(4, 4, 1))
    model[2].half()
    fast, report = fastconv.convert(model, report=True)
    assert type(fast[0]) is fnn.Conv2d and type(fast[1]) is fnn.MaxPool2d
    assert type(fast[2]) is nn.Conv2d
    assert len(report.skipped) == 1
    s = report.skipped[0]
    assert s.name == "2" and s.type is nn.Conv2d
    assert "float16" in s.reason and "not supported on cpu" in s.reason


def test_a_float16_model_still_runs_after_convert():
    # The convs are skipped (no float16 CPU kernels); the pool is swapped, as convert cannot
    # know the input's dtype, and hands float16 input to torch's kernel.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2, return_indices=True))
    model.half()
    fast = fastconv.convert(model)
    assert type(fast[0]) is nn.Conv2d and type(fast[2]) is fnn.MaxPool2d
    x = torch.randn(2, 3, 9, 9).half()
    (out, idx), (ref, ref_idx) = fast(x), model(x)
    assert out.dtype == torch.float16
    assert torch.equal(out, ref) and torch.equal(idx, ref_idx)


def test_already_converted_skipped():
    model, _ = _make("depthwise_separable")
    fast = fastconv.convert(model)
    again, report = fastconv.convert(fast, report=True)
    assert report.swapped == []
    assert [s.name for s in report.skipped] == _torch_layers(model)
    assert all(s.reason == "already a fastconv layer" for s in report.skipped)
    assert [type(m) for m in again.modules()] == [type(m) for m in fast.modules()]


def test_depthwise_detection():
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, groups=4),     # depthwise, multiplier 2
        nn.Conv2d(8, 8, 3, groups=4),     # grouped, 2 input channels per filter
        nn.Conv2d(1, 4, 3),               # groups == in_channels == 1: a plain conv
        nn.Conv2d(4, 4, 1, groups=4),     # depthwise 1x1
    )
    fast = fastconv.convert(model)
    assert [type(m) for m in fast] == [fnn.DepthwiseConv2d, fnn.Conv2d, fnn.Conv2d,
                                       fnn.DepthwiseConv2d]
    assert fast[0].depth_multiplier == 2


def test_shared_module_swapped_once():
    conv = nn.Conv2d(3, 3, 3, padding=1).double()
    model = nn.Sequential(conv, nn.ReLU(), conv, nn.Sequential(conv))
    for inplace in (False, True):
        fast, report = fastconv.convert(model if inplace else copy.deepcopy(model),
                                        inplace=inplace, report=True)
        assert type(fast[0]) is fnn.Conv2d
        assert fast[0] is fast[2] is fast[3][0]
        assert [s.name for s in report.swapped] == ["0"]
        assert len(list(fast.parameters())) == 2


def test_root_module_converted():
    conv = nn.Conv2d(2, 3, 3).double()
    fast = fastconv.convert(conv)
    assert type(fast) is fnn.Conv2d and type(conv) is nn.Conv2d
    x = torch.randn(1, 2, 5, 5, dtype=F64)
    assert_close(fast(x), conv(x))
    pool, report = fastconv.convert(nn.MaxPool2d(2), inplace=True, report=True)
    assert type(pool) is fnn.MaxPool2d and report.swapped[0].name == ""
    assert type(fastconv.revert(fast)) is nn.Conv2d


def test_algo_argument():
    model, x = _make("mobilenet")
    fast = fastconv.convert(model, algo="im2col")
    convs = [m for m in fast.modules() if type(m) is fnn.Conv2d]
    assert convs and all(m.algo == "im2col" for m in convs)
    assert "algo='im2col'" in repr(fast)
    model.eval()
    fast.eval()
    assert_close(fast(x), model(x))
    with pytest.raises(ValueError, match="expected algo to be one of"):
        fastconv.convert(model, algo="winograd")


# --------------------------------------------------------------------------------------------
# the report and the log
# --------------------------------------------------------------------------------------------


def test_report_and_logging(caplog):
    torch.manual_seed(0)
    model = Mixed()
    with caplog.at_level(logging.DEBUG, logger="fastconv.convert"):
        result = fastconv.convert(model)
    assert isinstance(result, Mixed)  # report=False: just the model
    _, report = fastconv.convert(model, report=True)
    assert isinstance(report, ConversionReport) and report.action == "convert"
    assert all(isinstance(s, Swapped) for s in report.swapped)
    assert all(isinstance(s, Skipped) for s in report.skipped)
    summary = report.summary()
    assert summary.startswith("convert: swapped 4 module(s)")
    assert "3 x torch.nn.Conv2d -> fastconv.nn.Conv2d" not in summary  # 2 Conv2d, 1 depthwise
    assert "2 x torch.nn.Conv2d -> fastconv.nn.Conv2d" in summary
    assert "1 x torch.nn.Conv2d -> fastconv.nn.DepthwiseConv2d" in summary
    assert "skipped 3" in summary
    text = str(report)
    assert "swapped convs.1: torch.nn.Conv2d -> fastconv.nn.DepthwiseConv2d" in text
    assert "skipped shifted" in text
    records = [r for r in caplog.records if r.name == "fastconv.convert"]
    infos = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert infos == [summary]
    debugs = [r.getMessage() for r in records if r.levelno == logging.DEBUG]
    assert any("heads.b" in m for m in debugs) and any("skipped pool" in m for m in debugs)


# --------------------------------------------------------------------------------------------
# revert
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "mobilenet", "simplecnn"])
def test_revert_restores_torch_modules(name):
    model, x = _make(name)
    model.eval()
    fast = fastconv.convert(model, algo="direct")
    back, report = fastconv.revert(fast, report=True)
    assert report.action == "revert" and report.skipped == []
    assert [s.name for s in report.swapped] == _torch_layers(model)
    assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]
    assert not any(hasattr(m, "algo") for m in back.modules())
    assert all(isinstance(m, FAST_TYPES) for m in fast.modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d)))
    assert_close(back(x), model(x))
    assert list(back.state_dict()) == list(model.state_dict())


def test_revert_inplace_round_trip():
    model, x = _make("resnet_bottleneck")
    params = list(model.parameters())
    fastconv.convert(model, inplace=True)
    out = fastconv.revert(model, inplace=True)
    assert out is model
    assert all(a is b for a, b in zip(params, model.parameters()))
    assert not any(isinstance(m, FAST_TYPES) for m in model.modules())


def test_revert_skips_fastconv_subclasses():
    class MyFastConv(fnn.Conv2d):
        pass

    model = nn.Sequential(MyFastConv(2, 2, 3), fnn.MaxPool2d(2), nn.Conv2d(2, 2, 1))
    back, report = fastconv.revert(model, report=True)
    assert type(back[0]) is MyFastConv and type(back[1]) is nn.MaxPool2d
    assert type(back[2]) is nn.Conv2d
    assert [s.name for s in report.swapped] == ["1"]
    assert report.skipped[0].name == "0" and "subclass of a fastconv layer" in report.skipped[0].reason
