"""Step cost of FNGD and our KFAC against an independent peer, ASDL (PyPI ``asdfghjkl``), in one process.

    python benchmarks/peers.py                 # CPU-sized run (ResNet-18 and the Transformer of step_cost.py)
    python benchmarks/peers.py --quick         # smoke test: tiny stand-in models, seconds
    python benchmarks/peers.py --batch 128 --rounds 20 --out results/peers.md   # on a GPU

Configurations, each on its own copy of the same model, timed in interleaved rounds (one step of each
per round, so drifting machine load hits all alike), medians over rounds:
  sgd                       torch.optim.SGD with momentum
  fngd collect / reuse      FNGD (coefficients="network"): a solving step / a step reusing stored coefficients
  fngd collect sketch=32    FNGD's solving step with sketched Grams (unbiased; ASDL's conv Gram is biased)
  asdl smw                  ASDL SmwEmpNaturalGradientMaker (SMW empirical natural gradient) + SGD
  kfac-<inverse> 1/1        our KFAC, factors and inverses every step, inverse="eigen" and "cholesky"
  asdl kfac 1/1             ASDL KfacGradientMaker, factors and inverses every step (its default config)
  ... 10/100 (amortised)    factors every 10 steps, inverses every 100: t_plain + (t_factor - t_plain)/10 +
                            (t_inverse - t_plain)/100 from the three step kinds (plain, +factors, +inverses),
                            each timed on one instance whose schedule is switched per step (as step_cost.py)
ASDL KFAC runs with fisher_type="fisher_emp" (our KFAC's empirical-gradient factors; ASDL's default
"fisher_mc" adds a backward with sampled labels), an EMA of 0.05 (our factor_decay 0.95) on the 10/100
schedule, damping 1e-3, and the layers our KFAC covers (Linear/Conv2d with factors <= step_cost.KFAC_MAX_DIM;
BatchNorm, LayerNorm, Embedding left to SGD). ASDL SMW covers what its Gram hooks support; what it
leaves out or cannot run is printed, not hidden. A configuration that fails is reported as such.

Every KFAC instance (ours and ASDL's) takes a second warm-up step that updates factors and
inverses: at the first step the convolutions of a residual branch whose last BatchNorm is
zero-initialised get no gradient, and ASDL's Kron.update_inv skips an all-zero factor, so its
later steps would leave those layers (16 of ResNet-18's 21) unpreconditioned, silently, and look
cheaper for it. Before timing, every layer ASDL's K-FAC is meant to cover must have an inverse,
else the configuration is reported as failed.

Cost of the full run on a CPU: every step that inverts (1/1, +inverses, and each warm-up) factorises
ResNet-18's 4609 x 4609 conv factors, ~1 min per step on 2 busy cores for ASDL's KFAC; meant for a GPU.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import Seq2Seq, seq2seq_batch  # noqa: E402
from step_cost import BIG, KFAC_KINDS, KFAC_MAX_DIM, fmt_table, sync, train_step, write_report  # noqa: E402

from fngd_plugin import FNGD, KFAC  # noqa: E402
from timm_ext import cifar_resnet18  # noqa: E402  (the sweeps' model, registered in timm)

LR = 0.01
WARM_UP = "kfac factors+inverses"  # the schedule-kind instances' second warm-up step
SCHEDULES = {**KFAC_KINDS, WARM_UP: (1, 1)}  # kind -> (factor, inverse) update intervals
DAMPING_KFAC = 1e-3
PAD = 1


# ------------------------------------------------------------------------------------------- tasks
@dataclass
class Task:
    """A model with its batch split into model inputs, targets and a loss taking ``reduction`` (ASDL
    calls the loss itself, with reduction "none" or "sum")."""

    name: str
    model: nn.Module
    inputs: tuple
    targets: tuple
    loss: Callable
    loss_kwargs: dict = field(default_factory=dict)
    description: str = ""

    def closure(self, model: nn.Module) -> torch.Tensor:
        return self.loss(model(*self.inputs), *self.targets, **self.loss_kwargs)


def seq_loss(logits: torch.Tensor, tgt: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """step_cost's seq2seq_loss from logits: label-smoothed token cross-entropy summed per sentence,
    then reduced over sentences (the per-sample loss is the sentence's)."""
    tok = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=PAD, reduction="none", label_smoothing=0.1)
    per_sentence = tok.sum(1)
    if reduction == "none":
        return per_sentence
    return per_sentence.sum() if reduction == "sum" else per_sentence.mean()


def tiny_cnn(classes: int) -> nn.Module:
    """--quick stand-in for ResNet-18: its layer types (bias-free Conv2d, BatchNorm2d, Linear head)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))


def resnet_task(batch: int, device: str, quick: bool) -> Task:
    classes, side = (10, 16) if quick else (100, 32)
    model = (tiny_cnn(classes) if quick else cifar_resnet18(num_classes=classes)).to(device)
    g = torch.Generator().manual_seed(0)  # the same batch as step_cost.resnet_task
    x = torch.randn(batch, 3, side, side, generator=g).to(device)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    desc = (f"tiny CNN stand-in (2 conv+BN, linear head), {side}x{side}, {classes} classes" if quick
            else f"ResNet-18 (CIFAR stem) {side}x{side}, {classes} classes")
    return Task("resnet18", model, (x,), (y,), F.cross_entropy, {"label_smoothing": 0.1}, desc)


def transformer_task(batch: int, device: str, quick: bool) -> Task:
    dims = (dict(vocab=300, d=32, heads=2, ffn=64, layers=1) if quick
            else dict(vocab=8000, d=256, heads=4, ffn=1024, layers=3))
    tokens = 8 if quick else 30
    model = Seq2Seq(**dims).to(device)
    src, prev, tgt = seq2seq_batch(batch, tokens, dims["vocab"], device=device)
    desc = (f"Transformer {dims['layers']}+{dims['layers']} layers, d_model {dims['d']}, {dims['heads']} heads, "
            f"FFN {dims['ffn']}, vocab {dims['vocab']} (tied decoder embeddings), {tokens} tokens")
    return Task("transformer", model, (src, prev), (tgt,), seq_loss, {}, desc)


TASKS = {"resnet18": resnet_task, "transformer": transformer_task}


# ------------------------------------------------------------------------------------------- runners
class Runner:
    """One timed configuration: ``step()`` is one full training step (zero_grad .. optimizer step)."""

    def __init__(self, model: nn.Module, step: Callable[[], None], schedule: Callable[[str], None] | None = None):
        self.model, self._step, self.schedule = model, step, schedule

    def step(self, kind: str | None = None) -> None:
        if self.schedule is not None and kind is not None:
            self.schedule(kind)
        self._step()


def torch_runner(task: Task, make_opt: Callable) -> Runner:
    model = copy.deepcopy(task.model)
    opt = make_opt(model.parameters())
    runner = Runner(model, lambda: train_step(model, opt, task.closure))
    runner.opt = opt
    return runner


def kfac_ignored(model: nn.Module) -> list[nn.Module]:
    """Modules our KFAC leaves to SGD (see KFAC._unsupported), for ASDL's ignore_modules."""
    out = []
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            w = m.weight
            too_big = max(w[0].numel() + (m.bias is not None), w.shape[0]) > KFAC_MAX_DIM
            if too_big or (isinstance(m, nn.Conv2d) and m.groups != 1):
                out.append(m)
        elif any(p.requires_grad for p in m.parameters(recurse=False)):
            out.append(m)
    return out


def asdl_runner(task: Task, kind: str) -> Runner:
    """ASDL's GradientMaker protocol: set up the model and loss calls, forward_and_backward, then SGD.
    The calls are set up again every step: ASDL writes reduction= into the loss kwargs it is handed."""
    import asdl.precondition as asdl

    model = copy.deepcopy(task.model)
    sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    n = task.targets[0].shape[0]
    schedule = None
    if kind == "smw":
        maker = asdl.SmwEmpNaturalGradientMaker(model, asdl.SmwEmpNaturalGradientConfig(data_size=n, damping=1e-3))
    else:
        config = asdl.PreconditioningConfig(data_size=n, damping=DAMPING_KFAC, ignore_modules=kfac_ignored(model))
        if kind == "kfac-kinds":  # accumulated factors (EMA), schedule switched per timed step
            config.ema_decay = 0.05
            config.curvature_upd_interval = 1

            def schedule(k: str) -> None:
                fac, inv = SCHEDULES[k]
                config.curvature_upd_interval, config.preconditioner_upd_interval = fac, inv
        maker = asdl.KfacGradientMaker(model, config, fisher_type="fisher_emp")

    def step() -> None:
        sgd.zero_grad(set_to_none=True)
        dummy = maker.setup_model_call(model, *task.inputs)
        maker.setup_loss_call(task.loss, dummy, *task.targets, **dict(task.loss_kwargs))
        maker.forward_and_backward()
        sgd.step()

    runner = Runner(model, step, schedule)
    if kind != "smw":
        runner.uncovered = lambda: asdl_kfac_uncovered(maker, model)
    return runner


def asdl_kfac_uncovered(maker, model: nn.Module) -> list[str]:
    """Layers ASDL's K-FAC is meant to precondition but has no inverse for, so that it silently
    leaves their gradient as it is (its Kron.update_inv skips a factor that is all zeros: every
    convolution of a residual branch whose last BatchNorm is zero-initialised, at the first step)."""
    out = []
    for name, m in model.named_modules():
        if m in maker.modules_for_curvature:
            matrix = maker._get_module_symmatrix(m, "kron")
            if matrix is None or not matrix.has_inv:
                out.append(name)
    return out


def configurations() -> dict[str, Callable[[Task], Runner]]:
    """name -> factory(task). Names ending in plain/+factors/+inverses share one instance per prefix."""
    confs: dict[str, Callable[[Task], Runner]] = {
        "sgd": lambda t: torch_runner(t, lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9)),
        "fngd collect": lambda t: torch_runner(t, lambda p: FNGD(p, lr=LR, coefficients="network",
                                                                 steps_per_epoch=BIG)),
        "fngd collect sketch=32": lambda t: torch_runner(t, lambda p: FNGD(p, lr=LR, coefficients="network",
                                                                           steps_per_epoch=BIG, sketch=32)),
        "fngd reuse": lambda t: torch_runner(t, lambda p: FNGD(p, lr=LR, coefficients="network", steps_per_epoch=1)),
        "asdl smw": lambda t: asdl_runner(t, "smw"),
    }
    for inverse in ("cholesky", "eigen"):
        kf = dict(lr=LR, damping=DAMPING_KFAC, max_factor_dim=KFAC_MAX_DIM, inverse=inverse)
        confs[f"kfac-{inverse} 1/1"] = lambda t, kf=kf: torch_runner(
            t, lambda p: KFAC(p, factor_update_steps=1, inv_update_steps=1, **kf))

        def kinds(t: Task, kf=kf) -> Runner:
            r = torch_runner(t, lambda p: KFAC(p, factor_update_steps=BIG, inv_update_steps=BIG, **kf))

            def schedule(k: str) -> None:
                r.opt.factor_update_steps, r.opt.inv_update_steps = SCHEDULES[k]
            r.schedule = schedule
            return r

        for k in KFAC_KINDS:
            confs[f"kfac-{inverse} {k.split()[-1]}"] = kinds
    confs["asdl kfac 1/1"] = lambda t: asdl_runner(t, "kfac")
    for k in KFAC_KINDS:
        confs[f"asdl kfac {k.split()[-1]}"] = lambda t: asdl_runner(t, "kfac-kinds")
    return confs


def kind_of(name: str) -> tuple[str, str] | None:
    """("kfac-eigen", "kfac +factors") for a schedule-kind configuration, else None."""
    for k in KFAC_KINDS:
        suffix = k.split()[-1]
        if name.endswith(" " + suffix):
            return name[: -len(suffix) - 1], k
    return None


# ------------------------------------------------------------------------------------------- timing
def short_error(e: BaseException) -> str:
    frame = traceback.extract_tb(e.__traceback__)[-1]
    msg = " ".join(str(e).split())[:160]
    return f"{type(e).__name__}: {msg} (at {os.path.basename(frame.filename)}:{frame.lineno})"


def time_task(task: Task, device: str, rounds: int, slow_rounds: int, log) -> tuple[dict, dict, dict]:
    """Returns (times by name, failures by name, ASDL warnings by configuration)."""
    confs = configurations()
    runners: dict[str, Runner] = {}
    shared: dict[str, Runner] = {}
    failed: dict[str, str] = {}
    notes: dict[str, set[str]] = {}
    for name, factory in confs.items():
        kind = kind_of(name)
        prefix = kind[0] if kind else name
        if prefix in failed:
            failed[name] = failed[prefix]
            continue
        if kind and prefix in shared:
            runners[name] = shared[prefix]
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                runner = factory(task)
                runner.step(kind[1] if kind else None)  # warm-up: FNGD reuse's collect step, first factors/inverses
                # inverses again once every layer has a gradient (zero-initialised residual branches)
                if kind:
                    runner.step(WARM_UP)
                elif name.endswith("1/1"):
                    runner.step()
                missing = runner.uncovered() if hasattr(runner, "uncovered") else []
                if missing:
                    raise RuntimeError(f"ASDL K-FAC has no inverse for {len(missing)} layers after warm-up "
                                       f"(it would leave them unpreconditioned): {', '.join(missing[:4])}")
            except Exception as e:  # a peer that cannot run is a result, not a crash
                failed[prefix] = failed[name] = short_error(e)
                log(f"  {task.name}: {name} cannot run: {failed[name]}")
                continue
        if prefix.startswith("asdl"):
            notes[prefix] = {" ".join(str(w.message).split())[:200] for w in caught
                             if issubclass(w.category, UserWarning)}
        runners[name] = runner
        if kind:
            shared[prefix] = runner
    times: dict[str, list[float]] = {n: [] for n in runners}
    for r in range(rounds):
        for name, runner in list(runners.items()):
            kind = kind_of(name)
            slow = name.endswith("1/1") or (kind is not None and kind[1] == "kfac +inverses")
            if slow and r >= slow_rounds:
                continue
            try:
                sync(device)
                t0 = time.perf_counter()
                runner.step(kind[1] if kind else None)
                sync(device)
            except Exception as e:
                failed[name] = short_error(e)
                del runners[name]
                log(f"  {task.name}: {name} failed in round {r + 1}: {failed[name]}")
                continue
            times[name].append(time.perf_counter() - t0)
        log(f"  {task.name}: round {r + 1}/{rounds} done")
    for name in ("fngd collect", "fngd collect sketch=32", "fngd reuse"):
        opt = getattr(runners.get(name), "opt", None)
        collects = "collect" in name
        if opt is not None and opt.in_collect_phase != collects:
            raise RuntimeError(f"{name}: expected collect={collects}")
    return {k: v for k, v in times.items() if v}, failed, notes


# ------------------------------------------------------------------------------------------- report
def machine_line(device: str, threads: int) -> str:
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    try:
        from importlib.metadata import version
        asdl_v = version("asdfghjkl")
    except Exception:
        asdl_v = "not installed"
    return (f"Machine: {name} ({device}), {platform.platform()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, torch {torch.__version__}, {threads} threads, asdfghjkl {asdl_v}.")


def summarize(task: Task, batch: int, times: dict, failed: dict, notes: dict) -> str:
    med = {k: statistics.median(v) for k, v in times.items()}
    derived = {}
    for prefix in ("kfac-cholesky", "kfac-eigen", "asdl kfac"):
        ks = [f"{prefix} {k.split()[-1]}" for k in KFAC_KINDS]
        if all(k in med for k in ks):
            plain, fac, inv = (med[k] for k in ks)
            derived[f"{prefix} 10/100 (amortised)"] = plain + (fac - plain) / 10 + (inv - plain) / 100
    sgd = med.get("sgd")
    rows = []
    for name in [*configurations(), *derived]:
        if name in failed and name not in med:
            rows.append([name, "-", "-", 0, "cannot run: " + failed[name]])
            continue
        t = med.get(name, derived.get(name))
        if t is None:
            continue
        ratio = f"{t / sgd:.2f}x" if sgd else "-"
        rows.append([name, f"{t * 1000:.1f}", ratio, len(times.get(name, [])) or "derived", ""])
    out = [f"### {task.name}, batch {batch}", "", task.description + ".", "",
           fmt_table(["step", "median ms", "vs SGD", "rounds", "note"], rows), ""]
    pairs = [("asdl smw", "fngd collect"), ("asdl smw", "fngd collect sketch=32"), ("asdl smw", "fngd reuse"),
             ("asdl kfac 1/1", "kfac-cholesky 1/1"),
             ("asdl kfac 10/100 (amortised)", "kfac-cholesky 10/100 (amortised)")]
    allm = {**med, **derived}
    ours = [k for k in ("kfac-cholesky 1/1", "kfac-eigen 1/1") if k in allm]
    if ours:
        best = min(ours, key=allm.get)
        out.append(f"Our fastest KFAC inverse every step: {best.split()[0]} ({allm[best] * 1000:.1f} ms).")
    for a, b in pairs:
        if a in allm and b in allm:
            out.append(f"{a} / {b}: {allm[a] / allm[b]:.2f}x")
    for prefix, msgs in sorted(notes.items()):
        for m in sorted(msgs):
            out.append(f"ASDL warning ({prefix}): {m}")
    out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny stand-in models, batch 4, 3 rounds")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 32; --quick: 4)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; --quick: 3)")
    ap.add_argument("--slow-rounds", type=int, default=None,
                    help="rounds for the steps that invert (1/1 and +inverses; default 2; --quick: 1)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tasks", default="resnet18,transformer")
    ap.add_argument("--out", default="results/peers.md")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="fngd_plugin")
    warnings.filterwarnings("ignore", category=FutureWarning)
    threads = int(os.environ.get("BENCH_THREADS", "2"))
    torch.set_num_threads(threads)
    try:
        import asdl.precondition  # noqa: F401
    except ImportError:
        sys.exit("benchmarks/peers.py needs ASDL: pip install asdfghjkl (the bench extra)")

    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    batch = args.batch or (4 if args.quick else 32)
    rounds = args.rounds or (3 if args.quick else 5)
    slow_rounds = min(rounds, args.slow_rounds or (1 if args.quick else 2))
    header = [f"# Peer step-cost benchmark: FNGD and KFAC vs ASDL ({'quick smoke' if args.quick else 'full'} run)",
              "", machine_line(args.device, threads), "",
              f"Batch {batch}; medians over {rounds} interleaved rounds ({slow_rounds} for the steps that invert: "
              f"1/1 and +inverses). LR {LR}; FNGD defaults (relative damping, normalize='sum'); KFAC damping "
              f"{DAMPING_KFAC}, layers with a factor above {KFAC_MAX_DIM} left to SGD (ours and ASDL's alike); "
              "ASDL KFAC fisher_type='fisher_emp', SMW damping 1e-3. ASDL SMW's conv Gram is its own approximation "
              "((sum_t a_it.a_jt)(sum_t d_it.d_jt)/T, not the exact sum_{t,s}); its Linear Gram is exact for 2-D "
              "inputs only.", ""]
    if args.quick:
        header += ["Quick mode: tiny stand-in models (same layer types), timings are a smoke test only.", ""]
    sections = []
    for name in args.tasks.split(","):
        task = TASKS[name](batch, args.device, args.quick)
        log(f"timing {name}")
        times, failed, notes = time_task(task, args.device, rounds, slow_rounds, log)
        sections.append(summarize(task, batch, times, failed, notes))
        print(sections[-1], flush=True)
    write_report(args.out, "\n".join(header + sections), t_start)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
