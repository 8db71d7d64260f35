"""What only a GPU can show, in one command under ten minutes: `make gpu-check PY=python3`.

    python3 benchmarks/gpu_check.py                  # on a machine with CUDA; about 8 minutes
    python3 benchmarks/gpu_check.py --budget 300     # fewer seconds in all

Runs this working tree without installing it (PYTHONPATH is the repository root) with the
interpreter it is started with, each piece in a process of its own under its own timeout, the
whole under --budget seconds (default 510):

  tests-cuda-f64    tests/test_exactness.py and tests/test_loops.py on CUDA in float64
                    (FNGD_TEST_DEVICE=cuda): every step equal to the CPU float64 oracle to 1e-8
  tests-cuda-bf16   the same under bf16 autocast (FNGD_TEST_AUTOCAST=bf16), to bf16's tolerance
  gram-routes       benchmarks/gram_routes.py --device cuda: each exact Gram route timed per layer
  route-costs       from gram-routes' table: how often ROUTE_COST['cuda'] (not measured before)
                    picks a slower route than the fastest, and by how much
  collect-profile   benchmarks/collect_profile.py --full --device cuda: SGD, exact and sketched
                    collect steps side by side at the GPU sizes
  peers             benchmarks/peers.py --device cuda (needs asdfghjkl: skipped where it is missing)

A piece whose packages are missing is skipped with the reason. The report,
benchmarks/reports/gpu-<device>.md, names the device, torch, the date and the commit, and each
piece's result, time, and skip reason or output tail; the benchmarks' own tables follow.
Without a CUDA device it says so and exits 0, writing nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET = 510.0
MIN_PIECE = 20.0  # a piece is not started with fewer seconds than this left


@dataclass
class Piece:
    name: str
    what: str
    argv: list[str]  # after the interpreter; {tmp} is the scratch folder
    timeout: float
    needs: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    table: str | None = None  # a markdown file the piece writes (relative to {tmp}), quoted in the report


@dataclass
class Result:
    name: str
    what: str
    status: str  # passed, failed, timeout, skipped; measured (route-costs: a reading, not a check)
    seconds: float = 0.0
    detail: str = ""  # skip reason, or the output's summary line
    tail: str = ""  # last lines of the output of a piece that did not pass
    table: str = ""


TESTS = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         "tests/test_exactness.py", "tests/test_loops.py"]


def pieces() -> list[Piece]:
    return [
        Piece("tests-cuda-f64", "exactness and loop-shape tests on CUDA, float64", TESTS, 120, ("pytest",),
              {"FNGD_TEST_DEVICE": "cuda"}),
        Piece("tests-cuda-bf16", "exactness and loop-shape tests on CUDA, bf16 autocast", TESTS, 120, ("pytest",),
              {"FNGD_TEST_DEVICE": "cuda", "FNGD_TEST_AUTOCAST": "bf16"}),
        Piece("gram-routes", "benchmarks/gram_routes.py --device cuda",
              ["benchmarks/gram_routes.py", "--device", "cuda", "--out", "{tmp}/gram_routes.md"], 90, ("timm",),
              table="gram_routes.md"),
        Piece("collect-profile", "benchmarks/collect_profile.py --full --device cuda --rounds 5",
              ["benchmarks/collect_profile.py", "--full", "--device", "cuda", "--rounds", "5",
               "--out", "{tmp}/collect_profile.md"], 320, ("timm",), table="collect_profile.md"),
        Piece("peers", "benchmarks/peers.py --device cuda --rounds 3",
              ["benchmarks/peers.py", "--device", "cuda", "--rounds", "3", "--out", "{tmp}/peers.md"], 90,
              ("timm", "asdl"), table="peers.md"),
    ]


DISTRIBUTION = {"asdl": "asdfghjkl"}  # import name -> the package that installs it, where they differ


def missing(modules: tuple[str, ...]) -> list[str]:
    """The modules that cannot be imported, named with their package where it differs."""
    return [m + (f" (package {DISTRIBUTION[m]})" if m in DISTRIBUTION else "") for m in modules
            if importlib.util.find_spec(m) is None]


def summary_line(out: str) -> str:
    """pytest's last line ("45 passed in 30.1s"), else the last non-empty line."""
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"\d+ (passed|failed|error)", ln):
            return ln.strip("= ")
    return lines[-1] if lines else ""


def run_piece(p: Piece, python: str, tmp: str, left: float) -> Result:
    gone = missing(p.needs)
    if gone:
        return Result(p.name, p.what, "skipped", detail=f"missing package(s): {', '.join(gone)}")
    if left < MIN_PIECE:
        return Result(p.name, p.what, "skipped", detail=f"budget spent ({left:.0f} s left, {MIN_PIECE:.0f} s needed)")
    timeout = min(p.timeout, left)
    env = dict(os.environ, PYTHONPATH=ROOT + (os.pathsep + os.environ["PYTHONPATH"]
                                             if os.environ.get("PYTHONPATH") else ""), **p.env)
    argv = [python] + [a.replace("{tmp}", tmp) for a in p.argv]
    print(f"--- {p.name}: {' '.join(argv[1:])} (timeout {timeout:.0f} s)", flush=True)
    t = time.perf_counter()
    # a session of its own, so that a timeout ends the benchmarks' own child processes too
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        status = "passed" if proc.returncode == 0 else "failed"
        if proc.returncode != 0:
            out += f"\n(exit status {proc.returncode})"
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, _ = proc.communicate()
        out = (out or "") + f"\n(killed after {timeout:.0f} s)"
        status = "timeout"
    secs = time.perf_counter() - t
    table = ""
    if p.table and os.path.exists(os.path.join(tmp, p.table)):
        with open(os.path.join(tmp, p.table)) as f:
            table = f.read()
    tail = "" if status == "passed" else "\n".join(out.rstrip().splitlines()[-30:])
    res = Result(p.name, p.what, status, secs, summary_line(out), tail, table)
    print(f"    {status} in {secs:.0f} s: {res.detail}", flush=True)
    return res


def route_costs(gram: Result) -> Result:
    """Read gram_routes' table: the layers where the route FNGD picks is not the fastest."""
    what = "ROUTE_COST['cuda'] against gram-routes' timings"
    if gram.status != "passed" or not gram.table:
        return Result("route-costs", what, "skipped", detail=f"gram-routes {gram.status}: no table to read")
    rows = []
    for ln in gram.table.splitlines():
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[-1].endswith("x") and cells[0] != "layer":
            try:
                rows.append((cells[0], cells[-3], cells[-2], float(cells[-1][:-1])))
            except ValueError:
                continue
    if not rows:
        return Result("route-costs", what, "failed", detail="no layer rows in gram-routes' table")
    wrong = [r for r in rows if r[1] != r[2]]
    worst = max(rows, key=lambda r: r[3])
    lines = ["| layer | picked | fastest | picked / fastest |", "|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f}x |" for r in wrong]
    detail = (f"{len(rows) - len(wrong)}/{len(rows)} layers picked their fastest route; worst "
              f"{worst[3]:.2f}x ({worst[0]})")
    if worst[3] > 1.5:  # a pick within 1.5x of the fastest costs little; more says the constants need work
        detail += ": ROUTE_COST['cuda'] needs measuring (samplers' cost model)"
    return Result("route-costs", what, "measured", detail=detail, table="\n".join(lines) + "\n" if wrong else "")


def git_commit() -> str:
    if os.environ.get("FNGD_COMMIT"):  # the commit a copied tree was sent from (a device machine's .git can be stale)
        return os.environ["FNGD_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head, dirty = "", ""
    if not head:
        return "unknown (no git; set FNGD_COMMIT)"
    return head + (" (with uncommitted changes)" if dirty else "")


def device_slug(name: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA GeForce RTX 4090' -> 'geforce-rtx-4090'."""
    s = re.sub(r"^nvidia\s+", "", name.strip(), flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "gpu"


def write_report(path: str, header: dict[str, str], results: list[Result], total: float, budget: float) -> str:
    lines = ["# GPU check", "",
             "What only a GPU can show: `make gpu-check PY=python3` (benchmarks/gpu_check.py), the working "
             "tree run without installing it.", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += [f"- total: {total:.0f} s of a {budget:.0f} s budget", "",
              "| piece | what | result | s | detail |", "|---|---|---|---|---|"]
    for r in results:
        detail = r.detail.replace("|", "\\|")
        lines.append(f"| {r.name} | {r.what} | {r.status} | {r.seconds:.0f} | {detail} |")
    for r in results:
        if r.tail:
            lines += ["", f"## {r.name}: output tail ({r.status})", "", "```", r.tail, "```"]
        if r.table:
            body = re.sub(r"^#+ .*\n+", "", r.table, count=1)  # the piece's own title
            lines += ["", f"## {r.name}", "", body.rstrip()]
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=BUDGET, help=f"seconds for all pieces (default {BUDGET:.0f})")
    ap.add_argument("--out", default=None, help="report path (default benchmarks/reports/gpu-<device>.md)")
    ap.add_argument("--only", default=None, help="comma-separated piece names (default: all): "
                    + ", ".join(p.name for p in pieces()) + ", route-costs")
    args = ap.parse_args(argv)
    if args.budget < MIN_PIECE:
        ap.error(f"--budget {args.budget}: must be at least {MIN_PIECE:.0f} seconds")
    known = [p.name for p in pieces()] + ["route-costs"]
    only = args.only.split(",") if args.only else known
    bad = [n for n in only if n not in known]
    if bad:
        ap.error(f"--only: unknown piece(s) {', '.join(bad)} (known: {', '.join(known)})")
    import torch

    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False); "
              "nothing to check, no report written.")
        return 0
    name = torch.cuda.get_device_name()
    out = args.out or os.path.join(ROOT, "benchmarks", "reports", f"gpu-{device_slug(name)}.md")
    header = {"device": f"{name} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)",
              "torch": f"{torch.__version__} (CUDA {torch.version.cuda})",
              "python": f"{platform.python_version()} ({sys.executable})",
              "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "commit": git_commit(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    start = time.perf_counter()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for p in pieces():
            if p.name in only:
                results.append(run_piece(p, sys.executable, tmp, args.budget - (time.perf_counter() - start)))
            if p.name == "gram-routes" and "route-costs" in only:
                results.append(route_costs(results[-1] if p.name in only else
                                           Result("gram-routes", "", "skipped")))
    total = time.perf_counter() - start
    write_report(out, header, results, total, args.budget)
    bad = [r.name for r in results if r.status in ("failed", "timeout")]
    print(f"gpu-check: {len(results) - len(bad)}/{len(results)} pieces passed or skipped in {total:.0f} s; "
          f"report: {os.path.relpath(out, ROOT)}" + (f"; not passed: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
