"""fastconv.max_pool2d / torch.ops.fastconv.max_pool2d and _max_pool2d_backward on CPU.

Outputs and indices must equal torch's bit for bit (values compared as raw bits, so NaN
payloads and the sign of zero count), against torch.nn.functional.max_pool2d and against
fastconv.reference.max_pool2d; gradients against torch's autograd.
"""

import itertools
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import Snapshot, assert_close

import fastconv
from fastconv import reference
from fastconv._checks import suggest_memory_format

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
LAYOUTS = [torch.contiguous_format, torch.channels_last]
_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16}

KERNELS = [1, 2, 3, (2, 3), 5]
STRIDES = [None, 1, 2, (1, 2), (3, 4)]  # (3, 4): stride larger than most kernels
PADDINGS = [0, 1, (1, 0)]
DILATIONS = [1, 2, (2, 1)]


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _valid(kernel, padding):
    k, p = _pair(kernel), _pair(padding)
    return p[0] <= k[0] // 2 and p[1] <= k[1] // 2


def _configs():
    for k, s, p, d in itertools.product(KERNELS, STRIDES, PADDINGS, DILATIONS):
        if _valid(k, p):
            yield k, s, p, d


def same_bits(actual, expected):
    """Bitwise equality (NaN payloads and signed zeros included). bfloat16 NaNs only need to be
    NaNs: torch itself writes 0x7FC0 from its scalar loops and 0xFFFF from its vectorised
    channels_last loop for the same input NaN."""
    itype = _INT_VIEW[actual.dtype]
    if actual.dtype == torch.bfloat16:
        nan = torch.isnan(actual)
        if not torch.equal(nan, torch.isnan(expected)):
            return False
        actual = actual.masked_fill(nan, 0)
        expected = expected.masked_fill(nan, 0)
    return torch.equal(actual.view(itype), expected.view(itype))


def assert_same(actual, expected):
    """Equal shape, dtype, strides and values (see same_bits)."""
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    assert actual.stride() == expected.stride(), (actual.stride(), expected.stride())
    if actual.is_floating_point():
        assert same_bits(actual, expected), (actual, expected)
    else:
        assert torch.equal(actual, expected), (actual, expected)


def _tied(shape, dtype, fmt=torch.contiguous_format, low=-3, high=4):
    """Small integers: plenty of ties inside every window."""
    return torch.randint(low, high, shape).to(dtype).contiguous(memory_format=fmt)


def _check_forward(x, k, s, p, d, ceil_mode, check_reference=True):
    snap = Snapshot(x)
    ref, ref_idx = F.max_pool2d(x, k, s, p, d, ceil_mode, return_indices=True)
    out, idx = fastconv.max_pool2d(x, k, s, p, d, ceil_mode, return_indices=True)
    out_only = fastconv.max_pool2d(x, k, s, p, d, ceil_mode)
    assert_same(out, ref)
    assert_same(idx, ref_idx)
    assert_same(out_only, ref)
    if check_reference:
        r_out, r_idx = reference.max_pool2d(x, k, s, p, d, ceil_mode, return_indices=True)
        assert same_bits(out, r_out)
        assert torch.equal(idx, r_idx)
    snap.check()
    return out, idx


# --------------------------------------------------------------------------------------------
# forward: every argument combination, both layouts, all dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_all_arguments(dtype, layout, ceil_mode):
    x = _tied((2, 3, 9, 10), dtype, layout)
    for k, s, p, d in _configs():
        try:
            F.max_pool2d(x, k, s, p, d, ceil_mode)
        except RuntimeError:  # torch rejects it (empty output): covered by the error tests
            continue
        # the reference is dtype- and layout-agnostic tensor code (and slow): one pass covers it
        check_reference = dtype == torch.float64 and layout == torch.contiguous_format
        _check_forward(x, k, s, p, d, ceil_mode, check_reference=check_reference)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "k,s,p,d",
    [(3, 2, 1, 1), (2, 2, 0, 1), (3, 1, 1, 1), (3, 2, 1, 2), ((2, 3), (1, 2), (1, 0), (2, 1)),
     (5, 3, 2, 1), (2, 4, 1, 1)],
)
def test_forward_wide(dtype, layout, k, s, p, d):
    # rows of several 16-lane vectors plus a tail, and 64 + 6 channels for channels_last
    x = _tied((2, 70, 13, 75), dtype, layout, -50, 50)
    for ceil_mode in (False, True):
        _check_forward(x, k, s, p, d, ceil_mode, check_reference=False)
    y = torch.randn(1, 70, 13, 75, dtype=dtype).contiguous(memory_format=layout)
    _check_forward(y, k, s, p, d, True, check_reference=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ceil_mode_drops_last_window(dtype):
    # H = 5, k = 2, s = 2, p = 1: ceil gives 4 windows, but the last would start in the right
    # padding only, so torch (and fastconv) keep 3; W = 6 keeps the ceil window.
    x = torch.randn(2, 3, 5, 6, dtype=dtype)
    out, _idx = _check_forward(x, 2, 2, 1, 1, True)
    assert out.shape == (2, 3, 3, 4)
    assert fastconv.max_pool2d(x, 2, 2, 1, 1, False).shape == (2, 3, 3, 4)
    out, _ = _check_forward(x, 3, 2, 0, 1, True)
    assert out.shape == (2, 3, 2, 3)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_window_with_no_input_tap(layout):
    # dilation 3 with padding 1 on a 1-wide column: a window whose taps all fall outside the
    # input. torch returns -inf and the index its scan would have started at; so does fastconv.
    x = torch.randn(1, 2, 1, 5).contiguous(memory_format=layout)
    ref, ref_idx = F.max_pool2d(x, 2, 2, 1, 3, True, return_indices=True)
    out, idx = fastconv.max_pool2d(x, 2, 2, 1, 3, True, return_indices=True)
    assert_same(out, ref)
    assert_same(idx, ref_idx)
    assert torch.isinf(out).all()
    # Its gradient is dropped (README): torch's backward adds it at that index, which can lie
    # past the plane (a heap corruption there), so torch's backward is not run here. (With
    # padding at most half the kernel, a window reads nothing only where none of its row or
    # column of windows does.)
    x = torch.randn(1, 2, 3, 1, dtype=torch.float64).contiguous(memory_format=layout)
    args = ((1, 2), 1, (0, 1), (2, 2))  # every window's taps sit at columns -1 and 1
    xa = x.clone().requires_grad_()
    out = fastconv.max_pool2d(xa, *args)
    assert torch.isinf(out).all()
    out.backward(torch.randn_like(out))
    assert torch.equal(xa.grad, torch.zeros_like(x))


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_sizes_and_unbatched(dtype, layout):
    for n in (0, 1):
        x = torch.randn(n, 4, 7, 8, dtype=dtype).contiguous(memory_format=layout)
        ref, ref_idx = F.max_pool2d(x, 3, 2, 1, return_indices=True)
        out, idx = fastconv.max_pool2d(x, 3, 2, 1, return_indices=True)
        assert_same(out, ref)
        assert_same(idx, ref_idx)
        assert_same(fastconv.max_pool2d(x, 3, 2, 1), ref)
    x3 = torch.randn(4, 7, 8, dtype=dtype)
    ref, ref_idx = F.max_pool2d(x3, 3, 2, 1, return_indices=True)
    out, idx = fastconv.max_pool2d(x3, 3, 2, 1, return_indices=True)
    assert_same(out, ref)
    assert_same(idx, ref_idx)
    assert_same(fastconv.max_pool2d(x3, 3, 2, 1), ref)
    _r_out, r_idx = reference.max_pool2d(x3, 3, 2, 1, return_indices=True)
    assert torch.equal(idx, r_idx)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype):
    base = torch.randn(3, 6, 20, 22, dtype=dtype)
    views = [
        base[:, ::2, 1::2, ::2],                      # strided slices
        base.permute(0, 1, 3, 2),                     # transposed plane
        base.permute(1, 0, 2, 3),                     # batch and channels swapped
        base.contiguous(memory_format=torch.channels_last)[:, :, 2:17, 3:],  # sliced NHWC
    ]
    for x in views:
        assert not x.is_contiguous()
        _check_forward(x, 3, 2, 1, 1, False, check_reference=False)
        _check_forward(x, (2, 3), 1, (1, 0), 2, True)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_channels_last_output_format(layout):
    for shape in [(2, 8, 9, 9), (2, 1, 9, 9), (2, 8, 2, 9), (1, 8, 9, 9)]:
        x = torch.randn(shape).contiguous(memory_format=layout)
        ref, ref_idx = F.max_pool2d(x, 2, 2, return_indices=True)
        for mode in ("full", "compact"):
            out, idx = torch.ops.fastconv.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False, mode)
            assert out.stride() == ref.stride()
            assert idx.stride() == ref_idx.stride()


# --------------------------------------------------------------------------------------------
# NaN, ties, infinities
# --------------------------------------------------------------------------------------------


def _nan_with_payload(dtype, payload):
    """A quiet NaN whose mantissa carries `payload`, so the test sees which NaN won."""
    if dtype == torch.float32:
        bits = torch.tensor([0x7FC00000 | payload], dtype=torch.int32)
        return bits.view(torch.float32)[0]
    bits = torch.tensor([0x7FF8000000000000 | payload], dtype=torch.int64)
    return bits.view(torch.float64)[0]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_propagation(dtype, layout):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 66, 11, 37, generator=g, dtype=dtype)
    # scattered NaNs: single and several per window
    mask = torch.rand(x.shape, generator=g) < 0.08
    if dtype == torch.bfloat16:
        x[mask] = float("nan")
    else:  # distinct payloads: the LAST NaN in row-major window order must win
        flat = x.view(-1)
        for n, pos in enumerate(mask.view(-1).nonzero().flatten().tolist()):
            flat[pos] = _nan_with_payload(dtype, n % 1000 + 1)
    x[0, 1] = float("nan")   # an all-NaN plane
    x = x.contiguous(memory_format=layout)
    for k, s, p, d in [(3, 2, 1, 1), (2, 2, 0, 1), (3, 1, 1, 1), ((2, 3), (1, 2), (1, 0), (2, 1)),
                       (5, 4, 2, 1)]:
        for ceil_mode in (False, True):
            _check_forward(x, k, s, p, d, ceil_mode, check_reference=False)
    _check_forward(x[:, :5, :7, :9], 3, 2, 1, 1, True)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_signed_zero_and_infinities(dtype, layout):
    # constant windows (first tap wins), +0 / -0 ties (the sign of the first one is kept),
    # windows of -inf only (value -inf, index of the first tap), +inf.
    x = torch.zeros(2, 67, 9, 35, dtype=dtype)
    x[0, :, :, ::3] = -0.0
    x[0, :, 1::4] = -0.0
    x[1] = -float("inf")
    x[1, :, 4, 7] = float("inf")
    x[1, 3, 2:5] = 1.0  # constant ties
    x = x.contiguous(memory_format=layout)
    for k, s, p, d in [(3, 2, 1, 1), (2, 2, 0, 1), (3, 1, 1, 1), (3, 2, 1, 2)]:
        for ceil_mode in (False, True):
            _check_forward(x, k, s, p, d, ceil_mode, check_reference=False)
    _check_forward(x[:, :4, :7, :9], 3, 2, 1, 1, True)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------


def _grads(x, g, k, s, p, d, ceil_mode, return_indices):
    xt = x.detach().clone().requires_grad_()
    F.max_pool2d(xt, k, s, p, d, ceil_mode).backward(g)
    xf = x.detach().clone().requires_grad_()
    snap = Snapshot(xf, g)
    out = fastconv.max_pool2d(xf, k, s, p, d, ceil_mode, return_indices=return_indices)
    (out[0] if return_indices else out).backward(g)
    snap.check()
    return xt.grad, xf.grad


def _exact_grad(x, g, k, s, p, d, ceil_mode):
    """Float64 sum of grad_output over torch's indices: the ground truth for bfloat16."""
    _, idx = F.max_pool2d(x.double(), k, s, p, d, ceil_mode, return_indices=True)
    n, c, h, w = x.shape
    flat = torch.zeros(n, c, h * w, dtype=torch.float64)
    flat.scatter_add_(2, idx.reshape(n, c, -1), g.double().reshape(n, c, -1))
    return flat.view(n, c, h, w)


def _check_grad(x, k, s, p, d, ceil_mode):
    ref_out = F.max_pool2d(x, k, s, p, d, ceil_mode)
    g = torch.randn(ref_out.shape, dtype=x.dtype).contiguous(memory_format=suggest_memory_format(x))
    for return_indices in (False, True):  # compact indices, then full ones
        ref, got = _grads(x, g, k, s, p, d, ceil_mode, return_indices)
        assert got.stride() == ref.stride()
        if x.dtype == torch.bfloat16:  # torch accumulates in bfloat16, fastconv in float32
            exact = _exact_grad(x, g, k, s, p, d, ceil_mode)
            n_terms = 4
            assert_close(got, exact, dtype=torch.bfloat16, reduction=n_terms)
            assert_close(ref, exact, dtype=torch.bfloat16, reduction=n_terms * 4)
        else:
            assert_close(got, ref)


# kernel 1..5, stride None / smaller / larger than the kernel, both paddings, dilations
GRAD_CONFIGS = [
    (1, None, 0, 1), (2, None, 0, 1), (3, 2, 1, 1), (3, 1, 1, 1), (2, 1, 1, 2),
    ((2, 3), (1, 2), (1, 0), (2, 1)), (5, (3, 4), 2, 1), (3, (3, 4), 1, 2), (5, 2, (1, 0), (2, 1)),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_matches_torch(dtype, layout):
    x = _tied((2, 3, 9, 10), dtype, layout)  # ties: the gradient goes to the first max
    for k, s, p, d in GRAD_CONFIGS:
        for ceil_mode in (False, True):
            try:
                F.max_pool2d(x, k, s, p, d, ceil_mode)
            except RuntimeError:
                continue
            _check_grad(x, k, s, p, d, ceil_mode)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "k,s,p,d",
    [(3, 2, 1, 1), (3, 1, 1, 1), (2, 2, 0, 1), (5, 2, 2, 1), ((2, 3), (1, 2), (1, 0), (2, 1)),
     (3, 4, 1, 1)],
)
def test_backward_wide(dtype, layout, k, s, p, d):
    # overlapping windows (stride < kernel) over rows of several vectors and 70 channels
    x = _tied((2, 70, 13, 75), dtype, layout, -4, 4)
    for ceil_mode in (False, True):
        _check_grad(x, k, s, p, d, ceil_mode)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_nan_and_batch_zero(dtype, layout):
    x = torch.randn(2, 18, 11, 37, dtype=dtype)
    x[torch.rand(x.shape) < 0.1] = float("nan")
    x = x.contiguous(memory_format=layout)
    _check_grad(x, 3, 2, 1, 1, True)
    _check_grad(x, 2, 1, 0, 1, False)
    for n in (0, 1):
        x0 = torch.randn(n, 3, 6, 7, dtype=dtype).contiguous(memory_format=layout)
        x0.requires_grad_()
        fastconv.max_pool2d(x0, 3, 2, 1).sum().backward()
        xt = x0.detach().clone().requires_grad_()
        F.max_pool2d(xt, 3, 2, 1).sum().backward()
        assert x0.grad.shape == x0.shape
        assert x0.grad.stride() == xt.grad.stride()
        assert torch.equal(x0.grad, xt.grad)


def test_backward_op_with_given_indices():
    # the backward op on its own: full and compact indices of the same windows agree
    x = torch.randn(2, 5, 12, 13, dtype=torch.float64)
    args = ([3, 3], [2, 2], [1, 1], [1, 1], True)
    out, full = torch.ops.fastconv.max_pool2d(x, *args, "full")
    _, compact = torch.ops.fastconv.max_pool2d(x, *args, "compact")
    assert full.dtype == torch.int64 and compact.dtype == torch.uint8
    g = torch.randn_like(out)
    snap = Snapshot(g, x, full, compact)
    a = torch.ops.fastconv._max_pool2d_backward(g, x, full, *args)
    b = torch.ops.fastconv._max_pool2d_backward(g, x, compact, *args)
    snap.check()
    assert torch.equal(a, b)
    assert torch.equal(a, _exact_grad(x, g, 3, 2, 1, 1, True))
    # more than 256 taps: "compact" falls back to int64 positions
    xb = torch.randn(1, 3, 20, 21)
    big_args = ([17, 16], [1, 2], [0, 0], [1, 1], False)
    out, big = torch.ops.fastconv.max_pool2d(xb, *big_args, "compact")
    _, big_full = torch.ops.fastconv.max_pool2d(xb, *big_args, "full")
    assert big.dtype == torch.int64
    assert torch.equal(big, big_full)
    assert torch.equal(big, F.max_pool2d(xb, [17, 16], [1, 2], return_indices=True)[1])
    g = torch.randn_like(out)
    assert_close(torch.ops.fastconv._max_pool2d_backward(g, xb, big, *big_args),
                 _exact_grad(xb, g, [17, 16], [1, 2], 0, 1, False), dtype=torch.float32)


def test_gradcheck():
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64, requires_grad=True)  # no ties
    for args in [(3, 2, 1, 1, False), (2, 1, 0, 1, True), ((2, 3), (1, 2), (1, 0), 2, True)]:
        assert torch.autograd.gradcheck(lambda t, a=args: fastconv.max_pool2d(t, *a), (x,))
        assert torch.autograd.gradcheck(
            lambda t, a=args: fastconv.max_pool2d(t, *a, return_indices=True)[0], (x,))
    xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fastconv.max_pool2d(t, 3, 2, 1), (xc,))


def test_backward_of_indices_none_raises():
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    out, idx = torch.ops.fastconv.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False, "none")
    assert idx.shape == (0,) and idx.dtype == torch.int64
    with pytest.raises(RuntimeError, match="indices='none'"):
        out.sum().backward()


# --------------------------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_opcheck(layout):
    args = ([3, 3], [2, 2], [1, 1], [1, 1], True)
    x = torch.randn(2, 3, 9, 8).contiguous(memory_format=layout)
    torch.library.opcheck(torch.ops.fastconv.max_pool2d.default, (x, *args, "none"))
    for mode in ("full", "compact"):
        torch.library.opcheck(torch.ops.fastconv.max_pool2d.default, (x, *args, mode))
        xg = x.clone().requires_grad_()
        torch.library.opcheck(torch.ops.fastconv.max_pool2d.default, (xg, *args, mode))
        out, idx = torch.ops.fastconv.max_pool2d(x, *args, mode)
        g = torch.randn_like(out)
        torch.library.opcheck(torch.ops.fastconv._max_pool2d_backward.default, (g, x, idx, *args))
        # differentiated itself (double backward)
        torch.library.opcheck(torch.ops.fastconv._max_pool2d_backward.default,
                              (g.clone().requires_grad_(), xg, idx, *args))


# --------------------------------------------------------------------------------------------
# errors: the public function and the op itself
# --------------------------------------------------------------------------------------------

def _op(x, kernel_size=(3, 3), stride=(2, 2), padding=(0, 0), dilation=(1, 1), ceil_mode=False,
        indices="full"):
    return torch.ops.fastconv.max_pool2d(x, list(kernel_size), list(stride), list(padding),
                                         list(dilation), ceil_mode, indices)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kernel_size": 3, "padding": 2}, "padding to be at most half of kernel_size"),
        ({"kernel_size": (2, 3), "padding": (1, 2)}, "padding to be at most half of kernel_size"),
        ({"kernel_size": 0}, "expected kernel_size to be positive"),
        ({"kernel_size": (3, 0)}, "expected kernel_size to be positive"),
        ({"kernel_size": 3, "stride": 0}, "expected stride to be positive"),
        ({"kernel_size": 3, "stride": (1, -1)}, "expected stride to be positive"),
        ({"kernel_size": 3, "dilation": 0}, "expected dilation to be positive"),
        ({"kernel_size": 3, "padding": -1}, "expected padding to be non-negative"),
        ({"kernel_size": 7}, "the output would be empty"),
        ({"kernel_size": 3, "dilation": 3}, "the output would be empty"),
        # torch takes these as C ints; 2**62 * (5 - 1) would overflow the size formula
        ({"kernel_size": (5, 1), "dilation": (2**62, 1)},
         r"expected dilation to be at most 2147483647 \(a C int, as in torch\)"),
        ({"kernel_size": 2**31}, "expected kernel_size to be at most 2147483647"),
        ({"kernel_size": 3, "stride": 2**31}, "expected stride to be at most 2147483647"),
    ],
)
def test_argument_errors(kwargs, match):
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(ValueError, match=match):
        fastconv.max_pool2d(x, **kwargs)
    k = _pair(kwargs["kernel_size"])
    op_kwargs = {"kernel_size": k}
    for name in ("stride", "padding", "dilation"):
        if name in kwargs:
            op_kwargs[name] = _pair(kwargs[name])
    with pytest.raises(ValueError, match=match):
        _op(x, **op_kwargs)


def test_input_errors():
    with pytest.raises(ValueError, match=r"3-D \(C, H, W\) or 4-D"):
        fastconv.max_pool2d(torch.randn(5, 5), 2)
    with pytest.raises(ValueError, match="expected input to be a 4-D tensor"):
        _op(torch.randn(2, 5, 5))
    with pytest.raises(ValueError, match="expected input to be a 4-D tensor"):
        _op(torch.randn(1, 1, 2, 5, 5))
    with pytest.raises(ValueError, match="non-zero channels, height and width"):
        _op(torch.randn(1, 0, 5, 5))
    dtype_msg = "expected input to have dtype float32, float64 or bfloat16 on cpu"
    for dtype in (torch.int64, torch.int32, torch.float16):
        x = torch.ones(1, 2, 5, 5, dtype=dtype)
        with pytest.raises(TypeError, match=dtype_msg):
            fastconv.max_pool2d(x, 2)
        with pytest.raises(TypeError, match=dtype_msg):
            _op(x)
    with pytest.raises(ValueError, match="expected indices to be one of 'none', 'full', 'compact'"):
        _op(torch.randn(1, 2, 5, 5), indices="bogus")


def _backward_error(g, x, idx, kernel=(3, 3), stride=(2, 2), padding=(1, 1)):
    """The CPU kernel's error; the fake kernel (meta tensors) must raise the same one."""
    args = (list(kernel), list(stride), list(padding), [1, 1], False)
    errors = []
    for dev in ("cpu", "meta"):
        try:
            torch.ops.fastconv._max_pool2d_backward(g.to(dev), x.to(dev), idx.to(dev), *args)
        except Exception as e:  # noqa: BLE001 - compared below
            errors.append((type(e), str(e)))
        else:
            errors.append(None)
    assert errors[0] is not None and errors[1] is not None
    assert errors[0][0] is errors[1][0]
    assert errors[0][1] == errors[1][1]
    return errors[0]


def test_backward_op_errors():
    x = torch.randn(1, 2, 5, 5)
    g = torch.randn(1, 2, 3, 3)
    good = torch.zeros(1, 2, 3, 3, dtype=torch.uint8)

    def check(err, typ, match):
        assert err[0] is typ or issubclass(err[0], typ), err
        assert re.search(match, err[1]), err

    check(_backward_error(g, x, good.to(torch.int32)), ValueError,
          r"dtype int64 \(or uint8 compact indices\), but got shape \[1, 2, 3, 3\] "
          r"and dtype torch.int32")
    check(_backward_error(g, x, good.to(torch.float32)), ValueError, "dtype torch.float32")
    check(_backward_error(g, x, good[:, :, :2]), ValueError,
          r"expected indices of shape \[1, 2, 3, 3\] .* but got shape \[1, 2, 2, 3\]")
    check(_backward_error(g, x, torch.zeros(0, dtype=torch.int64)), ValueError,
          r"but got shape \[0\].*indices='full' or 'compact'")
    check(_backward_error(g[:, :1], x, good), ValueError,
          r"expected grad_output of shape \[1, 2, 3, 3\], but got \[1, 1, 3, 3\]")
    # checks.h spells dtypes as _checks.py does (torch.float32), so the messages are equal
    check(_backward_error(g.double(), x, good), RuntimeError,
          r"expected grad_output to have the same dtype as input \(torch.float32\), but got "
          r"torch.float64")
    xb = torch.randn(1, 2, 20, 20)
    gb = torch.randn(1, 2, 4, 4)
    big_u8 = torch.zeros(1, 2, 4, 4, dtype=torch.uint8)
    check(_backward_error(gb, xb, big_u8, (17, 17), (1, 1), (0, 0)), ValueError,
          r"uint8 \(compact\) indices need a window of at most 256 taps, but kernel_size "
          r"is \[17, 17\]")
    # int64 indices with the same big window are fine
    out = torch.ops.fastconv._max_pool2d_backward(
        gb, xb, torch.zeros(1, 2, 4, 4, dtype=torch.int64), [17, 17], [1, 1], [0, 0], [1, 1], False)
    assert out.shape == xb.shape
    with pytest.raises(TypeError, match="expected input to have dtype"):
        torch.ops.fastconv._max_pool2d_backward(
            g.long(), x.long(), good, [3, 3], [2, 2], [1, 1], [1, 1], False)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_kernel_larger_than_the_input(layout):
    """A kernel_size far past the input (padding up to half of it, as torch allows): the
    kernels drop the taps that only ever see padding (checks.h), and must still give torch's
    values, indices and gradient."""
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    for args in (((1000, 2**20), 1, (500, 2**19 - 1)), ((7, 41), (2, 3), (3, 20), 1, True), ((9, 3), 1, (4, 1), (1, 2))):
        out, idx = fastconv.max_pool2d(x, *args, return_indices=True)
        ref, ref_idx = F.max_pool2d(x, *args, return_indices=True)
        assert torch.equal(out, ref) and torch.equal(idx, ref_idx)
        assert torch.isfinite(ref).all()  # every window reads the input (torch's backward is
        # only safe then)
        xa, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = torch.randn_like(ref)
        fastconv.max_pool2d(xa, *args).backward(g)
        F.max_pool2d(xt, *args).backward(g)
        torch.testing.assert_close(xa.grad, xt.grad, rtol=0, atol=0)


def test_compact_indices_follow_the_kernel_size_as_given():
    # The fake kernel does not see the input's size, so whether compact (uint8) indices fit
    # depends on kernel_size alone, even where the CPU kernel trims taps past a small input.
    x = torch.randn(1, 2, 4, 4)  # the CPU kernel keeps 12 x 12 of 17 x 17, 11 x 11 of 15 x 15
    for k, dtype in ((17, torch.int64), (15, torch.uint8)):
        args = ([k, k], [1, 1], [k // 2, k // 2], [1, 1], False, "compact")
        real = torch.ops.fastconv.max_pool2d(x, *args)
        fake = torch.ops.fastconv.max_pool2d(x.to("meta"), *args)
        assert real[1].dtype == fake[1].dtype == dtype
        assert real[1].shape == fake[1].shape
        g = torch.randn_like(real[0])
        grad = torch.ops.fastconv._max_pool2d_backward(g, x, real[1], *args[:5])
        xt = x.clone().requires_grad_()
        F.max_pool2d(xt, k, 1, k // 2).backward(g)
        assert torch.equal(grad, xt.grad)
