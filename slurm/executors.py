"""Where runs execute: on this machine (a bounded pool of processes) or on SLURM through submitit.

Both give the same layout, per run ``<sweep root>/runs/<run id>/``:

    run.json              the run as planned (command, resources, configuration)
    submission.json       how and when it was last launched (executor, job id or pid)
    record.json           written by the run itself (fngd_records.py)
    logs/attempt-N.log    stdout + stderr of each attempt
    checkpoint.pt | checkpoints/   the host's own checkpoints, from which a re-run resumes

A run is *done* when its record says so; anything else is launched again by the next call, and
resumes from its checkpoint. On SLURM a run still queued or running is left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fngd_records import write_json_atomic

from .sweep import Resources, Run, SweepError

ACTIVE_SLURM_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                       "RESIZING", "SUSPENDED", "PREEMPTED", "SIGNALING", "STAGE_OUT", "UNKNOWN"}


# ----------------------------------------------------------------------------------------- run state
def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def record_of(run: Run) -> dict[str, Any] | None:
    return read_json(run.dir / "record.json")


def prepare_dir(run: Run) -> None:
    (run.dir / "logs").mkdir(parents=True, exist_ok=True)
    write_json_atomic(run.dir / "run.json", run.to_json())


def next_log(run_dir: Path) -> Path:
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    n = 1 + sum(1 for _ in logs.glob("attempt-*.log"))
    return logs / f"attempt-{n}.log"


# config keys a continued run may differ in from the shorter run it continues (data: as written;
# compared resolved)
_EXTENSION_FREE = ("sweep", "epochs", "data")


def extension_source(run: Run, root: Path) -> Path | None:
    """The finished run under the sweep directory ``root`` that ``run`` can continue (a task's
    ``extends``): the same configuration (task, model, optimizer, hyperparameters, seed, the same
    data) at fewer epochs, done, with its last checkpoint. The longest such run, or None."""
    want = {k: v for k, v in run.config.items() if k not in _EXTENSION_FREE}
    data = Path(run.config["data"]).resolve()
    found: tuple[int, Path] | None = None
    for spec in sorted((root / "runs").glob("*/run.json")):
        src = spec.parent
        cfg = (read_json(spec) or {}).get("config", {})
        epochs = cfg.get("epochs")
        if ({k: v for k, v in cfg.items() if k not in _EXTENSION_FREE} != want or not isinstance(epochs, int)
                or epochs >= run.config["epochs"] or Path(str(cfg.get("data"))).resolve() != data
                or (read_json(src / "record.json") or {}).get("status") != "done"
                or not (src / "checkpoints" / "checkpoint_last.pt").is_file()):
            continue
        if found is None or epochs > found[0]:
            found = (epochs, src)
    return None if found is None else found[1]


def continue_from(run: Run, src: Path) -> int:
    """Start ``run`` from the finished shorter run ``src``: its checkpoints, log and record (its
    epochs, and an attempt naming ``src``), so the run's first launch resumes after ``src``'s last
    epoch, as a run resumes after a preemption. ``src`` is left as it is. Returns the epochs it holds."""
    if (run.dir / "record.json").exists():
        raise SweepError(f"{run.dir} already has a record; it resumes from its own checkpoint")
    run.dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / "checkpoints", run.dir / "checkpoints", dirs_exist_ok=True)
    if (src / "train.log").exists():
        shutil.copy2(src / "train.log", run.dir / "train.log")
    rec = read_json(src / "record.json") or {}
    rec["status"] = "stopped"  # not done: the runner's first attempt here continues it
    rec.setdefault("attempts", []).append({"start": time.strftime("%Y-%m-%dT%H:%M:%S"), "extended_from": src.name,
                                           "from_dir": str(src), "epochs": len(rec.get("epochs", []))})
    write_json_atomic(run.dir / "record.json", rec)
    return len(rec.get("epochs", []))


def slurm_state(sub: dict[str, Any]) -> str | None:
    """SLURM's state of a recorded submission (via submitit / sacct), None when unknown."""
    if sub.get("executor") != "slurm":
        return None
    import submitit

    try:
        return submitit.SlurmJob(folder=sub["folder"], job_id=sub["job_id"]).state
    except Exception:  # noqa: BLE001  (sacct/squeue unavailable: state unknown)
        return None


def status_of(run: Run) -> tuple[str, str]:
    """(state, detail): done | failed | running | queued | not started, and a short description."""
    rec = record_of(run)
    sub = read_json(run.dir / "submission.json") or {}
    epochs = len(rec["epochs"]) if rec else 0
    last = rec["epochs"][-1] if rec and rec["epochs"] else {}
    metric = f"{rec['metric']['name']} {last['val_metric']:.2f}" if last.get("val_metric") is not None else ""
    detail = f"epoch {epochs}/{run.config['epochs']}" + (f", {metric}" if metric else "")
    if rec and rec["status"] == "done":
        return "done", detail
    state = slurm_state(sub)
    if state in ACTIVE_SLURM_STATES:
        return ("running" if state == "RUNNING" else "queued"), f"{detail}, SLURM {sub['job_id']} {state}"
    if sub.get("executor") == "local" and _alive(sub.get("pid"), sub.get("host")):
        return "running", detail
    if rec and rec["status"] == "failed":
        return "failed", detail + f", see {run.dir / 'logs'}"
    if rec:
        return "failed", detail + " (stopped before its end: crashed, killed or preempted)"
    if sub:
        return "failed", f"launched, never started ({sub.get('executor')} {sub.get('job_id') or sub.get('pid')})"
    return "not started", ""


def _alive(pid: Any, host: Any) -> bool:
    if not pid or host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, PermissionError, ValueError):
        return False
    return True


# ----------------------------------------------------------------------------------------- local
def run_local(runs: list[Run], max_parallel: int, log: Callable[[str], None] = print,
              heartbeat_s: float = 30.0) -> dict[str, int]:
    """Run ``runs`` as child processes, at most ``max_parallel`` at once; returns exit codes.

    Prints a line when a run starts and ends, and every ``heartbeat_s`` the epoch each running
    run has reached. Ctrl-C stops the children (their checkpoints stay: run again to resume)."""
    pending = list(runs)
    active: dict[str, tuple[Run, subprocess.Popen, float, Any]] = {}
    codes: dict[str, int] = {}
    total = len(runs)
    t0 = time.perf_counter()
    last_beat = t0

    def stamp() -> str:
        s = int(time.perf_counter() - t0)
        return f"[{s // 60:02d}:{s % 60:02d}]"

    try:
        while pending or active:
            while pending and len(active) < max_parallel:
                run = pending.pop(0)
                prepare_dir(run)
                logf = open(next_log(run.dir), "w")
                env = {**os.environ, "PYTHONUNBUFFERED": "1", **run.env}
                proc = subprocess.Popen(run.command, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
                write_json_atomic(run.dir / "submission.json", {"executor": "local", "pid": proc.pid,
                                                                "host": socket.gethostname(), "time": time.time()})
                active[run.id] = (run, proc, time.perf_counter(), logf)
                log(f"{stamp()} start {run.id} ({len(codes) + len(active)}/{total})")
            time.sleep(0.2)
            for rid, (run, proc, started, logf) in list(active.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                logf.close()
                del active[rid]
                codes[rid] = rc
                state, detail = status_of(run)
                took = time.perf_counter() - started
                word = "done" if rc == 0 and state == "done" else f"FAILED (exit {rc}; log {logf.name})"
                log(f"{stamp()} {word} {rid} in {took:.0f}s: {detail} [{len(codes)}/{total} finished]")
            if active and time.perf_counter() - last_beat >= heartbeat_s:
                last_beat = time.perf_counter()
                log(f"{stamp()} running: " + "; ".join(f"{r.id} {status_of(r)[1] or 'starting'}"
                                                      for r, *_ in active.values()))
    except KeyboardInterrupt:
        for _, proc, _, _ in active.values():
            os.killpg(proc.pid, signal.SIGTERM)
        for _, proc, _, logf in active.values():
            proc.wait()
            logf.close()
        log(f"{stamp()} interrupted: {len(active)} runs stopped; run the same command again to resume them")
        raise
    return codes


# ----------------------------------------------------------------------------------------- SLURM
class RunJob:
    """The callable a SLURM job runs: the run's command as a child process. Preemption or time
    limit: submitit calls ``checkpoint`` -> the child is stopped and the same job is requeued; the
    command resumes from the host's own checkpoint (every epoch)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self._proc: subprocess.Popen | None = None

    def __call__(self) -> dict[str, Any]:
        run_dir = Path(self.run_dir)
        spec = json.loads((run_dir / "run.json").read_text())
        with open(next_log(run_dir), "w") as logf:
            env = {**os.environ, "PYTHONUNBUFFERED": "1", **spec.get("env", {})}
            self._proc = subprocess.Popen(spec["command"], stdout=logf, stderr=subprocess.STDOUT, env=env)
            rc = self._proc.wait()
        if rc != 0:
            raise RuntimeError(f"run {spec['id']} exited with {rc}; log: {logf.name}")
        rec = read_json(run_dir / "record.json") or {}
        return {"run": spec["id"], "final": rec.get("final")}

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        if self._proc is not None:
            stop_child(self._proc.pid)
        return submitit.helpers.DelayedSubmission(RunJob(self.run_dir))

    def __getstate__(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir, "_proc": None}


def stop_child(pid: int, grace_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``. Runs inside submitit's signal handler while the main
    thread may sit in Popen.wait() holding its lock, so it only *looks* at the child's exit
    (waitid with WNOWAIT) and leaves reaping to Popen."""
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return
            time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, ChildProcessError):  # already gone, or already reaped
        return


def slurm_parameters(res: Resources, name: str, max_parallel: int) -> dict[str, Any]:
    params: dict[str, Any] = {"timeout_min": res.time_min, "cpus_per_task": res.cpus, "mem_gb": res.mem_gb,
                              "tasks_per_node": 1, "nodes": 1, "name": name,
                              "slurm_array_parallelism": max_parallel}
    if res.gpus:
        params["gpus_per_node"] = res.gpus
    if res.partition:
        params["slurm_partition"] = res.partition
    if res.extra:
        params["slurm_additional_parameters"] = dict(res.extra)
    return params


def check_slurm_resources(runs: list[Run], sweep_path: Path) -> None:
    """Refuse resources no node of the partition has (sinfo), before anything is submitted."""
    import shutil

    if shutil.which("sbatch") is None:
        raise SweepError(f"{sweep_path}: executor.kind: 'slurm' but sbatch is not on PATH here; "
                         f"use --executor local or run on a SLURM login node")
    seen: set[tuple] = set()
    for run in runs:
        res = run.resources
        key = (res.partition, res.gpus, res.cpus, res.mem_gb)
        if key in seen:
            continue
        seen.add(key)
        cmd = ["sinfo", "-h", "-o", "%P %c %m %G"] + (["-p", res.partition] if res.partition else [])
        out = subprocess.run(cmd, capture_output=True, text=True).stdout.split("\n")
        nodes = [ln.split() for ln in out if ln.strip()]
        where = f"tasks.{run.task}.resources"
        if not nodes:
            raise SweepError(f"{sweep_path}: {where}.partition: {res.partition!r} is not a partition here "
                             f"(sinfo lists: {_partitions()})")
        cpus = max(int(n[1].rstrip("+")) for n in nodes)
        mem = max(int(n[2].rstrip("+")) for n in nodes) / 1024
        gpus = max(_gres_gpus(n[3]) for n in nodes)
        for key_, want, have in (("cpus", res.cpus, cpus), ("mem_gb", res.mem_gb, mem), ("gpus", res.gpus, gpus)):
            if want > have:
                raise SweepError(f"{sweep_path}: {where}.{key_}: {want} per run, but the largest node of partition "
                                 f"{res.partition or '(default)'} has {have:g}")


def _partitions() -> str:
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True).stdout.split()
    return ", ".join(p.rstrip("*") for p in out) or "none"


def _gres_gpus(gres: str) -> int:
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu":
            try:
                total += int(parts[-1])
            except ValueError:
                total += 1
    return total


def submit_slurm(runs: list[Run], root: Path, sweep_name: str, max_parallel: int,
                 log: Callable[[str], None] = print) -> list[str]:
    """One job array per distinct resource request; returns the job ids."""
    import submitit

    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(sorted((k, json.dumps(v)) for k, v in vars(run.resources).items())), []).append(run)
    folder = root / "slurm" / "%j"
    ids = []
    for group in groups.values():
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        executor.update_parameters(**slurm_parameters(group[0].resources, f"fngd-{sweep_name}", max_parallel))
        for run in group:
            prepare_dir(run)
        with executor.batch():
            jobs = [executor.submit(RunJob(str(run.dir))) for run in group]
        for run, job in zip(group, jobs):
            write_json_atomic(run.dir / "submission.json", {"executor": "slurm", "job_id": job.job_id,
                                                            "folder": str(folder), "time": time.time()})
            ids.append(job.job_id)
        log(f"submitted {len(group)} runs as SLURM job array {jobs[0].job_id.split('_')[0]} "
            f"({group[0].resources.gpus} GPU, {group[0].resources.cpus} CPU, {group[0].resources.mem_gb:g} GB, "
            f"{group[0].resources.time_min} min each; at most {max_parallel} at once)")
    return ids

