"""What FNGD and KFAC share: the capture of owning modules, per-sample gradients by route, scale
measurement, the update (coverage and the count of causes: coverage.py).

Both optimizers are built from parameters only, find their modules through :class:`ModuleCapture`,
turn captured (input, output-gradient) pairs into per-layer :class:`PerSampleGrads`, measure the
host's gradient scale from them (so loss scaling and reduction conventions do not matter), and
finish with the same sync-free momentum SGD step.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections import Counter
from typing import Any

import torch
from torch import Tensor, nn

from .broadcast import call_samples, misaligned
from .capture import Call, MicroBatch, ModuleCapture
from .coverage import Coverage
from .distributed import all_reduce_mean
from .generic import batch_dim_of, generic_grads, generic_reason
from .gram import add_weighted, shared_blocks
from .samplers import (
    ConvGrads,
    DenseGrads,
    PerSampleGrads,
    SubclassMismatch,
    find_sampler,
    override_base,
    subclass_grads,
)
from .update import adamw_step, global_norm, momentum_step

logger = logging.getLogger("fngd_plugin")

# what check_options hands the constructor instead of parameters: it stops right after the checks
_OPTIONS_ONLY = object()


class _Checked(Exception):
    pass


class CaptureOptimizer(Coverage, torch.optim.Optimizer):
    """Base class: an optimizer whose modules are found and observed through :class:`ModuleCapture`.

    Subclasses implement ``_start_batch(root, args) -> MicroBatch`` (what to capture for the next
    forward), ``_unsupported(module) -> reason | None`` (which owners they cover) and
    ``_precondition(batches)`` (rewrite p.grad from the captured micro-batches of this step).
    """

    max_update_norm: float | None = None

    counter_names: tuple[str, ...] = ("skipped",)

    @classmethod
    def check_options(cls, **options: Any) -> None:
        """Run exactly the constructor's checks on these keyword options, with no parameters:
        OptionError (name, value, reason) for a bad value, TypeError for an unknown name. Hosts
        call it to refuse bad command-line values before they load data or build a model."""
        try:
            cls(_OPTIONS_ONLY, **options)
        except _Checked:
            return

    def __init__(self, params: Any, defaults: dict):
        if params is _OPTIONS_ONLY:  # check_options: the subclass has checked its arguments
            raise _Checked
        super().__init__(params, defaults)
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._index = {id(p): i for i, p in enumerate(self._params)}
        self._coverable_cache: dict[int, bool] = {}
        self._routes: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
        self._verified: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # subclasses checked on a first call
        self._top_ids: set[int] = set()
        self._capture = ModuleCapture(self._params, self._start_batch, self._coverable, self._keep_output,
                                      self._on_delta if self._compacts() else None)
        # device-side counters; read (synced) only in stats() and at epoch ends
        self._counters = {k: torch.zeros((), dtype=torch.float64) for k in self.counter_names}
        self._checked_capture = False
        self._warned: set[str] = set()
        # host-side counts (no device sync): steps by cause that were not preconditioned, and
        # finished batches the host threw away with zero_grad() before any step (skipped updates)
        self.unpreconditioned: Counter[str] = Counter()
        self.unpreconditioned_modules: dict[str, set[str]] = {}  # cause -> the modules it hit, by name
        self._names: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
        self.discarded_batches = 0
        self._engaged = False
        self.coverage = self._coverage_report()
        logger.info(self.coverage["line"])

    def _start_batch(self, root: nn.Module, args: tuple) -> MicroBatch | None:
        raise NotImplementedError

    def _unsupported(self, module: nn.Module) -> str | None:
        raise NotImplementedError

    def _precondition(self, batches: list[MicroBatch]) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        unseen = sum(not mb.backward_seen for mb in self._capture.pending)
        taken = self._capture.take()
        cause = None
        if not taken and any(p.grad is not None for p in self._params):
            cause = "eval_mode" if self._capture.eval_forwards else ("no_backward" if unseen else "no_batch")
            self._unengaged(cause)
        self._capture.eval_forwards = 0
        self._engaged = False
        tag = type(self).__name__.lower()  # the phases' names in torch.profiler traces
        with torch.profiler.record_function(f"{tag}.precondition"):
            self._precondition([mb for mb in taken if mb.capture])
        self._note_step(taken, cause)
        with torch.profiler.record_function(f"{tag}.update"):
            self._update(self.max_update_norm)
        return loss

    def _note_step(self, taken: list[MicroBatch], cause: str | None) -> None:
        """Subclasses count steps by phase here (``self._engaged``: _precondition used its batches)."""

    def set_batch_dim(self, module: nn.Module, dim: int | None) -> None:
        """Declare that ``module``'s inputs and outputs (and its submodules') carry the sample
        dimension at ``dim``; ``None``: they carry none (an input shared by the whole batch, such
        as relative-position buckets): such modules get the plain gradient, counted under
        'broadcast' in stats()['unpreconditioned']."""
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 0):
            raise ValueError(f"set_batch_dim: dim must be an int >= 0 or None (no sample dimension), got {dim!r}")
        for m in module.modules():
            if dim is None:
                self._capture.shared.add(m)
                self._capture.batch_dims.pop(m, None)
            else:
                self._capture.shared.discard(m)
                self._capture.batch_dims[m] = dim

    def zero_grad(self, set_to_none: bool = True) -> None:
        # a forward still waiting for its backward stays (zero_grad between forward and backward,
        # closures that zero inside); finished batches whose gradient is thrown away go
        self.discarded_batches += sum(not mb.dummy for mb in self._capture.discard_finished())
        super().zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ the FNGD direction
    def _add(self, key: str, value: Tensor) -> None:
        c = self._counters[key]
        self._counters[key] = c.to(value.device) + value.to(torch.float64)

    def _reps(self, mb: MicroBatch) -> dict[nn.Module, PerSampleGrads]:
        """Per-sample gradients of each recorded module of one micro-batch. Modules whose calls do
        not carry the batch's samples (shared inputs, untraceable leading dimensions) are counted
        by cause and left to the plain gradient, never an error."""
        reps: dict[nn.Module, PerSampleGrads] = {}
        todo: list[tuple[nn.Module, list[Call]]] = []
        for module, calls in mb.calls.items():
            if not self._coverable(module):
                continue
            params = [p for p in module._parameters.values() if p is not None]
            trainable = sum(p.requires_grad for p in params)
            if not trainable:
                continue  # frozen (fine-tuning): nothing to precondition
            if trainable < len(params):
                self._unengaged("partly_frozen", f" ({type(module).__name__})")
                continue
            if any(c.twice for c in calls):
                self._unengaged("twice_backward", f" ({type(module).__name__})")
                continue
            seen = [c for c in calls if c.delta is not None or c.grads is not None]
            # a call recorded while checkpointing recomputed the forward gets no gradient when the
            # original graph is kept (non-reentrant): only the original counts
            lost = [c for c in calls if c.delta is None and c.grads is None and not c.recomputed]
            if lost and any(p.grad is not None for p in module.parameters(recurse=False)):
                self._warn_once(f"nodelta-{type(module).__name__}",
                                f"{type(self).__name__}: a {type(module).__name__} received a gradient that its output "
                                "hook never saw; that call is left out of the per-sample statistics")
            calls = seen
            if not calls:
                continue
            if module in self._capture.shared:
                self._unengaged("broadcast", module=module)
                continue
            todo.append((module, calls))
        off = misaligned(mb.n, {m: [self._call_samples(m, c) for c in calls] for m, calls in todo})
        for module, calls in todo:
            if module in off:
                self._unengaged(*off[module], module=module)
                continue
            bd = self._capture.batch_dims.get(module, 0)
            parts = self._module_grads(module, calls, bd)
            if parts is None:
                continue
            reps[module] = parts[0] if len(parts) == 1 else type(parts[0]).cat(parts)
            reps[module].label = type(module).__name__
            reps[module].owner = module  # names it in FNGD's trace
        return reps

    def _call_samples(self, module: nn.Module, call: Call) -> int | None:
        bd = self._capture.batch_dims.get(module, 0)
        generic = self._route(module) == "generic" and call.grads is None
        return call_samples(call, batch_dim_of(module, bd) if generic else bd, generic)

    # ------------------------------------------------------------------ compaction during the backward
    def _compacts(self) -> bool:
        """Whether output gradients are compacted into per-sample gradients as they arrive (FNGD)."""
        return False

    def _on_delta(self, module: nn.Module, call: Call, mb: MicroBatch) -> None:
        """Called by the capture when a module's output gradient arrives: where this module's
        per-sample gradients are smaller than its input and output gradient (a norm layer's, always;
        an early convolution's with many positions), compute them now and drop those two tensors,
        instead of holding every layer's until the step. Same numbers, less peak memory."""
        if (call.recomputed or call.delta is None or len(mb.calls.get(module, ())) != 1
                or module in self._capture.shared):
            return
        if self._route(module) != "sampler" or not self._coverable(module):
            return
        params = [p for p in module._parameters.values() if p is not None]
        if not params or not all(p.requires_grad for p in params):
            return
        raw = call.a.numel() * call.a.element_size() + call.delta.numel() * call.delta.element_size()
        bd = self._capture.batch_dims.get(module, 0)
        with torch.profiler.record_function(f"fngd.compact.{type(module).__name__}"):
            self._compact(module, call, bd, raw)

    def _compact(self, module: nn.Module, call: Call, bd: int, raw: int) -> None:
        try:
            rep = find_sampler(module)(module, call.a, call.delta, bd, call.meta)  # type: ignore[misc]
            if isinstance(rep, ConvGrads):
                if not rep.materializes(getattr(self, "sketch", None)):
                    return
                size = rep.cache_size() * rep.weight.element_size()
                grads = rep.materialize() if size < raw else None
            elif isinstance(rep, DenseGrads):
                grads = rep.grads if sum(g.numel() * g.element_size() for g in rep.grads) <= raw else None
            else:
                return
        except Exception:  # noqa: BLE001 -- left to the step, which names the module in its error
            return
        if grads is not None:
            call.grads = DenseGrads(rep.params, grads)
            call.a = call.delta = call.out = None  # type: ignore[assignment]
            call.args, call.kwargs = (), {}

    def _module_grads(self, module: nn.Module, calls: list, bd: int) -> list[PerSampleGrads] | None:
        """Per-sample gradients of one module's calls by its route; None: left to the plain gradient."""
        route = self._route(module)
        name = type(module).__name__
        try:
            if route == "sampler":
                fn = find_sampler(module)
                parts = [c.grads if c.grads is not None else fn(module, c.a, c.delta, bd, c.meta)  # type: ignore[misc]
                         for c in calls]
                if len(parts) > 1 and any(isinstance(r, DenseGrads) for r in parts):  # compacted and not: add up
                    parts = [r if isinstance(r, DenseGrads) else DenseGrads(r.params, r.materialize()) for r in parts]
                return parts
            if route == "subclass":
                base = override_base(module)
                try:
                    parts = [subclass_grads(module, base, c.a, c.delta, bd, c.meta,  # type: ignore[arg-type]
                                            None if module in self._verified else c.out) for c in calls]
                    self._verified.add(module)
                    return parts
                except SubclassMismatch as e:
                    self._routes[module] = "generic"
                    if not self._generic_ok(module):
                        self._coverable_cache[id(module)] = False
                        self._warn_once(f"mismatch-{name}", f"{type(self).__name__}: {e}; its parameters get the "
                                        "plain gradient from now on")
                        return None
                    # expected for e.g. LayerNorm2d: said once, quietly
                    self._info_once(f"mismatch-{name}", f"{type(self).__name__}: {e}; the torch.func fallback "
                                    "computes its per-sample gradients")
            why = generic_reason(module)
            if why is not None:
                self._unengaged("not_independent", f" ({name}: {why})")
                return None
            bd = batch_dim_of(module, bd)
            try:
                return [generic_grads(module, c.args, c.kwargs, c.delta, bd, rows=bool(c.rows)) for c in calls]
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as e:  # not vmap-able (in-place ops on batched tensors, e.g. nn.GRU)
                self._coverable_cache[id(module)] = False
                self._unengaged("fallback_failed", f" ({name}: {str(e).splitlines()[0][:200]})")
                return None
        except (ValueError, TypeError, IndexError) as e:  # name the module; the host's traceback would not
            raise type(e)(f"{type(self).__name__}: per-sample gradients of {name} failed: {e}") from e

    def _blocks(self, reps: dict[nn.Module, PerSampleGrads]) -> dict[int, list[PerSampleGrads]]:
        return shared_blocks(reps, self._index)

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
            add_weighted(reps, torch.ones(reps[0].n, dtype=torch.float64, device=self._device(reps)), seen)
        seen_t = [g for _, g in seen.values()]
        all_reduce_mean(seen_t)
        num = sum((p.grad.to(g.dtype) * g).sum() for (p, _), g in zip(seen.values(), seen_t))
        den = sum((g * g).sum() for g in seen_t)
        kappa = torch.where(den > 0, num / den, torch.ones_like(den))  # type: ignore[arg-type]
        return kappa.to(torch.float64)

    @staticmethod
    def _device(reps: list[PerSampleGrads]) -> torch.device:
        return reps[0].params[0].device

    def _check_capture(self, per_mb: list[dict[int, list[PerSampleGrads]]], kappa: Tensor,
                       tolerance: float = 1e-2) -> None:
        """Once: does every covered host gradient equal what the hooks saw? (catches uses outside forward)."""
        self._checked_capture = True
        seen: dict[int, tuple[Tensor, Tensor]] = {}
        for blocks in per_mb:
            for reps in blocks.values():
                w = torch.ones(reps[0].n, dtype=torch.float64, device=self._device(reps))
                add_weighted(reps, w, seen)
        all_reduce_mean([g for _, g in seen.values()])
        bad = []
        # a gradient that is zero up to rounding (a conv bias before a train-mode BatchNorm, a
        # BatchNorm bias whose output gradients cancel) is judged against the size of the whole
        # gradient, not its own: 1e-4 of it in float32, where such a sum of O(1) terms keeps
        # rounding noise of 1e-6 (seen: 1% "error" on a 1.5e-6 MobileNetV3 BatchNorm bias
        # gradient, total 172, on one CPU and not another), 1e-6 in float64
        total = math.sqrt(sum(float(p.grad.to(torch.float64).square().sum()) for p, _ in seen.values()
                              if p.grad is not None))
        for p, g in seen.values():
            if p.grad is None:
                continue
            ref = p.grad.to(torch.float64)
            floor = 1e-6 if p.grad.dtype == torch.float64 else 1e-4
            size = max(float(ref.norm()), floor * total, 1e-30)
            err = float((ref - kappa * g.to(torch.float64)).norm()) / size
            if err > tolerance and float(ref.norm()) > 0:
                bad.append(f"{tuple(p.shape)}: rel. error {err:.2g}")
        if bad:
            self._warn_once("capture", "FNGD: the host gradient of some covered parameters differs from what the "
                            "module hooks saw (a parameter used outside its module's forward?): " + "; ".join(bad[:5]))


    def _update(self, max_update_norm: float | None = None) -> None:
        """Momentum SGD (or, with a group's ``update="adamw"``, AdamW with beta1 = its momentum) on
        whatever directions are now in p.grad.

        A non-finite direction anywhere skips the whole step (parameters and momentum untouched,
        counted); ``max_update_norm`` clips the global norm of the directions of all groups."""
        groups = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        grads = [p.grad for _, ps in groups for p in ps]
        if not grads:
            return
        total = global_norm(grads)
        if not math.isfinite(total):
            self._add("skipped", torch.ones((), dtype=torch.float64))
            return
        scale = 1.0 if max_update_norm is None or total <= max_update_norm else max_update_norm / total
        for group, params in groups:
            if not params:
                continue
            if group.get("update", "sgd") == "adamw":
                self._adamw(group, params, scale)
                continue
            bufs = []
            for p in params:
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(st["momentum_buffer"])
            momentum_step(params, [p.grad for p in params], bufs, lr=group["lr"], momentum=group["momentum"],
                          weight_decay=group["weight_decay"], nesterov=group["nesterov"], scale=scale)

    def _adamw(self, group: dict, params: list[Tensor], scale: float) -> None:
        avgs, sqs, steps = [], [], []
        for p in params:
            st = self.state[p]
            if "exp_avg" not in st:
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] = 0
            st["step"] += 1
            avgs.append(st["exp_avg"])
            sqs.append(st["exp_avg_sq"])
            steps.append(st["step"])
        adamw_step(params, [p.grad for p in params], avgs, sqs, steps, lr=group["lr"], beta1=group["momentum"],
                   beta2=group["beta2"], eps=group["eps"], weight_decay=group["weight_decay"], scale=scale)
