"""fastconv: hand-written conv2d, depthwise conv2d and max_pool2d kernels for PyTorch.

    import fastconv
    y = fastconv.conv2d(x, w, b, stride=1, padding="same")
    model = fastconv.convert(model)      # swap torch.nn.Conv2d / MaxPool2d for fastconv's

The ops are registered with the dispatcher as torch.ops.fastconv.* (CPU and, when built with
CUDA, CUDA kernels), with fake kernels for torch.compile and autograd formulas.
"""

import torch  # noqa: F401  (libtorch must be loaded before the extension)

try:
    from . import _C  # noqa: F401  (runs the TORCH_LIBRARY registrations)
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        "fastconv's compiled extension (fastconv._C) could not be loaded: "
        f"{e}. Build it with `pip install --no-build-isolation -e .` in the fastconv checkout "
        "(against the torch you import now)."
    ) from e

from . import _registrations  # noqa: F401,E402
from . import functional, nn, reference  # noqa: E402
from .convert import convert, revert  # noqa: E402
from .functional import conv2d, depthwise_conv2d, max_pool2d  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "conv2d",
    "depthwise_conv2d",
    "max_pool2d",
    "convert",
    "revert",
    "functional",
    "nn",
    "reference",
]
