"""Finding the modules that own an optimizer's parameters, and recording what they see.

Hosts (timm's create_optimizer_v2, fairseq's build_optimizer) hand an optimizer parameters only.
:class:`ModuleCapture` installs one pair of torch's *global* module forward hooks and filters by
parameter identity: a module is *owned* if one of its direct parameters is one of ours, and a
module *contains* ours if any parameter below it is. Everything else returns at once.

* The outermost call of a containing module in training mode with gradients enabled (the *root*:
  the model, or its DDP wrapper) starts a :class:`MicroBatch`: one forward/backward pass.
* Each call of an owned module records its input and, through a hook on its output tensor, the
  gradient of the loss with respect to that output (registered before any in-place op that
  follows, so it sees the gradient of the module's own output).
* Optionally the root's output gradients are rescaled per sample: that is how a weighted loss
  sum_i w_i l_i is obtained from the host's ordinary loss in one ordinary backward.

Calls made under torch.func transforms, or while ``functional_call`` has swapped the module's
parameters for other tensors, are ignored. The hooks hold the capture only weakly and are removed
when it is garbage-collected. Nothing here knows about layer math or phases.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from .samplers import sampler_meta

MAX_PENDING = 64


@dataclass
class Call:
    a: Tensor
    meta: dict
    delta: Tensor | None = None


@dataclass
class MicroBatch:
    """One forward/backward pass between optimizer steps (several with gradient accumulation)."""

    position: int
    epoch: int
    collect: bool
    capture: bool
    ids: Tensor | None = None
    # per-sample multipliers for the root output gradients, given the batch size seen there
    reweight: Callable[[int], Tensor] | None = None
    calls: dict[nn.Module, list[Call]] = field(default_factory=dict)
    backward_seen: bool = False
    root_scaled: bool = False
    # a batch whose gradient the host discards (see FNGD.ignore_next_batch): captured only so that
    # this worker joins the step's collectives, with a zero contribution
    dummy: bool = False


def _functorch_active() -> bool:
    return torch._C._functorch.peek_interpreter_stack() is not None


def _remove_all(handles: list) -> None:
    for h in handles:
        h.remove()


class ModuleCapture:
    """Global-hook capture filtered by parameter identity (see module docstring)."""

    def __init__(
        self,
        params: Iterable[Tensor],
        start_batch: Callable[[nn.Module, tuple], MicroBatch | None],
        coverable: Callable[[nn.Module], bool],
    ):
        self._param_ids = {id(p) for p in params}
        self._start_batch = start_batch
        self._coverable = coverable
        # module -> list of (name, param) owned directly, or [] ; module -> witness or None
        self._owned: weakref.WeakKeyDictionary[nn.Module, list[tuple[str, Tensor]]] = weakref.WeakKeyDictionary()
        self._witness: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()
        self.batch_dims: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
        self.pending: list[MicroBatch] = []
        self.current: MicroBatch | None = None
        self._depth = 0
        self.root_mismatch = 0  # roots whose outputs had no tensor with the weights' batch size
        self.dropped = 0

        ref = weakref.ref(self)

        def pre(module: nn.Module, args: tuple) -> None:
            cap = ref()
            if cap is not None:
                cap._pre(module, args)

        def post(module: nn.Module, args: tuple, out: Any) -> None:
            cap = ref()
            if cap is not None:
                cap._post(module, args, out)

        self._handles = [
            _module.register_module_forward_pre_hook(pre),
            _module.register_module_forward_hook(post, always_call=True),
        ]
        weakref.finalize(self, _remove_all, list(self._handles))

    # ------------------------------------------------------------------ ownership
    def owned_params(self, module: nn.Module) -> list[tuple[str, Tensor]]:
        owned = self._owned.get(module)
        if owned is None:
            owned = [(k, p) for k, p in module._parameters.items() if p is not None and id(p) in self._param_ids]
            self._owned[module] = owned
        return owned

    def _contains(self, module: nn.Module) -> bool:
        if module not in self._witness:
            witness = None
            for sub in module.modules():
                owned = self.owned_params(sub)
                if owned:
                    witness = (weakref.ref(sub), owned[0][0], owned[0][1])
                    break
            self._witness[module] = witness
        witness = self._witness[module]
        if witness is None:
            return False
        sub, name, p = witness
        sub = sub()
        return sub is not None and sub._parameters.get(name) is p  # not swapped by functional_call

    def _active(self) -> bool:
        return torch.is_grad_enabled() and not _functorch_active()

    # ------------------------------------------------------------------ hooks
    def _pre(self, module: nn.Module, args: tuple) -> None:
        if not self._active() or not self._contains(module):
            return
        self._depth += 1
        if self._depth == 1:
            self.current = self._start_batch(module, args) if module.training else None
            if self.current is not None:
                if len(self.pending) >= MAX_PENDING:  # forwards without step()/zero_grad(): do not hoard
                    del self.pending[0]
                    if not self.dropped:
                        warnings.warn(f"fngd_plugin: {MAX_PENDING} training forwards without optimizer.step() or "
                                      "zero_grad(); the oldest captured batches are being dropped (is the "
                                      "optimizer still in use?)", RuntimeWarning, stacklevel=2)
                    self.dropped += 1
                self.pending.append(self.current)

    def _post(self, module: nn.Module, args: tuple, out: Any) -> None:
        if not self._active() or not self._contains(module):
            return
        mb = self.current
        if mb is not None and mb.capture:
            owned = self.owned_params(module)
            if owned and all(module._parameters.get(k) is p for k, p in owned) and self._coverable(module):
                self._record(mb, module, args, out)
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0 and mb is not None:
            if mb.reweight is not None:
                self._scale_root_outputs(mb, module, out)
            self.current = None

    def _record(self, mb: MicroBatch, module: nn.Module, args: tuple, out: Any) -> None:
        if not args or not isinstance(args[0], Tensor) or not isinstance(out, Tensor) or not out.requires_grad:
            return
        call = Call(args[0].detach(), sampler_meta(module))
        mb.calls.setdefault(module, []).append(call)

        def on_grad(g: Tensor) -> None:
            call.delta = g if call.delta is None else call.delta + g
            mb.backward_seen = True

        base = out._base if out._is_view() else None
        if base is not None and base.grad_fn is not None and base.numel() == out.numel() and base.is_contiguous():
            # The output is a view (nn.Linear on a contiguous 3-D input returns one). An in-place op
            # on a view re-bases its history and drops tensor hooks registered on it, so listen on
            # the node that produced the base instead: it still runs, with the same gradient.
            shape = out.shape
            base.grad_fn.register_hook(lambda grad_inputs, grad_outputs: on_grad(grad_outputs[0].reshape(shape)))
        else:
            out.register_hook(on_grad)

    def _scale_root_outputs(self, mb: MicroBatch, module: nn.Module, out: Any) -> None:
        assert mb.reweight is not None
        bd = self.batch_dims.get(module, 0)
        outs = [t for t in _tensors(out) if t.requires_grad and t.dim() > bd]
        hooked = False
        if not outs:
            self.root_mismatch += 1
            return
        w = mb.reweight(outs[0].shape[bd])
        for t in outs:
            if t.shape[bd] == w.numel():
                shape = [1] * t.dim()
                shape[bd] = -1
                wt = w.view(shape)

                def scale(g: Tensor, wt: Tensor = wt) -> Tensor:
                    mb.backward_seen = True
                    return g * wt.to(g.dtype)

                t.register_hook(scale)
                hooked = True
        mb.root_scaled = hooked
        if not hooked:
            self.root_mismatch += 1

    def take(self) -> list[MicroBatch]:
        """The micro-batches since the last take whose backward reached us; clears the queue."""
        done = [mb for mb in self.pending if mb.backward_seen]
        self.clear()
        return done

    def clear(self) -> None:
        self.pending = []
        self.current = None
        self._depth = 0


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []
