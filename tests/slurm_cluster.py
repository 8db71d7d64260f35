"""A real one-node SLURM cluster for tests (slurm/cluster.sh), as a session fixture.

Use it from a test module or conftest.py:

    from slurm_cluster import slurm_cluster_fixture  # noqa: F401  (registers `slurm_cluster`)

    def test_x(slurm_cluster):
        executor.update_parameters(slurm_partition=slurm_cluster.partition, ...)

The fixture starts the cluster once per session (skipping when cluster.sh says this machine
cannot run it, exit code 2), points SLURM_CONF at it for the session and stops it at the end;
FNGD_SLURM_KEEP=1 leaves it running (a later session then starts in about a second).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "slurm" / "cluster.sh"
START_TIMEOUT_S = 900  # a cold start installs Debian packages


@dataclass(frozen=True)
class SlurmCluster:
    partition: str  # the (default) partition, "debug"
    gpus: int  # fake GPUs on the node (gres gpu), each job sees CUDA_VISIBLE_DEVICES
    conf: Path  # its slurm.conf; SLURM_CONF points here while the fixture is active
    root: Path  # state, logs (root / "log"), pid files


def _root() -> Path:
    return Path(os.environ.get("FNGD_SLURM_ROOT", "/tmp/fngd-slurm"))


@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture() -> Iterator[SlurmCluster]:
    try:
        proc = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=START_TIMEOUT_S)
    except OSError as e:  # e.g. no bash
        pytest.skip(f"slurm/cluster.sh cannot run: {e}")
    if proc.returncode == 2:
        lines = proc.stderr.strip().splitlines() or ["(no reason given)"]
        pytest.skip(lines[-1])
    if proc.returncode != 0:
        pytest.fail(f"slurm/cluster.sh start failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", pytrace=False)
    root = _root()
    conf = root / "etc" / "slurm.conf"
    partition = proc.stdout.strip().splitlines()[-1]
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)  # sbatch/sacct here and in jobs (sbatch exports the env)
    try:
        gres = _run(["sinfo", "-h", "-p", partition, "-o", "%G"])  # e.g. "gpu:fake:2"
        gpus = int(gres.split(":")[-1]) if gres.startswith("gpu") else 0
        yield SlurmCluster(partition=partition, gpus=gpus, conf=conf, root=root)
    finally:
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
        if os.environ.get("FNGD_SLURM_KEEP") != "1":
            subprocess.run([str(SCRIPT), "stop"], capture_output=True, timeout=120)


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def job_state(job_id: str) -> str:
    """The job's state, e.g. PENDING, RUNNING, COMPLETED, CANCELLED ("" while unknown).

    The controller answers first: ``squeue --states all --array`` lists a job, or one task of an
    array (also a pending task still folded into the array's record), in every state for
    MinJobAge (300 s in cluster.sh) after it ended. Accounting (sacct) keeps it afterwards, but
    lags the controller, and a task cancelled while pending is recorded under the array's range
    ("12_[1-2]"), not under its own id: so sacct is only asked when the controller no longer knows.
    An array task cancelled before it started is in neither (measured, SLURM 22.05): "".
    """
    state = _run(["squeue", "-h", "--array", "--states", "all", "-j", str(job_id), "-o", "%T"])
    if not state:
        state = _run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State"])
    return state.split()[0] if state else ""  # "CANCELLED by 0" -> "CANCELLED"


def wait_state(job_id: str, states: Iterable[str], timeout: float = 60.0, poll: float = 0.5) -> str:
    """Poll until the job is in one of `states`; returns that state, raises TimeoutError."""
    wanted = set(states)
    deadline = time.monotonic() + timeout
    while True:
        state = job_state(job_id)
        if state in wanted:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} is {state or 'unknown'} after {timeout:.0f} s, not {sorted(wanted)}")
        time.sleep(poll)


ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}


def wait_ended(job_id: str, timeout: float = 60.0, poll: float = 0.5) -> str:
    """Poll until the job is no longer active; returns its final state, "" when SLURM kept no record
    of it (an array task cancelled while still pending never gets one). scancel is synchronous with
    the controller, so the controller's answer right after it is already final for a pending task."""
    deadline = time.monotonic() + timeout
    while True:
        state = job_state(job_id)
        if state not in ACTIVE:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} is still {state} after {timeout:.0f} s")
        time.sleep(poll)
