"""Train a translation model with the real fairseq-train, score it with the real fairseq-generate,
and write a run record -- one command, resumable.

    python -m fairseq_ext.translate DATA_BIN --out RUN_DIR [--seed 1] [--beam 5] -- FAIRSEQ_TRAIN_ARGS...

e.g. ``python -m fairseq_ext.translate data/corpus/bin --out runs/t1 -- --arch transformer
--optimizer fngd --lr 0.25 --max-epoch 10 ...`` runs

1. ``fairseq-train DATA_BIN FAIRSEQ_TRAIN_ARGS --save-dir RUN_DIR/checkpoints --log-format json
   --eval-bleu ...``: validation BLEU (sacrebleu, greedy) after every epoch, the best checkpoint
   chosen by it. fairseq resumes from RUN_DIR/checkpoints/checkpoint_last.pt by itself, so
   re-running this command after a crash or preemption continues where the last epoch ended;
2. ``fairseq-generate DATA_BIN --path checkpoint_best.pt --gen-subset test --scoring sacrebleu
   --required-batch-size-multiple 1`` (no test sentence dropped), output in
   RUN_DIR/generate-test.txt;
3. RUN_DIR/record.json (format: fngd_records.py): per epoch train loss, validation loss
   and BLEU, optimisation seconds (from the moment fairseq starts iterating over an epoch's
   samples to the moment it begins validation, timed here as its log lines arrive), FNGD's phase;
   final test BLEU and the number of sentences translated.

The source/target languages, ``--eval-bleu-remove-bpe`` (sentencepiece) and
``--required-batch-size-multiple 1`` are filled in unless given. Both tools run as subprocesses
of this Python (``-m fairseq_cli.train`` / ``-m fairseq_cli.generate``), with the plugin loaded
by its autoload, exactly as from the shell.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from fngd_records import fairseq_epoch_stats

_BLEU = re.compile(r"BLEU = ([0-9.]+)")


def _has(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def optimizer_options(name: str) -> set[str]:
    """Option names of fairseq optimizer ``name`` (dataclass fields, or a legacy add_args), plus lr."""
    from fairseq.optim import OPTIMIZER_DATACLASS_REGISTRY, OPTIMIZER_REGISTRY

    dc = OPTIMIZER_DATACLASS_REGISTRY.get(name)
    if dc is not None:
        fields = {f for f in dc.__dataclass_fields__ if not f.startswith("_")}
    else:
        parser = argparse.ArgumentParser(add_help=False)
        cls = OPTIMIZER_REGISTRY[name]
        if hasattr(cls, "add_args"):
            cls.add_args(parser)
        fields = {a.dest for a in parser._actions}
    return fields | {"lr"}


# sweep names that mean another fairseq optimizer: fairseq's adam decouples weight decay (AdamW)
ALIASES = {"adamw": "adam"}


def optimizers() -> dict[str, set[str]]:
    """The runner interface of fngd_slurm (see slurm/sweep.py): fairseq's optimizer names (and
    ``ALIASES``), each with its option names."""
    import logging
    import warnings

    with warnings.catch_warnings():  # fairseq's import-time deprecation chatter is not the user's problem
        warnings.simplefilter("ignore")
        logging.getLogger("fairseq").setLevel(logging.WARNING)
        from fairseq.optim import OPTIMIZER_REGISTRY

        import fairseq_ext  # noqa: F401  (registers fngd and kfac)

    out = {n: optimizer_options(n) for n in OPTIMIZER_REGISTRY}
    out.update({alias: out[real] for alias, real in ALIASES.items() if real in out})
    return out


def sweep_command(*, python: list[str], data: str, run_dir: str, run_id: str, task: str, optimizer: str,
                  hparams: dict[str, Any], seed: int, epochs: int, max_time_min: float | None,
                  args: dict[str, Any], threads: int | None, gpus: int) -> list[str]:
    """The runner interface of fngd_slurm: this module's command line for one sweep run
    (``args``: fairseq-train options; fairseq spawns one worker per GPU itself)."""
    from fngd_slurm.sweep import flags

    train = ["--optimizer", ALIASES.get(optimizer, optimizer), *flags(hparams), "--max-epoch", str(epochs),
             *flags(args)]
    if max_time_min:
        train += ["--stop-time-hours", str(max_time_min / 60)]
    if gpus > 1:
        train += ["--distributed-world-size", str(gpus)]
    return [*python, "-m", "fairseq_ext.translate", data, "--out", run_dir, "--seed", str(seed),
            "--task-name", task, "--run-name", run_id, "--optimizer-label", optimizer, "--", *train]


def optimizer_hparams(train_args: list[str]) -> tuple[str, dict[str, Any]]:
    """The optimizer's name and the options given for it on the command line."""
    name = _value(train_args, "--optimizer")
    if name is None:
        raise ValueError("no --optimizer among the fairseq-train arguments")
    out: dict[str, Any] = {}
    for f in sorted(optimizer_options(name)):
        flag = "--" + f.replace("_", "-")
        if not _has(train_args, flag):
            continue
        v = _value(train_args, flag)
        if v is None or v.startswith("--"):
            out[f] = True
            continue
        try:
            out[f] = json.loads(v)
        except json.JSONDecodeError:
            out[f] = v
    return name, out


def _checkpoint_epoch(path: Path) -> int:
    """Epochs completed according to fairseq's checkpoint (0 when there is none)."""
    if not path.exists():
        return 0
    import torch

    import fairseq_ext  # noqa: F401  (checkpoint globals allow-listed)

    state = torch.load(path, map_location="cpu", weights_only=False)
    itr = (state.get("extra_state") or {}).get("train_iterator") or {}
    # fairseq saves the epoch it is in; at an epoch's end that is already the next one, at 0 iterations
    return max(int(itr.get("epoch", 1)) - 1, 0)


def _num(stats: dict, key: str) -> float | None:
    v = stats.get(key)
    try:
        return None if v is None else float(v)
    except ValueError:
        return None


def train(data: str, out: Path, train_args: list[str], record, start_epoch: int) -> None:
    """Run fairseq-train, turning its log into record epochs as it goes."""
    cmd = [sys.executable, "-m", "fairseq_cli.train", data, *train_args, "--save-dir", str(out / "checkpoints"),
           "--log-format", "json", "--no-progress-bar"]
    opt_time, wall = record.elapsed
    log = open(out / "train.log", "a")
    log.write(f"\n# {time.strftime('%F %T')} resuming after epoch {start_epoch}: {' '.join(cmd)}\n")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    t_mark = time.perf_counter()  # wall clock of the last recorded epoch's end (or of the start)
    t_iter = None
    seconds = None
    valid: dict = {}
    try:
        for line in proc.stdout:
            now = time.perf_counter()
            log.write(line)
            log.flush()
            if "Start iterating over samples" in line:
                t_iter = now
            elif 'begin validation on "valid"' in line and t_iter is not None:
                seconds = now - t_iter
            stats = fairseq_epoch_stats(line)
            if stats is None:
                continue
            if "valid_loss" in stats:
                valid = stats
                continue
            if "train_loss" not in stats:
                continue
            epoch = int(stats["epoch"])
            # FNGD's phase, from fairseq's own epoch stats (fairseq_ext logs it as a metric)
            collect = _num(stats, "train_fngd_collect")
            phase = None if collect is None else "collect" if collect > 0 else "reuse"
            if seconds is None:  # no validation this epoch: fairseq's own (whole-second) count
                seconds = _num(stats, "train_train_wall") or 0.0
            opt_time += seconds
            wall += now - t_mark
            t_mark = now
            record.epoch(epoch=epoch, step=int(float(stats.get("train_num_updates", 0))), time=opt_time, wall=wall,
                         epoch_time=seconds, train_loss=_num(stats, "train_loss"),
                         val_loss=_num(valid, "valid_loss"), val_metric=_num(valid, "valid_bleu"),
                         phase=phase,
                         lr=_num(stats, "train_lr"))
            print(f"epoch {epoch} | train loss {stats.get('train_loss')} | valid loss {valid.get('valid_loss')} | "
                  f"valid BLEU {valid.get('valid_bleu')} | {seconds:.1f}s" + (f" | {phase}" if phase else ""),
                  flush=True)
            seconds, valid = None, {}
        rc = proc.wait()
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    finally:
        log.close()
    if rc != 0:
        tail = "".join((out / "train.log").read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"fairseq-train exited with {rc}; last lines of {out / 'train.log'}:\n{tail}")


def generate(data: str, out: Path, src: str, tgt: str, beam: int, extra: list[str]) -> dict[str, Any]:
    ckpt = out / "checkpoints" / "checkpoint_best.pt"
    if not ckpt.exists():
        ckpt = out / "checkpoints" / "checkpoint_last.pt"
    cmd = [sys.executable, "-m", "fairseq_cli.generate", data, "--path", str(ckpt), "--gen-subset", "test",
           "-s", src, "-t", tgt, "--beam", str(beam), "--scoring", "sacrebleu", "--required-batch-size-multiple", "1",
           "--remove-bpe", "sentencepiece", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True)
    (out / "generate-test.txt").write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        raise RuntimeError(f"fairseq-generate exited with {res.returncode}:\n{(res.stdout + res.stderr)[-3000:]}")
    m = _BLEU.search(res.stdout + res.stderr)
    if m is None:
        raise RuntimeError(f"no BLEU in fairseq-generate's output ({out / 'generate-test.txt'})")
    hyps = sum(1 for ln in res.stdout.splitlines() if ln.startswith("H-"))
    return {"test_bleu": float(m.group(1)), "test_sentences": hyps, "checkpoint": ckpt.name,
            "sacrebleu": (res.stdout + res.stderr)[m.start():].splitlines()[0]}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fairseq_ext.translate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="fairseq-preprocess output (e.g. OUT/bin of fairseq_ext.corpus)")
    ap.add_argument("--out", required=True, type=Path, help="run directory")
    ap.add_argument("--source-lang", "-s", default="de")
    ap.add_argument("--target-lang", "-t", default="en")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--beam", type=int, default=5, help="beam of the final test translation")
    ap.add_argument("--eval-bleu-args", default='{"beam": 1, "max_len_a": 1.2, "max_len_b": 10}',
                    help="generation options of the per-epoch validation BLEU")
    ap.add_argument("--generate-args", default="--max-len-a 1.2 --max-len-b 10",
                    help="extra fairseq-generate options, one string (default bounds the output length)")
    ap.add_argument("--task-name", default="translation", help="task name written to the record")
    ap.add_argument("--run-name", default=None, help="run id in the record (default: the --out folder's name)")
    ap.add_argument("--optimizer-label", default=None,
                    help="optimizer name written to the record (default: fairseq's, e.g. adam)")
    return ap


def main(argv: list[str] | None = None) -> int:
    from fngd_records import RunRecord, run_config

    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:cut])
    train_args = argv[cut + 1:]
    if not Path(args.data).is_dir():
        print(f"error: data directory {args.data} does not exist (run python -m fairseq_ext.corpus OUT first)",
              file=sys.stderr)
        return 2
    for flag in ("--save-dir", "--log-format", "--seed"):
        if _has(train_args, flag):
            print(f"error: {flag} is set by this command (use --out / --seed); remove it from the fairseq-train "
                  f"arguments", file=sys.stderr)
            return 2
    try:
        optimizer, hparams = optimizer_hparams(train_args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    defaults = [("-s", args.source_lang), ("-t", args.target_lang), ("--task", "translation"),
                ("--required-batch-size-multiple", "1")]
    full = list(train_args) + ["--seed", str(args.seed)]
    for flag, value in defaults:
        long = {"-s": "--source-lang", "-t": "--target-lang"}.get(flag)
        if not _has(full, flag) and not (long and _has(full, long)):
            full += [flag, value]
    if not _has(full, "--eval-bleu"):
        full += ["--eval-bleu", "--eval-bleu-args", args.eval_bleu_args, "--eval-bleu-remove-bpe", "sentencepiece",
                 "--best-checkpoint-metric", "bleu", "--maximize-best-checkpoint-metric"]
    if not _has(full, "--no-epoch-checkpoints"):
        full.append("--no-epoch-checkpoints")
    if not _has(full, "--cpu") and not _has(full, "--distributed-world-size"):
        import torch

        if not torch.cuda.is_available():
            full.append("--cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    trace = _value(full, "--fngd-trace")
    if trace is not None and not Path(trace).is_absolute():  # a relative trace file lives in the run directory
        full = [a for a in full if not a.startswith("--fngd-trace=")]
        if "--fngd-trace" in full:
            i = full.index("--fngd-trace")
            del full[i:i + 2]
        full += ["--fngd-trace", str(args.out / trace)]
    start = _checkpoint_epoch(args.out / "checkpoints" / "checkpoint_last.pt")
    config = run_config(args.out, {"data": args.data, "train_args": full, "beam": args.beam, "seed": args.seed})
    device = "cpu" if "--cpu" in full else "cuda"
    record = RunRecord(args.out / "record.json").start(
        run=args.run_name or args.out.name, task=args.task_name, kind="fairseq",
        optimizer=args.optimizer_label or optimizer, hparams=hparams,
        seed=args.seed, config=config, metric="bleu", mode="max", device=device, resumed_from_epoch=start)
    try:
        train(args.data, args.out, full, record, start)
        extra = args.generate_args.split() + (["--cpu"] if "--cpu" in full else [])
        final = generate(args.data, args.out, args.source_lang, args.target_lang, args.beam, extra)
        epochs = record.data["epochs"]
        best = max((e["val_metric"] for e in epochs if e["val_metric"] is not None), default=None)
        record.finish(val_metric=best, val_loss=epochs[-1]["val_loss"] if epochs else None, epochs=len(epochs),
                      time=record.elapsed[0], **final)
        print(f"test BLEU {final['test_bleu']} on {final['test_sentences']} sentences ({final['sacrebleu']})",
              flush=True)
        print(f"record: {args.out / 'record.json'}", flush=True)
        return 0
    except BaseException:
        record.fail(traceback.format_exc())
        raise


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
