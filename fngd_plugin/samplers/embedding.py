"""Embedding: g_i = sum_t onehot(x_it) d_it^T, the rows of the table that sample i touches.

Its Gram takes the rows route (the per-sample gradients restricted to the rows the batch touches)
or the token route (K_ij = sum_ts [x_it = x_js] d_it.d_js, a block of samples at a time),
whichever does fewer products; ``gram.shared_table_gram`` reuses both for tied tables.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .grads import PerSampleGrads, _batch_first, _gram_of, _in_range, _token_pair_sums, compute_dtype
from .registry import register_sampler
from .routes import _ROUTE_MEMORY_LIMIT


def _same_token_pairs(flat: Tensor, Df: Tensor) -> Callable[[slice], Tensor]:
    """Token pairs of an embedding table: P[(i,t), (j,s)] = [x_it = x_js] d_it . d_js."""
    return lambda rows: (Df[rows] @ Df.T).mul_(flat[rows, None] == flat[None, :])


def _scatter_rows(out: Tensor, samples: Tensor, rows: Tensor, D: Tensor) -> Tensor:
    """out[samples[i, t], rows[i, t]] += D[i, t] for (n, R, q) ``out``, in a reproducible order.
    On the CPU, index_put_(accumulate=True) adds float32 with parallel atomics (torch's
    cpu_atomic_add_value): under load the order of a row's repeated tokens changes from run to run,
    and so do the last bits (a resumed run then differs from an uninterrupted one); CPU index_add_
    adds the tokens one after another. On CUDA it is the other way round: index_add_ uses atomics,
    index_put_(accumulate=True) sorts the indices first."""
    if out.device.type != "cpu":
        return out.index_put_((samples, rows), D, accumulate=True)
    R, q = out.shape[1], out.shape[-1]
    out.view(-1, q).index_add_(0, (samples * R + rows).reshape(-1), D.reshape(-1, q))
    return out


class EmbeddingGrads(PerSampleGrads):
    """g_i = sum_t onehot(x_it) D_it^T: rows of the table touched by sample i."""

    def __init__(self, idx: Tensor, D: Tensor, weight: Tensor):
        self.idx, self.D, self.weight = idx, D, weight
        self.params = (weight,)
        self.n = idx.shape[0]

    def gram(self, keep: bool = False) -> Tensor:
        n, T = self.idx.shape
        q = self.D.shape[-1]
        uniq = torch.unique(self.idx)
        U = uniq.numel()
        # rows route: n^2 U q (the Gram of the per-sample gradients restricted to the U rows the
        # batch touches, n U q elements held); token route: (n T)^2 q, in blocks of samples. Rows
        # wins when U <= T^2 (few distinct tokens), unless its n x U x q tensor would be too large
        if n * n * U <= (n * T) ** 2 and n * U * q <= _ROUTE_MEMORY_LIMIT:
            return _gram_of([self.rows(uniq)])
        with _in_range(self.D.reshape(n * T, q)) as (Df, unscale):
            K = _token_pair_sums(_same_token_pairs(self.idx.reshape(-1), Df), n, T, T, Df.device)
        return unscale(K)

    def rows(self, idx: Tensor) -> Tensor:
        """Per-sample gradients restricted to the sorted rows ``idx`` (which must hold every used row)."""
        n, T = self.idx.shape
        G = self.D.new_zeros(n, idx.numel(), self.D.shape[-1])
        where = torch.searchsorted(idx, self.idx)
        samples = torch.arange(n, device=self.idx.device).unsqueeze(1).expand(n, T)
        return _scatter_rows(G, samples, where, self.D)

    def weighted(self, w: Tensor) -> list[Tensor]:
        q = self.D.shape[-1]
        Dw = (self.D * w.to(self.D.dtype)[:, None, None]).reshape(-1, q)
        out = self.D.new_zeros(self.weight.shape)
        return [out.index_add_(0, self.idx.reshape(-1), Dw)]

    def materialize(self) -> list[Tensor]:
        n, T = self.idx.shape
        out = self.D.new_zeros(n, *self.weight.shape)
        rows = torch.arange(n, device=self.idx.device).unsqueeze(1).expand(n, T)
        return [_scatter_rows(out, rows, self.idx, self.D)]

    @classmethod
    def cat(cls, reps: Sequence[PerSampleGrads]) -> PerSampleGrads:
        idx = torch.cat([r.idx for r in reps], dim=1)  # type: ignore[attr-defined]
        D = torch.cat([r.D for r in reps], dim=1)  # type: ignore[attr-defined]
        return cls(idx, D, reps[0].weight)  # type: ignore[attr-defined]


def _embedding_check(m: nn.Module) -> str | None:
    if m.sparse:
        return "Embedding(sparse=True) produces sparse gradients"
    if m.scale_grad_by_freq:
        return "Embedding(scale_grad_by_freq=True) rescales by batch frequencies"
    return None


@register_sampler(nn.Embedding, check=_embedding_check)
def embedding_sampler(module: nn.Module, a: Tensor, delta: Tensor, batch_dim: int, meta: dict) -> PerSampleGrads:
    dt = compute_dtype(delta.dtype)
    idx = _batch_first(a, batch_dim)
    delta = _batch_first(delta, batch_dim).to(dt)
    n = idx.shape[0]
    idx = idx.reshape(n, -1)
    D = delta.reshape(n, -1, delta.shape[-1])
    if module.padding_idx is not None:
        D = D.masked_fill((idx == module.padding_idx).unsqueeze(-1), 0.0)
    return EmbeddingGrads(idx, D, module.weight)
