"""Every op is registered once, with a kernel per compiled backend, fake and autograd."""

import pytest
import torch

import fastconv
from conftest import ops_called
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


def test_cpu_kernels_are_built_with_the_parallel_backend_of_torch():
    # at::parallel_for is header code: without -fopenmp it compiles to a serial loop and every
    # CPU kernel runs on one core, silently. Guard the build flag.
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch is not built with the OpenMP backend")
    assert fastconv._C.with_openmp == 1


# --------------------------------------------------------------------------------------------
# autograd of the forward ops (C++, csrc/autograd.cpp)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, False),
                                   (False, False, True), (False, True, True)], ids=str)
def test_conv2d_computes_only_the_gradients_autograd_needs(needs):
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 4, 7, 7), torch.randn(6, 2, 3, 3), torch.randn(6)
    xa, wa, ba = (t.clone().requires_grad_(r) for t, r in zip((x, w, b), needs))
    out = fastconv.conv2d(xa, wa, ba, padding=1, groups=2)
    g = torch.randn_like(out)
    called = ops_called(lambda: out.backward(g))
    assert ("fastconv::_conv2d_grad_input" in called) == needs[0]
    assert ("fastconv::_conv2d_grad_weight" in called) == needs[1]
    xr, wr, br = (t.clone().requires_grad_(r) for t, r in zip((x, w, b), needs))
    torch.nn.functional.conv2d(xr, wr, br, padding=1, groups=2).backward(g)
    for got, ref in ((xa, xr), (wa, wr), (ba, br)):
        if ref.requires_grad:
            torch.testing.assert_close(got.grad, ref.grad, rtol=1e-5, atol=1e-5)
        else:
            assert got.grad is None


def test_no_graph_without_grad():
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, requires_grad=True)
    with torch.no_grad():
        assert fastconv.conv2d(x, w, padding=1, groups=4).grad_fn is None
        assert fastconv.depthwise_conv2d(x, w, padding=1).grad_fn is None
        assert fastconv.max_pool2d(x, 2).grad_fn is None
    x0, w0 = x.detach(), w.detach()
    assert fastconv.conv2d(x0, w0, padding=1, groups=4).grad_fn is None
    assert fastconv.max_pool2d(x0, 2).grad_fn is None
    assert fastconv.conv2d(x0, w, padding=1, groups=4).grad_fn is not None


def test_max_pool2d_indices_are_not_differentiable():
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    out, idx = fastconv.max_pool2d(x, 2, return_indices=True)
    assert out.requires_grad and not idx.requires_grad and idx.grad_fn is None
    # the output's gradient alone flows back (the indices get none, not a zero-filled one)
    out.sum().backward()
    ref = x.detach().clone().requires_grad_()
    torch.nn.functional.max_pool2d(ref, 2).sum().backward()
    assert torch.equal(x.grad, ref.grad)


@pytest.mark.parametrize("fn", ["conv2d", "depthwise_conv2d", "max_pool2d"])
def test_backward_after_an_in_place_change_of_a_saved_input_raises(fn):
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, requires_grad=True)
    xi = x * 1  # a non-leaf, so it can be changed in place
    if fn == "max_pool2d":
        out = fastconv.max_pool2d(xi, 2)
    else:
        out = getattr(fastconv, fn)(xi, w, padding=1, **({"groups": 4} if fn == "conv2d" else {}))
    xi.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_backward_twice_with_retain_graph_accumulates():
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    out = fastconv.conv2d(x, w, b, padding=1, groups=4)
    g = torch.randn_like(out)
    out.backward(g, retain_graph=True)
    first = [t.grad.clone() for t in (x, w, b)]
    out.backward(g)
    for t, f in zip((x, w, b), first):
        torch.testing.assert_close(t.grad, 2 * f)
