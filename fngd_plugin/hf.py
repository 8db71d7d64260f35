"""Hugging Face Transformers: a TrainerCallback for FNGD (and KFAC), and ``prepare``.

    from fngd_plugin import FNGD
    from fngd_plugin.hf import FNGDCallback, prepare

    opt = FNGD(model.parameters(), lr=0.05)
    prepare(opt, model)  # T5-family relative attention bias (see below); nothing to do elsewhere
    trainer = Trainer(model, args, train_dataset=ds, optimizers=(opt, None), callbacks=[FNGDCallback(opt)])

The callback gives the optimizer the Trainer's epoch boundaries (``set_epoch``, so reuse by
position needs no ``steps_per_epoch``), logs its epoch line through the Trainer's logger at each
epoch end, and adds its counters to the Trainer's logs as ``fngd/...`` (``kfac/...``). This module
imports transformers; the core (fngd_plugin) does not.

``prepare`` hands FNGD what it cannot see by itself: the relative attention bias tables of
T5-family models are called on (query, key) position buckets shared by the whole batch, and
their (q, k, heads) output reaches the per-sample scores only after T5Attention permutes it to
(1, heads, q, k) and every layer adds it. ``prepare`` makes each attention module hand the model
that bias expanded to the batch (the same values), so the tables' per-sample gradients are read
from the gradient of the bias: exact, like every other parameter. With ``exact=False`` the tables
are declared shared instead (plain gradient in collect steps, counted under 'broadcast'; the exact
reweighted gradient in reuse steps with coefficients="network").
"""

from __future__ import annotations

import math
import weakref
from typing import Any

from torch import Tensor, nn
from transformers import TrainerCallback
from transformers.utils import logging as hf_logging

from .base import CaptureOptimizer

trainer_logger = hf_logging.get_logger("transformers.trainer")


def prepare(opt: CaptureOptimizer, model: nn.Module, exact: bool = True) -> dict[str, list[str]]:
    """Hand ``opt`` what it cannot see by itself in ``model``: T5-family relative attention bias
    tables (see the module docstring). Returns {"exact": [...], "shared": [...]}, their names.

    ``exact=True``: each attention module's ``compute_bias`` hands the model its (1, heads, q, k)
    bias expanded to the batch (the same values), so the table's per-sample gradients are read from
    the gradient of that bias (SampleAlignment.broadcast_output in broadcast.py, which checks that the bias is the
    table's output permuted; where it is not, the table is counted as 'sample_mismatch').
    ``exact=False`` (or no ``compute_bias``): the tables are declared shared, plain gradient in
    collect steps, counted as 'broadcast'."""
    if not isinstance(opt, CaptureOptimizer):
        raise TypeError(f"prepare() takes an FNGD or KFAC optimizer, got {type(opt).__name__}")
    done: dict[str, list[str]] = {"exact": [], "shared": []}
    capture = weakref.ref(opt._capture)
    for name, module in model.named_modules():
        table = getattr(module, "relative_attention_bias", None)
        if not isinstance(table, nn.Module):
            continue
        label = f"{name}.relative_attention_bias" if name else "relative_attention_bias"
        compute_bias = getattr(module, "compute_bias", None)
        if exact and callable(compute_bias):
            if not getattr(compute_bias, "_fngd_exact", False):
                module.compute_bias = _exact_bias(capture, compute_bias, table)
            done["exact"].append(label)
        else:
            opt.set_batch_dim(table, None)
            done["shared"].append(label)
    return done


def _heads_last(g: Tensor) -> Tensor:
    """(n, heads, q, k) per-sample gradients of T5's bias -> (n, q, k, heads), the table's output's."""
    return g.permute(0, 2, 3, 1)


def _exact_bias(capture: Any, compute_bias: Any, table: nn.Module) -> Any:
    def exact_compute_bias(*args: Any, **kwargs: Any) -> Any:
        bias = compute_bias(*args, **kwargs)
        cap = capture()
        if cap is None or not isinstance(bias, Tensor) or bias.dim() != 4:
            return bias
        return cap.broadcast_output(table, bias, _heads_last)

    exact_compute_bias._fngd_exact = True  # type: ignore[attr-defined]
    return exact_compute_bias


def counters(opt: CaptureOptimizer) -> dict[str, float]:
    """The optimizer's counters as flat ``fngd/...`` (``kfac/...``) log entries (syncs the device)."""
    tag = type(opt).__name__.lower()
    s = opt.stats()
    out: dict[str, float] = {f"{tag}/coverage": round(100 * opt.coverage["element_fraction"], 2)}
    steps = s.get("steps")
    if isinstance(steps, dict):  # FNGD
        out.update({f"{tag}/{k}_steps": v for k, v in steps.items()})
        out[f"{tag}/coef_scale_mean"] = s["coef_scale_mean"]
        for k in ("ascent_share", "direction_cosine", "decrease_vs_sgd", "coef_ess_share", "damping_relative"):
            out[f"{tag}/{k}"] = s[k]
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
