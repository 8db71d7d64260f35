"""Damped natural gradient as a weighted sum of per-sample gradients (Sherman-Morrison-Woodbury).

Mini-batch of n samples with per-sample gradients U = [g_1 .. g_n] (d x n), mean gradient
gbar = U 1 / n, empirical Fisher F = U U^T / n, damping lambda > 0. The push-through identity

    (F + lambda I)^-1 gbar = U c,    c = (U^T U + n lambda I)^-1 1

turns the d x d solve into an n x n one on the Gram K = U^T U. This file is that identity and
nothing else: from a Gram (in true per-sample units) to coefficients c.

Damping modes:
  absolute   n lambda added to K as given (lambda = ``damping``).
  relative   n lambda = damping * trace(K) / n: damping times the mean squared per-sample gradient
             norm, i.e. times the mean eigenvalue of K. Invariant to any rescaling of the loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

DAMPING_MODES = ("relative", "absolute")
NORMALIZE_MODES = ("none", "sum")


def damping_shift(K: Tensor, damping: float, damping_mode: str) -> Tensor:
    """The n*lambda that is added to the diagonal of K."""
    n = K.shape[0]
    if damping_mode == "absolute":
        return K.new_tensor(n * damping)
    if damping_mode == "relative":
        return damping * K.diagonal().sum() / n
    raise ValueError(f"damping_mode={damping_mode!r}; allowed: {DAMPING_MODES}")


def solve_coefficients(K: Tensor, damping: float, damping_mode: str = "relative") -> tuple[Tensor, Tensor]:
    """c = (K + n lambda I)^-1 1 by Cholesky, without a host sync.

    Returns ``(c, fell_back)``. ``K`` is solved in float64 whatever its dtype. If the Cholesky
    factorisation fails (a numerically singular K), it is retried with jitter; if that fails too,
    the Jacobi solution 1 / diag(K + n lambda I) is used and ``fell_back`` is true. A non-finite K
    gives a non-finite c (not counted as a fallback): the caller must not apply it.
    """
    n = K.shape[0]
    K64 = K.to(torch.float64)
    shift = damping_shift(K64, damping, damping_mode)
    eye = torch.eye(n, dtype=torch.float64, device=K.device)
    A = K64 + shift * eye
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
