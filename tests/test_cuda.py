"""The CUDA kernels against the CPU kernels and torch, and what only a GPU can show.

Agreement (forward and every gradient) of every op in float64 / float32 with the CPU kernels
and with torch.nn.functional; float16 / bfloat16 against a float64 reference computed from the
same rounded inputs, tolerances scaled to the reduction length (conftest.tol);
CUDA-graph capture and replay; torch.compile(fullgraph=True); channels_last in -> out; outputs
that a kernel forgot to write (NaN-poisoned memory); column-workspace chunking; determinism;
and tensors with more than 2**31 elements (marked slow).

Every test is marked `cuda`. All but the registration checks need a CUDA device and are
skipped without one; those run wherever fastconv was built with its CUDA kernels.
"""

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastconv
from fastconv._checks import conv_memory_format
from conftest import HAS_CUDA, Snapshot, assert_close, is_channels_last

pytestmark = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
WITH_CUDA = bool(getattr(fastconv._C, "with_cuda", 0))

OPS = [
    "conv2d", "_conv2d_grad_input", "_conv2d_grad_weight",
    "depthwise_conv2d", "_depthwise_conv2d_grad_input", "_depthwise_conv2d_grad_weight",
    "_depthwise_conv2d_backward",
    "max_pool2d", "_max_pool2d_backward",
]
CL = torch.channels_last


@pytest.fixture(autouse=True)
def _no_tf32():
    """Exact float32 on both sides: fastconv's GEMMs follow the matmul flag, torch's convs the
    cuDNN one (on by default)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --------------------------------------------------------------------------------------------
# registration (needs a CUDA build, not a device)
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not WITH_CUDA, reason="fastconv was built without its CUDA kernels")
@pytest.mark.parametrize("name", OPS)
def test_every_op_has_a_cuda_kernel(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastconv::{name}", "CUDA")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _case(x, w, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    return dict(x=x, w=w, stride=stride, padding=padding, dilation=dilation, groups=groups)


# input shape, weight shape, stride, padding, dilation, groups
CONV_CASES = [
    pytest.param(_case((2, 3, 9, 11), (4, 3, 3, 3), padding=(1, 1)), id="3x3"),
    pytest.param(_case((2, 4, 8, 8), (6, 4, 1, 1)), id="1x1"),
    pytest.param(_case((3, 6, 10, 7), (6, 2, 3, 2), (2, 1), (1, 0), (1, 2), 3), id="g3-s21-d12"),
    pytest.param(_case((2, 8, 12, 12), (16, 4, 3, 3), (2, 2), (2, 2), (2, 2), 2), id="g2-s2-d2"),
    pytest.param(_case((2, 2, 5, 4), (3, 2, 3, 3), (4, 3), (1, 1)), id="stride>kernel"),
    pytest.param(_case((1, 20, 6, 40), (10, 20, 3, 3), padding=(1, 1)), id="wide-20ch"),
    pytest.param(_case((2, 2, 7, 7), (3, 2, 5, 5), padding=(2, 2)), id="5x5"),
    pytest.param(_case((1, 1, 1, 1), (2, 1, 1, 1)), id="1x1-image"),
    pytest.param(_case((2, 4, 9, 9), (8, 1, 3, 3), padding=(1, 1), groups=4), id="depthwise-m2"),
]


def _out_hw(c):
    _, _, h, w = c["x"]
    _, _, kh, kw = c["w"]
    (sh, sw), (ph, pw), (dh, dw) = c["stride"], c["padding"], c["dilation"]
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def _reductions(c):
    """Products summed per element of: output, grad_input, grad_weight, grad_bias."""
    n = c["x"][0]
    o, cg, kh, kw = c["w"]
    oh, ow = _out_hw(c)
    return [cg * kh * kw, o // c["groups"] * kh * kw, n * oh * ow, n * oh * ow]


def _make_conv(c, dtype, device="cpu"):
    x = torch.randn(c["x"], dtype=dtype, device=device)
    w = torch.randn(c["w"], dtype=dtype, device=device)
    b = torch.randn(c["w"][0], dtype=dtype, device=device)
    gy = torch.randn((c["x"][0], c["w"][0], *_out_hw(c)), dtype=dtype, device=device)
    return x, w, b, gy


def _conv_run(fn, device, x, w, b, gy):
    """fn(x, w, b) forward and backward on `device`; returns y and the grads on the CPU."""
    x = x.detach().to(device).requires_grad_()
    w = w.detach().to(device).requires_grad_()
    b = b.detach().to(device).requires_grad_()
    y = fn(x, w, b)
    assert y.device.type == torch.device(device).type
    y.backward(gy.to(device))
    return [t.detach().cpu() for t in (y, x.grad, w.grad, b.grad)]


def _fastconv_conv(c, algo):
    def fn(x, w, b):
        return fastconv.conv2d(x, w, b, c["stride"], c["padding"], c["dilation"], c["groups"],
                               algo=algo)
    return fn


def _torch_conv(c):
    def fn(x, w, b):
        return F.conv2d(x, w, b, c["stride"], c["padding"], c["dilation"], c["groups"])
    return fn


def _compact_to_full(idx, in_w, out_hw, kernel, stride, padding, dilation):
    """Window-local tap numbers (kh_i * kW + kw_i) -> torch's flat h * W + w indices."""
    oh = torch.arange(out_hw[0]).view(-1, 1)
    ow = torch.arange(out_hw[1]).view(1, -1)
    tap = idx.long()
    h = oh * stride[0] - padding[0] + (tap // kernel[1]) * dilation[0]
    w = ow * stride[1] - padding[1] + (tap % kernel[1]) * dilation[1]
    return h * in_w + w


@contextlib.contextmanager
def _nan_filled_empty():
    """Every at::empty in the block returns NaN-filled memory (torch's deterministic mode fill):
    an output element a kernel never writes stays NaN."""
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # warn_only's notes about cuBLAS determinism
            yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.utils.deterministic.fill_uninitialized_memory = saved[2]


def _poison_cached_blocks(numel, dtype, count=8):
    """Leave `count` NaN-filled blocks of `numel` elements in the CUDA caching allocator, so a
    following allocation of that size most likely reuses NaN memory."""
    blocks = [torch.full((numel,), float("nan"), dtype=dtype, device="cuda") for _ in range(count)]
    torch.cuda.synchronize()
    del blocks


def _convert(model, **kw):
    try:
        return fastconv.convert(model, **kw)
    except NotImplementedError:
        pytest.skip("fastconv.convert is not implemented in this checkout")


# --------------------------------------------------------------------------------------------
# conv2d: CUDA vs CPU vs torch
# --------------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("algo", ["im2col", "direct", "auto"])
@pytest.mark.parametrize("c", CONV_CASES)
def test_conv2d_cuda_matches_cpu_and_torch(c, algo, dtype):
    x, w, b, gy = _make_conv(c, dtype)
    cuda = _conv_run(_fastconv_conv(c, algo), "cuda", x, w, b, gy)
    cpu = _conv_run(_fastconv_conv(c, algo), "cpu", x, w, b, gy)
    ref = _conv_run(_torch_conv(c), "cpu", x.double(), w.double(), b.double(), gy.double())
    for name, got, want_cpu, want, red in zip(("out", "grad_input", "grad_weight", "grad_bias"),
                                              cuda, cpu, ref, _reductions(c)):
        assert got.dtype == dtype, name
        assert_close(got, want, dtype=dtype, reduction=red, msg=f"{name} vs torch")
        assert_close(got, want_cpu.to(got.dtype), dtype=dtype, reduction=red,
                     msg=f"{name} vs fastconv CPU")


@needs_gpu
@pytest.mark.parametrize("algo", ["im2col", "direct", "auto"])
@pytest.mark.parametrize("c", CONV_CASES[:4] + CONV_CASES[-1:])
def test_conv2d_backward_ops_called_directly(c, algo):
    """The grad ops on their own (as autograd calls them), inputs left untouched."""
    x, w, _, gy = _make_conv(c, torch.float64, "cuda")
    snap = Snapshot(x, w, gy)
    args = (c["stride"], c["padding"], c["dilation"], c["groups"], algo)
    gi = torch.ops.fastconv._conv2d_grad_input(gy, w, list(x.shape), *args)
    gw = torch.ops.fastconv._conv2d_grad_weight(gy, x, list(w.shape), *args)
    snap.check()
    red = _reductions(c)
    want_gi = torch.nn.grad.conv2d_input(x.shape, w, gy, *args[:4])
    want_gw = torch.nn.grad.conv2d_weight(x, w.shape, gy, *args[:4])
    assert_close(gi, want_gi, reduction=red[1])
    assert_close(gw, want_gw, reduction=red[2])
    assert gw.is_contiguous()


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("algo", ["im2col", "direct", "auto"])
@pytest.mark.parametrize("c", CONV_CASES[:4] + CONV_CASES[-1:])
def test_conv2d_half_types_against_float64_reference(c, algo, dtype):
    x, w, b, gy = (t.to(dtype) for t in _make_conv(c, torch.float32))
    got = _conv_run(_fastconv_conv(c, algo), "cuda", x, w, b, gy)
    ref = _conv_run(_torch_conv(c), "cpu", x.double(), w.double(), b.double(), gy.double())
    for name, g, want, red in zip(("out", "grad_input", "grad_weight", "grad_bias"), got, ref,
                                  _reductions(c)):
        assert g.dtype == dtype, name
        assert_close(g, want, dtype=dtype, reduction=red, msg=name)


@needs_gpu
def test_conv2d_empty_batch_gives_empty_output_and_zero_grads():
    for algo in ("im2col", "direct", "auto"):
        x = torch.randn(0, 4, 7, 7, device="cuda", dtype=torch.float64, requires_grad=True)
        w = torch.randn(6, 2, 3, 3, device="cuda", dtype=torch.float64, requires_grad=True)
        b = torch.randn(6, device="cuda", dtype=torch.float64, requires_grad=True)
        y = fastconv.conv2d(x, w, b, 1, 1, groups=2, algo=algo)
        assert y.shape == (0, 6, 7, 7)
        y.sum().backward()
        assert x.grad.shape == x.shape
        assert torch.equal(w.grad, torch.zeros_like(w))
        assert torch.equal(b.grad, torch.zeros_like(b))


@needs_gpu
def test_conv2d_errors_name_the_devices_and_dtypes():
    x = torch.randn(1, 2, 5, 5, device="cuda")
    with pytest.raises(RuntimeError, match=r"expected weight to be on the same device as input"):
        torch.ops.fastconv.conv2d(x, torch.randn(3, 2, 3, 3), None, [1, 1], [0, 0], [1, 1], 1,
                                  "im2col")
    with pytest.raises(RuntimeError, match=r"expected bias to be on the same device as input"):
        torch.ops.fastconv.conv2d(x, torch.randn(3, 2, 3, 3, device="cuda"), torch.randn(3),
                                  [1, 1], [0, 0], [1, 1], 1, "direct")
    with pytest.raises(TypeError, match=r"float32, float64, float16 or bfloat16 on cuda"):
        torch.ops.fastconv.conv2d(x.int(), torch.randn(3, 2, 3, 3, device="cuda").int(), None,
                                  [1, 1], [0, 0], [1, 1], 1, "im2col")
    with pytest.raises(ValueError, match=r"expected algo to be one of"):
        torch.ops.fastconv.conv2d(x, torch.randn(3, 2, 3, 3, device="cuda"), None, [1, 1],
                                  [0, 0], [1, 1], 1, "winograd")


@needs_gpu
def test_conv2d_non_contiguous_inputs():
    big = torch.randn(2, 8, 20, 22, dtype=torch.float64, device="cuda")
    x = big[:, 1::2, ::2, 3:]  # channel-, row- and column-strided view
    w = torch.randn(12, 4, 3, 3, dtype=torch.float64, device="cuda").transpose(2, 3)
    snap = Snapshot(x, w)
    for algo in ("im2col", "direct"):
        y = fastconv.conv2d(x, w, None, 2, 1, algo=algo)
        assert_close(y, F.conv2d(x, w, None, 2, 1), reduction=36)
    snap.check()


@needs_gpu
@pytest.mark.parametrize("algo", ["im2col", "direct"])
def test_conv2d_backward_is_deterministic(algo):
    x = torch.randn(4, 4, 64, 64, device="cuda")
    w = torch.randn(4, 4, 3, 3, device="cuda")
    gy = torch.randn(4, 4, 64, 64, device="cuda")
    args = ([1, 1], [1, 1], [1, 1], 1, algo)
    gw = [torch.ops.fastconv._conv2d_grad_weight(gy, x, list(w.shape), *args) for _ in range(3)]
    gi = [torch.ops.fastconv._conv2d_grad_input(gy, w, list(x.shape), *args) for _ in range(3)]
    assert all(torch.equal(gw[0], g) for g in gw[1:])
    assert all(torch.equal(gi[0], g) for g in gi[1:])


@needs_gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize(
    "c",
    [
        # several whole images per chunk: 8 images of 37.7 MB columns -> chunks of 4
        pytest.param(_case((8, 64, 128, 128), (32, 64, 3, 3), padding=(1, 1)), id="image-chunks"),
        # one image's column (604 MB) is over the cap: bands of output (and input) rows
        pytest.param(_case((1, 256, 256, 256), (16, 256, 3, 3), padding=(1, 1)), id="row-bands"),
    ],
)
def test_im2col_workspace_chunks_match_torch(c, layout):
    x, w, b, gy = _make_conv(c, torch.float32, "cuda")
    if layout == "channels_last":
        x, gy = x.contiguous(memory_format=CL), gy.contiguous(memory_format=CL)
    args = (c["stride"], c["padding"], c["dilation"], c["groups"])
    red = _reductions(c)
    y = torch.ops.fastconv.conv2d(x, w, b, *args, "im2col")
    assert_close(y, F.conv2d(x.double(), w.double(), b.double(), *args), reduction=red[0])
    gi = torch.ops.fastconv._conv2d_grad_input(gy, w, list(x.shape), *args, "im2col")
    assert_close(gi, torch.nn.grad.conv2d_input(x.shape, w.double(), gy.double(), *args),
                 reduction=red[1])
    gw = torch.ops.fastconv._conv2d_grad_weight(gy, x, list(w.shape), *args, "im2col")
    assert_close(gw, torch.nn.grad.conv2d_weight(x.double(), w.shape, gy.double(), *args),
                 reduction=red[2])


# --------------------------------------------------------------------------------------------
# depthwise_conv2d
# --------------------------------------------------------------------------------------------

DW_CASES = [
    pytest.param(_case((2, 4, 9, 9), (4, 1, 3, 3), padding=(1, 1), groups=4), id="3x3"),
    pytest.param(_case((2, 3, 8, 10), (6, 1, 3, 3), (2, 2), (1, 1), groups=3), id="m2-s2"),
    pytest.param(_case((1, 2, 11, 9), (2, 1, 5, 3), (1, 2), (2, 1), (2, 1), groups=2), id="5x3-d2"),
    pytest.param(_case((3, 5, 6, 6), (5, 1, 1, 1), groups=5), id="1x1"),
]


def _fastconv_dw(c):
    def fn(x, w, b):
        return fastconv.depthwise_conv2d(x, w, b, c["stride"], c["padding"], c["dilation"])
    return fn


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("c", DW_CASES)
def test_depthwise_cuda_matches_cpu_and_torch(c, dtype):
    x, w, b, gy = _make_conv(c, dtype)
    cuda = _conv_run(_fastconv_dw(c), "cuda", x, w, b, gy)
    cpu = _conv_run(_fastconv_dw(c), "cpu", x, w, b, gy)
    ref = _conv_run(_torch_conv(c), "cpu", x.double(), w.double(), b.double(), gy.double())
    for name, got, want_cpu, want, red in zip(("out", "grad_input", "grad_weight", "grad_bias"),
                                              cuda, cpu, ref, _reductions(c)):
        assert got.dtype == dtype, name
        assert_close(got, want, dtype=dtype, reduction=red, msg=f"{name} vs torch")
        assert_close(got, want_cpu, dtype=dtype, reduction=red, msg=f"{name} vs fastconv CPU")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c", DW_CASES)
def test_depthwise_half_types_against_float64_reference(c, dtype):
    x, w, b, gy = (t.to(dtype) for t in _make_conv(c, torch.float32))
    got = _conv_run(_fastconv_dw(c), "cuda", x, w, b, gy)
    ref = _conv_run(_torch_conv(c), "cpu", x.double(), w.double(), b.double(), gy.double())
    for name, g, want, red in zip(("out", "grad_input", "grad_weight", "grad_bias"), got, ref,
                                  _reductions(c)):
        assert g.dtype == dtype, name
        assert_close(g, want, dtype=dtype, reduction=red, msg=name)


# --------------------------------------------------------------------------------------------
# max_pool2d
# --------------------------------------------------------------------------------------------

POOL_CASES = [
    pytest.param(dict(shape=(2, 3, 9, 11), k=(3, 3), s=(2, 2), p=(1, 1), d=(1, 1), ceil=False),
                 id="3x3-s2-p1"),
    pytest.param(dict(shape=(2, 3, 9, 11), k=(3, 3), s=(2, 2), p=(1, 1), d=(1, 1), ceil=True),
                 id="3x3-s2-p1-ceil"),
    pytest.param(dict(shape=(1, 2, 10, 7), k=(2, 3), s=(1, 2), p=(0, 1), d=(2, 1), ceil=True),
                 id="2x3-dilated-ceil"),
    pytest.param(dict(shape=(2, 2, 8, 8), k=(2, 2), s=(2, 2), p=(0, 0), d=(1, 1), ceil=False),
                 id="2x2"),
    pytest.param(dict(shape=(1, 2, 20, 20), k=(17, 17), s=(3, 3), p=(8, 8), d=(1, 1), ceil=False),
                 id="17x17-over-256-taps"),
]


def _pool_input(shape, dtype):
    x = torch.randn(shape, dtype=dtype)
    flat = x.view(-1)
    flat[::7] = flat[3].item()    # ties: the first maximum of a window wins
    flat[5::23] = float("nan")    # NaNs: they win, the last NaN of a window wins
    return x


def _pool_args(c):
    return c["k"], c["s"], c["p"], c["d"], c["ceil"]


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("indices", ["none", "full", "compact"])
@pytest.mark.parametrize("c", POOL_CASES)
def test_max_pool2d_cuda_matches_cpu_and_torch(c, indices, dtype):
    x = _pool_input(c["shape"], dtype)
    out, idx = torch.ops.fastconv.max_pool2d(x.cuda(), *_pool_args(c), indices)
    out_cpu, idx_cpu = torch.ops.fastconv.max_pool2d(x, *_pool_args(c), indices)
    ref, ref_idx = F.max_pool2d(x, c["k"], c["s"], c["p"], c["d"], c["ceil"],
                                return_indices=True)
    out, idx = out.cpu(), idx.cpu()
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(out, out_cpu, rtol=0, atol=0, equal_nan=True)
    if indices == "none":
        assert idx.shape == (0,) and idx.dtype == torch.int64
        return
    assert torch.equal(idx, idx_cpu)
    taps = c["k"][0] * c["k"][1]
    if indices == "full" or taps > 256:
        assert idx.dtype == torch.int64
        assert torch.equal(idx, ref_idx)
    else:
        assert idx.dtype == torch.uint8
        full = _compact_to_full(idx, x.shape[3], out.shape[2:], c["k"], c["s"], c["p"], c["d"])
        assert torch.equal(full, ref_idx)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("indices", ["full", "compact"])
@pytest.mark.parametrize("c", POOL_CASES)
def test_max_pool2d_backward_cuda_matches_cpu_and_torch(c, indices, dtype):
    x = _pool_input(c["shape"], dtype)
    out, idx = torch.ops.fastconv.max_pool2d(x.cuda(), *_pool_args(c), indices)
    gy = torch.randn(out.shape, dtype=dtype)
    gi = torch.ops.fastconv._max_pool2d_backward(gy.cuda(), x.cuda(), idx, *_pool_args(c)).cpu()
    _, idx_cpu = torch.ops.fastconv.max_pool2d(x, *_pool_args(c), indices)
    gi_cpu = torch.ops.fastconv._max_pool2d_backward(gy, x, idx_cpu, *_pool_args(c))
    xr = x.detach().double().requires_grad_()
    F.max_pool2d(xr, c["k"], c["s"], c["p"], c["d"], c["ceil"]).backward(gy.double())
    overlap = c["k"][0] * c["k"][1]  # at most this many outputs reach one input
    assert_close(gi, xr.grad, dtype=dtype, reduction=overlap)
    assert_close(gi, gi_cpu, dtype=dtype, reduction=overlap)


@needs_gpu
def test_max_pool2d_autograd_through_the_functional_api():
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, device="cuda", requires_grad=True)
    y = fastconv.max_pool2d(x, 3, 2, 1)
    gy = torch.randn_like(y)
    y.backward(gy)
    xr = x.detach().requires_grad_()
    F.max_pool2d(xr, 3, 2, 1).backward(gy)
    assert_close(x.grad, xr.grad, reduction=9)


# --------------------------------------------------------------------------------------------
# memory formats
# --------------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("which", ["input", "weight", "both"])
@pytest.mark.parametrize("algo", ["im2col", "direct", "auto"])
@pytest.mark.parametrize("c", [CONV_CASES[0], CONV_CASES[1], CONV_CASES[2], CONV_CASES[-1]])
def test_conv2d_channels_last_in_and_out(c, algo, which):
    x, w, b, gy = _make_conv(c, torch.float64, "cuda")
    args = (c["stride"], c["padding"], c["dilation"], c["groups"])
    y_ref = torch.ops.fastconv.conv2d(x, w, b, *args, algo)
    gi_ref = torch.ops.fastconv._conv2d_grad_input(gy, w, list(x.shape), *args, algo)
    gw_ref = torch.ops.fastconv._conv2d_grad_weight(gy, x, list(w.shape), *args, algo)
    if which in ("input", "both"):
        x, gy = x.contiguous(memory_format=CL), gy.contiguous(memory_format=CL)
    if which in ("weight", "both"):
        w = w.contiguous(memory_format=CL)
    red = _reductions(c)
    # torch's rule: channels_last out when input or weight suggests it (a 1x1 or one-channel
    # weight never does: both layouts coincide)
    y = torch.ops.fastconv.conv2d(x, w, b, *args, algo)
    assert is_channels_last(y) == (conv_memory_format(x, w) == CL)
    assert is_channels_last(y) or which == "weight"
    assert_close(y, y_ref, reduction=red[0])
    gi = torch.ops.fastconv._conv2d_grad_input(gy, w, list(x.shape), *args, algo)
    assert is_channels_last(gi) == (conv_memory_format(gy, w) == CL)
    assert_close(gi, gi_ref, reduction=red[1])
    gw = torch.ops.fastconv._conv2d_grad_weight(gy, x, list(w.shape), *args, algo)
    assert gw.is_contiguous()
    assert_close(gw, gw_ref, reduction=red[2])


@needs_gpu
def test_depthwise_and_max_pool2d_channels_last_in_and_out():
    x = torch.randn(2, 6, 10, 9, dtype=torch.float64, device="cuda")
    w = torch.randn(12, 1, 3, 3, dtype=torch.float64, device="cuda")
    xc = x.contiguous(memory_format=CL)
    y = fastconv.depthwise_conv2d(xc, w, None, 1, 1)
    assert is_channels_last(y)
    assert_close(y, fastconv.depthwise_conv2d(x, w, None, 1, 1), reduction=9)
    for mode in ("none", "full", "compact"):
        out, idx = torch.ops.fastconv.max_pool2d(xc, [3, 3], [2, 2], [1, 1], [1, 1], True, mode)
        ref, ref_idx = torch.ops.fastconv.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], True,
                                                     mode)
        assert is_channels_last(out)
        assert torch.equal(out, ref)
        if mode != "none":
            assert is_channels_last(idx)
            assert torch.equal(idx, ref_idx)
            gy = torch.randn_like(ref)
            gi = torch.ops.fastconv._max_pool2d_backward(
                gy.contiguous(memory_format=CL), xc, idx, [3, 3], [2, 2], [1, 1], [1, 1], True)
            assert is_channels_last(gi)
            gi_ref = torch.ops.fastconv._max_pool2d_backward(gy, x, ref_idx, [3, 3], [2, 2],
                                                             [1, 1], [1, 1], True)
            assert_close(gi, gi_ref, reduction=9)


# --------------------------------------------------------------------------------------------
# unwritten outputs
# --------------------------------------------------------------------------------------------


def _all_op_outputs(layout):
    """Every op on finite inputs, forward and backward, in one memory format."""
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    dev, f64 = "cuda", torch.float64
    x = torch.randn(2, 6, 11, 13, dtype=f64, device=dev).contiguous(memory_format=fmt)
    outs = []
    for algo, w_shape, groups in (("im2col", (8, 3, 3, 3), 2), ("direct", (8, 3, 3, 3), 2),
                                  ("im2col", (4, 6, 1, 1), 1), ("auto", (12, 1, 3, 3), 6)):
        w = torch.randn(w_shape, dtype=f64, device=dev)
        b = torch.randn(w_shape[0], dtype=f64, device=dev)
        args = ([2, 1], [1, 1], [1, 1], groups, algo)
        y = torch.ops.fastconv.conv2d(x, w, b, *args)
        gy = torch.randn_like(y)
        outs += [y, torch.ops.fastconv._conv2d_grad_input(gy, w, list(x.shape), *args),
                 torch.ops.fastconv._conv2d_grad_weight(gy, x, list(w.shape), *args)]
    wd = torch.randn(12, 1, 3, 3, dtype=f64, device=dev)
    y = torch.ops.fastconv.depthwise_conv2d(x, wd, None, [1, 2], [1, 1], [2, 1])
    gy = torch.randn_like(y)
    outs += [y,
             torch.ops.fastconv._depthwise_conv2d_grad_input(gy, wd, list(x.shape), [1, 2],
                                                             [1, 1], [2, 1]),
             torch.ops.fastconv._depthwise_conv2d_grad_weight(gy, x, list(wd.shape), [1, 2],
                                                              [1, 1], [2, 1])]
    for mode in ("none", "full", "compact"):
        out, idx = torch.ops.fastconv.max_pool2d(x, [3, 2], [2, 2], [1, 1], [1, 1], True, mode)
        outs.append(out)
        if mode != "none":
            gy = torch.randn_like(out)
            outs.append(torch.ops.fastconv._max_pool2d_backward(gy, x, idx, [3, 2], [2, 2],
                                                                [1, 1], [1, 1], True))
    return outs


@needs_gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_no_unwritten_outputs_with_nan_filled_allocations(layout):
    with _nan_filled_empty():
        outs = _all_op_outputs(layout)
    for i, t in enumerate(outs):
        assert not torch.isnan(t).any(), f"output {i} ({tuple(t.shape)}) has unwritten elements"


@needs_gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_no_unwritten_outputs_with_nan_poisoned_allocator(layout):
    sizes = {t.numel() for t in _all_op_outputs(layout)}
    for n in sorted(sizes):
        _poison_cached_blocks(n, torch.float64)
    outs = _all_op_outputs(layout)
    for i, t in enumerate(outs):
        assert not torch.isnan(t).any(), f"output {i} ({tuple(t.shape)}) has unwritten elements"


# --------------------------------------------------------------------------------------------
# CUDA graphs and torch.compile
# --------------------------------------------------------------------------------------------


class _FunctionalNet(torch.nn.Module):
    """Every fastconv op in one small net, each conv algorithm explicitly."""

    def __init__(self):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.b1 = torch.nn.Parameter(torch.randn(8) * 0.1)
        self.wd = torch.nn.Parameter(torch.randn(8, 1, 3, 3) * 0.3)
        self.w2 = torch.nn.Parameter(torch.randn(12, 4, 3, 3) * 0.3)
        self.w3 = torch.nn.Parameter(torch.randn(4, 12, 1, 1) * 0.3)

    def forward(self, x):
        x = torch.relu(fastconv.conv2d(x, self.w1, self.b1, 1, 1, algo="im2col"))
        x = torch.relu(fastconv.depthwise_conv2d(x, self.wd, None, 1, 1))
        x = fastconv.max_pool2d(x, 3, 2, 1)
        x = torch.relu(fastconv.conv2d(x, self.w2, None, 1, 1, groups=2, algo="direct"))
        return fastconv.conv2d(x, self.w3, algo="auto")


def _torch_net():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.ReLU(),
        torch.nn.MaxPool2d(3, 2, 1),
        torch.nn.Conv2d(8, 12, 3, padding=1, groups=2, bias=False), torch.nn.ReLU(),
        torch.nn.Conv2d(12, 4, 1),
    )


def _check_graph_replay(model, shape):
    """Whole-network capture of forward + backward (torch.cuda.graphs docs recipe), replayed on
    new data, against eager runs of the same model on that data."""
    params = list(model.parameters())
    static_x = torch.randn(shape, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            model(static_x).square().sum().backward()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_y = model(static_x)
        static_y.square().sum().backward()
    static_grads = [p.grad for p in params]

    for _ in range(2):
        static_x.copy_(torch.randn(shape, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        y = model(static_x)
        grads = torch.autograd.grad(y.square().sum(), params)
        assert_close(static_y, y, dtype=torch.float32, reduction=128)
        for sg, g in zip(static_grads, grads):
            assert_close(sg, g, dtype=torch.float32, reduction=4096)


@needs_gpu
def test_cuda_graph_capture_and_replay_functional_net():
    _check_graph_replay(_FunctionalNet().cuda(), (2, 3, 16, 16))


@needs_gpu
@pytest.mark.parametrize("algo", ["auto", "im2col", "direct"])
def test_cuda_graph_capture_and_replay_converted_model(algo):
    model = _convert(_torch_net(), algo=algo).cuda()
    _check_graph_replay(model, (2, 3, 16, 16))


@needs_gpu
def test_converted_model_matches_torch_on_cuda():
    torch_model = _torch_net().cuda().double()
    model = _convert(torch_model)
    x = torch.randn(2, 3, 16, 16, device="cuda", dtype=torch.float64)
    assert_close(model(x), torch_model(x), reduction=128)


@needs_gpu
def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    net = _FunctionalNet().cuda()
    x = torch.randn(2, 3, 16, 16, device="cuda", requires_grad=True)
    compiled = torch.compile(net, fullgraph=True)
    y = compiled(x)
    y_eager = net(x)
    assert_close(y, y_eager, dtype=torch.float32, reduction=128)
    params = [x] + list(net.parameters())
    gy = torch.randn_like(y)
    for g, ge in zip(torch.autograd.grad(y, params, gy), torch.autograd.grad(y_eager, params, gy)):
        assert_close(g, ge, dtype=torch.float32, reduction=4096)


@needs_gpu
def test_torch_compile_fullgraph_channels_last_and_half():
    torch._dynamo.reset()
    net = _FunctionalNet().cuda().half()
    x = torch.randn(2, 3, 16, 16, device="cuda", dtype=torch.float16).contiguous(memory_format=CL)
    y = torch.compile(net, fullgraph=True)(x)
    y_eager = net(x)
    assert y.dtype == torch.float16
    assert is_channels_last(y) == is_channels_last(y_eager)
    assert_close(y, y_eager.float(), dtype=torch.float16, reduction=128)


# --------------------------------------------------------------------------------------------
# more than 2**31 elements
# --------------------------------------------------------------------------------------------


def _window(plane, r, q, kh, kw, pad):
    """The kh x kw window of a 2-D CUDA plane whose top-left tap is (r - pad, q - pad), as
    float64 on the CPU with zeros outside the plane."""
    h, w = plane.shape
    out = torch.zeros(kh, kw, dtype=torch.float64)
    r0, q0 = r - pad, q - pad
    rs, re = max(r0, 0), min(r0 + kh, h)
    qs, qe = max(q0, 0), min(q0 + kw, w)
    out[rs - r0:re - r0, qs - q0:qe - q0] = plane[rs:re, qs:qe].double().cpu()
    return out


@needs_gpu
@pytest.mark.slow
def test_more_than_2_31_elements_float16():
    c, h, w = 3, 27000, 27000  # 2.187e9 elements; the last channel's bottom rows lie past 2**31
    assert c * h * w > 2**31
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs about 24 GiB of free GPU memory")
    x = torch.randn(1, c, h, w, dtype=torch.float16, device="cuda")
    oh = ow = (h + 2 - 3) // 2 + 1
    pool_samples = [(0, 0, 0), (1, oh // 2, ow // 3), (2, oh - 1, ow - 1), (2, oh - 2, 7),
                    (2, 12780, ow - 2)]
    for mode in ("none", "full", "compact"):
        out, idx = torch.ops.fastconv.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], False, mode)
        assert out.shape == (1, c, oh, ow)
        for ch, r, q in pool_samples:
            win = _window(x[0, ch], 2 * r, 2 * q, 3, 3, 1)
            valid = torch.zeros(3, 3, dtype=torch.bool)
            r0, q0 = 2 * r - 1, 2 * q - 1
            for i in range(3):
                for j in range(3):
                    valid[i, j] = 0 <= r0 + i < h and 0 <= q0 + j < w
            vals = torch.where(valid, win, torch.tensor(float("-inf"), dtype=torch.float64))
            tap = int(torch.argmax(vals.flatten()))  # first maximum in window order
            assert out[0, ch, r, q].item() == vals.max().item()
            if mode == "full":
                assert idx[0, ch, r, q].item() == (r0 + tap // 3) * w + (q0 + tap % 3)
            elif mode == "compact":
                assert idx.dtype == torch.uint8 and idx[0, ch, r, q].item() == tap
        del out, idx

    conv_samples = [(0, 0, 0), (1, h // 2, w // 3), (2, h - 1, w - 1), (2, h - 2, 5),
                    (2, 26000, w - 3)]
    wd = torch.randn(c, 1, 3, 3, dtype=torch.float16, device="cuda")
    bd = torch.randn(c, dtype=torch.float16, device="cuda")
    y = fastconv.depthwise_conv2d(x, wd, bd, 1, 1)
    for ch, r, q in conv_samples:
        want = (_window(x[0, ch], r, q, 3, 3, 1) * wd[ch, 0].double().cpu()).sum() + bd[ch].item()
        assert_close(y[0, ch, r, q].cpu(), want, dtype=torch.float16, reduction=9)
    del y

    wc = torch.randn(2, c, 3, 3, dtype=torch.float16, device="cuda")
    for algo in ("direct", "im2col"):
        y = fastconv.conv2d(x, wc, None, 1, 1, algo=algo)
        for ch, r, q in conv_samples:
            want = sum((_window(x[0, ci], r, q, 3, 3, 1) * wc[ch % 2, ci].double().cpu()).sum()
                       for ci in range(c))
            assert_close(y[0, ch % 2, r, q].cpu(), want, dtype=torch.float16, reduction=27)
        del y
