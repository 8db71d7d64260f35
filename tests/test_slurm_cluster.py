"""submitit against the real local SLURM of slurm/cluster.sh: GPUs, cancel, preemption + requeue.

Skipped where the cluster cannot start (not root, no apt-get, no package mirror).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
from slurm_cluster import wait_state

submitit = pytest.importorskip("submitit")

# The jobs' python cannot import this test module: ship its functions and classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _executor(folder: Path, cluster, **params):
    executor = submitit.AutoExecutor(folder=folder)
    assert executor.cluster == "slurm"
    # timeout_min well above 10: submitit then reads a USR2 as preemption, not as a time-out
    executor.update_parameters(slurm_partition=cluster.partition, timeout_min=30, cpus_per_task=1, **params)
    return executor


def _wait_done(job, timeout: float) -> None:
    """job.done() with a deadline, asking sacct each time (job.wait() has no timeout)."""
    deadline = time.monotonic() + timeout
    while not job.done(force_check=True):
        if time.monotonic() > deadline:
            job.cancel(check=False)
            pytest.fail(f"job {job.job_id} not done after {timeout:.0f} s (state {job.state})")
        time.sleep(0.5)


def _job_env() -> dict:
    return {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SLURM_JOB_PARTITION")}


def test_gpu_job_returns_result(slurm_cluster, tmp_path):
    assert slurm_cluster.gpus >= 1
    job = _executor(tmp_path, slurm_cluster, slurm_gpus_per_node=1).submit(_job_env)
    _wait_done(job, 60)
    env = job.result()
    assert env["SLURM_JOB_ID"] == job.job_id
    assert env["SLURM_JOB_PARTITION"] == slurm_cluster.partition
    assert env["CUDA_VISIBLE_DEVICES"] in [str(i) for i in range(slurm_cluster.gpus)]


def test_cancel_is_seen_by_submitit(slurm_cluster, tmp_path):
    job = _executor(tmp_path, slurm_cluster).submit(time.sleep, 300)
    wait_state(job.job_id, {"RUNNING"}, timeout=30)
    job.cancel()
    _wait_done(job, 60)  # only accounting (sacct) can tell submitit that the job is over
    assert job.state.startswith("CANCELLED")
    job._results_timeout_s = 1  # else result() waits 15 s for a result file (slow NFS) that never comes
    with pytest.raises(submitit.core.utils.UncompletedJobError):
        job.result()


class Summer(submitit.helpers.Checkpointable):
    """Sums 0..steps-1, one number per step; the progress lives in a file, so a requeued run
    continues where the last one stopped. Each run appends "<first step> <start time>" to runs.txt."""

    def __init__(self, workdir: str, steps: int, step_s: float) -> None:
        self.workdir, self.steps, self.step_s = Path(workdir), steps, step_s

    def __call__(self) -> int:
        state = self.workdir / "state.json"
        i, total = json.loads(state.read_text()) if state.exists() else (0, 0)
        with open(self.workdir / "runs.txt", "a") as f:
            f.write(f"{i} {time.time()}\n")
        while i < self.steps:
            time.sleep(self.step_s)
            i, total = i + 1, total + i
            (self.workdir / "state.tmp").write_text(json.dumps([i, total]))
            os.replace(self.workdir / "state.tmp", state)  # atomic: a signal never sees half a file
        return total


def test_preempted_checkpointable_job_is_requeued_and_resumes(slurm_cluster, tmp_path):
    steps = 20
    work = tmp_path / "work"
    work.mkdir()
    job = _executor(tmp_path / "logs", slurm_cluster).submit(Summer(str(work), steps, 0.5))
    state = work / "state.json"
    deadline = time.monotonic() + 60
    while not (state.exists() and json.loads(state.read_text())[0] >= 3):
        assert time.monotonic() < deadline, f"job {job.job_id} made no progress (state {job.state})"
        time.sleep(0.2)
    interrupted = time.time()
    job._interrupt()  # what SLURM does on preemption: SIGTERM, then USR2 -> checkpoint + scontrol requeue
    _wait_done(job, 120)
    assert job.result() == sum(range(steps))  # the same as an uninterrupted run
    runs = [line.split() for line in (work / "runs.txt").read_text().splitlines()]
    assert len(runs) == 2, runs  # it was requeued once
    assert runs[0][0] == "0" and 3 <= int(runs[1][0]) < steps  # and the 2nd run resumed mid-way
    print(f"requeue round trip (interrupt -> running again): {float(runs[1][1]) - interrupted:.1f} s")
