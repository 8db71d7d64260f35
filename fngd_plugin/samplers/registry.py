"""The sampler registry: which function turns a module's captured (input, output gradient) into
its :class:`PerSampleGrads`, and why a module cannot be covered.

A sampler is ``fn(module, a, delta, batch_dim, meta) -> PerSampleGrads`` registered for module
classes with ``@register_sampler``; a subclass is covered by its registered parent's sampler
only when it keeps the parent's forward (subclass.py covers those that override it).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import Tensor, nn

from .grads import PerSampleGrads

SamplerFn = Callable[[nn.Module, Tensor, Tensor, int, dict], PerSampleGrads]
_SAMPLERS: dict[type, SamplerFn] = {}
_CHECKS: dict[type, Callable[[nn.Module], str | None]] = {}


def register_sampler(*types: type, check: Callable[[nn.Module], str | None] | None = None):
    """Register ``fn(module, a, delta, batch_dim, meta) -> PerSampleGrads`` for module classes.

    ``check(module)`` may return a reason why a particular configuration is not supported.
    """

    def deco(fn: SamplerFn) -> SamplerFn:
        for t in types:
            _SAMPLERS[t] = fn
            if check is not None:
                _CHECKS[t] = check
        return fn

    return deco


# Lazily registered samplers (layer types of optional libraries): class "module.qualname" -> the
# fngd_plugin module whose register(cls) registers its sampler; imported the first time a module of
# that class (or a subclass) is met, so the core imports without the library.
_LAZY_SAMPLERS: dict[str, str] = {
    "transformers.pytorch_utils.Conv1D": "fngd_plugin.hf_samplers",
}
_LAZY_CHECKED: set[type] = set()


def _load_lazy(cls: type) -> None:
    if cls in _LAZY_CHECKED:
        return
    _LAZY_CHECKED.add(cls)
    for c in cls.__mro__:
        target = _LAZY_SAMPLERS.pop(f"{c.__module__}.{c.__qualname__}", None)
        if target is not None:
            importlib.import_module(target).register(c)


def _registered_base(module: nn.Module) -> type | None:
    """The registered class whose sampler covers this module as it is, or None."""
    cls = type(module)
    if cls in _SAMPLERS:
        return cls
    _load_lazy(cls)
    if cls in _SAMPLERS:
        return cls
    # a subclass is covered only if it computes what its base computes (no forward override)
    for base in cls.__mro__[1:]:
        if base in _SAMPLERS:
            return base if cls.forward is base.forward else None
    return None


def find_sampler(module: nn.Module) -> SamplerFn | None:
    """The sampler registered for this module's class (or a parent whose forward it keeps), or None."""
    base = _registered_base(module)
    return None if base is None else _SAMPLERS[base]


def unsupported_reason(module: nn.Module) -> str | None:
    """Why this module's parameters cannot be covered, or None if they can."""
    base = _registered_base(module)
    if base is None:
        cls = type(module)
        if any(b in _SAMPLERS for b in cls.__mro__[1:]):
            return f"{cls.__name__} overrides forward() of a supported layer"
        return f"no sampler for {cls.__name__}"
    check = _CHECKS.get(base)
    return None if check is None else check(module)
