"""Aligning module calls with the batch's samples where their inputs do not carry it the usual way.

FNGD needs, for every recorded call, its input and output gradient per sample (sample dimension
first, or where ``set_batch_dim`` says). Three shapes break that, and are made exact here:

* A batch of one broadcast into the batch (GPT-2's and BERT's position embeddings on position ids
  of shape (1, T)): the module's output is handed to the model as ``out.expand(n, ...)``, a view
  with the same values, which the model broadcasts into per-sample tensors exactly as it would the
  original; autograd then delivers its output gradient per sample. Only where every tensor input
  has size 1 in the batch dimension, and assuming the model uses the output by broadcasting.
* Flattened rows (hidden states reshaped to (n*k, d) before a norm or an FFN, or the output of
  such a row-wise module passed on directly): recorded as (n, k, ...) when the input is a reshape
  of an (n, k, ...) tensor, read from the reshape's autograd node.
* A table output permuted into a shared bias (T5's relative attention bias): the host adapter
  calls :meth:`SampleAlignment.broadcast_output` with the bias and the pullback of the permutation.

The batch's n is the root's first positional tensor, else its keyword input (``call_kwargs``:
``input_ids``, ``pixel_values``, ...). Calls that still do not carry n samples are counted by the
optimizer (``call_samples``, ``batch_size``), never an error.
"""

from __future__ import annotations

import math
import sys
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


class SampleAlignment:
    """ModuleCapture's part that aligns calls with the batch's samples (module docstring). Uses the
    capture's ``batch_dims``, ``shared``, ``current``, ``_recomputing`` and ``_on_delta``."""

    def _root_samples(self, root: nn.Module, args: tuple) -> int | None:
        """The batch's n: the root's first positional tensor, or for a keyword-only call (Hugging Face
        models) its batch-carrying keyword input."""
        bd = self.batch_dims.get(root, 0)
        if args and isinstance(args[0], Tensor) and args[0].dim() > bd:
            return args[0].shape[bd]
        return batch_of(call_kwargs(root), bd) if not args else None

    def _align(self, mb: Any, module: nn.Module, args: tuple, kwargs: dict, out: Tensor,
               plain: bool) -> tuple[tuple, Tensor, Tensor | None, int]:
        """(args, output, replacement output or None, rows per sample or 0) of a call about to be
        recorded: a batch-of-one output expanded to n (``plain``: the module returned this tensor
        alone, so it can be replaced), or flattened rows reshaped to (n, rows, ...)."""
        n = self._shared_input(mb, module, args, kwargs, out) if plain else None
        if n is not None:
            bd = self.batch_dims.get(module, 0)
            size = list(out.shape)
            size[bd] = n
            out = out.expand(size)  # the same values; the gradient now arrives per sample
            first = args[0].expand([n if d == bd else s for d, s in enumerate(args[0].shape)])
            return (_contiguous_indices(first), *args[1:]), out, out, 0
        rows = self._flattened_rows(mb, module, args[0])
        if rows:
            flat = args[0].shape[0]
            if out.dim() and out.shape[0] == flat:  # a row-wise module's output: the same rows
                mb.row_outputs[id(out)] = (weakref.ref(out), rows)
            args = tuple(t.reshape(mb.n, rows, *t.shape[1:])
                         if isinstance(t, Tensor) and t.dim() and t.shape[0] == flat else t for t in args)
        return (_contiguous_indices(args[0]), *args[1:]), out, None, rows

    def _shared_input(self, mb: Any, module: nn.Module, args: tuple, kwargs: dict, out: Tensor) -> int | None:
        """n, where ``module`` was called with inputs that are a batch of one (every tensor input of
        size 1 in the batch dimension) while the batch has n > 1 samples, and returned a batch of
        one: its output can be handed on expanded to n samples. None otherwise."""
        bd = self.batch_dims.get(module, 0)
        n = mb.n
        if n is None or n <= 1 or module in self.shared or out.dim() <= bd or out.shape[bd] != 1:
            return None
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)]
        if args[0].dim() <= bd or any(t.dim() > bd and t.shape[bd] != 1 for t in tensors):
            return None
        return n

    def _flattened_rows(self, mb: Any, module: nn.Module, a: Tensor) -> int:
        """k, where the input ``a`` (rows first) is a reshape of an (n, k, ...) tensor of this batch's
        n samples (sample i's rows are then i k .. (i + 1) k - 1); 0 otherwise."""
        n = mb.n
        if (n is None or n <= 1 or self.batch_dims.get(module, 0) != 0 or module in self.shared or a.dim() < 1
                or a.shape[0] == n or a.shape[0] % n):
            return 0
        known = mb.row_outputs.get(id(a))
        if known is not None and known[0]() is a:
            return known[1]
        return a.shape[0] // n if reshaped_from_samples(a, n) else 0

    def broadcast_output(self, module: nn.Module, used: Tensor, pullback: Callable[[Tensor], Tensor]) -> Tensor:
        """For a recorded module whose output the model turns into ``used``, a batch of one (size 1
        in dimension 0) that it broadcasts into per-sample tensors (T5's relative attention bias,
        permuted to (1, heads, q, k) and added to every layer's scores): returns ``used`` expanded
        to the batch's n samples (the same values), and takes the module's per-sample output
        gradient from the gradient that view receives, ``pullback`` mapping (n, *used.shape[1:])
        to (n, *output.shape). The module's inputs are then the same for every sample. Returns
        ``used`` itself where nothing is captured (reuse steps), the call is not recorded, or
        ``pullback`` does not take ``used`` back to the module's output (checked on the values:
        ``used`` must be a permutation or reshape of it, whose pullback is its inverse)."""
        mb = self.current
        if (mb is None or not mb.capture or self._recomputing or mb.n is None or mb.n <= 1 or used.dim() == 0
                or used.shape[0] != 1 or not used.requires_grad):
            return used
        calls = mb.calls.get(module)
        if not calls or calls[-1].unhook is None or calls[-1].rows or calls[-1].delta is not None:
            return used
        call, n = calls[-1], mb.n
        source = call.live() if call.live is not None else None
        with torch.no_grad():  # pullback must undo the model's permutation / reshape of the output
            back = pullback(used.detach())
        if source is None or back.shape[1:] != source.shape or not torch.equal(back[0], source.detach()):
            return used
        call.a = call.a.unsqueeze(0).expand(n, *call.a.shape).contiguous()
        call.args = (call.a, *call.args[1:])
        call.unhook.remove()  # its own output gradient is the batch's sum of what this view sees
        call.unhook = None
        on_delta = self._on_delta

        def on_grad(g: Tensor) -> None:
            mb.backward_seen = True
            mb.tasks.add(torch._C._current_graph_task_id())
            d = pullback(g)
            call.delta = d if call.delta is None else call.delta + d
            if on_delta is not None:
                on_delta(module, call, mb)

        expanded = used.expand(n, *used.shape[1:])
        expanded.register_hook(on_grad)
        return expanded


def _contiguous_indices(t: Any) -> Any:
    """Integer inputs (indices: small; the samplers search them) made contiguous (BERT's token types
    are an expanded buffer)."""
    if isinstance(t, Tensor) and not t.is_floating_point() and not t.is_contiguous():
        return t.contiguous()
    return t


def call_samples(call: Any, bd: int, generic: bool) -> int | None:
    """The number of samples a recorded call carries (None: its input has no batch dimension);
    ``generic``: read from its output gradient (the torch.func fallback's batch dimension ``bd``)."""
    if call.grads is not None:
        return call.grads.n
    if generic:
        return call.delta.shape[bd] if call.delta is not None and call.delta.dim() > bd else None
    return call.a.shape[bd] if call.a.dim() > bd else None


def misaligned(hint: int | None, samples: dict[nn.Module, list[int | None]]) -> dict[nn.Module, tuple[str, str]]:
    """The modules whose calls do not carry the batch's n samples, with (cause, detail). n is the
    model input's (``hint``) where some call carries it, else the most common among the calls'.
    'broadcast': no sample dimension, or a batch of one whose output could not be expanded;
    'sample_mismatch': any other leading dimension."""
    votes = Counter(s for sizes in samples.values() for s in sizes if s is not None)
    n = hint if hint is not None and hint in votes else (votes.most_common(1)[0][0] if votes else hint)
    off = {}
    for module, sizes in samples.items():
        if set(sizes) != {n}:
            shared = set(sizes) <= {None, 1}
            off[module] = ("broadcast", "") if shared else (
                "sample_mismatch", f": leading dimension {sorted({s or 0 for s in sizes})} against {n} samples")
    return off


# keyword inputs that carry the batch, in order of preference, for models called with keywords only
BATCH_KEYWORDS = ("input_ids", "pixel_values", "inputs_embeds", "input_values", "input_features",
                  "decoder_input_ids")


def call_kwargs(module: nn.Module) -> dict:
    """The keyword arguments of the call of ``module`` whose forward pre-hooks are running: torch
    hands a global forward pre-hook the positional ones only, so they are read from the frame of
    torch's ``Module._call_impl`` that runs the hooks. {} where that frame is not found."""
    frame = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            break
        if frame.f_code.co_name in ("inner", "_call_impl", "_wrapped_call_impl"):
            loc = frame.f_locals
            if loc.get("self") is module and isinstance(loc.get("kwargs"), dict):
                return loc["kwargs"]
        frame = frame.f_back
    return {}


def batch_of(kwargs: dict, bd: int) -> int | None:
    """The batch size of a keyword-only call: its first batch-carrying keyword input (BATCH_KEYWORDS),
    else its first tensor with a batch dimension."""
    named = [kwargs.get(k) for k in BATCH_KEYWORDS]
    for t in [*named, *kwargs.values()]:
        if isinstance(t, Tensor) and t.dim() > bd:
            return t.shape[bd]
    return None


_VIEW_NODES = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0")


def reshaped_from_samples(t: Tensor, n: int) -> bool:
    """Whether ``t`` is a reshape of a tensor shaped (n, d1, ..., dk, ...) whose leading dimensions
    (n, d1, ..., dk) were merged into t's first (row-major: sample i's rows are contiguous). Read from
    the reshape's autograd node, or, without autograd, from the tensor ``t`` is a view of."""
    node = t.grad_fn
    sizes = None
    if node is not None and type(node).__name__ in _VIEW_NODES:
        sizes = tuple(int(s) for s in getattr(node, "_saved_self_sym_sizes", ()))
    elif node is None and t._is_view() and t._base is not None and t._base.numel() == t.numel():
        sizes = tuple(t._base.shape)
    if not sizes or sizes[0] != n:
        return False
    return any(math.prod(sizes[:j]) == t.shape[0] for j in range(2, len(sizes) + 1))


