"""Read training results into one tidy DataFrame: one row per (run, epoch).

Inputs (files, or directories searched recursively):
  * ``record.json``: run records (format ``fngd-run/1``, see ``fngd_records.py``). Runs
    still going or killed (status running/failed) contribute their complete epochs.
  * ``summary.csv``: a plain timm ``train.py`` output directory (columns epoch, train_loss,
    eval_loss, eval_top1, ...; timm counts epochs from 0, here they count from 1 like records).
    Optimizer, seed, lr, ... come from ``args.yaml`` beside it when present. No times are
    logged there: time/wall/epoch_time are NaN.
  * any other file (``*.log`` when searching directories): a fairseq log written with
    ``--log-format json`` (``--log-file``, or its stdout). The end-of-epoch lines are the JSON
    dicts of fairseq's JsonProgressBar.print: ``{"epoch": 1, "train_loss": "10.5", ...,
    "train_train_wall": "41", "train_wall": "46"}`` (the epoch's training seconds, then the
    wall clock since start) and ``{"epoch": 1, "valid_loss": "9.8", "valid_bleu": "0", ...}``;
    values are strings, a line may repeat. The metric is the validation BLEU when logged (max),
    else the validation loss (min); optimizer, its options, seed and task come from the config
    dump fairseq logs first.

Host logs inside a directory that holds a ``record.json`` are not read (the record covers them).
A file that cannot be read as any of these is skipped with a warning naming it; ``load``
returns the skipped files with the reason. Nothing usable at all raises ``NoRunsError``.

Columns: run, task, kind, optimizer, config (short label of the hyper-parameters, e.g.
``lr=0.1,damping=1``), hp_<name> (one per hyper-parameter), seed, epoch, step, time
(cumulative training seconds), wall (cumulative seconds incl. validation), epoch_time,
train_loss, val_loss, val_metric, phase (FNGD: collect | reuse), status, metric, mode
(max | min), source (the file), final_<name> (the record's run-level ``final`` values).
"""

from __future__ import annotations

import ast
import math
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from fngd_records import RunRecord, fairseq_epoch_stats

EPOCH_FIELDS = ["epoch", "step", "time", "wall", "epoch_time", "train_loss", "val_loss", "val_metric", "phase"]
RUN_FIELDS = ["run", "task", "kind", "optimizer", "config", "seed", "status", "metric", "mode", "source"]
NUMERIC = ["seed", "epoch", "step", "time", "wall", "epoch_time", "train_loss", "val_loss", "val_metric"]


class NoRunsError(ValueError):
    """No usable run in the given paths."""


def load(paths: Iterable[str | Path]) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """(tidy DataFrame, [(skipped file, reason), ...]) of everything under ``paths``."""
    paths = [Path(p) for p in paths]
    frames, skipped = [], []
    for path in _find(paths, skipped):
        try:
            frame = _read(path)
        except (ValueError, OSError, KeyError, TypeError) as e:
            reason = str(e) if str(path) in str(e) else f"{path}: {e}"
            skipped.append((str(path), reason))
            warnings.warn(f"skipped {reason}", stacklevel=2)
            continue
        if frame.empty:
            skipped.append((str(path), f"{path}: no complete epoch yet"))
            warnings.warn(f"skipped {path}: no complete epoch yet", stacklevel=2)
        else:
            frames.append(frame)
    if not frames:
        searched = ", ".join(str(p) for p in paths) or "(no paths given)"
        detail = "".join(f"\n  skipped {reason}" for _, reason in skipped)
        raise NoRunsError(f"no runs found in {searched} (looked for record.json, timm summary.csv and fairseq "
                          f"json logs *.log){detail}")
    df = pd.concat(frames, ignore_index=True)
    for col in NUMERIC:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    # one comparison per (task, metric): a task logged with different metrics is split
    metrics = df.groupby("task")["metric"].nunique()
    for task in metrics[metrics > 1].index:
        rows = df["task"] == task
        df.loc[rows, "task"] = task + ":" + df.loc[rows, "metric"]
        warnings.warn(f"task {task!r} mixes metrics; split into {sorted(df.loc[rows, 'task'].unique())}",
                      stacklevel=2)
    hp = sorted(c for c in df.columns if c.startswith("hp_"))
    final = sorted(c for c in df.columns if c.startswith("final_"))
    order = RUN_FIELDS[:5] + hp + RUN_FIELDS[5:6] + EPOCH_FIELDS + RUN_FIELDS[6:] + final
    return df[order].sort_values(["task", "optimizer", "config", "seed", "run", "epoch"], ignore_index=True), skipped


def config_label(hparams: dict) -> str:
    """``lr=0.1,damping=1`` (record order, None values left out)."""
    return ",".join(f"{k}={_short(v)}" for k, v in hparams.items() if v is not None) or "default"


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "/".join(_short(x) for x in v)
    return str(v)


def _find(paths: list[Path], skipped: list) -> list[Path]:
    found: dict[Path, None] = {}
    for p in paths:
        if p.is_dir():
            records = sorted(p.rglob("record.json"))
            covered = {r.parent for r in records}
            logs = sorted([*p.rglob("summary.csv"), *p.rglob("*.log")])
            found.update(dict.fromkeys(records))
            found.update(dict.fromkeys(f for f in logs if not covered & set(f.parents)))
        elif p.is_file():
            found[p] = None
        else:
            skipped.append((str(p), f"{p}: no such file or directory"))
            warnings.warn(f"skipped {p}: no such file or directory", stacklevel=3)
    return list(dict.fromkeys(f.resolve() for f in found))


def _read(path: Path) -> pd.DataFrame:
    if path.suffix == ".json":
        return _from_record(path)
    if path.suffix == ".csv":
        return _from_timm_summary(path)
    return _from_fairseq_log(path)


def _frame(run: dict, hparams: dict, epochs: list[dict], final: dict | None = None) -> pd.DataFrame:
    run = {**run, "config": config_label(hparams), **{f"hp_{k}": _short(v) if isinstance(v, (list, tuple)) else v
                                                      for k, v in hparams.items()}}
    run.update({f"final_{k}": v for k, v in (final or {}).items() if isinstance(v, (int, float, str, type(None)))})
    by_epoch = {int(e["epoch"]): e for e in epochs}  # a repeated epoch (resume): the last one counts
    rows = [{**run, **{k: by_epoch[n].get(k) for k in EPOCH_FIELDS}} for n in sorted(by_epoch)]
    return pd.DataFrame(rows, columns=[*run, *EPOCH_FIELDS])


def _from_record(path: Path) -> pd.DataFrame:
    r = RunRecord.load(path)
    metric = r.get("metric") or {}
    mode = metric.get("mode", "max")
    if mode not in ("max", "min") or not isinstance(r["epochs"], list):
        raise ValueError(f"{path}: metric mode {mode!r} / epochs {type(r['epochs']).__name__} not understood")
    if not all(isinstance(e, dict) and "epoch" in e for e in r["epochs"]):
        raise ValueError(f"{path}: an epoch entry has no 'epoch'")
    variant = (r.get("config") or {}).get("variant")  # a sweep's NAME:VARIANT (e.g. fngd:adamw) is its own row
    run = {"run": r["run"], "task": r["task"], "kind": r.get("kind"),
           "optimizer": str(variant or r["optimizer"]).lower(),
           "seed": r.get("seed"), "status": r["status"], "metric": metric.get("name", "val_metric"), "mode": mode,
           "source": str(path)}
    return _frame(run, r.get("hparams") or {}, r["epochs"], r.get("final"))


def _scalar(text: str):
    text = text.strip().strip("'\"")
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None if text in ("null", "~", "") else text


def _from_timm_summary(path: Path) -> pd.DataFrame:
    s = pd.read_csv(path)
    missing = {"epoch", "eval_top1"} - set(s.columns)
    if missing:
        raise ValueError(f"{path}: not a timm summary.csv (no column {', '.join(sorted(missing))})")
    args = {}
    if (path.parent / "args.yaml").exists():  # top-level scalars of timm's yaml.safe_dump(vars(args))
        for m in re.finditer(r"^(\w+):[ \t]*(\S.*)?$", (path.parent / "args.yaml").read_text(), re.M):
            args[m[1]] = _scalar(m[2] or "")
    hparams = {k: args[k] for k in ("lr", "momentum", "weight_decay") if args.get(k) is not None}  # as timm_ext
    run = {"run": path.parent.name, "task": args.get("dataset") or "timm", "kind": "timm",
           "optimizer": str(args.get("opt") or "unknown").lower(), "seed": args.get("seed"), "status": "unknown",
           "metric": "top1", "mode": "max", "source": str(path)}
    epochs = [{"epoch": int(row["epoch"]) + 1, "train_loss": row.get("train_loss"), "val_loss": row.get("eval_loss"),
               "val_metric": row["eval_top1"]} for row in s.to_dict("records")]
    return _frame(run, hparams, epochs)


def _from_fairseq_log(path: Path) -> pd.DataFrame:
    text = path.read_text(errors="replace")
    train, valid, subset = {}, {}, None
    for line in text.splitlines():
        stats = fairseq_epoch_stats(line)
        if stats is None:
            continue
        if "train_loss" in stats:
            train[int(stats["epoch"])] = stats
            continue
        prefix = next((k[:-5] for k in stats if k.endswith("_loss") and not k.endswith("nll_loss")), None)
        subset = subset or prefix
        if prefix is not None and prefix == subset:
            valid[int(stats["epoch"])] = stats
    if not train:  # the train line closes an epoch (validation is logged before it)
        raise ValueError(f"{path}: no fairseq JSON epoch stats (expected a --log-format json log)")
    bleu = any(f"{subset}_bleu" in v for v in valid.values())
    opt = re.search(r"'optimizer': \{'_name': '(\w+)'(.*?)\}", text)
    hparams = {}
    if opt:  # the optimizer's dataclass options from the config dump
        for m in re.finditer(r"'(\w+)': ('[^']*'|\[[^\]]*\]|[^,]+)", opt[2]):
            value = _scalar(m[2])
            hparams[m[1]] = value[0] if isinstance(value, list) and len(value) == 1 else value
        hparams = {"lr": hparams.pop("lr", None), **hparams}
    seed = re.search(r"'seed': (\d+)", text)
    task = re.search(r"'task': \{'_name': '(\w+)'", text)
    run = {"run": f"{path.parent.name}/{path.name}", "task": task[1] if task else "fairseq", "kind": "fairseq",
           "optimizer": opt[1].lower() if opt else "unknown", "seed": int(seed[1]) if seed else None,
           "status": "unknown", "metric": "bleu" if bleu else "loss", "mode": "max" if bleu else "min",
           "source": str(path)}
    epochs, time = [], 0.0
    for n in sorted(train):
        t, v = train[n], valid.get(n, {})
        epoch_time = _float(t.get("train_train_wall"))
        time += epoch_time
        epochs.append({"epoch": n, "step": _float(t.get("train_num_updates")),
                       "time": time, "wall": _float(t.get("train_wall")), "epoch_time": epoch_time,
                       "train_loss": _float(t.get("train_loss")), "val_loss": _float(v.get(f"{subset}_loss")),
                       "val_metric": _float(v.get(f"{subset}_bleu" if bleu else f"{subset}_loss"))})
    return _frame(run, hparams, epochs)


def _float(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan
