"""Forward-mode AD (torch.autograd.forward_ad, torch.func.jvp / jacfwd) through fastconv's ops:
the tangents torch's own conv2d and max_pool2d give, in float64, for tangents on any subset of
input / weight / bias, both layouts, with and without a reverse-mode graph alongside."""

import itertools

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import fastconv
from conftest import DEVICES, assert_close

CL = torch.channels_last

# (input shape, weight shape, stride, padding, dilation, groups, algo)
CONV_CASES = [
    ((2, 4, 7, 6), (6, 2, 3, 3), 1, 1, 1, 2, "im2col"),
    ((2, 4, 7, 6), (6, 4, 3, 2), 2, (1, 0), (1, 2), 1, "direct"),
    ((2, 4, 8, 8), (8, 1, 3, 3), 1, 1, 1, 4, "auto"),  # depthwise kernels
    ((1, 3, 9, 9), (3, 1, 5, 5), 2, 2, 1, 3, "auto"),
]


def _dual(t, tangent):
    return fwAD.make_dual(t, tangent) if tangent is not None else t


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv2d_tangents_match_torch(case, layout, device):
    xs, ws, s, p, d, g, algo = case
    kw = dict(dtype=torch.float64, device=device)
    x = torch.randn(xs, **kw).contiguous(memory_format=layout)
    w = torch.randn(ws, **kw)
    b = torch.randn(ws[0], **kw)
    tx, tw, tb = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)
    for on in itertools.product([False, True], repeat=3):
        if not any(on):
            continue
        tans = [t if flag else None for t, flag in zip((tx, tw, tb), on)]
        with fwAD.dual_level():
            args = [_dual(t, tan) for t, tan in zip((x, w, b), tans)]
            mine = fastconv.conv2d(*args, s, p, d, g, algo=algo)
            ref = F.conv2d(*args, s, p, d, g)
            m, r = fwAD.unpack_dual(mine), fwAD.unpack_dual(ref)
        assert_close(m.primal, r.primal)
        assert m.tangent is not None, on
        assert_close(m.tangent, r.tangent)


@pytest.mark.parametrize("device", DEVICES)
def test_depthwise_conv2d_tangents_match_torch(device):
    kw = dict(dtype=torch.float64, device=device)
    x, w, b = torch.randn(2, 3, 8, 7, **kw), torch.randn(6, 1, 3, 3, **kw), torch.randn(6, **kw)
    tx, tw, tb = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)
    with fwAD.dual_level():
        args = [fwAD.make_dual(t, tan) for t, tan in ((x, tx), (w, tw), (b, tb))]
        mine = fwAD.unpack_dual(fastconv.depthwise_conv2d(*args, 1, 1)).tangent
        ref = fwAD.unpack_dual(F.conv2d(*args, 1, 1, 1, 3)).tangent
    assert_close(mine, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
@pytest.mark.parametrize("return_indices", [False, True])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_max_pool2d_tangent_matches_torch(requires_grad, return_indices, layout, device):
    # requires_grad picks the forward's index mode ('compact' for the backward, else 'none');
    # the tangent needs full indices either way.
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64, device=device).contiguous(memory_format=layout)
    x.requires_grad_(requires_grad)
    tx = torch.randn_like(x)
    args = (3, 2, 1, 1, True)
    with fwAD.dual_level():
        xd = fwAD.make_dual(x, tx)
        mine = fastconv.max_pool2d(xd, *args, return_indices=return_indices)
        ref = F.max_pool2d(xd, *args, return_indices=return_indices)
        if return_indices:
            assert torch.equal(mine[1], ref[1])
            mine, ref = mine[0], ref[0]
        m, r = fwAD.unpack_dual(mine), fwAD.unpack_dual(ref)
    assert torch.equal(m.primal, r.primal)
    assert torch.equal(m.tangent, r.tangent)
    if requires_grad:  # the reverse-mode graph is there too
        g = torch.randn_like(r.primal)
        (gx,) = torch.autograd.grad(m.primal, x, g)
        (gt,) = torch.autograd.grad(r.primal, x, g)
        assert torch.equal(gx, gt)


def test_max_pool2d_window_that_reads_no_input_has_tangent_zero():
    x = torch.randn(1, 2, 3, 1, dtype=torch.float64)
    with fwAD.dual_level():
        out = fastconv.max_pool2d(fwAD.make_dual(x, torch.randn_like(x)), (1, 2), 1, (0, 1), (2, 2))
        t = fwAD.unpack_dual(out).tangent
    assert torch.isinf(fwAD.unpack_dual(out).primal).all()
    assert torch.equal(t, torch.zeros_like(t))


def test_forward_and_reverse_mode_together():
    # A dual input that also requires grad: the tangent, and a backward through the primal.
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    tx = torch.randn_like(x)
    with fwAD.dual_level():
        mine = fastconv.conv2d(fwAD.make_dual(x, tx), w, None, 1, 1, 1, 2)
        ref = F.conv2d(fwAD.make_dual(x, tx), w, None, 1, 1, 1, 2)
        assert_close(fwAD.unpack_dual(mine).tangent, fwAD.unpack_dual(ref).tangent)
        g = torch.randn_like(ref)
        mg = torch.autograd.grad(mine, (x, w), g)
        rg = torch.autograd.grad(ref, (x, w), g)
    for a, r in zip(mg, rg):
        assert_close(a, r)


def test_func_jvp_and_jacfwd_match_torch():
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    tx = torch.randn_like(x)

    def mine(a):
        return fastconv.max_pool2d(torch.relu(fastconv.conv2d(a, w, padding=1)), 2)

    def ref(a):
        return F.max_pool2d(torch.relu(F.conv2d(a, w, padding=1)), 2)

    (_, jm), (_, jr) = torch.func.jvp(mine, (x,), (tx,)), torch.func.jvp(ref, (x,), (tx,))
    assert_close(jm, jr)
    assert_close(torch.func.jacfwd(mine)(x), torch.func.jacfwd(ref)(x))
    assert_close(torch.func.jacfwd(lambda ww: fastconv.conv2d(x, ww, padding=1))(w),
                 torch.func.jacfwd(lambda ww: F.conv2d(x, ww, padding=1))(w))
