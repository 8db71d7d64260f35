"""Linear on any number of token dimensions: g_i = sum_t d_it [a_it, 1]^T, kept factored.

Its Gram takes the cheaper of two exact routes by routes.py's cost model: token pairs
(K_ij = sum_ts (a_it.a_js + 1)(d_it.d_js), _token_gram) or g_i materialised a block of output
rows at a time (_chunked_gram); both kernels are here, and conv.py reuses them on patches. The
weighted sum is one GEMM.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .grads import PerSampleGrads, _batch_first, _in_range, _token_pair_sums, compute_dtype
from .registry import register_sampler
from .routes import _block_elements, _use_token_route
from .subclass import register_parent_output


def _token_gram(A: Tensor, D: Tensor, bias: bool) -> Tensor:
    """K_ij = sum_{t,s} (A_it.A_js + bias)(D_it.D_js) for g_i = sum_t D[i,t] (x) [A[i,t], 1?]."""
    n, T, p = A.shape
    Af = A.reshape(n * T, p)
    # output gradients are what can be tiny (_pow2); activations are not rescaled
    with _in_range(D.reshape(n * T, D.shape[-1])) as (Df, unscale):

        def pairs(rows: slice) -> Tensor:
            AA = Af[rows] @ Af.T
            if bias:
                AA += 1
            return AA.mul_(Df[rows] @ Df.T)

        K = _token_pair_sums(pairs, n, T, T, Af.device)
    return unscale(K)


def _chunked_gram(A: Tensor, D: Tensor, bias: bool) -> Tensor:
    """Gram by materialising g_i = D_i^T A_i a block of output rows at a time, so that each block is
    still in cache when its contribution is taken (up to 2x faster than one pass on a CPU)."""
    n, _, p = A.shape
    q = D.shape[-1]
    step = max(8, _block_elements(A.device) // (n * p))
    K = None
    with _in_range(D) as (D, unscale):  # tiny output gradients would make G's products denormal (_pow2)
        Dt = D.transpose(1, 2)
        for s in range(0, q, step):
            G = torch.bmm(Dt[:, s:s + step], A).reshape(n, -1)
            K = G @ G.T if K is None else K + G @ G.T
        if bias:
            Gb = D.sum(dim=1)
            K = K + Gb @ Gb.T
    if not (K is not None):  # an invariant, kept under python -O
        raise RuntimeError("fngd_plugin internal error: expected K is not None")
    return unscale(K)


class FactoredGrads(PerSampleGrads):
    """g_i = sum_t D[i,t] [A[i,t], 1]^T: Linear on any number of token dimensions."""

    def __init__(self, A: Tensor, D: Tensor, weight: Tensor, bias: Tensor | None):
        self.A, self.D = A, D
        self.weight, self.bias = weight, bias
        self.params = (weight,) if bias is None else (weight, bias)
        self.n = A.shape[0]

    def _gram_route(self) -> str:
        n, T, p = self.A.shape
        return "token" if T == 1 or _use_token_route(n, T, p, self.D.shape[-1], self.A.device) else "chunked"

    def gram(self, keep: bool = False) -> Tensor:
        # never keeps: the weighted sum is one GEMM, cheaper than keeping n per-sample gradients
        route = _token_gram if self._gram_route() == "token" else _chunked_gram
        return route(self.A, self.D, self.bias is not None)

    def weighted(self, w: Tensor) -> list[Tensor]:
        cached = self._cached_weighted(w)
        if cached is not None:
            return cached
        q, p = self.D.shape[-1], self.A.shape[-1]
        Dw = self.D * w.to(self.D.dtype)[:, None, None]
        out = [(Dw.reshape(-1, q).T @ self.A.reshape(-1, p)).view(self.weight.shape)]
        if self.bias is not None:
            out.append(Dw.sum(dim=(0, 1)))
        return out

    def factor_sizes(self) -> tuple[int, int, int, int]:
        n, T, p = self.A.shape
        return n, T, p, self.D.shape[-1]

    def kron_factors(self) -> tuple[Tensor, Tensor]:
        """(A (n, T, p), D (n, T, q)): per-token inputs and output gradients (KFAC's statistics)."""
        return self.A, self.D

    def rows(self, idx: Tensor) -> Tensor:
        """Per-sample gradients of the weight restricted to rows ``idx``: (n, len(idx), p)."""
        return torch.bmm(self.D[:, :, idx].transpose(1, 2), self.A)

    def materialize(self) -> list[Tensor]:
        out = [torch.bmm(self.D.transpose(1, 2), self.A).view(self.n, *self.weight.shape)]
        if self.bias is not None:
            out.append(self.D.sum(dim=1))
        return out

    @classmethod
    def cat(cls, reps: Sequence[PerSampleGrads]) -> PerSampleGrads:
        first = reps[0]
        if not (isinstance(first, FactoredGrads)):  # an invariant, kept under python -O
            raise RuntimeError("fngd_plugin internal error: expected isinstance(first, FactoredGrads)")
        A = torch.cat([r.A for r in reps], dim=1)  # type: ignore[attr-defined]
        D = torch.cat([r.D for r in reps], dim=1)  # type: ignore[attr-defined]
        return cls(A, D, first.weight, first.bias)


@register_sampler(nn.Linear)
def linear_sampler(module: nn.Module, a: Tensor, delta: Tensor, batch_dim: int, meta: dict) -> PerSampleGrads:
    if a.dim() < 2:
        raise ValueError(f"Linear input of shape {tuple(a.shape)} has no batch dimension")
    dt = compute_dtype(delta.dtype)
    a = _batch_first(a, batch_dim).to(dt)
    delta = _batch_first(delta, batch_dim).to(dt)
    n = a.shape[0]
    return FactoredGrads(a.reshape(n, -1, a.shape[-1]), delta.reshape(n, -1, delta.shape[-1]),
                         module.weight, module.bias)


@register_parent_output(nn.Linear)
def _linear_output(m: nn.Module, a: Tensor, meta: dict) -> Tensor:
    return F.linear(a, m.weight, m.bias)
