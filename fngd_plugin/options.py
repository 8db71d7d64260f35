"""Argument checks shared by the optimizers: each names the option, the bad value and what is allowed,
as a structured :class:`OptionError` that hosts can report in their own words."""

from __future__ import annotations

import math
import os
from typing import Any

from .gram import DAMPING_MODES, NORMALIZE_MODES

COEFFICIENT_MODES = ("network", "layer")
REUSE_MODES = ("position", "sample", "off")
UPDATE_MODES = ("sgd", "adamw")


class OptionError(ValueError):
    """A bad option value, structured for hosts that report it in their own words (fairseq's
    argparse): ``name`` (the keyword argument), ``value``, ``reason`` ("must be > 0.0", "is not
    supported; allowed: ..."). str(): "name=value reason"."""

    def __init__(self, name: str, value: Any, reason: str):
        self.name, self.value, self.reason = name, value, reason
        super().__init__(f"{name}={value!r} {reason}")


class OptionTypeError(OptionError, TypeError):
    """An option value of the wrong type (also a TypeError)."""


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise OptionError(name, value, f"is not supported; allowed: {', '.join(map(repr, allowed))}")


def check_number(name: str, value: Any, *, minimum: float, strict: bool = False, integer: bool = False,
                  optional: bool = False, below: float | None = None) -> None:
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise OptionTypeError(name, value, f"must be {kind}")
    bad = value <= minimum if strict else value < minimum
    if bad or (not integer and not math.isfinite(value)):
        raise OptionError(name, value, f"must be {'>' if strict else '>='} {minimum}")
    if below is not None and value >= below:
        raise OptionError(name, value, f"must be < {below}")


def check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise OptionTypeError(name, value, "must be True or False")


def check_sgd_args(lr: float, momentum: float, weight_decay: float, nesterov: bool) -> None:
    check_number("lr", lr, minimum=0.0)
    check_number("momentum", momentum, minimum=0.0, below=1)
    check_number("weight_decay", weight_decay, minimum=0.0)
    if nesterov and momentum == 0:
        raise OptionError("nesterov", nesterov, "needs momentum > 0")


def check_fngd_args(*, lr: float, momentum: float, weight_decay: float, nesterov: bool, update: str, beta2: float,
                    eps: float, damping: float, damping_mode: str, trace: Any, coefficients: str, reuse: str,
                    normalize: str, collect_epochs: int, steps_per_epoch: int | None, max_update_norm: float | None,
                    refresh_every: int | None, dense_tied_limit: int, keep_per_sample: int, generic_fallback: bool,
                    compact: bool, sketch: int | None) -> None:
    """FNGD's constructor arguments (fngd.FNGD documents them)."""
    check_sgd_args(lr, momentum, weight_decay, nesterov)
    check_choice("update", update, UPDATE_MODES)
    check_number("beta2", beta2, minimum=0.0, below=1)
    check_number("eps", eps, minimum=0.0, strict=True)
    if update == "adamw" and nesterov:
        raise OptionError("nesterov", nesterov, "is for update='sgd' (update='adamw' has no Nesterov variant)")
    check_number("damping", damping, minimum=0.0, strict=True)
    check_choice("damping_mode", damping_mode, DAMPING_MODES)
    if damping_mode == "cosine" and not damping < 1:
        raise OptionError("damping", damping, "is a target cosine with damping_mode='cosine': it must be < 1")
    if trace is not None and not isinstance(trace, (str, os.PathLike)):
        raise OptionTypeError("trace", trace, "must be a file path (str) or None")
    check_choice("coefficients", coefficients, COEFFICIENT_MODES)
    check_choice("reuse", reuse, REUSE_MODES)
    check_choice("normalize", normalize, NORMALIZE_MODES)
    check_number("collect_epochs", collect_epochs, minimum=1, integer=True)
    check_number("steps_per_epoch", steps_per_epoch, minimum=1, integer=True, optional=True)
    check_number("max_update_norm", max_update_norm, minimum=0.0, strict=True, optional=True)
    check_number("refresh_every", refresh_every, minimum=1, integer=True, optional=True)
    check_number("dense_tied_limit", dense_tied_limit, minimum=0, integer=True)
    check_number("keep_per_sample", keep_per_sample, minimum=0, integer=True)
    check_flag("generic_fallback", generic_fallback)
    check_flag("compact", compact)
    check_number("sketch", sketch, minimum=1, integer=True, optional=True)
