"""python -m fngd_slurm SWEEP.toml [--dry-run | --status] [--executor local|slurm] [--wait]

Expands a sweep file (see fngd_slurm.sweep) into runs and launches the ones that are not done:
on this machine (``local``, the default: a bounded pool, progress printed) or on SLURM through
submitit (one job array per resource request). Calling it again launches only runs that failed,
were killed or never ran -- they resume from their own checkpoints; done runs are skipped and
nothing is overwritten. Data a task needs is prepared first (the task's ``prepare`` command).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from collections import Counter

from . import executors
from .sweep import EXECUTORS, Sweep, SweepError, load, presets


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def print_status(sweep: Sweep) -> Counter:
    rows = [["run", "state", "progress"]]
    counts: Counter = Counter()
    for run in sweep.runs:
        state, detail = executors.status_of(run)
        counts[state] += 1
        rows.append([run.id, state, detail])
    print(_table(rows))
    print(f"{len(sweep.runs)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return counts


def check_data(sweep: Sweep, dry_run: bool) -> None:
    for task in sweep.tasks.values():
        if task.data.exists():
            continue
        if task.prepare is None:
            raise SweepError(f"{sweep.path}: tasks.{task.name}.data: {task.data} does not exist, and the task has no "
                             f"prepare command to make it")
        cmd = [a.replace("{data}", str(task.data)).replace("{python}", sys.executable) for a in task.prepare]
        if cmd[0] == "python":
            cmd[0] = sys.executable
        print(f"{'would prepare' if dry_run else 'preparing'} {task.name} data: {shlex.join(cmd)}", flush=True)
        if dry_run:
            continue
        if subprocess.run(cmd).returncode != 0 or not task.data.exists():
            raise SweepError(f"{sweep.path}: tasks.{task.name}.prepare: the command failed or did not create "
                             f"{task.data}")


def plan(sweep: Sweep) -> tuple[list, list]:
    todo, skip = [], []
    for run in sweep.runs:
        state, detail = executors.status_of(run)
        (skip if state in ("done", "running", "queued") else todo).append((run, state, detail))
    return todo, skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fngd_slurm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", help="the sweep file (TOML), or a preset's name: " + ", ".join(presets()))
    ap.add_argument("--executor", choices=EXECUTORS, help="override the file's [executor] kind")
    ap.add_argument("--dry-run", action="store_true", help="show the plan: runs, resources, commands; launch nothing")
    ap.add_argument("--status", action="store_true", help="show each run's state and progress")
    ap.add_argument("--wait", action="store_true", help="slurm: wait for the submitted runs, showing progress")
    args = ap.parse_args(argv)
    try:
        # --status only reads the run directories: no host (and no torch) is imported for it
        sweep = load(args.sweep, executor=args.executor, check=not args.status)
        if args.status:
            print_status(sweep)
            return 0
        check_data(sweep, args.dry_run)
        todo, skip = plan(sweep)
        print(f"sweep {sweep.name}: {len(sweep.runs)} runs ({len(sweep.tasks)} tasks x optimizer grids x "
              f"{len(sweep.seeds)} seeds) -> {sweep.root}; {len(skip)} done or in flight, {len(todo)} to launch "
              f"on {sweep.executor}", flush=True)
        if args.dry_run:
            for run, state, _ in todo:
                r = run.resources
                res = (f"{r.gpus} GPU, {r.cpus} CPU, {r.mem_gb:g} GB, {r.time_min} min"
                       + (f", partition {r.partition}" if r.partition else "")
                       + "".join(f", {k}={v}" for k, v in r.extra.items())) if sweep.executor == "slurm" else "local"
                print(f"  {run.id} [{state}; {res}]\n    {shlex.join(run.command)}")
            for run, state, _ in skip:
                print(f"  {run.id} [{state}: skipped]")
            return 0
        runs = [run for run, _, _ in todo]
        if not runs:
            print("nothing to launch: every run is done or in flight")
            return 0
        if sweep.executor == "local":
            codes = executors.run_local(runs, sweep.max_parallel, log=lambda m: print(m, flush=True))
            failed = [rid for rid, rc in codes.items() if rc != 0]
            print(f"{len(codes) - len(failed)} runs finished, {len(failed)} failed"
                  + (f": {', '.join(failed)} (run the same command again to resume them)" if failed else ""))
            return 1 if failed else 0
        executors.check_slurm_resources(runs, sweep.path)
        executors.submit_slurm(runs, sweep.root, sweep.name, sweep.max_parallel, log=lambda m: print(m, flush=True))
        if not args.wait:
            print(f"follow with: python -m fngd_slurm {args.sweep} --status")
            return 0
        while True:
            time.sleep(5)
            _, inflight = plan(sweep)
            active = [r for r, s, _ in inflight if s != "done"]
            if not active:
                break
            print(f"{time.strftime('%T')} {len(active)} runs queued or running", flush=True)
        counts = print_status(sweep)
        return 0 if counts.get("done", 0) == len(sweep.runs) else 1
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
