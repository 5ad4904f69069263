"""Large CPU outputs are advised as transparent huge pages (Linux, THP in "madvise" mode) before
they are written, unless FASTCONV_HUGE_PAGES=0. The hint must not change any result."""

import sys

import pytest
import torch

import fastconv

THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode():
    try:
        with open(THP) as f:
            text = f.read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else None


def _vm_flags(address):
    """The VmFlags of the mapping of this process that contains `address`."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no mapping contains {address:#x}")


def _outputs(x, w, xp):
    out = fastconv.depthwise_conv2d(x, w, None, 1, 1)
    pooled, idx = fastconv.max_pool2d(xp, 3, 2, 1, return_indices=True)
    conv = fastconv.conv2d(x[:, :8], torch.ones(8, 8, 1, 1), algo="im2col")
    return out, pooled, idx, conv


@pytest.mark.skipif(not sys.platform.startswith("linux") or _thp_mode() != "madvise",
                    reason="needs Linux with transparent huge pages in 'madvise' mode")
@pytest.mark.parametrize("op", ["depthwise_conv2d", "max_pool2d"])
def test_large_output_is_advised(op, monkeypatch):
    monkeypatch.delenv("FASTCONV_HUGE_PAGES", raising=False)
    x = torch.randn(4, 64, 128, 128)  # 16 MiB input, 16 MiB / 4 MiB outputs
    if op == "depthwise_conv2d":
        out = fastconv.depthwise_conv2d(x, torch.randn(64, 1, 3, 3), None, 1, 1)
    else:
        out = fastconv.max_pool2d(x, 3, 2, 1)
    assert out.nbytes >= 4 << 20
    # a 2 MiB-aligned address inside the output
    inner = (out.data_ptr() + (2 << 20) - 1) & ~((2 << 20) - 1)
    assert inner < out.data_ptr() + out.nbytes
    assert "hg" in _vm_flags(inner), f"{op}: output not advised as huge pages"


def test_hint_changes_no_result(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 64, 128, 128)
    w = torch.randn(64, 1, 3, 3)
    xp = torch.randn(2, 64, 256, 128)
    monkeypatch.setenv("FASTCONV_HUGE_PAGES", "0")
    plain = _outputs(x, w, xp)
    monkeypatch.setenv("FASTCONV_HUGE_PAGES", "1")
    hinted = _outputs(x, w, xp)
    for a, b in zip(plain, hinted):
        assert torch.equal(a, b)
