"""Independent reference: per-sample gradients by torch.func and an explicit d x d solve."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap


def per_sample_grads(model: nn.Module, loss_one, *batch) -> dict[str, torch.Tensor]:
    """{name: (n, *shape)} gradients of each sample's own loss; loss_one(output, *targets_i)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, x, *rest):
        out = functional_call(model, p, (x.unsqueeze(0),))
        return loss_one(out, *[r.unsqueeze(0) for r in rest])

    return vmap(grad(f), in_dims=(None,) + (0,) * len(batch))(params, *batch)


def flat(gs: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    n = next(iter(gs.values())).shape[0]
    return torch.cat([gs[k].reshape(n, -1) for k in names], dim=1)


def ngd_direction(U: torch.Tensor, damping: float) -> torch.Tensor:
    """(F + damping I)^-1 gbar with F = U^T U / n, U: (n, d), solved as a d x d system."""
    n, d = U.shape
    F = U.T @ U / n
    return torch.linalg.solve(F + damping * torch.eye(d, dtype=U.dtype), U.mean(0))


def blockwise_direction(gs: dict[str, torch.Tensor], blocks: list[list[str]], damping: float) -> dict:
    out = {}
    for names in blocks:
        d = ngd_direction(flat(gs, names), damping)
        i = 0
        for k in names:
            m = gs[k][0].numel()
            out[k] = d[i:i + m].view_as(gs[k][0])
            i += m
    return out
