"""fastconv's layers: drop-in subclasses of torch.nn.Conv2d and torch.nn.MaxPool2d.

Each layer has the torch constructor, the same parameters (names, shapes, initialisation for a
given seed), the same state_dict and the same semantics; only the forward runs fastconv's
kernels. `isinstance(layer, torch.nn.Conv2d)` stays true, so code that walks a model looking
for convolutions with isinstance (weight init, pruning) still finds them; code that matches
exact types does not (`torch.ao.quantization.fuse_modules` looks its fusers up by type:
`fastconv.revert` the model first). MaxPool2d runs torch's kernel for an input dtype fastconv
has no kernel for on its device (float16 or integers on CPU), as a model that is converted
without knowing its input dtype must keep working.

    conv = fastconv.nn.Conv2d(3, 16, 3, padding=1, algo="im2col")
    dw = fastconv.nn.DepthwiseConv2d(16, 3, padding=1, depth_multiplier=2)   # 16 -> 32
    pool = fastconv.nn.MaxPool2d(2)

`from_torch(module)` builds the fastconv layer from an existing torch one (what
fastconv.convert uses); `to_torch()` is the inverse (what fastconv.revert uses).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from . import _checks as C
from . import functional as FC

__all__ = ["Conv2d", "DepthwiseConv2d", "MaxPool2d"]


# Per-instance attributes that must never travel to the new module: a torch.compile'd call
# (Module.compile) is bound to the old module object.
_NOT_TRANSFERRED = ("_compiled_call_impl",)


def _is_hook_registry(name: str) -> bool:
    return name.startswith("_") and "hooks" in name


def _transfer(src: torch.nn.Module, cls, drop=()) -> torch.nn.Module:
    """A new `cls` instance that takes over `src`'s state without running any __init__.

    - parameters, buffers and submodules: the same objects, in new containers (so registering
      a parameter on one module later does not change the other);
    - hook registries (forward, pre-forward, backward, state_dict, load_state_dict): the same
      dictionaries, so hook handles taken before the swap still remove their hook;
    - everything else (training flag, conv hyper-parameters, user attributes): copied
      shallowly (mutable containers copied, their items shared).
    """
    new = cls.__new__(cls)
    state = {}
    for name, value in src.__dict__.items():
        if name in drop or name in _NOT_TRANSFERRED:
            continue
        if _is_hook_registry(name):
            state[name] = value
        elif isinstance(value, (dict, list, set)):
            state[name] = copy.copy(value)
        else:
            state[name] = value
    # Bypass Module.__setattr__: it would try to (re-)register the containers' contents.
    new.__dict__.update(state)
    return new


def _check_exact(method: str, module, expected) -> None:
    if not isinstance(module, expected):
        raise TypeError(
            f"{method}: expected a {expected.__module__}.{expected.__qualname__}, but got "
            f"{type(module).__module__}.{type(module).__qualname__}"
        )


class Conv2d(torch.nn.Conv2d):
    """torch.nn.Conv2d with fastconv's kernels; same arguments, plus keyword-only `algo`.

    algo: "auto" (fastconv picks; depthwise shapes go to the depthwise kernels), "im2col"
    (im2col + GEMM) or "direct" (no column buffer). padding_mode 'reflect' / 'replicate' /
    'circular' pad explicitly with F.pad and then convolve with zero padding, exactly as
    torch.nn.Conv2d does.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None, *,
                 algo="auto"):
        # Validate before torch's __init__ so a bad algo neither allocates nor draws from the RNG.
        C.check_algo("Conv2d", algo)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device=device, dtype=dtype)
        self.algo = algo

    @property
    def algo(self) -> str:
        return self._algo

    @algo.setter
    def algo(self, value: str) -> None:
        self._algo = C.check_algo("Conv2d", value)

    def _conv_forward(self, input, weight, bias):
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return FC.conv2d(input, weight, bias, self.stride, 0, self.dilation, self.groups,
                             algo=self.algo)
        return FC.conv2d(input, weight, bias, self.stride, self.padding, self.dilation,
                         self.groups, algo=self.algo)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.weight, self.bias)

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_algo" not in self.__dict__:  # pickled before `algo` existed
            self._algo = "auto"

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.algo == "auto" else f"{s}, algo={self.algo!r}"

    @classmethod
    def from_torch(cls, module: torch.nn.Conv2d, algo: str = "auto") -> "Conv2d":
        """A fastconv Conv2d that takes over `module`: the same Parameter objects (an optimizer
        built on `module.parameters()` keeps working), its hooks, training flag and every other
        attribute. The hook registries are shared, not copied: handles taken on `module` still
        remove their hook from the new layer."""
        _check_exact(f"{cls.__name__}.from_torch", module, torch.nn.Conv2d)
        C.check_algo(f"{cls.__name__}.from_torch", algo)
        new = _transfer(module, cls)
        new.algo = algo
        return new

    def to_torch(self) -> torch.nn.Conv2d:
        """The inverse of from_torch: a plain torch.nn.Conv2d over the same parameters."""
        return _transfer(self, torch.nn.Conv2d, drop=("_algo",))


class DepthwiseConv2d(torch.nn.Conv2d):
    """Depthwise convolution: each input channel convolved with its own `depth_multiplier`
    filters, i.e. torch.nn.Conv2d(C, C * depth_multiplier, ..., groups=C), run by fastconv's
    depthwise kernels. Weight shape (C * depth_multiplier, 1, kH, kW)."""

    def __init__(self, in_channels, kernel_size, stride=1, padding=0, dilation=1, bias=True,
                 depth_multiplier=1, padding_mode="zeros", device=None, dtype=None):
        if isinstance(depth_multiplier, bool) or not isinstance(depth_multiplier, int) \
                or depth_multiplier < 1:
            raise ValueError(
                f"DepthwiseConv2d: expected depth_multiplier to be a positive int, but got "
                f"{depth_multiplier!r}"
            )
        super().__init__(in_channels, in_channels * depth_multiplier, kernel_size, stride,
                         padding, dilation, groups=in_channels, bias=bias,
                         padding_mode=padding_mode, device=device, dtype=dtype)

    @property
    def depth_multiplier(self) -> int:
        return self.out_channels // self.in_channels

    def _conv_forward(self, input, weight, bias):
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return FC.depthwise_conv2d(input, weight, bias, self.stride, 0, self.dilation)
        return FC.depthwise_conv2d(input, weight, bias, self.stride, self.padding, self.dilation)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.weight, self.bias)

    @staticmethod
    def is_depthwise(module: torch.nn.Conv2d) -> bool:
        """True when `module` is a depthwise convolution: groups == in_channels and one input
        channel per filter (so out_channels is a multiple of in_channels)."""
        return (module.groups == module.in_channels and module.weight.dim() == 4
                and module.weight.size(1) == 1)

    @classmethod
    def from_torch(cls, module: torch.nn.Conv2d) -> "DepthwiseConv2d":
        """Take over a depthwise torch.nn.Conv2d (groups == in_channels, weight.size(1) == 1);
        the same sharing rules as Conv2d.from_torch."""
        _check_exact(f"{cls.__name__}.from_torch", module, torch.nn.Conv2d)
        if not cls.is_depthwise(module):
            raise ValueError(
                f"{cls.__name__}.from_torch: expected a depthwise convolution (groups == "
                f"in_channels and weight.size(1) == 1), but got in_channels="
                f"{module.in_channels}, groups={module.groups}, weight shape "
                f"{list(module.weight.shape)}"
            )
        return _transfer(module, cls, drop=("_algo",))

    def to_torch(self) -> torch.nn.Conv2d:
        return _transfer(self, torch.nn.Conv2d)


class MaxPool2d(torch.nn.MaxPool2d):
    """torch.nn.MaxPool2d with fastconv's kernel; same arguments and results (return_indices
    gives torch's int64 indices h * W + w per plane; ceil_mode follows torch's rule)."""

    def forward(self, input: torch.Tensor):
        if (isinstance(input, torch.Tensor) and input.device.type != "meta"
                and input.dtype not in C.supported_dtypes(input.device.type)):
            return super().forward(input)  # no fastconv kernel for this dtype: torch's (above)
        return FC.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                             ceil_mode=self.ceil_mode, return_indices=self.return_indices)

    @classmethod
    def from_torch(cls, module: torch.nn.MaxPool2d) -> "MaxPool2d":
        """Take over `module` (hooks, attributes); same sharing rules as Conv2d.from_torch."""
        _check_exact(f"{cls.__name__}.from_torch", module, torch.nn.MaxPool2d)
        return _transfer(module, cls)

    def to_torch(self) -> torch.nn.MaxPool2d:
        return _transfer(self, torch.nn.MaxPool2d)
