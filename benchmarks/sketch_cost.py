"""What the sketched Gram (FNGD(sketch=k)) buys and costs on the Transformer: the collect step's
time against SGD's and the exact collect step's, side by side in one process (interleaved rounds,
medians), and how far its coefficients and its step are from the exact ones.

    python benchmarks/sketch_cost.py [--batches 32,64,128] [--tokens 30] [--sketch 16,32,64] [--out FILE]

The model is benchmarks/models.py's Seq2Seq (8000-token vocabulary, d 256, 3+3 layers, untied
output projection): the vocabulary projection over n x T target tokens is where an exact Gram is
dearest. Errors are measured from one shared start: c (the solved coefficients, normalize="sum")
as relative error and cosine against the exact c; the step (lr 1, no momentum) likewise.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import Seq2Seq, seq2seq_batch, seq2seq_loss  # noqa: E402
from step_cost import BIG, fmt_table, sync, train_step, write_report  # noqa: E402

from fngd_plugin import FNGD  # noqa: E402


def compare(model: Seq2Seq, data, sketch: int | None, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, step) of one collect step from the model's current state."""
    m = copy.deepcopy(model)
    opt = FNGD(m.parameters(), lr=1.0, momentum=0.0, steps_per_epoch=BIG, sketch=sketch)
    before = [p.detach().clone() for p in m.parameters()]
    train_step(m, opt, lambda mm: seq2seq_loss(mm, data))
    c = opt.store.get(-1, data[0].shape[0], ids=None, position=0, device=torch.device(device))
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(m.parameters(), before)])
    return c, step


def err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm()), float(a @ b / (a.norm() * b.norm()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="32,64,128")
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--sketch", default="16,32,64")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="results/sketch_cost.md")
    args = ap.parse_args()
    t_start = time.perf_counter()
    ks = [int(k) for k in args.sketch.split(",")]
    cpu = platform.processor() or platform.machine()
    header = [f"# Sketched Gram: cost and error ({args.device}, {cpu}, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}; medians of {args.rounds} interleaved rounds)\n"]
    rows_t, rows_e = [], []
    for n in [int(b) for b in args.batches.split(",")]:
        torch.manual_seed(0)
        base = Seq2Seq(vocab=8000).to(args.device)
        data = seq2seq_batch(n, args.tokens, 8000, device=args.device)
        loss = lambda m: seq2seq_loss(m, data)  # noqa: E731
        names = ["sgd", "fngd exact", *[f"fngd sketch {k}" for k in ks]]
        runs = {}
        for name in names:
            m = copy.deepcopy(base)
            if name == "sgd":
                opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
            else:
                k = None if name == "fngd exact" else int(name.split()[-1])
                opt = FNGD(m.parameters(), lr=0.01, steps_per_epoch=BIG, sketch=k)
            train_step(m, opt, loss)  # warm-up
            runs[name] = (m, opt)
        times = {name: [] for name in names}
        for _ in range(args.rounds):
            for name, (m, opt) in runs.items():
                sync(args.device)
                t0 = time.perf_counter()
                train_step(m, opt, loss)
                sync(args.device)
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        for name in names:
            rows_t.append([n, n * args.tokens, name, f"{1e3 * med[name]:.0f}", f"{med[name] / med['sgd']:.2f}x"])
        c0, s0 = compare(base, data, None, args.device)
        for k in ks:
            c, s = compare(base, data, k, args.device)
            (ce, cc), (se, sc) = err(c, c0), err(s, s0)
            rows_e.append([n, k, f"{ce:.3f}", f"{cc:.4f}", f"{se:.3f}", f"{sc:.4f}"])
        print(f"batch {n} done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    sections = ["Step time (ms) and ratio to SGD:\n\n"
                + fmt_table(["batch", "tokens", "step", "ms", "vs SGD"], rows_t) + "\n",
                "Sketch against exact, one collect step from the same start (c: coefficients; step: lr 1):\n\n"
                + fmt_table(["batch", "k", "c rel. err", "c cosine", "step rel. err", "step cosine"], rows_e) + "\n"]
    text = "\n".join(header + sections)
    print(text)
    write_report(args.out, text, t_start)


if __name__ == "__main__":
    main()
