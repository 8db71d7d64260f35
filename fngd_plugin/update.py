"""The step shared by FNGD and KFAC: momentum SGD with weight decay on preconditioned directions.

Written with torch's foreach kernels, with the memory traffic of torch.optim.SGD plus one read
for the global norm. The norm is read back to the host once per step (the same one sync that
GradScaler makes): it decides whether a non-finite step is skipped. Doing that on the device
instead costs two extra passes over every gradient and buffer (measured +6-10% step time on the
CPU benchmark).
"""

from __future__ import annotations

import torch
from torch import Tensor


def global_norm(tensors: list[Tensor]) -> float:
    """L2 norm over all tensors, as a Python float (one host sync; inf/nan if any entry is)."""
    norms = torch._foreach_norm(tensors)
    return float(torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms])))


def momentum_step(
    params: list[Tensor],
    directions: list[Tensor],
    buffers: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    scale: float = 1.0,
) -> None:
    """p -= lr * v with v = m v + (s d + wd p) (Nesterov: s d + wd p + m v); d is left unchanged."""
    d = list(directions)
    if scale != 1.0:
        d = torch._foreach_mul(d, scale)
    if weight_decay != 0:
        d = torch._foreach_add(d, params, alpha=weight_decay)
    if momentum != 0:
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, d)
        upd = torch._foreach_add(d, buffers, alpha=momentum) if nesterov else buffers
    else:
        upd = d
    torch._foreach_add_(params, upd, alpha=-lr)
