"""Coverage of the layers people train: timm's own layers, subclasses that override forward(),
the torch.func fallback for modules without a sampler, and timm's model families.

Exactness: one collect step of a model built from these layers equals brute-force damped NGD
(torch.func per-sample gradients, float64). Coverage: the tiny/small variant of each timm family
(random init, no download) has >= 99% of its parameter elements and >= 95% of its tensors
covered, and one collect step runs with every covered layer's captured gradients matching the
host's (FNGD checks that itself on the first solve and warns otherwise)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from models import snapshot
from oracle import flat, per_sample_grads
from torch import nn

from fngd_plugin import FNGD, KFAC

timm = pytest.importorskip("timm")
from timm.layers import (  # noqa: E402
    BatchNormAct2d,
    GroupNorm,
    GroupNorm1,
    LayerNorm,
    LayerNorm2d,
    LayerScale,
    LayerScale2d,
    RmsNorm,
    RmsNorm2d,
)
from timm.layers import Linear as TimmLinear  # noqa: E402
from timm.models.convnext import ConvNeXtBlock  # noqa: E402

LAM = 0.3


def damped_ngd(model, x, y) -> torch.Tensor:
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    U = flat(per_sample_grads(model, F.cross_entropy, x, y), names)
    n = U.shape[0]
    return U.T @ torch.linalg.solve(U @ U.T + n * LAM * torch.eye(n, dtype=U.dtype), torch.ones(n, dtype=U.dtype))


def one_step(model, x, y, **kw) -> tuple[torch.Tensor, FNGD, list[str]]:
    opt = FNGD([p for p in model.parameters() if p.requires_grad], lr=1.0, momentum=0.0, damping=LAM,
               damping_mode="absolute", normalize="none", reuse="off", **kw)
    before = snapshot(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return before - snapshot(model), opt, [str(w.message) for w in caught]


class ImageLayers(nn.Module):
    """timm's image-model layers, BatchNorm statistics frozen (eval) so that brute force is exact."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_act = BatchNormAct2d(8, act_layer=nn.SiLU)  # subclass: BatchNorm2d then act
        self.ln2d = LayerNorm2d(8)  # subclass normalising channels: the torch.func fallback
        self.rms2d = RmsNorm2d(8)
        self.gn = GroupNorm(8, num_groups=2)
        self.gn1 = GroupNorm1(8)
        self.ls2d = LayerScale2d(8, init_values=0.5)
        self.block = ConvNeXtBlock(8, conv_mlp=True, ls_init_value=0.5)  # gamma owned by the block itself
        self.ln = LayerNorm(8)
        self.rms = RmsNorm(8)
        self.ls = LayerScale(8, init_values=0.7)
        self.head = TimmLinear(8, 4)  # subclass with the same math as nn.Linear

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        h = self.gn1(self.gn(self.rms2d(self.ln2d(self.bn_act(h)))))
        h = self.block(self.ls2d(h)).mean((2, 3))
        return self.head(self.ls(self.rms(self.ln(h))))


class SeqLayers(nn.Module):
    """torch's Conv1d, BatchNorm1d (eval), GroupNorm, RMSNorm and MultiheadAttention (packed
    in_proj, out_proj used through F.multi_head_attention_forward), all without a registered sampler."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm1d(6)
        self.gn = nn.GroupNorm(3, 6)
        self.rms = nn.RMSNorm(6)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=batch_first)
        self.head = nn.Linear(6, 4)
        self.batch_first = batch_first

    def forward(self, x):  # x: (n, 3, T)
        h = self.gn(self.bn(torch.tanh(self.conv(x))))
        h = self.rms(h.transpose(1, 2))  # (n, T, 6)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.attn(h, h, h)[0]
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h.mean(1))


def _freeze_bn_stats(model):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            with torch.no_grad():
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)


def test_timm_layers_collect_step_is_exact(f64):
    model = ImageLayers().double()
    _freeze_bn_stats(model)
    x, y = torch.randn(5, 3, 6, 6), torch.randint(0, 4, (5,))
    expected = damped_ngd(model, x, y)
    step, opt, caught = one_step(model, x, y)
    cov = opt.coverage
    assert cov["uncovered"] == {} and cov["element_fraction"] == 1.0, cov["line"]
    assert {"RmsNorm2d", "GroupNorm", "GroupNorm1", "LayerScale2d", "ConvNeXtBlock", "RmsNorm",
            "LayerScale"} <= set(cov["generic"]), cov["line"]
    assert "BatchNormAct2d" not in cov["generic"] and "Linear" not in cov["generic"]  # their parents' samplers
    assert opt._route(model.bn_act) == "subclass" and opt._route(model.head) == "subclass"
    assert opt._route(model.ln2d) == "generic"  # LayerNorm2d's math is not LayerNorm's: checked, fell back
    assert opt._route(model.ln) == "subclass"  # timm's LayerNorm is
    assert not caught, caught
    assert float((step - expected).norm() / expected.norm()) < 1e-8
    assert opt.stats()["unpreconditioned"] == {}


@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_layers_without_sampler_collect_step_is_exact(f64, batch_first):
    torch.manual_seed(0)
    model = SeqLayers(batch_first).double()
    _freeze_bn_stats(model)
    x, y = torch.randn(5, 3, 7), torch.randint(0, 4, (5,))
    expected = damped_ngd(model, x, y)
    step, opt, caught = one_step(model, x, y)
    assert opt.coverage["uncovered"] == {}, opt.coverage["line"]
    assert {"Conv1d", "BatchNorm1d", "GroupNorm", "RMSNorm", "MultiheadAttention"} <= set(opt.coverage["generic"])
    assert not caught, caught
    assert float((step - expected).norm() / expected.norm()) < 1e-8


def test_batch_statistics_and_dropout_are_not_passed_off_as_per_sample(f64):
    """A module the fallback covers that mixes samples (train-mode BatchNorm1d) or draws random
    numbers (dropout inside a block) in training gets the plain gradient: counted, warned, named."""
    model = SeqLayers(True).double()  # BatchNorm1d in training mode
    x, y = torch.randn(5, 3, 7), torch.randint(0, 4, (5,))
    _, opt, caught = one_step(model, x, y)
    assert opt.stats()["unpreconditioned"] == {"not_independent": 1}
    assert any("BatchNorm1d in training mode mixes samples" in w for w in caught), caught
    off = FNGD(model.parameters(), lr=0.1, generic_fallback=False)
    assert {"Conv1d", "BatchNorm1d", "MultiheadAttention"} <= set(off.coverage["uncovered"])


def test_a_module_vmap_cannot_run_is_dropped_with_a_warning(f64):
    """nn.GRU updates tensors in place: torch.func's vmap refuses it. The step goes on without it
    (plain gradient for its parameters), counted and named, and it is not tried again."""
    class RNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(3, 5, batch_first=True)
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            return self.head(self.gru(x)[0][:, -1])

    model = RNN().double()
    x, y = torch.randn(4, 6, 3), torch.randint(0, 2, (4,))
    _, opt, caught = one_step(model, x, y)
    assert opt.stats()["unpreconditioned"] == {"fallback_failed": 1}
    assert any("could not run a module under vmap" in w and "GRU" in w for w in caught), caught
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.stats()["unpreconditioned"] == {"fallback_failed": 1} and opt.stats()["collect_steps"] == 2


def test_kfac_keeps_its_own_coverage_rules():
    model = ImageLayers()
    cov = KFAC(model.parameters(), lr=0.1).coverage
    assert set(cov["covered"]) == {"Conv2d"}  # stem and the block's convolutions; timm's Linear overrides forward
    assert "Linear" in cov["uncovered"] and "LayerNorm2d" in cov["uncovered"], cov["line"]
    assert "% of parameter elements covered" in cov["line"]


FAMILIES = {
    "resnet18": {}, "resnext26ts": {}, "convnext_atto": {},
    "vit_tiny_patch16_224": {"img_size": 32, "patch_size": 8},
    "deit_tiny_patch16_224": {"img_size": 32, "patch_size": 8},
    "efficientnet_b0": {}, "mobilenetv3_small_050": {}, "regnetx_002": {},
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_timm_families_are_covered(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **FAMILIES[name])
    opt = FNGD(model.parameters(), lr=0.01, reuse="off")
    cov = opt.coverage
    tensors, total = cov["tensors"]
    assert cov["element_fraction"] >= 0.99 and tensors >= 0.95 * total, cov["line"]
    if cov["uncovered"]:  # only the model's own position / class tokens, reported by name
        assert cov["uncovered"] == {"VisionTransformer": 2}, cov["line"]
        assert "cls_token, pos_embed" in cov["reasons"]["VisionTransformer"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 5, (4,))).backward()
        opt.step()
    assert not [str(w.message) for w in caught if "FNGD" in str(w.message)]
    s = opt.stats()
    assert s["collect_steps"] == 1 and s["unpreconditioned"] == {} and s["skipped_steps"] == 0


@pytest.mark.parametrize("name", ["convnext_atto", "vit_tiny_patch16_224"])
def test_timm_family_collect_step_is_exact(f64, name):
    """One collect step of the whole model against brute force (float64), over the covered
    parameters; the uncovered ones (ViT's cls_token, pos_embed) get the host gradient times
    sum_i c_i. (EfficientNet / MobileNetV3 pass too, with BatchNorm statistics frozen, but their
    brute force takes 50-90 s here; their BatchNormAct2d route is checked in the layer test.)"""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3, **FAMILIES[name]).double()
    _freeze_bn_stats(model)
    x, y = torch.randn(3, 3, 32, 32), torch.randint(0, 3, (3,))
    opt = FNGD(model.parameters(), lr=1.0, momentum=0.0, damping=LAM, damping_mode="absolute", normalize="none",
               reuse="off")
    uncovered = {"cls_token", "pos_embed"} if name.startswith("vit") else set()
    names = [k for k, _ in model.named_parameters() if k not in uncovered]
    gs = per_sample_grads(model, F.cross_entropy, x, y)
    U = flat(gs, names)
    c = torch.linalg.solve(U @ U.T + 3 * LAM * torch.eye(3, dtype=U.dtype), torch.ones(3, dtype=U.dtype))
    expected = U.T @ c
    params = dict(model.named_parameters())
    before = torch.cat([params[k].detach().reshape(-1).clone() for k in names])
    before_unc = {k: params[k].detach().clone() for k in uncovered}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        host = {k: params[k].grad.clone() for k in uncovered}
        opt.step()
    assert not [str(w.message) for w in caught if "FNGD" in str(w.message)]
    step = before - torch.cat([params[k].detach().reshape(-1) for k in names])
    assert float((step - expected).norm() / expected.norm()) < 1e-8
    for k in uncovered:
        assert torch.allclose(before_unc[k] - params[k].detach(), host[k] * c.sum(), rtol=1e-8, atol=1e-12)


def test_a_parameter_used_outside_its_module_is_reported_in_float32():
    """The capture check (once, at the first collect step) still catches a real mismatch at
    float32's floor: here a Linear's weight also enters the loss outside the Linear's forward."""
    torch.manual_seed(0)

    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x))) + 0.5 * (x @ self.a.weight.T)[:, :3]

    model = Leaky()
    opt = FNGD(model.parameters(), lr=0.1, reuse="off")
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    msgs = [str(w.message) for w in caught if "hooks saw" in str(w.message)]
    assert len(msgs) == 1 and "(8, 6)" in msgs[0], [str(w.message) for w in caught]
