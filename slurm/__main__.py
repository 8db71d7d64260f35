"""python -m fngd_slurm SWEEP.toml [--dry-run | --status] [--executor local|slurm] [--wait]

Expands a sweep file (see fngd_slurm.sweep) into runs and launches the ones that are not done:
on this machine (``local``, the default: a bounded pool, progress printed) or on SLURM through
submitit (one job array per resource request). Calling it again launches only runs that failed,
were killed or never ran -- they resume from their own checkpoints; done runs are skipped and
nothing is overwritten. Data a task needs is prepared first (the task's ``prepare`` command).

A tuning sweep (a ``[tune]`` table, see fngd_slurm.tune) runs in stages: the trials, the edge
rounds their results call for (in waves, as trials end), then the chosen configuration of every
optimizer at every seed, at the task's full length; the result is written to
``<out>/<name>/tuning.json`` and ``tuning.md`` after each. On SLURM without ``--wait`` each call
does what it can (submit the trials or the next round; once they are done, choose and submit the
seeds).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from collections import Counter

from . import executors, tune
from .sweep import EXECUTORS, Sweep, SweepError, by_seed, load, presets


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def print_status(sweep: Sweep, runs: list | None = None) -> Counter:
    runs = sweep.runs if runs is None else runs
    rows = [["run", "state", "progress"]]
    counts: Counter = Counter()
    for run in runs:
        state, detail = executors.status_of(run)
        counts[state] += 1
        rows.append([run.id, state, detail])
    print(_table(rows))
    print(f"{len(runs)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
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


def plan(sweep: Sweep, runs: list | None = None) -> tuple[list, list]:
    """(to launch, done or in flight), each in launch order: seed by seed (``by_seed``)."""
    todo, skip = [], []
    for run in by_seed(sweep.runs if runs is None else runs):
        state, detail = executors.status_of(run)
        (skip if state in ("done", "running", "queued") else todo).append((run, state, detail))
    return todo, skip


def extend(sweep: Sweep, runs: list) -> None:
    """Runs of a task with ``extends`` that have not started begin from the same configuration's
    finished shorter run there (fairseq resumes from its checkpoint); without one, from scratch."""
    for run in runs:
        root = sweep.tasks[run.task].extends
        if root is None:
            continue
        src = executors.extension_source(run, root)
        if src is None:
            print(f"{run.id}: no finished shorter run of its configuration in {root}; it starts from scratch",
                  flush=True)
            continue
        print(f"{run.id}: continues {src} after its epoch {executors.continue_from(run, src)}", flush=True)


def launch(sweep: Sweep, runs: list, wait: bool) -> tuple[int, bool]:
    """Launch ``runs`` on the sweep's executor: (exit code, whether they have all ended here)."""
    if not runs:
        print("nothing to launch: every run is done or in flight")
        return 0, True
    if sweep.executor == "local":
        codes = executors.run_local(runs, sweep.max_parallel, log=lambda m: print(m, flush=True))
        failed = [rid for rid, rc in codes.items() if rc != 0]
        print(f"{len(codes) - len(failed)} runs finished, {len(failed)} failed"
              + (f": {', '.join(failed)} (run the same command again to resume them)" if failed else ""))
        return (1 if failed else 0), True
    executors.check_slurm_resources(runs, sweep.path)
    executors.submit_slurm(runs, sweep.root, sweep.name, sweep.max_parallel, log=lambda m: print(m, flush=True))
    if not wait:
        return 0, False
    while True:
        time.sleep(5)
        _, inflight = plan(sweep, runs)
        active = [r for r, s, _ in inflight if s != "done"]
        if not active:
            break
        print(f"{time.strftime('%T')} {len(active)} runs queued or running", flush=True)
    done = sum(executors.status_of(r)[0] == "done" for r in runs)
    return (0 if done == len(runs) else 1), True


def print_plan(sweep: Sweep, todo: list, skip: list) -> None:
    for run, state, _ in todo:
        r = run.resources
        res = (f"{r.gpus} GPU, {r.cpus} CPU, {r.mem_gb:g} GB, {r.time_min} min"
               + (f", partition {r.partition}" if r.partition else "")
               + "".join(f", {k}={v}" for k, v in r.extra.items())) if sweep.executor == "slurm" else "local"
        print(f"  {run.id} [{state}; {res}]\n    {shlex.join(run.command)}")
        root = sweep.tasks[run.task].extends
        src = executors.extension_source(run, root) if root is not None and state == "not started" else None
        if src is not None:
            print(f"    continues {src}")
    for run, state, _ in skip:
        print(f"  {run.id} [{state}: skipped]")


def tune_main(sweep: Sweep, args: argparse.Namespace) -> int:
    """The stages of a tuning sweep (see the module docstring): the trials, the edge rounds each
    optimizer's results call for (each launched once the rounds before it have ended), then the
    chosen configurations at every seed."""
    result_path = sweep.root / "tuning.json"

    def current() -> dict:
        return tune.state(sweep, executors.status_of, executors.record_of)

    def runs_of(result: dict, key: str) -> list:
        return [r for t in result["tasks"].values() for o in t["optimizers"].values() for r in o[key]]

    n_opt = len(sweep.trials)
    if args.status:
        result = current()
        print("trials:")
        print_status(sweep, runs_of(result, "trial_runs"))
        seeds = [r for r in runs_of(result, "seed_runs") if r.id not in {t.id for t in runs_of(result, "trial_runs")}]
        if seeds:
            print("\nchosen configurations, every seed:")
            print_status(sweep, seeds)
        return 0
    todo, skip = plan(sweep)
    rounds = (f", then up to {sweep.tune.rounds} edge rounds of {sweep.tune.round_trials} trials each"
              if sweep.tune.rounds else "")
    print(f"tuning sweep {sweep.name}: {sweep.tune.trials} trials for each of {n_opt} optimizers "
          f"({len(sweep.runs)} trial runs at seed {sweep.seeds[0]}){rounds}, then the chosen configurations at "
          f"seeds {', '.join(map(str, sweep.seeds))} -> {sweep.root}; first-round trials: {len(skip)} done or in "
          f"flight, {len(todo)} to launch on {sweep.executor}", flush=True)
    if args.dry_run:
        print_plan(sweep, todo, skip)
        return 0
    code = 0
    while True:  # a wave: every trial known now that is not done; its results may call for more rounds
        result = current()
        tune.write_result(result_path, tune.public(result))
        todo, _ = plan(sweep, runs_of(result, "trial_runs"))
        if not todo:
            print("trials: none left to launch (every trial of every round is done or in flight)", flush=True)
            break
        print(f"trials: {len(todo)} runs to launch", flush=True)
        c, ended = launch(sweep, [r for r, _, _ in todo], args.wait)
        code = max(code, c)
        if not ended:
            print(f"trials submitted; run the same command again when they are done (python -m fngd_slurm "
                  f"{args.sweep} --status) to launch the next round or the seeds")
            return code
        if c:  # failed trials count as lost; do not loop on them
            break
    result = current()
    undecided = [f"{t}/{o}" for t, task in result["tasks"].items() for o, d in task["optimizers"].items()
                 if d["chosen"] is None]
    failed = sum(tr["status"] == "failed" for t in result["tasks"].values() for o in t["optimizers"].values()
                 for tr in o["trials"])
    if failed:
        print(f"warning: {failed} trials failed; they count as lost (run the same command again to retry them)")
    if undecided:
        tune.write_result(result_path, tune.public(result))
        print(f"no configuration chosen for {', '.join(undecided)}: trials still running, or none has a finite "
              f"validation value; see {result_path.with_suffix('.md')}")
        return 1
    for t, task in result["tasks"].items():
        for o, d in task["optimizers"].items():
            print(f"chosen for {t}/{o}: {d['chosen']['hparams']} (best validation {d['chosen']['value']:.4g})")
    tune.write_result(result_path, tune.public(result))  # the choice is on disk before the seeds run
    todo2, _ = plan(sweep, runs_of(result, "seed_runs"))
    print(f"seeds: {len(todo2)} runs to launch", flush=True)
    code2, ended2 = launch(sweep, [r for r, _, _ in todo2], args.wait)
    tune.write_result(result_path, tune.public(current()))
    print(f"tuning result: {result_path} and {result_path.with_suffix('.md')}"
          + ("" if ended2 else " (seeds still running: run the same command again when they are done)"))
    if ended2:
        dirs = " ".join(shlex.quote(str(r.dir)) for r in runs_of(result, "seed_runs"))
        print(f"the chosen configurations compared (every seed):\n  python -m fngd_analysis {dirs} --out "
              f"{shlex.quote(str(sweep.root / 'report'))}")
    return max(code, code2)


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
        if sweep.tune is not None:
            if not args.status:
                check_data(sweep, args.dry_run)
            return tune_main(sweep, args)
        if args.status:
            print_status(sweep)
            return 0
        check_data(sweep, args.dry_run)
        todo, skip = plan(sweep)
        print(f"sweep {sweep.name}: {len(sweep.runs)} runs ({len(sweep.tasks)} tasks x optimizer grids x "
              f"{len(sweep.seeds)} seeds) -> {sweep.root}; {len(skip)} done or in flight, {len(todo)} to launch "
              f"on {sweep.executor}", flush=True)
        if args.dry_run:
            print_plan(sweep, todo, skip)
            return 0
        extend(sweep, [run for run, state, _ in todo if state == "not started"])
        code, ended = launch(sweep, [run for run, _, _ in todo], args.wait)
        if not ended:
            print(f"follow with: python -m fngd_slurm {args.sweep} --status")
        elif args.wait and sweep.executor == "slurm":
            print_status(sweep)
        return code
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
