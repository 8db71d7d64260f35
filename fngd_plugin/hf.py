"""Hugging Face Transformers: a TrainerCallback for FNGD (and KFAC), and ``prepare``.

    from fngd_plugin import FNGD
    from fngd_plugin.hf import FNGDCallback, prepare

    opt = FNGD(model.parameters(), lr=0.05)
    prepare(opt, model)  # T5-family relative attention bias: declared shared (see below)
    trainer = Trainer(model, args, train_dataset=ds, optimizers=(opt, None), callbacks=[FNGDCallback(opt)])

The callback gives the optimizer the Trainer's epoch boundaries (``set_epoch``, so reuse by
position needs no ``steps_per_epoch``), logs its epoch line through the Trainer's logger at each
epoch end, and adds its counters to the Trainer's logs as ``fngd/...`` (``kfac/...``). This module
imports transformers; the core (fngd_plugin) does not.

``prepare`` declares the modules whose inputs carry no sample dimension, so that FNGD counts them
under the cause 'broadcast' with a clear name instead of 'sample_mismatch': the relative attention
bias tables of T5-family models (called on (query, key) position buckets shared by the whole
batch). Their parameters get the plain gradient in collect steps (every other parameter is exact)
and the exact reweighted gradient in reuse steps with coefficients="network".
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging as hf_logging

from .base import CaptureOptimizer

trainer_logger = hf_logging.get_logger("transformers.trainer")


def prepare(opt: CaptureOptimizer, model: nn.Module) -> list[str]:
    """Declare ``model``'s shared-input modules to ``opt`` (see the module docstring); returns
    their qualified names."""
    if not isinstance(opt, CaptureOptimizer):
        raise TypeError(f"prepare() takes an FNGD or KFAC optimizer, got {type(opt).__name__}")
    shared = []
    for name, module in model.named_modules():
        bias = getattr(module, "relative_attention_bias", None)
        if isinstance(bias, nn.Module):
            opt.set_batch_dim(bias, None)
            shared.append(f"{name}.relative_attention_bias" if name else "relative_attention_bias")
    return shared


def counters(opt: CaptureOptimizer) -> dict[str, float]:
    """The optimizer's counters as flat ``fngd/...`` (``kfac/...``) log entries (syncs the device)."""
    tag = type(opt).__name__.lower()
    s = opt.stats()
    out: dict[str, float] = {f"{tag}/coverage": round(100 * opt.coverage["element_fraction"], 2)}
    steps = s.get("steps")
    if isinstance(steps, dict):  # FNGD
        out.update({f"{tag}/{k}_steps": v for k, v in steps.items()})
        out[f"{tag}/coef_scale_mean"] = s["coef_scale_mean"]
        out[f"{tag}/solve_fallbacks"] = s["solve_fallbacks"]
    else:  # KFAC
        out.update({f"{tag}/{k}": s[k] for k in ("steps", "layers", "factor_updates", "inverse_updates")})
    out[f"{tag}/skipped_steps"] = s.get("skipped_steps", s.get("skipped", 0))
    for cause, count in sorted(s["unpreconditioned"].items()):
        out[f"{tag}/unpreconditioned/{cause}"] = count
    return out


class FNGDCallback(TrainerCallback):
    """Epoch boundaries, the epoch line and the counters of an FNGD or KFAC optimizer in a
    Hugging Face ``Trainer`` (see the module docstring)."""

    def __init__(self, opt: CaptureOptimizer):
        if not isinstance(opt, CaptureOptimizer):
            raise TypeError(f"FNGDCallback takes an FNGD or KFAC optimizer, got {type(opt).__name__}")
        self.opt = opt

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        set_epoch = getattr(self.opt, "set_epoch", None)
        if set_epoch is not None:
            # state.epoch is the fractional epoch reached so far: a whole number at an epoch start
            set_epoch(int(math.floor((state.epoch or 0.0) + 1e-6)))

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer_logger.info(self.opt.epoch_line())
        self.opt.log_epoch()  # the optimizer's own logger, once (and its warnings)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs is None:
            return
        extra = counters(self.opt)
        logs.update(extra)
        # the Trainer stored its copy of these logs before calling the callbacks
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
