"""Conv2d: per-sample weight gradients sum_t d_it a_it^T over output positions t, with a_it the
input patch under the kernel; the Gram by the cheapest of four routes (routes.py's cost model).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .grads import PerSampleGrads, _gram_of, _in_range, compute_dtype
from .linear import _chunked_gram, _token_gram
from .registry import register_sampler
from .routes import _ROUTE_MEMORY_LIMIT, _route_costs, _sample_blocks, sketch_pays
from .subclass import register_parent_output


class ConvGrads(PerSampleGrads):
    """Conv2d: the Gram by the cheapest of four routes (_gram_route): per-sample weight gradients by
    one grouped weight-gradient convolution (batch as groups) or a block at a time from patches,
    the token route on patches, or the pixel route (shifted pixel products) when the spatial
    extent is small; weighted sums by the layer's own conv2d_weight (or from the kept per-sample
    gradients)."""

    def __init__(self, module: nn.Conv2d, a: Tensor, delta: Tensor):
        self.module = module
        self.calls = [(a, delta)]
        self.weight, self.bias = module.weight, module.bias
        self.params = (self.weight,) if self.bias is None else (self.weight, self.bias)
        self.n = a.shape[0]

    def _pads_explicitly(self) -> bool:
        """Whether the padding is applied to the input first (string or non-zero padding modes)."""
        return isinstance(self.module.padding, str) or self.module.padding_mode != "zeros"

    def _padded(self, a: Tensor) -> tuple[Tensor, Any]:
        m = self.module
        if self._pads_explicitly():
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            return F.pad(a, m._reversed_padding_repeated_twice, mode=mode), 0
        return a, m.padding

    def kron_factors(self, any_order: bool = False) -> tuple[Tensor, Tensor]:
        """Patches A (n, T, C_in k k) and output gradients D (n, T, C_out), T summed over calls.

        A's columns are in the weight's (C_in, kh, kw) order, or with ``any_order`` in whichever
        order copies fastest (``patch_order``): enough for anything invariant to a permutation of
        the input features, as Grams are."""
        if self.module.groups != 1:
            raise ValueError("Kronecker factors of a grouped convolution are not defined here")
        channels_last = any_order and self.patch_order() is not None
        As, Ds = [], []
        for a, delta in self.calls:
            As.append(self._patches(a, channels_last))
            Ds.append(delta.flatten(2).transpose(1, 2))
        if len(As) == 1:
            return As[0], Ds[0]
        return torch.cat(As, dim=1), torch.cat(Ds, dim=1)

    def patch_order(self) -> Tensor | None:
        """The column order of ``kron_factors(any_order=True)``: column j holds weight column
        order[j]; None where that is the weight's order. Channels-last (kh, kw, C_in) patches copy
        contiguous runs of C_in values (2.6-4.8x faster than the weight order's scattered reads,
        measured for ResNet-18's 64-512 channel layers on a CPU); for C_in < 8 there is nothing to gain."""
        c_in, kh, kw = self.weight.shape[1:]
        if c_in < 8 or kh * kw == 1:
            return None
        idx = torch.arange(c_in * kh * kw, device=self.weight.device)
        return idx.view(c_in, kh, kw).permute(1, 2, 0).reshape(-1)

    def _patches(self, a: Tensor, channels_last: bool) -> Tensor:
        """(n, T, C_in kh kw) patches as one copy of strided views of the padded input (no im2col
        buffer and no transposed copy of it: measured 1.3-1.8x faster than F.unfold + reshape)."""
        m = self.module
        a, padding = self._padded(a)
        ph, pw = (0, 0) if padding == 0 else padding
        if ph or pw:
            a = F.pad(a, (pw, pw, ph, ph))
        (kh, kw), (dh, dw), (sh, sw) = m.kernel_size, m.dilation, m.stride
        n = a.shape[0]
        if channels_last:
            x = a.permute(0, 2, 3, 1).contiguous()  # (n, H, W, C): a no-op for channels_last inputs
            v = x.unfold(1, (kh - 1) * dh + 1, sh).unfold(2, (kw - 1) * dw + 1, sw)[..., ::dh, ::dw]
            return v.permute(0, 1, 2, 4, 5, 3).reshape(n, v.shape[1] * v.shape[2], -1)  # (kh, kw, C)
        v = a.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)[..., ::dh, ::dw]
        return v.permute(0, 2, 3, 1, 4, 5).reshape(n, v.shape[2] * v.shape[3], -1)  # (C, kh, kw)

    def cache_size(self) -> int:
        return self.n * sum(p.numel() for p in self.params)

    def _tokens(self) -> int:
        return sum(d.shape[2] * d.shape[3] for _, d in self.calls)

    def factor_sizes(self) -> tuple[int, int, int, int] | None:
        if self.module.groups != 1:
            return None
        return self.n, self._tokens(), self.weight[0].numel(), self.weight.shape[0]

    def materializes(self, sketch: int | None = None) -> bool:
        """Whether gram() materialises the per-sample gradients (and a k x k sketch would not replace it)."""
        if sketch is not None and sketch_pays(self, sketch):
            return False
        return self._gram_route() == "materialize"

    def _gram_route(self) -> str:
        """Whichever route _route_costs estimates cheapest: "token", "pixel", or one that materialises
        the per-sample gradients, "chunked" (a block at a time from patches) or "materialize" (one
        grouped convolution)."""
        if self.module.groups != 1:
            return "materialize"
        n, T = self.n, self._tokens()
        p, q = self.weight[0].numel(), self.weight.shape[0]
        costs = _route_costs(n, T, p, q, self.weight.device, self._pixels())
        route = min(costs, key=costs.__getitem__)
        if route != "materialize":
            return route
        # measured: for T <= 256 the blocked bmm beats the grouped convolution, which also needs n p q
        return "chunked" if T <= 256 or n * p * q > _ROUTE_MEMORY_LIMIT else "materialize"

    def _pixels(self) -> tuple[int, int, int] | None:
        """(input pixels, input channels, kernel positions) for the pixel route: one call, a kernel
        larger than 1 x 1 (else it is the token route)."""
        kh, kw = self.module.kernel_size
        if len(self.calls) != 1 or kh * kw == 1:
            return None
        a = self.calls[0][0]
        H, W = a.shape[2:]
        if self._pads_explicitly():
            left, right, top, bottom = self.module._reversed_padding_repeated_twice
            H, W = H + top + bottom, W + left + right
        return H * W, a.shape[1], kh * kw

    def _pixel_gram(self) -> Tensor:
        """K_ij = sum_{t,s} (A_it.A_js + bias)(D_it.D_js) with the patch products A_it.A_js formed from
        the pixel products: a patch is the kernel's k positions around its centre, so A_it.A_js is a
        sum of k pixel products x_i(t + o).x_j(s + o) over the kernel offsets o (pixels outside the
        zero padding count zero). One (nP)^2 C GEMM then k shifted additions, instead of the token
        route's (nT)^2 C k GEMM: 1.7-3.8x faster for ResNet layers of 64-512 channels at 4x4 to 8x8
        positions on a CPU (benchmarks/gram_routes.py). Pixel-major order (position, sample), so
        each shifted addition copies runs of n contiguous values; a block of samples at a time."""
        m = self.module
        a, delta = self.calls[0]
        a, padding = self._padded(a)
        ph, pw = (0, 0) if padding == 0 else padding
        n, C, H, W = a.shape
        q, Ho, Wo = delta.shape[1:]
        (kh, kw), (dh, dw), (sh, sw) = m.kernel_size, m.dilation, m.stride

        def valid(k: int, dil: int, pad: int, stride: int, size: int, out: int) -> list[tuple[slice, slice]]:
            """Per kernel offset: the output positions whose input position y stride + offset lies in
            the input, and those input positions."""
            spans = []
            for u in range(k):
                off = u * dil - pad
                y0, y1 = max(0, -(off // stride)), min(out, (size - 1 - off) // stride + 1)
                if y0 < y1:
                    spans.append((slice(y0, y1), slice(y0 * stride + off, (y1 - 1) * stride + off + 1, stride)))
            return spans

        shifts = [(yo, xo, yi, xi) for yo, yi in valid(kh, dh, ph, sh, H, Ho)
                  for xo, xi in valid(kw, dw, pw, sw, W, Wo)]
        X = a.permute(2, 3, 0, 1).reshape(H, W, n, C)
        Xf = X.reshape(-1, C)
        out = []
        with _in_range(delta.permute(2, 3, 0, 1).reshape(-1, q)) as (Df, unscale):
            Dv = Df.view(Ho, Wo, n, q)
            for i0, i1 in _sample_blocks(n, H * W, n * H * W, a.device):
                b = i1 - i0
                XX = (X[:, :, i0:i1].reshape(-1, C) @ Xf.T).view(H, W, b, H, W, n)
                AA = XX.new_full((Ho, Wo, b, Ho, Wo, n), 1.0 if self.bias is not None else 0.0)
                for yo, xo, yi, xi in shifts:
                    AA[yo, xo, :, yo, xo] += XX[yi, xi, :, yi, xi]
                del XX
                P = AA.view(Ho * Wo * b, -1).mul_(Dv[:, :, i0:i1].reshape(-1, q) @ Df.T)
                out.append(P.view(Ho * Wo, b, Ho * Wo, n).sum(dim=(0, 2)))
            K = out[0] if len(out) == 1 else torch.cat(out)
        return unscale(K)

    def gram(self, keep: bool = False) -> Tensor:
        route = self._gram_route()
        if route == "token":
            return _token_gram(*self.kron_factors(any_order=True), self.bias is not None)
        if route == "pixel":
            return self._pixel_gram()
        if route == "chunked":
            return _chunked_gram(*self.kron_factors(any_order=True), self.bias is not None)
        grads = self.materialize()
        if keep:
            self._cache = grads
        return _gram_of(grads)

    def weighted(self, w: Tensor) -> list[Tensor]:
        cached = self._cached_weighted(w)
        if cached is not None:
            return cached
        m = self.module
        gw = gb = None
        for a, delta in self.calls:
            a, padding = self._padded(a)
            dw = delta * w.to(delta.dtype)[:, None, None, None]
            wgrad = torch.nn.grad.conv2d_weight(a, m.weight.shape, dw, stride=m.stride, padding=padding,
                                                dilation=m.dilation, groups=m.groups)
            gw = wgrad if gw is None else gw + wgrad
            if self.bias is not None:
                bgrad = dw.sum(dim=(0, 2, 3))
                gb = bgrad if gb is None else gb + bgrad
        if not (gw is not None):  # an invariant, kept under python -O
            raise RuntimeError("fngd_plugin internal error: expected gw is not None")
        return [gw] if gb is None else [gw, gb]

    def materialize(self) -> list[Tensor]:
        m = self.module
        n = self.n
        c_out, c_in_g = self.weight.shape[:2]
        gw = gb = None
        for a, delta in self.calls:
            a, padding = self._padded(a)
            # per-sample weight gradients: the batch folded into channels, one group per sample
            x = a.contiguous().view(1, n * a.shape[1], *a.shape[2:])
            go = delta.contiguous().view(1, n * c_out, *delta.shape[2:])
            shape = (n * c_out, c_in_g, *self.weight.shape[2:])
            g = torch.nn.grad.conv2d_weight(x, shape, go, stride=m.stride, padding=padding, dilation=m.dilation,
                                            groups=n * m.groups).view(n, *self.weight.shape)
            gw = g if gw is None else gw + g
            if self.bias is not None:
                b = delta.sum(dim=(2, 3))
                gb = b if gb is None else gb + b
        if not (gw is not None):  # an invariant, kept under python -O
            raise RuntimeError("fngd_plugin internal error: expected gw is not None")
        return [gw] if gb is None else [gw, gb]

    @classmethod
    def cat(cls, reps: Sequence[PerSampleGrads]) -> PerSampleGrads:
        first = reps[0]
        if not (isinstance(first, ConvGrads)):  # an invariant, kept under python -O
            raise RuntimeError("fngd_plugin internal error: expected isinstance(first, ConvGrads)")
        first.calls = [c for r in reps for c in r.calls]  # type: ignore[attr-defined]
        return first


@register_sampler(nn.Conv2d)
def conv2d_sampler(module: nn.Module, a: Tensor, delta: Tensor, batch_dim: int, meta: dict) -> PerSampleGrads:
    if a.dim() != 4 or batch_dim != 0:
        raise ValueError(f"Conv2d input must be batched NCHW, got shape {tuple(a.shape)}")
    dt = compute_dtype(delta.dtype)
    return ConvGrads(module, a.to(dt), delta.to(dt))  # type: ignore[arg-type]


@register_parent_output(nn.Conv2d)
def _conv2d_output(m: nn.Module, a: Tensor, meta: dict) -> Tensor:
    return m._conv_forward(a, m.weight, m.bias)  # type: ignore[operator]
