"""Pure-PyTorch reference implementations: the ground truth fastconv's kernels are tested against.

Plain tensor code — slicing, einsum, elementwise max — with no fastconv kernel and no
torch.nn.functional.conv2d / max_pool2d, differentiable by autograd, and written to be
obviously right rather than fast. Same signatures and semantics as torch.nn.functional
(int or tuple arguments, padding 'same' / 'valid', unbatched (C, H, W) input).
"""

from __future__ import annotations

import math

import torch

__all__ = ["conv2d", "depthwise_conv2d", "max_pool2d"]


def _pair(v):
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


def _zero_pad(x, top, bottom, left, right, value=0.0):
    """Zero (or `value`) padding by concatenation: no F.pad, just tensors."""
    n, c, h, w = x.shape
    if left or right:
        parts = []
        if left:
            parts.append(x.new_full((n, c, h, left), value))
        parts.append(x)
        if right:
            parts.append(x.new_full((n, c, h, right), value))
        x = torch.cat(parts, dim=3)
    if top or bottom:
        w2 = x.shape[3]
        parts = []
        if top:
            parts.append(x.new_full((n, c, top, w2), value))
        parts.append(x)
        if bottom:
            parts.append(x.new_full((n, c, bottom, w2), value))
        x = torch.cat(parts, dim=2)
    return x


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """out[n, o, y, x] = bias[o] + sum_{c in group(o), i, j} in_pad[n, c, y*s + i*d, x*s + j*d] * w[o, c, i, j]

    Computed one kernel tap (i, j) at a time: take the strided slice of the padded input that
    the tap sees for every output position, and contract it with w[:, :, i, j] per group.
    """
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    o, cg, kh, kw = weight.shape
    if isinstance(padding, str):
        if padding == "valid":
            pt = pb = pl = pr = 0
        elif padding == "same":
            th, tw = dh * (kh - 1), dw * (kw - 1)
            pt, pl = th // 2, tw // 2
            pb, pr = th - pt, tw - pl  # the odd extra row / column goes to the bottom / right
        else:
            raise ValueError(f"unknown padding {padding!r}")
    else:
        pt, pl = _pair(padding)
        pb, pr = pt, pl
    x = _zero_pad(x, pt, pb, pl, pr)
    n, c, hp, wp = x.shape
    oh = (hp - dh * (kh - 1) - 1) // sh + 1
    ow = (wp - dw * (kw - 1) - 1) // sw + 1
    g = groups
    out = x.new_zeros((n, g, o // g, oh, ow))
    xg = x.reshape(n, g, c // g, hp, wp)
    wg = weight.reshape(g, o // g, cg, kh, kw)
    for i in range(kh):
        for j in range(kw):
            y0, x0 = i * dh, j * dw
            patch = xg[:, :, :, y0: y0 + sh * (oh - 1) + 1: sh, x0: x0 + sw * (ow - 1) + 1: sw]
            out = out + torch.einsum("ngchw,goc->ngohw", patch, wg[:, :, :, i, j])
    out = out.reshape(n, o, oh, ow)
    if bias is not None:
        out = out + bias.reshape(1, o, 1, 1)
    return out.squeeze(0) if unbatched else out


def depthwise_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1):
    """Depthwise conv: weight (C * m, 1, kH, kW); output channel c*m + k sees input channel c."""
    c = input.shape[-3]
    return conv2d(input, weight, bias, stride, padding, dilation, groups=c)


def _pool_out(size, k, s, p, d, ceil_mode):
    numer = size + 2 * p - d * (k - 1) - 1
    out = (math.ceil(numer / s) if ceil_mode else numer // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """Max over each window, scanning taps in row-major order exactly as torch does: a tap
    replaces the running max when it is larger or NaN (first max wins ties, NaN propagates and
    the last NaN wins), taps in the padding are skipped, and the index is h * W + w."""
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride if stride not in (None, [], ()) else kernel_size)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    n, c, h, w = x.shape
    oh = _pool_out(h, kh, sh, ph, dh, ceil_mode)
    ow = _pool_out(w, kw, sw, pw, dw, ceil_mode)
    # Pad generously with -inf so every tap has a value; padded taps are masked out below.
    pad_b = max(0, (oh - 1) * sh + dh * (kh - 1) + 1 - h - ph)
    pad_r = max(0, (ow - 1) * sw + dw * (kw - 1) + 1 - w - pw)
    xp = _zero_pad(x, ph, pad_b, pw, pad_r, value=float("-inf"))
    rows = torch.arange(oh, device=x.device) * sh - ph  # window origin in input coordinates
    cols = torch.arange(ow, device=x.device) * sw - pw
    best = None
    best_idx = None
    seen = None  # whether a valid (non-padding) tap has been visited for each output
    for i in range(kh):
        for j in range(kw):
            r = rows + i * dh
            q = cols + j * dw
            valid = ((r >= 0) & (r < h)).reshape(oh, 1) & ((q >= 0) & (q < w)).reshape(1, ow)
            val = xp[:, :, i * dh: i * dh + sh * (oh - 1) + 1: sh,
                     j * dw: j * dw + sw * (ow - 1) + 1: sw]
            idx = (r.reshape(oh, 1) * w + q.reshape(1, ow)).expand(n, c, oh, ow)
            valid = valid.expand(n, c, oh, ow)
            if best is None:
                best = torch.full_like(val, float("-inf"))
                best_idx = torch.full(val.shape, -1, dtype=torch.int64, device=x.device)
                seen = torch.zeros(val.shape, dtype=torch.bool, device=x.device)
            first = valid & ~seen
            take = valid & ((val > best) | torch.isnan(val))
            best_idx = torch.where(take | first, idx, best_idx)
            best = torch.where(take, val, best)
            seen = seen | valid
    if unbatched:
        best, best_idx = best.squeeze(0), best_idx.squeeze(0)
    return (best, best_idx) if return_indices else best
