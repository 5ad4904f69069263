"""fastconv.conv2d and its two backward ops (algos im2col, direct, auto) against
torch.nn.functional.conv2d and fastconv.reference.conv2d."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastconv
from fastconv import reference

from conftest import DEVICES, Snapshot, assert_close, is_channels_last, poison_unread

ops = torch.ops.fastconv
ALGOS = ["im2col", "direct"]
ALGOS_AUTO = ["im2col", "direct", "auto"]

# (N, C, H, W, O, kH, kW, stride, padding, dilation, groups, bias); none is depthwise-shaped
# (groups == C > 1), so "auto" picks im2col or direct here.
CASES = [
    (2, 3, 7, 9, 4, 3, 3, (1, 1), (1, 1), (1, 1), 1, True),       # odd sizes, same-size output
    (1, 4, 8, 8, 6, 3, 2, (1, 1), (0, 1), (1, 1), 2, False),      # non-square kernel, groups 2
    (3, 8, 9, 7, 8, 3, 3, (2, 2), (1, 1), (1, 1), 4, True),       # stride 2, groups 4
    (2, 4, 11, 10, 4, 3, 3, (2, 3), (2, 0), (2, 1), 1, True),     # mixed stride / dilation
    (2, 6, 6, 6, 4, 1, 1, (1, 1), (0, 0), (1, 1), 2, True),       # 1x1 pointwise, grouped
    (2, 5, 7, 6, 3, 1, 1, (2, 1), (1, 0), (1, 1), 1, False),      # 1x1 with stride and padding
    (1, 3, 9, 8, 2, 2, 2, (3, 3), (0, 0), (1, 1), 1, True),       # stride > kernel: skipped rows
    (2, 2, 5, 5, 3, 5, 5, (1, 1), (2, 2), (1, 1), 1, True),       # kernel == input size
    (1, 3, 6, 7, 5, 3, 3, (1, 2), (3, 2), (2, 3), 1, True),       # padding > kernel half
    (2, 3, 1, 1, 4, 1, 1, (1, 1), (2, 1), (1, 1), 1, True),       # 1x1 input, big padding
    (9, 2, 3, 3, 3, 2, 2, (1, 1), (0, 0), (1, 1), 1, True),       # many small images (batched GEMM)
    (5, 6, 4, 4, 4, 1, 1, (1, 1), (0, 0), (1, 1), 2, True),       # batched 1x1, grouped
    (1, 2, 12, 5, 2, 4, 1, (1, 1), (1, 0), (3, 1), 1, False),     # tall dilated kernel, batch 1
]


def _ids(case):
    n, c, h, w, o, kh, kw, s, p, d, g, b = case
    return f"n{n}c{c}{h}x{w}o{o}k{kh}x{kw}s{s[0]}{s[1]}p{p[0]}{p[1]}d{d[0]}{d[1]}g{g}{'b' if b else ''}"


def _make(case, dtype=torch.float64, device="cpu", requires_grad=False):
    n, c, h, w, o, kh, kw, s, p, d, g, has_bias = case
    x = torch.randn(n, c, h, w, dtype=dtype, device=device, requires_grad=requires_grad)
    wt = torch.randn(o, c // g, kh, kw, dtype=dtype, device=device, requires_grad=requires_grad)
    b = torch.randn(o, dtype=dtype, device=device, requires_grad=requires_grad) if has_bias else None
    return x, wt, b, dict(stride=s, padding=p, dilation=d, groups=g)


def _grads(out_fn, tensors, grad_out):
    tensors = [t for t in tensors if t is not None]
    return torch.autograd.grad(out_fn(), tensors, grad_out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", ALGOS_AUTO)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_matches_torch_and_reference_float64(case, algo, device):
    x, w, b, kw = _make(case, device=device, requires_grad=True)
    snap = Snapshot(x, w, b)
    out = fastconv.conv2d(x, w, b, algo=algo, **kw)
    expected = F.conv2d(x, w, b, **kw)
    ref = reference.conv2d(x, w, b, **kw)
    assert out.shape == expected.shape
    assert_close(out, expected)
    assert_close(out, ref)

    go = torch.randn_like(expected)
    got = _grads(lambda: fastconv.conv2d(x, w, b, algo=algo, **kw), (x, w, b), go)
    exp = _grads(lambda: F.conv2d(x, w, b, **kw), (x, w, b), go)
    refg = _grads(lambda: reference.conv2d(x, w, b, **kw), (x, w, b), go)
    for g_, e_, r_ in zip(got, exp, refg):
        assert g_.shape == e_.shape
        assert_close(g_, e_)
        assert_close(g_, r_)
    snap.check()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", ALGOS)
def test_backward_ops_directly(algo, device):
    """The two grad ops called on their own, against torch.nn.grad."""
    x, w, _, kw = _make(CASES[3], device=device)
    s, p, d, g = kw["stride"], kw["padding"], kw["dilation"], kw["groups"]
    go = torch.randn_like(F.conv2d(x, w, None, **kw))
    snap = Snapshot(go, x, w)
    gi = ops._conv2d_grad_input(go, w, list(x.shape), s, p, d, g, algo)
    gw = ops._conv2d_grad_weight(go, x, list(w.shape), s, p, d, g, algo)
    assert_close(gi, torch.nn.grad.conv2d_input(x.shape, w, go, s, p, d, g))
    assert_close(gw, torch.nn.grad.conv2d_weight(x, w.shape, go, s, p, d, g))
    assert gw.is_contiguous()
    snap.check()


DTYPE_CASES = [CASES[0], CASES[2], CASES[4], CASES[10], CASES[12]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("algo", ALGOS_AUTO)
@pytest.mark.parametrize("case", DTYPE_CASES, ids=_ids)
def test_low_precision(case, algo, dtype, device):
    x, w, b, kw = _make(case, dtype=dtype, device=device, requires_grad=True)
    out = fastconv.conv2d(x, w, b, algo=algo, **kw)
    assert out.dtype == dtype
    # ground truth: float64 on the same (rounded) values
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    exp = F.conv2d(x64, w64, b64, **kw)
    n, c, h, wd, o, kh, kwid = case[:7]
    g = kw["groups"]
    assert_close(out, exp, dtype=dtype, reduction=c // g * kh * kwid)

    go = torch.randn_like(exp)
    got = _grads(lambda: fastconv.conv2d(x, w, b, algo=algo, **kw), (x, w, b), go.to(dtype))
    ref = _grads(lambda: F.conv2d(x64, w64, b64, **kw), (x64, w64, b64), go.to(dtype).double())
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert_close(got[0], ref[0], dtype=dtype, reduction=o // g * kh * kwid)
    assert_close(got[1], ref[1], dtype=dtype, reduction=n * exp.shape[2] * exp.shape[3])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", ALGOS_AUTO)
@pytest.mark.parametrize(
    "kernel,padding,dilation",
    [
        ((3, 3), "same", 1),
        ((2, 4), "same", 1),      # even kernels: asymmetric padding (extra row / column at the end)
        ((4, 3), "same", (1, 2)),
        ((3, 2), "same", (2, 3)),
        ((3, 3), "valid", 1),
        ((3, 2), 2, 1),
        ((3, 2), (1, 2), (2, 1)),
        ((2, 2), [0, 1], 1),
    ],
)
def test_padding_forms(kernel, padding, dilation, algo, device):
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(6, 4, *kernel, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, device=device)
    out = fastconv.conv2d(x, w, b, padding=padding, dilation=dilation, algo=algo)
    exp = F.conv2d(x, w, b, padding=padding, dilation=dilation)
    assert out.shape == exp.shape
    assert_close(out, exp)
    assert_close(out, reference.conv2d(x, w, b, padding=padding, dilation=dilation))
    go = torch.randn_like(exp)
    got = torch.autograd.grad(out, (x, w), go)
    ref = torch.autograd.grad(exp, (x, w), go)
    for a, e in zip(got, ref):
        assert_close(a, e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", ALGOS_AUTO)
def test_batch_zero(algo, device):
    x = torch.randn(0, 4, 6, 5, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
    out = fastconv.conv2d(x, w, b, stride=2, padding=1, groups=2, algo=algo)
    exp = F.conv2d(x, w, b, stride=2, padding=1, groups=2)
    assert out.shape == exp.shape == (0, 6, 3, 3)
    gx, gw, gb = torch.autograd.grad(out.sum() + (w * 0).sum(), (x, w, b), allow_unused=True)
    assert gx.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(w))
    assert gb is None or torch.equal(gb, torch.zeros_like(b))
    go = torch.empty(0, 6, 3, 3, dtype=torch.float64, device=device)
    gw2 = ops._conv2d_grad_weight(go, x.detach(), list(w.shape), [2, 2], [1, 1], [1, 1], 2, algo)
    assert torch.equal(gw2, torch.zeros_like(w)) and gw2.is_contiguous()
    gx2 = ops._conv2d_grad_input(go, w.detach(), list(x.shape), [2, 2], [1, 1], [1, 1], 2, algo)
    assert gx2.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", ALGOS_AUTO)
def test_unbatched_input(algo, device):
    x = torch.randn(3, 8, 7, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(5, 3, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    out = fastconv.conv2d(x, w, None, padding=(1, 0), algo=algo)
    exp = F.conv2d(x, w, None, padding=(1, 0))
    assert out.shape == exp.shape and out.dim() == 3
    assert_close(out, exp)
    go = torch.randn_like(exp)
    for a, e in zip(torch.autograd.grad(out, (x, w), go), torch.autograd.grad(exp, (x, w), go)):
        assert_close(a, e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", ALGOS_AUTO)
def test_non_contiguous_input(algo, device):
    base = torch.randn(2, 6, 9, 16, dtype=torch.float64, device=device)
    x = base[:, ::2, :, ::2]  # strided view of channels and columns
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, device=device).transpose(2, 3)
    assert not x.is_contiguous() and not w.is_contiguous()
    x.requires_grad_()
    w.requires_grad_()
    snap = Snapshot(base, x, w)
    out = fastconv.conv2d(x, w, None, padding=1, algo=algo)
    exp = F.conv2d(x, w, None, padding=1)
    assert_close(out, exp)
    go = torch.randn_like(exp).transpose(2, 3).contiguous().transpose(2, 3)  # strided grad
    for a, e in zip(torch.autograd.grad(out, (x, w), go), torch.autograd.grad(exp, (x, w), go)):
        assert_close(a, e)
    snap.check()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", ALGOS_AUTO)
@pytest.mark.parametrize("layout", ["input", "weight", "both"])
def test_channels_last(layout, algo, device):
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, device=device)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, device=device)
    b = torch.randn(6, dtype=torch.float64, device=device)
    if layout in ("input", "both"):
        x = x.contiguous(memory_format=torch.channels_last)
    if layout in ("weight", "both"):
        w = w.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w.requires_grad_()
    snap = Snapshot(x, w, b)
    out = fastconv.conv2d(x, w, b, padding=1, groups=2, algo=algo)
    exp = F.conv2d(x, w, b, padding=1, groups=2)
    assert is_channels_last(exp)
    assert is_channels_last(out) == is_channels_last(exp)
    assert out.stride() == exp.stride()
    assert_close(out, exp)
    go = torch.randn_like(exp)
    gi = ops._conv2d_grad_input(go, w.detach(), list(x.shape), [1, 1], [1, 1], [1, 1], 2, algo)
    gw = ops._conv2d_grad_weight(go, x.detach(), list(w.shape), [1, 1], [1, 1], [1, 1], 2, algo)
    assert is_channels_last(gi)  # conv_memory_format(grad_output, weight)
    assert gw.is_contiguous()
    ex, ew = torch.autograd.grad(exp, (x, w), go)
    assert_close(gi, ex)
    assert_close(gw, ew)
    snap.check()


@contextlib.contextmanager
def _num_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("threads", [1, 3, 5])
def test_thread_counts_split_rows(threads, algo):
    """Fewer images than threads: im2col splits images into row blocks (grad_input blocks
    recompute a halo of output rows); the result must not depend on the split."""
    x = torch.randn(1, 5, 13, 11, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, 3, 2, dtype=torch.float64, requires_grad=True)
    kw = dict(stride=(2, 1), padding=(2, 1), dilation=(2, 1))
    with _num_threads(threads):
        out = fastconv.conv2d(x, w, None, algo=algo, **kw)
        go = torch.randn_like(out)
        gx, gw = torch.autograd.grad(out, (x, w), go)
    exp = F.conv2d(x, w, None, **kw)
    ex, ew = torch.autograd.grad(exp, (x, w), go)
    assert_close(out, exp)
    assert_close(gx, ex)
    assert_close(gw, ew)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", [
    # K = 288 > one K chunk, 1440 columns > one N block, O not a multiple of the 8-row panel
    (2, 32, 40, 36, 10, 3, 3, (1, 1), (1, 1), (1, 1), 1, True),
    (1, 16, 50, 40, 8, 1, 1, (1, 1), (0, 0), (1, 1), 1, True),    # big 1x1: GEMM on the input
    (1, 2, 9, 700, 3, 3, 3, (1, 1), (1, 1), (1, 1), 1, False),    # wide: grad_input row blocks
    (3, 16, 6, 50, 12, 3, 3, (2, 1), (1, 1), (1, 1), 2, True),    # stride 2, grouped, K chunks
], ids=_ids)
def test_im2col_blocking(case, dtype):
    """Shapes past the GEMM's K-chunk / N-block sizes and the grad_input tile cap."""
    x, w, b, kw = _make(case, dtype=dtype, requires_grad=True)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    out = fastconv.conv2d(x, w, b, algo="im2col", **kw)
    exp = F.conv2d(x64, w64, b64, **kw)
    n, c, h, wd, o, kh, kwid = case[:7]
    g = kw["groups"]
    assert_close(out, exp, dtype=dtype, reduction=c // g * kh * kwid)
    go = torch.randn_like(exp)
    got = _grads(lambda: fastconv.conv2d(x, w, b, algo="im2col", **kw), (x, w, b), go.to(dtype))
    ref = _grads(lambda: F.conv2d(x64, w64, b64, **kw), (x64, w64, b64), go.to(dtype).double())
    assert_close(got[0], ref[0], dtype=dtype, reduction=o // g * kh * kwid)
    for a, e in zip(got[1:], ref[1:]):
        assert_close(a, e, dtype=dtype, reduction=n * exp.shape[2] * exp.shape[3])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", [
    (2, 16, 9, 11, 24, 3, 3, (1, 1), (1, 1), (1, 1), 1, True),     # 8-row tile (24 columns)
    (1, 64, 7, 7, 64, 3, 3, (1, 1), (1, 1), (1, 1), 1, False),     # 6-row tile (64 columns)
    (3, 32, 8, 8, 16, 3, 3, (2, 2), (1, 1), (1, 1), 1, False),     # strided: grad_input by phase
    (2, 20, 13, 7, 40, 5, 3, (2, 1), (2, 0), (1, 2), 1, True),     # strided, dilated, uneven
    (2, 17, 10, 9, 19, 1, 1, (2, 2), (0, 0), (1, 1), 1, True),     # strided 1x1
    (2, 16, 6, 6, 16, 1, 1, (3, 3), (0, 0), (1, 1), 1, False),     # inputs no tap reaches
    (2, 24, 15, 15, 56, 7, 7, (3, 2), (3, 3), (1, 1), 1, False),   # stem-like
    (2, 48, 12, 12, 100, 3, 3, (1, 1), (0, 0), (2, 2), 1, True),   # dilated, no padding
    (1, 16, 3, 4, 16, 3, 3, (1, 1), (4, 2), (1, 1), 1, True),      # padding past the kernel
    (1, 520, 5, 5, 500, 3, 3, (1, 1), (1, 1), (1, 1), 1, True),    # K and N past one block
    (2, 16, 12, 12, 704, 3, 3, (1, 1), (1, 1), (1, 1), 1, False),  # two 640-wide N blocks
    (3, 17, 5, 3, 50, 1, 1, (1, 1), (0, 0), (1, 1), 1, True),      # 1x1: one tap
    (1, 300, 3, 3, 530, 1, 1, (1, 1), (0, 0), (1, 1), 1, False),   # 1x1, K and N past a block
    (4, 257, 6, 5, 97, 1, 1, (1, 1), (0, 0), (1, 1), 1, True),
    (1, 80, 6, 6, 32, 3, 3, (1, 1), (1, 1), (1, 1), 1, True),      # forward tap by tap
    # <= 64 channels in the reduction: a panel's taps copied side by side (not for a strided
    # grad_input); fewer than 16 in the result: the forward on NCHW copies, grad_weight its
    # transpose (im2col rows as A), grad_input go times the weight as O x (C * taps) then a
    # col2im gather (NCHW copies where C * taps < 16)
    (2, 3, 20, 19, 32, 7, 7, (2, 2), (3, 3), (1, 1), 1, True),     # stem (grad_weight transposed)
    (2, 5, 30, 30, 40, 3, 3, (1, 1), (1, 1), (1, 1), 1, True),     # ... past one pixel block
    # panels of a row's inner pixels read x in place, tap row by tap row (a 5 x 64 row is
    # past one reduction block; 24 columns: a partial tile)
    (2, 64, 7, 21, 24, 5, 5, (1, 1), (2, 2), (1, 1), 1, True),
    (2, 3, 12, 40, 32, 3, 3, (2, 2), (1, 1), (1, 1), 1, False),
    (2, 16, 9, 12, 20, 3, 1, (1, 1), (1, 0), (1, 1), 1, True),      # kw = 1: grad_input too
    (2, 3, 9, 10, 100, 3, 3, (1, 1), (1, 1), (2, 1), 1, False),    # forward only, a tail panel
    (2, 32, 9, 9, 8, 3, 3, (1, 1), (1, 1), (1, 1), 1, False),      # grad_input / grad_weight
    (1, 15, 30, 30, 16, 3, 3, (1, 1), (2, 2), (2, 2), 1, True),    # every direction
    # grad_weight transposed over several 2048-pixel chunks (a short last one), summed in order
    (3, 3, 50, 47, 32, 3, 3, (1, 1), (1, 1), (1, 1), 1, False),    # stem 3x3
    (2, 24, 40, 41, 96, 1, 1, (1, 1), (0, 0), (1, 1), 1, True),    # 24 -> 96: pads less
    # 1x1 with results of >= 8 MiB: written once, with streaming stores (forward; grad_input
    # beside the zeros of the pixels a stride skips)
    (2, 32, 128, 128, 64, 1, 1, (1, 1), (0, 0), (1, 1), 1, False),
    (2, 64, 128, 128, 32, 1, 1, (2, 2), (0, 0), (1, 1), 1, False),
    (2, 32, 256, 256, 16, 1, 1, (1, 1), (0, 0), (1, 1), 1, False),  # 16 columns: 8 x 1 tiles
    # grad_input by col2im: strided and uneven; cols built a few images at a time (past 4 MiB)
    (3, 2, 23, 17, 24, 5, 3, (3, 2), (1, 2), (1, 1), 1, True),
    (5, 3, 64, 64, 40, 7, 7, (1, 1), (3, 3), (1, 1), 1, False),
    (2, 8, 9, 9, 16, 1, 2, (1, 1), (0, 0), (1, 1), 1, False),       # 16 (channel, tap) columns
    (2, 7, 9, 9, 16, 1, 2, (1, 1), (0, 0), (1, 1), 1, False),       # 14: NCHW copies
], ids=_ids)
def test_channels_last_gather_gemm(case, dtype):
    """One-group channels_last convolutions run on the (pixels x channels) matrices, the input
    rows gathered tap by tap, where the GEMM has >= 16 columns (the others on NCHW copies):
    forward and gradients against torch in float64, the layouts kept, and those results the
    same bits at 1-3 threads (each element is summed by one thread)."""
    x, w, b, kw = _make(case, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    n, c, h, wd, o, kh, kwid = case[:7]
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    b64 = b.double().requires_grad_() if b is not None else None
    exp = F.conv2d(x64, w64, b64, **kw)
    go = torch.randn(exp.shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    ref = torch.autograd.grad(exp, [t for t in (x64, w64, b64) if t is not None], go)
    got = {}
    for threads in (1, 2, 3):
        with _num_threads(threads):
            xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
            ba = b.clone().requires_grad_() if b is not None else None
            out = fastconv.conv2d(xa, wa, ba, **kw)
            grads = torch.autograd.grad(out, [t for t in (xa, wa, ba) if t is not None],
                                        go.to(dtype))
            got[threads] = (out,) + grads
    out, gx, gw = got[1][:3]
    assert is_channels_last(out) and is_channels_last(gx)
    assert_close(out, exp, dtype=dtype, reduction=c * kh * kwid)
    assert_close(gx, ref[0], dtype=dtype, reduction=o * kh * kwid)
    for a, e in zip(got[1][2:], ref[1:]):
        assert_close(a, e, dtype=dtype, reduction=n * exp.shape[2] * exp.shape[3])
    gathered = [o >= 16, c * kh * kwid >= 16, max(c, o) >= 16]  # out, grad_input, grad_weight
    for threads in (2, 3):
        for a, e, g in zip(got[threads], got[1], gathered):
            assert torch.equal(a, e) or not g


@pytest.mark.parametrize("case", [
    (1, 16, 4, 3, 16, 2, 2, (1, 1), (1, 1), (1, 1), 1, True),      # taps packed
    (1, 3, 7, 7, 16, 3, 3, (2, 2), (1, 1), (1, 1), 1, True),       # stem: transposed grad_weight
    (2, 2, 6, 5, 16, 3, 2, (1, 2), (2, 0), (2, 1), 1, False),      # grad_input by col2im
    (1, 16, 5, 6, 16, 1, 1, (2, 2), (0, 0), (1, 1), 1, True),      # strided 1x1, gi by phase
    (1, 65, 2, 3, 16, 1, 2, (1, 1), (0, 1), (1, 1), 1, False),     # tap by tap (K > 64)
], ids=_ids)
def test_channels_last_gather_gemm_gradcheck(case):
    """The channels_last GEMM path passes gradcheck and gradgradcheck (float64)."""
    x, w, b, kw = _make(case, requires_grad=True)
    x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    args = tuple(t for t in (x, w, b) if t is not None)

    def f(x, w, b=None):
        return fastconv.conv2d(x, w, b, **kw)

    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", [
    # small feature maps batched into tiles, many output channels: the threads split the output
    # channels of grad_weight; 45 images of 7x7 make three tiles, the last one partial
    (45, 4, 7, 7, 160, 3, 3, (1, 1), (1, 1), (1, 1), 1, False),
    (9, 12, 5, 6, 256, 1, 1, (1, 1), (0, 0), (1, 1), 2, True),    # 1x1, two groups
    (7, 6, 9, 8, 200, 3, 2, (2, 1), (1, 0), (1, 2), 1, True),     # strided, dilated
], ids=_ids)
def test_im2col_grad_weight_split_by_output_channels(case, dtype):
    """grad_weight of small feature maps with many output channels, at several thread counts:
    against torch in float64, and with the output channels split between 2..4 threads the same
    bits whatever the count."""
    x, w, b, kw = _make(case, dtype=dtype)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    exp = F.conv2d(x64, w64, None, **kw)
    go = torch.randn(exp.shape, dtype=torch.float64)
    ref = torch.autograd.grad(exp, w64, go)[0]
    got = {}
    for threads in (1, 2, 3, 4):
        with _num_threads(threads):
            got[threads] = ops._conv2d_grad_weight(
                go.to(dtype), x, list(w.shape), list(kw["stride"]), list(kw["padding"]),
                list(kw["dilation"]), kw["groups"], "im2col")
    n, c, h, wd, o, kh, kwid = case[:7]
    for threads, gw in got.items():
        assert_close(gw, ref, dtype=dtype, reduction=n * exp.shape[2] * exp.shape[3])
    assert torch.equal(got[2], got[3]) and torch.equal(got[2], got[4])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [
    (2, 3, 130, 20, 6, 3, 2, (1, 1), (1, 2), (2, 1), 1, True),    # several grid chunks, O % 4
    (1, 4, 40, 33, 6, 5, 3, (1, 1), (4, 0), (1, 2), 2, False),    # padding > kernel half
], ids=_ids)
def test_direct_blocking(case, dtype):
    """The stride-1 direct kernels cut the padded grid into chunks of rows and output planes
    into blocks of 4; shapes with several chunks and a partial block."""
    x, w, b, kw = _make(case, dtype=dtype, requires_grad=True)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    out = fastconv.conv2d(x, w, b, algo="direct", **kw)
    exp = F.conv2d(x64, w64, b64, **kw)
    n, c, h, wd, o, kh, kwid = case[:7]
    g = kw["groups"]
    assert_close(out, exp, dtype=dtype, reduction=c // g * kh * kwid)
    go = torch.randn_like(exp)
    got = _grads(lambda: fastconv.conv2d(x, w, b, algo="direct", **kw), (x, w, b), go.to(dtype))
    ref = _grads(lambda: F.conv2d(x64, w64, b64, **kw), (x64, w64, b64), go.to(dtype).double())
    assert_close(got[0], ref[0], dtype=dtype, reduction=o // g * kh * kwid)
    for a, e in zip(got[1:], ref[1:]):
        assert_close(a, e, dtype=dtype, reduction=n * exp.shape[2] * exp.shape[3])


@pytest.mark.parametrize("algo", ALGOS)
def test_explicit_algos_on_depthwise_shapes(algo):
    """im2col / direct handle depthwise shapes themselves (only "auto" reroutes them)."""
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    out = fastconv.conv2d(x, w, None, padding=1, groups=4, algo=algo)
    exp = F.conv2d(x, w, None, padding=1, groups=4)
    assert_close(out, exp)
    go = torch.randn_like(exp)
    for a, e in zip(torch.autograd.grad(out, (x, w), go), torch.autograd.grad(exp, (x, w), go)):
        assert_close(a, e)


def _outcome(fn):
    try:
        return "ok", fn()
    except RuntimeError as e:
        return "error", str(e).splitlines()[0]


def test_auto_routes_depthwise_shapes_to_depthwise_kernels():
    """algo="auto" on a depthwise shape must call the depthwise kernels: same result (or the
    same error) as calling the depthwise ops directly, for the forward and both grads."""
    x = torch.randn(2, 3, 8, 7)
    w = torch.randn(6, 1, 3, 3)
    b = torch.randn(6)
    args = ([2, 1], [1, 1], [1, 2])
    out_shape = [2, 6, 4, 5]
    go = torch.randn(out_shape)
    pairs = [
        (lambda: ops.conv2d(x, w, b, *args, 3, "auto"),
         lambda: ops.depthwise_conv2d(x, w, b, *args)),
        (lambda: ops._conv2d_grad_input(go, w, list(x.shape), *args, 3, "auto"),
         lambda: ops._depthwise_conv2d_grad_input(go, w, list(x.shape), *args)),
        (lambda: ops._conv2d_grad_weight(go, x, list(w.shape), *args, 3, "auto"),
         lambda: ops._depthwise_conv2d_grad_weight(go, x, list(w.shape), *args)),
    ]
    registered = torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastconv::depthwise_conv2d", "CPU")
    for via_conv, via_depthwise in pairs:
        got = _outcome(via_conv)
        if not registered:
            # Before the depthwise CPU kernels are registered, reaching them shows as their
            # placeholder error, which conv2d's own kernels never raise.
            assert got[0] == "error" and got[1].startswith("depthwise_conv2d:"), got
            continue
        want = _outcome(via_depthwise)
        assert got[0] == want[0], (got, want)
        if got[0] == "ok":
            assert torch.equal(got[1], want[1])
            assert got[1].stride() == want[1].stride()
        else:
            assert got[1] == want[1]


# ----------------------------------------------------------------------------------------------
# gradcheck, opcheck
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ALGOS_AUTO)
@pytest.mark.parametrize("case", [
    (2, 4, 5, 6, 4, 3, 2, (2, 1), (1, 1), (1, 2), 2, True),
    (1, 3, 5, 5, 2, 1, 1, (1, 1), (0, 0), (1, 1), 1, True),
], ids=_ids)
def test_gradcheck(case, algo):
    x, w, b, kw = _make(case, requires_grad=True)

    def fn(x, w, b):
        return ops.conv2d(x, w, b, list(kw["stride"]), list(kw["padding"]), list(kw["dilation"]),
                          kw["groups"], algo)

    assert torch.autograd.gradcheck(fn, (x, w, b))


OPCHECK_ARGS = ([2, 1], [1, 0], [1, 2], 2)


@pytest.mark.parametrize("algo", ALGOS_AUTO)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_conv2d(algo, requires_grad):
    x = torch.randn(2, 4, 6, 7, requires_grad=requires_grad)
    w = torch.randn(6, 2, 3, 2, requires_grad=requires_grad)
    b = torch.randn(6, requires_grad=requires_grad)
    torch.library.opcheck(ops.conv2d.default, (x, w, b, *OPCHECK_ARGS, algo))
    torch.library.opcheck(ops.conv2d.default, (x, w, None, *OPCHECK_ARGS, algo))


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_grad_ops(algo, requires_grad):
    x = torch.randn(2, 4, 6, 7, requires_grad=requires_grad)
    w = torch.randn(6, 2, 3, 2, requires_grad=requires_grad)
    go = torch.randn(2, 6, 3, 5, requires_grad=requires_grad)
    # with requires_grad, opcheck differentiates the grad ops too (double backward)
    torch.library.opcheck(ops._conv2d_grad_input.default,
                          (go, w, list(x.shape), *OPCHECK_ARGS, algo))
    torch.library.opcheck(ops._conv2d_grad_weight.default,
                          (go, x, list(w.shape), *OPCHECK_ARGS, algo))


# ----------------------------------------------------------------------------------------------
# error paths (checks.h / _checks.py): through fastconv.conv2d and torch.ops.fastconv directly
# ----------------------------------------------------------------------------------------------

X = torch.randn(2, 4, 6, 6)
W = torch.randn(6, 2, 3, 3)


def _op(x=X, w=W, b=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=2,
        algo="auto"):
    return ops.conv2d(x, w, b, list(stride), list(padding), list(dilation), groups, algo)


def _fn(x=X, w=W, b=None, stride=1, padding=0, dilation=1, groups=2, algo="auto"):
    return fastconv.conv2d(x, w, b, stride, padding, dilation, groups, algo=algo)


ERRORS = [
    # (kwargs, exception, message) checked through both entry points
    (dict(w=torch.randn(6, 2, 3)), ValueError, "expected weight to be a 4-D tensor"),
    (dict(groups=3), ValueError, r"expected input channels \(4\) to be divisible by groups \(3\)"),
    (dict(w=torch.randn(5, 2, 3, 3)), ValueError, r"out channels weight.size\(0\) \(5\) to be divisible"),
    (dict(w=torch.randn(6, 3, 3, 3)), ValueError, r"weight.size\(1\) \* groups == input channels"),
    (dict(groups=0), ValueError, "expected groups to be positive"),
    (dict(w=W.double()), RuntimeError, "expected weight to have the same dtype as input"),
    (dict(b=torch.randn(5)), ValueError, "expected bias to be a 1-D tensor of size out_channels"),
    (dict(b=torch.randn(6, 1)), ValueError, "expected bias to be a 1-D tensor of size out_channels"),
    (dict(b=torch.randn(6, dtype=torch.float64)), RuntimeError,
     "expected bias to have the same dtype as input"),
    (dict(w=torch.randn(6, 2, 7, 3)), ValueError, r"kernel size \(7 x 3\) to be at most the padded"),
    (dict(w=torch.randn(6, 2, 3, 3), dilation=(3, 1)), ValueError,
     r"kernel size \(7 x 3\) to be at most the padded"),
    (dict(dilation=(2**62, 1)), ValueError,
     r"dilated kernel height \(4611686018427387904 \* \(3 - 1\) \+ 1\) to fit in int64"),
    (dict(padding=(0, 2**62)), ValueError, r"expected the padded input width .* to fit in int64"),
    (dict(padding=(-1, 0)), ValueError, "expected padding to be non-negative"),
    (dict(stride=(0, 1)), ValueError, "expected stride to be positive"),
    (dict(stride=(1, -2)), ValueError, "expected stride to be positive"),
    (dict(dilation=(0, 1)), ValueError, "expected dilation to be positive"),
    (dict(x=torch.randn(2, 0, 6, 6), w=torch.randn(6, 0, 3, 3)), ValueError,
     "expected input to have non-zero channels"),
    (dict(x=X.to(torch.int32), w=W.to(torch.int32)), TypeError,
     "expected input to have dtype float32, float64 or bfloat16 on cpu"),
    (dict(x=X.to(torch.int64), w=W.to(torch.int64)), TypeError, "expected input to have dtype"),
    (dict(x=X.half(), w=W.half()), TypeError,
     "expected input to have dtype float32, float64 or bfloat16 on cpu, but got torch.float16"),
    (dict(algo="winograd"), ValueError, "expected algo to be one of 'auto', 'im2col', 'direct'"),
]


@pytest.mark.parametrize("kwargs,exc,match", ERRORS, ids=[e[2][:40] for e in ERRORS])
@pytest.mark.parametrize("entry", ["functional", "op"])
def test_errors(kwargs, exc, match, entry):
    kwargs = dict(kwargs)
    if entry == "functional":
        for key in ("stride", "padding", "dilation"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        with pytest.raises(exc, match=match):
            _fn(**kwargs)
    else:
        with pytest.raises(exc, match=match):
            _op(**kwargs)


def test_errors_input_rank():
    with pytest.raises(ValueError, match="expected input to be a 3-D .* or 4-D"):
        fastconv.conv2d(torch.randn(4, 6), W, groups=2)
    with pytest.raises(ValueError, match="expected input to be a 3-D .* or 4-D"):
        fastconv.conv2d(torch.randn(1, 2, 4, 6, 6), W, groups=2)
    with pytest.raises(ValueError, match=r"expected input to be a 4-D tensor \(N, C, H, W\)"):
        _op(x=torch.randn(4, 6, 6))
    with pytest.raises(ValueError, match=r"expected input to be a 4-D tensor \(N, C, H, W\)"):
        _op(x=torch.randn(1, 2, 4, 6, 6))


def test_errors_padding_and_pairs():
    with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
        fastconv.conv2d(X, W, groups=2, stride=2, padding="same")
    with pytest.raises(ValueError, match="expected padding to be an int, a tuple of 2 ints, 'same'"):
        fastconv.conv2d(X, W, groups=2, padding="full")
    with pytest.raises(ValueError, match="expected stride to have 2 elements"):
        fastconv.conv2d(X, W, groups=2, stride=(1, 1, 1))
    with pytest.raises(ValueError, match="expected stride to have 2 elements"):
        ops.conv2d(X, W, None, [1, 1, 1], [0, 0], [1, 1], 2, "auto")
    with pytest.raises(TypeError, match="expected groups to be an int"):
        fastconv.conv2d(X, W, groups=2.0)
    for bad in (True, 1.0, torch.tensor(1.0), torch.tensor(True)):
        with pytest.raises(TypeError, match="expected stride to be an int or a tuple of 2 ints"):
            fastconv.conv2d(X, W, groups=2, stride=bad)


def test_integer_arguments_as_torch_takes_them():
    # numpy integers and one-element integer tensors, like torch's int arguments
    np = pytest.importorskip("numpy")
    ref = F.conv2d(X, W, None, 2, 1, 1, 2)
    for kw in (dict(stride=np.int64(2), padding=(np.int32(1), 1), groups=np.int64(2)),
               dict(stride=torch.tensor(2), padding=torch.tensor(1), groups=torch.tensor(2))):
        torch.testing.assert_close(fastconv.conv2d(X, W, **kw), ref)
    torch.testing.assert_close(fastconv.max_pool2d(X, np.int64(3), torch.tensor(2)),
                               F.max_pool2d(X, 3, 2))
    with pytest.raises(ValueError, match="expected algo to be one of"):
        fastconv.conv2d(X, W, groups=2, algo="fft")


def test_errors_device_mismatch():
    # Only reachable on CPU through the fake kernel (a meta weight); the C++ check has the
    # same wording and is exercised by the CUDA suite.
    with pytest.raises(RuntimeError, match="expected weight to be on the same device as input"):
        _op(w=W.to("meta"))


GRAD_ARGS = ([1, 1], [0, 0], [1, 1], 2)


@pytest.mark.parametrize("algo", ALGOS_AUTO)
def test_grad_op_errors(algo):
    go = torch.randn(2, 6, 4, 4)
    with pytest.raises(ValueError, match=r"_conv2d_grad_input: expected grad_output of shape \[2, 6, 4, 4\]"):
        ops._conv2d_grad_input(go[:, :, :3], W, list(X.shape), *GRAD_ARGS, algo)
    with pytest.raises(ValueError, match=r"_conv2d_grad_weight: expected grad_output of shape"):
        ops._conv2d_grad_weight(go[:1], X, list(W.shape), *GRAD_ARGS, algo)
    with pytest.raises(TypeError, match="_conv2d_grad_input: expected grad_output to have dtype"):
        ops._conv2d_grad_input(go.int(), W.int(), list(X.shape), *GRAD_ARGS, algo)
    with pytest.raises(RuntimeError, match="expected weight to have the same dtype as grad_output"):
        ops._conv2d_grad_input(go, W.double(), list(X.shape), *GRAD_ARGS, algo)
    with pytest.raises(RuntimeError, match="expected input to have the same dtype as grad_output"):
        ops._conv2d_grad_weight(go, X.double(), list(W.shape), *GRAD_ARGS, algo)
    with pytest.raises(ValueError, match=r"weight.size\(1\) \* groups == input channels"):
        ops._conv2d_grad_weight(go, X, [6, 3, 3, 3], *GRAD_ARGS, algo)
    with pytest.raises(ValueError, match="expected input to be a 4-D tensor"):
        ops._conv2d_grad_input(go, W, [4, 6, 6], *GRAD_ARGS, algo)
    with pytest.raises(ValueError, match="expected stride to be positive"):
        ops._conv2d_grad_input(go, W, list(X.shape), [0, 1], [0, 0], [1, 1], 2, algo)
    with pytest.raises(ValueError, match="expected padding to be non-negative"):
        ops._conv2d_grad_weight(go, X, list(W.shape), [1, 1], [0, -1], [1, 1], 2, algo)


def test_grad_op_unknown_algo():
    go = torch.randn(2, 6, 4, 4)
    with pytest.raises(ValueError, match="_conv2d_grad_input: expected algo to be one of"):
        ops._conv2d_grad_input(go, W, list(X.shape), *GRAD_ARGS, "gemm")
    with pytest.raises(ValueError, match="_conv2d_grad_weight: expected algo to be one of"):
        ops._conv2d_grad_weight(go, X, list(W.shape), *GRAD_ARGS, "gemm")


# (N, C, H, W, O, k, stride, padding, dilation, groups): shapes with input rows and columns that
# no output window reads
UNREAD_CASES = [
    (2, 4, 12, 12, 6, 3, 2, 0, 1, 1),
    (1, 4, 12, 14, 4, 2, 3, 1, 1, 2),
    (1, 3, 12, 12, 5, 3, 2, 0, 2, 1),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("case", UNREAD_CASES, ids=str)
def test_inputs_no_window_reads_do_not_reach_the_results(case, algo, channels_last, device):
    """inf and NaN where no output window reads leave torch's results finite (grad_input 0
    there); a kernel that multiplies such cells by a zero (0 * inf = NaN) instead of skipping
    them fails."""
    n, c, h, w, o, k, s, p, d, g = case
    x = poison_unread(torch.randn(n, c, h, w, dtype=torch.float64, device=device), k, s, p, d)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    wt = torch.randn(o, c // g, k, k, dtype=torch.float64, device=device)
    b = torch.randn(o, dtype=torch.float64, device=device)
    conv = dict(stride=s, padding=p, dilation=d, groups=g)
    xa, wa, ba = (t.clone().requires_grad_() for t in (x, wt, b))
    out = fastconv.conv2d(xa, wa, ba, algo=algo, **conv)
    go = torch.randn_like(out)
    out.backward(go)
    xt, wtt, bt = (t.clone().requires_grad_() for t in (x, wt, b))
    ref = F.conv2d(xt, wtt, bt, **conv)
    ref.backward(go)
    assert torch.isfinite(ref).all() and torch.isfinite(wtt.grad).all()
    for mine, theirs in ((out, ref), (xa.grad, xt.grad), (wa.grad, wtt.grad), (ba.grad, bt.grad)):
        assert_close(mine, theirs, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("algo", ALGOS)
def test_non_finite_input_stays_where_torch_puts_it(algo, channels_last, device):
    """An inf in the input's last column (and a NaN in its last row) reaches only the weight
    gradient's taps whose windows read it, as in torch; a kernel that runs its sums past a
    row's end (the direct kernels' padded grid) must skip those columns, not multiply them by
    a zero grad_output (0 * inf = NaN in the other taps)."""
    for k, s, p, d, g, w in ((2, 1, 0, 1, 1, 3), (3, 1, 1, 1, 2, 21), (3, 1, 0, 2, 1, 37),
                             (3, 2, 0, 1, 1, 19)):
        x = torch.randn(2, 4, 9, w, dtype=torch.float64, device=device)
        x[:, 1, 3, -1] = float("inf")
        x[0, 2, -1, 1] = float("nan")
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        wt = torch.randn(6, 4 // g, k, k, dtype=torch.float64, device=device)
        conv = dict(stride=s, padding=p, dilation=d, groups=g)
        xa, wa = x.clone().requires_grad_(), wt.clone().requires_grad_()
        out = fastconv.conv2d(xa, wa, algo=algo, **conv)
        go = torch.rand(out.shape, dtype=torch.float64, device=device) + 0.5
        out.backward(go)
        xt, wtt = x.clone().requires_grad_(), wt.clone().requires_grad_()
        ref = F.conv2d(xt, wtt, **conv)
        ref.backward(go)
        assert torch.isfinite(wtt.grad).any() and not torch.isfinite(wtt.grad).all()
        for mine, theirs in ((out, ref), (xa.grad, xt.grad), (wa.grad, wtt.grad)):
            assert torch.equal(torch.isfinite(mine), torch.isfinite(theirs))
            assert_close(mine, theirs, torch.float64)
