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
def test_op_has_autograd_kernel(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastconv::{name}", "Autograd")


def test_forward_ops_trace_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 4, 9, 9).to(memory_format=torch.channels_last)
        y = torch.ops.fastconv.conv2d(x, torch.empty(6, 2, 3, 3), None, [2, 2], [1, 1], [1, 1], 2)
        assert y.shape == (2, 6, 5, 5) and y.is_contiguous(memory_format=torch.channels_last)
        y = torch.ops.fastconv.depthwise_conv2d(x, torch.empty(8, 1, 3, 3), None, [1, 1], [1, 1],
                                                [1, 1])
        assert y.shape == (2, 8, 9, 9)
        y, i = torch.ops.fastconv.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], True, "compact")
        assert y.shape == (2, 4, 5, 5) and i.dtype == torch.uint8
        with pytest.raises(ValueError, match="expected weight.size\\(1\\) \\* groups"):
            torch.ops.fastconv.conv2d(x, torch.empty(6, 3, 3, 3), None, [1, 1], [1, 1], [1, 1], 2)


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


def test_cpu_kernels_are_built_with_the_parallel_backend_of_torch():
    # at::parallel_for is header code: without -fopenmp it compiles to a serial loop and every
    # CPU kernel runs on one core, silently. Guard the build flag.
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch is not built with the OpenMP backend")
    assert fastconv._C.with_openmp == 1
