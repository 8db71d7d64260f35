"""Step cost of FNGD vs SGD vs AdamW vs KFAC, measured side by side in one process.

    python benchmarks/step_cost.py            # CPU-sized run (<= 10 min on 2 cores), see --help
    python benchmarks/step_cost.py --full     # the full sizes (meant for a GPU)

Timing: every configuration owns a copy of the same model; rounds interleave them (one step of
each per round) so that drifting machine load hits all alike; medians over rounds. KFAC's steps
come in three kinds (plain preconditioning, +factor update, +inverse update); each is timed and
the 10/100 schedule's amortised step is t_plain + (t_factor - t_plain)/10 + (t_inverse - t_plain)/100.
Peak memory: torch.cuda.max_memory_allocated on a GPU; on the CPU the peak resident-set growth
of one child process per configuration (the CPU allocator has no peak counter), twice: "live",
with glibc's mmap threshold at 64 KiB (MALLOC_MMAP_THRESHOLD_), so every freed tensor goes back
to the system and the resident set follows the live tensors, the CPU analogue of the GPU
number; and "resident", with glibc's defaults, which also holds freed heap that glibc keeps
(it depends on the order of allocations, not only on what is alive).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import Seq2Seq, seq2seq_batch, seq2seq_loss  # noqa: E402

from fngd_plugin import FNGD, KFAC  # noqa: E402
from timm_ext import cifar_resnet18  # noqa: E402  (the sweeps' model, registered in timm)

BIG = 10**9
# KFAC leaves layers with a factor above this to SGD: here the 8000-way output projection (KFAC
# codebases usually skip embedding/output layers); every ResNet-18 layer stays covered.
KFAC_MAX_DIM = 5000
KFAC_KINDS = {  # one KFAC instance, its schedule switched per timed step
    "kfac plain": (BIG, BIG),
    "kfac +factors": (1, BIG),
    "kfac +inverses": (BIG, 1),
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------- tasks
def resnet_task(batch: int, device: str):
    model = cifar_resnet18(num_classes=100).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 100, (batch,), generator=g).to(device)
    return model, lambda m: F.cross_entropy(m(x), y, label_smoothing=0.1)


def transformer_task(batch: int, device: str, tokens: int = 30, vocab: int = 8000):
    model = Seq2Seq(vocab=vocab).to(device)
    data = seq2seq_batch(batch, tokens, vocab, device=device)
    return model, lambda m: seq2seq_loss(m, data)


TASKS = {"resnet18": resnet_task, "transformer": transformer_task}


# ------------------------------------------------------------------------------------------- optimizers
def optimizers(coefficients: list[str], kfac_inverse: str = "cholesky") -> dict[str, Callable]:
    """name -> factory(params). FNGD 'collect' never leaves epoch 0; 'reuse' leaves it after 1 step.
    KFAC with ``kfac_inverse`` (default Cholesky: the faster of ours, with explicit factor inverses,
    as ASDL's; "eigen" applies exact damping to the Kronecker eigenvalues at about twice the cost)."""
    opts: dict[str, Callable] = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-4),
    }
    for c in coefficients:
        opts[f"fngd-{c} collect"] = lambda p, c=c: FNGD(p, lr=0.01, coefficients=c, steps_per_epoch=BIG)
        opts[f"fngd-{c} reuse"] = lambda p, c=c: FNGD(p, lr=0.01, coefficients=c, steps_per_epoch=1)
    kf = dict(lr=0.01, max_factor_dim=KFAC_MAX_DIM, inverse=kfac_inverse)
    for kind, (fac, inv) in KFAC_KINDS.items():
        opts[kind] = lambda p, fac=fac, inv=inv: KFAC(p, factor_update_steps=fac, inv_update_steps=inv, **kf)
    return opts


def train_step(model, opt, loss_fn) -> None:
    opt.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    opt.step()


def time_steps(task, batch, device, names, rounds, slow_rounds, coefficients, log,
               kfac_inverse: str = "cholesky") -> dict[str, list[float]]:
    base, loss_fn = TASKS[task](batch, device)
    factories = optimizers(coefficients, kfac_inverse)
    runs = {}
    shared_kfac = None
    for name in names:
        if name in KFAC_KINDS and shared_kfac is not None:
            runs[name] = shared_kfac
            continue
        model = copy.deepcopy(base)
        opt = factories[name](model.parameters())
        train_step(model, opt, loss_fn)  # warm-up; FNGD reuse: the one collect step; KFAC: first factors/inverses
        runs[name] = (model, opt)
        if name in KFAC_KINDS:
            shared_kfac = runs[name]
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name, (model, opt) in runs.items():
            if name == "kfac +inverses" and r >= slow_rounds:
                continue
            if name in KFAC_KINDS:
                opt.factor_update_steps, opt.inv_update_steps = KFAC_KINDS[name]
            sync(device)
            t0 = time.perf_counter()
            train_step(model, opt, loss_fn)
            sync(device)
            times[name].append(time.perf_counter() - t0)
        log(f"  {task} batch {batch}: round {r + 1}/{rounds} done")
    for name, (_, opt) in runs.items():
        if isinstance(opt, FNGD):
            expect_collect = name.endswith("collect")
            if opt.in_collect_phase != expect_collect:
                raise RuntimeError(f"{name}: expected collect={expect_collect}")
    return times


def gram_costs(task, batch, device, log) -> dict[str, float]:
    """Seconds per Gram, summed per layer type, for one captured batch (coefficients=network);
    compact=False, so that a layer compacted during the backward counts its per-sample gradients here."""
    model, loss_fn = TASKS[task](batch, device)
    opt = FNGD(model.parameters(), lr=0.0, reuse="off", compact=False)
    opt.zero_grad()
    loss_fn(model).backward()
    mb = [b for b in opt._capture.pending if b.backward_seen][0]
    reps = opt._reps(mb)
    costs: dict[str, float] = {}
    for module, rep in reps.items():
        sync(device)
        t0 = time.perf_counter()
        rep.gram()
        sync(device)
        key = type(module).__name__
        costs[key] = costs.get(key, 0.0) + time.perf_counter() - t0
    opt.zero_grad()
    log(f"  gram costs {task} batch {batch}: {sum(costs.values()):.3f}s")
    return costs


# ------------------------------------------------------------------------------------------- memory
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child_memory(task: str, batch: int, device: str, name: str, coefficients: list[str],
                 kfac_inverse: str = "cholesky") -> float:
    """Run in a fresh process: bytes of peak memory growth during steps 2-3 over the state before
    step 1, so optimizer state counts and one-off first steps (FNGD's collect step in a reuse
    configuration, KFAC's first inverses) do not. CPU: resident set size sampled every ms."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model, loss_fn = TASKS[task](batch, device)
    opt = optimizers(coefficients, kfac_inverse)[name](model.parameters())
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        train_step(model, opt, loss_fn)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            train_step(model, opt, loss_fn)
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    import ctypes

    base = _rss()
    train_step(model, opt, loss_fn)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS shows what is live
    return float(peak_rss(lambda: [train_step(model, opt, loss_fn) for _ in range(2)]) - base)


def peak_rss(run: Callable[[], object]) -> int:
    """The resident set's peak while ``run()`` runs, sampled every ms by a thread."""
    import threading

    peak = [_rss()]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        run()
    finally:
        done.set()
        thread.join()
    return max(peak[0], _rss())


LIVE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # glibc: freed blocks of 64 KiB and more go back at once


def memory_of(task, batch, device, names, coefficients, log,
              kfac_inverse: str = "cholesky") -> dict[str, dict[str, float]]:
    """{"live": {name: bytes}, "resident": {...}} (a GPU: "live" only, from the CUDA allocator)."""
    out: dict[str, dict[str, float]] = {}
    for kind, extra in (("live", LIVE_ENV), ("resident", None)):
        if kind == "resident" and device.startswith("cuda"):
            continue
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
        env.update(extra or {})
        for name in names:
            spec = json.dumps([task, batch, device, name, coefficients, kfac_inverse])
            cmd = [sys.executable, os.path.abspath(__file__), "--child-memory", spec]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            out.setdefault(kind, {})[name] = float(res.stdout.strip().splitlines()[-1])
            log(f"  memory ({kind}) {task} {name}: {out[kind][name] / 2**20:.0f} MiB")
    return out


# ------------------------------------------------------------------------------------------- report
def fmt_table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summarize(task, batch, times, memory, epoch_steps, coefficients) -> str:
    med = {k: statistics.median(v) for k, v in times.items() if v}
    plain, fac, inv = med["kfac plain"], med["kfac +factors"], med["kfac +inverses"]
    med["kfac 10/100 (amortised)"] = plain + (fac - plain) / 10 + (inv - plain) / 100
    med["kfac every step"] = fac + inv - plain
    sgd = med["sgd"]
    kinds = list(memory)

    def mem_of(kind: str, name: str) -> str:
        m = memory[kind]
        if name not in m or "sgd" not in m:
            return ""
        return f"{m[name] / 2**20:.0f} MiB ({m[name] / m['sgd']:.2f}x)"

    rows = []
    for name, t in med.items():
        rows.append([name, f"{t * 1000:.1f}", f"{t / sgd:.2f}x", len(times.get(name, [])) or "derived",
                     *[mem_of(k, name) for k in kinds]])
    headers = ["step", "median ms", "vs SGD", "rounds", *[f"peak memory growth, {k} (vs SGD)" for k in kinds]]
    out = [f"### {task}, batch {batch}", "", fmt_table(headers, rows), ""]
    erows = [["SGD", f"{epoch_steps * sgd:.1f}", "1.00x"]]
    for c in coefficients:
        erows.append([f"FNGD-{c} collect epoch", f"{epoch_steps * med[f'fngd-{c} collect']:.1f}",
                      f"{med[f'fngd-{c} collect'] / sgd:.2f}x"])
        erows.append([f"FNGD-{c} reuse epoch", f"{epoch_steps * med[f'fngd-{c} reuse']:.1f}",
                      f"{med[f'fngd-{c} reuse'] / sgd:.2f}x"])
    k = med["kfac 10/100 (amortised)"]
    erows.append(["KFAC 10/100 epoch", f"{epoch_steps * k:.1f}", f"{k / sgd:.2f}x"])
    out += [f"Amortised epoch of {epoch_steps} steps (seconds):", "", fmt_table(["epoch", "s", "vs SGD"], erows), ""]
    c0 = coefficients[0]
    out.append(f"KFAC 10/100 epoch / FNGD-{c0} reuse epoch: {k / med[f'fngd-{c0} reuse']:.2f}x; "
               f"targets: reuse <= 1.05x SGD, collect <= 2.0x SGD, reuse memory <= 1.15x SGD, KFAC >= 2.5x reuse")
    return "\n".join(out)


def write_report(path: str, text: str, t_start: float) -> None:
    """The benchmark's markdown, with its total time, to ``path`` (directories made as needed)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text + f"\nTotal benchmark time: {time.perf_counter() - t_start:.0f} s\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="paper sizes: ResNet-18 batch 128; Transformer 64x30")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per configuration")
    ap.add_argument("--tasks", default="resnet18,transformer")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--kfac-inverse", default="cholesky", choices=["cholesky", "eigen"],
                    help="KFAC's inverses (default: cholesky, the faster of ours)")
    ap.add_argument("--batch", type=int, default=None, help="batch size of both tasks (default: 32, --full 128/64)")
    ap.add_argument("--out", default="results/benchmark.md")
    ap.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="fngd_plugin")
    threads = int(os.environ.get("BENCH_THREADS", "2"))
    torch.set_num_threads(threads)
    if args.child_memory:
        print(child_memory(*json.loads(args.child_memory)))
        return

    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    full = args.full
    sizes = {"resnet18": 128 if full else 32, "transformer": 64 if full else 32}
    if args.batch is not None:
        if args.batch < 1:
            ap.error(f"--batch {args.batch}: must be >= 1")
        sizes = dict.fromkeys(sizes, args.batch)
    scaling = [32, 64, 128, 256] if full else [16, 32, 64, 128]
    rounds = args.rounds or (20 if full else 5)
    epoch_steps = {"resnet18": 50000 // sizes["resnet18"], "transformer": 29000 // sizes["transformer"]}
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    header = [f"# Step-cost benchmark ({'full' if full else 'CPU-sized'} run)", "",
              f"Machine: {device_name} ({args.device}), {os.cpu_count()} cores, torch {torch.__version__}, "
              f"{threads} threads. Sizes: ResNet-18 (CIFAR stem) 32x32, 100 classes, batch {sizes['resnet18']}; "
              f"Transformer 3+3 layers, d_model 256, 4 heads, FFN 1024, vocab 8000 (tied decoder embeddings), "
              f"batch {sizes['transformer']} sentences x 30 tokens. Medians over {rounds} interleaved rounds "
              f"(KFAC inverse step: 2). KFAC: {args.kfac_inverse} inverses, float32, layers with a factor above "
              f"{KFAC_MAX_DIM} left to SGD (the Transformer's 8000-way output projection).", ""]
    sections = []
    for task in args.tasks.split(","):
        coefficients = ["network", "layer"]
        names = list(optimizers(coefficients))
        log(f"timing {task}")
        times = time_steps(task, sizes[task], args.device, names, rounds, 2, coefficients, log, args.kfac_inverse)
        memory = {} if args.no_memory else memory_of(task, sizes[task], args.device,
                                                     ["sgd", "adamw", *[n for n in names if n.startswith("fngd")],
                                                      "kfac plain"], coefficients, log, args.kfac_inverse)
        sections.append(summarize(task, sizes[task], times, memory, epoch_steps[task], coefficients))
        grams = {b: gram_costs(task, b, args.device, log) for b in scaling}
        types = sorted({k for g in grams.values() for k in g})
        rows = [[b, *[f"{grams[b].get(t, 0) * 1000:.1f}" for t in types], f"{sum(grams[b].values()) * 1000:.1f}"]
                for b in scaling]
        sections.append(f"FNGD Gram cost per batch, ms by layer type ({task}):\n\n"
                        + fmt_table(["batch", *types, "total"], rows) + "\n")
        print(sections[-2] + "\n\n" + sections[-1], flush=True)
    write_report(args.out, "\n".join(header + sections) + "\n", t_start)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
