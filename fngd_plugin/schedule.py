"""FNGD's epoch schedule: which epoch and batch position the next batch has, and whether it solves.

FNGD solves for coefficients in its collect epochs (the first ``collect_epochs``, then one epoch
every ``refresh_every``) and reuses them afterwards, keyed by sample id or by batch position
within the epoch. Hosts know epochs in different ways, and the schedule follows each:

* ``set_epoch(e)``: the host says which epoch starts (timm's loader, fairseq's Trainer);
* ``begin_epoch()``: the host says that one starts, not which (Lightning hooks, plain loops);
* ``steps_per_epoch``: the schedule counts batches itself;
* sample ids (``reuse="sample"``): in a collect epoch a repeated id means a new epoch.

This class holds only that bookkeeping (its own ``state_dict``); what happens at an epoch's end
(logging, warnings) is the optimizer's ``on_epoch_end``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .options import check_number
from .store import grown


class EpochSchedule:
    """Args: ``reuse`` ("position", "sample", "off"), ``collect_epochs``, ``steps_per_epoch``
    (optional), ``refresh_every`` (optional), ``on_epoch_end(epoch)`` (called once per finished
    epoch, before the next starts) and ``warn(key, message)`` (a once-per-key warning)."""

    def __init__(self, reuse: str, collect_epochs: int, steps_per_epoch: int | None, refresh_every: int | None,
                 on_epoch_end: Callable[[int], None], warn: Callable[[str, str], None]):
        self.reuse = reuse
        self.collect_epochs = collect_epochs
        self.steps_per_epoch = steps_per_epoch
        self.refresh_every = refresh_every
        self._on_epoch_end = on_epoch_end
        self._warn = warn
        self.current = 0  # the epoch of the last batch (0 before any)
        self.position = 0  # batches of the current epoch so far
        self.signalled = False  # the host has signalled an epoch start
        self.since_signal = 0  # batches since the host last signalled one
        self.seen_ids = torch.zeros(0, dtype=torch.bool)  # ids of the current collect epoch (epoch detection)

    # ------------------------------------------------------------------ queries
    def is_collect(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` is a collect epoch by the schedule alone."""
        if self.reuse == "off" or epoch < self.collect_epochs:
            return True
        return self.refresh_every is not None and epoch % self.refresh_every == 0

    def solves(self, epoch: int, store_empty: bool) -> bool:
        """Whether a batch of ``epoch`` solves: a collect epoch, or nothing stored to reuse."""
        return self.is_collect(epoch) or store_empty

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to (as far as the schedule can tell)."""
        if self.steps_per_epoch is not None and self.position >= self.steps_per_epoch:
            return self.current + 1
        return self.current

    # ------------------------------------------------------------------ host signals
    def set_epoch(self, epoch: int) -> None:
        check_number("epoch", epoch, minimum=0, integer=True)
        self._check_length()
        if epoch != self.current:
            self._on_epoch_end(self.current)
        self._start(epoch)

    def begin_epoch(self) -> None:
        if self.position == 0:  # nothing ran since the last start (the first epoch, a resume)
            self.signalled = True
            return
        self._check_length()
        self._on_epoch_end(self.current)
        self._start(self.current + 1)

    # ------------------------------------------------------------------ batches
    def next_batch(self, ids: Tensor | None) -> tuple[int, int]:
        """Place the next batch: (position within its epoch, epoch). Moves to a new epoch first
        when the counted length is reached or a collect epoch sees an id again."""
        if self.reuse == "sample" and ids is None:
            raise ValueError("FNGD(reuse='sample') needs the batch's sample ids: call opt.set_sample_ids(ids) "
                             "before each forward, or use reuse='position'")
        if self.reuse == "position" and self.steps_per_epoch is None and not self.signalled:
            raise ValueError("FNGD(reuse='position') needs steps_per_epoch=<batches per epoch> (or opt.set_epoch(e) "
                             "at each epoch start); alternatively reuse='sample' with sample ids or reuse='off'")
        if self._new_epoch(ids):
            self._on_epoch_end(self.current)
            self.current += 1
            self.position = 0
            if ids is not None and self.seen_ids.numel():
                self.seen_ids.zero_()
                self.seen_ids[ids.cpu()] = True
        placed = (self.position, self.current)
        self.position += 1
        self.since_signal += 1
        return placed

    def _new_epoch(self, ids: Tensor | None) -> bool:
        if self.steps_per_epoch is not None:
            return self.position >= self.steps_per_epoch
        if ids is None or self.reuse != "sample" or not self.is_collect(self.current) or not ids.numel():
            return False
        ids_cpu = ids.cpu()
        self.seen_ids = grown(self.seen_ids, int(ids_cpu.max()) + 1)
        if bool(self.seen_ids[ids_cpu].any()):
            return True
        self.seen_ids[ids_cpu] = True
        return False

    def _start(self, epoch: int) -> None:
        self.current = epoch
        self.position = 0
        self.since_signal = 0
        self.signalled = True
        self.seen_ids.zero_()

    def _check_length(self) -> None:
        if self.steps_per_epoch is not None and self.signalled and self.since_signal \
                and self.since_signal != self.steps_per_epoch:
            self._warn("epoch_length", f"FNGD: an epoch had {self.since_signal} batches but steps_per_epoch="
                       f"{self.steps_per_epoch}; coefficients keyed by position were misaligned: pass "
                       f"steps_per_epoch={self.since_signal} (or leave it out when the host signals epochs)")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"epoch": self.current, "position": self.position, "epoch_signalled": self.signalled,
                "since_signal": self.since_signal, "steps_per_epoch": self.steps_per_epoch,
                "seen_ids": self.seen_ids.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.current = int(state["epoch"])
        self.position = int(state["position"])
        self.signalled = bool(state["epoch_signalled"])
        self.since_signal = int(state["since_signal"])
        if self.steps_per_epoch is None:
            self.steps_per_epoch = state["steps_per_epoch"]
        self.seen_ids = state["seen_ids"].clone()
