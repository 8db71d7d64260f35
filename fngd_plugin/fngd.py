"""FNGD: Fast Natural Gradient Descent (Ou, Zhu, Huang, Liu, arXiv:2403.03473, 2024).

Damped natural gradient descent written as a weighted sum of per-sample gradients
(``smw.py``); the weights are solved during a collect phase (the first epoch by default) and
reused afterwards, so later steps cost about one ordinary backward.

Protocol: ``opt.zero_grad(); loss.backward(); opt.step()``. The optimizer finds the modules that
own its parameters by itself (``capture.py``); nothing else is required of the user.

Definitions (pinned; the tests check them against brute force)
  * g_i is the gradient of sample i's own loss, scaled so that the host's gradient (whatever
    ``loss.backward()`` and the host's own post-processing -- loss scaling, accumulation,
    ``multiply_grads`` -- leave in ``p.grad``) is their mean gbar. FNGD measures that scale on
    each step from what its hooks saw, so mean- and sum-reduced losses and AMP loss scales all
    mean the same thing.
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

import gc
import logging
import math
import warnings
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .capture import MicroBatch, ModuleCapture
from .samplers import PerSampleGrads, find_sampler, unsupported_reason
from .smw import DAMPING_MODES, NORMALIZE_MODES, normalize_coefficients, solve_coefficients
from .store import CoefficientStore
from .update import momentum_step

logger = logging.getLogger("fngd_plugin")

COEFFICIENT_MODES = ("network", "layer")
REUSE_MODES = ("position", "sample", "off")
NETWORK_BLOCK = -1


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}")


def _check_number(name: str, value: Any, *, minimum: float, strict: bool = False, integer: bool = False,
                  optional: bool = False) -> None:
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise TypeError(f"{name}={value!r} must be {kind}")
    bad = value <= minimum if strict else value < minimum
    if bad or (not integer and not math.isfinite(value)):
        raise ValueError(f"{name}={value!r} must be {'>' if strict else '>='} {minimum}")


class FNGD(torch.optim.Optimizer):
    """Fast Natural Gradient Descent.

    Args:
        params: parameters or param groups (as timm and fairseq build optimizers).
        lr: learning rate (>= 0).
        momentum: heavy-ball momentum on the FNGD direction, in [0, 1).
        weight_decay: L2 weight decay added to the FNGD direction (>= 0).
        nesterov: Nesterov momentum (needs momentum > 0).
        damping: lambda > 0; its meaning depends on ``damping_mode``.
        damping_mode: "relative" (n lambda = damping * trace(K) / n: scale-free) or "absolute".
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
        dense_tied_limit: parameters shared between modules get an exact Gram (cross terms) when
            n * their size is at most this many elements; above it, cross terms are dropped
            (reported once).
    """

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
    ):
        _check_number("lr", lr, minimum=0.0)
        _check_number("momentum", momentum, minimum=0.0)
        if momentum >= 1:
            raise ValueError(f"momentum={momentum!r} must be < 1")
        _check_number("weight_decay", weight_decay, minimum=0.0)
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        _check_number("damping", damping, minimum=0.0, strict=True)
        _check_choice("damping_mode", damping_mode, DAMPING_MODES)
        _check_choice("coefficients", coefficients, COEFFICIENT_MODES)
        _check_choice("reuse", reuse, REUSE_MODES)
        _check_choice("normalize", normalize, NORMALIZE_MODES)
        _check_number("collect_epochs", collect_epochs, minimum=1, integer=True)
        _check_number("steps_per_epoch", steps_per_epoch, minimum=1, integer=True, optional=True)
        _check_number("max_update_norm", max_update_norm, minimum=0.0, strict=True, optional=True)
        _check_number("refresh_every", refresh_every, minimum=1, integer=True, optional=True)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(params, defaults)

        self.damping = float(damping)
        self.damping_mode = damping_mode
        self.coefficients = coefficients
        self.reuse = reuse
        self.collect_epochs = collect_epochs
        self.steps_per_epoch = steps_per_epoch
        self.normalize = normalize
        self.max_update_norm = max_update_norm
        self.refresh_every = refresh_every
        self.dense_tied_limit = dense_tied_limit

        self._params = [p for g in self.param_groups for p in g["params"]]
        self._index = {id(p): i for i, p in enumerate(self._params)}
        self._coverable_cache: dict[int, bool] = {}
        self._capture = ModuleCapture(self._params, self._start_batch, self._coverable)
        self.store = CoefficientStore(reuse) if reuse != "off" else None

        # schedule
        self._epoch = 0
        self._position = 0
        self._epoch_signalled = False
        self._next_ids: Tensor | None = None
        self._seen_ids = torch.zeros(0, dtype=torch.bool)
        # device-side counters; read (synced) only at epoch ends and in stats()
        self._counters = {k: torch.zeros((), dtype=torch.float64) for k in
                          ("collect_steps", "fallbacks", "skipped", "nc_sum", "nc_min", "nc_max", "spread_sum",
                           "tied_approx")}
        self._counters["nc_min"].fill_(math.inf)
        self._counters["nc_max"].fill_(-math.inf)
        self._checked_capture = False
        self._warned: set[str] = set()
        self.coverage = self._coverage_report()
        logger.info(self.coverage["line"])

    # ------------------------------------------------------------------ public helpers
    def set_sample_ids(self, ids: Tensor | Iterable[int]) -> None:
        """Ids of the samples in the next forward's batch (reuse="sample"; also detects epochs)."""
        ids = torch.as_tensor(ids)
        if ids.dim() != 1 or ids.dtype in (torch.bool,) or ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"sample ids must be a 1-D integer tensor, got dtype={ids.dtype} shape={tuple(ids.shape)}")
        if ids.numel() and int(ids.min()) < 0:
            raise ValueError(f"sample ids must be >= 0, got min {int(ids.min())}")
        self._next_ids = ids.long()

    def set_epoch(self, epoch: int) -> None:
        """Tell FNGD a new epoch starts (0-based index). Resets the batch position to 0."""
        _check_number("epoch", epoch, minimum=0, integer=True)
        if self.steps_per_epoch is not None and self._epoch_signalled and epoch == self._epoch + 1 \
                and self._position != self.steps_per_epoch:
            self._warn_once("epoch_length", f"FNGD: epoch {self._epoch} had {self._position} batches but "
                            f"steps_per_epoch={self.steps_per_epoch}; pass steps_per_epoch={self._position}")
        if epoch != self._epoch:
            self._end_epoch(self._epoch)
        self._epoch = epoch
        self._position = 0
        self._epoch_signalled = True
        self._seen_ids.zero_()

    def set_batch_dim(self, module: nn.Module, dim: int) -> None:
        """Declare that ``module``'s inputs and outputs carry the sample dimension at ``dim``."""
        for m in module.modules():
            self._capture.batch_dims[m] = dim

    def attach(self, model: nn.Module) -> dict:
        """Optional: recompute the coverage report with the model's module names."""
        self.coverage = self._coverage_report(model)
        logger.info(self.coverage["line"])
        return self.coverage

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to (as far as FNGD can tell)."""
        if self.steps_per_epoch is not None and self._position >= self.steps_per_epoch:
            return self._epoch + 1
        return self._epoch

    @property
    def in_collect_phase(self) -> bool:
        """Whether the next batch solves for coefficients."""
        return self._is_collect(self.epoch) or self.store is None or self.store.empty

    def stats(self) -> dict:
        """Counters as Python numbers (this syncs with the device)."""
        c = {k: float(v) for k, v in self._counters.items()}
        steps = max(c["collect_steps"], 1.0)
        return {
            "epoch": self._epoch,
            "position": self._position,
            "phase": "collect" if self.in_collect_phase else "reuse",
            "collect_steps": int(c["collect_steps"]),
            "solve_fallbacks": int(c["fallbacks"]),
            "skipped_steps": int(c["skipped"]),
            "tied_approximations": int(c["tied_approx"]),
            "coef_scale_mean": c["nc_sum"] / steps,
            "coef_scale_min": c["nc_min"],
            "coef_scale_max": c["nc_max"],
            "coef_spread_mean": c["spread_sum"] / steps,
            "stored": 0 if self.store is None else len(self.store),
            "store_misses": 0 if self.store is None else int(self.store.misses),
            "root_mismatches": self._capture.root_mismatch,
        }

    # ------------------------------------------------------------------ torch.optim contract
    def zero_grad(self, set_to_none: bool = True) -> None:
        self._capture.clear()
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batches = [mb for mb in self._capture.take() if mb.capture]
        if batches:
            self._precondition(batches)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            bufs = []
            for p in params:
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(st["momentum_buffer"])
            ok = momentum_step(params, [p.grad for p in params], bufs, lr=group["lr"], momentum=group["momentum"],
                               weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                               max_update_norm=self.max_update_norm)
            self._add("skipped", (~ok).to(torch.float64))
        return loss

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["fngd"] = {
            "epoch": self._epoch,
            "position": self._position,
            "epoch_signalled": self._epoch_signalled,
            "steps_per_epoch": self.steps_per_epoch,
            "seen_ids": self._seen_ids.clone(),
            "counters": {k: v.detach().cpu().clone() for k, v in self._counters.items()},
            "store": None if self.store is None else self.store.state_dict(),
            "checked_capture": self._checked_capture,
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        extra = state_dict.get("fngd")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "fngd"})
        if extra is None:
            return
        self._epoch = int(extra["epoch"])
        self._position = int(extra["position"])
        self._epoch_signalled = bool(extra["epoch_signalled"])
        if self.steps_per_epoch is None:
            self.steps_per_epoch = extra["steps_per_epoch"]
        self._seen_ids = extra["seen_ids"].clone()
        self._counters = {k: v.clone() for k, v in extra["counters"].items()}
        self._checked_capture = bool(extra["checked_capture"])
        if self.store is not None and extra["store"] is not None:
            self.store.load_state_dict(extra["store"])

    # ------------------------------------------------------------------ schedule
    def _is_collect(self, epoch: int) -> bool:
        if self.reuse == "off" or epoch < self.collect_epochs:
            return True
        return self.refresh_every is not None and epoch % self.refresh_every == 0

    def _end_epoch(self, epoch: int) -> None:
        if not self._is_collect(epoch):
            return
        s = self.stats()
        logger.info(
            "FNGD: collect epoch %d done: %d solves, coefficient scale n*c mean %.3g (min %.3g, max %.3g), "
            "spread std(c)/mean(c) %.3g, %d solve fallbacks, %d skipped steps, %d coefficients stored",
            epoch, s["collect_steps"], s["coef_scale_mean"], s["coef_scale_min"], s["coef_scale_max"],
            s["coef_spread_mean"],
            s["solve_fallbacks"], s["skipped_steps"], s["stored"],
        )
        if s["solve_fallbacks"]:
            self._warn_once("fallback", f"FNGD: {s['solve_fallbacks']} Cholesky solves failed and fell back to "
                            "a diagonal solve; consider a larger damping")

    def _advance(self, ids: Tensor | None) -> None:
        """Move the epoch counter on before a new batch starts (by length or by repeated ids)."""
        new_epoch = False
        if self.steps_per_epoch is not None and self._position >= self.steps_per_epoch:
            new_epoch = True
        elif ids is not None and self.steps_per_epoch is None and self._is_collect(self._epoch) \
                and self.reuse == "sample" and ids.numel():
            ids_cpu = ids.cpu()
            top = int(ids_cpu.max()) + 1
            if top > self._seen_ids.numel():
                grown = torch.zeros(max(top, 2 * self._seen_ids.numel()), dtype=torch.bool)
                grown[: self._seen_ids.numel()] = self._seen_ids
                self._seen_ids = grown
            if bool(self._seen_ids[ids_cpu].any()):
                new_epoch = True
            else:
                self._seen_ids[ids_cpu] = True
        if new_epoch:
            self._end_epoch(self._epoch)
            self._epoch += 1
            self._position = 0
            if ids is not None and self._seen_ids.numel():
                self._seen_ids.zero_()
                self._seen_ids[ids.cpu()] = True

    def _start_batch(self, root: nn.Module, args: tuple) -> MicroBatch:
        ids, self._next_ids = self._next_ids, None
        if self.reuse == "sample" and ids is None:
            raise ValueError("FNGD(reuse='sample') needs the batch's sample ids: call opt.set_sample_ids(ids) "
                             "before each forward, or use reuse='position'")
        if self.reuse == "position" and self.steps_per_epoch is None and not self._epoch_signalled:
            raise ValueError("FNGD(reuse='position') needs steps_per_epoch=<batches per epoch> (or opt.set_epoch(e) "
                             "at each epoch start); alternatively reuse='sample' with sample ids or reuse='off'")
        self._advance(ids)
        position, epoch = self._position, self._epoch
        self._position += 1
        collect = self._is_collect(epoch) or self.store is None or self.store.empty
        mb = MicroBatch(position=position, epoch=epoch, collect=collect,
                        capture=collect or self.coefficients == "layer", ids=ids)
        if not collect and self.coefficients == "network":
            mb.reweight = lambda n: self._reuse_weights(mb, n)
        return mb

    def _reuse_weights(self, mb: MicroBatch, n: int) -> Tensor:
        """Root output multipliers for a network-reuse batch: n * c_i (see the class docstring)."""
        assert self.store is not None
        if mb.ids is not None and mb.ids.numel() != n:
            raise ValueError(f"set_sample_ids got {mb.ids.numel()} ids but the model output has batch size {n}")
        device = self._params[0].device
        c = self.store.get(NETWORK_BLOCK, n, ids=mb.ids, position=mb.position, device=device)
        if c is None:
            return torch.ones(n, dtype=torch.float64, device=device)
        return (n * c).to(self._params[0].dtype)

    # ------------------------------------------------------------------ coverage
    def _coverable(self, module: nn.Module) -> bool:
        key = id(module)
        hit = self._coverable_cache.get(key)
        if hit is None:
            hit = self._cover_reason(module) is None
            self._coverable_cache[key] = hit
        return hit

    def _cover_reason(self, module: nn.Module) -> str | None:
        reason = unsupported_reason(module)
        if reason is None:
            foreign = [k for k, p in module._parameters.items()
                       if p is not None and p.requires_grad and id(p) not in self._index]
            if foreign:
                reason = f"parameters {foreign} are not in this optimizer"
        return reason

    def _coverage_report(self, model: nn.Module | None = None) -> dict:
        if model is not None:
            modules = list(model.modules())
        else:
            # hosts give parameters only: find their owners among live modules
            modules = [o for o in gc.get_objects() if issubclass(type(o), nn.Module) and o._parameters]
        owners: dict[int, list[nn.Module]] = {}
        for m in modules:
            for p in m._parameters.values():
                if p is not None and id(p) in self._index:
                    owners.setdefault(id(p), []).append(m)
        covered: Counter[str] = Counter()
        uncovered: Counter[str] = Counter()
        reasons: dict[str, str] = {}
        for p in self._params:
            ms = owners.get(id(p), [])
            ok = [m for m in ms if self._coverable(m)]
            if ok:
                covered[type(ok[0]).__name__] += 1
            else:
                name = type(ms[0]).__name__ if ms else "<no module>"
                uncovered[name] += 1
                reasons[name] = self._cover_reason(ms[0]) if ms else "owned by no module (e.g. flattened copy)"
        total = len(self._params)
        n_cov = sum(covered.values())
        cov = ", ".join(f"{k} {v}" for k, v in sorted(covered.items()))
        unc = "; ".join(f"{k} {v} ({reasons[k]})" for k, v in sorted(uncovered.items())) or "none"
        line = f"FNGD coverage: {n_cov}/{total} parameter tensors covered ({cov or 'none'}); uncovered: {unc}"
        return {"covered": dict(covered), "uncovered": dict(uncovered), "reasons": reasons, "line": line}

    # ------------------------------------------------------------------ the FNGD direction
    def _add(self, key: str, value: Tensor) -> None:
        c = self._counters[key]
        self._counters[key] = c.to(value.device) + value.to(torch.float64)

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _reps(self, mb: MicroBatch) -> dict[nn.Module, PerSampleGrads]:
        reps: dict[nn.Module, PerSampleGrads] = {}
        for module, calls in mb.calls.items():
            if not self._coverable(module):
                continue
            calls = [c for c in calls if c.delta is not None]
            if not calls:
                continue
            fn = find_sampler(module)
            assert fn is not None
            bd = self._capture.batch_dims.get(module, 0)
            try:
                parts = [fn(module, c.a, c.delta, bd, c.meta) for c in calls]
            except Exception as e:  # name the module; the host's traceback alone would not
                raise TypeError(f"FNGD: per-sample gradients of {type(module).__name__} failed: {e}") from e
            reps[module] = parts[0] if len(parts) == 1 else type(parts[0]).cat(parts)
        sizes = {r.n for r in reps.values()}
        if len(sizes) > 1:
            detail = ", ".join(f"{type(m).__name__}: {r.n}" for m, r in reps.items())
            raise ValueError(f"FNGD: modules disagree on the number of samples ({detail}); declare the sample "
                             "dimension of time-first modules with opt.set_batch_dim(module, dim)")
        return reps

    def _blocks(self, reps: dict[nn.Module, PerSampleGrads]) -> dict[int, list[PerSampleGrads]]:
        """Modules sharing a parameter form one block, keyed by its first parameter's index."""
        parent: dict[int, int] = {}

        def find(x: int) -> int:
            while parent.setdefault(x, x) != x:
                x = parent[x]
            return x

        for r in reps.values():
            ids = [self._index[id(p)] for p in r.params]
            for i in ids[1:]:
                parent[find(i)] = find(ids[0])
        blocks: dict[int, list[PerSampleGrads]] = {}
        for r in reps.values():
            root = find(self._index[id(r.params[0])])
            blocks.setdefault(root, []).append(r)
        return {min(self._index[id(p)] for r in rs for p in r.params): rs for rs in blocks.values()}

    def _block_gram(self, reps: list[PerSampleGrads]) -> Tensor:
        if len(reps) == 1:
            return reps[0].gram()
        n = reps[0].n
        size = sum(p.numel() for p in {id(p): p for r in reps for p in r.params}.values())
        if n * size > self.dense_tied_limit:
            self._add("tied_approx", torch.ones((), dtype=torch.float64))
            self._warn_once("tied", "FNGD: a parameter shared between modules is too large for an exact Gram; "
                            "its cross terms are dropped (raise dense_tied_limit to make it exact)")
            return sum(r.gram() for r in reps)  # type: ignore[return-value]
        acc: dict[int, Tensor] = {}
        for r in reps:
            for p, g in zip(r.params, r.materialize()):
                g = g.reshape(n, -1)
                acc[id(p)] = acc[id(p)] + g if id(p) in acc else g
        G = torch.cat(list(acc.values()), dim=1)
        return G @ G.T

    @staticmethod
    def _block_weighted(reps: list[PerSampleGrads], w: Tensor, out: dict[int, tuple[Tensor, Tensor]]) -> None:
        for r in reps:
            for p, g in zip(r.params, r.weighted(w)):
                if id(p) in out:
                    out[id(p)] = (p, out[id(p)][1] + g)
                else:
                    out[id(p)] = (p, g)

    def _measure_scale(self, per_mb: list[dict[int, list[PerSampleGrads]]]) -> Tensor:
        """kappa: the host gradient equals kappa * (sum of what the hooks saw), measured on one small block."""
        common = set(per_mb[0])
        for blocks in per_mb[1:]:
            common &= set(blocks)
        candidates = [k for k in common if all(p.grad is not None for r in per_mb[0][k] for p in r.params)]
        if not candidates:
            raise RuntimeError("FNGD: no covered module received a gradient in every micro-batch")
        key = min(candidates, key=lambda k: sum(p.numel() for r in per_mb[0][k] for p in r.params))
        seen: dict[int, tuple[Tensor, Tensor]] = {}
        for blocks in per_mb:
            reps = blocks[key]
            self._block_weighted(reps, torch.ones(reps[0].n, dtype=torch.float64, device=self._device(reps)), seen)
        seen_t = [g for _, g in seen.values()]
        self._all_reduce_mean(seen_t)
        num = sum((p.grad.to(g.dtype) * g).sum() for (p, _), g in zip(seen.values(), seen_t))
        den = sum((g * g).sum() for g in seen_t)
        kappa = torch.where(den > 0, num / den, torch.ones_like(den))  # type: ignore[arg-type]
        return kappa.to(torch.float64)

    @staticmethod
    def _device(reps: list[PerSampleGrads]) -> torch.device:
        return reps[0].params[0].device

    def _all_reduce_mean(self, tensors: list[Tensor]) -> None:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        world = dist.get_world_size()
        for t in tensors:
            dist.all_reduce(t)
            t.div_(world)

    def _check_capture(self, per_mb: list[dict[int, list[PerSampleGrads]]], kappa: Tensor) -> None:
        """Once: does every covered host gradient equal what the hooks saw? (catches uses outside forward)."""
        self._checked_capture = True
        seen: dict[int, tuple[Tensor, Tensor]] = {}
        for blocks in per_mb:
            for reps in blocks.values():
                w = torch.ones(reps[0].n, dtype=torch.float64, device=self._device(reps))
                self._block_weighted(reps, w, seen)
        self._all_reduce_mean([g for _, g in seen.values()])
        bad = []
        for p, g in seen.values():
            if p.grad is None:
                continue
            ref = p.grad.to(torch.float64)
            err = float((ref - kappa * g.to(torch.float64)).norm() / ref.norm().clamp_min(1e-30))
            if err > 1e-2 and float(ref.norm()) > 0:
                bad.append(f"{tuple(p.shape)}: rel. error {err:.2g}")
        if bad:
            self._warn_once("capture", "FNGD: the host gradient of some covered parameters differs from what the "
                            "module hooks saw (a parameter used outside its module's forward?): " + "; ".join(bad[:5]))

    def _precondition(self, batches: list[MicroBatch]) -> None:
        per_mb = [self._blocks(self._reps(mb)) for mb in batches]
        live = [(mb, blocks) for mb, blocks in zip(batches, per_mb) if blocks]
        if not live:
            return
        batches, per_mb = [x[0] for x in live], [x[1] for x in live]
        ns = [next(iter(b.values()))[0].n for b in per_mb]
        N = sum(ns)
        kappa = self._measure_scale(per_mb)
        if not self._checked_capture:
            self._check_capture(per_mb, kappa)
        out: dict[int, tuple[Tensor, Tensor]] = {}
        tau = torch.zeros((), dtype=torch.float64, device=kappa.device)
        unit = (N * kappa) ** 2  # raw Gram -> true per-sample units
        for mb, blocks, n in zip(batches, per_mb, ns):
            coefs = self._coefficients(mb, blocks, unit)
            for key, reps in blocks.items():
                c = coefs[NETWORK_BLOCK if self.coefficients == "network" else key]
                self._block_weighted(reps, (n * kappa * c), out)
            tau = tau + (n / N) * torch.stack([c.sum() for c in coefs.values()]).mean()
        grads = [g for _, g in out.values()]
        self._all_reduce_mean(grads)
        written = set()
        for (p, _), g in zip(out.values(), grads):
            p.grad = g.to(p.dtype) if p.grad is None else g.to(p.grad.dtype).view_as(p.grad)
            written.add(id(p))
        if self.normalize != "sum":
            for p in self._params:
                if p.grad is not None and id(p) not in written:
                    p.grad.mul_(tau.to(p.grad.dtype))

    def _coefficients(self, mb: MicroBatch, blocks: dict[int, list[PerSampleGrads]], unit: Tensor) -> dict[int, Tensor]:
        """True-unit coefficients per block: solved (collect) or looked up (layer reuse)."""
        n = next(iter(blocks.values()))[0].n
        device = unit.device
        if not mb.collect:
            assert self.store is not None
            looked = {k: self.store.get(k, n, ids=mb.ids, position=mb.position, device=device) for k in blocks}
            if all(v is not None for v in looked.values()):
                return looked  # type: ignore[return-value]
        grams = {k: self._block_gram(reps) for k, reps in blocks.items()}
        if self.coefficients == "network":
            grams = {NETWORK_BLOCK: sum(grams.values())}  # type: ignore[dict-item]
        coefs = {}
        for k, K in grams.items():
            K = K.to(torch.float64) * unit
            c, fell_back = solve_coefficients(K, self.damping, self.damping_mode)
            self._add("fallbacks", fell_back.to(torch.float64))
            # statistics of the solved scale: n * mean(c) is 1/lambda-like (large = weak damping);
            # the spread std(c)/mean(c) is how far the weighting is from plain averaging
            nc = n * c.mean()
            finite = torch.isfinite(nc)
            self._add("nc_sum", torch.where(finite, nc, 0.0) / len(grams))
            self._add("spread_sum", torch.where(finite, c.std() / c.mean(), 0.0) / len(grams))
            lo, hi = self._counters["nc_min"].to(device), self._counters["nc_max"].to(device)
            self._counters["nc_min"] = torch.where(finite, torch.minimum(lo, nc), lo)
            self._counters["nc_max"] = torch.where(finite, torch.maximum(hi, nc), hi)
            c = normalize_coefficients(c, self.normalize)
            coefs[k] = c
            if self.store is not None:  # non-finite coefficients are masked inside the store
                self.store.put(k, c, ids=mb.ids, position=mb.position)
        self._add("collect_steps", torch.ones((), dtype=torch.float64))
        return coefs
