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

Loop shapes: ``zero_grad()`` drops only the batches whose backward already ran (an update the
host skipped, e.g. GradScaler on overflow); a forward waiting for its backward survives it, so
``loss = model(x); opt.zero_grad(); loss.backward()`` and closures that zero inside work.

Activation checkpointing: a forward that runs inside a backward (torch.utils.checkpoint,
fairseq's checkpoint_wrapper, timm's set_grad_checkpointing) is a recomputation, not a new
batch. It belongs to the batch whose backward is running (each batch remembers the autograd
graph tasks that delivered gradients to it). Non-reentrant checkpointing keeps the original
graph, so the calls recorded in the forward already get their gradients and the recomputed calls
are not recorded; reentrant checkpointing runs the segment without gradients first (counted per
module), and exactly those calls are recorded when they are recomputed. A model checkpointed
as a whole with reentrant checkpointing is first seen with gradients inside its backward: that
starts its batch.

torch.compile: a capturing batch runs an ``OptimizedModule`` eagerly
(``torch.compiler.set_stance("force_eager")``, so every hook fires); a batch that only needs its
root output (network-coefficient reuse) runs compiled. The hooks do nothing while dynamo traces.

Calls made under torch.func transforms, or while ``functional_call`` has swapped the module's
parameters for other tensors, are ignored. The hooks hold the capture only weakly and are removed
when it is garbage-collected. Nothing here knows about layer math or phases.
"""

from __future__ import annotations

import gc
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from .broadcast import SampleAlignment
from .samplers import sampler_meta

MAX_PENDING = 64


@dataclass
class Call:
    a: Tensor  # the first input (what the registered samplers use)
    meta: dict
    delta: Tensor | None = None
    recomputed: bool = False  # recorded while activation checkpointing recomputed the forward
    args: tuple = ()  # all inputs and keyword inputs (the torch.func fallback re-runs the module)
    kwargs: dict = field(default_factory=dict)
    out: Tensor | None = None  # kept only to check a subclass's math on its first call
    # per-sample gradients computed when the output gradient arrived (a PerSampleGrads), where they
    # are smaller than the input and output gradient they replace: those are then dropped
    grads: Any = None
    twice: bool = False  # a second output gradient arrived after the first was compacted away
    rows: int = 0  # its input was n*rows flattened rows, recorded as (n, rows, ...) (broadcast.py)
    unhook: Any = None  # removes the output-gradient hook (broadcast_output takes them from downstream)
    live: Any = None  # a weak reference to the output the model received


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
    n: int | None = None  # samples in the root's first input, where it has one
    # autograd graph tasks that delivered gradients to this batch (to place recomputed forwards)
    tasks: set[int] = field(default_factory=set)
    # calls of owned modules without gradients inside this forward (reentrant checkpointing), and
    # how many of them were recorded when recomputed
    nograd_calls: Counter = field(default_factory=Counter)
    recomputed: Counter = field(default_factory=Counter)
    row_outputs: dict[int, tuple[Any, int]] = field(default_factory=dict)  # flattened rows' outputs (broadcast.py)
    # a batch whose gradient the host discards (see FNGD.ignore_next_batch): captured only so that
    # this worker joins the step's collectives, with a zero contribution
    dummy: bool = False


def _functorch_active() -> bool:
    return torch._C._functorch.peek_interpreter_stack() is not None


def _graph_task() -> int:
    """The running backward's graph task id, -1 outside backward."""
    return torch._C._current_graph_task_id()


def _is_compiled_module(module: nn.Module) -> bool:
    dynamo = getattr(torch, "_dynamo", None)
    cls = getattr(getattr(dynamo, "eval_frame", None), "OptimizedModule", None)
    return cls is not None and isinstance(module, cls)


# Hooks of a capture garbage-collected while dynamo compiles wait here: dynamo builds guards on
# the global hook dict it traced, and a hook removed meanwhile breaks that compile (KeyError).
_deferred: list = []


def _compiling() -> bool:
    ctx = getattr(getattr(torch, "_guards", None), "CompileContext", None)
    return ctx is not None and ctx.try_get() is not None


def _remove_all(handles: list) -> None:
    if _compiling():
        _deferred.extend(handles)
        return
    while _deferred:
        _deferred.pop().remove()
    for h in handles:
        h.remove()


def live_modules(kind: type = nn.Module, params: Iterable[Tensor] | None = None) -> list[nn.Module]:
    """Live modules of type ``kind`` (hosts hand an optimizer parameters only, so their owners are
    found among the interpreter's objects), only those holding any of ``params`` when given."""
    found = [o for o in gc.get_objects() if issubclass(type(o), kind)]
    if params is None:
        return found
    ids = {id(p) for p in params}
    return [m for m in found if any(id(p) in ids for p in m.parameters())]


class ModuleCapture(SampleAlignment):
    """Global-hook capture filtered by parameter identity (see module docstring); calls whose inputs
    do not carry the batch the usual way are aligned with its samples by SampleAlignment (broadcast.py)."""

    def __init__(
        self,
        params: Iterable[Tensor],
        start_batch: Callable[[nn.Module, tuple], MicroBatch | None],
        coverable: Callable[[nn.Module], bool],
        keep_output: Callable[[nn.Module], bool] | None = None,
        on_delta: Callable[[nn.Module, Call, MicroBatch], None] | None = None,
    ):
        self._param_ids = {id(p) for p in params}
        self._start_batch = start_batch
        self._coverable = coverable
        self._keep_output = keep_output or (lambda module: False)
        self._on_delta = on_delta
        self.roots: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # modules that started batches
        # module -> list of (name, param) owned directly, or [] ; module -> witness or None
        self._owned: weakref.WeakKeyDictionary[nn.Module, list[tuple[str, Tensor]]] = weakref.WeakKeyDictionary()
        self._witness: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()
        self.batch_dims: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
        self.shared: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # declared: no sample dimension
        self.pending: list[MicroBatch] = []
        self.current: MicroBatch | None = None
        self._depth = 0
        self.root_mismatch = 0  # roots whose outputs had no tensor with the weights' batch size
        self.dropped = 0
        self.eval_forwards = 0  # forwards with gradients of a containing root in eval mode
        self._recomputing = False
        self._stances: list[Any] = []  # force_eager contexts entered for compiled modules

        ref = weakref.ref(self)

        def pre(module: nn.Module, args: tuple) -> None:
            cap = ref()
            if cap is not None:
                cap._pre(module, args)

        def post(module: nn.Module, args: tuple, *rest: Any) -> None:
            # (kwargs, output); torch calls an always_call hook with (output) alone when the
            # forward raised (e.g. non-reentrant checkpointing stopping its recomputation early)
            cap = ref()
            if cap is not None:
                kwargs, out = rest if len(rest) == 2 else ({}, rest[0])
                return cap._post(module, args, kwargs, out)

        _remove_all([])  # hooks of collected captures deferred by a compile: gone now
        self._handles = [
            _module.register_module_forward_pre_hook(pre),
            _module.register_module_forward_hook(post, with_kwargs=True, always_call=True),
        ]
        weakref.finalize(self, _remove_all, list(self._handles))

    # ------------------------------------------------------------------ ownership
    def owned_params(self, module: nn.Module) -> list[tuple[str, Tensor]]:
        owned = self._owned.get(module)
        if owned is None:
            owned = [(k, p) for k, p in module._parameters.items() if p is not None and id(p) in self._param_ids]
            self._owned[module] = owned
        return owned

    def has_foreign(self, root: nn.Module) -> bool:
        """Whether ``root`` has trainable parameters that are not ours (another optimizer's)."""
        return any(p.requires_grad and id(p) not in self._param_ids for p in root.parameters())

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
        if torch.compiler.is_compiling():
            return
        if not torch.is_grad_enabled():
            mb = self.current
            if mb is not None and mb.capture and self._depth > 0 and self._records(module):
                mb.nograd_calls[module] += 1  # a reentrant-checkpointed segment: recomputed in backward
            return
        if _functorch_active() or not self._contains(module):
            return
        self._depth += 1
        if self._depth == 1:
            task = _graph_task()
            target = self._recompute_target(task) if task >= 0 else None
            self._recomputing = target is not None
            if target is not None:
                self.current = target
            elif not module.training:
                self.current = None
                self.eval_forwards += 1
            else:
                self.current = self._start_batch(module, args)
                if self.current is not None:
                    self.roots.add(module)
                    self.current.n = self._root_samples(module, args)
                    if len(self.pending) >= MAX_PENDING:  # forwards without step()/zero_grad(): do not hoard
                        del self.pending[0]
                        if not self.dropped:
                            warnings.warn(f"fngd_plugin: {MAX_PENDING} training forwards without optimizer.step() "
                                          "or zero_grad(); the oldest captured batches are being dropped (is the "
                                          "optimizer still in use?)", RuntimeWarning, stacklevel=2)
                        self.dropped += 1
                    self.pending.append(self.current)
        mb = self.current
        if mb is not None and mb.capture and _is_compiled_module(module):
            stance = torch.compiler.set_stance("force_eager")  # takes effect now; exited in _post
            stance.__enter__()
            self._stances.append((module, stance))

    def _records(self, module: nn.Module) -> bool:
        owned = self.owned_params(module)
        return bool(owned) and all(module._parameters.get(k) is p for k, p in owned) and self._coverable(module)

    def _recompute_target(self, task: int) -> MicroBatch | None:
        """The batch a forward run inside backward task ``task`` recomputes, or None (a new batch)."""
        for mb in reversed(self.pending):
            if task in mb.tasks:
                return mb
        for mb in reversed(self.pending):  # no gradient has reached it yet: a segment left over
            if sum(mb.nograd_calls.values()) > sum(mb.recomputed.values()):
                return mb
        return None

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        """The forward hook; returns a replacement output (broadcast.py) or None."""
        if torch.compiler.is_compiling() or not self._active() or not self._contains(module):
            return None
        if self._stances and self._stances[-1][0] is module:
            self._stances.pop()[1].__exit__(None, None, None)
        mb = self.current
        replaced = None
        if mb is not None and mb.capture and self._records(module):
            if not self._recomputing:
                replaced = self._record(mb, module, args, kwargs, out)
            elif mb.nograd_calls[module] > mb.recomputed[module]:
                mb.recomputed[module] += 1
                replaced = self._record(mb, module, args, kwargs, out, recomputed=True)
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0 and mb is not None:
            if not self._recomputing:
                self._hook_root(mb, module, out if replaced is None else replaced)
            self.current = None
            self._recomputing = False
        return replaced

    def _record(self, mb: MicroBatch, module: nn.Module, args: tuple, kwargs: dict, out: Any,
                recomputed: bool = False) -> Tensor | None:
        whole = out
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
            out = out[0]  # (output, extras): nn.MultiheadAttention returns (attention output, weights)
        if not args or not isinstance(args[0], Tensor) or not isinstance(out, Tensor) or not out.requires_grad:
            return None
        args, out, replaced, rows = self._align(mb, module, args, kwargs, out, whole is out)
        detached = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
        kept = (out if not rows else out.reshape(mb.n, rows, *out.shape[1:])).detach()
        call = Call(detached[0], sampler_meta(module), recomputed=recomputed, args=detached, kwargs=dict(kwargs),
                    out=kept if self._keep_output(module) else None, rows=rows, live=weakref.ref(out))
        mb.calls.setdefault(module, []).append(call)

        on_delta = self._on_delta

        def on_grad(g: Tensor) -> None:
            mb.backward_seen = True
            mb.tasks.add(_graph_task())
            g = g.reshape(-1, rows, *g.shape[1:]) if rows else g
            if call.grads is not None or call.twice:  # its input is gone: this gradient cannot be added
                call.grads, call.twice = None, True
                return
            call.delta = g if call.delta is None else call.delta + g
            if on_delta is not None:
                on_delta(module, call, mb)

        base = out._base if out._is_view() else None
        if (base is not None and base.grad_fn is not None and base.numel() == out.numel() and base.is_contiguous()
                and out.is_contiguous()):  # a reshape of its base (a permuted view is not)
            # The output is a view (nn.Linear on a contiguous 3-D input returns one). An in-place op
            # on a view re-bases its history and drops tensor hooks registered on it, so listen on
            # the node that produced the base instead: it still runs, with the same gradient.
            shape = out.shape
            call.unhook = base.grad_fn.register_hook(lambda grad_in, grad_out: on_grad(grad_out[0].reshape(shape)))
        else:
            call.unhook = out.register_hook(on_grad)
        return replaced

    def _hook_root(self, mb: MicroBatch, module: nn.Module, out: Any) -> None:
        """Hooks on the root's outputs: they tell which backward runs this batch, and rescale the
        output gradients per sample when the batch asks for it (network-coefficient reuse)."""
        bd = self.batch_dims.get(module, 0)
        outs = [t for t in _tensors(out) if t.requires_grad]
        w = None
        if mb.reweight is not None:
            sized = [t for t in outs if t.dim() > bd and (mb.n is None or t.shape[bd] == mb.n)]
            if sized:
                w = mb.reweight(sized[0].shape[bd])
        hooked = False
        for t in outs:
            wt = None
            if w is not None and t.dim() > bd and t.shape[bd] == w.numel():
                shape = [1] * t.dim()
                shape[bd] = -1
                wt = w.view(shape)
                hooked = True

            def seen(g: Tensor, wt: Tensor | None = wt) -> Tensor | None:
                mb.backward_seen = True
                mb.tasks.add(_graph_task())
                return None if wt is None else g * wt.to(g.dtype)

            t.register_hook(seen)
        if mb.reweight is not None:
            mb.root_scaled = hooked
            if not hooked:
                self.root_mismatch += 1

    def take(self) -> list[MicroBatch]:
        """The micro-batches since the last take whose backward reached us; clears the queue."""
        done = [mb for mb in self.pending if mb.backward_seen]
        self.pending = []
        return done

    def discard_finished(self) -> list[MicroBatch]:
        """zero_grad(): drop the batches whose backward already ran (their gradient is being thrown
        away: an update the host skipped); keep forwards still waiting for their backward."""
        gone = [mb for mb in self.pending if mb.backward_seen]
        self.pending = [mb for mb in self.pending if not mb.backward_seen]
        return gone


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []
