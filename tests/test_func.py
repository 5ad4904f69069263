"""torch.func transforms through fastconv's functions and modules: grad, vjp, jacrev, jacfwd,
hessian, vmap of a gradient (per-sample gradients), gradients of gradients, against torch's own
ops in float64. Under a transform the functions go through fastconv/_functorch.py's Python
autograd.Functions (torch refuses the ops' C++ ones there); the ops' vmap rules
(fastconv/_registrations.py) batch every op those call, the backward ops included."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import fastconv
from conftest import DEVICES, assert_close

CL = torch.channels_last
ops = torch.ops.fastconv

# (name, fastconv layer, torch layer, weight shape, has bias); x is (N, 4, 8, 7)
LAYERS = [
    ("im2col", lambda x, w, b: fastconv.conv2d(x, w, b, 1, 1, 1, 2, algo="im2col"),
     lambda x, w, b: F.conv2d(x, w, b, 1, 1, 1, 2), (6, 2, 3, 3)),
    ("direct-strided", lambda x, w, b: fastconv.conv2d(x, w, b, 2, (1, 0), (1, 2), algo="direct"),
     lambda x, w, b: F.conv2d(x, w, b, 2, (1, 0), (1, 2)), (5, 4, 3, 2)),
    ("auto-depthwise", lambda x, w, b: fastconv.conv2d(x, w, b, 1, "same", 1, 4),
     lambda x, w, b: F.conv2d(x, w, b, 1, "same", 1, 4), (8, 1, 3, 3)),
    ("depthwise", lambda x, w, b: fastconv.depthwise_conv2d(x, w, b, 2, 2, 1),
     lambda x, w, b: F.conv2d(x, w, b, 2, 2, 1, 4), (4, 1, 5, 5)),
]

POOLS = [(lambda t: fastconv.max_pool2d(t, 3, 2, 1, ceil_mode=True),
          lambda t: F.max_pool2d(t, 3, 2, 1, ceil_mode=True)),
         (lambda t: fastconv.max_pool2d(t, (2, 3), 1, (1, 0), (2, 1)),
          lambda t: F.max_pool2d(t, (2, 3), 1, (1, 0), (2, 1)))]


def _inputs(device, layout, wshape, n=3):
    g = torch.Generator().manual_seed(0)
    kw = dict(dtype=torch.float64, generator=g)
    # distinct values, so that max_pool2d has no ties
    x = (torch.randperm(n * 4 * 8 * 7, generator=g).to(torch.float64) / 50).view(n, 4, 8, 7)
    w = torch.randn(wshape, **kw) / 3
    b = torch.randn(wshape[0], **kw)
    return (x.to(device).contiguous(memory_format=layout), w.to(device), b.to(device))


def _model(conv, pool):
    return lambda w, b, x: pool(conv(x, w, b).tanh()).pow(3).sum()


def _assert_trees_close(mine, ref):
    mine, ref = torch.utils._pytree.tree_leaves(mine), torch.utils._pytree.tree_leaves(ref)
    assert len(mine) == len(ref)
    for m, r in zip(mine, ref):
        assert_close(m, r)


TRANSFORMS = {
    "grad": lambda f, w, b, x: grad(f, argnums=(0, 1, 2))(w, b, x),
    "vjp": lambda f, w, b, x: vjp(f, w, b, x)[1](torch.tensor(1.0, dtype=x.dtype,
                                                             device=x.device)),
    "jacrev": lambda f, w, b, x: jacrev(lambda w, b: f(w, b, x).reshape(1), argnums=(0, 1))(w, b),
    "jacfwd": lambda f, w, b, x: jacfwd(f, argnums=(0, 1))(w, b, x),
    "hessian": lambda f, w, b, x: hessian(f, argnums=(0, 1))(w, b, x),
    "vmap(grad)": lambda f, w, b, x: vmap(grad(lambda w, b, x: f(w, b, x[None]), argnums=(0, 1)),
                                         in_dims=(None, None, 0))(w, b, x),
    "grad(grad)": lambda f, w, b, x: grad(lambda w: grad(f, argnums=2)(w, b, x).square().sum())(w),
    "jvp(grad)": lambda f, w, b, x: jvp(lambda w: grad(f)(w, b, x), (w,), (torch.ones_like(w),)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("pool", range(len(POOLS)))
@pytest.mark.parametrize("layer", LAYERS, ids=[c[0] for c in LAYERS])
def test_transforms_match_torch(layer, pool, transform, layout, device):
    _, conv, conv_ref, wshape = layer
    x, w, b = _inputs(device, layout, wshape)
    apply = TRANSFORMS[transform]
    mine = apply(_model(conv, POOLS[pool][0]), w, b, x)
    ref = apply(_model(conv_ref, POOLS[pool][1]), w, b, x)
    _assert_trees_close(mine, ref)


@pytest.mark.filterwarnings("error:There is a performance drop")  # torch's per-sample fallback
@pytest.mark.parametrize("device", DEVICES)
def test_per_sample_gradients_of_a_converted_model(device):
    # torch.func's per-sample-gradient recipe (functional_call + vmap(grad)) on real layers
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 4, 1), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5)).double().to(device)
    mine = fastconv.convert(model)
    assert sum(type(m).__module__ == "fastconv.nn" for m in mine.modules()) == 4
    xs = torch.randn(6, 3, 8, 8, dtype=torch.float64, device=device)
    ys = torch.randint(0, 5, (6,), device=device)

    def per_sample(m):
        params = {k: v.detach() for k, v in m.named_parameters()}

        def loss(p, x, y):
            return F.cross_entropy(functional_call(m, p, (x[None],)), y[None])

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, xs, ys)

    got, want = per_sample(mine), per_sample(model)
    assert got.keys() == want.keys()
    for k in want:
        assert_close(got[k], want[k])


@pytest.mark.filterwarnings("error:There is a performance drop")
@pytest.mark.parametrize("device", DEVICES)
def test_model_ensembling_with_vmapped_weights(device):
    # vmap over stacked parameters: the vmapped weight becomes groups (one call)
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.Tanh(),
                            nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.MaxPool2d(2))
              .double().to(device) for _ in range(3)]
    converted = [fastconv.convert(m) for m in models]
    params, _ = torch.func.stack_module_state(converted)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, device=device)

    def run(p, x):
        return functional_call(converted[0], p, (x,))

    out = vmap(run, in_dims=(0, None))(params, x)
    for i, m in enumerate(models):
        assert_close(out[i], m(x))
    # and its gradient with respect to each model's parameters
    g = vmap(grad(lambda p, x: run(p, x).square().sum()), in_dims=(0, None))(params, x)
    for i, m in enumerate(models):
        ref = torch.autograd.grad(m(x).square().sum(), list(m.parameters()))
        for (name, _), r in zip(m.named_parameters(), ref):
            assert_close(g[name][i], r)


@pytest.mark.filterwarnings("error:There is a performance drop")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dims", [(0, 0), (0, None), (None, 0), (1, 0)], ids=str)
def test_grad_ops_vmap_rules_match_a_loop(dims, device):
    # the backward ops' vmap rules: images fold into the batch, a vmapped weight (or
    # grad_weight's sum over images) into the groups
    torch.manual_seed(0)
    kw = dict(dtype=torch.float64, device=device)
    args = ([1, 2], [1, 1], [1, 1])
    gos = torch.randn(3, 2, 6, 7, 4, **kw)  # 3 samples of (N=2, O=6, 7, 4)
    xs = torch.randn(3, 2, 4, 7, 7, **kw)
    ws = torch.randn(3, 6, 2, 3, 3, **kw)
    dws = torch.randn(3, 8, 1, 3, 3, **kw)
    dgos = torch.randn(3, 2, 8, 7, 4, **kw)

    def take(t, d, i):
        return t if d is None else t.select(0, i)

    def prepared(t, d):  # the vmapped dim moved to d (or the first sample, shared)
        return t[0] if d is None else t.movedim(0, d)

    cases = [
        (lambda g, w: ops._conv2d_grad_input(g, w, [2, 4, 7, 7], *args, 2, "auto"), gos, ws),
        (lambda g, x: ops._conv2d_grad_weight(g, x, [6, 2, 3, 3], *args, 2, "im2col"), gos, xs),
        (lambda g, w: ops._depthwise_conv2d_grad_input(g, w, [2, 4, 7, 7], *args), dgos, dws),
        (lambda g, x: ops._depthwise_conv2d_grad_weight(g, x, [8, 1, 3, 3], *args), dgos, xs),
    ]
    for fn, a, b in cases:
        got = vmap(fn, in_dims=dims)(prepared(a, dims[0]), prepared(b, dims[1]))
        for i in range(3):
            a_i = a[0] if dims[0] is None else a[i]
            b_i = b[0] if dims[1] is None else b[i]
            assert_close(got[i], fn(a_i, b_i))


@pytest.mark.filterwarnings("error:There is a performance drop")
@pytest.mark.parametrize("device", DEVICES)
def test_max_pool2d_backward_vmap_rule_matches_a_loop(device):
    xs = torch.randn(3, 2, 4, 9, 8, dtype=torch.float64, device=device)
    args = ([3, 3], [2, 2], [1, 1], [1, 1], True)
    idx = torch.stack([ops.max_pool2d(x, *args, "full")[1] for x in xs])
    gos = torch.randn(idx.shape, dtype=torch.float64, device=device)
    for dims in [(0, 0, 0), (0, None, None), (1, 0, 0)]:
        def prepared(t, d):
            return t[0] if d is None else t.movedim(0, d)

        got = vmap(lambda g, x, i: ops._max_pool2d_backward(g, x, i, *args), in_dims=dims)(
            *(prepared(t, d) for t, d in zip((gos, xs, idx), dims)))
        for i in range(3):
            sample = [t[0] if d is None else t[i] for t, d in zip((gos, xs, idx), dims)]
            assert_close(got[i], ops._max_pool2d_backward(*sample, *args))


def test_only_differentiating_transforms_take_the_python_path():
    # outside torch.func, and under vmap alone, the functions call the ops (C++ autograd);
    # under grad / jvp and the like, the Functions
    assert not fastconv._functorch.active()
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    w = torch.randn(3, 2, 3, 3)
    assert "CppNode<fastconv" in fastconv.conv2d(x, w).grad_fn.name()  # the C++ node
    seen = []

    def f(x):
        seen.append(fastconv._functorch.active())
        return fastconv.conv2d(x, w).sum()

    grad(f)(x.detach())
    vmap(f)(x.detach()[None])
    vmap(grad(f))(x.detach()[None])
    grad(lambda x: vmap(f)(x).sum())(x.detach()[None])
    assert seen == [True, False, True, True]


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_alone_keeps_the_graph_below_it(device):
    # under vmap alone the ops' autograd records below the transform: a backward through a
    # vmapped max_pool2d needs indices, although a batched input reports requires_grad=False
    kw = dict(dtype=torch.float64, device=device)
    x = torch.randn(3, 2, 4, 7, 6, **kw, requires_grad=True)
    w = torch.randn(3, 5, 4, 3, 3, **kw, requires_grad=True)

    def net(conv, pool):
        return lambda x, w: pool(conv(x, w)).square().sum()

    mine = vmap(net(lambda x, w: fastconv.conv2d(x, w, None, 1, 1),
                    lambda t: fastconv.max_pool2d(t, 3, 2, 1)))(x, w)
    ref = torch.stack([net(lambda x, w: F.conv2d(x, w, None, 1, 1),
                           lambda t: F.max_pool2d(t, 3, 2, 1))(x[i], w[i]) for i in range(3)])
    assert_close(mine, ref)
    _assert_trees_close(torch.autograd.grad(mine.sum(), (x, w)),
                        torch.autograd.grad(ref.sum(), (x, w)))


def test_the_raw_ops_under_a_transform_are_a_clear_error():
    # torch.ops.fastconv.* carry C++ autograd functions, which torch refuses under torch.func
    w = torch.randn(3, 2, 3, 3)
    with pytest.raises(RuntimeError, match="C\\+\\+ torch::autograd::Function with functorch"):
        grad(lambda x: ops.conv2d(x, w, None, [1, 1], [0, 0], [1, 1], 1, "auto").sum())(
            torch.randn(1, 2, 5, 5))


@pytest.mark.filterwarnings("error:There is a performance drop")
@pytest.mark.parametrize("device", DEVICES)
def test_vmap_over_autograd_grad_matches_torch(device):
    # cotangents vmapped into a graph built outside any transform: the C++ backward's ops,
    # the fused depthwise backward included, run under vmap with their rules
    torch.manual_seed(0)
    kw = dict(dtype=torch.float64, device=device)
    x = torch.randn(2, 4, 6, 6, **kw).contiguous(memory_format=CL).requires_grad_()
    w = torch.randn(8, 1, 3, 3, **kw, requires_grad=True)
    b = torch.randn(8, **kw, requires_grad=True)
    w2 = torch.randn(6, 4, 3, 3, **kw, requires_grad=True)
    for layer, ref, inputs in [
        (lambda: fastconv.depthwise_conv2d(x, w, b, 1, 1), lambda: F.conv2d(x, w, b, 1, 1, 1, 4),
         (x, w, b)),
        (lambda: fastconv.conv2d(x, w, b, 1, 1, 1, 4), lambda: F.conv2d(x, w, b, 1, 1, 1, 4),
         (x, w, b)),
        (lambda: fastconv.conv2d(x, w2, None, 2, 1), lambda: F.conv2d(x, w2, None, 2, 1), (x, w2)),
        (lambda: fastconv.max_pool2d(x, 3, 2, 1), lambda: F.max_pool2d(x, 3, 2, 1), (x,)),
    ]:
        out, out_ref = layer(), ref()
        vs = torch.randn(3, *out.shape, **kw)
        got = vmap(lambda v: torch.autograd.grad(out, inputs, v, retain_graph=True))(vs)
        want = vmap(lambda v: torch.autograd.grad(out_ref, inputs, v, retain_graph=True))(vs)
        _assert_trees_close(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_same_padding_with_an_extra_row_under_vmap(device):
    # padding='same' with an even kernel pads one extra row and column itself; under vmap it
    # cannot ask a channels_last input for its layout, and does not need to
    kw = dict(dtype=torch.float64, device=device)
    x = torch.randn(3, 2, 4, 6, 5, **kw).permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    w = torch.randn(6, 4, 2, 2, **kw)
    dw = torch.randn(4, 1, 4, 2, **kw)
    for mine, ref in [
        (lambda x: fastconv.conv2d(x, w, padding="same"), lambda x: F.conv2d(x, w, padding="same")),
        (lambda x: fastconv.depthwise_conv2d(x, dw, padding="same", dilation=(1, 2)),
         lambda x: F.conv2d(x, dw, padding="same", dilation=(1, 2), groups=4)),
    ]:
        assert_close(vmap(mine)(x), vmap(ref)(x))
        assert_close(vmap(grad(lambda x: mine(x).square().sum()))(x),
                     vmap(grad(lambda x: ref(x).square().sum()))(x))


def test_vmapped_weight_and_bias_errors_name_the_callers_sizes():
    # a vmapped weight runs one grouped call; its arguments are still checked per sample
    x = torch.randn(2, 4, 6, 5)
    ws = torch.randn(3, 6, 4, 3, 3)
    with pytest.raises(ValueError, match=r"expected input channels \(4\) to be divisible by "
                                         r"groups \(3\)"):
        vmap(lambda w: fastconv.conv2d(x, w, None, 1, 1, 1, 3))(ws)
    for bad in (torch.randn(3, 5), torch.randn(3, 6, 1), torch.randn(3, 2, 3)):
        with pytest.raises(ValueError, match=r"expected bias to be a 1-D tensor of size "
                                             r"out_channels \(6\), but got shape \["):
            vmap(lambda w, b: fastconv.conv2d(x, w, b, 1, 1))(ws, bad)
        with pytest.raises(ValueError, match="expected bias to be a 1-D tensor"):
            vmap(lambda b: fastconv.conv2d(x, ws[0], b, 1, 1))(bad)
