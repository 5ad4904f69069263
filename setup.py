"""Build script for fastconv's C++/CUDA extension (fastconv._C).

CPU kernels (csrc/*.cpp, csrc/cpu/*.cpp) are always built. CUDA kernels (csrc/cuda/*.cu) are
built when torch was built with CUDA and an nvcc is found, or when FASTCONV_FORCE_CUDA=1.

Environment switches:
  FASTCONV_DISABLE_CUDA=1   build the CPU kernels only
  FASTCONV_FORCE_CUDA=1     build the CUDA kernels even if no GPU / nvcc was detected
  TORCH_CUDA_ARCH_LIST      CUDA archs (default: the visible GPUs, or "9.0" with no GPU)
  FASTCONV_CPU_ARCH         value for -march (default "native"; empty string: no -march flag)
  DEBUG=1                   -O0 -g, no optimisation
  MAX_JOBS                  parallel compile jobs (read by torch's ninja build)
"""

import glob
import os
import shutil
import site
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def _find_cuda_home():
    """Locate the CUDA toolkit before torch.utils.cpp_extension guesses it.

    torch derives CUDA_HOME from `which nvcc` when the variable is unset. On machines where nvcc
    is a wrapper script (/usr/local/bin/nvcc -> exec /usr/local/cuda-13.0/bin/nvcc) that guess
    is /usr/local, which has no CUDA headers. Prefer an explicit variable, then the usual
    install locations, then the directory the nvcc wrapper really executes.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit(os.environ.get(var)):
            return os.environ[var]
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.insert(0, os.path.dirname(os.path.dirname(real)))
        try:  # a small shell wrapper that execs the real nvcc
            with open(real, "r", errors="ignore") as f:
                head = f.read(4096)
            for tok in head.replace('"', " ").split():
                if tok.endswith("/bin/nvcc"):
                    candidates.insert(0, tok[: -len("/bin/nvcc")])
        except OSError:
            pass
    for c in candidates:
        if _is_toolkit(c):
            return c
    return None


def _nvidia_wheel_include_dirs():
    """Include dirs of pip's nvidia-* wheels (cublas_v2.h, cusparse.h, ... live there)."""
    dirs = []
    for sp in site.getsitepackages() + [site.getusersitepackages()]:
        base = os.path.join(sp, "nvidia")
        dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    seen, out = set(), []
    for d in dirs:
        if os.path.isdir(d) and d not in seen:
            seen.add(d)
            out.append(d)
    return out


_disable_cuda = _flag("FASTCONV_DISABLE_CUDA")
_force_cuda = _flag("FASTCONV_FORCE_CUDA")
if not _disable_cuda:
    _cuda_home = _find_cuda_home()
    if _cuda_home:
        os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)


def _want_cuda():
    if _disable_cuda:
        return False
    if torch.version.cuda is None:
        if _force_cuda:
            sys.exit("FASTCONV_FORCE_CUDA=1 but this torch was built without CUDA")
        return False
    if CUDA_HOME is None or not _is_toolkit(CUDA_HOME):
        if _force_cuda:
            sys.exit("FASTCONV_FORCE_CUDA=1 but no CUDA toolkit (nvcc + headers) was found")
        return False
    return True


def _extension(with_cuda):
    debug = _flag("DEBUG")
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # The C++ standard is torch's choice (C++17 or C++20). -fopenmp is required: at::parallel_for
    # is an inline template over OpenMP in torch's headers and silently runs on one thread in
    # code compiled without it. The shared libgomp.so.1 is the one torch has already loaded.
    cxx = ["-fvisibility=hidden", "-fopenmp"]
    ldflags = ["-fopenmp"]
    if debug:
        cxx += ["-O0", "-g"]
    else:
        cxx += ["-O3"]
        march = os.environ.get("FASTCONV_CPU_ARCH", "native")
        if march:
            cxx += [f"-march={march}"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = []

    if not with_cuda:
        print("fastconv: building CPU kernels only", flush=True)
        return CppExtension(
            "fastconv._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=ldflags,
            define_macros=define_macros,
        )

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"  # no GPU visible: build for Hopper
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    # Headers the toolkit lacks come from pip's nvidia wheels. -isystem puts them after the
    # toolkit's own -I include dir, so the toolkit's cuda_runtime.h etc. still win.
    extra_inc = []
    for d in _nvidia_wheel_include_dirs():
        extra_inc += ["-isystem", d]
    nvcc = ["--expt-relaxed-constexpr", "-lineinfo"] + extra_inc
    nvcc += ["-O0", "-g", "-G"] if debug else ["-O3"]
    if _flag("FASTCONV_PTXAS_VERBOSE"):
        nvcc += ["-Xptxas", "-v"]
    define_macros.append(("FASTCONV_WITH_CUDA", "1"))
    print(
        f"fastconv: building CPU + CUDA kernels (CUDA_HOME={CUDA_HOME}, "
        f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})",
        flush=True,
    )
    return CUDAExtension(
        "fastconv._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx + extra_inc, "nvcc": nvcc},
        extra_link_args=ldflags,
        define_macros=define_macros,
    )


def _write_build_info(with_cuda):
    """Record what this build compiled, for `python -m fastconv info` (fastconv/_build_info.py)."""
    info = {
        "with_cuda": with_cuda,
        "cuda_arch_list": (os.environ.get("TORCH_CUDA_ARCH_LIST") or "the visible GPUs' archs") if with_cuda else "",
        "cuda_home": CUDA_HOME if with_cuda else None,
        "built_with_torch": torch.__version__,
        "built_with_cuda": torch.version.cuda if with_cuda else None,
        "debug": _flag("DEBUG"),
        "cpu_arch": os.environ.get("FASTCONV_CPU_ARCH", "native"),
    }
    with open(os.path.join(ROOT, "fastconv", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time; do not edit.\n")
        f.write(f"BUILD_INFO = {info!r}\n")


_with_cuda = _want_cuda()
_ext = _extension(_with_cuda)
_write_build_info(_with_cuda)

setup(
    packages=find_packages(include=["fastconv", "fastconv.*"]),
    ext_modules=[_ext],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)},
)
