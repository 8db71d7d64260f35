"""Sweep files: what to run, expanded into runs.

A sweep is one TOML file. Every list among an optimizer's options is a grid axis; ``seeds``
multiplies everything::

    name = "default"                 # results: <out>/<name>/runs/<run id>/
    out = "results"                  # relative paths: to the directory the command runs in
    seeds = [0, 1]

    [executor]
    kind = "local"                   # local | slurm
    max_parallel = 2                 # local: runs at once; slurm: job-array parallelism cap
    threads = 1                      # CPU threads per run (default: local all, slurm the run's cpus)

    [resources]                      # SLURM; a task's [tasks.X.resources] overrides keys
    partition = "gpu"
    gpus = 1                         # per run: torchrun (timm) / fairseq's own spawn when > 1
    cpus = 8
    mem_gb = 32
    time_min = 120
    extra = { account = "lab", qos = "normal", constraint = "a100" }   # any sbatch option

    [tasks.digits]
    kind = "timm"                    # timm | fairseq
    data = "data/digits"
    prepare = ["python", "-m", "timm_ext.digits", "{data}", "--size", "16"]   # run if data is missing
    epochs = 6                       # budget: epochs, and optionally max_time_min
    args = { model = "cifar_resnet18_w16", img_size = 16 }                   # python -m timm_ext.train options

    [tasks.digits.optimizers.fngd]
    lr = [0.1, 0.05]
    damping = 1.0

    [tasks.digits.optimizers."fngd:layer"]   # NAME:VARIANT = another grid of the same optimizer
    lr = 0.1
    coefficients = "layer"

A task can take its settings and optimizers from a tuning result (``python -m fngd_slurm tune``,
see fngd_slurm.tune) instead: ``tuned = "docs/tuning/tune.json"`` runs every optimizer's chosen
configuration with the tuned task's own settings (kind, data, epochs, args: none may be given
beside it); ``tuned = { result = "...", optimizers = ["fngd"] }`` only those (``[]``: none, only the
variants that follow); a variant table
``[tasks.X.optimizers."fngd:layer"]`` then changes only the options it names in fngd's chosen
configuration (an ablation of the tuned configuration). ``epochs`` may be set beside ``tuned``: the
chosen configurations at another budget.

A longer budget need not redo the shorter one: ``extends = "results/tune-corpus"`` (a sweep
directory) starts each run that has not started from the same configuration's finished shorter run
there (same task, settings, optimizer, hyperparameters, seed and data; the longest one), copying its
checkpoints, log and record; the run then resumes after that run's last epoch, as after a
preemption (the record's attempts name the run it continued). fairseq tasks only: their schedules
count updates; timm's are laid out over the epoch budget, so a longer timm run is not a
continuation of a shorter one.

Task kinds are the entries of ``RUNNERS``: the module that runs one training run of that host
and knows its optimizers. ``timm`` runs ``python -m timm_ext.train`` (``args``: its options),
``fairseq`` runs ``python -m fairseq_ext.translate`` (``args``: fairseq-train options). Optimizer
names are the host's: timm's registry (fngd, kfac, sgd, momentum, adamw, ...) and fairseq's
(fngd, kfac, adam, sgd, nag, ...; ``adamw`` means fairseq's adam, which decouples weight decay).
Every error names the file, the key and what is allowed, before anything runs.

A runner module provides two functions (a third host is one entry here and these two there):

    optimizers() -> {name: set of option names, or None when the host checks them itself}
    sweep_command(*, python, data, run_dir, run_id, task, optimizer, hparams, seed, epochs,
                  max_time_min, args, threads, gpus) -> the command line of one run

This module imports neither: a sweep is checked against its hosts (``load(check=True)``, which
imports them, and torch) only where runs are planned; ``--status`` reads the run directories.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import tune as _tune

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# task kind -> the module that runs it (see the module docstring)
RUNNERS = {"timm": "timm_ext.train", "fairseq": "fairseq_ext.translate"}
TASK_KINDS = tuple(RUNNERS)
EXECUTORS = ("local", "slurm")
TOP_KEYS = {"name", "out", "seeds", "executor", "resources", "tasks", "tune"}
EXECUTOR_KEYS = {"kind", "max_parallel", "threads"}
RESOURCE_KEYS = {"partition", "gpus", "cpus", "mem_gb", "time_min", "extra"}
TASK_KEYS = {"kind", "data", "prepare", "epochs", "trial_epochs", "max_time_min", "args", "optimizers", "resources",
             "tuned", "extends"}
# what a task with ``tuned`` takes from the tuning result (only ``epochs`` may be set beside it)
TUNED_KEYS = ("kind", "data", "prepare", "epochs", "max_time_min", "args")
# task kinds whose runs can continue a shorter run of the same configuration (``extends``): fairseq's
# schedules count updates, not the epoch budget; timm's (cosine to --epochs, ...) are laid out over it
EXTENDABLE_KINDS = ("fairseq",)


class SweepError(ValueError):
    """A problem with a sweep file, naming the file and the key."""


@dataclass
class Resources:
    partition: str | None = None
    gpus: int = 0
    cpus: int = 1
    mem_gb: float = 4.0
    time_min: int = 60
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    id: str
    task: str
    kind: str
    optimizer: str
    hparams: dict[str, Any]
    seed: int
    dir: Path
    resources: Resources
    config: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)  # set for the command (thread counts)
    plan: dict[str, Any] = field(default_factory=dict)  # the runner's sweep_command arguments

    @property
    def command(self) -> list[str]:
        """The run's command line, built by its host's runner (imported on first use)."""
        return runner(self.kind).sweep_command(**self.plan)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "task": self.task, "kind": self.kind, "optimizer": self.optimizer,
                "hparams": self.hparams, "seed": self.seed, "command": self.command, "env": self.env,
                "dir": str(self.dir), "resources": vars(self.resources), "config": self.config}


@dataclass
class Task:
    name: str
    kind: str
    data: Path
    prepare: list[str] | None
    epochs: int
    max_time_min: float | None
    args: dict[str, Any]
    optimizers: dict[str, dict[str, Any]]
    resources: Resources
    spec: dict[str, Any] = field(default_factory=dict)  # the task's settings as written (TUNED_KEYS)
    tuned_from: str | None = None  # the tuning result its optimizers come from
    extends: Path | None = None  # a sweep directory whose finished shorter runs this task's runs continue
    trial_epochs: int | None = None  # a tuning sweep's trials run this many epochs (cheaper fidelity)


@dataclass
class Sweep:
    path: Path
    name: str
    out: Path
    seeds: list[int]
    executor: str
    max_parallel: int
    threads: int | None
    tasks: dict[str, Task]
    runs: list[Run] = field(default_factory=list)
    tune: _tune.TuneSpec | None = None
    # tuning sweeps: (task, optimizer) -> its trial runs, in trial order (``runs`` holds them all)
    trials: dict[tuple[str, str], list[Run]] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.out / self.name

    def seed_run(self, task: str, optimizer: str, hparams: dict[str, Any], seed: int) -> Run:
        """The run of one configuration at one seed, at the task's full length (a tuning sweep's
        chosen configuration)."""
        return _run(self, self.tasks[task], optimizer, hparams, seed)

    def trial_run(self, task: str, optimizer: str, hparams: dict[str, Any]) -> Run:
        """A tuning trial: the first seed, at the task's ``trial_epochs`` (its full length if unset)."""
        t = self.tasks[task]
        return _run(self, t, optimizer, hparams, self.seeds[0], t.trial_epochs or t.epochs)


# ----------------------------------------------------------------------------------------- loading
PRESETS = Path(__file__).parent / "presets"


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.toml"))


def runner(kind: str):
    """The runner module of a task kind (``RUNNERS``)."""
    return importlib.import_module(RUNNERS[kind])


def load(path: str | Path, executor: str | None = None, check: bool = True) -> Sweep:
    """Parse, check and expand a sweep file (or a preset's name). ``executor`` overrides
    [executor].kind. Relative paths in the file are relative to the current directory.
    ``check=False`` skips checking optimizer names and options against the hosts (which imports
    them): enough to find the runs' directories."""
    path = Path(path)
    if not path.exists() and (PRESETS / f"{path}.toml").exists():
        path = PRESETS / f"{path}.toml"
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SweepError(f"{path}: no such sweep file") from None
    except tomllib.TOMLDecodeError as e:
        raise SweepError(f"{path}: not valid TOML ({e})") from None
    err = _Errors(path)
    err.keys("", raw, TOP_KEYS)
    name = err.typed("name", raw.get("name", path.stem), str)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        err.fail("name", f"{name!r} may only hold letters, digits, '_', '.', '-'")
    out = Path(err.typed("out", raw.get("out", "results"), str)).absolute()
    seeds = raw.get("seeds", [0])
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        err.fail("seeds", f"{seeds!r}: expected a non-empty list of integers")
    ex = err.typed("executor", raw.get("executor", {}), dict)
    err.keys("executor", ex, EXECUTOR_KEYS)
    kind = executor or ex.get("kind", "local")
    if kind not in EXECUTORS:
        err.fail("executor.kind", f"{kind!r}: allowed {', '.join(EXECUTORS)}")
    max_parallel = err.positive_int("executor.max_parallel", ex.get("max_parallel", 1))
    threads = ex.get("threads")
    if threads is not None:
        threads = err.positive_int("executor.threads", threads)
    base_res = _resources(err, "resources", err.typed("resources", raw.get("resources", {}), dict), Resources())
    tune = None
    if "tune" in raw:
        t = err.typed("tune", raw["tune"], dict)
        err.keys("tune", t, _tune.TUNE_KEYS)
        search_seed = t.get("search_seed", 0)
        if not isinstance(search_seed, int) or isinstance(search_seed, bool) or search_seed < 0:
            err.fail("tune.search_seed", f"{search_seed!r}: expected an integer >= 0")
        rounds = t.get("rounds", 0)
        if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0:
            err.fail("tune.rounds", f"{rounds!r}: expected an integer >= 0")
        tune = _tune.TuneSpec(trials=err.positive_int("tune.trials", t.get("trials")), search_seed=search_seed,
                              rounds=rounds, round_trials=err.positive_int("tune.round_trials",
                                                                           t.get("round_trials", 4)))
    tasks_raw = err.typed("tasks", raw.get("tasks"), dict)
    if not tasks_raw:
        err.fail("tasks", "no tasks: add a [tasks.NAME] table")
    tasks = {t: _task(err, t, spec, base_res, check, tune is not None) for t, spec in tasks_raw.items()}
    sweep = Sweep(path=path, name=name, out=out, seeds=seeds, executor=kind, max_parallel=max_parallel,
                  threads=threads, tasks=tasks, tune=tune)
    sweep.runs = expand(sweep)
    return sweep


class _Errors:
    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, message: str):
        raise SweepError(f"{self.path}: {key}: {message}")

    def keys(self, where: str, table: dict, allowed: set[str]) -> None:
        for k in table:
            if k not in allowed:
                self.fail(f"{where}.{k}" if where else k, f"unknown key; allowed: {', '.join(sorted(allowed))}")

    def typed(self, key: str, value: Any, kind: type) -> Any:
        if value is None or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.fail(key, f"{value!r}: expected {kind.__name__}")
        return value

    def positive_int(self, key: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            self.fail(key, f"{value!r}: expected an integer >= 1")
        return value


def _resources(err: _Errors, where: str, table: dict, base: Resources) -> Resources:
    err.keys(where, table, RESOURCE_KEYS)
    res = Resources(**{**vars(base), "extra": dict(base.extra)})
    if "partition" in table:
        res.partition = err.typed(f"{where}.partition", table["partition"], str)
    if "gpus" in table:
        g = table["gpus"]
        if not isinstance(g, int) or isinstance(g, bool) or not 0 <= g <= 64:
            err.fail(f"{where}.gpus", f"{g!r}: expected an integer from 0 to 64 (GPUs per run, on one node)")
        res.gpus = g
    if "cpus" in table:
        res.cpus = err.positive_int(f"{where}.cpus", table["cpus"])
    if "mem_gb" in table:
        m = table["mem_gb"]
        if not isinstance(m, (int, float)) or isinstance(m, bool) or m <= 0:
            err.fail(f"{where}.mem_gb", f"{m!r}: expected a number > 0")
        res.mem_gb = float(m)
    if "time_min" in table:
        res.time_min = err.positive_int(f"{where}.time_min", table["time_min"])
    if "extra" in table:
        res.extra.update(err.typed(f"{where}.extra", table["extra"], dict))
    return res


def _tuned(err: _Errors, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The task ``name`` of the tuning result ``spec["tuned"]``, merged into ``spec``: the tuned
    task's settings, and its chosen configurations as the optimizers, besides the task's own; a
    variant NAME:X of a tuned optimizer starts from NAME's chosen configuration and changes only
    the options it gives (an ablation of the tuned configuration)."""
    where = f"tasks.{name}.tuned"
    tuned = spec["tuned"]
    only = None
    if isinstance(tuned, dict):  # {result = "...", optimizers = ["fngd"]}: only those chosen ones ([]: none)
        err.keys(where, tuned, {"result", "optimizers"})
        only = tuned.get("optimizers")
        if not (isinstance(only, list) and all(isinstance(o, str) for o in only)):
            err.fail(f"{where}.optimizers", f"{only!r}: expected a list of optimizer names")
        if not only and not spec.get("optimizers"):
            err.fail(f"{where}.optimizers", "[] runs only the variants of this task's table, and it names none")
        tuned = tuned.get("result")
    source = err.typed(where if only is None else f"{where}.result", tuned, str)
    try:
        result = _tune.load_result(source)
    except ValueError as e:
        err.fail(where, str(e))
    task = result["tasks"].get(name)
    if task is None:
        err.fail(where, f"{source} has no task {name!r} (it has: {', '.join(result['tasks'])})")
    for k in TUNED_KEYS:
        if k in spec and k != "epochs":  # epochs: the chosen configurations at another budget
            err.fail(f"tasks.{name}.{k}", f"comes from the tuning result {source}; remove it here")
    for o in only or []:
        if o not in task["optimizers"]:
            err.fail(f"{where}.optimizers", f"{o!r} is not tuned in {source} (tuned: {', '.join(task['optimizers'])})")
    chosen = {o: v["chosen"]["hparams"] for o, v in task["optimizers"].items() if v.get("chosen")}
    missing = [o for o, v in task["optimizers"].items() if not v.get("chosen")]
    if missing:
        err.fail(where, f"{source}: no configuration was chosen for {', '.join(missing)} (its trials are not done)")
    own = spec.get("optimizers", {})
    for o in own:
        if o in chosen:
            err.fail(f"tasks.{name}.optimizers.{o}", f"comes from the tuning result {source}; name a variant "
                                                     f"({o}:NAME) for another configuration")
    own = {o: {**chosen.get(o.split(":")[0], {}), **hp} if isinstance(hp, dict) else hp for o, hp in own.items()}
    if only is not None:
        chosen = {o: hp for o, hp in chosen.items() if o in only}
    return {**{k: v for k, v in task["settings"].items() if v is not None}, **spec,
            "optimizers": {**chosen, **own}}


def _task(err: _Errors, name: str, spec: Any, base_res: Resources, check: bool, tuning: bool = False) -> Task:
    where = f"tasks.{name}"
    if not re.fullmatch(r"[A-Za-z0-9_.]+", name):
        err.fail(where, "task names may only hold letters, digits, '_', '.'")
    spec = err.typed(where, spec, dict)
    err.keys(where, spec, TASK_KEYS)
    tuned_from = None
    if "tuned" in spec:
        if tuning:
            err.fail(f"{where}.tuned", "a tuning sweep ([tune]) searches its own configurations")
        tuned_from = spec["tuned"]
        spec = _tuned(err, name, spec)
    kind = spec.get("kind")
    if kind not in TASK_KINDS:
        err.fail(f"{where}.kind", f"{kind!r}: allowed {', '.join(TASK_KINDS)}")
    data = err.typed(f"{where}.data", spec.get("data"), str)
    prepare = spec.get("prepare")
    if prepare is not None and not (isinstance(prepare, list) and prepare and all(isinstance(a, str) for a in prepare)):
        err.fail(f"{where}.prepare", f"{prepare!r}: expected a command as a list of strings")
    epochs = err.positive_int(f"{where}.epochs", spec.get("epochs"))
    trial_epochs = spec.get("trial_epochs")
    if trial_epochs is not None:
        if not tuning:
            err.fail(f"{where}.trial_epochs", "only a tuning sweep ([tune]) has trials")
        trial_epochs = err.positive_int(f"{where}.trial_epochs", trial_epochs)
        if trial_epochs > epochs:
            err.fail(f"{where}.trial_epochs", f"{trial_epochs} is more than the task's epochs ({epochs})")
    max_time = spec.get("max_time_min")
    if max_time is not None and (not isinstance(max_time, (int, float)) or max_time <= 0):
        err.fail(f"{where}.max_time_min", f"{max_time!r}: expected a number > 0")
    args = err.typed(f"{where}.args", spec.get("args", {}), dict)
    opts = err.typed(f"{where}.optimizers", spec.get("optimizers"), dict)
    if not opts:
        err.fail(f"{where}.optimizers", "no optimizers: add [tasks.NAME.optimizers.fngd] (or another)")
    known = runner(kind).optimizers() if check else None
    for opt, hp in opts.items():
        base = opt.split(":")[0]
        if not re.fullmatch(r"[A-Za-z0-9_]+(:[A-Za-z0-9_.]+)?", opt) or (known is not None and base not in known):
            allowed = ", ".join(sorted(known)) if known is not None else "letters, digits, '_'"
            err.fail(f"{where}.optimizers.{opt}", f"unknown {kind} optimizer; allowed: {allowed} "
                                                  f"(or NAME:VARIANT for another grid of NAME)")
        err.typed(f"{where}.optimizers.{opt}", hp, dict)
        for k, v in hp.items():
            fields = None if known is None else known[base]
            if fields is not None and k not in fields:
                err.fail(f"{where}.optimizers.{opt}.{k}",
                         f"not an option of {kind}'s {base}; allowed: {', '.join(sorted(fields))}")
            if tuning:
                _tune.parse_axis(f"{where}.optimizers.{opt}.{k}", v, err.fail)
                continue
            for value in v if isinstance(v, list) else [v]:
                if isinstance(value, (dict, list)):
                    err.fail(f"{where}.optimizers.{opt}.{k}", f"{value!r}: expected a value or a list of values"
                             + (" (ranges such as {log = [lo, hi]} need a [tune] table)" if isinstance(value, dict)
                                else ""))
            if isinstance(v, list) and not v:
                err.fail(f"{where}.optimizers.{opt}.{k}", "an empty list gives no runs")
    if "data" in args:
        err.fail(f"{where}.args.data", "set data with the task's data key")
    extends = spec.get("extends")
    if extends is not None:
        if tuning:
            err.fail(f"{where}.extends", "a tuning sweep's trials start from scratch")
        if kind not in EXTENDABLE_KINDS:
            err.fail(f"{where}.extends", f"{kind} runs cannot continue shorter runs (their lr schedules are laid "
                                         f"out over the epoch budget); allowed for: {', '.join(EXTENDABLE_KINDS)}")
        extends = Path(err.typed(f"{where}.extends", extends, str)).absolute()
    res = _resources(err, f"{where}.resources", err.typed(f"{where}.resources", spec.get("resources", {}), dict),
                     base_res)
    return Task(name=name, kind=kind, data=Path(data).absolute(),
                prepare=prepare, epochs=epochs, max_time_min=max_time, args=args, optimizers=opts, resources=res,
                spec={k: spec.get(k) for k in TUNED_KEYS}, tuned_from=tuned_from, trial_epochs=trial_epochs,
                extends=extends)


# ----------------------------------------------------------------------------------------- expansion
def flags(options: dict[str, Any]) -> list[str]:
    """{"max_tokens": 2000, "share_all_embeddings": true} -> ["--max-tokens", "2000", "--share-all-embeddings"]
    (the runners' sweep_command turn options into flags with it)."""
    out: list[str] = []
    for k, v in options.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif v is False or v is None:
            continue
        elif isinstance(v, list):
            out += [flag, *map(str, v)]
        else:
            out += [flag, v if isinstance(v, str) else json.dumps(v)]
    return out


def _label(hp: dict[str, Any]) -> str:
    parts = [f"{k}{v}" for k, v in hp.items()]
    return re.sub(r"[^A-Za-z0-9_.=-]", "", "-".join(parts))[:80]


def expand(sweep: Sweep) -> list[Run]:
    """The sweep's runs: every grid point at every seed; in a tuning sweep, the trials (at the
    first seed; ``sweep.trials`` groups them) -- the chosen configurations' other seeds are
    ``tune_seed_runs``, known once the trials are done."""
    runs = []
    for task in sweep.tasks.values():
        for opt, grid in task.optimizers.items():
            if sweep.tune is not None:
                points = _tune.trial_points(grid, sweep.tune.trials, sweep.tune.search_seed)
                trials = [sweep.trial_run(task.name, opt, hp) for hp in points]
                sweep.trials[(task.name, opt)] = trials
                runs += trials
                continue
            axes = {k: v if isinstance(v, list) else [v] for k, v in grid.items()}
            for values in itertools.product(*axes.values()):
                hp = dict(zip(axes, values))
                for seed in sweep.seeds:
                    runs.append(_run(sweep, task, opt, hp, seed))
    ids = [r.id for r in runs]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise SweepError(f"{sweep.path}: two runs share an id ({sorted(dup)[0]}); make the grids distinct")
    return runs


def by_seed(runs: list) -> list:
    """The runs seed by seed (a sweep's, or a tuning's chosen configurations'): every optimizer's
    first seed before any optimizer's second, so a sweep stopped early (a session's end, a
    preemption, a budget) leaves a side-by-side comparison at fewer seeds rather than some
    optimizers at every seed and others at none. Within a seed, the sweep file's order."""
    return sorted(runs, key=lambda r: r.seed)


def _run(sweep: Sweep, task: Task, name: str, hp: dict[str, Any], seed: int, epochs: int | None = None) -> Run:
    opt = name.split(":")[0]
    epochs = epochs or task.epochs
    # the data path as the sweep file writes it (relative to where the sweep runs, as ``out`` is), not
    # resolved: a checkout moved elsewhere, or a cluster that mounts it at another path, keeps its run
    # ids and resumes its runs (ids before 2026-12-04 hashed the absolute path)
    data = task.spec.get("data") or str(task.data)
    config = {"sweep": sweep.name, "task": task.name, "kind": task.kind, "data": data,
              "epochs": epochs, "max_time_min": task.max_time_min, "args": task.args, "optimizer": opt,
              "variant": name,
              "hparams": hp, "seed": seed, "gpus": task.resources.gpus}
    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:6]
    run_id = f"{task.name}-{name.replace(':', '.')}-{_label(hp)}-s{seed}-{digest}".replace("--", "-")
    run_dir = sweep.root / "runs" / run_id
    # one OpenMP/MKL pool per run, sized to its share of the machine: runs side by side with the
    # libraries' default (all cores each) oversubscribe the cores, which slowed a 2-core machine 7x
    threads = sweep.threads or (task.resources.cpus if sweep.executor == "slurm" else None)
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}
    plan = dict(python=[sys.executable], data=str(task.data), run_dir=str(run_dir), run_id=run_id, task=task.name,
                optimizer=opt, hparams=hp, seed=seed, epochs=epochs, max_time_min=task.max_time_min,
                args=task.args, threads=sweep.threads, gpus=task.resources.gpus)
    return Run(id=run_id, task=task.name, kind=task.kind, optimizer=opt, hparams=hp, seed=seed, dir=run_dir,
               resources=task.resources, config=config, env=env, plan=plan)
