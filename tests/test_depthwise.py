"""fastconv.depthwise_conv2d and its two backward ops against torch.nn.functional.conv2d
(groups=C) and fastconv.reference.depthwise_conv2d, both evaluated in float64."""

import pytest
import torch
import torch.nn.functional as F

import fastconv
from fastconv import reference

from conftest import (DEVICES, Snapshot, assert_close, is_channels_last, ops_called,
                      poison_unread)

OPS = torch.ops.fastconv
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last"]


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _layout(t, layout):
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


def _make(n, c, m, h, w, k, dtype, device, bias=True, layout="nchw"):
    kh, kw = _pair(k)
    x = _layout(torch.randn(n, c, h, w, dtype=torch.float64, device=device).to(dtype), layout)
    wt = torch.randn(c * m, 1, kh, kw, dtype=torch.float64, device=device).to(dtype)
    b = torch.randn(c * m, dtype=torch.float64, device=device).to(dtype) if bias else None
    return x, wt, b


def _truth(fn, x, w, b, g, **conv):
    """fn's output and (input, weight, bias) grads in float64 for the same (rounded) values."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    out = fn(x64, w64, b64, **conv)
    out.backward(g.double())
    return out.detach(), x64.grad, w64.grad, (b64.grad if b is not None else None)


def _torch_dw(x, w, b, stride, padding, dilation):
    return F.conv2d(x, w, b, stride, padding, dilation, groups=x.shape[-3])


def _check_against_both(x, w, b, stride, padding, dilation):
    """Forward + autograd grads of fastconv.depthwise_conv2d vs F.conv2d and the reference."""
    dtype = x.dtype
    conv = dict(stride=stride, padding=padding, dilation=dilation)
    xa = x.detach().clone().requires_grad_()
    wa = w.detach().clone().requires_grad_()
    ba = b.detach().clone().requires_grad_() if b is not None else None
    snap = Snapshot(xa, wa, ba)
    out = fastconv.depthwise_conv2d(xa, wa, ba, **conv)
    g = torch.randn(out.shape, dtype=torch.float64, device=x.device).to(dtype)
    g = g.contiguous(memory_format=torch.channels_last) if is_channels_last(out) else g
    gsnap = Snapshot(g)
    out.backward(g)
    snap.check()
    gsnap.check()

    kh, kw = w.shape[-2:]
    m = w.shape[0] // x.shape[-3]
    n_out = out.numel() // out.shape[-3]  # products summed into each weight-gradient element
    torch_out = _torch_dw(x.detach().double(), w.detach().double(),
                          b.detach().double() if b is not None else None, **conv)
    assert out.shape == torch_out.shape
    assert is_channels_last(out) == is_channels_last(torch_out)  # torch's memory-format rule
    for fn in (_torch_dw, reference.depthwise_conv2d):
        t_out, t_gx, t_gw, t_gb = _truth(fn, x, w, b, g, **conv)
        assert_close(out, t_out, dtype, reduction=kh * kw)
        assert_close(xa.grad, t_gx, dtype, reduction=kh * kw * m)
        assert_close(wa.grad, t_gw, dtype, reduction=n_out)
        if b is not None:
            assert_close(ba.grad, t_gb, dtype, reduction=n_out)
    return out, g


# (N, C, m, H, W, kernel, stride, padding, dilation, bias): every kernel size the dispatch
# distinguishes (fixed 3/5/7, runtime others incl. 13 and 31), multipliers 1-3, strides and
# dilations, channel counts that exercise full / half / single channel blocks in NHWC, and
# widths that exercise full / pair / half / partial vectors in NCHW.
CASES = [
    (2, 3, 1, 9, 10, 1, 1, 0, 1, True),
    (2, 3, 2, 9, 10, 2, 1, 1, 1, False),
    (2, 4, 1, 12, 11, 3, 1, 1, 1, True),
    (1, 24, 1, 7, 40, 3, 1, 1, 1, True),
    (2, 4, 3, 12, 11, 3, 2, 1, 1, True),
    (2, 17, 1, 10, 57, 3, (1, 2), 1, 2, False),
    (1, 5, 1, 10, 13, 4, (1, 2), 2, 1, False),
    (2, 3, 1, 14, 23, 5, 1, 2, 1, True),
    (2, 3, 2, 14, 12, 5, 1, 2, 2, True),
    (2, 17, 1, 15, 16, 7, 1, 3, 1, True),
    (1, 16, 2, 11, 9, 7, 2, 3, 1, False),
    (2, 2, 1, 20, 35, 7, 1, 3, 1, False),
    (1, 2, 1, 16, 18, 13, 1, 6, 1, True),
    (1, 2, 1, 9, 8, 31, 1, 15, 1, False),
    (2, 3, 1, 10, 12, (3, 5), 1, (1, 2), 1, True),
    (2, 3, 2, 12, 10, (1, 7), (2, 1), (0, 3), (1, 2), True),
    (2, 5, 1, 9, 9, 3, 3, 0, 2, False),
    (1, 3, 3, 8, 11, (2, 3), 2, 4, 1, True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}c{}m{}_{}x{}_k{}_s{}_p{}_d{}_b{}".format(*c))
def test_forward_backward(case, dtype, layout, device):
    n, c, m, h, w, k, stride, padding, dilation, bias = case
    x, wt, b = _make(n, c, m, h, w, k, dtype, device, bias, layout)
    _check_against_both(x, wt, b, stride, padding, dilation)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES[::3], ids=lambda c: "n{}c{}m{}_{}x{}_k{}_s{}_p{}_d{}_b{}".format(*c))
def test_backward_ops_direct(case, dtype, layout, device):
    n, c, m, h, w, k, stride, padding, dilation, bias = case
    x, wt, _ = _make(n, c, m, h, w, k, dtype, device, False, layout)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    out = OPS.depthwise_conv2d(x, wt, None, stride, padding, dilation)
    g = _layout(torch.randn(out.shape, dtype=torch.float64, device=device).to(dtype), layout)
    snap = Snapshot(x, wt, g)
    gi = OPS._depthwise_conv2d_grad_input(g, wt, list(x.shape), stride, padding, dilation)
    gw = OPS._depthwise_conv2d_grad_weight(g, x, list(wt.shape), stride, padding, dilation)
    snap.check()
    assert gi.shape == x.shape and gi.dtype == dtype
    assert is_channels_last(gi) == (layout == "channels_last")
    assert gw.shape == wt.shape and gw.is_contiguous()
    _, t_gx, t_gw, _ = _truth(_torch_dw, x, wt, None, g, stride=stride, padding=padding,
                              dilation=dilation)
    kh, kw = wt.shape[-2:]
    assert_close(gi, t_gx, dtype, reduction=kh * kw * m)
    assert_close(gw, t_gw, dtype, reduction=out[:, 0].numel())
    gi_r = torch.nn.grad.conv2d_input(x.shape, wt.double(), g.double(), stride, padding, dilation, c)
    assert_close(gi, gi_r, dtype, reduction=kh * kw * m)


# _depthwise_conv2d_backward: all gradients in one call. Its fused CPU kernels (float32, stride 1,
# dilation 1, multiplier 1, square 3/5/7; channels_last also C % 16 == 0 and 'same' padding)
# produce the same bits as the two separate ops; everything else runs those ops.
FUSED_CASES = CASES[::3] + [
    (2, 16, 1, 9, 13, 3, 1, 1, 1, True),    # channels_last fused: 8-, 4- and 1-pixel blocks
    (3, 32, 1, 6, 5, 5, 1, 2, 1, False),    # rows narrower than a block
    (2, 16, 1, 11, 10, 7, 1, 3, 1, True),
    (2, 16, 1, 9, 13, 3, 1, 0, 1, True),    # 'valid': NCHW fused, channels_last separate ops
    (2, 3, 1, 9, 61, 3, 1, 1, 1, True),     # NCHW fused up to 64 - K + 1 columns ...
    (2, 3, 1, 5, 63, 3, 1, 1, 1, True),     # ... and the separate ops past it
    # channels_last over 32 rows: each grad_weight chunk holds several row bands, and chunks
    # and bands meet image ends at every offset
    (5, 16, 1, 41, 11, 3, 1, 1, 1, True),
    (3, 32, 1, 23, 9, 5, 1, 2, 1, False),
    (4, 16, 1, 30, 17, 7, 1, 3, 1, True),
    # 3x3 channels_last walks rows in pairs within a chunk and an image: pairs with 8-, 4- and
    # 1-pixel blocks, rows narrower than a block, and the grad_weight op's pairs at padding 0
    # and 2 (where the separate ops run)
    (3, 16, 1, 23, 13, 3, 1, 1, 1, True),
    (3, 32, 1, 30, 5, 3, 1, 1, 1, False),
    (4, 16, 1, 20, 12, 3, 1, 0, 1, True),
    (3, 16, 1, 17, 10, 3, 1, 2, 1, False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layouts", [("nchw", "nchw"), ("channels_last", "channels_last"),
                                     ("channels_last", "nchw"), ("nchw", "channels_last")],
                         ids=lambda v: "x_{}-g_{}".format(*v))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: "n{}c{}m{}_{}x{}_k{}_s{}_p{}_d{}_b{}".format(*c))
def test_fused_backward_op_matches_the_separate_ops(case, dtype, layouts, device):
    n, c, m, h, w, k, stride, padding, dilation, bias = case
    x, wt, _ = _make(n, c, m, h, w, k, dtype, device, False, layouts[0])
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    out = OPS.depthwise_conv2d(x, wt, None, stride, padding, dilation)
    g = _layout(torch.randn(out.shape, dtype=torch.float64, device=device).to(dtype), layouts[1])
    snap = Snapshot(x, wt, g)
    grads = OPS._depthwise_conv2d_backward(g, x, wt, stride, padding, dilation, bias)
    snap.check()
    gi = OPS._depthwise_conv2d_grad_input(g, wt, list(x.shape), stride, padding, dilation)
    gw = OPS._depthwise_conv2d_grad_weight(g, x, list(wt.shape), stride, padding, dilation)
    assert len(grads) == (3 if bias else 2)
    assert torch.equal(grads[0], gi) and grads[0].stride() == gi.stride()
    assert torch.equal(grads[1], gw) and grads[1].is_contiguous()
    _, t_gx, t_gw, _ = _truth(_torch_dw, x, wt, None, g, stride=stride, padding=padding,
                              dilation=dilation)
    kh, kw = wt.shape[-2:]
    assert_close(grads[0], t_gx, dtype, reduction=kh * kw * m)
    assert_close(grads[1], t_gw, dtype, reduction=out[:, 0].numel())
    if bias:
        assert grads[2].shape == (c * m,) and grads[2].dtype == dtype
        assert_close(grads[2], g.double().sum((0, 2, 3)), dtype, reduction=out[:, 0].numel())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("needs", [(True, True, True), (True, True, False), (True, False, False),
                                   (False, True, True), (False, False, True)], ids=str)
def test_autograd_uses_the_fused_op_when_input_and_weight_grads_are_needed(needs, layout):
    x, wt, b = _make(2, 16, 1, 9, 9, 3, torch.float32, "cpu", True, layout)
    xa, wa, ba = (t.clone().requires_grad_(r) for t, r in zip((x, wt, b), needs))
    out = fastconv.depthwise_conv2d(xa, wa, ba, padding=1)
    g = torch.randn_like(out)
    called = ops_called(lambda: out.backward(g))
    fused = needs[0] and needs[1]
    assert ("fastconv::_depthwise_conv2d_backward" in called) == fused
    assert ("fastconv::_depthwise_conv2d_grad_input" in called) == (needs[0] and not fused)
    assert ("fastconv::_depthwise_conv2d_grad_weight" in called) == (needs[1] and not fused)
    t_out, t_gx, t_gw, t_gb = _truth(_torch_dw, x, wt, b, g, stride=1, padding=1, dilation=1)
    for t, ref, red in ((xa, t_gx, 9), (wa, t_gw, 2 * 81), (ba, t_gb, 2 * 81)):
        if t.requires_grad:
            assert_close(t.grad, ref, torch.float32, reduction=red)
        else:
            assert t.grad is None


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("algo", ["auto", "im2col"])
def test_conv2d_autograd_on_depthwise_shapes_uses_the_fused_op_for_auto(algo, layout):
    x, wt, b = _make(2, 16, 2, 9, 9, 3, torch.float32, "cpu", True, layout)
    xa, wa, ba = (t.clone().requires_grad_() for t in (x, wt, b))
    out = fastconv.conv2d(xa, wa, ba, padding=1, groups=16, algo=algo)
    g = torch.randn_like(out)
    called = ops_called(lambda: out.backward(g))
    assert ("fastconv::_depthwise_conv2d_backward" in called) == (algo == "auto")
    assert ("fastconv::_conv2d_grad_input" in called) == (algo != "auto")
    if algo == "auto":  # the same bits as conv2d's own backward ops
        args = ([1, 1], [1, 1], [1, 1], 16, algo)
        gi = OPS._conv2d_grad_input(g, wt, list(x.shape), *args)
        gw = OPS._conv2d_grad_weight(g, x, list(wt.shape), *args)
        assert torch.equal(xa.grad, gi) and torch.equal(wa.grad, gw)
    _, t_gx, t_gw, t_gb = _truth(_torch_dw, x, wt, b, g, stride=1, padding=1, dilation=1)
    assert_close(xa.grad, t_gx, torch.float32, reduction=18)
    assert_close(wa.grad, t_gw, torch.float32, reduction=2 * 81)
    assert_close(ba.grad, t_gb, torch.float32, reduction=2 * 81)


# The register-blocked float kernel (stride 1, dilation 1, square 3/5/7; forward and grad_input
# of NCHW): 4-row blocks with 2- and 1-row tails, chunks of 4 column vectors with 1-4 vector
# tails, partial last vectors, paddings that make grad_input's buffer offsets differ.
BLOCKED_CASES = [
    (k, h, w, p, m)
    for k in (3, 5, 7)
    for (h, w) in ((1, 1), (2, 5), (3, 16), (5, 17), (6, 48), (9, 63), (4, 64), (7, 65), (8, 130))
    for (p, m) in (((k // 2, 1),) if w < 16 else ((k // 2, 1), (0, 2), (k - 1, 1)))
    if h + 2 * p >= k and w + 2 * p >= k
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", BLOCKED_CASES, ids=lambda c: "k{}_{}x{}_p{}_m{}".format(*c))
def test_register_blocked_stride1_kernels(case, layout):
    k, h, w, p, m = case
    x, wt, b = _make(2, 3, m, h, w, k, torch.float32, "cpu", bias=True, layout=layout)
    _check_against_both(x, wt, b, 1, p, 1)


# The channels_last float32 fast path (stride 1, dilation 1, multiplier 1, C % 16 == 0, square
# 3/5/7): blocks of 8 pixels and a last block of every size 1..7 (the widths give each kernel
# size every output width modulo 8, for the forward and for grad_input), border blocks,
# paddings from 0 to K (grad_input's effective padding K - 1 - p then goes negative), rows
# outside the image; width 16 with padding 1 gives 3x3 grad_weight blocks whose first and
# whose last input column is outside.
NHWC_FAST_CASES = [
    (c, k, h, w, p)
    for c in (16, 48)
    for k in (3, 5, 7)
    for (h, w) in ((1, 1), (3, 9), (6, 13), (9, 21), (5, 16), (2, 7), (3, 10), (2, 11), (3, 12),
                   (2, 14))
    for p in (0, k // 2, k)
    if h + 2 * p >= k and w + 2 * p >= k
]


@pytest.mark.parametrize("case", NHWC_FAST_CASES, ids=lambda c: "c{}_k{}_{}x{}_p{}".format(*c))
def test_channels_last_fast_path(case):
    c, k, h, w, p = case
    x, wt, b = _make(2, c, 1, h, w, k, torch.float32, "cpu", bias=True, layout="channels_last")
    _check_against_both(x, wt, b, 1, p, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "k,dilation", [(3, 1), (3, 2), (4, 1), (4, 2), ((2, 5), 1), ((5, 2), (2, 1)), (7, 1)])
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_padding_strings(padding, k, dilation, dtype, layout, device):
    x, wt, b = _make(2, 3, 2, 11, 12, k, dtype, device, True, layout)
    _check_against_both(x, wt, b, 1, padding, dilation)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_one_and_unbatched(dtype, layout, device):
    x, wt, b = _make(1, 4, 2, 9, 10, 3, dtype, device, True, layout)
    _check_against_both(x, wt, b, 1, 1, 1)
    x3 = x[0].detach().clone()
    out3, _ = _check_against_both(x3, wt, b, 2, 1, 1)
    assert out3.dim() == 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [3, 7, 4])
def test_batch_zero(k, dtype, layout, device):
    x, wt, b = _make(0, 3, 2, 9, 10, k, dtype, device, True, layout)
    xa, wa = x.clone().requires_grad_(), wt.clone().requires_grad_()
    out = fastconv.depthwise_conv2d(xa, wa, b, 1, k // 2, 1)
    ref = F.conv2d(x.double(), wt.double(), b.double(), 1, k // 2, 1, groups=3)
    assert out.shape == ref.shape and out.shape[0] == 0 and out.dtype == dtype
    out.sum().backward()
    assert xa.grad.shape == x.shape
    assert wa.grad.shape == wt.shape
    assert torch.equal(wa.grad, torch.zeros_like(wt))
    gw = OPS._depthwise_conv2d_grad_weight(
        torch.empty(out.shape, dtype=dtype, device=device), x, list(wt.shape), [1, 1],
        [k // 2, k // 2], [1, 1])
    assert gw.shape == wt.shape and torch.equal(gw, torch.zeros_like(gw))
    gi = OPS._depthwise_conv2d_grad_input(
        torch.empty(out.shape, dtype=dtype, device=device), wt, list(x.shape), [1, 1],
        [k // 2, k // 2], [1, 1])
    assert gi.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype, device):
    base = torch.randn(2, 5, 10, 26, dtype=torch.float64, device=device).to(dtype)
    x = base[..., ::2]  # strided along W
    assert not x.is_contiguous()
    wt = torch.randn(10, 1, 3, 3, dtype=torch.float64, device=device).to(dtype)
    _check_against_both(x, wt, None, 1, 1, 1)
    xp = torch.randn(2, 11, 5, 9, dtype=torch.float64, device=device).to(dtype).transpose(1, 2)
    wp = torch.randn(10, 1, 1, 10, dtype=torch.float64, device=device).to(dtype)[..., ::2]
    bp = torch.randn(20, dtype=torch.float64, device=device).to(dtype)[::2]
    assert not xp.is_contiguous() and not wp.is_contiguous() and not bp.is_contiguous()
    _check_against_both(xp, wp, bp, (2, 1), (0, 2), 1)


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_weight_gives_channels_last_output(device):
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64, device=device)
    w = torch.randn(8, 1, 3, 3, dtype=torch.float64, device=device)
    w_cl = w.contiguous(memory_format=torch.channels_last)
    out = OPS.depthwise_conv2d(x, w_cl, None, [1, 1], [1, 1], [1, 1])
    expect = F.conv2d(x, w_cl, None, 1, 1, 1, groups=4)
    assert out.stride() == expect.stride()
    assert_close(out, expect)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_finite_values_stay_where_torch_puts_them(layout, device):
    # inf in the last input column: with stride 2 (and W even) no window reads it; with
    # stride 1 only the last kernel column does. Lanes past a row's end must not turn it into
    # 0 * inf = nan in the other taps' weight gradients.
    for stride, w in ((2, 18), (1, 21), (1, 37)):
        x = torch.randn(2, 3, 7, w, dtype=torch.float64, device=device)
        x[:, :, 3, -1] = float("inf")
        x = _layout(x, layout)
        wt = torch.randn(6, 1, 3, 3, dtype=torch.float64, device=device)
        out = OPS.depthwise_conv2d(x, wt, None, [stride, stride], [0, 0], [1, 1])
        g = torch.rand(out.shape, dtype=torch.float64, device=device) + 0.5
        gw = OPS._depthwise_conv2d_grad_weight(g, x, list(wt.shape), [stride] * 2, [0, 0], [1, 1])
        _, _, t_gw, _ = _truth(_torch_dw, x, wt, None, g, stride=stride, padding=0, dilation=1)
        assert torch.equal(torch.isfinite(gw), torch.isfinite(t_gw))
        assert_close(gw, t_gw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_deterministic_across_thread_counts(layout, device):
    x, wt, _ = _make(4, 6, 2, 20, 20, 3, torch.float32, device, False, layout)
    g = _layout(torch.randn(4, 12, 20, 20, device=device), layout)
    args = ([1, 1], [1, 1], [1, 1])
    threads = torch.get_num_threads()
    try:
        results = []
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            results.append((OPS._depthwise_conv2d_grad_weight(g, x, list(wt.shape), *args),
                            OPS._depthwise_conv2d_grad_input(g, wt, list(x.shape), *args),
                            OPS.depthwise_conv2d(x, wt, None, *args)))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert torch.equal(a, b)


GRADCHECK_CASES = [
    # (N, C, m, H, W, k, stride, padding, dilation, layout)
    (2, 2, 1, 6, 7, 3, 1, 1, 1, "nchw"),
    (1, 2, 2, 7, 6, 3, 2, 1, 1, "channels_last"),
    (1, 3, 2, 6, 8, (2, 3), (1, 2), (1, 0), (2, 1), "nchw"),
    (2, 2, 1, 9, 9, 5, 1, 2, 1, "channels_last"),
    (1, 1, 3, 8, 8, 7, 1, 3, 1, "nchw"),
    (1, 2, 1, 8, 9, 4, 3, 2, 1, "channels_last"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=str)
def test_gradcheck(case, device):
    n, c, m, h, w, k, stride, padding, dilation, layout = case
    x, wt, b = _make(n, c, m, h, w, k, torch.float64, device, True, layout)
    x.requires_grad_()
    wt.requires_grad_()
    b.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, wt, b: fastconv.depthwise_conv2d(x, wt, b, stride, padding, dilation),
        (x, wt, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad, layout, device):
    x, wt, b = _make(2, 3, 2, 8, 9, 3, torch.float32, device, True, layout)
    args = ([2, 1], [1, 1], [1, 2])
    fwd_in = (x.clone().requires_grad_(requires_grad), wt.clone().requires_grad_(requires_grad),
              b.clone().requires_grad_(requires_grad), *args)
    torch.library.opcheck(OPS.depthwise_conv2d.default, fwd_in)
    torch.library.opcheck(OPS.depthwise_conv2d.default, (x, wt, None, *args))
    out = OPS.depthwise_conv2d(x, wt, None, *args)
    g = _layout(torch.randn(out.shape, device=device), layout)
    # with requires_grad, opcheck differentiates the grad ops too (double backward)
    g, x, wt = (t.clone().requires_grad_(requires_grad) for t in (g, x, wt))
    torch.library.opcheck(OPS._depthwise_conv2d_grad_input.default,
                          (g, wt, list(x.shape), *args))
    torch.library.opcheck(OPS._depthwise_conv2d_grad_weight.default,
                          (g, x, list(wt.shape), *args))
    for bias_grad in (False, True):
        torch.library.opcheck(OPS._depthwise_conv2d_backward.default,
                              (g, x, wt, *args, bias_grad))
    # the fused CPU kernels' shapes (float32, stride 1, C % 16 == 0, 'same' padding)
    x, wt, _ = _make(2, 16, 1, 7, 9, 3, torch.float32, device, False, layout)
    g = _layout(torch.randn(2, 16, 7, 9, device=device), layout)
    g, x, wt = (t.clone().requires_grad_(requires_grad) for t in (g, x, wt))
    torch.library.opcheck(OPS._depthwise_conv2d_backward.default,
                          (g, x, wt, [1, 1], [1, 1], [1, 1], True))


# ----------------------------------------------------------------------------------------------
# error paths: the public function and the op (C++ on CPU) reject the same calls
# ----------------------------------------------------------------------------------------------


def _call_functional(x, w, b=None, stride=1, padding=0, dilation=1):
    return fastconv.depthwise_conv2d(x, w, b, stride, padding, dilation)


def _call_op(x, w, b=None, stride=1, padding=0, dilation=1):
    return OPS.depthwise_conv2d(x, w, b, _pair(stride), _pair(padding), _pair(dilation))


X = torch.randn(2, 3, 8, 8)
W = torch.randn(6, 1, 3, 3)

ERROR_CASES = [
    ("weight_dim1", dict(x=X, w=torch.randn(6, 2, 3, 3)), ValueError,
     r"expected weight to be a 4-D tensor \(C \* multiplier, 1, kH, kW\)"),
    ("weight_not_multiple", dict(x=X, w=torch.randn(4, 1, 3, 3)), ValueError,
     r"weight.size\(0\) to be a positive multiple of the input channels \(3\)"),
    ("weight_3d", dict(x=X, w=torch.randn(6, 3, 3)), ValueError,
     r"expected weight to be a 4-D tensor"),
    ("dtype_mismatch", dict(x=X, w=W.double()), RuntimeError,
     r"expected weight to have the same dtype as input"),
    ("int_dtype", dict(x=X.to(torch.int32), w=W.to(torch.int32)), TypeError,
     r"expected input to have dtype float32, float64 or bfloat16 on cpu, but got torch.int32"),
    ("float16_cpu", dict(x=X.half(), w=W.half()), TypeError,
     r"expected input to have dtype float32, float64 or bfloat16 on cpu, but got torch.float16"),
    ("bias_shape", dict(x=X, w=W, b=torch.randn(3)), ValueError,
     r"expected bias to be a 1-D tensor of size out_channels \(6\)"),
    ("bias_2d", dict(x=X, w=W, b=torch.randn(6, 1)), ValueError,
     r"expected bias to be a 1-D tensor"),
    ("negative_padding", dict(x=X, w=W, padding=(-1, 0)), ValueError,
     r"expected padding to be non-negative"),
    ("zero_stride", dict(x=X, w=W, stride=(1, 0)), ValueError,
     r"expected stride to be positive"),
    ("zero_dilation", dict(x=X, w=W, dilation=0), ValueError,
     r"expected dilation to be positive"),
    ("kernel_too_big", dict(x=X, w=torch.randn(3, 1, 11, 3), padding=1), ValueError,
     r"expected the \(dilated\) kernel size \(11 x 3\) to be at most the padded input size "
     r"\(10 x 10\)"),
    ("dilated_kernel_too_big", dict(x=X, w=W, dilation=(1, 5)), ValueError,
     r"\(dilated\) kernel size \(3 x 11\)"),
]


@pytest.mark.parametrize("call", [_call_functional, _call_op], ids=["functional", "op"])
@pytest.mark.parametrize("name,kwargs,exc,match", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors(name, kwargs, exc, match, call):
    with pytest.raises(exc, match=match):
        call(**kwargs)


@pytest.mark.parametrize("shape", [(8, 8), (1, 2, 3, 8, 8)])
def test_error_input_dim(shape):
    x = torch.randn(*shape)
    with pytest.raises(ValueError, match=r"expected input to be a 3-D \(C, H, W\) or 4-D"):
        fastconv.depthwise_conv2d(x, W)
    with pytest.raises(ValueError, match=r"expected input to be a 4-D tensor \(N, C, H, W\)"):
        _call_op(x, W)


def test_backward_op_errors():
    g = torch.randn(2, 6, 8, 8)
    with pytest.raises(ValueError, match=r"expected grad_output of shape \[2, 6, 8, 8\], but got"):
        OPS._depthwise_conv2d_grad_input(g[:, :5], W, [2, 3, 8, 8], [1, 1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match=r"expected grad_output of shape \[2, 6, 8, 8\], but got"):
        OPS._depthwise_conv2d_grad_weight(g[..., :7], X, [6, 1, 3, 3], [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match=r"expected weight to have the same dtype as grad_output"):
        OPS._depthwise_conv2d_grad_input(g, W.double(), [2, 3, 8, 8], [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match=r"expected input to have the same dtype as grad_output"):
        OPS._depthwise_conv2d_grad_weight(g, X.double(), [6, 1, 3, 3], [1, 1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match=r"weight.size\(0\) to be a positive multiple"):
        OPS._depthwise_conv2d_grad_weight(g, X, [5, 1, 3, 3], [1, 1], [1, 1], [1, 1])
    with pytest.raises(TypeError, match=r"expected grad_output to have dtype"):
        OPS._depthwise_conv2d_grad_input(g.half(), W.half(), [2, 3, 8, 8], [1, 1], [1, 1], [1, 1])


@pytest.mark.parametrize("call", ["op", "fake"])
def test_fused_backward_op_errors(call):
    g = torch.randn(2, 6, 8, 8)
    args = ([1, 1], [1, 1], [1, 1], False)

    def run(*a):
        if call == "fake":
            from torch._subclasses.fake_tensor import FakeTensorMode

            with FakeTensorMode() as mode:
                a = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in a]
                return OPS._depthwise_conv2d_backward(*a)
        return OPS._depthwise_conv2d_backward(*a)

    name = r"_depthwise_conv2d_backward: "
    with pytest.raises(ValueError, match=name + r"expected grad_output of shape \[2, 6, 8, 8\]"):
        run(g[:, :5], X, W, *args)
    with pytest.raises(RuntimeError, match=name + r"expected input to have the same dtype as"):
        run(g, X.double(), W, *args)
    with pytest.raises(RuntimeError, match=name + r"expected weight to have the same dtype as"):
        run(g, X, W.double(), *args)
    with pytest.raises(ValueError, match=name + r"expected weight.size\(0\) to be a positive"):
        run(g, X, W[:5], *args)
    with pytest.raises(TypeError, match=name + r"expected grad_output to have dtype"):
        run(g.half(), X.half(), W.half(), *args)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k", [3, 7])
def test_large_outputs_use_streaming_stores_correctly(k, layout):
    # outputs over 8 MiB take the streaming-store paths (NCHW plane copy, NHWC stores)
    x, wt, b = _make(3, 16, 1, 256, 256, k, torch.float32, "cpu", bias=True, layout=layout)
    assert x.numel() * 4 > 8 << 20
    xa = x.clone().requires_grad_()
    wa = wt.clone().requires_grad_()
    ba = b.clone().requires_grad_()
    out = fastconv.depthwise_conv2d(xa, wa, ba, padding=k // 2)
    g = torch.randn_like(out)
    out.backward(g)  # the fused backward op, streaming grad_input out
    x64 = x.double().requires_grad_()
    w64 = wt.double().requires_grad_()
    b64 = b.double().requires_grad_()
    ref = _torch_dw(x64, w64, b64, 1, k // 2, 1)
    ref.backward(g.double())
    assert_close(out, ref, torch.float32, reduction=k * k)
    assert_close(xa.grad, x64.grad, torch.float32, reduction=k * k)
    assert_close(wa.grad, w64.grad, torch.float32, reduction=out.numel() // out.shape[1])
    assert_close(ba.grad, b64.grad, torch.float32, reduction=out.numel() // out.shape[1])
    # the separate grad_input op streams too
    gi = OPS._depthwise_conv2d_grad_input(g, wt, list(x.shape), [1, 1], [k // 2] * 2, [1, 1])
    assert torch.equal(gi, xa.grad)


# (N, C, m, H, W, k, stride, padding, dilation): shapes whose last rows / columns (or every
# other one) no output reads
UNREAD_CASES = [
    (2, 4, 1, 12, 12, 3, 2, 0, 1),
    (2, 3, 2, 12, 14, 2, 3, 1, 1),
    (1, 16, 1, 12, 12, 3, 2, 0, 1),
    (1, 3, 1, 14, 17, 5, 3, 1, 1),
    (1, 4, 1, 12, 12, 3, 2, 0, 2),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", UNREAD_CASES,
                         ids=lambda c: "c{1}m{2}_{3}x{4}_k{5}_s{6}_p{7}_d{8}".format(*c))
def test_inputs_no_window_reads_do_not_reach_the_results(case, dtype, layout, device):
    """inf and NaN where no output window reads: torch's results stay finite there (grad_input
    0, grad_weight untouched), so a kernel that multiplies such cells by a zero grad_output
    (0 * inf = NaN) instead of skipping them fails."""
    n, c, m, h, w, k, s, p, d = case
    x, wt, b = _make(n, c, m, h, w, k, dtype, device, layout=layout)
    x = poison_unread(x, k, s, p, d)
    xa, wa, ba = (t.clone().requires_grad_() for t in (x, wt, b))
    out = fastconv.depthwise_conv2d(xa, wa, ba, stride=s, padding=p, dilation=d)
    g = torch.randn(out.shape, dtype=torch.float64, device=device).to(dtype)
    out.backward(g)
    t_out, t_gx, t_gw, t_gb = _truth(_torch_dw, x, wt, b, g, stride=s, padding=p, dilation=d)
    assert torch.isfinite(t_out).all() and torch.isfinite(t_gw).all()
    n_out = out.numel() // out.shape[-3]
    assert_close(out, t_out, dtype, reduction=k * k)
    assert_close(xa.grad, t_gx, dtype, reduction=k * k * m)
    assert_close(wa.grad, t_gw, dtype, reduction=n_out)
    assert_close(ba.grad, t_gb, dtype, reduction=n_out)
