"""Train a timm image classifier with one command, resumably, and write a run record.

    python -m timm_ext.train --data DATA_DIR --out RUN_DIR --opt fngd --lr 0.1 --epochs 6 \\
        [--model cifar_resnet18] [--num-classes 10] [--img-size 32] [--opt-kwargs damping=1.0 ...]
    torchrun --nproc_per_node 4 -m timm_ext.train ...      # one process per GPU

Built from timm's own pieces (create_model, create_dataset, create_loader, create_optimizer_v2,
create_scheduler_v2, accuracy), so ``--opt`` takes anything in timm's optimizer registry: the
plugin's ``fngd`` and ``kfac`` and timm's ``sgd``, ``momentum``, ``adamw``, ... ``--data`` is an
image folder with ``--train-split``/``--val-split`` sub-folders (``python -m timm_ext.digits``
writes one), or the root of a timm dataset named by ``--dataset`` (``--dataset torch/cifar100
--val-split test``; ``--download`` on machines with internet).

What it adds to timm's train.py: a checkpoint after every epoch (RUN_DIR/checkpoint.pt, written
atomically) from which a re-run of the same command resumes — a preempted or killed run ends with
the same numbers as an uninterrupted one (each epoch's data order and augmentation draw from
``seed`` and the epoch alone) — and RUN_DIR/record.json (format: fngd_records.py) with
per-epoch train loss, validation top-1 and loss, cumulative optimisation time and FNGD's phase.
With ``--test-split``, the weights of the best validation epoch (RUN_DIR/best.pt; ties keep the
earlier) are evaluated once on that split at the end: ``final`` gets ``test_top1``, ``test_loss``
and ``best_epoch`` -- chosen on validation, reported on test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

_log = logging.getLogger("timm_ext.train")


def parse_kv(items: list[str]) -> dict[str, Any]:
    """``k=v`` strings to a dict, values parsed as JSON where they parse (numbers, true, null)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--opt-kwargs {item!r}: expected key=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


# what this runner takes as flags of its own; other optimizer options go to --opt-kwargs
OPT_FLAGS = ("lr", "momentum", "weight_decay")


def optimizers() -> dict[str, None]:
    """The runner interface of fngd_slurm (see slurm/sweep.py): timm's registry, the plugin's fngd
    and kfac included; options are not checked here (timm checks them when it builds one)."""
    import timm.optim

    import timm_ext  # noqa: F401  (registers fngd and kfac)

    return dict.fromkeys(timm.optim.list_optimizers())


def sweep_command(*, python: list[str], data: str, run_dir: str, run_id: str, task: str, optimizer: str,
                  hparams: dict[str, Any], seed: int, epochs: int, max_time_min: float | None,
                  args: dict[str, Any], threads: int | None, gpus: int) -> list[str]:
    """The runner interface of fngd_slurm: this module's command line for one sweep run (``args``:
    its own options; several GPUs: one process each through torchrun)."""
    from fngd_slurm.sweep import flags

    kwargs = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in hparams.items() if k not in OPT_FLAGS]
    body = ["timm_ext.train", "--data", data, "--out", run_dir, "--opt", optimizer, "--seed", str(seed),
            "--epochs", str(epochs), "--task", task, "--run-name", run_id,
            *flags({k: v for k, v in hparams.items() if k in OPT_FLAGS}), *flags(args)]
    if kwargs:
        body += ["--opt-kwargs", *kwargs]
    if max_time_min:
        body += ["--max-time-min", str(max_time_min)]
    if threads and "threads" not in args:
        body += ["--threads", str(threads)]
    if gpus > 1:
        return [*python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus), "-m", *body]
    return [*python, "-m", *body]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m timm_ext.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="data root: an image folder, or where --dataset's files are")
    ap.add_argument("--dataset", default="", help="a timm dataset name, e.g. torch/cifar100 (default: image folder)")
    ap.add_argument("--download", action="store_true", help="let a torchvision dataset download itself")
    ap.add_argument("--train-split", default="train")
    ap.add_argument("--val-split", default="validation")
    ap.add_argument("--test-split", default=None,
                    help="evaluate the best validation epoch's weights on this split at the end (default: none)")
    ap.add_argument("--test-data", default=None,
                    help="data root of --test-split, where it is not under --data (default: --data)")
    ap.add_argument("--out", required=True, type=Path, help="run directory: checkpoint.pt, record.json")
    ap.add_argument("--model", default="cifar_resnet18")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--in-chans", type=int, default=3, help="image channels (1: grey images, e.g. Fashion-MNIST)")
    ap.add_argument("--mean", type=float, nargs="+", default=None, help="one per channel (default 0.5 each)")
    ap.add_argument("--std", type=float, nargs="+", default=None, help="one per channel (default 0.5 each)")
    ap.add_argument("--aug", action="store_true", help="timm's training augmentation (default: none)")
    ap.add_argument("--crop-pct", type=float, default=1.0,
                    help="evaluation centre crop: resize to img_size/crop_pct, crop img_size (default 1.0: the "
                         "images as trained on; timm's default 0.875 would zoom evaluation images by 1/0.875)")
    ap.add_argument("--batch-size", type=int, default=64, help="per process")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--max-time-min", type=float, default=None,
                    help="stop after the epoch that exceeds this much optimisation time (a time budget)")
    ap.add_argument("--opt", default="fngd", help="a name in timm's optimizer registry")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--opt-kwargs", nargs="*", default=[], metavar="K=V", help="extra optimizer options")
    ap.add_argument("--sched", default="cosine", help="timm scheduler name, or 'none'")
    ap.add_argument("--warmup-epochs", type=int, default=0)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--task", default="timm", help="task name written to the record")
    ap.add_argument("--run-name", default=None, help="run id in the record (default: the --out folder's name)")
    return ap


class Trainer:
    def __init__(self, args: argparse.Namespace):
        import timm
        from timm.data import create_dataset, create_loader
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        import timm_ext  # noqa: F401  (registers fngd / kfac / cifar_resnet18; the autoload does too)

        self.args = args
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        device = args.device
        if self.world > 1:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if device.startswith("cuda"):
                device = f"cuda:{local}"
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        self.device = torch.device(device)
        torch.manual_seed(args.seed)
        model = timm.create_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans).to(self.device)
        self.model = model
        if self.world > 1:
            model = torch.nn.parallel.DistributedDataParallel(model)
        self.net = model
        self.opt = create_optimizer_v2(self.model, opt=args.opt, lr=args.lr, momentum=args.momentum,
                                       weight_decay=args.weight_decay, **parse_kv(args.opt_kwargs))
        self.sched = None
        if args.sched != "none":
            self.sched, _ = create_scheduler_v2(self.opt, sched=args.sched, num_epochs=args.epochs,
                                                warmup_epochs=args.warmup_epochs)
        root, name = args.data, args.dataset
        common = dict(input_size=(args.in_chans, args.img_size, args.img_size), mean=tuple(args.mean),
                      std=tuple(args.std),
                      num_workers=args.workers, use_prefetcher=False, distributed=self.world > 1,
                      device=self.device, persistent_workers=args.workers > 0)  # timm < 1.0.2x defaults to True
        train = create_dataset(name, root=root, split=args.train_split, is_training=True, download=args.download)
        val = create_dataset(name, root=root, split=args.val_split, download=args.download)
        self.train_loader = create_loader(train, batch_size=args.batch_size, is_training=True,
                                          no_aug=not args.aug, **common)
        self.val_loader = create_loader(val, batch_size=max(args.batch_size, 128), is_training=False,
                                        crop_pct=args.crop_pct, **common)
        self.test_loader = None
        if args.test_split:  # built now: a missing split fails before any training, not after it
            test = create_dataset(name, root=args.test_data or root, split=args.test_split, download=args.download)
            self.test_loader = create_loader(test, batch_size=max(args.batch_size, 128), is_training=False,
                                             crop_pct=args.crop_pct, **common)

    # ------------------------------------------------------------------------------- epochs
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _autocast(self):
        if not self.args.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _collect_steps(self) -> int | None:
        stats = getattr(self.opt, "stats", None)
        return stats()["collect_steps"] if stats is not None and hasattr(self.opt, "in_collect_phase") else None

    def train_epoch(self, epoch: int) -> tuple[float, float, int, str | None]:
        """(mean train loss, seconds, steps, FNGD phase) of one epoch."""
        # the epoch's order comes from (seed, epoch) alone, so a resumed run draws the same batches
        torch.manual_seed(self.args.seed * 100_003 + epoch)
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        collect_before = self._collect_steps()
        self.net.train()
        total = torch.zeros((), device=self.device)
        steps = 0
        self._sync()
        t0 = time.perf_counter()
        for x, y in self.train_loader:
            x, y = x.to(self.device), y.to(self.device)
            self.opt.zero_grad(set_to_none=True)
            with self._autocast():
                loss = F.cross_entropy(self.net(x), y, label_smoothing=self.args.label_smoothing)
            loss.backward()
            self.opt.step()
            total += loss.detach().float()
            steps += 1
        self._sync()
        seconds = time.perf_counter() - t0
        if self.sched is not None:
            self.sched.step(epoch + 1)
        mean_loss = self._mean_over_ranks(total / max(steps, 1))
        collect_after = self._collect_steps()
        phase = None if collect_after is None else ("collect" if collect_after > collect_before else "reuse")
        return mean_loss, seconds, steps, phase

    @torch.no_grad()
    def evaluate(self, loader=None) -> tuple[float, float]:
        """(top-1 accuracy %, mean loss) on the validation split (or ``loader``'s)."""
        self.net.eval()
        sums = torch.zeros(3, device=self.device, dtype=torch.float64)
        for x, y in self.val_loader if loader is None else loader:
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                logits = self.net(x)
            sums[0] += (logits.argmax(1) == y).sum()
            sums[1] += F.cross_entropy(logits.float(), y, reduction="sum")
            sums[2] += y.numel()
        if self.world > 1:
            dist.all_reduce(sums)
        correct, loss, n = sums.tolist()
        return 100.0 * correct / n, loss / n

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        if self.world > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world
        return float(value)

    # ------------------------------------------------------------------------------- checkpoints
    def save(self, path: Path, epoch: int) -> None:
        state = {"epoch": epoch, "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                 "scheduler": self.sched.state_dict() if self.sched is not None else None}
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def weights(self) -> dict[str, Tensor]:
        """A copy of the weights (every rank keeps its own: no file read across ranks)."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def save_best(self, path: Path, state: dict[str, Tensor], epoch: int, top1: float) -> None:
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"epoch": epoch, "top1": top1, "model": state}, tmp)
        os.replace(tmp, path)

    def test(self, state: dict[str, Tensor]) -> tuple[float, float]:
        """(top-1, loss) of the weights ``state`` on the test split; the trained weights are restored."""
        last = self.weights()
        self.model.load_state_dict(state)
        try:
            return self.evaluate(self.test_loader)
        finally:
            self.model.load_state_dict(last)

    def load(self, path: Path) -> int:
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.sched is not None and state["scheduler"] is not None:
            self.sched.load_state_dict(state["scheduler"])
        return int(state["epoch"])


def hparams_of(args: argparse.Namespace) -> dict[str, Any]:
    """The options the optimizer actually received (timm passes momentum only to those that have one)."""
    from timm.optim._optim_factory import default_registry

    hp = {"lr": args.lr, "weight_decay": args.weight_decay}
    if default_registry.get_optimizer_info(args.opt).has_momentum:
        hp["momentum"] = args.momentum
    return {**hp, **parse_kv(args.opt_kwargs)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from fngd_records import RunRecord, run_config

    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(args)
    main_rank = trainer.rank == 0
    ckpt, best_path = args.out / "checkpoint.pt", args.out / "best.pt"
    start = trainer.load(ckpt) if ckpt.exists() else 0
    best: dict[str, Any] | None = None  # {"epoch", "top1", "model"} of the best validation epoch so far
    if args.test_split and start and best_path.exists():
        best = torch.load(best_path, map_location=trainer.device, weights_only=True)
        if best["epoch"] > start:  # saved, then killed before its checkpoint: that epoch runs again and,
            best = None             # deterministic, beats every earlier one again (so nothing is lost)
    record = RunRecord(args.out / "record.json")
    config = run_config(args.out, {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    if main_rank:
        record.start(run=args.run_name or args.out.name, task=args.task, kind="timm", optimizer=args.opt,
                     hparams=hparams_of(args), seed=args.seed, config=config, metric="top1", mode="max",
                     device=str(trainer.device), resumed_from_epoch=start)
    if start:
        _log.info("resumed from %s after epoch %d", ckpt, start)
    opt_time, wall = record.elapsed if main_rank else (0.0, 0.0)
    top1 = math.nan
    try:
        for epoch in range(start, args.epochs):
            t_epoch = time.perf_counter()
            loss, seconds, steps, phase = trainer.train_epoch(epoch)
            top1, val_loss = trainer.evaluate()
            opt_time += seconds
            wall += time.perf_counter() - t_epoch
            if args.test_split and math.isfinite(top1) and (best is None or top1 > best["top1"]):
                best = {"epoch": epoch + 1, "top1": top1, "model": trainer.weights()}
                if main_rank:  # before the checkpoint: a resume from it finds the best so far
                    trainer.save_best(best_path, best["model"], epoch + 1, top1)
            if main_rank:
                trainer.save(ckpt, epoch + 1)
                record.epoch(epoch=epoch + 1, step=(epoch + 1) * steps, time=opt_time, wall=wall, epoch_time=seconds,
                             train_loss=loss, val_metric=top1, val_loss=val_loss, phase=phase)
            print(f"epoch {epoch + 1}/{args.epochs} | train loss {loss:.4f} | val top1 {top1:.2f} | "
                  f"val loss {val_loss:.4f} | {seconds:.1f}s" + (f" | {phase}" if phase else ""), flush=True)
            if not math.isfinite(loss):
                raise FloatingPointError(f"train loss is {loss} in epoch {epoch + 1}")
            if args.max_time_min is not None and opt_time > 60 * args.max_time_min:
                print(f"time budget of {args.max_time_min} min reached after epoch {epoch + 1}", flush=True)
                break
        test: dict[str, Any] = {}
        if args.test_split:
            if best is None:
                raise RuntimeError(f"no finite validation top-1 in any epoch: nothing to evaluate on "
                                   f"{args.test_split!r}")
            test_top1, test_loss = trainer.test(best["model"])
            test = {"test_top1": test_top1, "test_loss": test_loss, "best_epoch": best["epoch"]}
            print(f"test top1 {test_top1:.2f} | test loss {test_loss:.4f} | weights of epoch {best['epoch']} "
                  f"(best validation top1 {best['top1']:.2f})", flush=True)
        if main_rank:
            last = record.data["epochs"][-1] if record.data["epochs"] else {}
            record.finish(val_metric=last.get("val_metric"), val_loss=last.get("val_loss"),
                          epochs=len(record.data["epochs"]), time=opt_time, **test)
        return record.data
    except BaseException:
        if main_rank:
            record.fail(traceback.format_exc())
        raise
    finally:
        if trainer.world > 1:
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        parse_kv(args.opt_kwargs)
        for name in ("epochs", "batch_size", "num_classes", "img_size", "in_chans"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
        if not 0 < args.crop_pct <= 1:
            raise ValueError(f"--crop-pct {args.crop_pct}: must be in (0, 1]")
        for name in ("mean", "std"):
            value = getattr(args, name)
            if value is None:
                setattr(args, name, [0.5] * args.in_chans)
            elif len(value) != args.in_chans:
                raise ValueError(f"--{name} {' '.join(map(str, value))}: {len(value)} values, expected one per "
                                 f"channel (--in-chans {args.in_chans})")
        if args.lr <= 0:
            raise ValueError(f"--lr {args.lr}: must be > 0")
        if not args.dataset:  # an image folder: every split named must be a sub-folder of --data
            for flag in ("train_split", "val_split", "test_split"):
                split = getattr(args, flag)
                if split is not None and not (Path(args.data) / split).is_dir():
                    have = sorted(p.name for p in Path(args.data).iterdir() if p.is_dir()) \
                        if Path(args.data).is_dir() else []
                    raise ValueError(f"--{flag.replace('_', '-')} {split}: no folder {Path(args.data) / split} "
                                     f"(sub-folders of --data: {', '.join(have) or 'none'})")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
