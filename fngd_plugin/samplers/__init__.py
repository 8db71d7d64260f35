"""Per-layer per-sample gradient structure (opacus-style: one small module per layer family).

A sampler turns what the capture saw for one module call -- its input ``a`` and the gradient
``delta`` of the loss with respect to its output -- into a :class:`PerSampleGrads` (grads.py),
which gives the layer's Gram, weighted sums and per-sample gradients. ``delta`` is whatever
autograd delivers, so all results carry the host's loss scaling; the optimizer measures and
removes that scale (``base.py``). Nothing here knows about hooks, phases or damping.

Adding a layer type = one function decorated with ``@register_sampler`` plus a test against
brute-force per-sample gradients (README.md in this folder says where things are).
"""

from __future__ import annotations

# the layer families register their samplers on import
from . import conv, embedding, linear, norm
from .conv import ConvGrads, conv2d_sampler
from .embedding import EmbeddingGrads, _same_token_pairs, embedding_sampler
from .grads import (
    DenseGrads,
    PerSampleGrads,
    _batch_first,
    _gram_of,
    _in_range,
    _pow2,
    _token_pair_sums,
    compute_dtype,
)
from .linear import FactoredGrads, _chunked_gram, _token_gram, linear_sampler
from .norm import batchnorm2d_sampler, layernorm_sampler, sampler_meta
from .registry import (
    _CHECKS,
    _SAMPLERS,
    SamplerFn,
    _registered_base,
    find_sampler,
    register_sampler,
    unsupported_reason,
)
from .routes import (
    _ROUTE_MEMORY_LIMIT,
    BLOCK_ELEMENTS,
    ROUTE_COST,
    _block_elements,
    _route_costs,
    _sample_blocks,
    _use_token_route,
    sketch_pays,
)
from .subclass import (
    _PARENT_OUTPUT,
    SubclassMismatch,
    override_base,
    post_ops,
    post_reason,
    register_parent_output,
    subclass_grads,
)

__all__ = [
    "PerSampleGrads",
    "register_sampler",
    "find_sampler",
    "unsupported_reason",
]
