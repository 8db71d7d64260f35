"""The exact fallback for a module that has parameters of its own and no registered sampler.

Per-sample gradients of the module's *own* parameters (its submodules' parameters held fixed:
they have their own samplers) from what the capture recorded for one call: the inputs and the
gradient of the loss with respect to the output. With torch.func: for each sample i,

    g_i = vjp of  p -> module(p; inputs_i)  at p, applied to delta_i

vectorised over samples with ``vmap``. This is exact when the module treats samples
independently. A module that mixes samples (batch statistics of a BatchNorm in training mode)
or draws random numbers in training (dropout, drop-path with p > 0) is not eligible:
:func:`generic_reason` says why, and the module is reported uncovered. The cost is one more
forward and backward of the module, vectorised over the batch, in collect steps only
(``make bench`` prints it per layer type); ``FNGD(generic_fallback=False)`` switches it off.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from .samplers import DenseGrads, compute_dtype

_STOCHASTIC = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def own_params(module: nn.Module) -> dict[str, Tensor]:
    """The parameters the fallback differentiates: the module's own, plus those of submodules it
    uses functionally instead of calling them (nn.MultiheadAttention's out_proj: its hooks never fire)."""
    out = {k: p for k, p in module._parameters.items() if p is not None and p.requires_grad}
    if isinstance(module, nn.MultiheadAttention):
        out.update({f"out_proj.{k}": p for k, p in module.out_proj._parameters.items()
                    if p is not None and p.requires_grad})
    return out


def batch_dim_of(module: nn.Module, declared: int) -> int:
    if isinstance(module, nn.MultiheadAttention):
        return 0 if module.batch_first else 1
    return declared


def generic_reason(module: nn.Module) -> str | None:
    """Why the torch.func fallback would not be exact for ``module`` in its current mode, or None."""
    for sub in module.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.training:
            return f"{type(sub).__name__} in training mode mixes samples (batch statistics)"
        if sub.training and isinstance(sub, _STOCHASTIC) and sub.p > 0:
            return f"{type(sub).__name__}(p={sub.p}) draws random numbers in training"
        drop_prob = getattr(sub, "drop_prob", None)  # timm's DropPath
        if sub.training and isinstance(drop_prob, float) and drop_prob > 0:
            return f"{type(sub).__name__}(drop_prob={drop_prob}) draws random numbers in training"
    return None


def _first_tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (list, tuple)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"output of type {type(out).__name__} has no leading tensor")


def generic_grads(module: nn.Module, args: tuple, kwargs: dict, delta: Tensor, batch_dim: int,
                  rows: bool = False) -> DenseGrads:
    """Per-sample gradients of ``module``'s own trainable parameters for one recorded call.
    ``rows``: the call's input was a flattened batch (n k rows, recorded as (n, k, ...)): each
    sample's k rows are handed to the module as they were, rows first, not as a batch of one."""
    params = own_params(module)
    n = delta.shape[batch_dim]
    dt = compute_dtype(delta.dtype)
    # tensors that carry the batch are split over samples; everything else is shared
    batched = [isinstance(a, Tensor) and a.dim() > batch_dim and a.shape[batch_dim] == n for a in args]
    in_dims = tuple(batch_dim if b else None for b in batched)
    detached = {k: p.detach() for k, p in params.items()}

    def one(x_args: tuple, d: Tensor) -> tuple[Tensor, ...]:
        def f(p: dict[str, Tensor]) -> Tensor:
            if rows:
                return _first_tensor(functional_call(module, p, x_args, kwargs))
            xs = tuple(x.unsqueeze(batch_dim) if b else x for x, b in zip(x_args, batched))
            return _first_tensor(functional_call(module, p, xs, kwargs)).squeeze(batch_dim)

        out, pullback = vjp(f, detached)
        (g,) = pullback(d.to(out.dtype))
        return tuple(g[k] for k in params)

    grads = vmap(one, in_dims=(in_dims, batch_dim))(tuple(args), delta)
    return DenseGrads(list(params.values()), [g.to(dt) for g in grads])
