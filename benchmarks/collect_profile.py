"""Where FNGD's collect step spends its time and memory at the batch sizes people train with.

    python benchmarks/collect_profile.py            # CPU sizes (about 17 minutes on 2 cores)
    python benchmarks/collect_profile.py --full     # GPU sizes

For each model and batch: an SGD step, FNGD's exact collect step and its sketched collect step
(``sketch=k``), timed side by side in one fresh child process, each on its own copy of the
model: a warm-up step each, interleaved rounds of one step of each (medians; this VM's speed
drifts by 30% and more between minutes, which separate processes timed one after another
turned into ratio errors of that size), one step of each FNGD configuration under
torch.profiler. Peak memory comes from one more fresh child per configuration: on a CPU "live",
as in step_cost.py (glibc's mmap threshold at 64 KiB, which slows large allocations down too
much to time anything with it), on a GPU torch.cuda.max_memory_allocated; both the second
step's growth over the state before the first. The profiler's ``fngd.*`` ranges
(the labels FNGD puts on its phases: ``fngd.compact.<layer>`` inside the backward,
``fngd.gram.<layer>``, ``fngd.solve``, ``fngd.weighted.<layer>``, ``fngd.update``) give the
breakdown. Shares are of the profiled step (the profiler adds its own overhead); the headline
times are the unprofiled medians. On a GPU a range's time is that of the kernels launched inside it
(the profiler's CUDA activity); ``--device cuda`` syncs around each timed step, not each range.

Sizes (CPU): CIFAR ResNet-18 batch 128 at 32x32; timm ResNet-50 batch 128 at 64x64 (100
classes); the 3+3-layer d256 Transformer and a 6+6-layer d512 ("base") one, both vocab 8000 with
tied decoder embeddings, at 136 sentences x 30 tokens (4080 target tokens: fairseq's
``--max-tokens 4096``). ``--full``: ResNet-18 batch 256, ResNet-50 batch 128 at 224x224, the same
Transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import Seq2Seq, seq2seq_batch, seq2seq_loss  # noqa: E402
from step_cost import BIG, LIVE_ENV, _rss, fmt_table, peak_rss, sync, train_step, write_report  # noqa: E402

from fngd_plugin import FNGD  # noqa: E402


def image_task(name: str, batch: int, size: int, device: str):
    import timm

    from timm_ext import cifar_resnet18  # noqa: F401  (registers the sweeps' CIFAR ResNet-18 in timm)

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=100).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 100, (batch,), generator=g).to(device)
    return model, lambda m: F.cross_entropy(m(x), y, label_smoothing=0.1)


def seq_task(batch: int, device: str, **size):
    torch.manual_seed(0)
    model = Seq2Seq(vocab=8000, **size).to(device)
    data = seq2seq_batch(batch, 30, 8000, device=device)
    return model, lambda m: seq2seq_loss(m, data)


SMALL = dict(d=256, heads=4, ffn=1024, layers=3)
BASE = dict(d=512, heads=8, ffn=2048, layers=6)


def configs(full: bool) -> dict[str, tuple[str, dict]]:
    """name -> (description, spec)."""
    return {
        "resnet18": (f"CIFAR ResNet-18, batch {256 if full else 128}, 32x32",
                     dict(kind="image", name="cifar_resnet18", batch=256 if full else 128, size=32)),
        "resnet50": (f"timm ResNet-50, batch 128, {224 if full else 64}x{224 if full else 64}",
                     dict(kind="image", name="resnet50", batch=128, size=224 if full else 64)),
        "transformer": ("Transformer 3+3 d256, 136 x 30 tokens", dict(kind="seq", batch=136, size=SMALL)),
        "transformer-base": ("Transformer 6+6 d512, 136 x 30 tokens", dict(kind="seq", batch=136, size=BASE)),
    }


def build(spec: dict, device: str):
    if spec["kind"] == "image":
        return image_task(spec["name"], spec["batch"], spec["size"], device)
    return seq_task(spec["batch"], device, **spec["size"])


def make_opt(which: str, params, sketch: int):
    """lr 0: every configuration does all of its work (momentum, the update itself included) but
    stays at the same parameters, the initialisation, so that all are timed on the same gradients
    (after an update of lr 0.01 the base Transformer's gradients fall to 1e-21, and SGD's own
    backward slowed 1.8x there: a step's cost then depends on where each optimizer went)."""
    if which == "sgd":
        return torch.optim.SGD(params, lr=0.0, momentum=0.9)
    return FNGD(params, lr=0.0, steps_per_epoch=BIG, sketch=sketch if which == "sketch" else None)


def breakdown(prof, step_us: float, cuda: bool = False) -> dict[str, float]:
    """ms per fngd.* range of one profiled step (inclusive of what runs inside it): its CPU time, or
    on a GPU the time of the kernels it launched. With CUDA activity a range is listed twice under
    one key (the CPU range and its GPU annotation, which has no CPU time): the larger reading counts,
    not the last one listed (which read every range as 0 ms on the H200)."""
    out: dict[str, float] = {}
    for ev in prof.key_averages():
        if ev.key.startswith("fngd."):
            us = (getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)) if cuda \
                else ev.cpu_time_total
            out[ev.key] = max(out.get(ev.key, 0.0), us / 1000.0)
    out["step"] = step_us / 1000.0
    return out


CONFIGS = ("sgd", "exact", "sketch")


def timed_step(model, opt, loss_fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    train_step(model, opt, loss_fn)
    sync(device)
    return time.perf_counter() - t0


def child(spec: dict, device: str, rounds: int, sketch: int) -> dict:
    """Time SGD, the exact and the sketched collect step side by side in this (fresh) process: each on
    its own copy of the same model, a warm-up step each, then ``rounds`` interleaved rounds of one
    step of each (so that the machine's drifting speed hits all three alike), then one profiled
    step of each FNGD configuration."""
    runs = {}
    for which in CONFIGS:
        model, loss_fn = build(spec, device)
        runs[which] = (model, make_opt(which, model.parameters(), sketch), loss_fn)
    for run in runs.values():
        timed_step(*run, device)  # warm-up (FNGD: its first collect step checks the capture)
    times: dict[str, list[float]] = {which: [] for which in runs}
    for _ in range(rounds):
        for which, run in runs.items():
            times[which].append(timed_step(*run, device))
    cuda = device.startswith("cuda")
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    profiles = {}
    for which in ("exact", "sketch"):
        model, opt, loss_fn = runs[which]
        with torch.profiler.profile(activities=acts) as prof:
            step_s = timed_step(model, opt, loss_fn, device)
        if not opt.in_collect_phase:
            raise RuntimeError("expected every timed FNGD step to be a collect step")
        profiles[which] = breakdown(prof, step_s * 1e6, cuda)
    return {"times": times, "profile": profiles}


def child_memory(spec: dict, which: str, device: str, rounds: int, sketch: int) -> dict:
    """One configuration in a fresh process: peak memory growth of its second step over the state
    before its first. On a GPU from torch.cuda.max_memory_allocated; on a CPU from the resident
    set, in a process started with glibc's mmap threshold at 64 KiB (freed tensors go back to the
    system at once, so the resident set follows what is live: step_cost.py's "live" measure)."""
    model, loss_fn = build(spec, device)
    opt = make_opt(which, model.parameters(), sketch)
    if device.startswith("cuda"):
        base = torch.cuda.memory_allocated()
        train_step(model, opt, loss_fn)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        train_step(model, opt, loss_fn)
        torch.cuda.synchronize()
        return {"memory": float(torch.cuda.max_memory_allocated() - base)}
    base = _rss()
    train_step(model, opt, loss_fn)
    return {"memory": float(peak_rss(lambda: train_step(model, opt, loss_fn)) - base)}


def run_child(spec: dict, which: str | None, device: str, rounds: int, sketch: int, threads: int) -> dict:
    """``which`` None: the timing child (all three configurations); else that configuration's memory
    child (on a CPU with the live-memory allocator setting, which slows large allocations down, up
    to 5x on the base Transformer, so no timed step runs with it)."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env.update(LIVE_ENV if which is not None else {})
    env["BENCH_THREADS"] = str(threads)
    if which is None:
        flag, arg = "--child", json.dumps([spec, device, rounds, sketch])
    else:
        flag, arg = "--child-memory", json.dumps([spec, which, device, rounds, sketch])
    res = subprocess.run([sys.executable, os.path.abspath(__file__), flag, arg], capture_output=True, text=True,
                         env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{which or 'timing'} on {spec} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def phase_rows(prof: dict) -> list[list[str]]:
    """Collect-step breakdown: forward+backward (host's), compaction within it, Gram / weighted sum
    per layer type, solve, update (ms and share of the profiled step)."""
    step = prof["step"]
    pre = prof.get("fngd.precondition", 0.0)
    upd = prof.get("fngd.update", 0.0)
    compact = sum(v for k, v in prof.items() if k.startswith("fngd.compact."))
    rows = [["forward + backward (host's)", step - pre - upd],
            ["  of which compaction in the backward", compact]]
    for prefix, what in (("fngd.gram.", "Gram"), ("fngd.weighted.", "weighted sum")):
        for k in sorted((k for k in prof if k.startswith(prefix)), key=lambda k: -prof[k]):
            rows.append([f"{what}, {k[len(prefix):]}", prof[k]])
    for k, what in (("fngd.solve", "solve"), ("fngd.scale", "gradient scale"), ("fngd.update", "update")):
        if k in prof:
            rows.append([what, prof[k]])
    return [[name, f"{ms:.1f}", f"{100 * ms / step:.1f}%"] for name, ms in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="GPU sizes (ResNet-50 at 224x224, ResNet-18 batch 256)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default=",".join(configs(False)), help="comma-separated, from: "
                    + ", ".join(configs(False)))
    ap.add_argument("--rounds", type=int, default=None, help="interleaved timed rounds (default 3, --full 10)")
    ap.add_argument("--sketch", type=int, default=32, help="k of the sketched collect step (default 32)")
    ap.add_argument("--out", default="results/collect_profile.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="fngd_plugin")
    threads = int(os.environ.get("BENCH_THREADS", "2"))
    torch.set_num_threads(threads)
    if args.child or args.child_memory:
        fn, arg = (child, args.child) if args.child else (child_memory, args.child_memory)
        print(json.dumps(fn(*json.loads(arg))))
        return
    known = configs(args.full)
    models = args.models.split(",")
    bad = [m for m in models if m not in known]
    if bad:
        ap.error(f"--models: unknown {', '.join(bad)} (known: {', '.join(known)})")
    if args.sketch < 1:
        ap.error(f"--sketch {args.sketch}: must be >= 1")
    rounds = args.rounds or (10 if args.full else 3)
    if rounds < 1:
        ap.error(f"--rounds {rounds}: must be >= 1")
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    mem_kind = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else \
        "resident-set growth with glibc's mmap threshold at 64 KiB (live)"
    text = [f"# FNGD collect step at training batch sizes ({'full' if args.full else 'CPU-sized'} run)", "",
            f"Machine: {device_name} ({args.device}), {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{threads} threads. Per model, SGD and the two collect steps side by side in one process, each on "
            f"its own copy of the model: 1 warm-up step each, medians of {rounds} interleaved rounds, one "
            f"profiled step each for the breakdown; peak memory growth ({mem_kind}): the second "
            f"step's over the state before the first, in a process of its own per configuration. FNGD defaults "
            f"(coefficients='network', exact Grams); sketched: sketch={args.sketch}.",
            ""]
    summary = []
    for name in models:
        desc, spec = known[name]
        log(f"{name}: SGD, exact and sketched collect steps side by side, {rounds} rounds")
        timing = run_child(spec, None, args.device, rounds, args.sketch, threads)
        res = {which: {"times": timing["times"][which]} for which in CONFIGS}
        for which in CONFIGS:
            res[which]["memory"] = run_child(spec, which, args.device, rounds, args.sketch, threads)["memory"]
            log(f"{name}: {which} {statistics.median(res[which]['times']):.2f} s, "
                f"{res[which]['memory'] / 2**20:.0f} MiB")
        sgd_t = statistics.median(res["sgd"]["times"])
        sgd_m = res["sgd"]["memory"]
        rows = []
        for which, label in (("sgd", "SGD"), ("exact", "FNGD collect, exact"),
                             ("sketch", f"FNGD collect, sketch={args.sketch}")):
            t = statistics.median(res[which]["times"])
            m = res[which]["memory"]
            rows.append([label, f"{t * 1000:.0f}", f"{t / sgd_t:.2f}x", f"{m / 2**20:.0f} MiB", f"{m / sgd_m:.2f}x"])
            if which != "sgd":
                summary.append([desc, label, f"{t / sgd_t:.2f}x", f"{m / sgd_m:.2f}x"])
        text += [f"## {desc}", "", fmt_table(["step", "median ms", "vs SGD", "peak memory growth", "vs SGD"], rows),
                 "", "Where the exact collect step's time goes (one profiled step):", "",
                 fmt_table(["phase", "ms", "share"], phase_rows(timing["profile"]["exact"])), "",
                 f"And the sketched one's (sketch={args.sketch}):", "",
                 fmt_table(["phase", "ms", "share"], phase_rows(timing["profile"]["sketch"])), ""]
        print("\n".join(text[-12:]), flush=True)
    text += ["## Summary", "", "Targets: collect step <= 2.0x SGD (aim 1.5x), peak memory <= 1.5x SGD.", "",
             fmt_table(["model, batch", "collect step", "time vs SGD", "memory vs SGD"], summary), ""]
    write_report(args.out, "\n".join(text), t_start)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
