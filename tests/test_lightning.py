"""A third host: PyTorch Lightning's real Trainer with FNGD from configure_optimizers.

Automatic optimization calls ``optimizer.step(closure)`` and the closure runs the forward, then
``zero_grad()``, then the backward; with ``accumulate_grad_batches=2`` the first micro-batch's
closure runs without a step; gradient clipping runs inside the closure, before FNGD's step. The
first optimizer step must equal brute-force damped NGD of the clipped gradient, micro-batch by
micro-batch (float64, the oracle on torch.func per-sample gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import flat, per_sample_grads
from torch import nn

L = pytest.importorskip("lightning")

from fngd_plugin import FNGD  # noqa: E402

LAM, N, CLIP = 0.3, 6, 0.5


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).double()


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = net()
        self.snapshots: list[torch.Tensor] = []

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).clone() for p in self.net.parameters()])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return FNGD(self.parameters(), lr=1.0, momentum=0.0, damping=LAM, damping_mode="absolute",
                    normalize="none", reuse="position")

    # the pattern the README gives Lightning users: tell FNGD where each epoch starts
    def on_train_epoch_start(self):
        self.optimizers().optimizer.set_epoch(self.current_epoch)

    def on_train_batch_start(self, batch, batch_idx):
        self.snapshots.append(self.flat())


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    return [(torch.randn(N, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (N,), generator=g))
            for _ in range(4)]


def oracle_first_step(batches) -> torch.Tensor:
    model = net()
    names = [k for k, _ in model.named_parameters()]
    Us = [flat(per_sample_grads(model, F.cross_entropy, x, y), names) for x, y in batches]
    # Lightning's loss is each micro-batch's mean over 2: the host gradient is the mean over both
    host = torch.cat(Us).mean(0)
    scale = min(1.0, CLIP / (float(host.norm()) + 1e-6))  # clip_grad_norm_, before the optimizer step
    dirs = []
    for U in Us:
        U = U * scale
        dirs.append(torch.linalg.solve(U.T @ U / N + LAM * torch.eye(U.shape[1], dtype=U.dtype), U.mean(0)))
    return (dirs[0] + dirs[1]) / 2, scale


def test_lightning_trainer_automatic_optimization_accumulation_and_clipping(tmp_path):
    batches = data()
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    module = Module()
    trainer = L.Trainer(max_epochs=3, accumulate_grad_batches=2, gradient_clip_val=CLIP, precision="64-true",
                        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, loader)
    expected, scale = oracle_first_step(batches[:2])
    assert scale < 1.0  # clipping was active: the test checks where it happens
    step = module.snapshots[0] - module.snapshots[2]  # before batch 0, before batch 2: one optimizer step
    assert float((step - expected).norm() / expected.norm()) < 1e-8
    opt = trainer.optimizers[0]
    s = opt.stats()
    assert s["collect_steps"] == 4  # epoch 0: 4 micro-batches, each solved
    assert s["steps"] == {"collect": 2, "collect_solved": 2, "reuse": 4, "reuse_weighted": 4}
    assert s["unpreconditioned"] == {} and s["store_misses"] == 0 and s["stored"] == 4 * N
