"""torch.autocast on fastconv's ops, on CPU and CUDA: the casts, result dtypes and gradients of
torch's own conv2d (a lower-precision op on both devices) and max_pool2d (runs in its input's
dtype). CPU regions default to bfloat16, CUDA ones to float16."""

import pytest
import torch
import torch.nn.functional as F

import fastconv
from conftest import HAS_CUDA, assert_close

_cuda = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]

# (device, autocast dtype): every lower-precision dtype fastconv has kernels for on the device.
REGIONS = [
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.float16, marks=_cuda),
    pytest.param("cuda", torch.bfloat16, marks=_cuda),
]
DEVICES = ["cpu", pytest.param("cuda", marks=_cuda)]


@pytest.mark.parametrize("key", ["AutocastCPU", "AutocastCUDA"])
@pytest.mark.parametrize("name", ["conv2d", "depthwise_conv2d"])
def test_convolutions_have_an_autocast_kernel(name, key):
    # Registered in every build: AutocastCUDA's kernels only ever see CUDA tensors.
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastconv::{name}", key)


@pytest.mark.parametrize("device,dtype", REGIONS)
@pytest.mark.parametrize("algo", ["im2col", "direct", "auto"])
def test_autocast_conv2d_matches_torch(device, dtype, algo):
    x = torch.randn(2, 4, 10, 10, device=device, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, device=device, requires_grad=True)
    b = torch.randn(6, device=device, requires_grad=True)
    with torch.autocast(device, dtype=dtype):
        y = fastconv.conv2d(x, w, b, 1, 1, groups=2, algo=algo)
        ref = F.conv2d(x, w, b, 1, 1, groups=2)
    assert y.dtype == ref.dtype == dtype
    assert_close(y, ref.float(), dtype=dtype, reduction=18)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), gy)
    ref_grads = torch.autograd.grad(ref, (x, w, b), gy)
    for g, r, red in zip(grads, ref_grads, (3 * 9, 2 * 100, 2 * 100)):
        assert g.dtype == torch.float32  # back to the leaves' dtype, as with torch's conv
        assert_close(g, r, dtype=dtype, reduction=red)


@pytest.mark.parametrize("device,dtype", REGIONS)
def test_autocast_casts_mixed_arguments_as_torch_does(device, dtype):
    # An activation already in the low dtype (from an earlier autocast op) meeting float32
    # parameters: outside autocast both torch and fastconv reject the mix; inside, both cast.
    x = torch.randn(2, 4, 8, 8, device=device).to(dtype)
    conv = fastconv.nn.Conv2d(4, 6, 3, padding=1).to(device)
    ref_conv = torch.nn.Conv2d(4, 6, 3, padding=1).to(device)
    ref_conv.load_state_dict(conv.state_dict())
    wd = torch.randn(8, 1, 3, 3, device=device)
    with torch.autocast(device, dtype=dtype):
        y, ref = conv(x), ref_conv(x)
        yd = fastconv.depthwise_conv2d(x, wd, None, 1, 1)
        refd = F.conv2d(x, wd, None, 1, 1, groups=4)
    assert y.dtype == ref.dtype == yd.dtype == refd.dtype == dtype
    assert_close(y, ref.float(), dtype=dtype, reduction=36)
    assert_close(yd, refd.float(), dtype=dtype, reduction=9)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_depthwise_and_max_pool2d_match_torch(device):
    x = torch.randn(2, 4, 9, 9, device=device)
    w = torch.randn(8, 1, 3, 3, device=device)
    with torch.autocast(device):  # the device's default dtype
        y = fastconv.depthwise_conv2d(x, w, None, 1, 1)
        ref = F.conv2d(x, w, None, 1, 1, groups=4)
        p = fastconv.max_pool2d(x, 2)
        p_ref = F.max_pool2d(x, 2)
    assert y.dtype == ref.dtype == torch.get_autocast_dtype(device)
    assert_close(y, ref.float(), dtype=y.dtype, reduction=9)
    assert p.dtype == p_ref.dtype == torch.float32  # pooling runs in its input's dtype
    assert torch.equal(p, p_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_leaves_float64_alone(device):
    x = torch.randn(1, 2, 6, 6, device=device, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, device=device, dtype=torch.float64)
    with torch.autocast(device):
        y = fastconv.conv2d(x, w, algo="im2col")
        ref = F.conv2d(x, w)
    assert y.dtype == ref.dtype == torch.float64
    assert_close(y, ref, reduction=18)


def test_cpu_autocast_to_float16_is_a_clear_error():
    # torch's CPU conv2d runs in float16; fastconv has no float16 CPU kernels, so it says so
    # instead of failing on a dtype the caller never asked for.
    x = torch.randn(1, 2, 6, 6)
    w = torch.randn(3, 2, 3, 3)
    with torch.autocast("cpu", dtype=torch.float16):
        for call in (lambda: fastconv.conv2d(x, w),
                     lambda: fastconv.depthwise_conv2d(x, torch.randn(2, 1, 3, 3))):
            with pytest.raises(TypeError, match=r'autocast\("cpu", dtype=torch.float16\).*'
                                                r"no float16 kernels on cpu"):
                call()
        # A float64 input is not cast, so it still runs.
        assert fastconv.conv2d(x.double(), w.double()).dtype == torch.float64
