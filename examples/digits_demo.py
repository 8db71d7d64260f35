"""FNGD vs SGD on real handwritten digits (scikit-learn's load_digits), a small CNN, on the CPU.

    python examples/digits_demo.py [--epochs 8] [--damping 1.0]

Prints per-epoch test accuracy and wall-clock for each optimizer, and FNGD's collect-phase
statistics. Epoch 1 of FNGD solves (collect); later epochs reuse the stored coefficients.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from fngd_plugin import FNGD


def data(seed: int = 0):
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    test, train = perm[:360], perm[360:]
    return (x[train], y[train]), (x[test], y[test])


def model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(inplace=True), nn.Linear(64, 10),
    )


def run(name: str, make_opt, epochs: int, batch: int, seed: int = 0) -> list[tuple[float, float]]:
    (xtr, ytr), (xte, yte) = data()
    torch.manual_seed(seed)
    net = model()
    steps = (len(ytr) + batch - 1) // batch
    opt = make_opt(net.parameters(), steps)
    history = []
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(ytr), generator=g)
        for i in range(steps):
            idx = order[i * batch:(i + 1) * batch]
            opt.zero_grad()
            F.cross_entropy(net(xtr[idx]), ytr[idx]).backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            acc = float((net(xte).argmax(1) == yte).float().mean())
        history.append((time.perf_counter() - t0, acc))
        print(f"{name:>14} epoch {epoch + 1}: test acc {acc:.3f}  wall {history[-1][0]:.1f}s", flush=True)
    if isinstance(opt, FNGD):
        print(f"{name:>14} stats: {opt.stats()}")
    return history


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--damping", type=float, default=1.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)
    results = {
        "sgd": run("sgd", lambda p, s: torch.optim.SGD(p, lr=args.lr, momentum=0.9), args.epochs, args.batch),
        "fngd": run("fngd", lambda p, s: FNGD(p, lr=args.lr, damping=args.damping, steps_per_epoch=s),
                    args.epochs, args.batch),
        "fngd (off)": run("fngd (off)", lambda p, s: FNGD(p, lr=args.lr, damping=args.damping, reuse="off"),
                          args.epochs, args.batch),
    }
    print("\noptimizer       final acc   wall (s)")
    for k, h in results.items():
        print(f"{k:<14}  {h[-1][1]:.3f}       {h[-1][0]:.1f}")


if __name__ == "__main__":
    main()
