"""Argument checks shared by the optimizers: each names the option, the bad value and what is allowed,
as a structured :class:`OptionError` that hosts can report in their own words."""

from __future__ import annotations

import math
from typing import Any


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
