"""Per-sample gradients of one module's parameters (the PerSampleGrads family's base) and the
exact Gram kernels the layer families share.

A :class:`PerSampleGrads` answers the three questions FNGD asks of a layer, for the per-sample
gradients g_1..g_n of the module's own parameters:

* ``gram()``        K_ij = <g_i, g_j>                      (n x n)
* ``weighted(w)``   sum_i w_i g_i, one tensor per parameter (the layer's own weight-gradient formula
                    applied to the input and the w-scaled output gradient)
* ``materialize()`` the per-sample gradients themselves, (n, *param.shape) per parameter (only used
                    for parameters shared between modules, where the Gram needs cross terms)

Here: the base class, :class:`DenseGrads` (materialised per-sample gradients), the power-of-two
scaling that keeps tiny gradients out of the denormal range, and the two blocked Gram routes of a
sum of token outer products (token pairs, or materialising a block of rows at a time) that
linear.py and conv.py pick between with routes.py's cost model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from .routes import _sample_blocks


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gram and weighted gradients are accumulated in at least float32 (bf16/fp16 captures)."""
    return torch.promote_types(dtype, torch.float32)


class PerSampleGrads:
    """Per-sample gradients of one module's parameters, kept in factored form where possible."""

    params: tuple[Tensor, ...]
    n: int
    # the owning module's type name (set by the optimizer; names the phases in profiler traces)
    label: str = "?"
    owner: Any = None  # the module (set by the optimizer with the label)
    # per-sample gradients materialised by gram(keep=True), reused by weighted(); None otherwise
    _cache: list[Tensor] | None = None

    def gram(self, keep: bool = False) -> Tensor:
        """K_ij = <g_i, g_j>. With keep=True a route that materialises g_i keeps it for weighted()."""
        raise NotImplementedError

    def weighted(self, w: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def materialize(self) -> list[Tensor]:
        raise NotImplementedError

    def cache_size(self) -> int:
        """Elements gram(keep=True) may keep for weighted() (0: this type never keeps any)."""
        return 0

    def factor_sizes(self) -> tuple[int, int, int, int] | None:
        """(n, T, p, q) of a layer whose per-sample gradient is sum_t d_it a_it^T (q x p), else None:
        what routes.py's sketch cost reads."""
        return None

    def _cached_weighted(self, w: Tensor) -> list[Tensor] | None:
        if self._cache is None:
            return None
        out = [torch.tensordot(w.to(g.dtype), g, dims=1).view(p.shape) for g, p in zip(self._cache, self.params)]
        self._cache = None
        return out

    @classmethod
    def cat(cls, reps: Sequence[PerSampleGrads]) -> PerSampleGrads:
        """Merge several calls of the same module in one forward (their gradients add up)."""
        raise NotImplementedError


def _pow2(x: Tensor) -> Tensor:
    """A power of two s (0-dim, x's dtype) with max |s x| in [1, 2), 1 for a zero tensor. Gradients
    can be tiny (1e-20 and less in a deep post-norm Transformer's early layers after a few steps):
    the products a Gram takes of them are then denormal numbers, on which a CPU's float arithmetic
    is 10-100x slower (measured: a 6+6-layer Transformer's collect step 4.5x slower in all) and
    loses precision. Scaling by a power of two is exact; the Gram is scaled back once, n x n, in
    float64 (``_in_range``)."""
    if x.numel():
        lo, hi = torch.aminmax(x.detach())  # a reduction: no |x| copy of a large tensor
        amax = torch.maximum(-lo, hi).float()
    else:
        amax = x.new_zeros((), dtype=torch.float32)
    e = torch.floor(torch.log2(amax)).clamp(-126.0, 126.0)
    return torch.where(amax > 0, torch.exp2(-e), torch.ones_like(e)).to(x.dtype)


@contextlib.contextmanager
def _in_range(x: Tensor) -> Iterator[tuple[Tensor, Callable[[Tensor], Tensor]]]:
    """(s x, unscale) with s = _pow2(x): x is scaled in place where it can take it (contiguous, no
    autograd: no copy of a large tensor) and restored exactly on leaving, even after an error (s is
    a power of two); ``unscale(K)`` takes a Gram of s-scaled factors (K scales with s^2) back to
    true units in float64, the solve's precision (a Gram of tiny gradients may lie below float32's
    range altogether)."""
    s = _pow2(x)
    in_place = x.is_contiguous() and not x.requires_grad and not x.is_inference()
    try:
        yield (x.mul_(s) if in_place else x * s), lambda K: K.to(torch.float64) / s.to(torch.float64) ** 2
    finally:
        if in_place:
            x.div_(s)


def _gram_of(grads: Sequence[Tensor]) -> Tensor:
    n = grads[0].shape[0]
    K = None
    for g in grads:
        with _in_range(g.reshape(n, -1)) as (f, unscale):
            Kf = unscale(f @ f.T)
        K = Kf if K is None else K + Kf
    if not (K is not None):  # an invariant, kept under python -O
        raise RuntimeError("fngd_plugin internal error: expected K is not None")
    return K


class DenseGrads(PerSampleGrads):
    """Materialised per-sample gradients: small parameter sets (norm layers, grouped convs)."""

    def __init__(self, params: Sequence[Tensor], grads: Sequence[Tensor]):
        self.params = tuple(params)
        self.grads = list(grads)
        self.n = self.grads[0].shape[0]

    def gram(self, keep: bool = False) -> Tensor:
        return _gram_of(self.grads)

    def weighted(self, w: Tensor) -> list[Tensor]:
        return [torch.tensordot(w.to(g.dtype), g, dims=1) for g in self.grads]

    def materialize(self) -> list[Tensor]:
        return list(self.grads)

    @classmethod
    def cat(cls, reps: Sequence[PerSampleGrads]) -> PerSampleGrads:
        grads = [sum(parts) for parts in zip(*[r.grads for r in reps])]  # type: ignore[attr-defined]
        return cls(reps[0].params, grads)


def _batch_first(t: Tensor, batch_dim: int) -> Tensor:
    return t if batch_dim == 0 else t.movedim(batch_dim, 0)


def _token_pair_sums(pairs: Callable[[slice], Tensor], n: int, Ta: int, Tb: int, device: torch.device) -> Tensor:
    """(n, n) M_ij = sum_{t,s} P[(i, t), (j, s)], with ``pairs(rows)`` the rows of the token-pair
    matrix P (n Ta x n Tb) for a slice of token rows, called a block of samples at a time
    (_sample_blocks)."""
    out = []
    for i0, i1 in _sample_blocks(n, Ta, n * Tb, device):
        P = pairs(slice(i0 * Ta, i1 * Ta))
        out.append(P if Ta == Tb == 1 else P.view(-1, Ta, n, Tb).sum(dim=(1, 3)))
    return out[0] if len(out) == 1 else torch.cat(out)
