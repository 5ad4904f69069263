"""Every op is registered once, with a kernel per compiled backend, fake and autograd."""

import pytest
import torch

import fastconv
from fastconv.info import OPS


@pytest.mark.parametrize("name", OPS)
def test_op_has_cpu_kernel(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastconv::{name}", "CPU")


@pytest.mark.parametrize("name", OPS)
def test_op_has_cuda_kernel_when_built_with_cuda(name):
    if not fastconv._C.with_cuda:
        pytest.skip("built without CUDA kernels")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastconv::{name}", "CUDA")


@pytest.mark.parametrize("name", OPS)
def test_op_has_fake_and_autograd(name):
    op = getattr(torch.ops.fastconv, name).default
    # fake kernel: the op runs on meta tensors through FakeTensorMode
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastconv::{name}", "Meta") or \
        torch._library.simple_registry.singleton.find(f"fastconv::{name}").fake_impl.kernel is not None
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastconv::{name}", "Autograd") or \
        torch._C._dispatch_has_kernel_for_dispatch_key(f"fastconv::{name}", "AutogradCPU")
    assert op is not None


def test_functions_are_reexported():
    assert fastconv.conv2d is fastconv.functional.conv2d
    assert fastconv.depthwise_conv2d is fastconv.functional.depthwise_conv2d
    assert fastconv.max_pool2d is fastconv.functional.max_pool2d


def test_info_command_passes_on_cpu(capsys):
    from fastconv.cli import main

    assert main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out
    for name in OPS:
        assert name in out


def test_double_backward_is_a_clear_error():
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    y = fastconv.conv2d(x, w, algo="im2col")
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        gx.sum().backward()
