"""FNGD: Fast Natural Gradient Descent (Ou, Zhu, Huang, Liu, arXiv:2403.03473, 2024).

Damped natural gradient descent written as a weighted sum of per-sample gradients
(``gram.py``); the weights are solved during a collect phase (the first epoch by default) and
reused afterwards, so later steps cost about one ordinary backward.

Protocol: ``opt.zero_grad(); loss.backward(); opt.step()``. The optimizer finds the modules that
own its parameters by itself (``capture.py``); nothing else is required of the user.

Definitions (pinned; the tests check them against brute force)
  * g_i is the gradient of sample i's own loss, scaled so that the host's gradient (whatever
    ``loss.backward()`` and the host's own post-processing -- loss scaling, accumulation,
    ``multiply_grads`` -- leave in ``p.grad``) is their mean gbar. FNGD measures that scale on
    each step from what its hooks saw, so AMP loss scales, accumulation and ``multiply_grads``
    never change the step. The host gradient itself sets the units: a sum-reduced loss has n
    times a mean-reduced one's gradient, and FNGD follows it as SGD would (the default relative
    damping with ``normalize="sum"`` is scale-free; an absolute damping is in those units --
    tests/test_asdl.py pins both against ASDL).
  * F = (1/n) sum_i g_i g_i^T over the covered parameters; ``coefficients="network"``: one F over
    all covered parameters; ``"layer"``: block-diagonal, one block per owning module (its weight
    and bias together; modules sharing a parameter form one block).
  * A collect step replaces each covered gradient by (F + lambda I)^-1 gbar = sum_i c_i g_i; with
    ``damping_mode="absolute"``, ``normalize="none"``, lr=1, momentum=0, weight_decay=0 one step
    changes the parameters by exactly -(F + damping I)^-1 gbar.
  * With gradient accumulation every micro-batch gets its own coefficients; the micro-batch
    directions are averaged with weights n_m / N (the host's own mean).

Uncovered parameters (no sampler for their module, or owned by no module) keep the host's
gradient scaled by the total coefficient weight sum_i c_i of the step (1 with
``normalize="sum"``); in network-reuse steps they get the weighted gradient sum_i c_i g_i like
everything else, because the weighting is applied at the model output.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .base import CaptureOptimizer
from .capture import MicroBatch
from .diagnostics import DIRECTION_STATS
from .distributed import all_reduce_mean
from .gram import (
    add_weighted,
    block_gram,
)
from .options import check_fngd_args
from .progress import Progress
from .samplers import PerSampleGrads, override_base, post_reason, unsupported_reason
from .schedule import EpochSchedule
from .store import CoefficientStore

logger = logging.getLogger("fngd_plugin")

NETWORK_BLOCK = -1


def _label(reps: list[PerSampleGrads]) -> str:
    """A block's name in profiler traces: its module types ("Embedding+Linear" for a tied table)."""
    return "+".join(sorted({r.label for r in reps}))


def _weighted(reps: list[PerSampleGrads], w: Tensor, out: dict[int, tuple[Tensor, Tensor]]) -> None:
    with torch.profiler.record_function(f"fngd.weighted.{_label(reps)}"):
        add_weighted(reps, w, out)


class FNGD(Progress, CaptureOptimizer):
    """Fast Natural Gradient Descent.

    Args:
        params: parameters or param groups (as timm and fairseq build optimizers).
        lr: learning rate (>= 0).
        momentum: heavy-ball momentum on the FNGD direction, in [0, 1) (with ``update="adamw"``:
            AdamW's beta1, the decay of the first moment).
        weight_decay: L2 weight decay added to the FNGD direction (>= 0); with ``update="adamw"``
            decoupled, as in AdamW (p *= 1 - lr * weight_decay).
        nesterov: Nesterov momentum (needs momentum > 0; update="sgd" only).
        update: what is applied to the FNGD direction: "sgd" (momentum SGD, the paper's) or
            "adamw" (beyond the paper: the direction is AdamW's gradient input, with beta1 =
            ``momentum``, ``beta2`` and ``eps``; the same arithmetic as torch.optim.AdamW).
        beta2, eps: AdamW's second-moment decay in [0, 1) and denominator epsilon > 0 (update="adamw").
        damping: lambda > 0, read by ``damping_mode`` ("cosine": a target cosine in (0, 1)).
        damping_mode: "relative" (n lambda = damping * trace(K) / n), "absolute", "top" (n lambda =
            damping * lambda_max(K)) or "cosine" (per solve, the smallest n lambda at which the
            direction's cosine with the mean gradient reaches ``damping``); gram.py derives them.
        trace: optional path of a JSON-lines file, one line per solve (diagnostics.py; syncs).
        coefficients: "network" (one coefficient vector for all covered layers: exact damped NGD
            with the empirical Fisher of all covered parameters; reuse costs one ordinary
            backward) or "layer" (one per owning module: block-diagonal Fisher).
        reuse: "position" (coefficients stored per batch index within the epoch), "sample"
            (stored per sample id, see ``set_sample_ids``) or "off" (solve every step).
        collect_epochs: number of epochs that solve (>= 1).
        steps_per_epoch: batches (forward/backward passes) per epoch. Needed by reuse="position"
            unless the host calls ``set_epoch`` at each epoch start or gives sample ids.
        normalize: "none" (exact NGD step) or "sum" (coefficients of each batch scaled to sum to
            1: NGD's relative weighting of samples at SGD's scale, so lr means what it means for
            SGD).
        max_update_norm: optional clip of the global norm of the direction before momentum.
        refresh_every: optional; every this many epochs after the collect phase, solve again for
            one epoch (fresh coefficients for a changed geometry).
        dense_tied_limit: parameters shared between modules get an exact Gram (cross terms): cheaply
            for embeddings sharing a table with each other and with one output projection, else by
            materialising when n * their size is at most this many elements; above it, cross terms
            are dropped (reported once).
        keep_per_sample: with coefficients="network", per-sample gradients materialised for the
            Gram are kept (up to this many elements) so the weighted sum needs no second pass.
        sketch: optional k: Linear layers whose exact Gram costs more than a k x k random sketch
            of each per-sample gradient (vocabulary-sized projections over many tokens) get the
            sketch's unbiased Gram instead (``gram.py``); None (default): every Gram exact.
        compact: compute a layer's per-sample gradients during the backward, as soon as its output
            gradient arrives, where they are smaller than the input and output gradient they are
            computed from (norm layers; convolutions over many positions), and drop those: the
            collect step's peak memory falls by about that much, with the same numbers. False keeps
            every layer's input and output gradient until the step (needed only to run two
            backward passes through one forward before a step).
        generic_fallback: cover a module that owns parameters but has no registered sampler (and is
            not a subclass recognised as its parent's math) with exact torch.func per-sample
            gradients of its own parameters (``generic.py``); False leaves such modules to the
            plain gradient.
    """

    counter_names = ("collect_steps", "fallbacks", "skipped", "nc_sum", "nc_min", "nc_max", "spread_sum",
                     "tied_approx", *(f"{k}_sum" for k in DIRECTION_STATS))

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        damping: float = 1.0,
        damping_mode: str = "relative",
        coefficients: str = "network",
        reuse: str = "position",
        collect_epochs: int = 1,
        steps_per_epoch: int | None = None,
        normalize: str = "sum",
        max_update_norm: float | None = None,
        refresh_every: int | None = None,
        dense_tied_limit: int = 2**26,
        keep_per_sample: int = 2**26,
        generic_fallback: bool = True,
        sketch: int | None = None,
        compact: bool = True,
        update: str = "sgd",
        beta2: float = 0.999,
        eps: float = 1e-8,
        trace: str | None = None,
    ):
        check_fngd_args(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, update=update,
                        beta2=beta2, eps=eps, damping=damping, damping_mode=damping_mode, trace=trace,
                        coefficients=coefficients, reuse=reuse, normalize=normalize, collect_epochs=collect_epochs,
                        steps_per_epoch=steps_per_epoch, max_update_norm=max_update_norm,
                        refresh_every=refresh_every, dense_tied_limit=dense_tied_limit,
                        keep_per_sample=keep_per_sample, generic_fallback=generic_fallback, compact=compact,
                        sketch=sketch)
        self.generic_fallback = generic_fallback  # read by the coverage report in super().__init__
        self.compact = compact  # and this by the capture it builds
        self.sketch = sketch
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, update=update,
                        beta2=beta2, eps=eps)
        super().__init__(params, defaults)

        self.damping = float(damping)
        self.damping_mode = damping_mode
        self.coefficients = coefficients
        self.reuse = reuse
        self.normalize = normalize
        self.max_update_norm = max_update_norm
        self.dense_tied_limit = dense_tied_limit
        self.keep_per_sample = keep_per_sample
        self._solves_in_step = 0  # Grams drawn in the current step (seeds of their sketches)
        self.trace = None if trace is None else os.fspath(trace)
        self._block_grams: list[tuple[str, Tensor]] | None = None  # per-module Grams of a traced solve

        self.store = CoefficientStore(reuse) if reuse != "off" else None
        # host-side step counts: collect / collect_solved / reuse / reuse_weighted, in total and
        # since the current epoch started (the per-epoch line)
        self.step_counts: Counter[str] = Counter()
        self._epoch_start_counts: Counter[str] = Counter()
        self._logged_epoch = -1
        self._misses_warned = 0
        self.damping_by_epoch: dict[int, float] = {}  # collect epoch -> mean damping (relative units) chosen
        self._epoch_start_direction: dict[str, float] = {}

        self.schedule = EpochSchedule(reuse, collect_epochs, steps_per_epoch, refresh_every,
                                      on_epoch_end=self._end_epoch, warn=self._warn_once)
        self._ignore_next = False
        self._next_ids: Tensor | None = None
        self._counters["nc_min"].fill_(math.inf)
        self._counters["nc_max"].fill_(-math.inf)

    def _compacts(self) -> bool:
        return self.compact

    def _unsupported(self, module: nn.Module) -> str | None:
        reason = unsupported_reason(module)
        if reason is None or (override_base(module) is not None and post_reason(module) is None):
            return None
        return None if self._generic_ok(module) else reason

    # ------------------------------------------------------------------ the two steps
    # Collect step (a collect epoch, or nothing stored yet): the batch's per-sample gradients are
    # captured, their Gram K solved for c (gram.py) and stored, and each covered gradient replaced
    # by sum_i c_i g_i: _precondition -> _collect_step.
    # Reuse step, coefficients="network": nothing is captured; _network_reuse_weights scales the
    # model output's gradient by n c_i, so the host's one ordinary backward already yields
    # sum_i c_i g_i for every parameter (the loss it differentiates is in effect sum_i n c_i l_i).
    # Reuse step, coefficients="layer" (or another optimizer owns part of the model): each layer's
    # captured per-sample gradients are reweighted with its stored c: _layer_reuse_step.

    def _start_batch(self, root: nn.Module, args: tuple) -> MicroBatch | None:
        ids, self._next_ids = self._next_ids, None
        if self._ignore_next:
            self._ignore_next = False
            collect = self._solves(self.epoch)
            return MicroBatch(position=-1, epoch=self.epoch, collect=collect,
                              capture=collect or self.coefficients == "layer", dummy=True)
        position, epoch = self.schedule.next_batch(ids)
        collect = self._solves(epoch)
        # Network reuse reweights the model's output gradient: every parameter below it gets the
        # weighted gradient. If another optimizer owns some of them (FNGD on the body, AdamW on
        # the head), reweight layer by layer instead (no Gram, no solve), leaving theirs alone.
        by_layer = not collect and self.coefficients == "network" and self._capture.has_foreign(root)
        if by_layer:
            self._info_once("foreign", "FNGD: the model has trainable parameters this optimizer does not own; "
                            "reuse steps reweight per layer (no Gram, no solve) so theirs keep the plain gradient")
        mb = MicroBatch(position=position, epoch=epoch, collect=collect,
                        capture=collect or self.coefficients == "layer" or by_layer, ids=ids)
        if not collect and self.coefficients == "network" and not by_layer:
            mb.reweight = functools.partial(self._network_reuse_weights, mb)
        return mb

    def _network_reuse_weights(self, mb: MicroBatch, n: int) -> Tensor:
        """The network reuse step: multipliers n * c_i of the model output's gradient (capture.py
        applies them during the host's backward, which then yields sum_i c_i g_i everywhere)."""
        if not (self.store is not None):  # an invariant, kept under python -O
            raise RuntimeError("fngd_plugin internal error: expected self.store is not None")
        if mb.ids is not None and mb.ids.numel() != n:
            raise ValueError(f"set_sample_ids got {mb.ids.numel()} ids but the model output has batch size {n}")
        device = self._params[0].device
        c = self.store.get(NETWORK_BLOCK, n, ids=mb.ids, position=mb.position, device=device)
        if c is None:
            self._unengaged("no_coefficients")
            return torch.ones(n, dtype=torch.float64, device=device)
        return (n * c).to(self._params[0].dtype)

    def _precondition(self, batches: list[MicroBatch]) -> None:
        """Rewrite the covered gradients from this step's captured micro-batches: each one's
        direction (its collect step or layer reuse step) counts n_m / N, the host's own mean."""
        if not batches:
            return
        live = [(mb, blocks) for mb in batches if (blocks := self._blocks(self._reps(mb)))]
        if not live:
            if any(p.grad is not None for p in self._params):
                self._unengaged("no_layer_gradient")
            return
        self._engaged = True
        self._solves_in_step = 0
        per_mb = [blocks for _, blocks in live]
        ns = [next(iter(blocks.values()))[0].n for blocks in per_mb]
        N = sum(n for (mb, _), n in zip(live, ns) if not mb.dummy)
        with torch.profiler.record_function("fngd.scale"):
            kappa = self._measure_scale(per_mb)
        if not self._checked_capture:
            low = any(c.delta is not None and c.delta.dtype in (torch.bfloat16, torch.float16)
                      for mb, _ in live for calls in mb.calls.values() for c in calls)
            with torch.profiler.record_function("fngd.check_capture"):
                self._check_capture(per_mb, kappa, tolerance=0.1 if low else 1e-2)
        out = self._seed_directions(live)
        totals: list[Tensor] = []  # sum_i c_i per block, weighted n_m / N (the scale of uncovered gradients)
        for (mb, blocks), n in zip(live, ns):
            if mb.dummy:  # zero contribution, same blocks: the all-reduce below stays matched
                for reps in blocks.values():
                    add_weighted(reps, torch.zeros(n, dtype=torch.float64, device=kappa.device), out)
                continue
            if mb.ids is not None and mb.ids.numel() != n:
                raise ValueError(f"set_sample_ids got {mb.ids.numel()} ids but the model output has batch size {n}: "
                                 "give one id per sample of the next forward")
            looked = self._look_up(mb, blocks, n, kappa.device)
            if looked is None:
                totals += self._collect_step(mb, blocks, n, N, kappa, out)
            else:
                totals += self._layer_reuse_step(blocks, looked, n, N, kappa, out)
        self._write_directions(out, totals, kappa)

    @staticmethod
    def _seed_directions(live: list[tuple[MicroBatch, dict[int, list[PerSampleGrads]]]]
                         ) -> dict[int, tuple[Tensor, Tensor]]:
        """The accumulators of the directions: the covered gradients' own storage, zeroed (their
        values are not needed once the scale is measured and the capture checked), so the step
        holds no second full-size copy of them; low-precision gradients get a float32 one."""
        out: dict[int, tuple[Tensor, Tensor]] = {}
        for _, blocks in live:
            for reps in blocks.values():
                for r in reps:
                    for p in r.params:
                        g = p.grad
                        if (id(p) not in out and g is not None and g.layout == torch.strided
                                and g.dtype in (torch.float32, torch.float64)):
                            out[id(p)] = (p, g.zero_())
        return out

    def _collect_step(self, mb: MicroBatch, blocks: dict[int, list[PerSampleGrads]], n: int, N: int, kappa: Tensor,
                      out: dict[int, tuple[Tensor, Tensor]]) -> list[Tensor]:
        """One micro-batch's collect step: Gram, solve (coefficients stored), weighted sum into
        ``out``. The hooks' raw per-sample gradient i is g_i / (N kappa) (kappa: the host's
        gradient scale) and this micro-batch of n counts n / N. Returns its totals sum_i c_i."""
        self._add("collect_steps", torch.ones((), dtype=torch.float64))
        unit = (N * kappa) ** 2  # raw Gram -> true per-sample units
        w = n * kappa  # raw per-sample gradients weighted n kappa c_i
        if self.coefficients == "network":
            budget = self.keep_per_sample
            K = None
            self._block_grams = [] if self.trace is not None else None
            for key, reps in blocks.items():
                size = reps[0].cache_size()
                keep = len(reps) == 1 and 0 < size <= budget
                budget -= size if keep else 0
                Kb = self._block_gram(reps, keep=keep, key=key)
                if self._block_grams is not None:
                    self._block_grams.append(("+".join(self._rep_name(r) for r in reps), Kb.to(torch.float64) * unit))
                K = Kb if K is None else K + Kb
            c = self._solve(K, unit, mb, NETWORK_BLOCK, share=1.0)
            for reps in blocks.values():
                _weighted(reps, w * c, out)
            return [(n / N) * c.sum()]
        totals = []
        for key, reps in blocks.items():  # one block at a time: its per-sample gradients are dropped before the next
            self._block_grams = None if self.trace is None else [("+".join(self._rep_name(r) for r in reps), None)]
            c = self._solve(self._block_gram(reps, keep=True, key=key), unit, mb, key, share=1.0 / len(blocks))
            _weighted(reps, w * c, out)
            totals.append((n / N) * c.sum() / len(blocks))
        return totals

    def _layer_reuse_step(self, blocks: dict[int, list[PerSampleGrads]], looked: dict[int, Tensor], n: int, N: int,
                          kappa: Tensor, out: dict[int, tuple[Tensor, Tensor]]) -> list[Tensor]:
        """One micro-batch's layer reuse step: each block's per-sample gradients weighted by its
        stored coefficients (arguments as in :meth:`_collect_step`)."""
        for key, reps in blocks.items():
            _weighted(reps, n * kappa * looked[key], out)
        share = 1.0 if self.coefficients == "network" else 1.0 / len(blocks)
        return [(n / N) * share * c.sum() for c in {id(c): c for c in looked.values()}.values()]

    def _write_directions(self, out: dict[int, tuple[Tensor, Tensor]], totals: list[Tensor], kappa: Tensor) -> None:
        """Average the directions over the replicas and write them into p.grad; without
        normalize="sum", uncovered gradients are scaled by the step's weight total."""
        grads = [g for _, g in out.values()]
        all_reduce_mean(grads)
        written = set()
        for (p, _), g in zip(out.values(), grads):
            p.grad = g.to(p.dtype) if p.grad is None else g.to(p.grad.dtype).view_as(p.grad)
            written.add(id(p))
        if self.normalize != "sum":
            tau = torch.stack(totals).sum() if totals else kappa.new_zeros(())
            all_reduce_mean([tau])  # every replica scales its uncovered gradients alike
            for p in self._params:
                if p.grad is not None and id(p) not in written:
                    p.grad.mul_(tau.to(p.grad.dtype))

    def _block_gram(self, reps: list[PerSampleGrads], keep: bool = False, key: int = 0) -> Tensor:
        sketch = None
        if self.sketch is not None:  # a fresh sketch per solve and block, the same after a resume
            sketch = (self.sketch, hash((self.step_counts["collect"], self._solves_in_step, key)) & (2**62 - 1))
            self._solves_in_step += 1
        with torch.profiler.record_function(f"fngd.gram.{_label(reps)}"):
            K, dropped = block_gram(reps, keep=keep, dense_limit=self.dense_tied_limit, sketch=sketch)
        if dropped:
            self._add("tied_approx", torch.ones((), dtype=torch.float64))
            self._warn_once("tied", "FNGD: a parameter shared between modules is too large for an exact Gram; "
                            "its cross terms are dropped (raise dense_tied_limit to make it exact)")
        return K

    def _look_up(self, mb: MicroBatch, blocks: dict, n: int, device: torch.device) -> dict[int, Tensor] | None:
        """Stored coefficients for a layer-reuse batch, or None if it must solve."""
        if mb.collect or self.store is None:
            return None
        if self.coefficients == "network":  # reweighted per layer (another optimizer shares the model)
            c = self.store.get(NETWORK_BLOCK, n, ids=mb.ids, position=mb.position, device=device)
            return None if c is None else dict.fromkeys(blocks, c)
        looked = {k: self.store.get(k, n, ids=mb.ids, position=mb.position, device=device) for k in blocks}
        return None if any(v is None for v in looked.values()) else looked  # type: ignore[return-value]
