import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from run_target import Target, target_from_env  # noqa: E402
from slurm_cluster import slurm_cluster_fixture  # noqa: E402,F401  (the session fixture `slurm_cluster`)


def pytest_configure(config):
    config._fngd_target = target_from_env()


def pytest_report_header(config):
    t = config._fngd_target
    return f"fngd target: device {t.device}, autocast {t.autocast or 'off'} (FNGD_TEST_DEVICE, FNGD_TEST_AUTOCAST)"


@pytest.fixture
def target(request) -> Target:
    return request.config._fngd_target


@pytest.fixture
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The offline German->English corpus (fairseq_ext.corpus), built once per test session."""
    pytest.importorskip("fairseq")
    out = tmp_path_factory.mktemp("corpus")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-m", "fairseq_ext.corpus", str(out), "--packages", "pretix"],
                         capture_output=True, text=True, env=env, cwd="/", timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return out


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """scikit-learn's real digits as a 16x16 image folder (python -m timm_ext.digits), once per session."""
    pytest.importorskip("timm")
    out = tmp_path_factory.mktemp("digits") / "digits"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "timm_ext.digits", str(out), "--size", "16"], check=True, env=env,
                   capture_output=True)
    return out
