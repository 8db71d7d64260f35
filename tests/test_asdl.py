"""FNGD's collect step against an independent implementation of the same identity: ASDL's
SmwEmpNaturalGradientMaker (PyPI ``asdfghjkl``, imported as ``asdl``; Osawa et al.).

What ASDL computes (asdl/precondition/smw.py, SmwEmpNaturalGradientMaker.forward_and_backward):
the loss is re-evaluated with reduction="none" (per-sample losses l_i), the n x n Gram
K = U^T U of the per-sample gradients g_i = grad l_i is accumulated by the Hadamard-factored
OP_GRAM_HADAMARD hooks (asdl/operations/operation.py; Linear.gram_A/gram_B: (A A^T + 1) * (D D^T)
with the bias as an appended 1, exact for 2-D Linear inputs), then for a mean-reduced loss

    b = (K/n + lambda I)^-1 K 1,   p.grad = U ((1/n) 1 - b/n^2) / lambda = (F + lambda I)^-1 gbar

with F = (1/n) sum_i g_i g_i^T and gbar the mean gradient (Woodbury; ``damping`` = lambda is added to
the diagonal of K/n inside its cholesky_solve). For a sum-reduced loss it skips the 1/n scalings and
returns (U U^T + lambda I)^-1 U 1 = (F + (lambda/n) I)^-1 gbar.

FNGD (damping_mode="absolute", normalize="none", lr=1, no momentum or weight decay, reuse="off")
moves the parameters by -(F + damping I)^-1 gbar with the same F and gbar when the host loss is a
mean; so the mapping is FNGD damping = ASDL damping, for a mean-reduced loss. With a sum-reduced
host loss FNGD takes the host gradient as the mean of n-times-scaled per-sample gradients, so its
step is (1/n) (F + (damping/n^2) I)^-1 gbar = (1/n) * ASDL(sum loss, damping/n); pinned below too.

ASDL mutates the loss kwargs it is given (reduction="none" stays in them after the first call), so
setup_loss_call is repeated before every forward_and_backward here, as its own examples do.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

precondition = pytest.importorskip("asdl.precondition", reason="ASDL (pip install asdfghjkl) not installed")

from fngd_plugin import FNGD  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

DTYPE = torch.float64
D_IN, HIDDEN, CLASSES = 10, 24, 5


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(),
                         nn.Linear(HIDDEN, CLASSES)).to(DTYPE)


def make_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g, dtype=DTYPE), torch.randint(0, CLASSES, (n,), generator=g)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def fngd_change(model: nn.Module, batches, damping: float, reduction: str = "mean") -> torch.Tensor:
    """Parameter change of one FNGD collect step; several batches = gradient accumulation with the
    host loss a mean over all samples (each micro-batch's mean loss weighted n_m / N)."""
    model = copy.deepcopy(model)
    opt = FNGD(model.parameters(), lr=1.0, momentum=0.0, weight_decay=0.0, damping=damping,
               damping_mode="absolute", normalize="none", coefficients="network", reuse="off")
    before = flat(model)
    total = sum(x.shape[0] for x, _ in batches)
    opt.zero_grad()
    for x, y in batches:
        loss = F.cross_entropy(model(x), y, reduction=reduction)
        (loss * x.shape[0] / total if reduction == "mean" and len(batches) > 1 else loss).backward()
    opt.step()
    return flat(model) - before


def asdl_direction(model: nn.Module, batch, damping: float, reduction: str = "mean") -> torch.Tensor:
    """ASDL's preconditioned gradient (what it leaves in p.grad) for one batch."""
    model = copy.deepcopy(model)
    x, y = batch
    config = precondition.SmwEmpNaturalGradientConfig(data_size=x.shape[0], damping=damping)
    maker = precondition.SmwEmpNaturalGradientMaker(model, config)
    dummy_y = maker.setup_model_call(model, x)
    kwargs = {} if reduction == "mean" else {"reduction": reduction}
    maker.setup_loss_call(F.cross_entropy, dummy_y, y, **kwargs)
    for p in model.parameters():
        p.grad = None
    maker.forward_and_backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("damping", [1e-2, 0.5])
@pytest.mark.parametrize("n", [16, 5])
def test_collect_step_matches_asdl_smw(damping, n):
    """One collect step = -ASDL's SMW empirical natural gradient, same damping (mean loss)."""
    model = make_model()
    batch = make_batch(n, seed=1)
    step = fngd_change(model, [batch], damping)
    expected = -asdl_direction(model, batch, damping)
    assert rel(step, expected) < 1e-8
    # not the plain gradient: the preconditioning is doing something at this damping
    assert rel(step, -asdl_direction(model, batch, 1e6) * 1e6) > 1e-3


def test_sum_reduced_loss_mapping():
    """Sum-reduced host loss: FNGD(damping) = (1/n) * ASDL(sum loss, damping / n)."""
    model = make_model()
    n, damping = 16, 0.1
    batch = make_batch(n, seed=2)
    step = fngd_change(model, [batch], damping, reduction="sum")
    expected = -asdl_direction(model, batch, damping / n, reduction="sum") / n
    assert rel(step, expected) < 1e-8


def test_accumulation_matches_per_micro_batch_asdl():
    """Two micro-batches of sizes 10 and 6 accumulated: each solved alone, averaged with n_m / N."""
    model = make_model()
    damping = 0.05
    b1, b2 = make_batch(10, seed=3), make_batch(6, seed=4)
    step = fngd_change(model, [b1, b2], damping)
    expected = -(10 * asdl_direction(model, b1, damping) + 6 * asdl_direction(model, b2, damping)) / 16
    assert rel(step, expected) < 1e-8
