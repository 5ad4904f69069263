"""torch.compile(fullgraph=True) over models built from fastconv layers: the ops trace through
their fake kernels and registered autograd with no graph break, and the compiled forward and
backward give the eager results."""

import pytest
import torch
from torch import nn

import fastconv
from fastconv import nn as fnn
from fastconv.models import MBConv, SimpleCNN
from conftest import assert_close


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _simplecnn():
    torch.manual_seed(0)
    return fastconv.convert(SimpleCNN(3, 5, input_size=8, widths=(4, 8, 8), hidden=16))


def _mbconv():
    # depthwise conv, squeeze-excitation 1x1 convs and a max-pool with indices
    torch.manual_seed(0)
    return fastconv.convert(nn.Sequential(
        MBConv(4, 4, expand_ratio=2, kernel_size=3, se_ratio=0.5),
        nn.MaxPool2d(3, 2, 1, ceil_mode=True),
    ))


def _eager_and_compiled(make, x, backend, dtype=torch.float32):
    eager = make().to(dtype)
    compiled_model = make().to(dtype)
    compiled = torch.compile(compiled_model, backend=backend, fullgraph=True)
    results = []
    for model, fn in ((eager, eager), (compiled_model, compiled)):
        xi = x.detach().clone().to(dtype).requires_grad_(True)
        y = fn(xi)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), xi.grad, {n: p.grad for n, p in model.named_parameters()}))
    return results


def _assert_same(results, dtype):
    (y1, gx1, gp1), (y2, gx2, gp2) = results
    assert_close(y2, y1, dtype)
    assert_close(gx2, gx1, dtype)
    for n in gp1:
        assert_close(gp2[n], gp1[n], dtype, msg=lambda m: f"grad of {n}: {m}")


@pytest.mark.parametrize("make", [_simplecnn, _mbconv], ids=["simplecnn", "mbconv_pool"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_compile_aot_eager_matches_eager(make, train):
    x = torch.randn(2, 3 if make is _simplecnn else 4, 8, 8)

    def build():
        return make().train(train)

    _assert_same(_eager_and_compiled(build, x, "aot_eager"), torch.float32)


def test_compile_graph_has_fastconv_ops():
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    model = _mbconv().eval()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        compiled(torch.randn(1, 4, 8, 8))
    assert {"fastconv.conv2d", "fastconv.depthwise_conv2d", "fastconv.max_pool2d"} <= set(seen)
    # no torch conv / max-pool anywhere in the graph (the SE block's average pool is torch's)
    others = [t for t in seen if not t.startswith("fastconv.")
              and ("conv" in t or ("pool" in t and "adaptive_avg_pool2d" not in t))]
    assert others == []


def test_compile_dynamic_batch():
    model = _simplecnn().eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        for n in (1, 3, 5):
            x = torch.randn(n, 3, 8, 8)
            assert_close(compiled(x), model(x))


def _conv_relu_pool():
    torch.manual_seed(0)
    return nn.Sequential(fnn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), fnn.MaxPool2d(2))


@pytest.mark.slow  # a cold inductor cache takes 30-40 s of g++ on a busy 2-core machine
def test_compile_inductor_matches_eager():
    # inductor leaves the custom ops as extern calls and generates C++ for what is around
    # them (kept tiny: every generated kernel is a g++ run)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    _assert_same(_eager_and_compiled(_conv_relu_pool, x, "inductor", dtype=torch.float64),
                 torch.float64)


def test_compile_functional_padding_modes():
    torch.manual_seed(0)
    conv = fnn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect", algo="im2col").double()
    compiled = torch.compile(conv, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    assert_close(compiled(x), conv(x))
    # unbatched input goes through the same Python normalisation inside the graph
    assert_close(compiled(x[0]), conv(x[0]))


def _compiled_autograd():
    ca = getattr(torch._dynamo, "compiled_autograd", None)
    if ca is None or not hasattr(ca, "_enable"):
        pytest.skip("this torch has no torch._dynamo.compiled_autograd._enable")
    return ca


def test_compiled_autograd_matches_eager():
    # Compiled autograd traces the backward graph, C++ autograd nodes included; it rejects a
    # node whose context marks outputs non-differentiable (max_pool2d's indices once were).
    ca = _compiled_autograd()

    def loss(model, x):
        y = model(x)
        # max_pool2d with indices returned, on top of the model's own pool (compact indices)
        p, idx = fastconv.max_pool2d(y, 2, return_indices=True, ceil_mode=True)
        assert not idx.requires_grad
        return (y.square().sum() + p.sum()), idx

    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    results, indices = [], []
    for compiled in (False, True):
        model = _mbconv().double()
        xi = x.clone().requires_grad_(True)
        l, idx = loss(model, xi)
        if compiled:
            with ca._enable(torch.compile(backend="eager")):
                l.backward()
        else:
            l.backward()
        results.append((l.detach(), xi.grad, {n: p.grad for n, p in model.named_parameters()}))
        indices.append(idx)
    assert torch.equal(*indices)
    _assert_same(results, torch.float64)


@pytest.mark.filterwarnings("error:There is a performance drop")  # torch's per-sample fallback
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_vmap_matches_a_loop(channels_last):
    # The ops' vmap rules fold the vmapped dim into the image batch, or into the groups when
    # the weight or bias is vmapped: one call either way (tests/test_func.py: the other
    # transforms).
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xs = torch.randn(3, 2, 4, 7, 7, dtype=torch.float64)
    xs = torch.stack([x.contiguous(memory_format=fmt) for x in xs])
    ws = torch.randn(3, 4, 1, 3, 3, dtype=torch.float64)
    bs = torch.randn(3, 4, dtype=torch.float64)
    w, b = ws[0], bs[0]
    w2 = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    cases = [
        (lambda x: fastconv.conv2d(x, w, b, 1, 1, 1, 4), (xs,), 0),
        (lambda x: fastconv.conv2d(x, w2, None, 2, 1, 1, 2, algo="im2col"), (xs,), 0),
        (lambda x: fastconv.depthwise_conv2d(x, w, b, padding=1), (xs,), 0),
        (lambda x: fastconv.max_pool2d(x, 3, 2, 1, ceil_mode=True), (xs,), 0),
        (lambda x: fastconv.max_pool2d(x, 2, return_indices=True), (xs,), 0),
        # vmapped dim not first
        (lambda x: fastconv.depthwise_conv2d(x, w, padding=1), (xs.movedim(0, 2),), 2),
        # vmapped weight / bias: the vmapped dim becomes groups (one call)
        (lambda x, w: fastconv.conv2d(x, w, None, 1, 1, 1, 4), (xs, ws), 0),
        (lambda x, b: fastconv.depthwise_conv2d(x, w, b, padding=1), (xs, bs), 0),
        (lambda w: fastconv.conv2d(xs[0], w, None, 1, 1, 1, 4), (ws,), 0),
    ]
    for fn, args, dim in cases:
        out = torch.func.vmap(fn, in_dims=dim)(*args)
        ref = [fn(*(a.select(dim, i) for a in args)) for i in range(3)]
        if isinstance(out, tuple):
            for o, r in zip(out, zip(*ref)):
                assert torch.equal(o, torch.stack(r))
        else:
            assert torch.equal(out, torch.stack(ref))


@pytest.mark.filterwarnings("ignore:`torch.jit.trace.*` is deprecated:FutureWarning")
@pytest.mark.parametrize("make", [_simplecnn, _mbconv], ids=["simplecnn", "mbconv"])
def test_export_and_trace_give_the_eager_results(make):
    """torch.export and torch.jit.trace record the fastconv ops themselves (README's support
    matrix); torch.jit.script does not take fastconv's modules (their forward is Python)."""
    model = make().eval()
    x = torch.randn(2, 3 if make is _simplecnn else 4, 8, 8)
    with torch.no_grad():
        ref = model(x)
        exported = torch.export.export(model, (x,))
        assert any(str(n.target).startswith("fastconv.") for n in exported.graph.nodes)
        assert_close(exported.module()(x), ref)
        traced = torch.jit.trace(model, (x,))
        assert "fastconv::" in str(traced.inlined_graph)
        assert_close(traced(x), ref)
