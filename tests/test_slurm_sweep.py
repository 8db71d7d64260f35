"""A sweep on the real local SLURM of slurm/cluster.sh through fngd_slurm's submitit executor:
job arrays with fake GPU gres, a cancelled run, a preempted run that requeues and resumes to the
same numbers as an uninterrupted one, and a second call that submits only what is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from slurm_cluster import job_state, wait_ended

submitit = pytest.importorskip("submitit")
pytest.importorskip("timm")

ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def cli(*args: str, cwd: Path, timeout: int = 600) -> str:
    res = subprocess.run([sys.executable, "-m", "fngd_slurm", *args], capture_output=True, text=True, cwd=cwd,
                         env={**ENV, "SLURM_CONF": os.environ.get("SLURM_CONF", "")}, timeout=timeout)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return res.stdout


def sweep_file(tmp_path: Path, digits: Path, out: str, executor: str, partition: str, optimizers: str) -> Path:
    path = tmp_path / f"{out}.toml"
    path.write_text(textwrap.dedent(f"""
        name = "grid"
        out = "{tmp_path / out}"
        seeds = [0]
        [executor]
        kind = "{executor}"
        max_parallel = 3
        threads = 1
        [resources]
        partition = "{partition}"
        gpus = 1
        cpus = 1
        mem_gb = 1
        time_min = 30
        [tasks.digits]
        kind = "timm"
        data = "{digits}"
        epochs = 6
        args = {{ model = "cifar_resnet18_w16", img_size = 16, batch_size = 128 }}
        """) + textwrap.dedent(optimizers))
    return path


def record(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "record.json").read_text())
    except (OSError, ValueError):
        return None


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")



def test_sweep_on_slurm_cancel_preempt_requeue_and_resubmit(slurm_cluster, tmp_path, digits):
    fngd = "[tasks.digits.optimizers.fngd]\nlr = 0.1\n"
    sgd = "[tasks.digits.optimizers.sgd]\nlr = [0.1, 0.05]\n"
    # the reference: the FNGD run uninterrupted, on this machine (same run id, other results folder)
    ref = sweep_file(tmp_path, digits, "ref", "local", slurm_cluster.partition, fngd)
    cli(str(ref), cwd=tmp_path)
    (ref_dir,) = (tmp_path / "ref" / "grid" / "runs").iterdir()
    expected = record(ref_dir)
    assert expected["status"] == "done"

    path = sweep_file(tmp_path, digits, "slurm", "slurm", slurm_cluster.partition, fngd + sgd)
    plan = cli(str(path), "--dry-run", cwd=tmp_path)
    assert "3 to launch on slurm" in plan and plan.count("1 GPU, 1 CPU, 1 GB, 30 min, partition") == 3
    out = cli(str(path), cwd=tmp_path)
    assert "submitted 3 runs as SLURM job array" in out
    runs = tmp_path / "slurm" / "grid" / "runs"
    subs = {d.name: json.loads((d / "submission.json").read_text()) for d in runs.iterdir()}
    assert len(subs) == 3 and len({s["job_id"].split("_")[0] for s in subs.values()}) == 1  # one array
    fngd_id = ref_dir.name
    assert fngd_id in subs
    cancelled = sorted(k for k in subs if "-sgd-lr0.05-" in k)[0]
    subprocess.run(["scancel", subs[cancelled]["job_id"]], check=True)
    # CANCELLED if it had started; no record at all if it was still pending in the array
    cancelled_state = wait_ended(subs[cancelled]["job_id"], timeout=60)
    assert cancelled_state in ("CANCELLED", ""), cancelled_state

    # preempt the FNGD run once it has finished an epoch: submitit requeues it, it resumes
    job = submitit.SlurmJob(folder=subs[fngd_id]["folder"], job_id=subs[fngd_id]["job_id"])
    wait_for(lambda: (r := record(runs / fngd_id)) and len(r["epochs"]) >= 1 and r["status"] == "running", 180,
             "the FNGD run's first epoch")
    assert (runs / fngd_id / "record.json").exists()
    job._interrupt()
    wait_for(lambda: (r := record(runs / fngd_id)) and r["status"] == "done", 300, "the requeued FNGD run to finish")
    got = record(runs / fngd_id)
    assert len(got["attempts"]) == 2 and got["attempts"][1]["resumed_from_epoch"] >= 1
    assert got["attempts"][0]["slurm_job_id"] == got["attempts"][1]["slurm_job_id"]  # requeued, same job
    keys = ("epoch", "step", "train_loss", "val_loss", "val_metric", "phase")
    assert [{k: e[k] for k in keys} for e in got["epochs"]] == [{k: e[k] for k in keys} for e in expected["epochs"]]
    assert got["env"]["host"] and len(list((runs / fngd_id / "logs").glob("attempt-*.log"))) == 2

    other = next(k for k in subs if k not in (fngd_id, cancelled))
    wait_for(lambda: (r := record(runs / other)) and r["status"] == "done", 300, "the other SGD run")
    status = cli(str(path), "--status", cwd=tmp_path)
    assert "3 runs: 2 done, 1 failed" in status or "3 runs: 2 done, 1 not started" in status, status

    # a second call submits only the cancelled run, and it completes
    again = cli(str(path), "--wait", cwd=tmp_path, timeout=600)
    assert "2 done or in flight, 1 to launch" in again and "submitted 1 runs" in again
    assert "3 runs: 3 done" in again
    assert json.loads((runs / cancelled / "submission.json").read_text())["job_id"] != subs[cancelled]["job_id"]
    assert job_state(subs[cancelled]["job_id"]) == cancelled_state
