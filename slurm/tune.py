"""Tuning: every optimizer gets the same number of trials from a declared search space, the best
trial is chosen on validation, and the chosen configuration is run again with more seeds.

A sweep file with a ``[tune]`` table is a tuning sweep (the protocol of AlgoPerf's external
tuning ruleset, at the scale of one machine)::

    seeds = [0, 1, 2]            # trials run with the first; the chosen configurations with all
    [tune]
    trials = 6                   # per optimizer (per NAME or NAME:VARIANT table), the same for all
    search_seed = 0              # which quasi-random points (0: the plain Halton sequence)
    rounds = 2                   # edge rounds (next_round), at most, per optimizer
    round_trials = 4             # trials in each

    [tasks.corpus.optimizers.fngd]
    lr = { log = [0.03, 1.0], limit = [0.001, 10.0] }   # a log-uniform axis; edge rounds stop at limit
    damping = { log = [0.1, 10.0] }
    normalize = ["sum", "none"]  # a list is a choice axis (not a grid, in a tuning sweep)
    momentum = 0.9               # a value is fixed

Trial points are the first ``trials`` points of a Halton sequence over the axes (bases 2, 3, 5,
...; ``search_seed`` > 0 shifts every coordinate by a seeded random offset, modulo 1), numbers
rounded to 3 significant digits; a point equal to an earlier one after rounding is skipped.
Selection: the trial with the best validation metric over its epochs (the checkpoint fairseq and
timm keep as the best one, the one whose test score is reported), in the metric's direction; a
failed or diverged trial (no finite value) loses; a tie goes to the earlier trial. Every trial is
one run of the sweep, so trials resume, skip when done and run on SLURM like any run; the chosen
configuration's run at the first seed *is* its trial.

The result, ``<out>/<name>/tuning.json`` (format ``fngd-tuning/1``) and ``tuning.md``, holds
the protocol, the sweep file (text and sha256), the machine, every trial (run id, point, value),
the choice and the seed runs. A sweep task with ``tuned = "that/tuning.json"`` runs the chosen
configurations with the tuned task's own settings (see slurm/sweep.py), so a report cannot drift
from what was tuned.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "fngd-tuning/1"
TUNE_KEYS = {"trials", "search_seed", "rounds", "round_trials"}
AXIS_KINDS = ("log", "uniform")
_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


@dataclass
class TuneSpec:
    trials: int
    search_seed: int = 0
    rounds: int = 0  # at most this many edge rounds per optimizer (see next_round)
    round_trials: int = 4  # trials in each edge round


# ----------------------------------------------------------------------------------------- search space
def parse_axis(key: str, value: Any, fail) -> Any:
    """Check one search-space entry: a scalar (fixed), a non-empty list (choice) or a table
    ``{log = [lo, hi]}`` / ``{uniform = [lo, hi]}``. ``fail(key, message)`` raises."""
    if isinstance(value, dict):
        kinds = [k for k in value if k in AXIS_KINDS]
        if len(kinds) != 1 or set(value) - {kinds[0], "limit"}:
            fail(key, f"{value!r}: a range is {{log = [lo, hi]}} or {{uniform = [lo, hi]}}, optionally with "
                      "limit = [LO, HI] (how far edge rounds may widen it)")
        kind = kinds[0]
        for name in (kind, "limit"):
            bounds = value.get(name)
            if bounds is None:
                continue
            if not (isinstance(bounds, list) and len(bounds) == 2
                    and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
                    and bounds[0] < bounds[1] and (kind != "log" or bounds[0] > 0)):
                fail(key, f"{name} = {bounds!r}: expected [lo, hi] with lo < hi" + (" and lo > 0" if kind == "log"
                                                                                    else ""))
        if "limit" in value and not value["limit"][0] <= value[kind][0] < value[kind][1] <= value["limit"][1]:
            fail(key, f"limit = {value['limit']!r} must contain {kind} = {value[kind]!r}")
        return value
    if isinstance(value, list):
        if not value:
            fail(key, "an empty choice list")
        for v in value:
            if isinstance(v, (dict, list)):
                fail(key, f"{v!r}: a choice is a value")
    return value


def _radical_inverse(i: int, base: int) -> float:
    out, f = 0.0, 1.0 / base
    while i > 0:
        i, digit = divmod(i, base)
        out += digit * f
        f /= base
    return out


def _round(x: float) -> float:
    return float(f"{x:.3g}")


def trial_points(space: dict[str, Any], trials: int, search_seed: int = 0) -> list[dict[str, Any]]:
    """The ``trials`` points of a search space (see the module docstring), in trial order."""
    axes = [k for k, v in space.items() if isinstance(v, (dict, list))]
    if len(axes) > len(_PRIMES):
        raise ValueError(f"at most {len(_PRIMES)} search axes, got {len(axes)}")
    rng = random.Random(search_seed)
    shift = [rng.random() if search_seed else 0.0 for _ in axes]
    points: list[dict[str, Any]] = []
    seen: set[str] = set()
    n_choices = math.prod(len(space[a]) for a in axes if isinstance(space[a], list))
    continuous = any(isinstance(space[a], dict) for a in axes)
    limit = trials if continuous else min(trials, n_choices)
    i = 0
    while len(points) < limit and i < 100 * trials + 100:
        i += 1
        point = dict(space)
        for d, a in enumerate(axes):
            u = (_radical_inverse(i, _PRIMES[d]) + shift[d]) % 1.0
            v = space[a]
            if isinstance(v, list):
                point[a] = v[min(int(u * len(v)), len(v) - 1)]
            else:
                kind, (lo, hi) = _range(v)
                x = lo * (hi / lo) ** u if kind == "log" else lo + (hi - lo) * u
                point[a] = _round(x)
        key = json.dumps(point, sort_keys=True)
        if key not in seen:
            seen.add(key)
            points.append(point)
    return points


def _range(axis: dict[str, Any]) -> tuple[str, tuple[float, float]]:
    kind = next(k for k in axis if k in AXIS_KINDS)
    return kind, tuple(axis[kind])  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------- edge rounds
def next_round(space: dict[str, Any], trials: list[dict[str, Any]], pick: dict[str, Any]
               ) -> tuple[dict[str, Any] | None, list[str]]:
    """The search space of an optimizer's next edge round, and the axes at a hard limit.

    The rule, the same for every optimizer: a range axis on which the chosen trial ``pick`` holds
    the lowest or the highest value tried so far (every round counted) is *at an edge*. The next
    round searches beyond each such edge, from the chosen value over half the declared range's
    width (log axes: by a factor sqrt(hi / lo); uniform: by (hi - lo) / 2), clipped to the axis's
    ``limit`` (default: unbounded); every other axis stays at the chosen value. An edge at its
    limit is not searched further (reported). None: no edge left to search."""
    hp = pick["hparams"]
    new = dict(hp)
    at_limit: list[str] = []
    widened = False
    for axis, v in space.items():
        if not isinstance(v, dict) or len(trials) < 2:
            continue
        tried = [t["hparams"][axis] for t in trials]
        x = hp[axis]
        up, down = x == max(tried), x == min(tried)
        if up == down:  # an interior value (or all trials equal on this axis)
            continue
        kind, (lo, hi) = _range(v)
        lim_lo, lim_hi = v.get("limit", (0.0 if kind == "log" else -math.inf, math.inf))
        if kind == "log":
            step = math.sqrt(hi / lo)
            a, b = (x, min(x * step, lim_hi)) if up else (max(x / step, lim_lo), x)
        else:
            step = (hi - lo) / 2
            a, b = (x, min(x + step, lim_hi)) if up else (max(x - step, lim_lo), x)
        if _round(a) >= _round(b):
            at_limit.append(f"{axis} {'highest' if up else 'lowest'} tried, at its limit {b if up else a:g}")
            continue
        new[axis] = {kind: [_round(a), _round(b)]}
        widened = True
    return (new if widened else None), at_limit


# ----------------------------------------------------------------------------------------- selection
def best_value(record: dict[str, Any] | None) -> float | None:
    """The best finite validation metric of a run record over its epochs (None: none)."""
    if not record:
        return None
    values = [e["val_metric"] for e in record.get("epochs", [])
              if isinstance(e.get("val_metric"), (int, float)) and math.isfinite(e["val_metric"])]
    if not values:
        return None
    return max(values) if record.get("metric", {}).get("mode", "max") == "max" else min(values)


def edges(space: dict[str, Any], trials: list[dict[str, Any]], pick: dict[str, Any]) -> list[str]:
    """The range axes on which ``pick`` is the lowest or highest point tried: a choice at the edge
    of what was searched, where a wider range might do better (reported beside the result)."""
    out = []
    for axis, v in space.items():
        if isinstance(v, dict) and len(trials) > 1:
            tried = [t["hparams"][axis] for t in trials]
            if pick["hparams"][axis] in (min(tried), max(tried)):
                out.append(f"{axis} {'lowest' if pick['hparams'][axis] == min(tried) else 'highest'} tried")
    return out


def choose(trials: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The chosen trial among ``trials`` (dicts with "value"); None when no trial has a value."""
    scored = [t for t in trials if t["value"] is not None]
    if not scored:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(scored, key=lambda t: (sign * t["value"], -trials.index(t)))


# ----------------------------------------------------------------------------------------- the result
def write_result(path: Path, data: dict[str, Any]) -> None:
    from fngd_records import write_json_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)
    path.with_suffix(".md").write_text(markdown(data))


def load_result(path: str | os.PathLike) -> dict[str, Any]:
    """A tuning result; ValueError naming the file when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable tuning result ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: format is {data.get('format') if isinstance(data, dict) else None!r}, "
                         f"expected {FORMAT!r}")
    return data


def sweep_provenance(path: Path) -> dict[str, Any]:
    text = path.read_text()
    return {"path": str(path), "sha256": hashlib.sha256(text.encode()).hexdigest(), "text": text}


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return _fmt(statistics.mean(values)) if values else "-"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def markdown(data: dict[str, Any]) -> str:
    p = data["protocol"]
    m = data["machine"]
    rounds = (f"; then up to {p['rounds']} edge rounds of {p['round_trials']} trials each, beyond every axis whose "
              "chosen value was the lowest or highest tried (slurm/tune.py next_round)") if p.get("rounds") else ""
    lines = [f"# Tuning result: {data['name']}", "",
             f"{p['trials']} trials per optimizer (Halton points of each search space, search_seed "
             f"{p['search_seed']}){rounds}; trials at seed {p['seeds'][0]}; chosen on {p['selection']}; the chosen "
             f"configuration run at seeds {', '.join(map(str, p['seeds']))}.", "",
             f"Sweep file: `{data['sweep']['path']}` (sha256 {data['sweep']['sha256'][:12]}); "
             f"{data['date']}; {m['host']}, {m['cpu_count']} CPUs, {m['platform']}; "
             + ", ".join(f"{k} {v}" for k, v in m["packages"].items()), ""]
    for tname, task in data["tasks"].items():
        fidelity = (f", trials {task['trial_epochs']} epochs" if task.get("trial_epochs", task["epochs"])
                    != task["epochs"] else "")
        lines += [f"## {tname} ({task['kind']}, {task['epochs']} epochs{fidelity}, validation {task['metric']}, "
                  f"{task['mode']})", "",
                  "| optimizer | chosen configuration | seeds | best validation (mean ± std) | test (mean ± std) |",
                  "|---|---|---|---|---|"]
        for opt, o in task["optimizers"].items():
            done = [s for s in o.get("seeds", []) if s["status"] == "done"]
            tests = {k: [s["final"][k] for s in done if isinstance((s.get("final") or {}).get(k), (int, float))]
                     for k in ("test_bleu", "test_top1")}
            test = "; ".join(f"{k[5:]} {_mean_std(v)}" for k, v in tests.items() if v)
            config = ", ".join(f"{k}={_fmt(v)}" for k, v in ((o.get("chosen") or {}).get("hparams") or {}).items())
            lines.append(f"| {opt} | {config or '(not chosen yet)'} | {len(done)} | "
                         f"{_mean_std([s['value'] for s in done if s['value'] is not None])} | {test or '-'} |")
        lines.append("")
        for opt, o in task["optimizers"].items():
            space = ", ".join(f"{k} {v}" for k, v in o["space"].items())
            lines += [f"### {opt}", "", f"Search space: {space}", ""]
            chosen = (o.get("chosen") or {}).get("run")
            for i, r in enumerate(o.get("rounds", [])):
                wider = ", ".join(f"{k} {v}" for k, v in r["space"].items() if isinstance(v, dict))
                lines += [f"Edge round {i + 1} (after `{r['after']}`): {wider}", ""]
            c = o.get("chosen") or {}
            if c.get("edges"):
                why = ("the rounds are used up" if c.get("rounds_exhausted") else
                       "at a hard limit" if c.get("at_limit") else "no edge rounds declared")
                lines += [f"Chosen at the edge of the trials: {', '.join(c['edges'])} ({why}; a wider search "
                          "might find better).", ""]
            if c.get("at_limit"):
                lines += [f"At a declared limit: {'; '.join(c['at_limit'])}.", ""]
            lines += ["| trial | round | " + " | ".join(o["axes"]) + " | best validation | status | run |",
                      "|---" * (len(o["axes"]) + 5) + "|"]
            for i, t in enumerate(o["trials"]):
                mark = " **chosen**" if t["run"] == chosen else ""
                lines.append(f"| {i + 1}{mark} | {t.get('round', 0)} | "
                             + " | ".join(_fmt(t["hparams"].get(a)) for a in o["axes"])
                             + f" | {_fmt(t['value'])} | {t['status']} | `{t['run']}` |")
            if o.get("seeds"):
                lines += ["", "Chosen configuration, all seeds:", "",
                          "| seed | best validation | final | status | run |", "|---|---|---|---|---|"]
                for s in o["seeds"]:
                    final = ", ".join(f"{k} {_fmt(v)}" for k, v in (s.get("final") or {}).items()
                                      if isinstance(v, (int, float)))
                    lines.append(f"| {s['seed']} | {_fmt(s['value'])} | {final or '-'} | {s['status']} | "
                                 f"`{s['run']}` |")
            lines.append("")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- a tuning sweep's state
SELECTION = "the best validation metric over a trial's epochs"


def state(sweep, status_of, record_of) -> dict[str, Any]:
    """The tuning result of ``sweep`` as its run directories stand: every trial of every round,
    the choice per optimizer once all its trials have ended (done or failed) and no edge round is
    left (see next_round), the chosen configuration's runs at every seed (``seed_runs``: not yet
    launched ones included). ``trial_runs``: every trial run known so far (later rounds appear
    when the earlier ones have ended). ``status_of``/``record_of`` are the executors' (a run ->
    its state, its record)."""
    tasks: dict[str, Any] = {}
    for (tname, opt), first in sweep.trials.items():
        task = sweep.tasks[tname]
        entry = tasks.setdefault(tname, {"kind": task.kind, "settings": task.spec, "epochs": task.epochs,
                                         "trial_epochs": task.trial_epochs or task.epochs,
                                         "metric": None, "mode": None, "optimizers": {}})

        def described(runs: list, round_index: int) -> list[dict[str, Any]]:
            out = []
            for run in runs:
                st, _ = status_of(run)
                rec = record_of(run)
                if rec and rec.get("metric"):
                    entry["metric"], entry["mode"] = rec["metric"]["name"], rec["metric"]["mode"]
                out.append({"run": run.id, "hparams": run.hparams, "status": st, "round": round_index,
                            "value": best_value(rec) if st == "done" else None})
            return out

        space = sweep.tasks[tname].optimizers[opt]
        o = {"space": space, "axes": [k for k, v in space.items() if isinstance(v, (dict, list))] or
             list(space), "trials": described(first, 0), "rounds": [], "chosen": None, "seeds": [],
             "seed_runs": [], "trial_runs": list(first)}
        while all(t["status"] in ("done", "failed") for t in o["trials"]):
            pick = choose(o["trials"], entry["mode"] or "max")
            if pick is None:
                break
            wider, at_limit = next_round(space, o["trials"], pick)
            if wider is not None and len(o["rounds"]) < sweep.tune.rounds:
                points = [p for p in trial_points(wider, sweep.tune.round_trials, sweep.tune.search_seed)
                          if all(p != t["hparams"] for t in o["trials"])]
                runs = [sweep.trial_run(tname, opt, p) for p in points]
                o["rounds"].append({"space": wider, "after": pick["run"], "runs": [r.id for r in runs]})
                o["trial_runs"] += runs
                o["trials"] += described(runs, len(o["rounds"]))
                continue
            left = edges(space, o["trials"], pick)
            o["chosen"] = {"run": pick["run"], "hparams": pick["hparams"], "value": pick["value"],
                           "edges": left, "at_limit": at_limit,
                           "rounds_exhausted": wider is not None}
            o["seed_runs"] = [sweep.seed_run(tname, opt, pick["hparams"], s) for s in sweep.seeds]
            for run in o["seed_runs"]:
                st, _ = status_of(run)
                rec = record_of(run)
                o["seeds"].append({"seed": run.seed, "run": run.id, "status": st,
                                   "value": best_value(rec) if st == "done" else None,
                                   "final": (rec or {}).get("final") if st == "done" else None})
            break
        entry["optimizers"][opt] = o
    from fngd_records import environment

    return {"format": FORMAT, "name": sweep.name, "date": now(), "machine": environment(),
            "sweep": sweep_provenance(sweep.path),
            "protocol": {"trials": sweep.tune.trials, "search_seed": sweep.tune.search_seed, "seeds": sweep.seeds,
                         "rounds": sweep.tune.rounds, "round_trials": sweep.tune.round_trials,
                         "selection": SELECTION}, "tasks": tasks}


def public(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` without the Run objects (what tuning.json holds)."""
    out = json.loads(json.dumps({k: v for k, v in result.items() if k != "tasks"}))
    out["tasks"] = {}
    for tname, task in result["tasks"].items():
        t = {k: v for k, v in task.items() if k != "optimizers"}
        t["optimizers"] = {o: {k: v for k, v in d.items() if k not in ("seed_runs", "trial_runs")}
                           for o, d in task["optimizers"].items()}
        out["tasks"][tname] = json.loads(json.dumps(t))
    return out
