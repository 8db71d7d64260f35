"""Where the coefficients solved in the collect phase wait to be reused.

Two keyings (``reuse`` option of FNGD):
  sample    c_i stored per sample id; a sample seen again gets its own coefficient back.
  position  c stored per batch index within the epoch, applied to whatever batch comes there.

Coefficients are kept per block (one block for ``coefficients="network"``, one per owning module
for ``"layer"``), in true per-sample units (the c of ``gram.solve_coefficients``), as float64. A lookup that finds
nothing (an id never collected, a position whose batch had another size) falls back to the mean
of everything stored for that block, and is counted. Lookups never sync with the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

KEYINGS = ("sample", "position")


def grown(t: Tensor, size: int, exact: bool = False) -> Tensor:
    """``t`` (1-D) zero-padded to at least ``size`` entries: doubling (amortised O(1) growth of
    tables indexed by sample id), or exactly ``size`` with ``exact``. ``t`` itself if big enough."""
    if size <= t.numel():
        return t
    out = torch.zeros(size if exact else max(size, 2 * t.numel()), dtype=t.dtype, device=t.device)
    out[: t.numel()] = t
    return out


class _SampleTable:
    def __init__(self) -> None:
        self.values = torch.zeros(0, dtype=torch.float64)
        self.filled = torch.zeros(0, dtype=torch.bool)

    def _grow(self, size: int, device: torch.device, exact: bool = False) -> None:
        if self.values.device != device:
            self.values, self.filled = self.values.to(device), self.filled.to(device)
        self.values, self.filled = grown(self.values, size, exact), grown(self.filled, size, exact)

    def put(self, ids: Tensor, c: Tensor) -> None:
        ids = ids.to(c.device)
        self._grow(int(ids.max()) + 1, c.device)
        keep = torch.isfinite(c)
        self.values[ids] = torch.where(keep, c.to(torch.float64), self.values[ids])
        self.filled[ids] = self.filled[ids] | keep

    def mean(self) -> Tensor:
        count = self.filled.sum().clamp_min(1)
        return (self.values * self.filled).sum() / count

    def get(self, ids: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        if self.values.numel() == 0:
            missing = torch.ones(ids.shape, dtype=torch.bool, device=device)
            return torch.zeros(ids.numel(), dtype=torch.float64, device=device), missing
        ids = ids.to(self.values.device)
        inside = ids < self.values.numel()
        safe = torch.where(inside, ids, torch.zeros_like(ids))
        hit = inside & self.filled[safe]
        out = torch.where(hit, self.values[safe], self.mean())
        return out.to(device), ~hit


class CoefficientStore:
    """Coefficient vectors per block, keyed by sample id or by batch position within the epoch."""

    def __init__(self, keying: str):
        if keying not in KEYINGS:
            raise ValueError(f"reuse keying={keying!r}; allowed: {KEYINGS}")
        self.keying = keying
        self._samples: dict[int, _SampleTable] = {}
        self._positions: dict[int, dict[int, Tensor]] = {}
        self._position_mean: dict[int, Tensor] = {}
        # device-side counters of lookups that found nothing exact
        self.misses = torch.zeros((), dtype=torch.int64)

    @property
    def empty(self) -> bool:
        return not self._samples and not self._positions

    def __len__(self) -> int:
        """Number of stored coefficients over all blocks (syncs with the device)."""
        if self.keying == "sample":
            return sum(int(t.filled.sum()) for t in self._samples.values())
        return sum(v.numel() for t in self._positions.values() for v in t.values())

    def put(self, block: int, c: Tensor, *, ids: Tensor | None, position: int) -> None:
        if self.keying == "sample":
            if ids is None:
                raise ValueError("reuse='sample' needs sample ids: call opt.set_sample_ids(ids) before the forward")
            self._samples.setdefault(block, _SampleTable()).put(ids, c)
        else:
            self._positions.setdefault(block, {})[position] = c.detach().to(torch.float64).clone()
            self._position_mean.pop(block, None)

    def get(self, block: int, n: int, *, ids: Tensor | None, position: int, device: torch.device) -> Tensor | None:
        """Stored coefficients for a batch of n samples, or None if nothing is stored for the block."""
        if self.keying == "sample":
            table = self._samples.get(block)
            if table is None:
                return None
            if ids is None:
                raise ValueError("reuse='sample' needs sample ids: call opt.set_sample_ids(ids) before the forward")
            c, miss = table.get(ids, device)
            self.misses = self.misses.to(device) + miss.sum()
            return c
        table = self._positions.get(block)
        if not table:
            return None
        fill = self._position_mean.get(block)
        if fill is None:  # mean of all finite stored coefficients, cached until the next put
            fill = torch.cat([v.to(device) for v in table.values()]).nanmean()
            self._position_mean[block] = fill
        c = table.get(position)
        if c is not None and c.numel() == n:
            c = c.to(device)
            bad = ~torch.isfinite(c)
            self.misses = self.misses.to(device) + bad.sum()
            return torch.where(bad, fill.to(device), c)
        self.misses = self.misses.to(device) + n
        return fill.to(device).expand(n).clone()

    def export(self, ids: Tensor) -> dict[int, tuple[int, Tensor, Tensor, Tensor]]:
        """What this store holds for sample ``ids`` (reuse="sample"), per block, on the CPU:
        {block: (table size, ids inside the table, their values, whether each is filled)}; for
        :meth:`merge` on another store (distributed workers share what each of them solved)."""
        if self.keying != "sample":
            raise ValueError(f"export needs reuse='sample' (sample ids); this store is keyed by {self.keying!r}")
        ids = ids.detach().cpu().long()
        out = {}
        for block, table in self._samples.items():
            values, filled = table.values.cpu(), table.filled.cpu()
            inside = ids[ids < values.numel()]
            out[block] = (values.numel(), inside, values[inside], filled[inside])
        return out

    def merge(self, parts: list[dict[int, tuple[int, Tensor, Tensor, Tensor]]]) -> None:
        """Apply :meth:`export` results in order: a filled entry replaces what is stored for its id,
        tables grow to the largest size exported (so every store that merges the same parts in the
        same order ends up identical, state_dict included)."""
        if self.keying != "sample":
            raise ValueError(f"merge needs reuse='sample' (sample ids); this store is keyed by {self.keying!r}")
        sizes: dict[int, int] = {}
        for part in parts:
            for block, (size, *_) in part.items():
                sizes[int(block)] = max(sizes.get(int(block), 0), size)
        for block, size in sizes.items():
            table = self._samples.setdefault(block, _SampleTable())
            table._grow(size, table.values.device, exact=True)
        for part in parts:
            for block, (_, ids, values, filled) in part.items():
                table = self._samples[int(block)]
                device = table.values.device
                keep = ids[filled]
                if keep.numel():
                    table.put(keep.to(device), values[filled].to(device=device, dtype=torch.float64))

    def state_dict(self) -> dict:
        return {
            "keying": self.keying,
            "samples": {b: {"values": t.values.cpu(), "filled": t.filled.cpu()} for b, t in self._samples.items()},
            "positions": {b: {p: v.cpu() for p, v in t.items()} for b, t in self._positions.items()},
            "misses": self.misses.cpu(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["keying"] != self.keying:
            raise ValueError(f"stored coefficients are keyed by {state['keying']!r}, this optimizer by {self.keying!r}")
        self._samples = {}
        for b, t in state["samples"].items():
            table = _SampleTable()
            table.values, table.filled = t["values"].clone(), t["filled"].clone()
            self._samples[int(b)] = table
        self._positions = {int(b): {int(p): v.clone() for p, v in t.items()} for b, t in state["positions"].items()}
        self._position_mean = {}
        self.misses = state["misses"].clone()
