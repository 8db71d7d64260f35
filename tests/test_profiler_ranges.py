"""FNGD and KFAC name their phases in torch.profiler traces (benchmarks/collect_profile.py reads
them): a collect step shows its Grams, solve and weighted sums per layer type; a network reuse
step shows none of them (it only reweights the host's backward)."""

import torch
import torch.nn.functional as F
from torch import nn

from fngd_plugin import FNGD, KFAC


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _ranges(model, opt) -> set[str]:
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return {ev.key for ev in prof.key_averages() if ev.key.startswith(("fngd.", "kfac."))}


def test_collect_step_names_its_phases_per_layer_type():
    model = _model()
    opt = FNGD(model.parameters(), lr=0.1, steps_per_epoch=2)
    got = _ranges(model, opt)
    for want in ("fngd.precondition", "fngd.update", "fngd.solve", "fngd.scale", "fngd.check_capture",
                 "fngd.gram.Conv2d", "fngd.gram.BatchNorm2d", "fngd.gram.Linear",
                 "fngd.weighted.Conv2d", "fngd.weighted.Linear",
                 "fngd.compact.BatchNorm2d"):  # a norm layer's per-sample gradients, during the backward
        assert want in got, (want, sorted(got))
    # the capture check runs once; later collect steps do not repeat it
    assert "fngd.check_capture" not in _ranges(model, opt)


def test_network_reuse_step_solves_nothing():
    model = _model()
    opt = FNGD(model.parameters(), lr=0.1, steps_per_epoch=1)
    first = _ranges(model, opt)  # epoch 0: collect
    assert "fngd.solve" in first
    got = _ranges(model, opt)  # epoch 1: reuse
    assert "fngd.precondition" in got and "fngd.update" in got
    assert not [k for k in got if k.startswith(("fngd.gram", "fngd.solve", "fngd.weighted", "fngd.compact"))], got


def test_kfac_names_its_step():
    model = _model()
    got = _ranges(model, KFAC(model.parameters(), lr=0.1))
    assert {"kfac.precondition", "kfac.update"} <= got
