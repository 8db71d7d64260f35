"""Where the exactness and loop-shape tests run the optimizer: FNGD_TEST_DEVICE and FNGD_TEST_AUTOCAST.

    FNGD_TEST_DEVICE=cuda pytest tests/test_exactness.py tests/test_loops.py          # CUDA, float64
    FNGD_TEST_DEVICE=cuda FNGD_TEST_AUTOCAST=bf16 pytest ...                           # CUDA, bf16 autocast

Unset, both are today's CPU float64 tests. `make gpu-check` (benchmarks/gpu_check.py) runs both.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass

import pytest
import torch

AUTOCASTS = {"bf16": torch.bfloat16}


@dataclass(frozen=True)
class Target:
    """Where the exactness and loop-shape tests run the code under test (the oracle always runs on
    the CPU in float64). Chosen by FNGD_TEST_DEVICE (default cpu) and FNGD_TEST_AUTOCAST (bf16 or
    unset); the defaults are the plain CPU float64 tests."""

    device: torch.device
    autocast: str | None

    @property
    def dtype(self) -> torch.dtype:
        # autocast leaves float64 tensors alone, so bf16 runs need float32 models
        return torch.float32 if self.autocast else torch.float64

    @property
    def tol(self) -> float:
        """Relative error allowed against the float64 oracle. bf16 keeps about 3 significant digits
        in every autocast product, and the solve and the later (reuse) steps carry that on: on the
        CPU these tests measured up to 6e-3 (collect steps) and 1.1e-2 (reuse steps, test_loops);
        a wrong direction (SGD's, a missing layer, a bf16 Gram gone astray) is off by O(1)."""
        return 5e-2 if self.autocast else 1e-8

    @property
    def same_tol(self) -> float:
        """Two runs of the same computation (loop shapes that must not change the result): bitwise
        on the CPU in float64; a GPU's kernels may sum in another order from run to run."""
        if self.autocast:
            return 1e-5
        return 0.0 if self.device.type == "cpu" else 1e-10

    def model(self, m: torch.nn.Module) -> torch.nn.Module:
        return m.to(self.device, self.dtype)

    def put(self, *ts: torch.Tensor):
        out = tuple(t.to(self.device, self.dtype) if t.is_floating_point() else t.to(self.device) for t in ts)
        return out if len(out) > 1 else out[0]

    def run(self):
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCASTS[self.autocast])

    @staticmethod
    def host(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float64)

    @staticmethod
    def reference(m: torch.nn.Module) -> torch.nn.Module:
        """A CPU float64 copy of the model for the torch.func oracle."""
        return copy.deepcopy(m).to("cpu", torch.float64)


def target_from_env() -> Target:
    dev = os.environ.get("FNGD_TEST_DEVICE", "cpu") or "cpu"
    ac = os.environ.get("FNGD_TEST_AUTOCAST", "") or None
    if ac is not None and ac not in AUTOCASTS:
        raise pytest.UsageError(f"FNGD_TEST_AUTOCAST={ac!r}: allowed are {sorted(AUTOCASTS)} or unset")
    try:
        device = torch.device(dev)
    except RuntimeError as e:
        raise pytest.UsageError(f"FNGD_TEST_DEVICE={dev!r} is not a torch device (e.g. cpu, cuda, cuda:1): {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"FNGD_TEST_DEVICE={dev!r} but torch.cuda.is_available() is False")
    return Target(device, ac)
