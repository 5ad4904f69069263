"""Shared test helpers: devices, the one tolerance table, input snapshots."""

import pytest
import torch

import fastconv  # noqa: F401  (registers the ops)

HAS_CUDA = torch.cuda.is_available() and bool(getattr(fastconv._C, "with_cuda", 0))

# Every device-parametrised test uses these; CUDA cases are marked and skipped without a GPU.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]),
]

# One tolerance table for every op: (rtol, atol) against a float64 ground truth, per dtype.
# Low-precision dtypes scale atol with the reduction length (see tol()).
TOLERANCES = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 2e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


def tol(dtype, reduction=1):
    """(rtol, atol) for results of `dtype` whose elements sum `reduction` products."""
    rtol, atol = TOLERANCES[dtype]
    scale = max(1.0, float(reduction) ** 0.5)
    return rtol, atol * scale


def unread_positions(size, k, s, p, d):
    """Input positions along one dimension of `size` that no window of a kernel `k` with stride
    `s`, padding `p` and dilation `d` reads."""
    out = (size + 2 * p - d * (k - 1) - 1) // s + 1
    read = {o * s - p + t * d for o in range(out) for t in range(k)}
    return [i for i in range(size) if i not in read]


def poison_unread(x, k, s, p, d):
    """A copy of the (N, C, H, W) tensor x with inf in the rows and NaN in the columns that no
    window reads (square kernel k, stride s, padding p, dilation d); the shape must have some."""
    rows = unread_positions(x.shape[-2], k, s, p, d)
    cols = unread_positions(x.shape[-1], k, s, p, d)
    assert rows and cols, "every row or every column is read: no place to poison"
    x = x.detach().clone()
    x[:, :, rows, :] = float("inf")
    x[:, :, :, cols] = float("nan")
    return x


def assert_close(actual, expected, dtype=None, reduction=1, **kw):
    dtype = dtype or actual.dtype
    rtol, atol = tol(dtype, reduction)
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol,
                               equal_nan=True, **kw)


class Snapshot:
    """Records tensors' values and metadata; .check() asserts none was modified."""

    def __init__(self, *tensors):
        self.items = [(t, t.detach().clone(), t.stride(), t._version)
                      for t in tensors if isinstance(t, torch.Tensor)]

    def check(self):
        for t, copy, stride, version in self.items:
            assert t._version == version, "an input was modified in place"
            assert t.stride() == stride
            torch.testing.assert_close(t.detach(), copy, rtol=0, atol=0, equal_nan=True)


def ops_called(fn):
    """The names of the ops (and other profiler events) that running fn() records."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def is_channels_last(t):
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
