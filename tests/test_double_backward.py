"""Gradients of gradients through fastconv's ops: the backward ops have derivatives of their own
(csrc/autograd.cpp), so torch.autograd.grad(..., create_graph=True) builds a graph that can be
differentiated again, to any order, and forward-mode tangents flow through a backward
(forward-over-reverse). Checked with gradgradcheck, and against torch.nn.functional in float64
for what users write: gradient penalties, third derivatives, Hessian-vector products."""

import itertools

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import fastconv
from conftest import DEVICES, assert_close

CL = torch.channels_last
LAYOUTS = [torch.contiguous_format, CL]

# (input shape, weight shape, stride, padding, dilation, groups, algo)
CONV_CASES = [
    ((2, 4, 7, 6), (6, 2, 3, 3), 1, 1, 1, 2, "im2col"),
    ((2, 4, 7, 6), (6, 4, 3, 2), 2, (1, 0), (1, 2), 1, "direct"),
    ((2, 3, 6, 6), (4, 3, 3, 3), 1, 1, 1, 1, "direct"),  # the stride-1 direct kernels
    ((2, 4, 8, 8), (8, 1, 3, 3), 1, 1, 1, 4, "auto"),  # depthwise kernels, fused backward
    ((1, 3, 9, 9), (3, 1, 5, 5), 2, 2, 1, 3, "auto"),
    ((2, 4, 5, 5), (6, 4, 1, 1), 1, 0, 1, 1, "auto"),
]

# (input shape, weight shape, stride, padding, dilation): channel multiplier 1 and 2
DEPTHWISE_CASES = [
    ((2, 3, 8, 7), (6, 1, 3, 3), 1, 1, 1),
    ((1, 4, 9, 8), (4, 1, 3, 5), (2, 1), (1, 2), (2, 1)),
]

# max_pool2d(kernel_size, stride, padding, dilation, ceil_mode)
POOL_CASES = [(3, 2, 1, 1, True), (2, 2, 0, 1, False), ((3, 2), 1, (1, 0), (2, 1), False)]


def _make(shape, device, layout=torch.contiguous_format, requires_grad=True):
    t = torch.randn(shape, dtype=torch.float64, device=device)
    if t.dim() == 4:
        t = t.contiguous(memory_format=layout)
    return t.requires_grad_(requires_grad)


def _distinct(shape, device, layout):
    # max_pool2d is differentiable only away from ties: a permutation keeps values apart
    n = 1
    for s in shape:
        n *= s
    t = torch.randperm(n, device=device).to(torch.float64).view(shape) / n
    return t.contiguous(memory_format=layout).requires_grad_()


def _conv(case, impl):
    _, _, s, p, d, g, algo = case
    if impl == "fastconv":
        return lambda x, w, b: fastconv.conv2d(x, w, b, s, p, d, g, algo=algo)
    return lambda x, w, b: F.conv2d(x, w, b, s, p, d, g)


# ------------------------------------------------------------------------------------------------
# gradgradcheck: second derivatives against finite differences of the first
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv2d_gradgradcheck(case, layout, device):
    x = _make(case[0], device, layout)
    w = _make(case[1], device)
    b = _make(case[1][0], device)
    assert gradgradcheck(_conv(case, "fastconv"), (x, w, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=str)
def test_depthwise_conv2d_gradgradcheck(case, layout, device):
    xs, ws, s, p, d = case
    x, w, b = _make(xs, device, layout), _make(ws, device), _make(ws[0], device)
    assert gradgradcheck(lambda x, w, b: fastconv.depthwise_conv2d(x, w, b, s, p, d), (x, w, b))
    # without a bias, and with only some arguments requiring grad
    assert gradgradcheck(lambda x: fastconv.depthwise_conv2d(x, w.detach(), None, s, p, d), (x,))
    assert gradgradcheck(lambda w: fastconv.depthwise_conv2d(x.detach(), w, None, s, p, d), (w,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("return_indices", [False, True])
@pytest.mark.parametrize("args", POOL_CASES, ids=str)
def test_max_pool2d_gradgradcheck(args, return_indices, layout, device):
    # return_indices picks the forward's index mode: 'full', else 'compact' (uint8), which the
    # second derivative turns back into flat indices
    x = _distinct((2, 3, 9, 8), device, layout)

    def f(x):
        out = fastconv.max_pool2d(x, *args, return_indices=return_indices)
        return out[0] if return_indices else out

    assert gradcheck(f, (x,))
    assert gradgradcheck(f, (x,))


# ------------------------------------------------------------------------------------------------
# against torch: what users differentiate twice
# ------------------------------------------------------------------------------------------------

def _penalty_grads(fn, params, x):
    """A gradient penalty: the gradients of ||d(sum y^2)/dx||^2 with respect to params and x."""
    y = fn(x, *params)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    return torch.autograd.grad(gx.square().sum(), (x, *params))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv2d_gradient_penalty_matches_torch(case, layout, device):
    x = _make(case[0], device, layout)
    w, b = _make(case[1], device), _make(case[1][0], device)
    mine = _penalty_grads(lambda x, w, b: _conv(case, "fastconv")(x, w, b), (w, b), x)
    ref = _penalty_grads(lambda x, w, b: _conv(case, "torch")(x, w, b), (w, b), x)
    for m, r in zip(mine, ref):
        assert_close(m, r)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=str)
def test_depthwise_second_derivatives_match_torch(case, device):
    xs, ws, s, p, d = case
    x, w, b = _make(xs, device, CL), _make(ws, device), _make(ws[0], device)
    c = xs[1]

    def both(fn):
        y = fn(x, w, b)
        # all three first derivatives at once (the fused backward), each differentiated again
        gx, gw, gb = torch.autograd.grad(y.square().sum(), (x, w, b), create_graph=True)
        ramp = torch.arange(gb.numel(), device=device)
        loss = gx.square().sum() + gw.pow(3).sum() + (gb * ramp).sum()
        return torch.autograd.grad(loss, (x, w, b))

    mine = both(lambda x, w, b: fastconv.depthwise_conv2d(x, w, b, s, p, d))
    ref = both(lambda x, w, b: F.conv2d(x, w, b, s, p, d, c))
    for m, r in zip(mine, ref):
        assert_close(m, r)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("args", POOL_CASES, ids=str)
def test_max_pool2d_second_derivatives_match_torch(args, layout, device):
    x = _distinct((2, 3, 9, 8), device, layout)
    w = torch.randn(2, 3, 9, 8, dtype=torch.float64, device=device)

    def grads(pool):
        y = pool(x * w)  # a weighted input, so that the second derivative reaches x
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.pow(3).sum(), x)[0]

    assert_close(grads(lambda t: fastconv.max_pool2d(t, *args)),
                 grads(lambda t: F.max_pool2d(t, *args)))
    # the backward's value does not depend on the input's, only on where the maxima are: its
    # derivative with respect to the input is zero, as torch's is
    y = fastconv.max_pool2d(x, *args)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.sum(), x)
    assert torch.count_nonzero(ggx) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_third_derivatives_match_torch(device):
    # the double-backward formulas call the ops through the dispatcher, so they differentiate too
    x = _make((2, 4, 7, 6), device, CL)
    w = _make((6, 2, 3, 3), device)
    dw = _make((6, 1, 3, 3), device)

    def third(conv, dwconv, pool):
        y = pool(dwconv(conv(x, w), dw))
        (g1,) = torch.autograd.grad(y.pow(4).sum(), x, create_graph=True)
        (g2,) = torch.autograd.grad(g1.square().sum(), w, create_graph=True)
        return torch.autograd.grad(g2.pow(3).sum(), (x, w, dw))

    mine = third(lambda x, w: fastconv.conv2d(x, w, None, 1, 1, 1, 2),
                 lambda x, w: fastconv.depthwise_conv2d(x, w, None, 1, 1),
                 lambda t: fastconv.max_pool2d(t, 2))
    ref = third(lambda x, w: F.conv2d(x, w, None, 1, 1, 1, 2),
                lambda x, w: F.conv2d(x, w, None, 1, 1, 1, 6),
                lambda t: F.max_pool2d(t, 2))
    for m, r in zip(mine, ref):
        assert_close(m, r)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_forward_over_reverse_matches_torch(case, device):
    # A Hessian-vector product the forward-mode way: the tangent of a gradient, which runs the
    # backward ops on dual tensors.
    x = _make(case[0], device, CL, requires_grad=False)
    w = _make(case[1], device, requires_grad=False)
    b = _make(case[1][0], device, requires_grad=False)
    tx, tw, tb = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)

    def hvp(conv):
        with fwAD.dual_level():
            args = [fwAD.make_dual(t, tan).requires_grad_()
                    for t, tan in ((x, tx), (w, tw), (b, tb))]
            y = conv(*args)
            grads = torch.autograd.grad(y.pow(3).sum(), args)
            return [fwAD.unpack_dual(g).tangent for g in grads]

    mine, ref = hvp(_conv(case, "fastconv")), hvp(_conv(case, "torch"))
    for m, r in zip(mine, ref):
        assert m is not None
        assert_close(m, r)


@pytest.mark.parametrize("device", DEVICES)
def test_a_backward_after_its_dual_level_sees_no_tangents(device):
    # leaving a dual level takes its tangents away, also from what the forward saved
    x = _make((1, 2, 5, 5), device, requires_grad=False)
    w = _make((3, 2, 3, 3), device)
    for conv in (lambda x, w: fastconv.conv2d(x, w, None, 1, 1),
                 lambda x, w: F.conv2d(x, w, None, 1, 1)):
        with fwAD.dual_level():
            y = conv(fwAD.make_dual(x, torch.randn_like(x)), w)
            y = fwAD.unpack_dual(y).primal
        with fwAD.dual_level():
            (gw,) = torch.autograd.grad(y.square().sum(), w)
            assert fwAD.unpack_dual(gw).tangent is None
        assert_close(gw, torch.autograd.grad(F.conv2d(x, w, None, 1, 1).square().sum(), w)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_forward_over_reverse_through_max_pool2d(device):
    x = _distinct((2, 3, 9, 8), device, CL).detach()
    tx = torch.randn_like(x)

    def hvp(pool):
        with fwAD.dual_level():
            xd = fwAD.make_dual(x, tx).requires_grad_()
            (g,) = torch.autograd.grad(pool(xd).pow(3).sum(), xd)
            return fwAD.unpack_dual(g).tangent

    assert_close(hvp(lambda t: fastconv.max_pool2d(t, 3, 2, 1)),
                 hvp(lambda t: F.max_pool2d(t, 3, 2, 1)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", [dict(), dict(vectorize=True),
                                      dict(vectorize=True, outer_jacobian_strategy="forward-mode")],
                         ids=["loop", "vectorize", "forward-mode"])
def test_autograd_functional_hessian_and_hvp_match_torch(strategy, device):
    # torch.autograd.functional runs on double backward; vectorize=True batches the gradients
    # through a vmap of its own, and forward-mode puts tangents on the backward's inputs
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, device=device)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, device=device)
    dw = torch.randn(3, 1, 3, 3, dtype=torch.float64, device=device)

    def model(conv, dwconv, pool):
        return lambda w, dw: pool(dwconv(conv(x, w).tanh(), dw)).pow(3).sum()

    mine = model(lambda x, w: fastconv.conv2d(x, w, None, 1, 1),
                 lambda x, w: fastconv.depthwise_conv2d(x, w, None, 1, 1),
                 lambda t: fastconv.max_pool2d(t, 2))
    ref = model(lambda x, w: F.conv2d(x, w, None, 1, 1),
                lambda x, w: F.conv2d(x, w, None, 1, 1, 1, 3),
                lambda t: F.max_pool2d(t, 2))
    # torch's own max_pool2d has no batching rule for the forward-mode strategy: its Hessian is
    # taken the plain way
    expected = torch.autograd.functional.hessian(ref, (w, dw))
    got = torch.autograd.functional.hessian(mine, (w, dw), **strategy)
    for row_m, row_r in zip(got, expected):
        for m, r in zip(row_m, row_r):
            assert_close(m, r)
    v = (torch.randn_like(w), torch.randn_like(dw))
    for m, r in zip(torch.autograd.functional.hvp(mine, (w, dw), v)[1],
                    torch.autograd.functional.hvp(ref, (w, dw), v)[1]):
        assert_close(m, r)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_is_grads_batched_matches_torch(layout, device):
    # one backward for a batch of grad_outputs (torch's legacy vmap, as in
    # torch.autograd.functional.jacobian(vectorize=True)); the fused depthwise backward returns
    # a list, which that vmap cannot run, so its ops run one by one there
    x = _make((2, 4, 6, 6), device, layout)
    w, dw = _make((4, 4, 3, 3), device), _make((8, 1, 3, 3), device)
    b = _make(8, device)

    def grads(conv, dwconv, pool):
        y = pool(dwconv(conv(x, w), dw, b))
        gen = torch.Generator(device).manual_seed(1)
        gos = torch.randn((3, *y.shape), dtype=y.dtype, device=device, generator=gen)
        return torch.autograd.grad(y, (x, w, dw, b), gos, is_grads_batched=True)

    mine = grads(lambda x, w: fastconv.conv2d(x, w, None, 1, 1),
                 lambda x, w, b: fastconv.depthwise_conv2d(x, w, b, 1, 1),
                 lambda t: fastconv.max_pool2d(t, 3, 2, 1))
    ref = grads(lambda x, w: F.conv2d(x, w, None, 1, 1),
                lambda x, w, b: F.conv2d(x, w, b, 1, 1, 1, 4),
                lambda t: F.max_pool2d(t, 3, 2, 1))
    for m, r in zip(mine, ref):
        assert_close(m, r)


@pytest.mark.parametrize("device", DEVICES)
def test_only_some_outputs_of_the_fused_backward_are_differentiated(device):
    # _depthwise_conv2d_backward's outputs with no gradient of their own (undefined) are zero
    x, w = _make((2, 4, 6, 6), device), _make((4, 1, 3, 3), device)
    for pick in itertools.product([0, 1], repeat=2):
        if not any(pick):
            continue

        def grads(conv):
            gx, gw = torch.autograd.grad(conv(x, w).square().sum(), (x, w), create_graph=True)
            loss = sum(g.square().sum() for g, on in zip((gx, gw), pick) if on)
            return torch.autograd.grad(loss, (x, w), allow_unused=True, materialize_grads=True)

        mine = grads(lambda x, w: fastconv.depthwise_conv2d(x, w, None, 1, 1))
        ref = grads(lambda x, w: F.conv2d(x, w, None, 1, 1, 1, 4))
        for m, r in zip(mine, ref):
            assert_close(m, r)


def test_wgan_gp_step_on_a_converted_model_matches_torch():
    # The users' case: a critic of real layers, a gradient penalty on its input, one optimiser
    # step; the converted model's parameters follow torch's.
    torch.manual_seed(0)
    critic = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.LeakyReLU(0.2), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Tanh(),
        nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 4 * 4, 1),
    ).double()
    mine = fastconv.convert(critic)  # a converted copy
    assert sum(isinstance(m, (fastconv.nn.Conv2d, fastconv.nn.DepthwiseConv2d, fastconv.nn.MaxPool2d))
               for m in mine.modules()) == 4
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)

    def step(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        xr = x.clone().requires_grad_()
        out = model(xr)
        (gx,) = torch.autograd.grad(out.sum(), xr, create_graph=True)
        loss = out.mean() + 10 * (gx.flatten(1).norm(dim=1) - 1).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for m, r in zip(step(mine), step(critic)):
        assert_close(m, r)
