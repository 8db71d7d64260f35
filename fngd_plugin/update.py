"""The step shared by FNGD and KFAC: momentum SGD with weight decay on preconditioned directions.

Written with torch's foreach kernels and without host syncs: a non-finite direction anywhere
turns the whole step into a no-op (parameters and momentum buffers untouched) through device-side
masking, and is counted by the caller from the returned flag.
"""

from __future__ import annotations

import torch
from torch import Tensor


def momentum_step(
    params: list[Tensor],
    directions: list[Tensor],
    buffers: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    max_update_norm: float | None = None,
) -> Tensor:
    """p -= lr * v with v = m v + (d + wd p) (Nesterov: d + wd p + m v). Returns a 0-d bool: applied."""
    if not params:
        return torch.ones((), dtype=torch.bool)
    d = list(directions)
    if weight_decay != 0:
        d = torch._foreach_add(d, params, alpha=weight_decay)
    norms = torch._foreach_norm(d)
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
    ok = torch.isfinite(total)
    d = [torch.where(ok.to(x.device), x, torch.zeros((), dtype=x.dtype, device=x.device)) for x in d]
    if max_update_norm is not None:
        scale = (max_update_norm / (total + 1e-12)).clamp(max=1.0)
        scale = torch.where(ok, scale, torch.ones_like(scale))
        torch._foreach_mul_(d, scale)
    applied = ok.to(params[0].dtype)
    if momentum != 0:
        m = torch.where(ok, torch.tensor(momentum, dtype=params[0].dtype, device=ok.device), torch.ones_like(applied))
        torch._foreach_mul_(buffers, m)
        torch._foreach_add_(buffers, d)
        upd = torch._foreach_add(d, buffers, alpha=momentum) if nesterov else list(buffers)
    else:
        upd = d
    upd = torch._foreach_mul(upd, applied)
    torch._foreach_add_(params, upd, alpha=-lr)
    return ok
