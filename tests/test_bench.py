"""`fastconv bench`: the command end to end on CPU with the tiny suite (seconds), FAIL
detection through the documented test hook (fastconv._cases.fastconv_impls), --ops
filtering, argument errors, and the case list itself."""

import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastconv
from fastconv import _cases, benchmark, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a short run: few samples, little time per measurement
FAST = ["--device", "cpu", "--suite", "tiny", "--repeat", "2", "--min-time", "0.005",
        "--threads", "1"]


def run_bench(capsys, *args):
    rc = benchmark.main(FAST + list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def reference_impls(case):
    """Correct stand-ins for fastconv's kernels (fastconv.reference: pure PyTorch), so the
    harness is tested apart from the kernels it measures."""
    if case.op == "max_pool2d":
        return {"ref": lambda x: reference.max_pool2d(x, case.kernel, case.stride, case.padding,
                                                      case.dilation, case.ceil_mode)}
    return {"ref": lambda x, w, b: reference.conv2d(x, w, b, case.stride, case.padding,
                                                    case.dilation, case.groups)}


class _WrongGrad(torch.autograd.Function):
    """Identity forward; the backward drops a tenth of the gradient: only fwd+bwd sees it."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return g * 0.9


def _bugs():
    def scaled(y):
        return y * 1.01

    def one_element(y):
        y = y.clone()
        y.view(-1)[y.numel() // 2] += 0.5
        return y

    def last_column_missing(y):
        y = y.clone()
        y[..., -1] = 0
        return y

    def nan(y):
        y = y.clone()
        y.view(-1)[0] = float("nan")
        return y

    def wrong_shape(y):
        return y[..., :-1]

    def wrong_grad(y):
        return _WrongGrad.apply(y)

    return {"scaled": scaled, "one_element": one_element, "last_column_missing":
            last_column_missing, "nan": nan, "wrong_shape": wrong_shape, "wrong_grad": wrong_grad}


def wrong_impls(bug):
    def impls(case):
        t = _cases.torch_impl(case)
        out = {"good": t}
        out["bad"] = lambda *a: bug(t(*a))
        return out
    return impls


# --------------------------------------------------------------------------------------------
# end to end with fastconv's kernels
# --------------------------------------------------------------------------------------------


ENV_FIELDS = ["device", "device_name", "cpu_model", "cpu_count", "threads", "torch_version",
              "cuda_version", "cudnn_version", "fastconv_version", "git_commit",
              "load_average_at_start", "load_average_at_end"]
SETTING_FIELDS = ["suite", "ops", "dtype", "directions", "channels_last", "tf32", "threads",
                  "repeat", "cudnn_benchmark", "cudnn_allow_tf32", "cuda_matmul_allow_tf32",
                  "timer", "malloc"]
CASE_FIELDS = ["id", "op", "network", "layer", "label", "direction", "kind", "input_shape",
               "output_shape", "kernel", "stride", "padding", "flops", "bytes", "torch",
               "fastconv", "input_sets"]
TIMED_FIELDS = ["median_ms", "iqr_ms", "q25_ms", "q75_ms", "samples_ms", "gbps",
                "copy_fraction", "page_faults_per_call", "sys_ms_per_call"]


def test_end_to_end_json_and_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    js, png = tmp_path / "out.json", tmp_path / "out.png"
    rc, out, err = run_bench(capsys, "--json", str(js), "--plot", str(png))
    assert rc == 0, err
    data = json.loads(js.read_text())
    assert data["schema"] == "fastconv-bench/1"
    for k in ENV_FIELDS:
        assert k in data["environment"], k
    assert data["environment"]["device"] == "cpu"
    assert data["environment"]["torch_version"] == torch.__version__
    assert data["environment"]["fastconv_version"] == fastconv.__version__
    for k in SETTING_FIELDS:
        assert k in data["settings"], k
    assert data["settings"]["threads"] == 1
    assert data["settings"]["malloc"] == "default"
    assert data["copy_bandwidth"]["gbps"] > 0 and data["gemm_rate"]["tflops"] > 0
    cases = data["cases"]
    assert len(cases) == 2 * len(_cases.suite("tiny"))
    assert {c["op"] for c in cases} == set(_cases.OPS)
    assert {c["direction"] for c in cases} == {"fwd", "fwd+bwd"}
    for c in cases:
        for k in CASE_FIELDS:
            assert k in c, k
        t = c["torch"]
        assert t["status"] == "OK"
        assert t["backend"] and t["backend"] != "unknown"
        for k in TIMED_FIELDS:
            assert k in t, k
        assert t["page_faults_per_call"] >= 0 and t["sys_ms_per_call"] >= 0
        assert len(t["samples_ms"]) >= 2
        expected = {"conv2d": {"im2col", "direct", "auto"},
                    "depthwise_conv2d": {"depthwise", "im2col", "direct", "auto"},
                    "max_pool2d": {"max_pool2d"}}[c["op"]]
        assert {f["impl"] for f in c["fastconv"]} == expected
        for f in c["fastconv"]:
            assert f["status"] == "OK", f
            for k in TIMED_FIELDS + ["speedup", "check"]:
                assert k in f, k
            assert f["speedup"] == pytest.approx(t["median_ms"] / f["median_ms"])
            assert f["check"]["out"]["err_ratio"] <= 1
            if c["direction"] == "fwd+bwd":
                assert "grad_input" in f["check"]
            if c["op"] != "max_pool2d":
                assert f["tflops"] > 0 and f["gemm_fraction"] > 0
    assert data["summary"]["fail"] == 0 and data["summary"]["error"] == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # the table names every case and torch's backend, and the progress went to stderr
    assert "speedup" in out and ("oneDNN" in out or "ATen" in out)
    assert "[ 1/12]" in err


def test_memory_cases_time_the_copy_in_their_own_rounds(capsys, tmp_path, monkeypatch):
    """A memory-bound CPU case whose rotated inputs exceed the last-level cache times the copy
    yardstick's copy in its own rounds, and each side's case_copy_fraction compares its GB/s
    with that copy's; compute-bound cases and cases that fit in the cache time none."""
    js = tmp_path / "out.json"
    rc, _, _ = run_bench(capsys, "--ops", "max_pool2d", "--direction", "fwd", "--json", str(js))
    assert rc == 0
    assert all("copy" not in c for c in json.loads(js.read_text())["cases"])  # tiny: in cache

    cache = 16 << 10  # a last-level cache the tiny cases' inputs exceed
    monkeypatch.setattr(benchmark, "_cache_bytes", lambda level: cache)
    monkeypatch.setattr(benchmark, "_CPU_COPY_MIN_BYTES", 1 << 20)
    rc, out, err = run_bench(capsys, "--ops", "max_pool2d,conv2d", "--direction", "fwd",
                             "--json", str(js))
    assert rc == 0, err
    cases = json.loads(js.read_text())["cases"]
    memory = [c for c in cases if c["kind"] == "memory"]
    assert memory and len(memory) < len(cases)
    for c in cases:
        if c["kind"] != "memory":
            assert "copy" not in c
            continue
        assert c["bytes"] * c["input_sets"] >= 2 * cache
        cp = c["copy"]
        assert cp["bytes_per_copy"] == 2 * max(1 << 20, 8 * cache)
        assert cp["gbps"] == pytest.approx(cp["bytes_per_copy"] / (cp["median_ms"] * 1e-3) / 1e9)
        for side in [c["torch"]] + c["fastconv"]:
            assert side["case_copy_fraction"] == pytest.approx(side["gbps"] / cp["gbps"])
            assert side["copy_fraction"] > 0  # against the run's yardstick, still there
    assert "copy yardstick in this case's rounds" in err
    assert "%copy: of the copy yardstick's median timed in the case's own rounds" in out


# --------------------------------------------------------------------------------------------
# FAIL detection (test hook: fastconv._cases.fastconv_impls)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bug", list(_bugs()))
def test_wrong_result_is_fail(capsys, tmp_path, monkeypatch, bug):
    monkeypatch.setattr(_cases, "fastconv_impls", wrong_impls(_bugs()[bug]))
    direction = "fwd+bwd" if bug == "wrong_grad" else "fwd"
    js = tmp_path / "out.json"
    rc, out, err = run_bench(capsys, "--ops", "conv2d", "--direction", direction,
                             "--json", str(js))
    assert rc == benchmark.EXIT_FAIL
    data = json.loads(js.read_text())
    for c in data["cases"]:
        good, bad = c["fastconv"]
        assert good["impl"] == "good" and good["status"] == "OK" and good["speedup"] > 0
        assert bad["impl"] == "bad" and bad["status"] == "FAIL", bad
        # a wrong result is never timed and never gets a speedup
        assert "speedup" not in bad and "median_ms" not in bad
    assert data["summary"]["fail"] == len(data["cases"])
    assert "FAIL" in out and "FAILED" in err
    if bug == "wrong_grad":
        assert "grad_input" in data["cases"][0]["fastconv"][1]["error"]


def test_exception_is_error(capsys, monkeypatch):
    def impls(case):
        def boom(*a):
            raise RuntimeError("kernel exploded\nsecond line")
        return {"boom": boom}
    monkeypatch.setattr(_cases, "fastconv_impls", impls)
    rc, out, err = run_bench(capsys, "--ops", "max_pool2d", "--direction", "fwd")
    assert rc == benchmark.EXIT_FAIL
    assert "ERROR: RuntimeError: kernel exploded" in out
    assert "second line" not in out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_correct_reference_passes(capsys, tmp_path, monkeypatch, dtype):
    """A correct implementation with another summation order (fastconv.reference) passes the
    check in float32 and bfloat16, forward and backward."""
    monkeypatch.setattr(_cases, "fastconv_impls", reference_impls)
    js = tmp_path / "out.json"
    rc, out, err = run_bench(capsys, "--dtype", dtype, "--json", str(js))
    assert rc == 0, out + err
    data = json.loads(js.read_text())
    assert all(f["status"] == "OK" for c in data["cases"] for f in c["fastconv"])
    assert data["settings"]["dtype"] == dtype


def test_channels_last(capsys, tmp_path, monkeypatch):
    seen = []

    def impls(case):
        t = _cases.torch_impl(case)

        def f(x, *rest):
            seen.append(x.is_contiguous(memory_format=torch.channels_last))
            return t(x, *rest)
        return {"spy": f}
    monkeypatch.setattr(_cases, "fastconv_impls", impls)
    js = tmp_path / "out.json"
    rc, _, err = run_bench(capsys, "--channels-last", "--ops", "dw", "--direction", "fwd",
                           "--json", str(js))
    assert rc == 0, err
    assert seen and all(seen)
    assert json.loads(js.read_text())["settings"]["channels_last"] is True


# --------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ops, expected", [
    ("max_pool2d", {"max_pool2d"}),
    ("conv,pool", {"conv2d", "max_pool2d"}),
    ("depthwise", {"depthwise_conv2d"}),
])
def test_ops_filter(capsys, tmp_path, monkeypatch, ops, expected):
    monkeypatch.setattr(_cases, "fastconv_impls", reference_impls)
    js = tmp_path / "out.json"
    rc, out, err = run_bench(capsys, "--ops", ops, "--direction", "fwd", "--json", str(js))
    assert rc == 0, err
    data = json.loads(js.read_text())
    assert {c["op"] for c in data["cases"]} == expected
    assert {c["direction"] for c in data["cases"]} == {"fwd"}
    assert len(data["cases"]) == sum(1 for c in _cases.suite("tiny") if c.op in expected)


def test_ops_space_separated():
    assert _cases.parse_ops(["conv2d", "max_pool2d"]) == ("conv2d", "max_pool2d")
    assert _cases.parse_ops("all") == _cases.OPS


def test_list(capsys):
    rc = benchmark.main(["--device", "cpu", "--suite", "cpu-targets", "--list"])
    out = capsys.readouterr().out
    assert rc == 0
    assert len(out.strip().splitlines()) == len(_cases.cpu_targets())


@pytest.mark.parametrize("args, message", [
    (["--dtype", "float16"], "--dtype float16 is not supported on cpu"),
    (["--dtype", "int8"], "--dtype: expected one of float32, float16, bfloat16"),
    (["--suite", "alexnet"], "--suite: expected one of quick, full"),
    (["--ops", "conv3d"], "--ops: unknown op 'conv3d'"),
    (["--ops", ","], "--ops: expected at least one op"),
    (["--direction", "bwd"], "--direction: expected fwd, fwd+bwd or both"),
    (["--tf32", "maybe"], "--tf32: expected on or off"),
    (["--device", "tpu"], "--device: expected cpu, cuda, cuda:N or auto"),
    (["--json", "/nonexistent-dir/x.json"], "--json /nonexistent-dir/x.json: directory"),
    (["--malloc", "jemalloc"], "--malloc: expected default or retain, but got 'jemalloc'"),
])
def test_argument_errors(capsys, args, message):
    rc = benchmark.main(["--device", "cpu", "--suite", "tiny"] + args)
    err = capsys.readouterr().err
    assert rc == benchmark.EXIT_USAGE
    assert message in err
    assert "Traceback" not in err


@pytest.mark.skipif(benchmark._mallopt() is None, reason="needs glibc's mallopt")
def test_malloc_retain(tmp_path):
    # in a child process: mallopt's settings last for the rest of the process
    code = """
import ctypes, json, sys, torch
from fastconv import benchmark
# three 30 MiB buffers allocated, written and freed every call. Whether glibc then hands the
# memory back to the kernel depends on the process's allocation history, so the test first
# makes it certain: an mmap threshold of 128 KiB (glibc's initial value) maps each buffer
# anew, and every call touches 3 x 7680 fresh pages.
def churn():
    a = [torch.empty(30 << 18).fill_(1.0) for _ in range(3)]
    del a
def faults_per_call():
    for _ in range(3):
        churn()
    r0 = benchmark._rusage()
    for _ in range(10):
        churn()
    r1 = benchmark._rusage()
    return (r1.ru_minflt - r0.ru_minflt) / 10
assert benchmark._mallopt()(benchmark._M_MMAP_THRESHOLD, 128 << 10) == 1
before = faults_per_call()
benchmark._retain_freed_memory()  # what --malloc retain does first
after = faults_per_call()
rc = benchmark.main(["--device", "cpu", "--suite", "tiny", "--repeat", "2", "--min-time",
                     "0.005", "--threads", "1", "--ops", "max_pool2d", "--direction", "fwd",
                     "--malloc", "retain", "--json", sys.argv[1]])
print(json.dumps({"rc": rc, "before": before, "after": after}))
"""
    js = tmp_path / "retain.json"
    r = subprocess.run([sys.executable, "-c", code, str(js)], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["rc"] == 0
    assert "malloc: freed memory retained in the process" in r.stderr
    assert res["before"] > 20000, res  # 23040 pages per call, mapped anew
    assert res["after"] < 100, res  # retained: the same memory every call
    data = json.loads(js.read_text())
    assert data["settings"]["malloc"] == "retain"
    assert all(c["torch"]["page_faults_per_call"] >= 0 for c in data["cases"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_no_cuda_device(capsys):
    rc = benchmark.main(["--device", "cuda", "--suite", "tiny"])
    assert rc == benchmark.EXIT_USAGE
    assert "--device cuda: no CUDA device is available" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--repeat", "0"], "--repeat must be a positive integer, got 0"),
    (["--threads", "two"], "--threads must be a positive integer, got 'two'"),
    (["--min-time", "-1"], "--min-time must be a positive number"),
])
def test_argparse_errors(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        benchmark.main(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_dispatch():
    """`python -m fastconv bench` reaches this command (the cli imports every command)."""
    r = subprocess.run([sys.executable, "-m", "fastconv", "bench", "--device", "cpu",
                        "--suite", "tiny", "--list"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "tiny.conv3x3" in r.stdout


def test_pytest_benchmark_suite(tmp_path):
    """benchmarks/ collects bench_<op>.py from the directory, checks and times torch and
    fastconv side by side in one group per op, shape and direction, and writes
    pytest-benchmark's JSON."""
    pytest.importorskip("pytest_benchmark")
    js = tmp_path / "pb.json"
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider",
         "--fastconv-suite", "tiny", "--fastconv-device", "cpu", "--fastconv-threads", "1",
         "-k", "max_pool2d", "--benchmark-min-time", "0.001", "--benchmark-max-time", "0.01",
         f"--benchmark-json={js}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(js.read_text())
    pools = [c for c in _cases.suite("tiny") if c.op == "max_pool2d"]
    assert len(data["benchmarks"]) == len(pools) * 2 * 2  # (torch, fastconv) x directions
    groups = {}
    for b in data["benchmarks"]:
        groups.setdefault(b["group"], set()).add(b["extra_info"]["side"])
        assert b["extra_info"]["op"] == "max_pool2d"
    assert len(groups) == len(pools) * 2
    assert all(sides == {"torch", "fastconv"} for sides in groups.values())


# --------------------------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------------------------


ALL_SUITES = _cases.SUITES + _cases.HIDDEN_SUITES


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
@pytest.mark.parametrize("name", ALL_SUITES)
def test_suite_shapes_match_torch(name, device_type):
    cases = _cases.suite(name, device_type)
    assert cases
    ids = [(c.op, c.name, c.label) for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case"
    for c in cases:
        x = torch.empty(c.input_shape, device="meta")
        if c.op == "max_pool2d":
            y = F.max_pool2d(x, c.kernel, c.stride, c.padding, c.dilation, c.ceil_mode)
        else:
            w = torch.empty(c.weight_shape, device="meta")
            y = F.conv2d(x, w, None, c.stride, c.padding, c.dilation, c.groups)
            if c.op == "depthwise_conv2d":
                assert c.groups == c.c and c.weight_shape[1] == 1
        assert tuple(y.shape) == c.output_shape, c


def test_cpu_targets_are_in_the_suites():
    """The CPU speed targets' shapes (N=8), in both layouts where the targets name them, are
    in 'cpu-targets' and in the CPU 'full' suite."""
    want = {
        ("max_pool2d", (8, 64, 112, 112), (3, 3), (2, 2), (1, 1), None): {False, True},
        ("depthwise_conv2d", (8, 144, 56, 56), (3, 3), (1, 1), (1, 1), 144): {False, True},
        ("depthwise_conv2d", (8, 144, 56, 56), (7, 7), (1, 1), (3, 3), 144): {False, True},
        ("conv2d", (8, 64, 56, 56), (3, 3), (1, 1), (1, 1), 64): {None},
        ("conv2d", (8, 256, 14, 14), (3, 3), (1, 1), (1, 1), 256): {None},
        ("conv2d", (8, 256, 56, 56), (1, 1), (1, 1), (0, 0), 64): {None},
    }
    for suite in ("cpu-targets", "full"):
        got = {}
        for c in _cases.suite(suite, "cpu"):
            key = (c.op, c.input_shape, c.kernel, c.stride, c.padding,
                   None if c.op == "max_pool2d" else c.out_channels)
            got.setdefault(key, set()).add(c.channels_last)
        for key, layouts in want.items():
            assert layouts <= got.get(key, set()), (suite, key)


def test_networks_named_in_the_issue():
    labels = {(c.op, c.kernel, c.stride) for c in _cases.suite("full", "cuda")}
    for item in [("conv2d", (3, 3), (1, 1)), ("conv2d", (1, 1), (1, 1)),
                 ("conv2d", (7, 7), (2, 2)), ("depthwise_conv2d", (3, 3), (1, 1)),
                 ("depthwise_conv2d", (3, 3), (2, 2)), ("depthwise_conv2d", (7, 7), (1, 1)),
                 ("depthwise_conv2d", (13, 13), (1, 1)), ("depthwise_conv2d", (31, 31), (1, 1)),
                 ("max_pool2d", (2, 2), (2, 2)), ("max_pool2d", (3, 3), (2, 2))]:
        assert item in labels, item
    # batch sizes fit for the device
    assert {c.n for c in _cases.suite("resnet50", "cpu")} == {8}
    assert all(64 <= c.n <= 256 for c in _cases.suite("full", "cuda"))


def test_flops_and_bytes():
    c = _cases.conv("net", "l", 8, 64, 128, 56, 3, 2, 1)
    assert c.output_shape == (8, 128, 28, 28)
    assert c.flops("fwd") == 2 * 8 * 128 * 28 * 28 * 64 * 9
    assert c.flops("fwd+bwd") == 3 * c.flops("fwd")
    x, w, y = 8 * 64 * 56 * 56, 128 * 64 * 9, 8 * 128 * 28 * 28
    assert c.bytes("fwd", 4) == 4 * (x + w + y)
    p = _cases.pool("net", "l", 8, 64, 112, 3, 2, 1)
    assert p.flops("fwd") == 0 and p.kind == "memory"
    assert p.bytes("fwd+bwd", 2) == 2 * 2 * (8 * 64 * 112 * 112 + 8 * 64 * 56 * 56)


def test_group_conv_is_not_depthwise():
    assert _cases.conv("n", "l", 1, 8, 8, 8, 3, groups=2).op == "conv2d"
    assert _cases.conv("n", "l", 1, 8, 16, 8, 3, groups=8).op == "depthwise_conv2d"


# --------------------------------------------------------------------------------------------
# torch's backend is read, not guessed
# --------------------------------------------------------------------------------------------


def _backend(case, mkldnn=True, direction="fwd"):
    s = {"device": torch.device("cpu"), "dtype": torch.float32, "tf32": False}
    st = benchmark._InputSet(case, s, False, direction, seed=0)
    step = benchmark._make_step(_cases.torch_impl(case), [st], direction)
    with torch.backends.mkldnn.flags(enabled=mkldnn):
        return benchmark._torch_backend(case, step, st, s, direction)


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
def test_backend_from_profiler():
    conv = _cases.conv("n", "l", 2, 8, 8, 10, 3, 1, 1)
    if torch.backends.mkldnn.is_available():
        b = _backend(conv)
        assert b["backend"] == "oneDNN" and "aten::mkldnn_convolution" in b["profiler_ops"]
        assert b["conv_backend_rule"] in (None, "Mkldnn") and b["note"] is None
    b = _backend(conv, mkldnn=False)
    assert b["backend"].startswith("ATen (slow_conv2d")
    assert any(op.startswith(("aten::_slow_conv2d", "aten::thnn_conv2d"))
               for op in b["profiler_ops"])
    b = _backend(_cases.pool("n", "l", 2, 4, 12, 3, 2, 1), direction="fwd+bwd")
    assert b["backend"].startswith("ATen (max_pool2d")
    assert "aten::max_pool2d_with_indices_backward" in b["profiler_ops"]


def test_error_ratio_scales_with_reduction():
    s = {"device": torch.device("cpu"), "dtype": torch.bfloat16, "tf32": False}
    r = torch.randn(1000, dtype=torch.float64)
    # bfloat16 rounding of a correct result passes
    ratio, _, why = benchmark._error_ratio(r.to(torch.bfloat16), r, 1, s)
    assert why is None and ratio <= 1
    # an error of 5% of the rms fails for a short reduction...
    bad = r + 0.05 * r.pow(2).mean().sqrt() * torch.sign(torch.randn(1000, dtype=torch.float64))
    assert benchmark._error_ratio(bad, r, 9, {**s, "dtype": torch.float32})[0] > 1
    # ... and NaN, inf or a wrong shape are never within tolerance
    nan = r.clone()
    nan[3] = math.nan
    assert benchmark._error_ratio(nan, r, 9, s)[0] == math.inf
    assert benchmark._error_ratio(r[:-1], r, 9, s)[2].startswith("shape")


class _FakeEvent:
    """Host-clock stand-in for torch.cuda.Event, to run the CUDA timing loop on a CPU."""

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        self.t = __import__("time").perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


@pytest.mark.parametrize("call_s", [1e-5, 0.03, 0.4])
def test_cuda_timing_loop(monkeypatch, call_s):
    """The CUDA event loop's sample sizing: >= ~1 ms per sample, at least --repeat samples
    (more to fill --min-time), and no more than about --max-time for slow calls (but at least
    3 samples)."""
    import time

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)

    def step():
        end = time.perf_counter() + call_s
        while time.perf_counter() < end:
            pass

    s = {"repeat": 20, "min_time": 0.05, "max_time": 1.0}
    t0 = time.perf_counter()
    times, inner = benchmark._time_cuda(step, s)
    if call_s >= 0.4:
        assert len(times) == 3 and inner == 1
        assert time.perf_counter() - t0 < 10 * call_s
    else:
        assert 20 <= len(times) <= 200
    assert inner >= 1 and inner * statistics.median(times) >= 0.9e-3
    assert all(t >= call_s * 0.99 for t in times)
    assert statistics.median(times) < 10 * call_s


def _busy(seconds):
    import time
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_cpu_timing_interleaves_the_sides():
    """CPU timing takes one sample of each side per round, the order reversed every other
    round, after each side's own calibration; every side gets --repeat samples."""
    log = []

    def step(name):
        def f():
            log.append(name)
            _busy(2e-4)
        return f

    s = {"repeat": 6, "min_time": 0.01, "max_time": 1.0, "threads": 1}
    results = benchmark._time_cpu_interleaved([step("a"), step("b")], s)
    assert [len(times) >= 6 for times, _, _ in results] == [True, True]
    number = [per for _, per, _ in results]
    # the timed rounds are the log's tail: blocks of `number` calls, a b | b a | a b ...
    rounds = min(len(results[0][0]), len(results[1][0]))
    blocks = []
    i = len(log)
    for k in range(2 * rounds):
        name = log[i - 1]
        n = number[0 if name == "a" else 1]
        assert log[i - n:i] == [name] * n
        blocks.append(name)
        i -= n
    blocks.reverse()
    assert blocks[:4] == ["a", "b", "b", "a"]
    assert all(blocks[j] != blocks[j + 1] for j in range(0, len(blocks) - 1, 2))


def test_cpu_timing_is_fair_when_the_machine_slows_down():
    """Two identical steps on a machine that turns 3x slower halfway through: timed one after
    the other, the first would look 3x faster; interleaved, both see the same stretches."""
    import time
    t0 = time.perf_counter()

    def step():
        _busy(1e-3 if time.perf_counter() - t0 < 0.15 else 3e-3)

    s = {"repeat": 40, "min_time": 0.05, "max_time": 2.0, "threads": 1}
    (ta, _, _), (tb, _, _) = benchmark._time_cpu_interleaved([step, step], s)
    ratio = statistics.median(ta) / statistics.median(tb)
    assert 0.7 < ratio < 1.4
    assert max(ta) > 2e-3 and max(tb) > 2e-3  # both saw the slow stretch


def test_cpu_timing_stops_at_max_time():
    """A slow side stops the rounds at --max-time, with at least 3 samples each; the counts
    are per call."""
    import time

    s = {"repeat": 50, "min_time": 0.05, "max_time": 0.2, "threads": 1}
    t0 = time.perf_counter()
    results = benchmark._time_cpu_interleaved([lambda: _busy(5e-2), lambda: _busy(1e-3)], s)
    assert time.perf_counter() - t0 < 2.0
    (ts, ns, cs), (tf, nf, cf) = results
    assert 3 <= len(ts) < 50 and len(tf) == len(ts)
    assert statistics.median(ts) == pytest.approx(5e-2, rel=0.3)
    assert statistics.median(tf) == pytest.approx(1e-3, rel=0.5)
    assert set(cs) == {"page_faults_per_call", "sys_ms_per_call"}


def test_cpu_timing_runs_its_samples_with_the_garbage_collector_off():
    """Like torch's Timer (timeit), the interleaved samples run with Python's garbage collector
    off, so that a collection which one side's allocations trigger is not charged to whichever
    side happens to run next; it is on again afterwards, and after a side that raised."""
    import gc

    seen = []

    def step():
        seen.append(gc.isenabled())
        _busy(1e-4)

    def raises():
        # in a timed sample (called from the rounds' own loop), not in the Timer's calibration
        if sys._getframe(1).f_code.co_name == "_time_cpu_interleaved":
            raise RuntimeError("boom")
        _busy(1e-4)

    s = {"repeat": 5, "min_time": 0.01, "max_time": 1.0, "threads": 1}
    assert gc.isenabled()
    ok, bad = benchmark._time_cpu_interleaved([step, raises], s)
    assert isinstance(bad, RuntimeError) and len(ok[0]) >= 5
    assert gc.isenabled()
    # calibration (blocked_autorange, which is timeit's loop) and every timed sample: off
    assert len(seen) > 10 and not any(seen)
    gc.disable()
    try:
        benchmark._time_cpu_interleaved([step], s)
        assert not gc.isenabled()  # left as the caller had it
    finally:
        gc.enable()


def test_cpu_timing_drops_a_side_that_raises():
    """A side that raises while it is timed is reported with its exception and leaves the
    rounds; the other sides are still timed."""
    calls = [0]

    def flaky():
        calls[0] += 1
        if calls[0] > 20:
            raise MemoryError("out of memory at call 21")
        _busy(1e-4)

    s = {"repeat": 10, "min_time": 0.01, "max_time": 1.0, "threads": 1}
    ok, bad = benchmark._time_cpu_interleaved([lambda: _busy(1e-4), flaky], s)
    assert isinstance(bad, MemoryError)
    times, per, counts = ok
    assert len(times) >= 10 and per >= 1
