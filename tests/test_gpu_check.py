"""make gpu-check without a GPU (a clean exit that says so) and its report writer."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_target import target_from_env

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check as G  # noqa: E402


def test_without_cuda_it_exits_cleanly_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu.md"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no CUDA device" in res.stdout and not out.exists()


def test_make_target_takes_the_interpreter_it_is_given(tmp_path):
    """`make gpu-check PY=...` runs that interpreter on the script, with no venv step before it."""
    # --no-print-directory: under `make test` MAKEFLAGS carries -w, which adds "Entering directory" lines
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    res = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check", "PY=/opt/some/python3"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    assert [ln.strip() for ln in res.stdout.strip().splitlines()] == ["/opt/some/python3 benchmarks/gpu_check.py"]


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        G.main(["--only", "tests,nope"])
    with pytest.raises(SystemExit):
        G.main(["--budget", "3"])


def piece(name, code, timeout=60, needs=()):
    return G.Piece(name, name, ["-c", code], timeout, needs)


def test_pieces_pass_fail_time_out_and_skip(tmp_path):
    ok = G.run_piece(piece("ok", "print('3 passed in 0.1s')"), sys.executable, str(tmp_path), 100)
    assert (ok.status, ok.detail, ok.tail) == ("passed", "3 passed in 0.1s", "")
    bad = G.run_piece(piece("bad", "import sys; print('1 failed, 2 passed'); sys.exit(3)"), sys.executable,
                      str(tmp_path), 100)
    assert bad.status == "failed" and bad.detail == "1 failed, 2 passed" and "exit status 3" in bad.tail
    slow = G.run_piece(piece("slow", "import time; time.sleep(30)", timeout=1), sys.executable, str(tmp_path), 100)
    assert slow.status == "timeout" and slow.seconds < 20 and "killed after 1 s" in slow.tail
    marker = tmp_path / "grandchild-alive"
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            f"'import time; time.sleep(3); open(r\\'{marker}\\', \\'w\\')']); time.sleep(30)")
    orphan = G.run_piece(piece("orphan", code, timeout=1), sys.executable, str(tmp_path), 100)
    time.sleep(4)
    assert orphan.status == "timeout" and not marker.exists()  # the benchmark's own children end with it
    gone = G.run_piece(piece("gone", "pass", needs=("timm", "asdl", "no_such_module_xyz")), sys.executable,
                       str(tmp_path), 100)
    assert gone.status == "skipped" and "no_such_module_xyz" in gone.detail and "timm" not in gone.detail
    late = G.run_piece(piece("late", "pass"), sys.executable, str(tmp_path), G.MIN_PIECE - 1)
    assert late.status == "skipped" and "budget spent" in late.detail


def test_the_piece_runs_this_tree_not_an_installed_copy(tmp_path):
    code = "import fngd_plugin, os; print(os.path.dirname(os.path.dirname(fngd_plugin.__file__)))"
    res = G.run_piece(piece("where", code), sys.executable, str(tmp_path), 100)
    assert res.status == "passed" and Path(res.detail) == ROOT


GRAM_TABLE = """# Exact Gram routes, layer by layer

| layer | token | chunked | materialize | pixel | picked | fastest | picked / fastest |
|---|---|---|---|---|---|---|---|
| attn | 11.2 | 2.8 |  |  | chunked | chunked | 1.00x |
| conv a | 814.5 | 36.2 | 25.5 | 481.0 | chunked | materialize | 1.42x |
| conv b | 10.0 | 40.0 | 20.0 |  | materialize | token | 2.00x |

Worst picked / fastest: 2.00x.
"""


def test_route_costs_read_the_gram_routes_table():
    r = G.route_costs(G.Result("gram-routes", "", "passed", table=GRAM_TABLE))
    assert r.status == "measured"
    assert r.detail.startswith("1/3 layers picked their fastest route; worst 2.00x (conv b)")
    assert "needs measuring" in r.detail
    assert r.table.splitlines()[2:] == ["| conv a | chunked | materialize | 1.42x |",
                                        "| conv b | materialize | token | 2.00x |"]
    assert G.route_costs(G.Result("gram-routes", "", "timeout")).status == "skipped"
    assert G.route_costs(G.Result("gram-routes", "", "passed", table="# nothing\n")).status == "failed"


def test_report_names_device_commit_and_every_piece(tmp_path):
    results = [G.Result("tests-cuda-f64", "tests f64", "passed", 31.4, "45 passed in 30s"),
               G.Result("tests-cuda-bf16", "tests bf16", "failed", 12.0, "1 failed | 44 passed", tail="E  boom"),
               G.Result("peers", "peers", "skipped", detail="missing package(s): asdl (package asdfghjkl)"),
               G.Result("gram-routes", "routes", "passed", 50.0, "ok", table="# Title\n\n| a | b |\n|---|---|\n")]
    header = {"device": "NVIDIA H200 (139 GiB)", "torch": "2.11.0", "date": "2026-12-04 09:00 UTC",
              "commit": "abc1234"}
    path = tmp_path / "r" / "gpu-h200.md"
    text = G.write_report(str(path), header, results, 93.7, 510)
    assert path.read_text() == text
    for line in ("- device: NVIDIA H200 (139 GiB)", "- commit: abc1234", "- total: 94 s of a 510 s budget",
                 "| tests-cuda-f64 | tests f64 | passed | 31 | 45 passed in 30s |",
                 "| tests-cuda-bf16 | tests bf16 | failed | 12 | 1 failed \\| 44 passed |",
                 "| peers | peers | skipped | 0 | missing package(s): asdl (package asdfghjkl) |",
                 "## tests-cuda-bf16: output tail (failed)", "E  boom", "## gram-routes", "| a | b |"):
        assert line in text.splitlines(), line
    assert "# Title" not in text


@pytest.mark.parametrize("name,slug", [("NVIDIA H200", "h200"), ("NVIDIA GeForce RTX 4090", "geforce-rtx-4090"),
                                       ("Tesla V100-SXM2-16GB", "tesla-v100-sxm2-16gb")])
def test_device_slug(name, slug):
    assert G.device_slug(name) == slug


def test_test_target_switches_name_the_bad_value(monkeypatch):
    monkeypatch.setenv("FNGD_TEST_AUTOCAST", "fp8")
    with pytest.raises(pytest.UsageError, match=r"FNGD_TEST_AUTOCAST='fp8': allowed are \['bf16'\]"):
        target_from_env()
    monkeypatch.setenv("FNGD_TEST_AUTOCAST", "bf16")
    monkeypatch.setenv("FNGD_TEST_DEVICE", "warp9")
    with pytest.raises(pytest.UsageError, match="FNGD_TEST_DEVICE='warp9' is not a torch device"):
        target_from_env()
    monkeypatch.delenv("FNGD_TEST_DEVICE")
    t = target_from_env()
    assert (t.device.type, t.autocast, str(t.dtype)) == ("cpu", "bf16", "torch.float32")


def test_main_runs_the_pieces_in_order_and_writes_the_report(tmp_path, monkeypatch):
    """The orchestration with stand-in pieces and a stand-in device (the real ones need CUDA)."""
    import torch

    table = GRAM_TABLE.replace("\n", "\\n")
    fake = [piece("tests-cuda-f64", "print('45 passed in 3s')"),
            G.Piece("gram-routes", "routes", ["-c", f"open(r'{{tmp}}/g.md', 'w').write('{table}')"], 60, table="g.md"),
            piece("peers", "pass", needs=("no_such_module_xyz",))]
    monkeypatch.setattr(G, "pieces", lambda: fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA Fake 1")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: type("P", (), {"total_memory": 2**34})())
    out = tmp_path / "gpu.md"
    assert G.main(["--out", str(out)]) == 0
    rows = [ln for ln in out.read_text().splitlines() if ln.startswith("| ") and " | " in ln[2:]][:5]
    assert [r.split(" | ")[0][2:] for r in rows[1:]] == ["tests-cuda-f64", "gram-routes", "route-costs", "peers"]
    assert "- device: NVIDIA Fake 1 (16 GiB)" in out.read_text()
    assert G.main(["--out", str(out), "--only", "tests-cuda-f64"]) == 0
    assert "gram-routes" not in out.read_text()
