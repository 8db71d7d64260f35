"""Gram matrices of per-sample gradients, block by block.

A block is the set of modules whose per-sample gradients must be taken together because they
share a parameter (a tied embedding and output projection, ALBERT-style shared layers): their
per-sample gradients add up before the inner products are taken. Unshared modules are blocks of
one, whose Gram is their sampler's own (``PerSampleGrads.gram``, the factored trick where it has
one). K = sum over blocks is the n x n matrix of FNGD's solve (``smw.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .samplers import EmbeddingGrads, FactoredGrads, PerSampleGrads


def shared_blocks(reps: dict[nn.Module, PerSampleGrads], index: dict[int, int]) -> dict[int, list[PerSampleGrads]]:
    """Modules sharing a parameter form one block (union-find over parameter indices), keyed by
    the block's first parameter index (``index``: id(parameter) -> position in the optimizer)."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for r in reps.values():
        ids = [index[id(p)] for p in r.params]
        for i in ids[1:]:
            parent[find(i)] = find(ids[0])
    blocks: dict[int, list[PerSampleGrads]] = {}
    for r in reps.values():
        blocks.setdefault(find(index[id(r.params[0])]), []).append(r)
    return {min(index[id(p)] for r in rs for p in r.params): rs for rs in blocks.values()}


def add_weighted(reps: list[PerSampleGrads], w: Tensor, out: dict[int, tuple[Tensor, Tensor]]) -> None:
    """out[id(p)] += sum_i w_i g_i(p) for every parameter p of the block (shared ones summed)."""
    for r in reps:
        for p, g in zip(r.params, r.weighted(w)):
            out[id(p)] = (p, out[id(p)][1] + g) if id(p) in out else (p, g)


def block_gram(reps: list[PerSampleGrads], *, keep: bool = False, dense_limit: int) -> tuple[Tensor, bool]:
    """(K, dropped): the block's n x n Gram; ``dropped`` when a shared parameter was too large
    (n * its size > ``dense_limit``) for an exact Gram and its cross terms were left out.
    ``keep``: a block of one keeps what it materialised for the weighted sum that follows."""
    if len(reps) == 1:
        return reps[0].gram(keep=keep), False
    K = shared_table_gram(reps)
    if K is not None:
        return K, False
    n = reps[0].n
    size = sum(p.numel() for p in {id(p): p for r in reps for p in r.params}.values())
    if n * size > dense_limit:
        return sum(r.gram() for r in reps), True  # type: ignore[return-value]
    acc: dict[int, Tensor] = {}
    for r in reps:
        for p, g in zip(r.params, r.materialize()):
            g = g.reshape(n, -1)
            acc[id(p)] = acc[id(p)] + g if id(p) in acc else g
    G = torch.cat(list(acc.values()), dim=1)
    return G @ G.T, False


def shared_table_gram(reps: list[PerSampleGrads]) -> Tensor | None:
    """Exact Gram for embeddings sharing one table, plus at most one Linear tied to it (an output
    projection). Only the rows the embeddings touch carry cross terms, so those are all that is
    materialised. None if the block has another shape."""
    embs = [r for r in reps if isinstance(r, EmbeddingGrads)]
    lins = [r for r in reps if isinstance(r, FactoredGrads)]
    if not embs or len(embs) + len(lins) != len(reps) or len(lins) > 1:
        return None
    table = embs[0].weight
    if any(r.weight is not table for r in [*embs, *lins]):
        return None
    n = reps[0].n
    rows = torch.unique(torch.cat([e.idx.reshape(-1) for e in embs]))
    E = embs[0].rows(rows)
    for e in embs[1:]:
        E = E + e.rows(rows)
    E = E.reshape(n, -1)
    K = E @ E.T
    if lins:
        C = lins[0].rows(rows).reshape(n, -1) @ E.T
        K = K + C + C.T + lins[0].gram()
    return K
