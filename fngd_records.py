"""Run records (stdlib only: runners, sweeps and analysis share it without importing torch): one
self-describing JSON file per training run, written by the timm and fairseq runners (and therefore
by every sweep executor), read by ``analysis/``.

Format ``fngd-run/1`` (``record.json`` in the run's directory)::

    {
      "format": "fngd-run/1",
      "run": "digits-fngd-lr0.1-s0-1a2b3c",     # unique id, also the run directory's name
      "task": "digits", "kind": "timm",         # task name in the sweep; timm | fairseq
      "optimizer": "fngd", "hparams": {...},    # optimizer name and its options (lr, damping, ...)
      "seed": 0,
      "config": {...},                          # the full run configuration, as run
      "metric": {"name": "top1", "mode": "max"},# the validation metric and its direction
      "status": "running" | "done" | "failed",
      "env": {"python", "packages": {...}, "host", "device", "gpu", "cpu_count", "threads"},
      "attempts": [{"start", "host", "slurm_job_id", "resumed_from_epoch"}],
      "epochs": [                               # one entry per completed epoch, in order
        {"epoch": 1, "step": 23, "time": 12.3,  # cumulative optimisation seconds (train only)
         "wall": 14.0,                          # cumulative seconds incl. validation
         "epoch_time": 12.3, "train_loss": 2.1, "val_loss": 1.9, "val_metric": 41.0,
         "phase": "collect"}                    # FNGD phase of the epoch (null for others)
      ],
      "final": {...},                           # e.g. {"val_metric": 93.1, "test_bleu": 2.7}
      "error": "..."                            # last lines of the traceback when failed
    }

Times are work time: an attempt's seconds are added to the previous attempts' (restored from the
record on resume), so queueing and preemption do not count. Every write replaces the file
atomically (write to a temporary file, then ``os.replace``), so a reader never sees half a record,
and a killed run leaves its last complete epoch.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import socket
import sys
from pathlib import Path
from typing import Any

FORMAT = "fngd-run/1"
STATUSES = ("running", "done", "failed")
_PACKAGES = ("torch", "torchvision", "timm", "fairseq-fixed", "fairseq", "fngd-plugin", "submitit", "sacrebleu")


def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def environment(device: str = "cpu") -> dict[str, Any]:
    gpu = None
    threads = None
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        threads = torch.get_num_threads()
        if device.startswith("cuda") and torch.cuda.is_available():
            gpu = torch.cuda.get_device_name()
    return {"python": platform.python_version(), "packages": package_versions(), "host": socket.gethostname(),
            "platform": platform.platform(), "device": device, "gpu": gpu, "cpu_count": os.cpu_count(),
            "threads": threads}


def run_config(run_dir: str | os.PathLike, own: dict[str, Any]) -> dict[str, Any]:
    """The configuration to record: a sweep's (``run.json`` beside the record, written by
    fngd_slurm) with the runner's own arguments under "runner", else the runner's own."""
    spec = Path(run_dir) / "run.json"
    if spec.exists():
        return {**json.loads(spec.read_text()).get("config", {}), "runner": own}
    return own


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunRecord:
    """Writer of one run's ``record.json``. ``start`` opens (or resumes) it, ``epoch`` appends a
    completed epoch, ``finish``/``fail`` close it. Only one process (rank 0) should write."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.data: dict[str, Any] = {}

    # -- opening ---------------------------------------------------------------------------
    def start(self, *, run: str, task: str, kind: str, optimizer: str, hparams: dict, seed: int, config: dict,
              metric: str, mode: str = "max", device: str = "cpu", resumed_from_epoch: int = 0) -> RunRecord:
        """Open the record. ``resumed_from_epoch`` = the number of epochs the runner's own checkpoint
        holds: epochs recorded after it (done before a crash, lost with the checkpoint) are dropped,
        since the runner redoes them."""
        if mode not in ("max", "min"):
            raise ValueError(f"mode={mode!r}: allowed 'max' or 'min'")
        old = self.load(self.path) if self.path.exists() else None
        epochs = [e for e in (old or {}).get("epochs", []) if e["epoch"] <= resumed_from_epoch]
        attempts = (old or {}).get("attempts", [])
        attempts.append({"start": _now(), "host": socket.gethostname(),
                         "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                         "resumed_from_epoch": resumed_from_epoch})
        self.data = {"format": FORMAT, "run": run, "task": task, "kind": kind, "optimizer": optimizer,
                     "hparams": hparams, "seed": seed, "config": config, "metric": {"name": metric, "mode": mode},
                     "status": "running", "env": environment(device), "attempts": attempts, "epochs": epochs,
                     "final": {}}
        self._write()
        return self

    @property
    def elapsed(self) -> tuple[float, float]:
        """(time, wall) of the last recorded epoch: where a resumed attempt's clocks start."""
        if not self.data.get("epochs"):
            return 0.0, 0.0
        last = self.data["epochs"][-1]
        return float(last["time"]), float(last["wall"])

    # -- writing ---------------------------------------------------------------------------
    def epoch(self, *, epoch: int, step: int, time: float, wall: float, epoch_time: float,
              train_loss: float | None, val_metric: float | None, val_loss: float | None = None,
              phase: str | None = None, **extra: Any) -> None:
        row = {"epoch": int(epoch), "step": int(step), "time": float(time), "wall": float(wall),
               "epoch_time": float(epoch_time), "train_loss": _num(train_loss), "val_loss": _num(val_loss),
               "val_metric": _num(val_metric), "phase": phase, **extra}
        self.data["epochs"] = [e for e in self.data["epochs"] if e["epoch"] < row["epoch"]] + [row]
        self._write()

    def finish(self, **final: Any) -> None:
        self.data["final"].update(final)
        self.data["status"] = "done"
        self._write()

    def fail(self, error: str) -> None:
        self.data["status"] = "failed"
        self.data["error"] = error[-4000:]
        self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, self.data)

    # -- reading ---------------------------------------------------------------------------
    @staticmethod
    def load(path: str | os.PathLike) -> dict[str, Any]:
        """The record at ``path``; ValueError naming the file when it is not a fngd-run record."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable run record ({e})") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path}: format is {data.get('format') if isinstance(data, dict) else None!r}, "
                             f"expected {FORMAT!r}")
        missing = [k for k in ("run", "task", "optimizer", "epochs", "status") if k not in data]
        if missing:
            raise ValueError(f"{path}: missing keys {missing}")
        return data


def fairseq_epoch_stats(line: str) -> dict[str, Any] | None:
    """The statistics of an end-of-epoch line of a fairseq ``--log-format json`` log (training's or
    a validation subset's: fairseq prints each as one JSON object after its tags, keys prefixed with
    the subset, e.g. "train_loss", "valid_bleu"), else None. Per-update lines (train_inner) carry
    "update" and are not end-of-epoch lines; a cut-off last line (a killed run) is None."""
    start = line.find('{"')
    if start < 0:
        return None
    try:
        stats = json.loads(line[start:])
    except ValueError:
        return None
    if not isinstance(stats, dict) or "epoch" not in stats or "update" in stats:
        return None
    return stats


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if x == x and abs(x) != float("inf") else None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
