"""The Gram routes' cost model: which exact route a layer takes, how large a block of work is, and
whether a sketch is cheaper than every exact route (``FNGD(sketch=k)``).

The one place the samplers (linear.py, conv.py, embedding.py) and the sketch (``gram.py``) read.
It knows sizes only -- n samples, T tokens (positions), p inputs, q outputs per token -- never
tensors or layer types, so it imports nothing of the project.
"""

from __future__ import annotations

from typing import Protocol

import torch

# A Gram route needing more than this many elements is avoided when another route fits.
_ROUTE_MEMORY_LIMIT = 2**28

# Relative cost of the exact Gram routes per device: (cost of one multiply-add of the materialising
# route relative to one of a large GEMM, cost of one elementwise pass over a token-pair entry in
# multiply-adds). Measured with benchmarks/gram_routes.py on this project's 2-core CPU (the token
# route's large GEMMs run 1.3-4x more multiply-adds per second than the materialising route's
# batched ones and skinny n x n products) and on an H200 (benchmarks/reports/gpu-h200-first.md: with
# these constants the picked routes of its 25 layers take 1.02x the fastest routes' time in all,
# worst layer 1.4x at under 1 ms; the earlier guess (1.0, 50.0) took 1.28x, worst 1.8x).
ROUTE_COST = {"cpu": (2.5, 50.0), "cuda": (2.5, 50.0)}

# elements of one block of the blocked Gram routes (measured on a 2-core CPU: a block that stays in
# cache is up to 2x faster than one pass); larger on a GPU, where a block is one kernel's work
BLOCK_ELEMENTS = {"cpu": 2**22, "cuda": 2**25}


def _route_costs(n: int, T: int, p: int, q: int, device: torch.device | str = "cpu",
                 pixels: tuple[int, int, int] | None = None) -> dict[str, float]:
    """Estimated cost of each exact Gram route of g_i = sum_t d_it a_it^T (q x p), in multiply-adds of
    a large GEMM: "token", the (nT)^2 token-pair products ((nT)^2 (p + q)) and two passes over them;
    "materialize", g_i a block at a time (n T p q + n^2 p q); with ``pixels = (P, C, k)`` (a
    convolution's P input pixels, C input channels and k kernel positions, p = C k), "pixel": the
    (nP)^2 C pixel-pair products, shifted and added once per kernel position (ConvGrads._pixel_gram),
    instead of (nT)^2 C k patch-pair products."""
    mat_factor, elem = ROUTE_COST.get(torch.device(device).type, ROUTE_COST["cuda"])
    pairs = (n * T) ** 2
    costs = {"token": pairs * (p + q + 2 * elem), "materialize": mat_factor * (n * T * p * q + n * n * p * q)}
    if pixels is not None:
        P, C, k = pixels
        costs["pixel"] = (n * P) ** 2 * C + pairs * (q + (k + 2) * elem)
    return costs


def _use_token_route(n: int, T: int, p: int, q: int, device: torch.device | str = "cpu") -> bool:
    """Whether the token route is the cheaper of the two routes of a Linear (_route_costs). Both
    work a block of samples at a time, so neither needs a memory cap."""
    costs = _route_costs(n, T, p, q, device)
    return costs["token"] <= costs["materialize"]


def _block_elements(device: torch.device) -> int:
    return BLOCK_ELEMENTS.get(device.type, BLOCK_ELEMENTS["cuda"])


def _sample_blocks(n: int, row_tokens: int, cols: int, device: torch.device) -> list[tuple[int, int]]:
    """Blocks of samples [i0, i1) whose (i1 - i0) row_tokens x cols token-pair matrix has about as
    many elements as _chunked_gram's blocks: the token routes form their n T x n T products a block
    of rows at a time, so a route's temporaries are a few MiB, not three (n T)^2 matrices (67 MiB
    each in float32 for a fairseq batch of 4096 tokens)."""
    b = max(1, _block_elements(device) // max(1, row_tokens * cols))
    return [(i0, min(n, i0 + b)) for i0 in range(0, n, b)]


class Factored(Protocol):
    """What the sketch's cost asks of a layer's per-sample gradients (PerSampleGrads.factor_sizes)."""

    def factor_sizes(self) -> tuple[int, int, int, int] | None: ...


def sketch_pays(r: Factored, k: int) -> bool:
    """Whether a k x k sketch is cheaper than the exact Gram of this Linear or Conv2d (flop counts);
    False for a layer whose per-sample gradient is not sum_t d_it a_it^T (``factor_sizes`` None)."""
    sizes = r.factor_sizes()
    if sizes is None:
        return False
    n, T, p, q = sizes
    exact = min((n * T) ** 2 * (p + q), n * T * p * q + n * n * p * q)
    return p * q > k * k and n * T * k * (p + q + k) + n * n * k * k < exact
