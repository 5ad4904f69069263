"""fastconv.nn layers against the torch.nn layers they replace: construction, parameters,
state_dict, repr, forward and gradients (float64, so differences are real bugs)."""

import copy
import io

import pytest
import torch

import fastconv
from fastconv import nn as fnn
from conftest import assert_close, is_channels_last

F64 = torch.float64
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


def _twins(fast_cls, torch_cls, *args, **kwargs):
    """A fastconv layer and a torch layer built from the same seed (so: equal parameters)."""
    torch.manual_seed(1234)
    fast = fast_cls(*args, **kwargs)
    kwargs.pop("algo", None)
    torch.manual_seed(1234)
    ref = torch_cls(*args, **kwargs)
    return fast, ref


def _check_forward_backward(fast, ref, x, dtype=F64):
    """Same output and the same gradients for the input and every parameter."""
    x1 = x.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y1, y2 = fast(x1), ref(x2)
    if isinstance(y1, tuple):
        torch.testing.assert_close(y1[1], y2[1], rtol=0, atol=0)  # indices: exactly torch's
        y1, y2 = y1[0], y2[0]
    assert y1.shape == y2.shape
    assert_close(y1, y2, dtype)
    g = torch.randn_like(y2)
    y1.backward(g)
    y2.backward(g)
    assert_close(x1.grad, x2.grad, dtype)
    for (n1, p1), (n2, p2) in zip(fast.named_parameters(), ref.named_parameters()):
        assert n1 == n2
        assert_close(p1.grad, p2.grad, dtype, msg=lambda m: f"grad of {n1}: {m}")
    return y1


# --------------------------------------------------------------------------------------------
# construction, parameters, state_dict
# --------------------------------------------------------------------------------------------


def test_isinstance():
    assert isinstance(fnn.Conv2d(2, 4, 3), torch.nn.Conv2d)
    assert isinstance(fnn.DepthwiseConv2d(2, 3), torch.nn.Conv2d)
    assert isinstance(fnn.MaxPool2d(2), torch.nn.MaxPool2d)
    assert fastconv.nn.Conv2d is fnn.Conv2d


@pytest.mark.parametrize("args, kwargs", [
    ((3, 8, 3), {}),
    ((4, 6, (3, 5)), {"stride": 2, "padding": (1, 2), "bias": False}),
    ((4, 8, 3), {"groups": 2, "dilation": 2}),
    ((4, 4, 1), {"groups": 4}),
    ((3, 5, 3), {"padding": "same", "padding_mode": "reflect"}),
])
def test_init_parity_conv2d(args, kwargs):
    fast, ref = _twins(fnn.Conv2d, torch.nn.Conv2d, *args, **kwargs)
    assert fast.weight.shape == ref.weight.shape
    assert torch.equal(fast.weight, ref.weight)
    assert (fast.bias is None) == (ref.bias is None)
    if ref.bias is not None:
        assert torch.equal(fast.bias, ref.bias)
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                 "groups", "padding_mode", "_reversed_padding_repeated_twice"):
        assert getattr(fast, attr) == getattr(ref, attr), attr
    # reset_parameters is torch's: re-initialising from the same seed agrees again
    torch.manual_seed(7)
    fast.reset_parameters()
    torch.manual_seed(7)
    ref.reset_parameters()
    assert torch.equal(fast.weight, ref.weight)


@pytest.mark.parametrize("multiplier", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_init_parity_depthwise(multiplier, bias):
    torch.manual_seed(5)
    fast = fnn.DepthwiseConv2d(4, 3, stride=2, padding=1, bias=bias, depth_multiplier=multiplier)
    torch.manual_seed(5)
    ref = torch.nn.Conv2d(4, 4 * multiplier, 3, stride=2, padding=1, groups=4, bias=bias)
    assert fast.weight.shape == (4 * multiplier, 1, 3, 3)
    assert fast.groups == 4 and fast.out_channels == 4 * multiplier
    assert fast.depth_multiplier == multiplier
    assert torch.equal(fast.weight, ref.weight)
    if bias:
        assert torch.equal(fast.bias, ref.bias)
    else:
        assert fast.bias is None


def test_factory_kwargs():
    conv = fnn.Conv2d(2, 3, 3, dtype=F64, device="cpu")
    dw = fnn.DepthwiseConv2d(2, 3, dtype=torch.bfloat16)
    assert conv.weight.dtype == F64 and conv.bias.dtype == F64
    assert dw.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("make", [
    lambda: (fnn.Conv2d(3, 6, 3, padding=1, algo="direct"), torch.nn.Conv2d(3, 6, 3, padding=1)),
    lambda: (fnn.Conv2d(4, 6, 3, groups=2, bias=False),
             torch.nn.Conv2d(4, 6, 3, groups=2, bias=False)),
    lambda: (fnn.DepthwiseConv2d(4, 3, depth_multiplier=2),
             torch.nn.Conv2d(4, 8, 3, groups=4)),
])
def test_state_dict_round_trip(make):
    fast, ref = make()
    fast.double()
    ref.double()
    sd_fast, sd_ref = fast.state_dict(), ref.state_dict()
    assert list(sd_fast) == list(sd_ref)
    assert all(sd_fast[k].shape == sd_ref[k].shape for k in sd_ref)
    x = torch.randn(2, ref.in_channels, 7, 6, dtype=F64)
    # torch -> fastconv
    fast.load_state_dict(ref.state_dict(), strict=True)
    assert_close(fast(x), ref(x))
    # fastconv -> torch, after changing fastconv's parameters
    with torch.no_grad():
        for p in fast.parameters():
            p.mul_(-0.5).add_(0.1)
    ref.load_state_dict(fast.state_dict(), strict=True)
    for k, v in fast.state_dict().items():
        assert torch.equal(ref.state_dict()[k], v)
    assert_close(fast(x), ref(x))


def test_maxpool_state_dict_and_attributes():
    fast, ref = fnn.MaxPool2d(3, 2, 1, ceil_mode=True), torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True)
    assert fast.state_dict() == {} and ref.state_dict() == {}
    for attr in ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode"):
        assert getattr(fast, attr) == getattr(ref, attr)
    assert fnn.MaxPool2d(2).stride == 2  # stride defaults to kernel_size, as in torch


def test_pickle_and_deepcopy():
    conv = fnn.Conv2d(2, 3, 3, algo="im2col").double()
    buf = io.BytesIO()
    torch.save(conv, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is fnn.Conv2d and loaded.algo == "im2col"
    assert torch.equal(loaded.weight, conv.weight)
    # a pickle from before `algo` existed loads as algo='auto'
    state = dict(conv.__dict__)
    del state["_algo"]
    old = fnn.Conv2d.__new__(fnn.Conv2d)
    old.__setstate__(state)
    assert old.algo == "auto"
    dup = copy.deepcopy(conv)
    assert dup.algo == "im2col" and dup.weight is not conv.weight
    x = torch.randn(1, 2, 5, 5, dtype=F64)
    assert_close(dup(x), conv(x))


# --------------------------------------------------------------------------------------------
# repr, algo
# --------------------------------------------------------------------------------------------


def test_repr():
    fast, ref = fnn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.Conv2d(3, 8, 3, padding=1,
                                                                           bias=False)
    assert repr(fast) == repr(ref)
    fast.algo = "im2col"
    assert repr(fast) == repr(ref)[:-1] + ", algo='im2col')"
    assert "padding_mode=reflect, algo='direct'" in repr(
        fnn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect", algo="direct"))
    dw = fnn.DepthwiseConv2d(4, 3, depth_multiplier=2, bias=False)
    assert repr(dw) == "DepthwiseConv2d(4, 8, kernel_size=(3, 3), stride=(1, 1), groups=4, bias=False)"
    assert repr(fnn.MaxPool2d(3, 2, 1)) == repr(torch.nn.MaxPool2d(3, 2, 1))


@pytest.mark.parametrize("algo", ["auto", "im2col", "direct"])
def test_algo_values(algo):
    fast, ref = _twins(fnn.Conv2d, torch.nn.Conv2d, 4, 6, 3, padding=1, algo=algo, dtype=F64)
    assert fast.algo == algo
    _check_forward_backward(fast, ref, torch.randn(2, 4, 6, 5, dtype=F64))


@pytest.mark.parametrize("bad", ["fast", "IM2COL", "", None, 1])
def test_algo_validation(bad):
    msg = "expected algo to be one of 'auto', 'im2col', 'direct'"
    state = torch.random.get_rng_state()
    with pytest.raises(ValueError, match=msg):
        fnn.Conv2d(2, 2, 3, algo=bad)
    assert torch.equal(torch.random.get_rng_state(), state)  # rejected before any init
    conv = fnn.Conv2d(2, 2, 3)
    with pytest.raises(ValueError, match=msg):
        conv.algo = bad
    assert conv.algo == "auto"
    with pytest.raises(ValueError, match=msg):
        fnn.Conv2d.from_torch(torch.nn.Conv2d(2, 2, 3), algo=bad)


def test_algo_is_keyword_only():
    with pytest.raises(TypeError):
        fnn.Conv2d(2, 2, 3, 1, 0, 1, 1, True, "zeros", None, None, "im2col")


def test_torch_constructor_errors_kept():
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        fnn.Conv2d(2, 2, 3, padding_mode="mirror")
    with pytest.raises(ValueError, match="in_channels must be divisible by groups"):
        fnn.Conv2d(3, 2, 3, groups=2)
    with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
        fnn.Conv2d(2, 2, 3, stride=2, padding="same")
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="depth_multiplier to be a positive int"):
            fnn.DepthwiseConv2d(2, 3, depth_multiplier=bad)


# --------------------------------------------------------------------------------------------
# forward + backward against torch.nn, float64
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("padding, kernel_size, stride, dilation", [
    (1, 3, 1, 1),
    ((1, 2), (3, 5), 2, 1),
    ((2, 1), 3, (1, 2), (2, 1)),
    ("same", 3, 1, 1),
    ("same", (2, 4), 1, 1),      # even kernels: torch pads one more on the bottom/right
    ("same", 3, 1, (2, 1)),
    ("valid", 3, 2, 1),
    (0, 1, 1, 1),
])
def test_conv2d_padding_modes_match_torch(padding_mode, padding, kernel_size, stride, dilation):
    fast, ref = _twins(fnn.Conv2d, torch.nn.Conv2d, 4, 6, kernel_size, stride=stride,
                       padding=padding, dilation=dilation, padding_mode=padding_mode, dtype=F64)
    _check_forward_backward(fast, ref, torch.randn(2, 4, 7, 9, dtype=F64))


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_conv2d_groups_match_torch(groups):
    fast, ref = _twins(fnn.Conv2d, torch.nn.Conv2d, 4, 8, 3, padding=1, groups=groups, dtype=F64)
    _check_forward_backward(fast, ref, torch.randn(3, 4, 6, 6, dtype=F64))


def test_conv2d_float32_and_channels_last():
    fast, ref = _twins(fnn.Conv2d, torch.nn.Conv2d, 8, 16, 3, padding=1)
    x = torch.randn(2, 8, 10, 10).contiguous(memory_format=torch.channels_last)
    y = _check_forward_backward(fast, ref, x, dtype=torch.float32)
    assert is_channels_last(y) == is_channels_last(ref(x))


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("multiplier, stride, padding, dilation", [
    (1, 1, 1, 1),
    (2, 2, 1, 1),
    (3, 1, "same", 2),
    (1, (2, 1), (0, 2), 1),
])
def test_depthwise_matches_torch(padding_mode, multiplier, stride, padding, dilation):
    torch.manual_seed(3)
    fast = fnn.DepthwiseConv2d(4, 3, stride=stride, padding=padding, dilation=dilation,
                               depth_multiplier=multiplier, padding_mode=padding_mode, dtype=F64)
    torch.manual_seed(3)
    ref = torch.nn.Conv2d(4, 4 * multiplier, 3, stride=stride, padding=padding,
                          dilation=dilation, groups=4, padding_mode=padding_mode, dtype=F64)
    y = _check_forward_backward(fast, ref, torch.randn(2, 4, 8, 7, dtype=F64))
    assert y.shape[1] == 4 * multiplier


@pytest.mark.parametrize("kernel_size, stride, padding, dilation, ceil_mode", [
    (2, None, 0, 1, False),
    (3, 2, 1, 1, False),
    (3, 2, 1, 1, True),
    ((2, 3), (2, 1), (1, 1), (2, 1), True),
    (2, 2, 0, 1, True),
])
@pytest.mark.parametrize("return_indices", [False, True])
def test_maxpool_matches_torch(kernel_size, stride, padding, dilation, ceil_mode,
                               return_indices):
    args = (kernel_size, stride, padding, dilation, return_indices, ceil_mode)
    fast, ref = fnn.MaxPool2d(*args), torch.nn.MaxPool2d(*args)
    x = torch.randn(2, 3, 7, 9, dtype=F64)
    y = _check_forward_backward(fast, ref, x)
    assert isinstance(fast(x), tuple) == return_indices


@pytest.mark.parametrize("dtype", [torch.float16, torch.int32, torch.int64, torch.uint8])
def test_maxpool_runs_torch_kernel_for_dtypes_fastconv_lacks(dtype):
    pool = fnn.MaxPool2d(3, 2, 1, return_indices=True)
    x = (torch.randn(2, 3, 9, 8) * 50).to(dtype)
    (out, idx), (ref, ref_idx) = pool(x), torch.nn.MaxPool2d(3, 2, 1, return_indices=True)(x)
    assert out.dtype == dtype
    assert torch.equal(out, ref) and torch.equal(idx, ref_idx)
    with pytest.raises(TypeError, match="expected input to have dtype"):
        fastconv.max_pool2d(x, 3, 2, 1)  # the function itself does not fall back


def test_maxpool_ties_pick_first_index():
    x = torch.zeros(1, 1, 4, 4, dtype=F64)
    fast, ref = fnn.MaxPool2d(2, return_indices=True), torch.nn.MaxPool2d(2, return_indices=True)
    (y1, i1), (y2, i2) = fast(x), ref(x)
    assert torch.equal(i1, i2) and torch.equal(y1, y2)


@pytest.mark.parametrize("layer", ["conv", "conv_reflect", "depthwise", "pool", "pool_idx"])
def test_unbatched_input(layer):
    if layer.startswith("conv"):
        mode = "reflect" if layer == "conv_reflect" else "zeros"
        fast, ref = _twins(fnn.Conv2d, torch.nn.Conv2d, 3, 5, 3, padding=1, padding_mode=mode,
                           dtype=F64)
    elif layer == "depthwise":
        torch.manual_seed(0)
        fast = fnn.DepthwiseConv2d(3, 3, padding=1, depth_multiplier=2, dtype=F64)
        ref = torch.nn.Conv2d(3, 6, 3, padding=1, groups=3, dtype=F64)
        ref.load_state_dict(fast.state_dict())
    else:
        ri = layer == "pool_idx"
        fast, ref = fnn.MaxPool2d(2, return_indices=ri), torch.nn.MaxPool2d(2, return_indices=ri)
    x = torch.randn(3, 6, 5, dtype=F64)
    y = _check_forward_backward(fast, ref, x)
    assert y.dim() == 3


def test_gradients_accumulate_like_torch():
    fast, ref = _twins(fnn.Conv2d, torch.nn.Conv2d, 2, 3, 3, dtype=F64)
    x = torch.randn(1, 2, 5, 5, dtype=F64)
    for _ in range(2):
        fast(x).sum().backward()
        ref(x).sum().backward()
    assert_close(fast.weight.grad, ref.weight.grad)
    assert_close(fast.bias.grad, ref.bias.grad)


def test_gradcheck_layers():
    conv = fnn.Conv2d(2, 3, 3, padding=1, padding_mode="circular", dtype=F64)
    dw = fnn.DepthwiseConv2d(3, 3, padding=1, depth_multiplier=2, dtype=F64)
    pool = fnn.MaxPool2d(2)
    x = torch.randn(1, 2, 5, 5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: pool(dw(conv(t))), (x,))


# --------------------------------------------------------------------------------------------
# from_torch / to_torch
# --------------------------------------------------------------------------------------------


def test_from_torch_takes_over_module():
    ref = torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="replicate", dtype=F64).eval()
    ref.custom_tag = "keep me"
    calls = []
    h_pre = ref.register_forward_pre_hook(lambda m, i: calls.append("pre"))
    ref.register_forward_hook(lambda m, i, o: calls.append("post"))
    fast = fnn.Conv2d.from_torch(ref, algo="im2col")
    assert type(fast) is fnn.Conv2d and fast.algo == "im2col"
    assert fast.weight is ref.weight and fast.bias is ref.bias
    assert fast.training is False and fast.custom_tag == "keep me"
    assert fast.padding_mode == "replicate"
    x = torch.randn(1, 3, 5, 5, dtype=F64)
    assert_close(fast(x), ref(x))
    assert calls == ["pre", "post", "pre", "post"]
    # handles taken before the swap still remove the hook from the new layer
    h_pre.remove()
    calls.clear()
    fast(x)
    assert calls == ["post"]
    # the parameter containers are the new layer's own
    fast.register_parameter("extra", torch.nn.Parameter(torch.zeros(1)))
    assert "extra" not in dict(ref.named_parameters())

    back = fast.to_torch()
    assert type(back) is torch.nn.Conv2d and not hasattr(back, "algo")
    assert back.weight is ref.weight
    assert_close(back(x), ref(x))


def test_from_torch_depthwise_and_pool():
    ref = torch.nn.Conv2d(4, 8, 3, groups=4, bias=False, dtype=F64)
    dw = fnn.DepthwiseConv2d.from_torch(ref)
    assert type(dw) is fnn.DepthwiseConv2d and dw.weight is ref.weight and dw.depth_multiplier == 2
    x = torch.randn(2, 4, 6, 6, dtype=F64)
    assert_close(dw(x), ref(x))
    assert type(dw.to_torch()) is torch.nn.Conv2d
    with pytest.raises(ValueError, match="expected a depthwise convolution"):
        fnn.DepthwiseConv2d.from_torch(torch.nn.Conv2d(4, 8, 3, groups=2))

    pool = torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True)
    fpool = fnn.MaxPool2d.from_torch(pool)
    assert type(fpool) is fnn.MaxPool2d and fpool.ceil_mode and fpool.padding == 1
    assert_close(fpool(x), pool(x))
    assert type(fpool.to_torch()) is torch.nn.MaxPool2d


def test_from_torch_type_errors():
    with pytest.raises(TypeError, match="expected a torch.nn.*Conv2d"):
        fnn.Conv2d.from_torch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="expected a torch.nn.*MaxPool2d"):
        fnn.MaxPool2d.from_torch(torch.nn.AvgPool2d(2))
