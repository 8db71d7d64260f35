"""Compaction during the backward (FNGD(compact=True), the default): a layer whose per-sample
gradients are smaller than its input and output gradient has them computed when the output
gradient arrives, and those two tensors are dropped. Same step as without (and as brute force),
less held until the step; a second backward through a compacted forward is counted, not wrong."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import snapshot
from oracle import flat, ngd_direction, per_sample_grads
from torch import nn

from fngd_plugin import FNGD

LAM = 0.37


class WideConv(nn.Module):
    """A first convolution over 20 x 20 = 400 positions (per-sample gradients 4 x 28 elements, much
    smaller than its input and output gradient: compacted), then one over 100 (token route: kept)."""

    def __init__(self, norm: bool = False):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.n1 = nn.BatchNorm2d(4) if norm else nn.Identity()
        self.c2 = nn.Conv2d(4, 2, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(2 * 10 * 10, 5)

    def forward(self, x):
        h = F.relu(self.n1(self.c1(x)), inplace=True)
        return self.fc(torch.tanh(self.c2(h)).flatten(1))


def ce(out, y):
    return F.cross_entropy(out, y)


def batch(n):
    return torch.randn(n, 3, 20, 20), torch.randint(0, 5, (n,))


def held_bytes(opt) -> dict[str, int]:
    """Bytes of captured inputs and output gradients per module name, after the backward."""
    out: dict[str, int] = {}
    for mb in opt._capture.pending:
        for module, calls in mb.calls.items():
            for c in calls:
                size = sum(t.numel() * t.element_size() for t in (c.a, c.delta) if t is not None)
                out[type(module).__name__] = out.get(type(module).__name__, 0) + size
    return out


def one_step(model, x, y, **kw):
    opt = FNGD(model.parameters(), lr=1.0, momentum=0.0, damping=LAM, damping_mode="absolute", normalize="none",
               reuse="off", **kw)
    before = snapshot(model)
    opt.zero_grad()
    ce(model(x), y).backward()
    held = held_bytes(opt)
    calls = {name: mb.calls[m][0] for mb in opt._capture.pending for name, m in model.named_children()
             if m in mb.calls}
    opt.step()
    return before - snapshot(model), held, calls, opt


def test_compacted_collect_step_is_damped_ngd(f64):
    model = WideConv()
    x, y = batch(6)
    gs = per_sample_grads(model, lambda out, y: ce(out, y), x, y)
    expected = ngd_direction(flat(gs, [k for k, _ in model.named_parameters()]), LAM)
    step, held, calls, opt = one_step(model, x, y)
    assert calls["c1"].grads is not None and calls["c1"].a is None and calls["c1"].delta is None  # compacted
    assert calls["c2"].grads is None and calls["c2"].a is not None  # kept: its own gradients are larger
    assert float((step - expected).norm() / expected.norm()) < 1e-8
    assert opt.stats()["unpreconditioned"] == {}


def test_compaction_changes_no_number_and_holds_less(f64):
    """With a train-mode BatchNorm (whose per-sample gradients treat the batch statistics as given,
    as every per-sample library does): the compacted step equals the uncompacted one, and what
    is held until the step shrinks by the compacted layers' inputs and output gradients."""
    x, y = batch(8)
    torch.manual_seed(1)
    a = WideConv(norm=True)
    b = WideConv(norm=True)
    b.load_state_dict(a.state_dict())
    step_c, held_c, calls, _ = one_step(a, x, y)
    step_u, held_u, _, _ = one_step(b, x, y, compact=False)
    assert float((step_c - step_u).norm() / step_u.norm()) < 1e-12
    assert calls["n1"].grads is not None and held_c["BatchNorm2d"] == 0  # a norm layer's: 2 x 4 per sample
    assert held_u["BatchNorm2d"] == 2 * x.shape[0] * 4 * 400 * 8  # its input and output gradient, float64
    assert held_u["Conv2d"] - held_c["Conv2d"] == x.shape[0] * (3 + 4) * 400 * 8  # c1's, compacted


def test_second_backward_through_a_compacted_forward_is_counted(f64):
    model = WideConv()
    x, y = batch(4)
    opt = FNGD(model.parameters(), lr=0.1, reuse="off")
    loss = ce(model(x), y)
    loss.backward(retain_graph=True)
    loss.backward()
    with pytest.warns(RuntimeWarning, match="second gradient .* compact=False"):
        opt.step()
    assert opt.stats()["unpreconditioned"] == {"twice_backward": 1}

    del opt
    model.zero_grad()
    plain = FNGD(model.parameters(), lr=0.1, reuse="off", compact=False)  # keeps what a second gradient needs
    loss = ce(model(x), y)
    loss.backward(retain_graph=True)
    loss.backward()
    plain.step()
    assert plain.stats()["unpreconditioned"] == {}


def test_compact_option_is_checked():
    with pytest.raises(ValueError, match="compact"):
        FNGD(nn.Linear(2, 2).parameters(), compact="yes")
