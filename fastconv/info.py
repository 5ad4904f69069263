"""`python -m fastconv info`: what was compiled, and a quick check of every op against torch.

For each device present (CPU always, CUDA when available and compiled in) every op runs
forward and backward on small random float64 inputs and is compared with
torch.nn.functional. Exit code 1 if any check fails, so the command doubles as a smoke test
of an install.
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F

OPS = [
    "conv2d", "_conv2d_grad_input", "_conv2d_grad_weight",
    "depthwise_conv2d", "_depthwise_conv2d_grad_input", "_depthwise_conv2d_grad_weight",
    "_depthwise_conv2d_backward", "max_pool2d", "_max_pool2d_backward",
]


def add_arguments(parser):
    parser.add_argument("--device", action="append", choices=["cpu", "cuda"],
                        help="device(s) to check (default: every available one)")
    parser.add_argument("--no-check", action="store_true", help="only print the build facts")


def build_facts():
    import fastconv

    try:
        from fastconv._build_info import BUILD_INFO
    except ImportError:  # built by other means than setup.py
        BUILD_INFO = {}
    kernels = {}
    for name in OPS:
        keys = [k for k in ("CPU", "CUDA")
                if torch._C._dispatch_has_kernel_for_dispatch_key(f"fastconv::{name}", k)]
        kernels[name] = keys
    return {
        "fastconv": fastconv.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_kernels_compiled": bool(fastconv._C.with_cuda),
        "cuda_arch_list": BUILD_INFO.get("cuda_arch_list", ""),
        "built_with_torch": BUILD_INFO.get("built_with_torch"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "openmp": bool(getattr(fastconv._C, "with_openmp", 0)),
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "kernels": kernels,
    }


def _cases(device):
    """(name, fastconv fn, torch fn, args) on small shapes covering each op and algo."""
    import fastconv

    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device)

    x, w, b = r(2, 6, 11, 9), r(8, 3, 3, 3), r(8)
    xd, wd = r(2, 6, 12, 12), r(12, 1, 5, 5)
    xp = r(2, 3, 13, 12)
    cases = []
    for algo in ("im2col", "direct", "auto"):
        cases.append((f"conv2d[{algo}]",
                      lambda x, w, b, a=algo: fastconv.conv2d(x, w, b, 2, 1, 1, 2, algo=a),
                      lambda x, w, b: F.conv2d(x, w, b, 2, 1, 1, 2), (x, w, b)))
    cases.append(("depthwise_conv2d",
                  lambda x, w: fastconv.depthwise_conv2d(x, w, None, 1, 2),
                  lambda x, w: F.conv2d(x, w, None, 1, 2, 1, 6), (xd, wd)))
    cases.append(("max_pool2d",
                  lambda x: fastconv.max_pool2d(x, 3, 2, 1, ceil_mode=True),
                  lambda x: F.max_pool2d(x, 3, 2, 1, ceil_mode=True), (xp,)))
    return cases


def check_device(device):
    results = []
    for name, ours, theirs, args in _cases(device):
        try:
            a = [t.clone().requires_grad_() for t in args]
            t = [t.clone().requires_grad_() for t in args]
            ya, yt = ours(*a), theirs(*t)
            gy = torch.randn_like(yt)
            ga = torch.autograd.grad(ya, a, gy)
            gt = torch.autograd.grad(yt, t, gy)
            err = max([(ya - yt).abs().max().item()]
                      + [(p - q).abs().max().item() for p, q in zip(ga, gt)])
            ok = err < 1e-9
            results.append((name, "PASS" if ok else "FAIL", err))
        except Exception as e:  # report, keep checking the other ops
            results.append((name, "ERROR", f"{type(e).__name__}: {e}"))
    return results


def run(args):
    facts = build_facts()
    print("fastconv build")
    for k, v in facts.items():
        if k != "kernels":
            print(f"  {k:22s} {v}")
    print("registered kernels")
    for name, keys in facts["kernels"].items():
        print(f"  {name:32s} {', '.join(keys) or 'none'}")
    if args.no_check:
        return 0
    devices = args.device or ["cpu"] + (
        ["cuda"] if facts["cuda_available"] and facts["cuda_kernels_compiled"] else [])
    failed = 0
    for dev in devices:
        print(f"checks against torch.nn.functional on {dev} (float64, forward + backward)")
        for name, status, detail in check_device(dev):
            failed += status != "PASS"
            detail = f"max abs err {detail:.2e}" if isinstance(detail, float) else detail
            print(f"  {name:20s} {status:5s} {detail}")
    print("all checks passed" if not failed else f"{failed} check(s) failed")
    return 1 if failed else 0
