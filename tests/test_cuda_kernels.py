"""CUDA-specific checks of the depthwise and max_pool2d kernels (csrc/cuda/depthwise_conv2d.cu,
csrc/cuda/max_pool2d.cu): every kernel path the launchers choose between (compile-time k = 3,
5, 7 with unit and non-unit stride, the runtime-k tile, the direct / gather / generic
fallbacks for halos too large for shared memory, channels_last vector and scalar paths,
16-byte-load alignment edge cases), compared in float64 with torch; plus max_pool2d's index
formats and their backward. Skipped without a CUDA device.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA, Snapshot, assert_close

from fastconv._checks import conv_memory_format

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]

ops = torch.ops.fastconv
DEV = "cuda"


def poison_allocator(nbytes=256 << 20):
    """Leave NaN bytes in the caching allocator's free blocks, so an output element a kernel
    forgets to write shows up as NaN instead of a lucky zero."""
    t = torch.empty(nbytes // 4, dtype=torch.float32, device=DEV)
    t.fill_(float("nan"))
    del t


def rand(shape, dtype=torch.float64, channels_last=False, offset=False):
    """Random tensor; offset=True gives a tensor contiguous in its layout but one element into
    its storage, so its data pointer is not 16-byte aligned."""
    n = math.prod(shape)
    if offset:
        base = torch.randn(n + 1, dtype=torch.float64, device=DEV).to(dtype)[1:]
        if channels_last:
            N, C, H, W = shape
            return base.view(N, H, W, C).permute(0, 3, 1, 2)
        return base.view(shape)
    t = torch.randn(shape, dtype=torch.float64, device=DEV).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def check_depthwise(N, C, m, H, W, kh, kw, stride, padding, dilation, dtype=torch.float64,
                    channels_last=False, offset=False, bias=True):
    x = rand((N, C, H, W), dtype, channels_last, offset)
    w = rand((C * m, 1, kh, kw), dtype)
    b = rand((C * m,), dtype) if bias else None
    snap = Snapshot(x, w, b)
    poison_allocator()
    y = ops.depthwise_conv2d(x, w, b, stride, padding, dilation)
    x64, w64 = x.double(), w.double()
    ref = F.conv2d(x64, w64, None if b is None else b.double(), stride, padding, dilation, C)
    assert y.dtype == dtype and y.shape == ref.shape
    assert y.is_contiguous(memory_format=conv_memory_format(x, w))
    assert_close(y, ref, dtype, reduction=kh * kw)

    go = rand(ref.shape, dtype, channels_last)
    poison_allocator()
    gi = ops._depthwise_conv2d_grad_input(go, w, list(x.shape), stride, padding, dilation)
    ref_gi = torch.nn.grad.conv2d_input(x.shape, w64, go.double(), stride, padding, dilation, C)
    assert_close(gi, ref_gi, dtype, reduction=kh * kw * m)
    poison_allocator()
    gw = ops._depthwise_conv2d_grad_weight(go, x, list(w.shape), stride, padding, dilation)
    ref_gw = torch.nn.grad.conv2d_weight(x64, w.shape, go.double(), stride, padding, dilation, C)
    assert gw.is_contiguous()
    assert_close(gw, ref_gw, dtype, reduction=N * ref.shape[2] * ref.shape[3])
    # no atomics: the two-stage reduction is bitwise reproducible
    gw2 = ops._depthwise_conv2d_grad_weight(go, x, list(w.shape), stride, padding, dilation)
    assert torch.equal(gw, gw2)
    snap.check()


# ----------------------------------------------------------------------------------------------
# depthwise
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("k", list(range(1, 32)))
def test_depthwise_kernel_size_sweep(k, channels_last):
    """k = 1..31: compile-time 3 / 5 / 7, the runtime-k tile for the rest."""
    H = max(k + 3, 12)
    check_depthwise(2, 3, 1, H, H + 5, k, k, (1, 1), (k // 2, k // 2), (1, 1),
                    channels_last=channels_last)
    check_depthwise(1, 4, 2, H + 1, H, k, k, (1, 1), (0, k // 2), (1, 1),
                    channels_last=channels_last)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kh,kw", [(1, 7), (7, 1), (3, 5), (5, 3), (2, 4), (1, 31), (31, 1)])
@pytest.mark.parametrize("stride,dilation", [((1, 1), (1, 1)), ((2, 1), (1, 2)), ((1, 3), (2, 1))])
def test_depthwise_non_square(kh, kw, stride, dilation, channels_last):
    H, W = 2 * kh + 5, 2 * kw + 6
    check_depthwise(2, 3, 2, H, W, kh, kw, stride, (kh // 2, kw // 2), dilation,
                    channels_last=channels_last)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("k,stride,padding,dilation", [
    (3, (1, 1), (1, 1), (1, 1)),
    (3, (2, 2), (1, 1), (1, 1)),
    (3, (1, 2), (0, 2), (1, 1)),
    (5, (1, 1), (2, 2), (1, 1)),
    (5, (2, 1), (4, 1), (2, 1)),
    (7, (1, 1), (3, 3), (1, 1)),
    (7, (3, 3), (0, 5), (1, 2)),
    (3, (1, 1), (4, 4), (2, 2)),
    (5, (1, 1), (6, 6), (1, 1)),   # padding > (k - 1) * d: negative grad_input padding
    (3, (2, 2), (0, 0), (3, 3)),
])
def test_depthwise_stride_dilation_multiplier(k, stride, padding, dilation, m, channels_last):
    check_depthwise(2, 5, m, 17, 14, k, k, stride, padding, dilation, channels_last=channels_last)
    check_depthwise(1, 8, m, 12, 16, k, k, stride, padding, dilation, dtype=torch.float32,
                    channels_last=channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("W", [16, 13, 8, 24, 6, 5])
@pytest.mark.parametrize("channels_last", [False, True])
def test_depthwise_vector_alignment(dtype, W, channels_last):
    """16-byte loads need an aligned base and W (NCHW) or C (channels_last) a multiple of the
    vector width; everything else takes the scalar path."""
    C = 16 if channels_last else 8
    for k in (3, 5, 7, 4):
        check_depthwise(2, C, 1, 10, W, k, k, (1, 1), (k // 2, k // 2), (1, 1), dtype=dtype,
                        channels_last=channels_last)
    check_depthwise(1, C, 1, 10, W, 3, 3, (1, 1), (1, 1), (1, 1), dtype=dtype,
                    channels_last=channels_last, offset=True)
    check_depthwise(1, C + 3, 1, 9, W, 3, 3, (1, 1), (1, 1), (1, 1), dtype=dtype,
                    channels_last=channels_last)


@pytest.mark.parametrize("channels_last", [False, True])
def test_depthwise_huge_halo_fallback(channels_last):
    """Dilated 31x31 and 7x7 kernels whose halo does not fit in shared memory go to the direct
    forward, gather grad_input and generic grad_weight kernels."""
    check_depthwise(1, 2, 1, 96, 100, 31, 31, (1, 1), (15, 15), (3, 3),
                    channels_last=channels_last)
    check_depthwise(1, 2, 2, 70, 70, 7, 7, (1, 1), (3, 3), (11, 11), channels_last=channels_last)


@pytest.mark.parametrize("channels_last", [False, True])
def test_depthwise_many_blocks(channels_last):
    """More tiles / planes than one sweep of the grid: the grid-stride loops run."""
    check_depthwise(16, 96, 1, 56, 56, 3, 3, (1, 1), (1, 1), (1, 1), dtype=torch.float32,
                    channels_last=channels_last)
    check_depthwise(8, 144, 1, 56, 56, 3, 3, (2, 2), (1, 1), (1, 1), dtype=torch.float32,
                    channels_last=channels_last)
    check_depthwise(4, 32, 1, 112, 112, 5, 5, (1, 1), (2, 2), (1, 1), dtype=torch.float16,
                    channels_last=channels_last)


def test_depthwise_edge_shapes():
    check_depthwise(1, 2, 1, 1, 1, 1, 1, (1, 1), (0, 0), (1, 1))
    check_depthwise(1, 2, 1, 1, 1, 3, 3, (1, 1), (1, 1), (1, 1), channels_last=True)
    check_depthwise(2, 4, 2, 9, 9, 3, 3, (1, 1), (1, 1), (1, 1), bias=False)
    check_depthwise(1, 3, 1, 5, 5, 3, 3, (4, 4), (1, 1), (1, 1))  # stride > kernel
    x = torch.randn(0, 3, 8, 8, device=DEV)
    w = torch.randn(3, 1, 3, 3, device=DEV)
    assert ops.depthwise_conv2d(x, w, None, [1, 1], [1, 1], [1, 1]).shape == (0, 3, 8, 8)
    g = torch.randn(0, 3, 8, 8, device=DEV)
    gi = ops._depthwise_conv2d_grad_input(g, w, [0, 3, 8, 8], [1, 1], [1, 1], [1, 1])
    assert gi.shape == (0, 3, 8, 8)
    gw = ops._depthwise_conv2d_grad_weight(g, x, [3, 1, 3, 3], [1, 1], [1, 1], [1, 1])
    assert torch.equal(gw, torch.zeros_like(w))


def test_depthwise_weight_channels_last_gives_channels_last_output():
    x = rand((2, 8, 12, 12))
    w = rand((8, 1, 3, 3)).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    y = ops.depthwise_conv2d(x, w, None, [1, 1], [1, 1], [1, 1])
    ref = F.conv2d(x, w.contiguous(), None, 1, 1, 1, 8)
    assert y.is_contiguous(memory_format=conv_memory_format(x, w))
    assert_close(y, ref, torch.float64, reduction=9)


def test_depthwise_mixed_devices_rejected():
    x = torch.randn(1, 2, 5, 5, device=DEV)
    w = torch.randn(2, 1, 3, 3)
    with pytest.raises(RuntimeError, match="to be on the same device as input"):
        ops.depthwise_conv2d(x, w, None, [1, 1], [1, 1], [1, 1])


@pytest.mark.slow
def test_depthwise_64bit_indices():
    """A tensor past 2^31 elements takes the 64-bit generic kernels."""
    x = torch.randn(1, 2, 33000, 33000, dtype=torch.bfloat16, device=DEV)  # 2.18e9 elements
    w = torch.randn(2, 1, 3, 3, dtype=torch.bfloat16, device=DEV)
    y = ops.depthwise_conv2d(x, w, None, [1, 1], [1, 1], [1, 1])
    for (r, c) in [(0, 0), (32990, 32990), (16000, 100)]:
        crop = x[:, :, max(r - 1, 0):r + 9, max(c - 1, 0):c + 9].double()
        pad = (1 if c == 0 else 0, 0, 1 if r == 0 else 0, 0)
        ref = F.conv2d(F.pad(crop, pad), w.double(), None, 1, 0, 1, 2)
        got = y[:, :, r:r + ref.shape[2], c:c + ref.shape[3]]
        assert_close(got, ref[:, :, :got.shape[2], :got.shape[3]], torch.bfloat16, reduction=9)


# ----------------------------------------------------------------------------------------------
# max_pool2d
# ----------------------------------------------------------------------------------------------


def decode_compact(idx, in_w, kernel_size, stride, padding, dilation):
    """uint8 window-local taps -> torch's flat h * W + w."""
    OH, OW = idx.shape[2:]
    t = idx.long()
    th, tw = t // kernel_size[1], t % kernel_size[1]
    oh = torch.arange(OH, device=idx.device).view(1, 1, OH, 1)
    ow = torch.arange(OW, device=idx.device).view(1, 1, 1, OW)
    return ((oh * stride[0] - padding[0] + th * dilation[0]) * in_w
            + (ow * stride[1] - padding[1] + tw * dilation[1]))


def check_max_pool(N, C, H, W, k, s, p, d, ceil_mode, dtype=torch.float64, channels_last=False,
                   offset=False, special=None):
    x = rand((N, C, H, W), dtype, channels_last, offset)
    if special == "ties":
        x = (x * 2).round().clamp(-1, 1)
    elif special == "nan":
        x = torch.where(torch.rand(x.shape, device=DEV) < 0.15, float("nan"), x)
    elif special == "ninf":
        x = torch.where(torch.rand(x.shape, device=DEV) < 0.6, float("-inf"), x)
    if special is not None and channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    snap = Snapshot(x)
    # torch's CPU kernel is the semantic reference (first valid tap for all -inf windows)
    x64 = x.double().cpu().requires_grad_()
    ref, ref_idx = F.max_pool2d(x64, k, s, p, d, ceil_mode, return_indices=True)
    outs = {}
    for mode in ("full", "compact", "none"):
        poison_allocator()
        outs[mode] = ops.max_pool2d(x, k, s, p, d, ceil_mode, mode)
    out_f, idx_f = outs["full"]
    assert out_f.dtype == dtype
    torch.testing.assert_close(out_f.cpu().double(), ref.detach().to(dtype).double(), rtol=0,
                               atol=0, equal_nan=True)
    for mode in ("compact", "none"):
        torch.testing.assert_close(outs[mode][0], out_f, rtol=0, atol=0, equal_nan=True)
    assert outs["none"][1].shape == (0,) and outs["none"][1].dtype == torch.int64
    assert idx_f.dtype == torch.int64 and torch.equal(idx_f.cpu(), ref_idx)
    idx_c = outs["compact"][1]
    if k[0] * k[1] <= 256:
        assert idx_c.dtype == torch.uint8
        assert torch.equal(decode_compact(idx_c, W, k, s, p, d), idx_f)
    else:
        assert idx_c.dtype == torch.int64 and torch.equal(idx_c, idx_f)
    if channels_last and C > 1:
        for t in (out_f, idx_f, idx_c):
            assert t.is_contiguous(memory_format=torch.channels_last)

    go = rand(ref.shape, dtype, channels_last)
    ref.backward(go.double().cpu())
    poison_allocator()
    g_full = ops._max_pool2d_backward(go, x, idx_f, k, s, p, d, ceil_mode)
    poison_allocator()
    g_compact = ops._max_pool2d_backward(go, x, idx_c, k, s, p, d, ceil_mode)
    assert torch.equal(g_full, g_compact)  # same element named by both formats
    if special != "nan":
        assert_close(g_full.cpu(), x64.grad, dtype, reduction=4)
    if channels_last and C > 1:
        assert g_full.is_contiguous(memory_format=torch.channels_last)
    snap.check()


POOL_GEOMETRIES = [
    ((2, 2), (2, 2), (0, 0), (1, 1)),
    ((3, 3), (2, 2), (1, 1), (1, 1)),
    ((3, 3), (1, 1), (1, 1), (1, 1)),
    ((3, 2), (2, 1), (1, 0), (1, 1)),
    ((3, 3), (2, 2), (1, 1), (2, 2)),
    ((5, 5), (3, 3), (2, 2), (1, 2)),
    ((2, 2), (1, 1), (1, 1), (3, 3)),   # windows whose only taps lie in the padding
    ((4, 4), (5, 5), (2, 1), (1, 1)),   # stride > kernel
    ((1, 1), (2, 2), (0, 0), (1, 1)),
    ((17, 16), (4, 4), (8, 8), (1, 1)),  # 272 taps: "compact" falls back to int64
]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("k,s,p,d", POOL_GEOMETRIES)
def test_max_pool_index_formats(k, s, p, d, ceil_mode, channels_last):
    check_max_pool(2, 3, 19, 22, k, s, p, d, ceil_mode, channels_last=channels_last)
    check_max_pool(2, 8, 19, 22, k, s, p, d, ceil_mode, dtype=torch.float32,
                   channels_last=channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("C", [8, 16, 3, 4, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool_vector_alignment(dtype, C, channels_last):
    check_max_pool(2, C, 12, 13, (3, 3), (2, 2), (1, 1), (1, 1), True, dtype=dtype,
                   channels_last=channels_last)
    check_max_pool(1, C, 12, 13, (3, 3), (2, 2), (1, 1), (1, 1), False, dtype=dtype,
                   channels_last=channels_last, offset=True)


@pytest.mark.parametrize("special", ["ties", "nan", "ninf"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool_ties_nan_inf(special, channels_last):
    check_max_pool(2, 8, 11, 12, (3, 3), (1, 1), (1, 1), (1, 1), False,
                   channels_last=channels_last, special=special)
    check_max_pool(2, 8, 11, 12, (3, 3), (2, 2), (1, 1), (2, 2), True, dtype=torch.float32,
                   channels_last=channels_last, special=special)


@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool_many_blocks(channels_last):
    check_max_pool(32, 64, 56, 56, (3, 3), (2, 2), (1, 1), (1, 1), False, dtype=torch.float16,
                   channels_last=channels_last)


def test_max_pool_batch0():
    x = torch.randn(0, 3, 8, 8, device=DEV)
    out, idx = ops.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False, "compact")
    assert out.shape == (0, 3, 4, 4) and idx.shape == (0, 3, 4, 4) and idx.dtype == torch.uint8
    g = ops._max_pool2d_backward(torch.randn(0, 3, 4, 4, device=DEV), x, idx, [2, 2], [2, 2],
                                 [0, 0], [1, 1], False)
    assert g.shape == x.shape


def test_max_pool_backward_index_checks():
    x = torch.randn(1, 2, 8, 8, device=DEV)
    out, idx = ops.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False, "full")
    with pytest.raises(ValueError, match="expected indices of shape"):
        ops._max_pool2d_backward(out, x, idx.int(), [2, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(ValueError, match="expected grad_output of shape"):
        ops._max_pool2d_backward(out[:, :1], x, idx, [2, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match="expected indices to be on the same device as input"):
        ops._max_pool2d_backward(out, x, idx.cpu(), [2, 2], [2, 2], [0, 0], [1, 1], False)


@pytest.mark.slow
def test_max_pool_64bit_indices():
    W = 46400
    x = torch.randn(1, 1, W, W, dtype=torch.float16, device=DEV)  # 2.15e9 elements
    out, idx = ops.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False, "full")
    # sampled windows, checked on the CPU (torch's own kernel uses 32-bit offsets here)
    for oh, ow in [(0, 0), (23199, 23199), (11600, 23000), (23198, 5)]:
        win = x[0, 0, 2 * oh:2 * oh + 2, 2 * ow:2 * ow + 2].double().cpu().flatten()
        best = int(torch.argmax(win))  # first max, as torch's CPU kernel
        assert out[0, 0, oh, ow].item() == win[best].item()
        assert idx[0, 0, oh, ow].item() == (2 * oh + best // 2) * W + 2 * ow + best % 2
    g = ops._max_pool2d_backward(torch.ones_like(out), x, idx, [2, 2], [2, 2], [0, 0], [1, 1],
                                 False)
    assert g.sum(dtype=torch.float64).item() == out.numel()
