"""`fastconv bench`: fastconv against torch (cuDNN / ATen / oneDNN) on layer shapes from real
networks.

For every case of the suite (fastconv/_cases.py) and every direction (forward; forward +
backward), on one device:

1. correctness first: each fastconv implementation (every applicable algo) runs once on the
   case's inputs and its output (and, for fwd+bwd, every gradient) is compared with torch's op
   evaluated in float32 (TF32 off) on the same inputs. (float64 would be exact, but torch's
   float64 CPU path for depthwise convolutions takes seconds per layer.) The tolerance scales
   with the dtype's epsilon and the reduction length, and is never tighter than twice torch's
   own error in the case dtype.
   A result outside it is FAIL (an exception is ERROR); neither gets a time or a speedup, and
   the command exits with status 1 at the end.
2. torch's backend for the case is read from the torch profiler (the aten op that did the
   work, e.g. aten::mkldnn_convolution -> oneDNN, aten::cudnn_convolution -> cuDNN; CUDA
   kernel names on a GPU), cross-checked with torch's own dispatch rule for convolutions
   (torch._C._select_conv_backend, which convolution_backward uses too).
3. timing: on CUDA with CUDA events after warm-up (torch.backends.cudnn.benchmark=True, the
   TF32 setting applied to both sides); on CPU with torch.utils.benchmark.Timer at --threads
   threads, torch and every fastconv implementation of a case interleaved (one sample of each
   per round, the order reversed every other round), so that both sides of a ratio see the
   same stretches of a shared machine. Inputs are rotated among enough copies to exceed the
   last-level cache (GPU L2, CPU L3), so no side is timed on cache-hot data. Forward runs
   under torch.no_grad() on both sides; forward + backward calls .backward(grad) on both.
   Median and IQR over --repeat samples (at least), each sample averaging several calls.
   On CPU each measurement also records the process's minor page faults and system time per
   call (getrusage): outputs freed and reallocated every call come back from the kernel
   zero-filled whenever glibc has returned them to it (heap trimming), which can cost more than
   the kernel itself; --malloc retain keeps freed memory in the process, on both sides.
4. report: TFLOP/s for convolutions (2 * N * O * OH * OW * C/g * kH * kW per forward, x3 for
   forward + backward), GB/s and the fraction of the copy bandwidth (a large tensor copy timed
   in the same run) for depthwise and pooling, and speedup = torch time / fastconv time. On
   CPU a depthwise or pooling case whose inputs exceed the L3 also times the yardstick's copy
   in the same rounds as its sides (rec["copy"]; case_copy_fraction per side), since the
   machine's bandwidth may have changed since the run's yardstick was taken.

Test hook: implementations come from fastconv._cases.fastconv_impls / torch_impl, looked up
at run time (monkeypatch them to inject an implementation; tests/test_bench.py does).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import itertools
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from . import _cases

DIRECTIONS = ("fwd", "fwd+bwd")
DTYPES = ("float32", "float16", "bfloat16")
EXIT_FAIL = 1
EXIT_USAGE = 2
# Correctness tolerance, in units of the expected rounding error (see _error_ratio).
TOL_FACTOR = 16.0


class BenchError(Exception):
    """A bad argument or an impossible setting: reported without a traceback, exit code 2."""


def _positive_int(name):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {text!r}")
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {v}")
        return v
    return parse


def _positive_float(name):
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a positive number, got {text!r}")
        if not v > 0 or math.isinf(v):
            raise argparse.ArgumentTypeError(f"{name} must be a positive number, got {text}")
        return v
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Benchmark fastconv against torch (cuDNN / ATen / oneDNN) on layer shapes from real\n"
        "networks. Each result is checked against torch before it is timed; a wrong result is\n"
        "reported as FAIL and the command exits with status 1.")
    parser.epilog = (
        "suites: quick (default: a few layers per op), full (every network below, plus the\n"
        "  CPU targets on a CPU), cpu-targets (the CPU speed-target shapes, N=8, NCHW and\n"
        "  channels_last), resnet18, resnet50, mobilenet_v2, convnext, replknet, vgg16.\n"
        "examples:\n"
        "  fastconv bench                          # quick suite on the best device\n"
        "  fastconv bench --device cpu --suite cpu-targets --json cpu.json --plot cpu.png\n"
        "  fastconv bench --suite resnet50 --dtype bfloat16 --channels-last --direction fwd")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N or auto (default: cuda if fastconv has CUDA "
                             "kernels and a GPU is present, else cpu)")
    parser.add_argument("--dtype", default="float32",
                        help=f"one of {', '.join(DTYPES)} (default float32; float16 needs CUDA)")
    parser.add_argument("--ops", nargs="+", default=["all"], metavar="OP",
                        help="ops to run: conv2d, depthwise_conv2d, max_pool2d (comma- or "
                             "space-separated; default all)")
    parser.add_argument("--suite", default="quick",
                        help="quick, full, cpu-targets, resnet18, resnet50, mobilenet_v2, "
                             "convnext, replknet, vgg16 (default quick)")
    parser.add_argument("--direction", default="both",
                        help="fwd, fwd+bwd or both (default both)")
    parser.add_argument("--channels-last", action="store_true",
                        help="inputs and weights in channels_last (NHWC) for both sides")
    parser.add_argument("--tf32", default="off",
                        help="on|off: allow TF32 in cuDNN and matmul, for torch and fastconv "
                             "alike (CUDA float32 only; default off)")
    parser.add_argument("--threads", type=_positive_int("--threads"), default=None,
                        help="CPU threads (torch.set_num_threads) for both sides "
                             "(default: torch's default, usually the core count)")
    parser.add_argument("--repeat", type=_positive_int("--repeat"), default=None,
                        help="minimum number of timed samples per measurement, median and IQR "
                             "over them (default 7 on CPU, 20 on CUDA)")
    parser.add_argument("--min-time", type=_positive_float("--min-time"), default=None,
                        help="minimum seconds per measurement (default 0.2 on CPU, 0.1 on CUDA)")
    parser.add_argument("--max-time", type=_positive_float("--max-time"), default=None,
                        help="seconds after which a measurement stops adding samples even "
                             "below --repeat (at least 3 are taken; default max(2, "
                             "10 x --min-time))")
    parser.add_argument("--batch", type=_positive_int("--batch"), default=None,
                        help="batch size for the network suites (default 8 on CPU, 128 on CUDA)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="write the environment, settings and every number to PATH")
    parser.add_argument("--plot", metavar="PATH", default=None,
                        help="write a PNG of the speedups to PATH (needs matplotlib)")
    parser.add_argument("--list", action="store_true",
                        help="list the suite's cases and exit")
    parser.add_argument("--malloc", default="default",
                        help="default|retain: 'retain' has glibc keep freed memory in the process "
                             "(mallopt: no heap trimming, mmap only above 32 MiB, 64 MiB of heap "
                             "top padding) for the rest of the process, so that outputs "
                             "reallocated every call do not page-fault; both sides alike "
                             "(default: glibc's own settings)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------


def _resolve(args):
    """Validate the arguments (no torch work yet) and return the settings dict."""
    import torch

    import fastconv

    s = {}
    # device
    dev_arg = str(args.device).strip().lower()
    has_cuda_kernels = bool(getattr(fastconv._C, "with_cuda", 0))
    s["device_note"] = None
    if dev_arg == "auto":
        dev_arg = "cuda" if (torch.cuda.is_available() and has_cuda_kernels) else "cpu"
        if torch.cuda.is_available() and not has_cuda_kernels:
            s["device_note"] = ("a GPU is present but this fastconv build has no CUDA kernels: "
                                "benchmarking the CPU")
    try:
        device = torch.device(dev_arg)
    except RuntimeError:
        raise BenchError(f"--device: expected cpu, cuda, cuda:N or auto, but got {args.device!r}")
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device: expected cpu, cuda, cuda:N or auto, but got {args.device!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchError("--device cuda: no CUDA device is available "
                             "(torch.cuda.is_available() is False)")
        if not has_cuda_kernels:
            raise BenchError("--device cuda: this fastconv build has no CUDA kernels; rebuild "
                             "it with a CUDA toolkit (see README) or use --device cpu")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise BenchError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA "
                             f"device(s) present")
    s["device"] = device
    # dtype
    if args.dtype not in DTYPES:
        raise BenchError(f"--dtype: expected one of {', '.join(DTYPES)}, but got {args.dtype!r}")
    dtype = getattr(torch, args.dtype)
    from . import _checks

    if dtype not in _checks.supported_dtypes(device.type):
        raise BenchError(f"--dtype {args.dtype} is not supported on {device.type}: fastconv's "
                         f"{device.type.upper()} kernels take {_checks.dtype_list(device.type)}")
    s["dtype"] = dtype
    # suite and ops
    if args.suite not in _cases.SUITES + _cases.HIDDEN_SUITES:
        raise BenchError(f"--suite: expected one of {', '.join(_cases.SUITES)}, but got "
                         f"{args.suite!r}")
    try:
        ops = _cases.parse_ops(args.ops)
    except ValueError as e:
        raise BenchError(str(e))
    cases = [c for c in _cases.suite(args.suite, device.type, args.batch) if c.op in ops]
    if not cases:
        raise BenchError(f"suite {args.suite!r} has no case for --ops {','.join(ops)}")
    s.update(suite=args.suite, ops=ops, cases=cases)
    # direction
    if args.direction not in ("fwd", "fwd+bwd", "both"):
        raise BenchError(f"--direction: expected fwd, fwd+bwd or both, but got {args.direction!r}")
    s["directions"] = DIRECTIONS if args.direction == "both" else (args.direction,)
    tf32 = str(args.tf32).strip().lower()
    if tf32 not in ("on", "off"):
        raise BenchError(f"--tf32: expected on or off, but got {args.tf32!r}")
    s["tf32"] = tf32 == "on"
    s["channels_last"] = bool(args.channels_last)
    s["threads"] = args.threads or torch.get_num_threads()
    cpu = device.type == "cpu"
    s["repeat"] = args.repeat or (7 if cpu else 20)
    s["min_time"] = args.min_time or (0.2 if cpu else 0.1)
    s["max_time"] = max(args.max_time or max(2.0, 10 * s["min_time"]), s["min_time"])
    s["batch"] = args.batch
    s["json"] = args.json
    s["plot"] = args.plot
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchError("--plot needs matplotlib: pip install matplotlib "
                             "(or pip install 'fastconv[plot]')")
    for opt in ("json", "plot"):
        path = s[opt]
        if path:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise BenchError(f"--{opt} {path}: directory {parent} does not exist")
    s["quiet"] = bool(args.quiet)
    malloc = str(args.malloc).strip().lower()
    if malloc not in ("default", "retain"):
        raise BenchError(f"--malloc: expected default or retain, but got {args.malloc!r}")
    if malloc == "retain" and _mallopt() is None:
        raise BenchError("--malloc retain: needs glibc's mallopt (Linux); this process has none")
    s["malloc"] = malloc
    return s


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def _mallopt():
    """glibc's mallopt from this process, or None (another C library, another OS)."""
    import ctypes

    try:
        f = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_int]
    f.restype = ctypes.c_int
    return f


def _retain_freed_memory():
    """--malloc retain: glibc keeps freed memory in the process from now on (no trimming of the
    heap top; blocks up to 32 MiB, glibc's largest mmap threshold, from the heap; the heap
    grows 64 MiB beyond each request, so that a pattern of allocations that creeps upwards does
    not touch fresh pages every call), so a buffer freed and reallocated every call is reused
    without page faults, as with jemalloc or tcmalloc. Cannot be undone within the process."""
    mallopt = _mallopt()
    if mallopt is None or mallopt(_M_TRIM_THRESHOLD, 1 << 30) != 1 or \
            mallopt(_M_MMAP_THRESHOLD, 32 << 20) != 1 or mallopt(_M_TOP_PAD, 64 << 20) != 1:
        raise BenchError("--malloc retain: mallopt refused the settings")


@contextlib.contextmanager
def _torch_settings(s):
    """Apply the run's settings to torch for the run (both sides), restoring them after."""
    import torch

    saved = (torch.get_num_threads(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.set_num_threads(s["threads"])
    if s["device"].type == "cuda":
        torch.cuda.set_device(s["device"])
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = s["tf32"]
        torch.backends.cuda.matmul.allow_tf32 = s["tf32"]
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.backends.cudnn.benchmark = saved[1]
        torch.backends.cudnn.allow_tf32 = saved[2]
        torch.backends.cuda.matmul.allow_tf32 = saved[3]


# --------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_bytes(level):
    """Size of the CPU cache of `level` (from sysfs; None when unknown)."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in sorted(os.listdir(base)):
            p = os.path.join(base, d)
            with open(os.path.join(p, "level")) as f:
                if int(f.read()) != level:
                    continue
            with open(os.path.join(p, "size")) as f:
                text = f.read().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
            return int(text.rstrip("KMG")) * mult
    except (OSError, ValueError):
        pass
    return None


def _git_commit():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, ".git")):
        return None, None
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return commit, bool(dirty)
    except (OSError, subprocess.SubprocessError):
        return None, None


def _environment(s):
    import torch

    import fastconv

    dev = s["device"]
    commit, dirty = _git_commit()
    env = {
        "device": str(dev),
        "device_name": (torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_model()),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": s["threads"],
        "cpu_capability": _call(lambda: torch.backends.cpu.get_cpu_capability()),
        "l3_cache_bytes": _cache_bytes(3),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn_version": _call(lambda: torch.backends.cudnn.version()) if dev.type == "cuda" else
        None,
        "mkldnn_available": torch.backends.mkldnn.is_available(),
        "fastconv_version": getattr(fastconv, "__version__", None),
        "fastconv_with_cuda": bool(getattr(fastconv._C, "with_cuda", 0)),
        "fastconv_compiler": getattr(fastconv._C, "compiler", None),
        "fastconv_build": _call(lambda: dict(__import__(
            "fastconv._build_info", fromlist=["BUILD_INFO"]).BUILD_INFO)),
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "load_average_at_start": _call(lambda: list(os.getloadavg())),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env.update(
            gpu_memory_bytes=props.total_memory,
            gpu_sm_count=props.multi_processor_count,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_l2_cache_bytes=getattr(props, "L2_cache_size", None),
        )
    return env


def _busy_note(env, s):
    """A warning when other processes competed for the CPU (timings then mean little)."""
    loads = [env.get("load_average_at_start"), env.get("load_average_at_end")]
    worst = max((la[0] for la in loads if la), default=None)
    cores = env.get("cpu_count") or 1
    if worst is None or s["device"].type != "cpu":
        return None
    # our own run keeps `threads` cores busy; more than that is someone else's work
    if worst > max(cores, s["threads"]) + 0.5:
        return (f"the 1-minute load average reached {worst:.1f} on {cores} cores: other "
                f"processes competed for the CPU, so these CPU timings are noisy")
    return None


def _call(fn):
    try:
        return fn()
    except Exception:  # noqa: BLE001 - optional facts
        return None


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------


def _stats(samples):
    """median / IQR (in ms) of per-call times in seconds."""
    xs = sorted(samples)
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {
        "median_ms": statistics.median(xs) * 1e3,
        "iqr_ms": (q[2] - q[0]) * 1e3,
        "q25_ms": q[0] * 1e3,
        "q75_ms": q[2] * 1e3,
        "min_ms": xs[0] * 1e3,
        "samples_ms": [x * 1e3 for x in samples],
    }


def _enough(times, per_sample_calls, s):
    """Stop adding samples at --repeat, or once --max-time is spent (keeping at least 3)."""
    if len(times) >= s["repeat"]:
        return True
    return len(times) >= 3 and sum(times) * per_sample_calls >= s["max_time"]


def _rusage():
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    return resource.getrusage(resource.RUSAGE_SELF)


def _time_cpu(step, s, counts=None):
    """Samples (seconds per call) and calls per sample; `counts` (a dict), when given, receives
    the process's minor page faults and system CPU milliseconds per call, over every call made
    here (calibration included; the counter costs both sides the same few tens of ns)."""
    from torch.utils.benchmark import Timer

    calls = [0]

    def counted():
        calls[0] += 1
        step()

    timer = Timer(stmt="step()", globals={"step": counted}, num_threads=s["threads"])
    r0 = _rusage()
    m = timer.blocked_autorange(min_run_time=s["min_time"])
    times = list(m.times)
    while not _enough(times, m.number_per_run, s):
        times += timer.timeit(m.number_per_run).times
    r1 = _rusage()
    if counts is not None and r0 is not None and calls[0] > 0:
        counts["page_faults_per_call"] = (r1.ru_minflt - r0.ru_minflt) / calls[0]
        counts["sys_ms_per_call"] = (r1.ru_stime - r0.ru_stime) * 1e3 / calls[0]
    return times, m.number_per_run


def _time_cpu_interleaved(steps, s):
    """Times several steps (torch's, then fastconv's) together. Each is calibrated on its own
    (blocked_autorange picks its calls per sample and warms it up; those samples are dropped);
    then the samples, each a plain loop of that many calls at --threads threads, are taken in
    rounds, one of each step per round, the order reversed every other round, until every step
    has --repeat samples and --min-time of calls, or one has spent --max-time (with at least 3
    samples each). On a shared host the memory bandwidth can halve and recover within seconds:
    timed one after the other, the two sides of a ratio can land in different stretches (a
    memory-bound kernel once timed 1.05x against torch while the same kernel under another
    name timed 2.15x in the same run); interleaved, they see the same ones. Each sample runs
    with Python's garbage collector off, as timeit (so torch's Timer, and the sequential
    timing) runs its loops: in one fwd+bwd loop torch's F.conv2d set off ~0.4 generation-0
    collections per call and fastconv none, and a collection falls on whichever call comes
    next. Returns, per step,
    (samples in seconds per call, calls per sample, counts), counts as in _time_cpu, or the
    exception it raised (it then leaves the rounds; the others go on)."""
    import torch
    from torch.utils.benchmark import Timer

    n = len(steps)
    number, failed = [1] * n, [None] * n
    for i, step in enumerate(steps):
        try:
            timer = Timer(stmt="step()", globals={"step": step}, num_threads=s["threads"])
            number[i] = timer.blocked_autorange(min_run_time=min(s["min_time"], 0.05)).number_per_run
        except Exception as e:  # noqa: BLE001 - reported for this step alone
            failed[i] = e
    times = [[] for _ in range(n)]
    faults, stime, calls = [0.0] * n, [0.0] * n, [0] * n
    rusage = _rusage() is not None

    def spent(i):
        return sum(times[i]) * number[i]

    def done():
        live = [i for i in range(n) if failed[i] is None]
        if all(len(times[i]) >= s["repeat"] and spent(i) >= s["min_time"] for i in live):
            return True
        return (all(len(times[i]) >= 3 for i in live) and
                any(spent(i) >= s["max_time"] for i in live))

    threads = torch.get_num_threads()
    torch.set_num_threads(s["threads"])
    try:
        rnd = 0
        while not done():
            for i in (range(n) if rnd % 2 == 0 else range(n - 1, -1, -1)):
                if failed[i] is not None:
                    continue
                step, k = steps[i], number[i]
                r0 = _rusage() if rusage else None
                gc_was_on = gc.isenabled()
                gc.disable()  # as timeit (and so torch's Timer) does for its loops
                try:
                    t0 = time.perf_counter()
                    for _ in range(k):
                        step()
                    times[i].append((time.perf_counter() - t0) / k)
                except Exception as e:  # noqa: BLE001
                    failed[i] = e
                    continue
                finally:
                    if gc_was_on:
                        gc.enable()
                calls[i] += k
                if rusage:
                    r1 = _rusage()
                    faults[i] += r1.ru_minflt - r0.ru_minflt
                    stime[i] += r1.ru_stime - r0.ru_stime
            rnd += 1
    finally:
        torch.set_num_threads(threads)
    out = []
    for i in range(n):
        if failed[i] is not None:
            out.append(failed[i])
            continue
        counts = ({"page_faults_per_call": faults[i] / calls[i],
                   "sys_ms_per_call": stime[i] * 1e3 / calls[i]} if rusage else {})
        out.append((times[i], number[i], counts))
    return out


def _time_cuda(step, s):
    import torch

    # warm-up: >= 3 calls and >= 25 ms (cudnn.benchmark autotunes on the first call); the
    # synchronised wall time of the later calls sizes the samples
    walls = []
    while len(walls) < 3 or sum(walls) < 0.025:
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
        if len(walls) >= 2 and sum(walls[1:]) > s["max_time"]:
            break
    per_call = max(min(walls[1:]), 1e-7)
    # each sample spans >= ~1 ms so the events' resolution (~0.5 us) does not matter
    inner = int(min(1000, max(1, math.ceil(1e-3 / per_call))))
    samples = int(max(s["repeat"], min(10 * s["repeat"],
                                       math.ceil(s["min_time"] / (inner * per_call)))))
    samples = max(min(samples, math.ceil(s["max_time"] / (inner * per_call))), 3)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(samples)]
    for a, b in events:
        a.record()
        for _ in range(inner):
            step()
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) / 1e3 / inner for a, b in events], inner


def _time(step, s, counts=None):
    return _time_cuda(step, s) if s["device"].type == "cuda" else _time_cpu(step, s, counts)


# the CPU copy yardstick's tensor size at least (tests shrink it)
_CPU_COPY_MIN_BYTES = 256 << 20


def _copy_bytes(dev):
    """Bytes of each tensor of the copy yardstick: far beyond the last-level cache (a copy of
    43 MB tensors ran at 84 GB/s here against 68 for 256 MB ones, the L3 serving part of it)."""
    import torch

    if dev.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or (50 << 20)
        return max(1 << 30, 16 * l2)
    return max(_CPU_COPY_MIN_BYTES, 8 * (_cache_bytes(3) or (32 << 20)))


def _copy_step(dev):
    """(bytes of each tensor, step): the copy yardstick's dst.copy_(src), _copy_bytes each."""
    import torch

    nbytes = _copy_bytes(dev)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    return nbytes, lambda: dst.copy_(src)


def _copy_bandwidth(s):
    """GB/s of dst.copy_(src) on a tensor well beyond the last-level cache (bytes read +
    written), the yardstick for the memory-bound cases."""
    nbytes, step = _copy_step(s["device"])
    times, per = _time(step, s)
    st = _stats(times)
    del step
    # the best sample: what the memory system can do (the cases are reported by their median)
    return {"bytes_per_copy": nbytes, "gbps": 2 * nbytes / (st["min_ms"] * 1e-3) / 1e9,
            "gbps_median": 2 * nbytes / (st["median_ms"] * 1e-3) / 1e9,
            "median_ms": st["median_ms"], "min_ms": st["min_ms"], "iqr_ms": st["iqr_ms"],
            "calls_per_sample": per}


def _gemm_rate(s):
    """TFLOP/s of torch.mm on square matrices in the case dtype (TF32 as set), the yardstick
    for the compute-bound cases: a convolution lowered to GEMM can at best reach it."""
    import torch

    n = 8192 if s["device"].type == "cuda" else 1536
    g = torch.Generator(device=s["device"]).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=s["device"]).to(s["dtype"])
    b = torch.randn(n, n, generator=g, device=s["device"]).to(s["dtype"])
    times, per = _time(lambda: torch.mm(a, b), s)
    st = _stats(times)
    return {"m": n, "n": n, "k": n, "dtype": str(s["dtype"]).replace("torch.", ""),
            "tflops": 2 * n ** 3 / (st["min_ms"] * 1e-3) / 1e12,
            "tflops_median": 2 * n ** 3 / (st["median_ms"] * 1e-3) / 1e12,
            "median_ms": st["median_ms"], "min_ms": st["min_ms"], "iqr_ms": st["iqr_ms"]}


def _rotation_count(set_bytes, s):
    """How many input sets to cycle through so that together they exceed twice the
    last-level cache (each call then reads cold inputs, as in a network)."""
    import torch

    dev = s["device"]
    if dev.type == "cuda":
        cache = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or (50 << 20)
    else:
        cache = _cache_bytes(3) or (32 << 20)
    return int(min(16, max(1, math.ceil(2 * cache / max(set_bytes, 1)))))


# --------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------


class _InputSet:
    def __init__(self, case, s, channels_last, direction, seed):
        import torch

        self.tensors = _cases.make_inputs(case, s["device"], s["dtype"], channels_last,
                                          requires_grad=(direction == "fwd+bwd"), seed=seed)
        self.grad = None
        if direction == "fwd+bwd":
            g = torch.Generator(device=s["device"]).manual_seed(10_000 + seed)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            self.grad = torch.randn(case.output_shape, generator=g, device=s["device"]).to(
                s["dtype"]).contiguous(memory_format=fmt)

    def nbytes(self):
        ts = [t for t in self.tensors if t is not None] + ([self.grad] if self.grad is not None
                                                          else [])
        return sum(t.numel() * t.element_size() for t in ts)

    def leaves(self):
        return [t for t in self.tensors if t is not None]


def _make_step(fn, sets, direction):
    """A no-argument callable: one forward (under no_grad) or one forward + backward, on the
    next input set. Grads are reset to None first so that backward writes them instead of
    accumulating (the same work for both sides)."""
    import torch

    order = itertools.cycle(sets)
    if direction == "fwd":
        def step():
            st = next(order)
            with torch.no_grad():
                fn(*st.tensors)
    else:
        def step():
            st = next(order)
            for t in st.leaves():
                t.grad = None
            fn(*st.tensors).backward(st.grad)
    return step


def _run_once(fn, st, direction):
    """Results to check: {'out': ...} plus the gradients for fwd+bwd."""
    import torch

    if direction == "fwd":
        with torch.no_grad():
            return {"out": fn(*st.tensors)}
    leaves = st.leaves()
    for t in leaves:
        t.grad = None
    out = fn(*st.tensors)
    out.backward(st.grad)
    names = ["grad_input", "grad_weight", "grad_bias"]
    res = {"out": out.detach()}
    for name, t in zip(names, st.tensors):
        if t is not None:
            res[name] = t.grad
    for t in leaves:
        t.grad = None
    return res


@contextlib.contextmanager
def _no_tf32():
    import torch

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _reference(fn, st, direction):
    """torch's op in float32 without TF32, on the same (dtype-rounded) inputs."""
    import torch

    ts = tuple(None if t is None else
               t.detach().to(torch.float32).requires_grad_(direction == "fwd+bwd")
               for t in st.tensors)

    class _S:
        tensors = ts
        grad = None if st.grad is None else st.grad.to(torch.float32)

        def leaves(self):
            return [t for t in ts if t is not None]

    with torch.autograd.set_grad_enabled(direction == "fwd+bwd"), _no_tf32():
        return _run_once(fn, _S(), direction)


def _eps(dtype):
    import torch

    return torch.finfo(dtype).eps


def _error_ratio(actual, ref, reduction, s):
    """max |actual - ref| over the tolerance, elementwise: 2 eps|ref| (the result's own rounding,
    twice) + TOL_FACTOR * (eps_acc * sqrt(reduction) + eps) * rms(ref) (accumulating `reduction`
    products in float32 / TF32, here and in the float32 reference, and a few roundings in the
    case dtype). <= 1 passes."""
    import torch

    dtype = s["dtype"]
    eps = _eps(dtype)
    eps_acc = _eps(torch.float32)
    if dtype == torch.float32 and s["tf32"] and s["device"].type == "cuda":
        eps_acc = 2.0 ** -10  # TF32 keeps 10 mantissa bits
    a = actual.detach().double()
    r = ref.detach().double()
    if tuple(a.shape) != tuple(r.shape):
        return math.inf, math.inf, f"shape {list(a.shape)} != expected {list(r.shape)}"
    if r.numel() == 0:
        return 0.0, 0.0, None
    finite = torch.isfinite(r)
    if bool((~torch.isfinite(a) & finite).any()):
        return math.inf, math.inf, "non-finite values where torch's are finite"
    rms = float(r.pow(2).mean().sqrt())
    scale = TOL_FACTOR * (eps_acc * math.sqrt(reduction) + eps) * rms + 1e-30
    diff = (a - r).abs()
    diff = torch.where(finite, diff, torch.zeros_like(diff))
    ratio = float((diff / (2 * eps * r.abs() + scale)).max())
    return ratio, float(diff.max()), None


def _check(results, ref, torch_ratio, case, s):
    """Compare one implementation's results with the reference. Returns (ok, detail,
    message)."""
    reductions = case.reductions()
    detail, msgs, ok = {}, [], True
    for name, r in ref.items():
        a = results.get(name)
        if a is None:
            ok = False
            msgs.append(f"{name} missing")
            continue
        ratio, max_err, why = _error_ratio(a, r, reductions.get(name, 1), s)
        limit = max(1.0, 2.0 * torch_ratio.get(name, 0.0))
        detail[name] = {"err_ratio": ratio, "max_abs_err": max_err, "limit": limit,
                        "reduction": reductions.get(name, 1)}
        if why or not ratio <= limit:
            ok = False
            msgs.append(f"{name}: {why}" if why else
                        f"{name}: max |err| {max_err:.3g} is {ratio:.3g}x the tolerance")
    return ok, detail, "; ".join(msgs) or None


# torch's backends, by the aten op that does the work (seen by the profiler)
_BACKEND_OPS = [
    ("aten::cudnn_convolution", "cuDNN"),
    ("aten::cudnn_convolution_relu", "cuDNN"),
    ("aten::miopen_convolution", "MIOpen"),
    ("aten::miopen_depthwise_convolution", "MIOpen"),
    ("aten::mkldnn_convolution", "oneDNN"),
    ("aten::mkldnn_max_pool2d", "oneDNN"),
    ("aten::_nnpack_spatial_convolution", "NNPACK"),
    ("aten::_conv_depthwise2d", "ATen (CUDA depthwise kernel)"),
    ("aten::_convolution_depthwise3x3_winograd", "ATen (winograd depthwise)"),
    ("aten::_slow_conv2d_forward", "ATen (slow_conv2d: im2col + GEMM)"),
    ("aten::thnn_conv2d", "ATen (slow_conv2d: im2col + GEMM)"),
    ("aten::slow_conv_dilated2d", "ATen (slow_conv_dilated2d)"),
    ("aten::max_pool2d_with_indices", "ATen (max_pool2d_with_indices)"),
]
_DETAIL_PREFIXES = ("aten::cudnn", "aten::miopen", "aten::mkldnn", "aten::_nnpack",
                    "aten::_conv_depthwise2d", "aten::_convolution_depthwise", "aten::_slow_conv2d",
                    "aten::thnn_conv2d", "aten::slow_conv", "aten::max_pool2d",
                    "aten::convolution_backward")
# torch._C._ConvBackend names -> the same words
_CONV_BACKENDS = {
    "Cudnn": "cuDNN", "Mkldnn": "oneDNN", "MkldnnEmpty": "oneDNN", "Miopen": "MIOpen",
    "MiopenDepthwise": "MIOpen", "NnpackSpatial": "NNPACK", "Xnnpack2d": "XNNPACK",
    "CudaDepthwise2d": "ATen (CUDA depthwise kernel)",
    "Winograd3x3Depthwise": "ATen (winograd depthwise)",
    "Slow2d": "ATen (slow_conv2d: im2col + GEMM)", "SlowDilated2d": "ATen (slow_conv_dilated2d)",
    "Empty": "ATen (empty)", "Overrideable": "Overrideable", "Mps": "MPS",
}


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints a line per profiler start / stop on fd 2; drop those, keep the rest."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines():
                if line.startswith(("USDT:", "STAGE:")) or "gpuGetDeviceCount" in line:
                    continue
                print(line, file=sys.stderr)


def _profile(step, device_type):
    """(aten op names, CUDA kernels by device time) of one call of `step`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    with _quiet_stderr():
        with profile(activities=acts) as prof:
            step()
            if device_type == "cuda":
                torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    kernels = []
    if device_type == "cuda":
        from torch.autograd import DeviceType

        for avg in prof.key_averages():
            if getattr(avg, "device_type", None) != DeviceType.CUDA:
                continue
            t = getattr(avg, "self_device_time_total", None)
            if t is None:
                t = getattr(avg, "self_cuda_time_total", 0)
            kernels.append((t, avg.key[:120]))
        kernels = [k for _, k in sorted(kernels, reverse=True)[:3]]
    return names, kernels


def _conv_backend_rule(case, st):
    """torch's dispatch rule for this convolution (used by convolution and its backward)."""
    import torch

    if case.op == "max_pool2d":
        return None
    x, w, b = st.tensors
    try:
        be = torch._C._select_conv_backend(x, w, b, list(case.stride), list(case.padding),
                                           list(case.dilation), False, [0, 0], case.groups, None)
        return str(be).split(".")[-1]
    except Exception:  # noqa: BLE001 - private API: absent in some versions
        return None


def _torch_backend(case, step, st, s, direction):
    try:
        names, kernels = _profile(step, s["device"].type)
    except Exception as e:  # noqa: BLE001 - a profiler that cannot start is not fatal
        names, kernels = [], [f"profiler failed: {_first_line(e)}"]
    seen = set(names)
    label = None
    for op, lab in _BACKEND_OPS:
        if op in seen:
            label = lab
            break
    if label is None and case.op == "max_pool2d" and "aten::max_pool2d" in seen:
        label = "ATen (max_pool2d)"
    rule = _conv_backend_rule(case, st)
    rule_label = _CONV_BACKENDS.get(rule, rule) if rule else None
    note = None
    if label is None:
        if rule_label:
            label, note = rule_label, "from torch._C._select_conv_backend (profiler saw no " \
                                      "backend op)"
        else:
            label = "unknown"
    elif rule_label and rule_label != label:
        note = f"dispatch rule says {rule_label}"
    detail = sorted(n for n in seen if n.startswith(_DETAIL_PREFIXES))
    return {"backend": label, "profiler_ops": detail, "conv_backend_rule": rule,
            "cuda_kernels": kernels, "note": note}


def _first_line(e):
    text = f"{type(e).__name__}: {e}".strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line[:300]


def _rates(rec, median_ms, yard):
    t = median_ms * 1e-3
    out = {}
    if rec["flops"]:
        out["tflops"] = rec["flops"] / t / 1e12
        out["gemm_fraction"] = out["tflops"] / yard["gemm_tflops"] if yard.get("gemm_tflops") \
            else None
    out["gbps"] = rec["bytes"] / t / 1e9
    out["copy_fraction"] = out["gbps"] / yard["copy_gbps"] if yard.get("copy_gbps") else None
    return out


def _bench_case(case, direction, s, yard, log):
    import torch

    channels_last = s["channels_last"] if case.channels_last is None else case.channels_last
    itemsize = torch.empty((), dtype=s["dtype"]).element_size()
    rec = {
        "id": f"{case.op}:{case.name}:{case.label}:{direction}",
        "op": case.op, "network": case.network, "layer": case.layer, "label": case.label,
        "direction": direction, "kind": case.kind, "channels_last": channels_last,
        "dtype": str(s["dtype"]).replace("torch.", ""),
        "input_shape": list(case.input_shape),
        "weight_shape": list(case.weight_shape) if case.weight_shape else None,
        "output_shape": list(case.output_shape),
        "kernel": list(case.kernel), "stride": list(case.stride), "padding": list(case.padding),
        "dilation": list(case.dilation), "groups": case.groups, "bias": case.bias,
        "ceil_mode": case.ceil_mode,
        "flops": case.flops(direction), "bytes": case.bytes(direction, itemsize),
    }
    t0 = time.perf_counter()
    sets = [_InputSet(case, s, channels_last, direction, seed=0)]
    n_sets = _rotation_count(sets[0].nbytes(), s)
    rec["input_sets"] = n_sets

    torch_fn = _cases.torch_impl(case)
    ref = _reference(torch_fn, sets[0], direction)

    # torch in the case dtype: its own error sets the floor of the tolerance
    trec = {"impl": "torch", "status": "OK", "error": None}
    torch_ratio = {}
    try:
        tres = _run_once(torch_fn, sets[0], direction)
        for name, r in ref.items():
            ratio, _, _ = _error_ratio(tres[name], r, case.reductions().get(name, 1), s)
            torch_ratio[name] = ratio if math.isfinite(ratio) else 0.0
        trec["err_ratio"] = dict(torch_ratio)
        del tres
    except Exception as e:  # noqa: BLE001 - torch may not support a setting; report it
        trec.update(status="ERROR", error=_first_line(e))

    impls = _cases.fastconv_impls(case)
    frecs = []
    for name, fn in impls.items():
        fr = {"impl": name, "status": "OK", "error": None, "check": None}
        try:
            res = _run_once(fn, sets[0], direction)
            ok, detail, msg = _check(res, ref, torch_ratio, case, s)
            fr["check"] = detail
            if not ok:
                fr.update(status="FAIL", error=msg)
            del res
        except Exception as e:  # noqa: BLE001 - reported, counts as a failure
            fr.update(status="ERROR", error=_first_line(e))
        frecs.append((fr, fn))
    del ref
    t_check = time.perf_counter() - t0

    sets += [_InputSet(case, s, channels_last, direction, seed=i) for i in range(1, n_sets)]
    if s["device"].type == "cpu":
        _time_case_cpu(rec, trec, frecs, torch_fn, sets, direction, s, yard, case)
    else:
        _time_case_sequential(rec, trec, frecs, torch_fn, sets, direction, s, yard, case)
    log(f"    torch      {_fmt_ms(trec)}  [{trec.get('backend', trec['error'])}]")
    for fr, fn in frecs:
        if fr["status"] == "OK":
            sp = f"  {fr['speedup']:.2f}x" if fr.get("speedup") else ""
            log(f"    {fr['impl']:<10} {_fmt_ms(fr)}{sp}")
        else:
            log(f"    {fr['impl']:<10} {fr['status']}: {fr['error']}")
    if "copy" in rec:
        log(f"    copy       {rec['copy']['median_ms']:.3f} ms median, "
            f"{rec['copy']['gbps']:.1f} GB/s (the copy yardstick in this case's rounds)")
    rec["torch"] = trec
    rec["fastconv"] = [fr for fr, _ in frecs]
    rec["wall_s"] = {"check": t_check, "timing": time.perf_counter() - t0 - t_check}
    del sets
    if s["device"].type == "cuda":
        torch.cuda.empty_cache()
    return rec


def _fill_times(r, rec, times, per, counts, yard):
    """One side's timing record: median / IQR, calls per sample, page faults, rates."""
    r.update(_stats(times), calls_per_sample=per, **counts)
    r.update(_rates(rec, r["median_ms"], yard))


def _time_case_sequential(rec, trec, frecs, torch_fn, sets, direction, s, yard, case):
    """torch's timing, then each fastconv implementation's (CUDA)."""
    if trec["status"] == "OK":
        try:
            tstep = _make_step(torch_fn, sets, direction)
            # the profiled call also warms up the timer's first measurement
            trec.update(_torch_backend(case, tstep, sets[0], s, direction))
            counts = {}
            _fill_times(trec, rec, *_time(tstep, s, counts), counts, yard)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: no speedups for the case
            trec.update(status="ERROR", error=_first_line(e))
    for fr, fn in frecs:
        if fr["status"] == "OK":
            try:
                counts = {}
                _fill_times(fr, rec, *_time(_make_step(fn, sets, direction), s, counts), counts,
                            yard)
                if trec.get("median_ms"):
                    fr["speedup"] = trec["median_ms"] / fr["median_ms"]
            except Exception as e:  # noqa: BLE001
                fr.update(status="ERROR", error=_first_line(e))


def _case_copy_step(rec):
    """(bytes moved per copy, step) for a CPU case whose rotated inputs exceed the last-level
    cache: the copy yardstick's copy (_copy_step), to be timed in the case's own rounds; None
    for a case that runs from the cache (its time is not the memory's)."""
    import torch

    if rec["bytes"] * rec["input_sets"] < 2 * (_cache_bytes(3) or (32 << 20)):
        return None
    nbytes, step = _copy_step(torch.device("cpu"))
    return 2 * nbytes, step


def _time_case_cpu(rec, trec, frecs, torch_fn, sets, direction, s, yard, case):
    """torch and every fastconv implementation timed together, interleaved
    (_time_cpu_interleaved). A memory-bound case also times the copy yardstick's copy in the
    same rounds (rec["copy"]): this machine's memory bandwidth can halve and recover within
    seconds, so the yardstick taken once at the start of the run may come from another stretch
    than the case; each side's case_copy_fraction compares it with the copy of the same
    rounds. (Cases that run from the last-level cache have none.)"""
    copy = None  # (bytes moved per copy, step)
    if rec["kind"] == "memory":
        try:
            copy = _case_copy_step(rec)
        except Exception:  # noqa: BLE001 - e.g. out of memory: the case goes on without it
            copy = None
    parts = []  # (record, step)
    if trec["status"] == "OK":
        try:
            tstep = _make_step(torch_fn, sets, direction)
            trec.update(_torch_backend(case, tstep, sets[0], s, direction))
            parts.append((trec, tstep))
        except Exception as e:  # noqa: BLE001
            trec.update(status="ERROR", error=_first_line(e))
    parts += [(fr, _make_step(fn, sets, direction)) for fr, fn in frecs if fr["status"] == "OK"]
    if not parts:
        return
    steps = [step for _, step in parts] + ([copy[1]] if copy else [])
    results = _time_cpu_interleaved(steps, s)
    for (r, _), res in zip(parts, results):
        if isinstance(res, Exception):  # e.g. out of memory: no time for this side
            r.update(status="ERROR", error=_first_line(res))
            continue
        _fill_times(r, rec, *res, yard)
    if copy and not isinstance(results[-1], Exception):
        st = _stats(results[-1][0])
        rec["copy"] = {"bytes_per_copy": copy[0], "median_ms": st["median_ms"],
                       "iqr_ms": st["iqr_ms"],
                       "gbps": copy[0] / (st["median_ms"] * 1e-3) / 1e9}
        for r, _ in parts:
            if r.get("median_ms"):
                r["case_copy_fraction"] = r["gbps"] / rec["copy"]["gbps"]
    if trec.get("median_ms"):  # then torch's is parts[0]
        for fr, _ in parts[1:]:
            if fr["status"] == "OK":
                fr["speedup"] = trec["median_ms"] / fr["median_ms"]


def _fmt_ms(r):
    if "median_ms" not in r:
        return f"{r['status']}"
    faults = r.get("page_faults_per_call") or 0
    note = f", {faults:.0f} page faults/call" if faults >= 1 else ""
    return f"{r['median_ms']:9.3f} ms (IQR {r['iqr_ms']:.3f}{note})"


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def _summary(records):
    """Geometric-mean speedup per (direction, impl) over the cases that ran, and the counts."""
    out = {"results": 0, "ok": 0, "fail": 0, "error": 0, "geomean_speedup": {}}
    groups = {}
    for rec in records:
        for fr in rec["fastconv"]:
            out["results"] += 1
            out[fr["status"].lower()] = out.get(fr["status"].lower(), 0) + 1
            if fr.get("speedup"):
                key = f"{rec['op']} {rec['direction']} {fr['impl']}"
                groups.setdefault(key, []).append(fr["speedup"])
    for key, v in sorted(groups.items()):
        out["geomean_speedup"][key] = {
            "geomean": math.exp(sum(math.log(x) for x in v) / len(v)), "cases": len(v)}
    out["failed"] = [f"{rec['id']} [{fr['impl']}]: {fr['status']} {fr['error']}"
                     for rec in records for fr in rec["fastconv"] if fr["status"] != "OK"]
    return out


def format_table(records, yard):
    """The final table: one row per implementation, torch first in each case."""
    header = ["op", "case", "dir", "impl", "median ms", "IQR ms", "TFLOP/s (%gemm)",
              "GB/s (%copy)", "speedup", "torch backend / status"]
    rows = []

    def pct(v):
        return f" ({100 * v:.0f}%)" if v is not None else ""

    for rec in records:
        case = f"{rec['network']}.{rec['layer']} ({rec['label']})"
        t = rec["torch"]
        for i, r in enumerate([t] + rec["fastconv"]):
            timed = "median_ms" in r
            rows.append([
                rec["op"] if i == 0 else "",
                case if i == 0 else "",
                rec["direction"] if i == 0 else "",
                r["impl"],
                f"{r['median_ms']:.3f}" if timed else "-",
                f"{r['iqr_ms']:.3f}" if timed else "-",
                f"{r['tflops']:.3f}{pct(r.get('gemm_fraction'))}"
                if timed and "tflops" in r else "-",
                f"{r['gbps']:.1f}{pct(r.get('case_copy_fraction', r.get('copy_fraction')))}"
                if timed and rec["kind"] == "memory" else "-",
                (f"{r['speedup']:.2f}x" if r.get("speedup") else "-") if i else "",
                (t.get("backend") or f"{t['status']}: {t['error']}") if i == 0 else (
                    "OK" if r["status"] == "OK" else f"{r['status']}: {r['error']}"),
            ])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    widths[1] = min(widths[1], 60)
    widths[-1] = min(widths[-1], 70)
    left = (0, 1, 2, 3, 9)
    lines = [" ".join(h.ljust(w) if j in left else h.rjust(w)
                      for j, (h, w) in enumerate(zip(header, widths))).rstrip()]
    lines.append(" ".join("-" * w for w in widths))
    for row in rows:
        cells = [str(x)[:w].ljust(w) if j in left else str(x).rjust(w)
                 for j, (x, w) in enumerate(zip(row, widths))]
        lines.append(" ".join(cells).rstrip())
    lines.append(
        f"yardsticks (same run, best sample): copy {yard.get('copy_gbps', 0):.1f} GB/s, GEMM "
        f"{yard.get('gemm_tflops', 0):.3f} TFLOP/s. GB/s counts the minimum traffic (each "
        f"tensor read or written once); %copy: of the copy yardstick's median timed in the "
        f"case's own rounds (CPU cases beyond the L3), else of its best sample at the start; "
        f"speedup = torch time / fastconv time.")
    return "\n".join(lines)


_IMPL_ORDER = ("im2col", "direct", "auto", "depthwise", "max_pool2d")


def write_plot(path, records, env, settings):
    """Speedup per case (log scale, grouped by op, a line at 1x), one panel per direction."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    directions = [d for d in DIRECTIONS if any(r["direction"] == d for r in records)]
    # the same colour for an implementation in every plot
    impls = list(_IMPL_ORDER)
    for rec in records:
        for fr in rec["fastconv"]:
            if fr["impl"] not in impls:
                impls.append(fr["impl"])
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(impls)}
    n_cases = max(sum(1 for r in records if r["direction"] == d) for d in directions)
    fig, axes = plt.subplots(1, len(directions), squeeze=False, sharey=False,
                             figsize=(7.5 * len(directions), 1.6 + 0.55 * n_cases * 1.15))
    for ax, d in zip(axes[0], directions):
        recs = [r for r in records if r["direction"] == d]
        recs.sort(key=lambda r: _cases.OPS.index(r["op"]))
        labels, ypos, y = [], [], 0.0
        bar_h = 0.8 / max(1, max(len(r["fastconv"]) for r in recs))
        lo, hi = 1.0, 1.0
        prev_op = None
        for rec in recs:
            if prev_op is not None and rec["op"] != prev_op:
                ax.axhline(y - 0.6, color="0.6", lw=0.8)
                y += 0.4
            prev_op = rec["op"]
            for j, fr in enumerate(rec["fastconv"]):
                yy = y - 0.4 + bar_h * (j + 0.5)
                if fr["status"] == "OK" and fr.get("speedup"):
                    v = fr["speedup"]
                    lo, hi = min(lo, v), max(hi, v)
                    # from parity to the speedup: right of the line is faster, left slower
                    ax.barh(yy, v - 1.0, height=bar_h * 0.9, left=1.0, color=colors[fr["impl"]],
                            label=fr["impl"])
                    ax.text(v, yy, f" {v:.3g}x " if v < 1000 else f" {v:.0f}x ", va="center", fontsize=6,
                            ha="left" if v >= 1 else "right")
                else:
                    ax.text(1.0, yy, f" {fr['status']} ({fr['impl']})", va="center",
                            fontsize=7, color="red", fontweight="bold")
            labels.append(f"{rec['op']}\n{rec['network']}.{rec['layer']}\n{rec['label']}"
                          f"\ntorch: {rec['torch'].get('backend', rec['torch']['status'])}")
            ypos.append(y)
            y += 1.0
        ax.set_xscale("log")
        xmin, xmax = min(lo, 1.0) / 2.5, max(hi, 1.0) * 2.5
        ax.set_xlim(xmin, xmax)
        e0, e1 = math.ceil(math.log2(xmin)), math.floor(math.log2(xmax))
        step = max(1, math.ceil((e1 - e0 + 1) / 10))  # at most ~10 labelled powers of 2
        ticks = [2.0 ** e for e in range(e0, e1 + 1) if e % step == 0]
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}x" if t >= 0.1 else f"1/{1 / t:g}x" for t in ticks],
                           fontsize=7)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.axvline(1.0, color="black", lw=1.2, ls="--")
        ax.set_yticks(ypos)
        ax.set_yticklabels(labels, fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("speedup = torch time / fastconv time (log scale; >1: fastconv faster)")
        ax.set_title(f"{d}", fontsize=10)
        ax.grid(axis="x", which="both", alpha=0.3)
        handles, names = ax.get_legend_handles_labels()
        uniq = dict(sorted(dict(zip(names, handles)).items(), key=lambda kv: impls.index(kv[0])))
        if uniq:
            ax.legend(uniq.values(), uniq.keys(), title="fastconv impl", fontsize=7,
                      loc="best")
    layouts = {bool(r.get("channels_last")) for r in records}
    layout = ("NCHW and channels_last (per case)" if len(layouts) > 1 else
              "channels_last" if layouts == {True} else "NCHW")
    threads = f", {settings['threads']} threads" if env["device"].startswith("cpu") else ""
    fig.suptitle(
        f"fastconv vs torch on {env['device_name']} ({env['device']}{threads}) - "
        f"{settings['dtype']}, {layout}, TF32 {'on' if settings['tf32'] else 'off'}, "
        f"suite {settings['suite']}\ntorch {env['torch_version']}, fastconv "
        f"{env['fastconv_version']}; dashed line: parity (1x)"
        + (f"\nnote: {env['note']}" if env.get("note") else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------


def run(args) -> int:
    try:
        s = _resolve(args)
    except BenchError as e:
        print(f"fastconv bench: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    import json

    import torch

    cases = s["cases"]
    if args.list:
        for c in cases:
            print(f"{c.op:<17} {c.name:<48} {c.label}")
        return 0

    def log(msg):
        if not s["quiet"]:
            print(msg, file=sys.stderr, flush=True)

    settings = {
        "suite": s["suite"], "ops": list(s["ops"]), "dtype": args.dtype,
        "directions": list(s["directions"]), "channels_last": s["channels_last"],
        "tf32": s["tf32"], "threads": s["threads"], "repeat": s["repeat"],
        "min_time_s": s["min_time"], "max_time_s": s["max_time"], "batch": s["batch"],
        "malloc": s["malloc"],
        "timer": ("CUDA events, after warm-up; torch, then each fastconv implementation"
                  if s["device"].type == "cuda" else
                  "torch.utils.benchmark.Timer, torch and fastconv interleaved: one sample of "
                  "each per round, the order reversed every other round"),
        "correctness_tolerance": f"{TOL_FACTOR:g} * (eps_acc * sqrt(reduction) + eps) * rms(ref) "
                                 f"+ 2 eps |ref|, >= 2x torch's own error; ref = torch in float32, TF32 off",
    }
    t_start = time.perf_counter()
    records = []
    with _torch_settings(s):
        settings["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark) \
            if s["device"].type == "cuda" else None
        settings["cudnn_allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)
        settings["cuda_matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
        env = _environment(s)
        log(f"fastconv bench: {len(cases)} cases x {len(s['directions'])} direction(s) on "
            f"{env['device_name']} ({s['device']}), {args.dtype}, "
            f"{'channels_last' if s['channels_last'] else 'NCHW'}, threads {s['threads']}, "
            f"TF32 {'on' if s['tf32'] else 'off'}")
        if s["device_note"]:
            log(f"note: {s['device_note']}")
        if s["malloc"] == "retain":
            try:
                _retain_freed_memory()
            except BenchError as e:
                print(f"fastconv bench: error: {e}", file=sys.stderr)
                return EXIT_USAGE
            log("malloc: freed memory retained in the process (mallopt)")
        copy = _copy_bandwidth(s)
        gemm = _gemm_rate(s)
        yard = {"copy_gbps": copy["gbps"], "gemm_tflops": gemm["tflops"]}
        log(f"copy bandwidth: {copy['gbps']:.1f} GB/s; GEMM ({gemm['m']}^3, {args.dtype}): "
            f"{gemm['tflops']:.3f} TFLOP/s")
        total = len(cases) * len(s["directions"])
        i = 0
        for case in cases:
            for d in s["directions"]:
                i += 1
                log(f"[{i:>{len(str(total))}}/{total}] {case.op} {case.name} ({case.label}) {d}"
                    f"   ({time.perf_counter() - t_start:.0f} s)")
                records.append(_bench_case(case, d, s, yard, log))
    summary = _summary(records)
    elapsed = time.perf_counter() - t_start
    env["load_average_at_end"] = _call(lambda: list(os.getloadavg()))
    busy = _busy_note(env, s)
    if busy:
        env["note"] = busy

    print(format_table(records, yard))
    print()
    for key, g in summary["geomean_speedup"].items():
        print(f"geomean speedup {key}: {g['geomean']:.2f}x over {g['cases']} case(s)")
    print(f"{summary['ok']}/{summary['results']} fastconv results correct and timed in "
          f"{elapsed:.0f} s")
    if busy:
        print(f"note: {busy}")

    result = {
        "schema": "fastconv-bench/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "arguments": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "elapsed_s": elapsed,
        "environment": env,
        "settings": settings,
        "copy_bandwidth": copy,
        "gemm_rate": gemm,
        "cases": records,
        "summary": summary,
    }
    if s["json"]:
        with open(s["json"], "w") as f:
            json.dump(result, f, indent=1, default=str)
            f.write("\n")
        log(f"wrote {s['json']}")
    if s["plot"]:
        write_plot(s["plot"], records, env, settings)
        log(f"wrote {s['plot']}")
    if summary["failed"]:
        print(f"\n{len(summary['failed'])} fastconv result(s) FAILED (wrong result: FAIL; "
              f"exception: ERROR):", file=sys.stderr)
        for line in summary["failed"]:
            print(f"  {line}", file=sys.stderr)
        return EXIT_FAIL
    return 0


def main(argv=None) -> int:
    """`python -m fastconv.benchmark ...`: the bench command on its own (same options)."""
    parser = argparse.ArgumentParser(prog="fastconv bench")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
