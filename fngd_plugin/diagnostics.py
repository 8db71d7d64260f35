"""What a collect step's direction does, computed from the n x n side alone (no parameter-sized work).

For a solve with Gram K (true per-sample units), shift s = n lambda and coefficients
c = (K + s I)^-1 1, the direction is d = U c and the mean gradient gbar = U 1 / n, so every inner
product of d, gbar and the per-sample gradients g_j is an n x n quantity:

    g_j . d      = (K c)_j = 1 - s c_j        (the first-order rate at which sample j's loss falls
                                               along d; it rises only where s c_j > 1)
    gbar . d     = 1^T K c / n,    |d|^2 = c^T K c,    |gbar|^2 = 1^T K 1 / n^2.

The step FNGD applies is d times nu (nu = 1 / sum(c) with ``normalize="sum"``, else 1), so:

* ``ascent``: the share of the batch's samples whose loss rises to first order along the step,
  (K c)_j < 0 (the sign does not depend on nu > 0). A negative c_j does *not* mean ascent: such a
  sample has (K c)_j = 1 - s c_j > 1 and falls faster than the rest.
* ``cosine``: cos(d, gbar), how far the solve turned the direction from the mean gradient.
* ``decrease``: the first-order decrease of the batch's mean loss per unit lr, relative to SGD's
  at the same lr: nu gbar . d / |gbar|^2 (1 for SGD).
* ``ess``: the effective sample size of c as a share of n, (sum c)^2 / (n sum c^2) (1: equal
  weights).
* ``damping``: the shift in ``damping_mode="relative"`` units, s n / trace(K) (the damping that
  mode would need to give the same step), whatever mode chose it.

``spectrum`` (for ``FNGD(trace=...)`` only: one eigvalsh) adds K's spectrum: the top eigenvalue's
share of trace(K), the condition number of K + s I, and how much of the all-ones vector lies on
the top eigenvector (1: the batch's shared direction is the top one), and the cosine that other
shifts would have given (``direction_cosine``).
"""

from __future__ import annotations

import json

import torch
from torch import Tensor

from .gram import direction_cosine

DIRECTION_STATS = ("ascent", "cosine", "decrease", "ess", "damping")


def direction_stats(K: Tensor, shift: Tensor, c: Tensor, normalize: str) -> dict[str, Tensor]:
    """The module docstring's quantities as 0-dim float64 tensors (no host sync)."""
    K = K.to(torch.float64)
    c = c.to(torch.float64)
    n = K.shape[0]
    Kc = K @ c
    ones_K_ones = K.sum()
    gd = Kc.sum() / n
    nu = 1.0 / c.sum() if normalize == "sum" else torch.ones((), dtype=torch.float64, device=K.device)
    trace = K.diagonal().sum()
    return {
        "ascent": (Kc < 0).to(torch.float64).mean(),
        "cosine": Kc.sum() / ((c @ Kc) * ones_K_ones).sqrt(),
        "decrease": nu * gd / (ones_K_ones / n**2),
        "ess": c.sum() ** 2 / (n * (c * c).sum()),
        "damping": shift * n / trace,
    }


def spectrum(K: Tensor, shift: Tensor, relative: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)) -> dict:
    """K's spectrum and the cosine at other shifts (relative-mode dampings ``relative``), as numbers."""
    K = K.to(torch.float64)
    n = K.shape[0]
    L, Q = torch.linalg.eigh(torch.where(torch.isfinite(K), K, 0.0))
    L = L.clamp_min(0)
    b = Q.sum(0)
    trace = L.sum()
    shifts = torch.tensor(relative, dtype=torch.float64, device=K.device) * trace / n
    cos = direction_cosine(L, b, shifts)
    return {
        "top_share": float(L[-1] / trace),
        "top5_share": float(L[-5:].sum() / trace),
        "condition": float((L[-1] + shift) / (L[0] + shift)),
        "top_over_shift": float(L[-1] / shift),
        "ones_on_top": float(b[-1] ** 2 / n),
        "cosine_at_relative": {str(r): float(v) for r, v in zip(relative, cos)},
    }


def write_trace(path: str, line: dict, K: Tensor, shift: Tensor, c: Tensor, stats: dict[str, Tensor],
                blocks: list[tuple[str, Tensor | None]]) -> None:
    """Append one solve's JSON line to ``path`` (``FNGD(trace=...)``): ``line`` (where it is), the
    direction statistics, K's spectrum, and the share of |d|^2 = c^T K c that each covered module
    (block: its name and Gram, true units) holds; a per-module solve (``blocks`` of one, no Gram)
    names its block."""
    line = {**line, "n": K.shape[0], "shift": float(shift), **{k: float(v) for k, v in stats.items()},
            "coef_scale": float(c.shape[0] * c.mean()),
            "negative_coefficients": float((c < 0).to(torch.float64).mean())}
    line.update(spectrum(K, shift))
    if len(blocks) > 1 or (blocks and blocks[0][1] is not None):
        total = float(c @ K @ c)
        line["norm_share"] = {name: float(c @ Kb @ c) / total for name, Kb in blocks if Kb is not None}
    elif blocks:
        line["block"] = blocks[0][0]
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
