"""Samplers for layer types of Hugging Face ``transformers`` (registered lazily, see samplers/registry.py).

Neither the core nor this module imports transformers: samplers/registry.py maps the class name
"transformers.pytorch_utils.Conv1D" to this module and calls :func:`register` with the class the
first time it meets a module of that class.

``Conv1D`` (GPT-2, GPT-Neo-era models) is a Linear with a transposed weight: weight (in, out),
y = x W + b. Its per-sample gradient is g_i = sum_t a_it d_it^T (in x out), the transpose of the
Linear's, so its Gram (a Frobenius inner product) is the Linear's; only the weighted sum, the
materialised per-sample gradients and the rows of the weight are laid out the other way.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .samplers import FactoredGrads, PerSampleGrads, compute_dtype, register_sampler

CONV1D = "transformers.pytorch_utils.Conv1D"


class TransposedFactoredGrads(FactoredGrads):
    """g_i = sum_t [A[i,t]] D[i,t]^T for a weight stored (in, out) (transformers' Conv1D)."""

    transposed = True  # the weight is (in, out): KFAC preconditions its transpose

    def weighted(self, w: Tensor) -> list[Tensor]:
        q, p = self.D.shape[-1], self.A.shape[-1]
        Dw = self.D * w.to(self.D.dtype)[:, None, None]
        out = [self.A.reshape(-1, p).T @ Dw.reshape(-1, q)]
        if self.bias is not None:
            out.append(Dw.sum(dim=(0, 1)))
        return out

    def rows(self, idx: Tensor) -> Tensor:
        """Per-sample gradients of the weight restricted to (input) rows ``idx``: (n, len(idx), out)."""
        return torch.bmm(self.A[:, :, idx].transpose(1, 2), self.D)

    def materialize(self) -> list[Tensor]:
        out = [torch.bmm(self.A.transpose(1, 2), self.D)]
        if self.bias is not None:
            out.append(self.D.sum(dim=1))
        return out


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' Conv1D (by class name: transformers is not imported)."""
    return any(f"{c.__module__}.{c.__qualname__}" == CONV1D for c in type(module).__mro__)


def conv1d_sampler(module: nn.Module, a: Tensor, delta: Tensor, batch_dim: int, meta: dict) -> PerSampleGrads:
    if a.dim() < 2:
        raise ValueError(f"Conv1D input of shape {tuple(a.shape)} has no batch dimension")
    dt = compute_dtype(delta.dtype)
    a = (a if batch_dim == 0 else a.movedim(batch_dim, 0)).to(dt)
    delta = (delta if batch_dim == 0 else delta.movedim(batch_dim, 0)).to(dt)
    n = a.shape[0]
    return TransposedFactoredGrads(a.reshape(n, -1, a.shape[-1]), delta.reshape(n, -1, delta.shape[-1]),
                                   module.weight, module.bias)


def register(cls: type) -> None:
    """Register the sampler of ``cls``, transformers' Conv1D (called by samplers/registry.py's lazy table)."""
    register_sampler(cls)(conv1d_sampler)
