"""Data-parallel training: every replica must take the same step.

The optimizers average what each replica computed from its own batch -- FNGD its natural-gradient
direction and the gradient-scale measurement, KFAC nothing (it refuses to run distributed in the
hosts) -- with one all-reduce per tensor. Outside ``torch.distributed`` (or with one process)
these are no-ops, so single-process code never pays for them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_mean(tensors: list[Tensor]) -> None:
    """Replace each tensor, in place, by its mean over the replicas (a collective: every replica
    calls it with the same tensors in the same order)."""
    world = world_size()
    if world == 1:
        return
    for t in tensors:
        torch.distributed.all_reduce(t)
        t.div_(world)
