"""Subclasses that override forward() (timm's LayerNorm, Linear, BatchNormAct2d, ...): covered by
their registered parent's sampler when their output is the parent's math.

For a registered layer type, the family module registers (``@register_parent_output``) the output
of its own math from the recorded input: a subclass that overrides forward() is covered by the
parent's sampler when, checked on its first call, its output equals the parent's output followed
by its own ``drop`` and ``act`` submodules (if it has them). The output gradient is then pulled
back through those to the parent's output before the parent's sampler runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .grads import PerSampleGrads, compute_dtype
from .registry import _SAMPLERS

_PARENT_OUTPUT: dict[type, Callable[[nn.Module, Tensor, dict], Tensor]] = {}


class SubclassMismatch(ValueError):
    """A subclass's output is not its parent's math (then the generic fallback is tried)."""


def register_parent_output(*types: type):
    """Register ``fn(module, a, meta) -> output``: the registered layer type's own math, recomputed."""
    def deco(fn):
        for t in types:
            _PARENT_OUTPUT[t] = fn
        return fn

    return deco


def override_base(module: nn.Module) -> type | None:
    """The registered parent of a subclass that overrides forward(), if its math can be recomputed."""
    cls = type(module)
    if cls in _SAMPLERS:
        return None
    for base in cls.__mro__[1:]:
        if base in _SAMPLERS:
            return base if cls.forward is not base.forward and base in _PARENT_OUTPUT else None
    return None


def post_ops(module: nn.Module) -> list[nn.Module]:
    """The ``drop`` then ``act`` submodules a norm+activation subclass applies after its parent."""
    return [m for m in (getattr(module, "drop", None), getattr(module, "act", None)) if isinstance(m, nn.Module)]


def post_reason(module: nn.Module) -> str | None:
    """Why the post-ops cannot be pulled back exactly (random in training), or None."""
    for m in post_ops(module):
        p = getattr(m, "p", None)
        if m.training and isinstance(m, nn.modules.dropout._DropoutNd) and p:
            return f"its {type(m).__name__}(p={p}) is random in training"
    extra = [k for k, _ in module.named_children() if k not in ("drop", "act")]
    if extra:
        return f"it has submodules {extra} besides drop/act"
    return None


def subclass_grads(module: nn.Module, base: type, a: Tensor, delta: Tensor, batch_dim: int, meta: dict,
                   out: Tensor | None) -> PerSampleGrads:
    """The parent's sampler, after pulling ``delta`` back through the subclass's drop/act. With
    ``out`` (the first call) the recomputation is checked against what the module returned."""
    dt = compute_dtype(delta.dtype)
    ops = post_ops(module)
    if out is not None or ops:
        try:
            y = _PARENT_OUTPUT[base](module, a.to(dt), meta)
        except (RuntimeError, ValueError) as e:  # e.g. LayerNorm2d normalises another dimension
            if out is None:
                raise
            raise SubclassMismatch(f"{type(module).__name__}.forward does not compute {base.__name__} ({e})") from e

        def post(t: Tensor) -> Tensor:
            for m in ops:
                t = m(t.clone())  # activations may run in place
            return t

        if out is not None:
            got = post(y.detach())
            tol = 1e-2 if out.dtype in (torch.float16, torch.bfloat16) else 1e-5
            if got.shape != out.shape or not torch.allclose(got, out.to(dt), rtol=tol, atol=tol):
                raise SubclassMismatch(f"{type(module).__name__}.forward does not compute {base.__name__}"
                                       + (f" followed by {[type(m).__name__ for m in ops]}" if ops else ""))
        if ops:
            _, pullback = torch.func.vjp(post, y.detach())
            (delta,) = pullback(delta.to(dt))
    return _SAMPLERS[base](module, a, delta, batch_dim, meta)
