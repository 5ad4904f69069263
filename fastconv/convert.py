"""convert(model) / revert(model): swap torch.nn.Conv2d / MaxPool2d for fastconv's layers and back.

    model = fastconv.convert(model)                       # a converted copy; model untouched
    fastconv.convert(model, inplace=True)                  # swap in place, same Parameters
    model, report = fastconv.convert(model, report=True)   # what was swapped / skipped and why
    print(report)

Only modules whose type is exactly torch.nn.Conv2d or torch.nn.MaxPool2d are swapped:
a subclass may have its own forward or invariants, so it is left alone and reported. Depthwise
convolutions (groups == in_channels > 1, one input channel per filter) become
fastconv.nn.DepthwiseConv2d, other convolutions fastconv.nn.Conv2d, max-pools
fastconv.nn.MaxPool2d. The new layers take over the old ones' Parameter objects, buffers,
hooks, training flag and attributes (see fastconv.nn.Conv2d.from_torch), so device, dtype,
state_dict and an optimizer built on the original parameters (inplace=True) all carry over.
A summary goes to the `logging` logger "fastconv.convert" (INFO; one line per module at DEBUG).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Callable, List, NamedTuple, Optional

import torch

from . import _checks as C
from . import nn as fnn

__all__ = ["convert", "revert", "ConversionReport", "Swapped", "Skipped"]

logger = logging.getLogger("fastconv.convert")

FilterFn = Callable[[str, torch.nn.Module], bool]

_FASTCONV_TYPES = (fnn.Conv2d, fnn.DepthwiseConv2d, fnn.MaxPool2d)


class Swapped(NamedTuple):
    name: str  # qualified module name, "" for the model itself
    from_type: type
    to_type: type


class Skipped(NamedTuple):
    name: str
    type: type
    reason: str


def _type_name(t: type) -> str:
    mod = t.__module__
    if mod.startswith("torch.nn.modules"):
        mod = "torch.nn"
    return f"{mod}.{t.__qualname__}"


@dataclass
class ConversionReport:
    """What convert() / revert() did: `swapped` and `skipped` modules in model order.
    A module reachable under several names (shared) is listed once, under its first name."""

    action: str = "convert"
    swapped: List[Swapped] = field(default_factory=list)
    skipped: List[Skipped] = field(default_factory=list)

    def summary(self) -> str:
        counts = {}
        for s in self.swapped:
            key = f"{_type_name(s.from_type)} -> {_type_name(s.to_type)}"
            counts[key] = counts.get(key, 0) + 1
        parts = ", ".join(f"{n} x {k}" for k, n in counts.items()) or "nothing"
        line = f"{self.action}: swapped {len(self.swapped)} module(s) ({parts})"
        if self.skipped:
            reasons = {}
            for s in self.skipped:
                reasons[s.reason] = reasons.get(s.reason, 0) + 1
            line += f"; skipped {len(self.skipped)}: " + "; ".join(
                f"{n} x {r}" for r, n in reasons.items())
        return line

    def __str__(self) -> str:
        lines = [self.summary()]
        for s in self.swapped:
            lines.append(f"  swapped {s.name or '(model)'}: {_type_name(s.from_type)} -> "
                         f"{_type_name(s.to_type)}")
        for s in self.skipped:
            lines.append(f"  skipped {s.name or '(model)'} ({_type_name(s.type)}): {s.reason}")
        return "\n".join(lines)


def _unsupported_reason(module: torch.nn.Module) -> Optional[str]:
    """Why fastconv cannot run `module`'s parameters, or None. Pools have no parameters: they
    are always converted, and fastconv.nn.MaxPool2d hands an input dtype fastconv has no
    kernel for to torch's."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    dev = weight.device.type
    if dev not in ("cpu", "cuda", "meta"):
        return f"fastconv has no kernels for device type {dev!r}"
    if dev == "cuda":
        from . import _C

        if not getattr(_C, "with_cuda", 0):
            return "the weight is on CUDA but fastconv was built without CUDA kernels"
    ok = weight.dtype in C.supported_dtypes("cuda" if dev == "meta" else dev)
    if not ok:
        return (f"dtype {weight.dtype} is not supported on {dev} (fastconv supports "
                f"{C.dtype_list(dev)})")
    return None


def _convert_decision(name, module, filter_fn, algo):
    """(new module, None) to swap, (None, reason) to report a skip, (None, None) to ignore."""
    t = type(module)
    if isinstance(module, _FASTCONV_TYPES):
        return None, "already a fastconv layer"
    if not isinstance(module, (torch.nn.Conv2d, torch.nn.MaxPool2d)):
        return None, None
    base = torch.nn.Conv2d if isinstance(module, torch.nn.Conv2d) else torch.nn.MaxPool2d
    if t is not base:
        if isinstance(module, torch.nn.modules.lazy.LazyModuleMixin):
            return None, "lazy module not materialised yet (run one forward first)"
        own = " that overrides forward" if t.forward is not base.forward else ""
        return None, (f"{_type_name(t)} is a subclass of {_type_name(base)}{own}; only exact "
                      f"{_type_name(base)} modules are converted")
    if "forward" in module.__dict__:
        return None, "the instance's forward was replaced; converting would bypass it"
    if filter_fn is not None and not filter_fn(name, module):
        return None, "filter_fn returned False"
    if base is torch.nn.MaxPool2d:
        return fnn.MaxPool2d.from_torch(module), None
    reason = _unsupported_reason(module)
    if reason is not None:
        return None, reason
    if fnn.DepthwiseConv2d.is_depthwise(module) and module.in_channels > 1:
        return fnn.DepthwiseConv2d.from_torch(module), None
    return fnn.Conv2d.from_torch(module, algo=algo), None


def _revert_decision(name, module, filter_fn, algo):
    t = type(module)
    if t in _FASTCONV_TYPES:
        if "forward" in module.__dict__:
            return None, "the instance's forward was replaced; reverting would bypass it"
        if filter_fn is not None and not filter_fn(name, module):
            return None, "filter_fn returned False"
        return module.to_torch(), None
    if isinstance(module, _FASTCONV_TYPES):
        return None, (f"{_type_name(t)} is a subclass of a fastconv layer; only exact fastconv "
                      f"layers are reverted")
    return None, None


def _swap(model, decide, filter_fn, algo, inplace, action):
    report = ConversionReport(action=action)
    if not inplace:
        model = copy.deepcopy(model)
    replaced = {}  # id(old) -> new: a module shared by several parents is swapped once
    seen = set()

    def visit(module, name):
        new, reason = decide(name, module, filter_fn, algo)
        if new is not None:
            report.swapped.append(Swapped(name, type(module), type(new)))
            logger.debug("%s: %s %s -> %s", action, name or "(model)", _type_name(type(module)),
                         _type_name(type(new)))
            return new
        if reason is not None:
            report.skipped.append(Skipped(name, type(module), reason))
            logger.debug("%s: skipped %s (%s): %s", action, name or "(model)",
                         _type_name(type(module)), reason)
            return None
        for child_name, child in list(module._modules.items()):
            if child is None:
                continue
            if id(child) in replaced:
                module._modules[child_name] = replaced[id(child)]
                continue
            if id(child) in seen:
                continue
            seen.add(id(child))
            child_new = visit(child, f"{name}.{child_name}" if name else child_name)
            if child_new is not None:
                replaced[id(child)] = child_new
                # straight into _modules: keeps the child's position in the module order
                module._modules[child_name] = child_new
        return None

    root_new = visit(model, "")
    if root_new is not None:
        model = root_new
    logger.info("%s", report.summary())
    return model, report


def convert(model: torch.nn.Module, *, inplace: bool = False,
            filter_fn: Optional[FilterFn] = None, report: bool = False, algo: str = "auto"):
    """Swap the model's torch.nn.Conv2d / MaxPool2d modules for fastconv's layers.

    inplace=False (default): convert a deep copy and leave `model` untouched (its own
    parameters, hooks and types). inplace=True: swap the modules inside `model`; the new layers
    take over the same Parameter objects, so an optimizer built on model.parameters() keeps
    working. A model that is itself a Conv2d / MaxPool2d is returned swapped.
    filter_fn(name, module) -> bool: convert only the modules it accepts (name is the
    qualified name from named_modules(), "" for the model itself).
    algo: the `algo` of every converted (non-depthwise) Conv2d.
    Skipped, with a reason: subclasses of Conv2d / MaxPool2d, modules whose instance forward
    was replaced, modules filter_fn rejects, convs whose weight has a dtype or device fastconv
    has no kernel for (e.g. float16 on CPU), and layers that already are fastconv's.

    Returns the converted model, or (model, ConversionReport) when report=True.
    """
    C.check_algo("convert", algo)
    model, rep = _swap(model, _convert_decision, filter_fn, algo, inplace, "convert")
    return (model, rep) if report else model


def revert(model: torch.nn.Module, *, inplace: bool = False,
           filter_fn: Optional[FilterFn] = None, report: bool = False):
    """Swap fastconv's layers back to plain torch.nn.Conv2d / MaxPool2d (same parameters,
    hooks and attributes; `algo` is dropped). Same arguments and return value as convert."""
    model, rep = _swap(model, _revert_decision, filter_fn, "auto", inplace, "revert")
    return (model, rep) if report else model
