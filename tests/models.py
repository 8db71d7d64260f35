"""Small models for exactness tests, each with its per-sample loss (for the torch.func oracle)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def ce(out, y):
    return F.cross_entropy(out, y)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4))

    def forward(self, x):
        return self.net(x)

    @staticmethod
    def batch(n):
        return (torch.randn(n, 6), torch.randint(0, 4, (n,))), ce


class CNN(nn.Module):
    """Stride 2 and padding, an in-place ReLU right after a hooked conv, no BatchNorm."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 3, 3, padding=1, bias=False)
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x):
        h = F.relu(self.c1(x), inplace=True)
        h = torch.tanh(self.c2(h))
        return self.fc(h.flatten(1))

    @staticmethod
    def batch(n):
        return (torch.randn(n, 2, 8, 8), torch.randint(0, 5, (n,))), ce


class EmbedSeq(nn.Module):
    """Embedding (padding_idx 0) + per-token Linear + masked mean over tokens."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 5, padding_idx=0)
        self.tok = nn.Linear(5, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        mask = (x != 0).unsqueeze(-1).to(self.emb.weight.dtype)
        h = torch.tanh(self.tok(self.emb(x)))
        pooled = (h * mask).sum(1) / mask.sum(1).clamp_min(1)
        return self.out(pooled)

    @staticmethod
    def batch(n):
        x = torch.randint(1, 11, (n, 7))
        lengths = torch.randint(2, 8, (n,))
        x[torch.arange(7)[None, :] >= lengths[:, None]] = 0
        return (x, torch.randint(0, 3, (n,))), ce


class LinearLN(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(5, 8)
        self.ln = nn.LayerNorm(8)
        self.l2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.l2(torch.relu(self.ln(self.l1(x))))

    @staticmethod
    def batch(n):
        return (torch.randn(n, 5), torch.randint(0, 3, (n,))), ce


class SeqInplace(nn.Module):
    """Linear on a contiguous 3-D input returns a view; an in-place op on it follows (fairseq's
    `q *= scaling`), then a mean over tokens."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(4, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = self.q(x)
        h *= 0.5
        return self.out(torch.tanh(h).mean(1))

    @staticmethod
    def batch(n):
        return (torch.randn(n, 6, 4), torch.randint(0, 3, (n,))), ce


MODELS = {"mlp": MLP, "cnn": CNN, "embed_seq": EmbedSeq, "linear_ln": LinearLN, "seq_inplace": SeqInplace}


def module_blocks(model: nn.Module) -> list[list[str]]:
    """Parameter names grouped by owning module (the coefficients='layer' blocks)."""
    blocks = []
    for mname, m in model.named_modules():
        names = [f"{mname}.{k}" if mname else k for k, p in m.named_parameters(recurse=False)]
        if names:
            blocks.append(names)
    return blocks


def snapshot(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def restore(model: nn.Module, flat: torch.Tensor) -> None:
    i = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(flat[i:i + p.numel()].view_as(p))
            i += p.numel()
