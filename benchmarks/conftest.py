"""pytest-benchmark suite over fastconv's benchmark cases (the same list as `fastconv bench`,
from fastconv/_cases.py): each case x implementation (torch, and every fastconv algo that
applies) x direction (fwd, fwd+bwd) is one benchmark, grouped by op, shape and direction so
that fastconv and torch sit side by side in pytest-benchmark's table.

    pytest benchmarks/                                   # quick suite on the best device
    pytest benchmarks/bench_max_pool2d.py --fastconv-suite cpu-targets --fastconv-device cpu
    pytest benchmarks/ --benchmark-json out.json         # pytest-benchmark's own JSON

Options (or environment variables): --fastconv-suite (FASTCONV_BENCH_SUITE, default quick),
--fastconv-device (FASTCONV_BENCH_DEVICE, default cuda if available else cpu),
--fastconv-dtype (FASTCONV_BENCH_DTYPE, default float32), --fastconv-channels-last
(FASTCONV_BENCH_CHANNELS_LAST=1), --fastconv-threads (FASTCONV_BENCH_THREADS).

Every implementation's result is checked against torch (float32, TF32 off) before it is timed (the
same check as `fastconv bench`); a wrong result fails the benchmark instead of timing it.
On CUDA each timed call ends with torch.cuda.synchronize(), since pytest-benchmark times
wall clock; cudnn.benchmark is on and TF32 off for both sides.
"""

import os

import pytest

pytest.importorskip("pytest_benchmark", reason="the benchmarks need pytest-benchmark")

import torch  # noqa: E402

import fastconv  # noqa: E402,F401
from fastconv import _cases, benchmark as fb  # noqa: E402


def pytest_addoption(parser):
    g = parser.getgroup("fastconv", "fastconv benchmark cases")
    g.addoption("--fastconv-suite", default=None, help="suite name (default quick)")
    g.addoption("--fastconv-device", default=None, help="cpu or cuda (default: best present)")
    g.addoption("--fastconv-dtype", default=None, help="float32, float16 or bfloat16")
    g.addoption("--fastconv-channels-last", action="store_true", default=None,
                help="inputs and weights in channels_last")
    g.addoption("--fastconv-threads", type=int, default=None, help="CPU threads")


def pytest_collect_file(file_path, parent):
    # bench_<op>.py files are test modules here (pytest's default pattern is test_*.py);
    # a file named on the command line is collected by pytest itself.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _opt(config, name, env, default):
    v = config.getoption(name)
    if v is None:
        v = os.environ.get(env) or default
    return v


def _settings(config):
    cache = getattr(config, "_fastconv_bench", None)
    if cache is not None:
        return cache
    has_cuda = torch.cuda.is_available() and bool(getattr(fastconv._C, "with_cuda", 0))
    device = torch.device(_opt(config, "--fastconv-device", "FASTCONV_BENCH_DEVICE",
                               "cuda" if has_cuda else "cpu"))
    dtype = getattr(torch, _opt(config, "--fastconv-dtype", "FASTCONV_BENCH_DTYPE", "float32"))
    cl = _opt(config, "--fastconv-channels-last", "FASTCONV_BENCH_CHANNELS_LAST", "0")
    threads = int(_opt(config, "--fastconv-threads", "FASTCONV_BENCH_THREADS",
                       torch.get_num_threads()))
    s = {
        "device": device, "dtype": dtype, "tf32": False, "threads": threads,
        "channels_last": str(cl).lower() in ("1", "true", "yes", "on"),
        "suite": _opt(config, "--fastconv-suite", "FASTCONV_BENCH_SUITE", "quick"),
    }
    s["cases"] = _cases.suite(s["suite"], device.type)
    config._fastconv_bench = s
    return s


def pytest_generate_tests(metafunc):
    """Parametrise bench functions of a module with OP = '<op>' over that op's cases."""
    if "fc_case" not in metafunc.fixturenames:
        return
    op = getattr(metafunc.module, "OP")
    s = _settings(metafunc.config)
    cases = [c for c in s["cases"] if c.op == op]
    metafunc.parametrize("fc_case", cases, ids=[f"{c.name} {c.label}" for c in cases])
    impls = ["torch"] + list(_cases.fastconv_impls(cases[0]) if cases else [])
    metafunc.parametrize("fc_impl", impls)
    metafunc.parametrize("fc_direction", list(fb.DIRECTIONS))


@pytest.fixture(scope="session")
def fc_settings(request):
    s = _settings(request.config)
    torch.set_num_threads(s["threads"])
    if s["device"].type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return s


@pytest.fixture(scope="session")
def _fc_refs():
    return {}


@pytest.fixture
def fc_run(fc_settings, _fc_refs):
    """fc_run(benchmark, case, impl, direction): check `impl` against torch (float32), then
    time it with pytest-benchmark on rotating inputs."""
    s = fc_settings

    def run(bench, case, impl, direction):
        cl = s["channels_last"] if case.channels_last is None else case.channels_last
        first = fb._InputSet(case, s, cl, direction, seed=0)
        key = (case, direction, cl)
        if key not in _fc_refs:
            while len(_fc_refs) >= 4:  # the references of the last few cases only
                _fc_refs.pop(next(iter(_fc_refs)))
            ref = fb._reference(_cases.torch_impl(case), first, direction)
            tres = fb._run_once(_cases.torch_impl(case), first, direction)
            red = case.reductions()
            tratio = {k: fb._error_ratio(tres[k], r, red.get(k, 1), s)[0] for k, r in ref.items()}
            _fc_refs[key] = (ref, tratio)
        ref, tratio = _fc_refs[key]
        fn = _cases.torch_impl(case) if impl == "torch" else _cases.fastconv_impls(case)[impl]
        ok, detail, msg = fb._check(fb._run_once(fn, first, direction), ref, tratio, case, s)
        if not ok:
            pytest.fail(f"FAIL: {impl} gives a wrong result for {case.name} ({case.label}) "
                        f"{direction}: {msg}")
        sets = [first] + [fb._InputSet(case, s, cl, direction, seed=i)
                          for i in range(1, fb._rotation_count(first.nbytes(), s))]
        step = fb._make_step(fn, sets, direction)
        if s["device"].type == "cuda":
            inner = step

            def step():
                inner()
                torch.cuda.synchronize()
        itemsize = torch.empty((), dtype=s["dtype"]).element_size()
        bench.group = f"{case.op} {case.label} {direction}"
        bench.extra_info.update(
            case=case.name, label=case.label, op=case.op, direction=direction, impl=impl,
            side="torch" if impl == "torch" else "fastconv",
            dtype=str(s["dtype"]).replace("torch.", ""),
            channels_last=cl, device=str(s["device"]), flops=case.flops(direction),
            bytes=case.bytes(direction, itemsize), check=detail)
        if impl == "torch":
            bench.extra_info.update(fb._torch_backend(case, step, first, s, direction))
        bench(step)

    return run
