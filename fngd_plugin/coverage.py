"""What an optimizer that captures modules counts and tells: which modules it covers and how
(the coverage report), and each step or module it could not precondition, by cause.

FNGD never silently does something other than what it says: anything it cannot precondition is
counted by cause in ``stats()["unpreconditioned"]``, warned about once saying what to change.
:class:`Coverage` is a mixin of :class:`~fngd_plugin.base.CaptureOptimizer`; it reads the
optimizer's ``_params``, ``_index``, ``_capture``, ``_unsupported()`` and ``generic_fallback``.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections import Counter
from typing import Any

from torch import nn

from .capture import live_modules
from .generic import own_params
from .samplers import find_sampler, override_base, post_reason

logger = logging.getLogger("fngd_plugin")

# Why a step (or one module of it) could not be preconditioned, and what to change. Counted per
# cause in ``stats()["unpreconditioned"]``, warned about the first time each occurs.
CAUSES = {
    "no_batch": "an optimizer step found gradients but no captured training forward of the model since the last "
                "step, so its gradient is used unpreconditioned. Was the model called under torch.no_grad() or a "
                "torch.func transform, compiled in place with model.compile() (use model = torch.compile(model) "
                "instead), or run by a module this optimizer's parameters do not belong to?",
    "eval_mode": "the model ran in eval mode, so its forward was not captured and the step used the plain "
                 "gradient. Keep model.train() for training forwards and put frozen submodules (e.g. BatchNorm) "
                 "in eval() one by one.",
    "no_backward": "the captured forward's backward never reached the model's output (was the loss computed from "
                   "a detached output, or the backward run after step()?), so the step used the plain gradient.",
    "no_layer_gradient": "the backward reached the model's output but no covered layer received a gradient "
                         "(are all covered parameters frozen?), so the step used the plain gradient.",
    "partly_frozen": "a module has both trainable and frozen (requires_grad=False) parameters; its trainable "
                     "parameters get the plain gradient. Freeze or unfreeze whole modules.",
    "no_coefficients": "a reuse step found no stored coefficients for its batch and used the plain gradient.",
    "fallback_failed": "the torch.func fallback could not run a module under vmap; its parameters get the plain "
                       "gradient from now on. Register a sampler for it (fngd_plugin.register_sampler) or pass "
                       "generic_fallback=False.",
    "not_independent": "a module covered by the torch.func fallback does not treat samples independently in its "
                       "current mode, so its parameters got the plain gradient in this step. Put such modules in "
                       "eval() (frozen BatchNorm), set their dropout / drop-path to 0, or pass "
                       "generic_fallback=False to leave them to the plain gradient without this count.",
    "twice_backward": "a covered module's output received a second gradient (two backward passes through one "
                      "forward, e.g. retain_graph=True) after FNGD had compacted the first into per-sample "
                      "gradients, so its parameters got the plain gradient in this step. Run one backward per "
                      "forward (sum the losses first), or pass compact=False.",
    "no_inverse": "a KFAC layer had no inverse to apply (its first inverse update failed on singular or "
                  "non-finite factors, or it first received a gradient after the last inverse update), so its "
                  "gradient was used unpreconditioned in this step, until an inverse update succeeds. A larger "
                  "damping or inverse='eigen' avoids the first; a smaller inv_update_steps shortens the second.",
    "broadcast": "a module's input carries no sample dimension (declared with opt.set_batch_dim(module, None), "
                 "or a batch of one whose output could not be handed on per sample), so the whole batch shares it "
                 "and its per-sample gradients cannot be read from its output: its parameters got the plain "
                 "gradient. This is expected for tables indexed by positions alone (T5's relative attention bias); "
                 "it is exact in reuse steps with coefficients='network'.",
    "sample_mismatch": "a module's input has a leading dimension that is neither the batch's number of samples nor "
                       "a reshape of (samples, rows) that FNGD could trace, so its rows cannot be attributed to "
                       "samples: its parameters got the plain gradient. If its input is shared by the whole batch "
                       "(e.g. relative-position buckets), declare it with opt.set_batch_dim(module, None); if its "
                       "samples lie along another dimension, declare that one with opt.set_batch_dim(module, dim).",
    "root_mismatch": "a reuse step found no output tensor of the model whose batch size matches the stored "
                     "coefficients, so its gradient was not reweighted (plain gradient). Is the batch dimension of "
                     "the model's output not 0? Declare it with opt.set_batch_dim(model, dim).",
}


class Coverage:
    """Coverage report, routes of covered modules, and the once-only warnings by cause."""

    _params: list
    _index: dict[int, int]
    _capture: Any
    _coverable_cache: dict[int, bool]
    _routes: weakref.WeakKeyDictionary[nn.Module, str]
    _top_ids: set[int]
    _warned: set[str]
    unpreconditioned: Counter[str]
    unpreconditioned_modules: dict[str, set[str]]
    _names: weakref.WeakKeyDictionary[nn.Module, str]
    coverage: dict

    def attach(self, model: nn.Module) -> dict:
        """Optional: recompute the coverage report with the model's module names."""
        self.coverage = self._coverage_report(model)
        logger.info(self.coverage["line"])
        return self.coverage

    def _unengaged(self, cause: str, detail: str = "", module: nn.Module | None = None) -> None:
        """Count one step (or one module of it, named in stats()['unpreconditioned_modules']) that
        could not be preconditioned; warned once per cause, or per cause and module."""
        self.unpreconditioned[cause] += 1
        key, head = f"cause-{cause}", ""
        if module is not None:
            name = self._module_name(module)
            self.unpreconditioned_modules.setdefault(cause, set()).add(name)
            key += f"-{name}"
            head, detail = f"module {name}{detail}: ", ""
        self._warn_once(key, f"{type(self).__name__}: {head}{CAUSES[cause]}{detail} (counted in "
                        f"stats()['unpreconditioned']['{cause}']; this warning is shown once)")

    def _module_name(self, module: nn.Module) -> str:
        """``module``'s qualified name in the model that ran it ("Type 'name'"), else its type."""
        if module not in self._names:
            for root in list(self._capture.roots):
                for name, m in root.named_modules():
                    self._names.setdefault(m, f"{type(m).__name__} '{name}'")
        return self._names.get(module, type(module).__name__)

    def _info_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.info(msg)

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _coverable(self, module: nn.Module) -> bool:
        key = id(module)
        hit = self._coverable_cache.get(key)
        if hit is None:
            hit = self._cover_reason(module) is None
            self._coverable_cache[key] = hit
        return hit

    def _route(self, module: nn.Module) -> str:
        """How a covered module's per-sample gradients are computed: "sampler" (registered),
        "subclass" (its parent's sampler, checked on the first call), or "generic" (torch.func)."""
        route = self._routes.get(module)
        if route is None:
            if find_sampler(module) is not None:
                route = "sampler"
            elif override_base(module) is not None and post_reason(module) is None:
                route = "subclass"
            else:
                route = "generic"
            self._routes[module] = route
        return route

    def _generic_ok(self, module: nn.Module) -> bool:
        """The torch.func fallback may cover this module (the optimizer allows it, the module has
        parameters of its own and is not the model itself: the model's own parameters are used
        outside any submodule, where no output gradient of theirs can be captured)."""
        return (getattr(self, "generic_fallback", False) and bool(own_params(module))
                and id(module) not in self._top_ids and module not in self._capture.roots)

    def _keep_output(self, module: nn.Module) -> bool:
        return self._routes.get(module) == "subclass" and module not in self._verified

    def _cover_reason(self, module: nn.Module) -> str | None:
        reason = self._unsupported(module)
        if reason is not None and id(module) in self._top_ids and own_params(module):
            names = ", ".join(k for k in own_params(module))
            reason = f"the model's own parameters ({names}), used outside any submodule"
        if reason is None:
            foreign = [k for k, p in module._parameters.items()
                       if p is not None and p.requires_grad and id(p) not in self._index]
            if foreign:
                reason = f"parameters {foreign} are not in this optimizer"
        return reason

    def _coverage_report(self, model: nn.Module | None = None) -> dict:
        if model is not None:
            every = list(model.modules())
        else:
            # hosts give parameters only: find their owners among live modules
            every = live_modules()
        modules = [m for m in every if m._parameters]
        inner = {id(sub) for m in every for sub in list(m.modules())[1:]}
        self._top_ids = {id(m) for m in modules if id(m) not in inner}
        self._coverable_cache.clear()
        owners: dict[int, list[nn.Module]] = {}
        for m in modules:
            for p in m._parameters.values():
                if p is not None and id(p) in self._index:
                    owners.setdefault(id(p), []).append(m)
        covered: Counter[str] = Counter()
        uncovered: Counter[str] = Counter()
        generic: Counter[str] = Counter()
        reasons: dict[str, str] = {}
        elements = covered_elements = 0
        for p in self._params:
            ms = owners.get(id(p), [])
            ok = [m for m in ms if self._coverable(m)]
            elements += p.numel()
            if ok:
                covered[type(ok[0]).__name__] += 1
                covered_elements += p.numel()
                if self._route(ok[0]) == "generic":
                    generic[type(ok[0]).__name__] += 1
            else:
                name = type(ms[0]).__name__ if ms else "<no module>"
                uncovered[name] += 1
                reasons[name] = self._cover_reason(ms[0]) if ms else "owned by no module (e.g. flattened copy)"
        total = len(self._params)
        n_cov = sum(covered.values())
        fraction = covered_elements / elements if elements else 1.0
        cov = ", ".join(f"{k} {v}" for k, v in sorted(covered.items()))
        gen = ", ".join(f"{k} {v}" for k, v in sorted(generic.items()))
        unc = "; ".join(f"{k} {v} ({reasons[k]})" for k, v in sorted(uncovered.items())) or "none"
        via = f"; by the torch.func fallback: {gen}" if gen else ""
        line = (f"{type(self).__name__} coverage: {n_cov}/{total} parameter tensors, {100 * fraction:.2f}% of "
                f"parameter elements covered ({cov or 'none'}){via}; uncovered: {unc}")
        return {"covered": dict(covered), "uncovered": dict(uncovered), "generic": dict(generic), "reasons": reasons,
                "tensors": (n_cov, total), "elements": (covered_elements, elements), "element_fraction": fraction,
                "line": line}
