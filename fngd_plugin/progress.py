"""Where FNGD is and what it has done: the epoch and phase of the next batch (with the hosts' ways
of telling it: ``set_epoch``, ``begin_epoch``, ``set_sample_ids``, ``ignore_next_batch``), the step
counts by phase, the per-epoch line, ``stats()``, and the checkpoint state.

:class:`Progress` is a mixin of :class:`~fngd_plugin.fngd.FNGD`; it reads the optimizer's
``schedule`` (``schedule.py``), ``store``, ``_counters`` and capture. The step itself is in fngd.py.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .capture import MicroBatch
from .diagnostics import DIRECTION_STATS, direction_stats, write_trace
from .gram import damping_shift, normalize_coefficients, solve_shifted
from .samplers import PerSampleGrads
from .schedule import EpochSchedule
from .store import CoefficientStore

logger = logging.getLogger("fngd_plugin")


class Progress:
    """FNGD's schedule position, step counts, statistics and checkpoint state."""

    schedule: EpochSchedule
    store: CoefficientStore | None
    step_counts: Counter[str]
    _epoch_start_counts: Counter[str]
    _counters: dict[str, Tensor]
    _capture: Any
    _next_ids: Tensor | None
    _ignore_next: bool
    _logged_epoch: int
    _misses_warned: int
    damping_by_epoch: dict[int, float]
    _epoch_start_direction: dict[str, float]

    def set_sample_ids(self, ids: Tensor | Iterable[int]) -> None:
        """Ids of the samples in the next forward's batch (reuse="sample"; also detects epochs)."""
        ids = torch.as_tensor(ids)
        if ids.dim() != 1 or ids.dtype in (torch.bool,) or ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"sample ids must be a 1-D integer tensor, got dtype={ids.dtype} shape={tuple(ids.shape)}")
        if ids.numel() and int(ids.min()) < 0:
            raise ValueError(f"sample ids must be >= 0, got min {int(ids.min())}")
        self._next_ids = ids.long()

    def ignore_next_batch(self) -> None:
        """The host discards the next forward's gradient (fairseq's dummy batches: the short shard
        of an uneven epoch in distributed training, OOM recovery). It solves nothing, stores
        nothing and moves no position or epoch; when its phase captures, it is captured anyway and
        contributes zero, so that this worker still joins the step's all-reduces."""
        self._ignore_next = True

    def set_epoch(self, epoch: int) -> None:
        """Tell FNGD that epoch ``epoch`` (0-based) starts now. Resets the batch position to 0."""
        self.schedule.set_epoch(epoch)

    def begin_epoch(self) -> None:
        """Tell FNGD that a new epoch starts now (hosts that know epochs but not their index).

        Nothing moves if no batch has run since the last epoch start (the first epoch, a resume)."""
        self.schedule.begin_epoch()

    # the schedule's settings, as the constructor took them
    collect_epochs = property(lambda self: self.schedule.collect_epochs)
    steps_per_epoch = property(lambda self: self.schedule.steps_per_epoch)
    refresh_every = property(lambda self: self.schedule.refresh_every)

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to (as far as FNGD can tell)."""
        return self.schedule.epoch

    @property
    def in_collect_phase(self) -> bool:
        """Whether the next batch solves for coefficients (a collect step)."""
        return self._solves(self.schedule.epoch)

    def _solves(self, epoch: int) -> bool:
        return self.schedule.solves(epoch, self.store is None or self.store.empty)

    def stats(self) -> dict:
        """Counters as Python numbers (this syncs with the device)."""
        c = {k: float(v) for k, v in self._counters.items()}
        steps = max(c["collect_steps"], 1.0)
        return {
            "epoch": self.schedule.current,
            "position": self.schedule.position,
            "phase": "collect" if self.in_collect_phase else "reuse",
            "collect_steps": int(c["collect_steps"]),
            "solve_fallbacks": int(c["fallbacks"]),
            "skipped_steps": int(c["skipped"]),
            "tied_approximations": int(c["tied_approx"]),
            "coef_scale_mean": c["nc_sum"] / steps,
            "coef_scale_min": c["nc_min"],
            "coef_scale_max": c["nc_max"],
            "coef_spread_mean": c["spread_sum"] / steps,
            # what the collect steps' directions did (diagnostics.py), means over solves: the share
            # of samples whose loss rose to first order along the step, the cosine with the mean
            # gradient, the first-order decrease per unit lr relative to SGD's, the effective sample
            # size of c (share of n), and the damping chosen in relative-mode units
            "ascent_share": c["ascent_sum"] / steps,
            "direction_cosine": c["cosine_sum"] / steps,
            "decrease_vs_sgd": c["decrease_sum"] / steps,
            "coef_ess_share": c["ess_sum"] / steps,
            "damping_relative": c["damping_sum"] / steps,
            "damping_by_epoch": dict(self.damping_by_epoch),
            "stored": 0 if self.store is None else len(self.store),
            "store_misses": 0 if self.store is None else int(self.store.misses),
            "root_mismatches": self._capture.root_mismatch,
            "steps": {k: self.step_counts[k] for k in ("collect", "collect_solved", "reuse", "reuse_weighted")},
            "unpreconditioned": dict(self.unpreconditioned),
            "unpreconditioned_modules": {k: sorted(v) for k, v in self.unpreconditioned_modules.items()},
            "discarded_batches": self.discarded_batches,
        }

    def epoch_line(self) -> str:
        """What FNGD did in the current epoch so far: steps solved of steps in collect, reuse steps
        reweighted, steps by cause that it could not precondition (the hosts log it per epoch)."""
        d = self.step_counts - self._epoch_start_counts
        causes = ", ".join(f"{k} {v}" for k, v in sorted(self.unpreconditioned.items())) or "none"
        misses = 0 if self.store is None else int(self.store.misses)
        line = (f"FNGD epoch {self.schedule.current}: {d['collect_solved']}/{d['collect']} collect steps solved, "
                f"{d['reuse_weighted']}/{d['reuse']} reuse steps reweighted; reuse misses (samples) {misses}; "
                f"not preconditioned (all epochs): {causes}; batches discarded by the host: "
                f"{self.discarded_batches}")
        e = self._epoch_direction()
        if e is not None:
            line += (f"; solves {e['solves']:.0f}: damping (relative units) {e['damping']:.3g}, direction cosine "
                     f"with the mean gradient {e['cosine']:.3f}, decrease vs SGD {e['decrease']:.3g}, samples "
                     f"ascending {100 * e['ascent']:.1f}%, coefficient ESS {100 * e['ess']:.1f}% of n")
        return line

    def _direction_totals(self) -> dict[str, float]:
        """The solve count and the direction statistics' sums so far (synced): epoch means are differences."""
        return {k: float(self._counters[k]) for k in ["collect_steps", *(f"{k}_sum" for k in DIRECTION_STATS)]}

    def _epoch_direction(self) -> dict[str, float] | None:
        """Means of the direction statistics over this epoch's solves (None: it solved nothing)."""
        now = self._direction_totals()
        start = self._epoch_start_direction
        solves = now["collect_steps"] - start.get("collect_steps", 0.0)
        if solves <= 0:
            return None
        return {"solves": solves, **{k: (now[f"{k}_sum"] - start.get(f"{k}_sum", 0.0)) / solves
                                     for k in DIRECTION_STATS}}

    def _note_step(self, taken: list[MicroBatch], cause: str | None) -> None:
        collect = any(mb.collect for mb in taken) if taken else self.in_collect_phase
        phase = "collect" if collect else "reuse"
        self.step_counts[phase] += 1
        for mb in taken:
            if mb.reweight is not None and not mb.root_scaled and not mb.dummy:
                self._unengaged("root_mismatch")
        engaged = self._engaged or any(mb.root_scaled for mb in taken)
        if engaged:
            self.step_counts[f"{phase}_{'solved' if collect else 'weighted'}"] += 1

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["fngd"] = {
            **self.schedule.state_dict(),
            "counters": {k: v.detach().cpu().clone() for k, v in self._counters.items()},
            "store": None if self.store is None else self.store.state_dict(),
            "checked_capture": self._checked_capture,
            "step_counts": dict(self.step_counts),
            "epoch_start_counts": dict(self._epoch_start_counts),
            "unpreconditioned": dict(self.unpreconditioned),
            "discarded_batches": self.discarded_batches,
            "damping_by_epoch": dict(self.damping_by_epoch),
            "epoch_start_direction": dict(self._epoch_start_direction),
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        extra = state_dict.get("fngd")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "fngd"})
        if extra is None:
            return
        self.schedule.load_state_dict(extra)
        # counters added since a checkpoint was written start at zero
        self._counters = {**self._counters, **{k: v.clone() for k, v in extra["counters"].items()}}
        self._checked_capture = bool(extra["checked_capture"])
        self.step_counts = Counter(extra.get("step_counts", {}))
        self._epoch_start_counts = Counter(extra.get("epoch_start_counts", {}))
        self.unpreconditioned = Counter(extra.get("unpreconditioned", {}))
        self.discarded_batches = int(extra.get("discarded_batches", 0))
        self.damping_by_epoch = {int(k): float(v) for k, v in extra.get("damping_by_epoch", {}).items()}
        self._epoch_start_direction = dict(extra.get("epoch_start_direction", {}))
        if self.store is not None and extra["store"] is not None:
            self.store.load_state_dict(extra["store"])

    # ------------------------------------------------------------------ epochs
    def log_epoch(self) -> None:
        """Log :meth:`epoch_line` for the current epoch, once (hosts call it when an epoch ends;
        FNGD calls it itself when the next one starts). Nothing before the epoch's first batch
        (fairseq calls its end-of-epoch hook once when it loads a checkpoint, too)."""
        if self._logged_epoch != self.schedule.current and self.schedule.position > 0:
            self._logged_epoch = self.schedule.current
            logger.info(self.epoch_line())
            misses = 0 if self.store is None else int(self.store.misses)
            if misses > self._misses_warned:
                self._misses_warned = misses
                self._warn_once("misses", f"FNGD: {misses} samples in reuse steps found no stored coefficient of "
                                "their own and got the mean stored one (ids or positions never collected, e.g. "
                                "an update the host skipped, or batches of another size at that position)")

    def _end_epoch(self, epoch: int) -> None:
        self.log_epoch()
        e = self._epoch_direction()
        if e is not None:
            self.damping_by_epoch[epoch] = e["damping"]
        self._epoch_start_counts = Counter(self.step_counts)
        self._epoch_start_direction = self._direction_totals()
        if not self.schedule.is_collect(epoch):
            return
        s = self.stats()
        logger.info(
            "FNGD: collect epoch %d done: %d solves, coefficient scale n*c mean %.3g (min %.3g, max %.3g), "
            "spread std(c)/mean(c) %.3g, samples ascending %.1f%%, direction cosine %.3f, %d solve fallbacks, "
            "%d skipped steps, %d coefficients stored",
            epoch, s["collect_steps"], s["coef_scale_mean"], s["coef_scale_min"], s["coef_scale_max"],
            s["coef_spread_mean"], 100 * s["ascent_share"], s["direction_cosine"],
            s["solve_fallbacks"], s["skipped_steps"], s["stored"],
        )
        if s["solve_fallbacks"]:
            self._warn_once("fallback", f"FNGD: {s['solve_fallbacks']} Cholesky solves failed and fell back to "
                            "a diagonal solve; consider a larger damping")

    def _note_solve(self, c: Tensor, fell_back: Tensor, share: float, direction: dict[str, Tensor]) -> None:
        """Statistics of one solve's coefficients (``share``: its weight in the step's mean;
        ``direction``: diagnostics.direction_stats of the solve)."""
        self._add("fallbacks", fell_back.to(torch.float64))
        # n * mean(c) is 1/lambda-like (large = weak damping); std(c)/mean(c) is how far the
        # weighting is from plain averaging
        nc = c.shape[0] * c.mean()
        finite = torch.isfinite(nc)
        self._add("nc_sum", torch.where(finite, nc, 0.0) * share)
        self._add("spread_sum", torch.where(finite, c.std() / c.mean(), 0.0) * share)
        for k, v in direction.items():
            self._add(f"{k}_sum", torch.where(torch.isfinite(v), v, 0.0) * share)
        lo, hi = self._counters["nc_min"].to(c.device), self._counters["nc_max"].to(c.device)
        self._counters["nc_min"] = torch.where(finite, torch.minimum(lo, nc), lo)
        self._counters["nc_max"] = torch.where(finite, torch.maximum(hi, nc), hi)

    # ------------------------------------------------------------------ the solve, and what it records
    def _solve(self, K: Tensor, unit: Tensor, mb: MicroBatch, key: int, share: float) -> Tensor:
        """Coefficients in true units for a raw Gram; statistics and the store are updated here."""
        with torch.profiler.record_function("fngd.solve"):
            K = K.to(torch.float64) * unit
            shift = damping_shift(K, self.damping, self.damping_mode)
            c, fell_back = solve_shifted(K, shift)
        with torch.profiler.record_function("fngd.diagnostics"):
            stats = direction_stats(K, shift, c, self.normalize)
        self._note_solve(c, fell_back, share, stats)
        if self.trace is not None:
            line = {"collect_step": int(self.step_counts["collect"]), "epoch": mb.epoch, "position": mb.position,
                    "damping_mode": self.damping_mode}
            write_trace(self.trace, line, K, shift, c, stats, self._block_grams or [])
        c = normalize_coefficients(c, self.normalize)
        if self.store is not None:  # non-finite coefficients are masked inside the store
            self.store.put(key, c, ids=mb.ids, position=mb.position)
        return c

    def _rep_name(self, r: PerSampleGrads) -> str:
        return self._module_name(r.owner) if isinstance(r.owner, nn.Module) else r.label
