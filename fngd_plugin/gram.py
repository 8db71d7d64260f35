"""The n x n side of FNGD: the Gram of per-sample gradients, block by block, its damped solve
(Sherman-Morrison-Woodbury) and the weighted sum U c that turns the coefficients into a direction.

A block is the set of modules whose per-sample gradients must be taken together because they
share a parameter (a tied embedding and output projection, ALBERT-style shared layers): their
per-sample gradients add up before the inner products are taken. Unshared modules are blocks of
one, whose Gram is their sampler's own (``PerSampleGrads.gram``, the factored trick where it has
one). K = sum over blocks is the n x n matrix of FNGD's solve (below).

Sketched Gram (``FNGD(sketch=k)``): for a Linear layer over tokens or a Conv2d whose exact Gram is
dear (the vocabulary-sized output projection at thousands of tokens, a ResNet's early convolutions:
n^2 T^2 (p+q) or n p q (T+n) flops), an unbiased estimate from k x k random features per sample.
With S_p (p x k) and S_q (q x k) of independent N(0, 1/k) entries, the sketched per-sample
gradient S_q^T G_i S_p = sum_t (S_q^T d_it)(a_it^T S_p) costs n T k (p + q + k), never
materialising G_i (for a convolution, a_it^T S_p is a convolution with k random filters), and since
E[(S_p (x) S_q)(S_p (x) S_q)^T] = I, E[<sketch_i, sketch_j>] = <G_i, G_j> exactly. The bias part
stays exact. A fresh sketch is drawn for every solve (seeded by the solve's count and the block,
so a resumed run draws the same ones).

The solve: damped natural gradient as a weighted sum of per-sample gradients.
Mini-batch of n samples with per-sample gradients U = [g_1 .. g_n] (d x n), mean gradient
gbar = U 1 / n, empirical Fisher F = U U^T / n, damping lambda > 0. The push-through identity

    (F + lambda I)^-1 gbar = U c,    c = (U^T U + n lambda I)^-1 1

turns the d x d solve into an n x n one on the Gram K = U^T U. ``solve_coefficients`` is that
identity: from a Gram (in true per-sample units) to coefficients c; ``add_weighted`` is U c.

Damping modes (s = n lambda, the shift added to K's diagonal):
  absolute   s = n * damping (lambda = ``damping``).
  relative   s = damping * trace(K) / n: damping times the mean squared per-sample gradient
             norm, i.e. times the mean eigenvalue of K. Invariant to any rescaling of the loss.
  top        s = damping * lambda_max(K): relative to K's largest eigenvalue (one eigvalsh of the
             n x n Gram). Invariant to loss scaling, and bounds how much the solve can tilt the
             direction away from the mean gradient at any batch size (below).
  cosine     s chosen per solve: the smallest shift at which the direction's cosine with the mean
             gradient is at least ``damping`` (a number in (0, 1)); one eigh of K gives the cosine
             at every shift (below), so the choice costs O(n^3) once plus O(n) per candidate.

Why ``top`` and ``cosine`` (docs/method.md, "Damping"): with K = Q diag(L) Q^T and b = Q^T 1, the
mean gradient is gbar = (1/n) sum_k sqrt(L_k) b_k v_k (v_k the parameter-space singular vectors)
and the direction is d = U c = sum_k sqrt(L_k) b_k / (L_k + s) v_k: the solve multiplies the k-th
component of gbar by n / (L_k + s). The eigenvector that the whole batch shares (the mean
gradient's) has the largest L_k, so weak damping shrinks it most and the direction turns toward the
per-sample directions of the bulk (the empirical Fisher's known failure, Kunstner et al. 2019).
The multipliers' ratio is at most (L_max + s) / s, so cos(d, gbar) >= 2 sqrt(r) / (1 + r) with
r = (L_max + s) / s (Kantorovich); ``top`` fixes r = (1 + damping) / damping whatever n and the
model, where ``relative``'s r = 1 + L_max / (damping trace(K) / n) grows with the batch's shared
signal. ``cosine`` targets the cosine itself:
    cos(s) = sum_k L_k b_k^2 / (L_k + s) / sqrt(sum_k L_k b_k^2 / (L_k + s)^2 * sum_k L_k b_k^2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .samplers import (
    EmbeddingGrads,
    FactoredGrads,
    PerSampleGrads,
    _gram_of,
    _same_token_pairs,
    _token_pair_sums,
)
from .samplers.routes import sketch_pays

DAMPING_MODES = ("relative", "absolute", "top", "cosine")
NORMALIZE_MODES = ("none", "sum")


def direction_cosine(L: Tensor, b: Tensor, shifts: Tensor) -> Tensor:
    """cos(d(s), gbar) for each shift in ``shifts`` (any shape), from K's eigenvalues ``L`` (n,)
    and b = Q^T 1 (n,) (module docstring). NaN where gbar = 0."""
    Lb2 = L.clamp_min(0) * b * b
    inv = 1.0 / (L.clamp_min(0) + shifts.unsqueeze(-1))
    num = (Lb2 * inv).sum(-1)
    return num / ((Lb2 * inv * inv).sum(-1) * Lb2.sum()).sqrt()


def cosine_shift(K: Tensor, target: float) -> Tensor:
    """The smallest shift s (to a relative precision of about 2%) at which cos(d, gbar) >= target:
    a log grid from 1e-6 to 1e6 times trace(K)/n, refined once inside the bracket it finds. The
    cosine rises with s to 1 (all multipliers n / (L_k + s) become equal), so the first grid point
    that meets the target brackets the answer. No host sync."""
    n = K.shape[0]
    L, Q = torch.linalg.eigh(K)
    b = Q.sum(0)  # Q^T 1
    mean = (K.diagonal().sum() / n).clamp_min(torch.finfo(K.dtype).tiny)
    grid = torch.logspace(-6, 6, 61, dtype=K.dtype, device=K.device)  # 10^0.2 apart
    ok = direction_cosine(L, b, mean * grid) >= target
    # the first grid point that meets the target (the last one if none does: cos -> 1 beyond it)
    first = torch.where(ok.any(), ok.to(torch.int64).argmax(), torch.tensor(len(grid) - 1, device=K.device))
    lo = grid[(first - 1).clamp_min(0)]
    fine = lo * torch.logspace(0, 0.2, 11, dtype=K.dtype, device=K.device)  # 10^0.02 apart
    ok = direction_cosine(L, b, mean * fine) >= target
    pick = torch.where(ok.any(), ok.to(torch.int64).argmax(), torch.tensor(len(fine) - 1, device=K.device))
    return torch.where(first == 0, mean * grid[0], mean * fine[pick])


def damping_shift(K: Tensor, damping: float, damping_mode: str) -> Tensor:
    """The shift s = n*lambda that is added to the diagonal of K (module docstring)."""
    n = K.shape[0]
    if damping_mode in ("top", "cosine"):  # a non-finite K gives a non-finite c later, not an eigh error here
        K = torch.where(torch.isfinite(K), K, 0.0)
    if damping_mode == "absolute":
        return K.new_tensor(n * damping)
    if damping_mode == "relative":
        return damping * K.diagonal().sum() / n
    if damping_mode == "top":
        return damping * torch.linalg.eigvalsh(K)[-1].clamp_min(0)
    if damping_mode == "cosine":
        if not 0 < damping < 1:
            raise ValueError(f"damping={damping!r} with damping_mode='cosine' is a target cosine; "
                             "allowed: 0 < damping < 1")
        return cosine_shift(K, damping)
    raise ValueError(f"damping_mode={damping_mode!r}; allowed: {DAMPING_MODES}")


def solve_coefficients(K: Tensor, damping: float, damping_mode: str = "relative") -> tuple[Tensor, Tensor]:
    """c = (K + n lambda I)^-1 1 by Cholesky, without a host sync: ``solve_shifted`` at the shift
    that ``damping_mode`` gives. Returns ``(c, fell_back)``."""
    K64 = K.to(torch.float64)
    return solve_shifted(K64, damping_shift(K64, damping, damping_mode))


def solve_shifted(K: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """c = (K + shift I)^-1 1 by Cholesky, without a host sync.

    Returns ``(c, fell_back)``. ``K`` is solved in float64 whatever its dtype. If the Cholesky
    factorisation fails (a numerically singular K), it is retried with jitter; if that fails too,
    the Jacobi solution 1 / diag(K + n lambda I) is used and ``fell_back`` is true. A non-finite K
    gives a non-finite c (not counted as a fallback): the caller must not apply it.
    """
    n = K.shape[0]
    K64 = K.to(torch.float64)
    eye = torch.eye(n, dtype=torch.float64, device=K.device)
    A = K64 + shift.to(torch.float64) * eye
    ones = torch.ones(n, 1, dtype=torch.float64, device=K.device)
    L, info = torch.linalg.cholesky_ex(A)
    c = torch.cholesky_solve(ones, L).squeeze(1)
    ok = (info == 0) & torch.isfinite(c).all()
    # retry: jitter of 1e-6 times the mean diagonal
    jitter = 1e-6 * A.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    L2, info2 = torch.linalg.cholesky_ex(A + jitter * eye)
    c2 = torch.cholesky_solve(ones, L2).squeeze(1)
    ok2 = (info2 == 0) & torch.isfinite(c2).all()
    jacobi = 1.0 / A.diagonal().clamp_min(torch.finfo(torch.float64).tiny)
    c = torch.where(ok, c, torch.where(ok2, c2, jacobi))
    return c, ~(ok | ok2) & torch.isfinite(K64).all()


def normalize_coefficients(c: Tensor, normalize: str) -> Tensor:
    """"none": c as solved (the exact NGD step). "sum": c / sum(c), NGD's relative weighting of the
    samples at the scale of the plain mean (sum(c) = 1^T (K + n lambda I)^-1 1 > 0)."""
    if normalize == "sum":
        return c / c.sum()
    if normalize != "none":
        raise ValueError(f"normalize={normalize!r}; allowed: {NORMALIZE_MODES}")
    return c


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
            if id(p) not in out:
                out[id(p)] = (p, g)
                continue
            acc = out[id(p)][1]
            if torch.promote_types(acc.dtype, g.dtype) == acc.dtype:
                acc.add_(g.reshape_as(acc))  # in place: no second full-size copy per parameter
            else:
                out[id(p)] = (p, acc + g.reshape_as(acc))


def _sketched_factors(r: PerSampleGrads, k: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor | None]:
    """(A S_p, D S_q, per-sample bias gradients or None) of a Linear or an ungrouped Conv2d; the
    convolution's A S_p is a convolution with k random filters (no patches unfolded)."""
    if isinstance(r, FactoredGrads):
        A, D = r.A, r.D
        Sp = torch.randn(A.shape[-1], k, generator=g, device=A.device, dtype=A.dtype) / math.sqrt(k)
        Sq = torch.randn(D.shape[-1], k, generator=g, device=D.device, dtype=D.dtype) / math.sqrt(k)
        return (A @ Sp).to(D.dtype), D @ Sq, None if r.bias is None else D.sum(dim=1)
    m = r.module
    a0, d0 = r.calls[0]
    Sp = torch.randn(k, *m.weight.shape[1:], generator=g, device=a0.device, dtype=a0.dtype) / math.sqrt(k)
    Sq = torch.randn(m.weight.shape[0], k, generator=g, device=d0.device, dtype=d0.dtype) / math.sqrt(k)
    As, Ds, bias = [], [], None
    for a, delta in r.calls:
        a, padding = r._padded(a)
        As.append(F.conv2d(a, Sp, stride=m.stride, padding=padding, dilation=m.dilation).flatten(2).transpose(1, 2))
        Ds.append(delta.flatten(2).transpose(1, 2) @ Sq)
        if r.bias is not None:
            bias = delta.sum(dim=(2, 3)) if bias is None else bias + delta.sum(dim=(2, 3))
    return torch.cat(As, dim=1).to(d0.dtype), torch.cat(Ds, dim=1), bias


def sketched_gram(r: PerSampleGrads, k: int, seed: int) -> Tensor:
    """An unbiased estimate of a Linear or Conv2d layer's Gram from k x k random features per
    sample (module docstring); the bias part exact."""
    g = torch.Generator(device=r.params[0].device)
    g.manual_seed(seed)
    As, Ds, bias = _sketched_factors(r, k, g)
    G = torch.bmm(Ds.transpose(1, 2), As).reshape(r.n, -1)
    return _gram_of([G] if bias is None else [G, bias])  # (scaled out of the denormal range)


def block_gram(reps: list[PerSampleGrads], *, keep: bool = False, dense_limit: int,
               sketch: tuple[int, int] | None = None) -> tuple[Tensor, bool]:
    """(K, dropped): the block's n x n Gram; ``dropped`` when a shared parameter was too large
    (n * its size > ``dense_limit``) for an exact Gram and its cross terms were left out.
    ``keep``: a block of one keeps what it materialised for the weighted sum that follows.
    ``sketch`` = (k, seed): Linear Grams that a k x k sketch makes cheaper are sketched."""
    if len(reps) == 1:
        if sketch is not None and sketch_pays(reps[0], sketch[0]):
            return sketched_gram(reps[0], *sketch), False  # type: ignore[arg-type]
        return reps[0].gram(keep=keep), False
    K = shared_table_gram(reps, sketch)
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


def shared_table_gram(reps: list[PerSampleGrads], sketch: tuple[int, int] | None = None,
                      route: str | None = None) -> Tensor | None:
    """Exact Gram for embeddings sharing one table, plus at most one Linear tied to it (an output
    projection; its own Gram sketched with ``sketch`` where that pays, the cross terms exact). None
    if the block has another shape. Two routes, the cheaper by flop count unless ``route`` says:
    "rows" materialises the per-sample gradients of the rows the embeddings touch (n^2 U d);
    "tokens" works token by token (K_ij = sum_ts [x_it = x_js] d_it.d_js for the embeddings, and
    sum_ts D_js[x_it] (d_it . a_js) for their cross terms with the projection: (nT)^2 d); with
    ``sketch``, "sketch" sketches the table's whole per-sample gradient (embeddings and projection
    with the same S_V, S_d: cross terms included, unbiased) where that is cheaper still."""
    embs = [r for r in reps if isinstance(r, EmbeddingGrads)]
    # a transposed weight (transformers' Conv1D) tied to a table is left to the dense route
    lins = [r for r in reps if isinstance(r, FactoredGrads) and not getattr(r, "transposed", False)]
    if not embs or len(embs) + len(lins) != len(reps) or len(lins) > 1:
        return None
    table = embs[0].weight
    if any(r.weight is not table for r in [*embs, *lins]):
        return None
    n = reps[0].n
    idx = torch.cat([e.idx.reshape(n, -1) for e in embs], dim=1)  # (n, T_e): every embedding's tokens
    De = torch.cat([e.D.reshape(n, -1, e.D.shape[-1]) for e in embs], dim=1)  # (n, T_e, d)
    d = De.shape[-1]
    rows = torch.unique(idx)
    ne, nl = idx.numel(), (lins[0].A.shape[0] * lins[0].A.shape[1] if lins else 0)
    if route is None:
        by_rows = 2 * n * n * rows.numel() * d
        by_tokens = ne * ne * d + ne * nl * (d + 1)
        route = "tokens" if by_tokens < by_rows else "rows"  # (the token route works in blocks of samples)
        if sketch is not None:
            k = sketch[0]
            by_sketch = ne * k * (d + k) + nl * k * (table.shape[0] + d + k) + n * n * k * k
            if by_sketch < min(by_rows, by_tokens):
                route = "sketch"
    if route == "sketch":  # the whole table's per-sample gradient sketched at once: cross terms included
        if sketch is None:
            raise ValueError("route='sketch' needs sketch=(k, seed)")
        k, seed = sketch
        g = torch.Generator(device=De.device)
        g.manual_seed(seed)
        SV = torch.randn(table.shape[0], k, generator=g, device=De.device, dtype=De.dtype) / math.sqrt(k)
        Sd = torch.randn(d, k, generator=g, device=De.device, dtype=De.dtype) / math.sqrt(k)
        Gs = torch.bmm(SV[idx].transpose(1, 2), De @ Sd)  # sum_t S_V[x_it] (x) (d_it S_d)
        K = None
        if lins:
            A, Dl = lins[0].A, lins[0].D
            Gs = Gs + torch.bmm((Dl.to(De.dtype) @ SV).transpose(1, 2), A.to(De.dtype) @ Sd)
            if lins[0].bias is not None:
                Gb = Dl.sum(dim=1)
                K = Gb @ Gb.T
        Gs = Gs.reshape(n, -1)
        return Gs @ Gs.T if K is None else Gs @ Gs.T + K.to(Gs.dtype)
    if route == "rows":
        E = embs[0].rows(rows)
        for e in embs[1:]:
            E = E + e.rows(rows)
        E = E.reshape(n, -1)
        K = E @ E.T
        C = lins[0].rows(rows).reshape(n, -1) @ E.T if lins else None
    else:
        Df, flat, Te = De.reshape(ne, d), idx.reshape(-1), idx.shape[1]
        K = _token_pair_sums(_same_token_pairs(flat, Df), n, Te, Te, Df.device)  # as EmbeddingGrads'
        C = None
        if lins:
            A, Dl = lins[0].A, lins[0].D  # (n, T_l, d), (n, T_l, V)
            Af, Dlf = A.reshape(-1, d).to(Df.dtype), Dl.reshape(-1, Dl.shape[-1])

            def cross(rows: slice) -> Tensor:  # (d_it . a_js) D_js[x_it], token rows of the embeddings
                return (Df[rows] @ Af.T).mul_(Dlf[:, flat[rows]].T.to(Df.dtype))

            C = _token_pair_sums(cross, n, Te, A.shape[1], Df.device).T  # C[j, i] = <G_lin_j, G_emb_i>
    if lins:
        own = sketched_gram(lins[0], *sketch) if sketch is not None and sketch_pays(lins[0], sketch[0]) \
            else lins[0].gram()
        K = K + C + C.T + own
    return K
