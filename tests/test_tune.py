"""Tuning sweeps (fngd_slurm.tune): the trial points, the checks of a [tune] file, the choice on
validation from run records, the result a report sweep loads (``tuned = ...``), and one real
tuning sweep of timm_ext.train on digits, trials and seeds, end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from fngd_slurm import executors, tune
from fngd_slurm import sweep as sw
from test_sweep import cli, write  # noqa: E402

from fngd_records import RunRecord


# ----------------------------------------------------------------------------------------- points
def test_seed_runs_go_seed_by_seed_so_an_early_stop_leaves_a_side_by_side_comparison():
    from types import SimpleNamespace as R
    runs = [R(optimizer=o, seed=s) for o in ("fngd", "kfac", "adamw") for s in (0, 1, 2)]
    order = [(r.seed, r.optimizer) for r in sw.by_seed(runs)]
    assert order == [(s, o) for s in (0, 1, 2) for o in ("fngd", "kfac", "adamw")]


def test_trial_points_are_halton_points_of_the_declared_space():
    space = {"lr": {"log": [0.01, 1.0]}, "normalize": ["sum", "none"], "momentum": 0.9}
    pts = tune.trial_points(space, 4)
    # lr: base-2 radical inverses 1/2, 1/4, 3/4, 1/8 of the log range; normalize: base 3 (1/3, 2/3, 1/9, 4/9)
    assert [p["lr"] for p in pts] == [0.1, 0.0316, 0.316, 0.0178]
    assert [p["normalize"] for p in pts] == ["sum", "none", "sum", "sum"]
    assert all(p["momentum"] == 0.9 for p in pts)
    assert tune.trial_points(space, 4) == pts  # deterministic
    shifted = tune.trial_points(space, 4, search_seed=1)
    assert shifted != pts and all(0.01 <= p["lr"] <= 1.0 for p in shifted)
    lin = tune.trial_points({"wd": {"uniform": [0.0, 0.1]}}, 3)
    assert [p["wd"] for p in lin] == [0.05, 0.025, 0.075]
    # only choices: never more trials than distinct points, no repeats
    few = tune.trial_points({"momentum": [0.0, 0.9]}, 5)
    assert sorted(p["momentum"] for p in few) == [0.0, 0.9]


TUNE_FILE = """
    out = "{out}"
    seeds = [0, 1, 2]
    [tune]
    trials = 3
    [tasks.img]
    kind = "timm"
    data = "d"
    epochs = 2
    args = {{ model = "test_resnet" }}
    [tasks.img.optimizers.fngd]
    lr = {{ log = [0.01, 1.0] }}
    damping = [0.1, 1.0]
    [tasks.img.optimizers.sgd]
    lr = {{ log = [0.01, 1.0] }}
    momentum = [0.0, 0.9]
    """


def test_a_tuning_sweep_runs_the_same_number_of_trials_per_optimizer_at_the_first_seed(tmp_path):
    s = sw.load(write(tmp_path, TUNE_FILE.format(out=tmp_path)))
    assert s.tune == tune.TuneSpec(trials=3) and len(s.runs) == 6
    assert {k: len(v) for k, v in s.trials.items()} == {("img", "fngd"): 3, ("img", "sgd"): 3}
    assert all(r.seed == 0 for r in s.runs)
    assert [r.hparams for r in s.trials[("img", "fngd")]] == [
        {"lr": 0.1, "damping": 0.1}, {"lr": 0.0316, "damping": 1.0}, {"lr": 0.316, "damping": 0.1}]


BAD = [
    ("[tune]\ntrials = 0\n", "tune.trials: 0: expected an integer >= 1"),
    ("[tune]\ntrials = 2\nbudget = 3\n",
     "tune.budget: unknown key; allowed: round_trials, rounds, search_seed, trials"),
    ("[tune]\ntrials = 2\nsearch_seed = -1\n", "tune.search_seed: -1: expected an integer >= 0"),
]


@pytest.mark.parametrize("head,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_tune_tables_are_named(tmp_path, head, message):
    path = write(tmp_path, head + "[tasks.a]\nkind='timm'\ndata='.'\nepochs=1\n[tasks.a.optimizers.sgd]\nlr=0.1\n")
    with pytest.raises(sw.SweepError, match=message):
        sw.load(path)


@pytest.mark.parametrize("value,message", [
    ("{ log = [0.0, 1.0] }", r"log = \[0.0, 1.0\]: expected \[lo, hi\] with lo < hi and lo > 0"),
    ("{ log = [1.0, 0.1] }", r"log = \[1.0, 0.1\]: expected \[lo, hi\] with lo < hi"),
    ("{ grid = [1, 2] }", r".*: a range is \{log = \[lo, hi\]\} or \{uniform = \[lo, hi\]\}"),
])
def test_bad_ranges_are_named(tmp_path, value, message):
    path = write(tmp_path, "[tune]\ntrials = 2\n[tasks.a]\nkind='timm'\ndata='.'\nepochs=1\n"
                           f"[tasks.a.optimizers.sgd]\nlr = {value}\n")
    with pytest.raises(sw.SweepError, match="tasks.a.optimizers.sgd.lr: " + message):
        sw.load(path)


def test_a_range_outside_a_tuning_sweep_is_an_error(tmp_path):
    path = write(tmp_path, "[tasks.a]\nkind='timm'\ndata='.'\nepochs=1\n"
                           "[tasks.a.optimizers.sgd]\nlr = {log = [0.1, 1]}\n")
    with pytest.raises(sw.SweepError, match=r"tasks.a.optimizers.sgd.lr: .*need a \[tune\] table"):
        sw.load(path)


# ----------------------------------------------------------------------------------------- choice
def fake_record(run: sw.Run, values: list[float | None], status: str = "done", mode: str = "max") -> None:
    """A run record as a runner writes it, with the given validation values per epoch."""
    rec = RunRecord(run.dir / "record.json").start(run=run.id, task=run.task, kind=run.kind, optimizer=run.optimizer,
                                                   hparams=run.hparams, seed=run.seed, config=run.config,
                                                   metric="top1", mode=mode)
    for i, v in enumerate(values):
        rec.epoch(epoch=i + 1, step=10 * (i + 1), time=i + 1.0, wall=i + 1.5, epoch_time=1.0, train_loss=1.0,
                  val_metric=v)
    if status == "done":
        rec.finish(val_metric=values[-1], test_top1=values[-1])
    else:
        rec.fail("boom")


def test_the_choice_is_the_best_validation_value_over_epochs_and_failed_trials_lose(tmp_path):
    s = sw.load(write(tmp_path, TUNE_FILE.format(out=tmp_path)))
    f, g = s.trials[("img", "fngd")], s.trials[("img", "sgd")]
    fake_record(f[0], [50.0, 70.0])
    fake_record(f[1], [60.0, 90.0, 80.0])  # best over epochs: 90 (its best checkpoint), though it ends at 80
    fake_record(f[2], [99.0], status="failed")  # a failed trial loses, whatever it reached
    fake_record(g[0], [math.nan, math.nan])  # diverged: no finite value
    fake_record(g[1], [40.0])
    state = tune.state(s, executors.status_of, executors.record_of)
    fo = state["tasks"]["img"]["optimizers"]["fngd"]
    assert fo["chosen"]["run"] == f[1].id and fo["chosen"]["value"] == 90.0
    assert fo["chosen"]["edges"] == ["lr lowest tried"]  # lr 0.0316 of 0.1, 0.0316, 0.316
    assert [t["value"] for t in fo["trials"]] == [70.0, 90.0, None]
    # the chosen trial is the configuration's first seed; the others are new runs of the same point
    assert [r.id for r in fo["seed_runs"]][0] == f[1].id and [r.seed for r in fo["seed_runs"]] == [0, 1, 2]
    assert all(r.hparams == f[1].hparams for r in fo["seed_runs"])
    assert [x["status"] for x in fo["seeds"]] == ["done", "not started", "not started"]
    # sgd's third trial never ran: no choice yet
    assert state["tasks"]["img"]["optimizers"]["sgd"]["chosen"] is None
    fake_record(g[2], [30.0])
    state = tune.state(s, executors.status_of, executors.record_of)
    assert state["tasks"]["img"]["optimizers"]["sgd"]["chosen"]["run"] == g[1].id
    out = tmp_path / "tuning.json"
    tune.write_result(out, tune.public(state))
    data = tune.load_result(out)
    assert data["protocol"] == {"trials": 3, "search_seed": 0, "seeds": [0, 1, 2], "rounds": 0, "round_trials": 4,
                                "selection": tune.SELECTION}
    assert data["sweep"]["text"] == s.path.read_text() and len(data["sweep"]["sha256"]) == 64
    md = out.with_suffix(".md").read_text()
    assert f"| 2 **chosen** | 0 | 0.0316 | 1 | 90 | done | `{f[1].id}` |" in md
    assert "Chosen at the edge of the trials: lr lowest tried" in md
    lines = md.splitlines()
    for i, line in enumerate(lines):  # no text inside a table: a row follows the rule or another row
        if line.startswith("|") and not (i + 1 < len(lines) and lines[i + 1].startswith("|---")):
            assert lines[i - 1].startswith("|"), line


def test_min_mode_metrics_choose_the_lowest(tmp_path):
    trials = [{"value": 3.0}, {"value": 2.0}, {"value": None}, {"value": 2.0}]
    assert tune.choose(trials, "min") is trials[1] and tune.choose(trials, "max") is trials[0]
    assert tune.choose([{"value": None}], "max") is None


# ----------------------------------------------------------------------------------------- edge rounds
def test_next_round_searches_beyond_an_edge_by_half_the_declared_width_up_to_the_limit():
    space = {"lr": {"log": [0.01, 1.0], "limit": [0.001, 3.0]}, "wd": {"uniform": [0.0, 0.1]}, "m": [0.0, 0.9]}
    trials = [{"hparams": {"lr": lr, "wd": wd, "m": 0.9}}
              for lr, wd in ((0.1, 0.05), (1.0, 0.04), (0.03, 0.08), (0.3, 0.02))]
    wider, at_limit = tune.next_round(space, trials, trials[1])  # highest lr, interior wd
    # log axis: from the chosen value up by sqrt(1.0 / 0.01) = 10, clipped to the limit 3.0; wd and m stay fixed
    assert wider == {"lr": {"log": [1.0, 3.0]}, "wd": 0.04, "m": 0.9} and at_limit == []
    wider, _ = tune.next_round(space, trials, trials[2])  # lowest lr (0.03 -> 0.003) and highest wd (+0.05)
    assert wider["lr"] == {"log": [0.003, 0.03]} and wider["wd"] == {"uniform": [0.08, 0.13]}
    assert tune.next_round(space, trials, trials[0]) == (None, [])  # interior on every axis: done
    # at the limit already: nothing to widen, and it is said
    at = trials + [{"hparams": {"lr": 3.0, "wd": 0.05, "m": 0.9}}]
    wider, at_limit = tune.next_round(space, at, at[4])
    assert wider is None and at_limit == ["lr highest tried, at its limit 3"]
    # no limit declared: a log axis widens without bound
    free = {"lr": {"log": [0.01, 1.0]}}
    assert tune.next_round(free, trials, trials[1])[0]["lr"] == {"log": [1.0, 10.0]}


ROUNDS_FILE = TUNE_FILE.replace("trials = 3\n", "trials = 3\n    rounds = 2\n    round_trials = 2\n").replace(
    "epochs = 2\n", "epochs = 4\n    trial_epochs = 2\n")


def test_an_edge_choice_launches_a_declared_round_and_the_seeds_run_at_full_length(tmp_path):
    s = sw.load(write(tmp_path, ROUNDS_FILE.format(out=tmp_path)))
    assert s.tune == tune.TuneSpec(trials=3, rounds=2, round_trials=2)
    f = s.trials[("img", "fngd")]
    assert all(r.plan["epochs"] == 2 for r in s.runs)  # trials at the cheaper fidelity
    fake_record(f[0], [50.0])
    fake_record(f[1], [60.0])
    fake_record(f[2], [90.0])  # lr 0.316, the highest tried: an edge
    st = tune.state(s, executors.status_of, executors.record_of)["tasks"]["img"]["optimizers"]["fngd"]
    assert st["chosen"] is None and len(st["rounds"]) == 1
    assert st["rounds"][0]["space"]["lr"] == {"log": [0.316, 3.16]}  # x sqrt(100)
    new = st["trial_runs"][3:]
    assert len(new) == 2 and all(r.plan["epochs"] == 2 and r.hparams["damping"] == 0.1 for r in new)
    assert all(0.316 <= r.hparams["lr"] <= 3.16 for r in new)
    assert [r.hparams["lr"] for r in new] == [0.999, 0.562]  # Halton points 1/2 and 1/4 of the wider range
    fake_record(new[0], [20.0])
    fake_record(new[1], [95.0])  # the chosen point, 0.562, is interior now (0.316 < 0.562 < 0.999)
    st = tune.state(s, executors.status_of, executors.record_of)["tasks"]["img"]["optimizers"]["fngd"]
    assert st["chosen"]["run"] == new[1].id and st["chosen"]["edges"] == [] and len(st["rounds"]) == 1
    assert [t["round"] for t in st["trials"]] == [0, 0, 0, 1, 1]
    # every seed, the first included, runs the chosen point at the task's full length
    assert [r.plan["epochs"] for r in st["seed_runs"]] == [4, 4, 4] and new[1].id not in {r.id for r in st["seed_runs"]}
    assert [r.seed for r in st["seed_runs"]] == [0, 1, 2]


def test_rounds_stop_when_used_up_and_say_so(tmp_path):
    s = sw.load(write(tmp_path, ROUNDS_FILE.replace("rounds = 2", "rounds = 1").format(out=tmp_path)))
    f = s.trials[("img", "fngd")]
    for run, v in zip(f, (50.0, 60.0, 90.0)):
        fake_record(run, [v])
    state = tune.state(s, executors.status_of, executors.record_of)
    new = state["tasks"]["img"]["optimizers"]["fngd"]["trial_runs"][3:]
    best, other = sorted(new, key=lambda r: -r.hparams["lr"])  # the round's winner: its highest lr, an edge again
    fake_record(best, [99.0])
    fake_record(other, [20.0])
    c = tune.state(s, executors.status_of, executors.record_of)["tasks"]["img"]["optimizers"]["fngd"]["chosen"]
    assert c["run"] == best.id and c["edges"] == ["lr highest tried"] and c["rounds_exhausted"]
    md = tune.markdown(tune.public(tune.state(s, executors.status_of, executors.record_of)))
    assert "Edge round 1" in md and "the rounds are used up" in md


@pytest.mark.parametrize("body,message", [
    ("trial_epochs = 3\n", "tasks.a.trial_epochs: 3 is more than the task's epochs \\(2\\)"),
    ("trial_epochs = 0\n", "tasks.a.trial_epochs: 0: expected an integer >= 1"),
])
def test_bad_trial_epochs_are_named(tmp_path, body, message):
    path = write(tmp_path, "[tune]\ntrials = 2\n[tasks.a]\nkind='timm'\ndata='.'\nepochs=2\n" + body
                 + "[tasks.a.optimizers.sgd]\nlr = {log = [0.1, 1]}\n")
    with pytest.raises(sw.SweepError, match=message):
        sw.load(path)
    plain = write(tmp_path, "[tasks.a]\nkind='timm'\ndata='.'\nepochs=2\ntrial_epochs=1\n"
                  "[tasks.a.optimizers.sgd]\nlr = 0.1\n", name="plain.toml")
    with pytest.raises(sw.SweepError, match="tasks.a.trial_epochs: only a tuning sweep"):
        sw.load(plain)


# ----------------------------------------------------------------------------------------- tuned = ...
def tuned_result(tmp_path: Path) -> Path:
    s = sw.load(write(tmp_path, TUNE_FILE.format(out=tmp_path)))
    for i, run in enumerate(s.runs):
        fake_record(run, [10.0 * i])
    out = tmp_path / "tuning.json"
    tune.write_result(out, tune.public(tune.state(s, executors.status_of, executors.record_of)))
    return out


def test_a_report_task_runs_the_chosen_configurations_with_the_tuned_settings(tmp_path):
    result = tuned_result(tmp_path)
    path = write(tmp_path, f"""
        seeds = [0, 1]
        [tasks.img]
        tuned = "{result}"
        [tasks.img.optimizers."sgd:nomomentum"]
        momentum = 0.0
        [tasks.img.optimizers."adamw:x"]
        lr = 0.001
        """, name="report.toml")
    s = sw.load(path)
    task = s.tasks["img"]
    assert (task.kind, task.epochs, task.args, task.data) == ("timm", 2, {"model": "test_resnet"}, Path("d").absolute())
    chosen = json.loads(result.read_text())["tasks"]["img"]["optimizers"]
    # a variant of a tuned optimizer changes only what it gives; another optimizer's is as written
    assert task.optimizers == {"fngd": chosen["fngd"]["chosen"]["hparams"], "sgd": chosen["sgd"]["chosen"]["hparams"],
                               "sgd:nomomentum": {**chosen["sgd"]["chosen"]["hparams"], "momentum": 0.0},
                               "adamw:x": {"lr": 0.001}}
    assert task.optimizers["fngd"] == {"lr": 0.316, "damping": 0.1}  # the third trial scored highest
    assert len(s.runs) == 4 * 2
    # only some of the tuned optimizers: the others are left out, their variants still start from them
    path.write_text(path.read_text().replace(f'tuned = "{result}"', f'tuned = {{ result = "{result}", '
                                                                    'optimizers = ["fngd"] }'))
    assert set(sw.load(path).tasks["img"].optimizers) == {"fngd", "sgd:nomomentum", "adamw:x"}
    # none of them (``[]``): only the variants run, still from their tuned configurations
    path.write_text(path.read_text().replace('optimizers = ["fngd"]', 'optimizers = []'))
    task = sw.load(path).tasks["img"]
    assert set(task.optimizers) == {"sgd:nomomentum", "adamw:x"}
    assert task.optimizers["sgd:nomomentum"] == {**chosen["sgd"]["chosen"]["hparams"], "momentum": 0.0}
    # epochs beside tuned: the chosen configurations at another budget, the other settings as tuned
    path.write_text(path.read_text().replace("[tasks.img]\n", "[tasks.img]\nepochs = 5\n"))
    s = sw.load(path)
    assert (s.tasks["img"].epochs, s.tasks["img"].args) == (5, {"model": "test_resnet"})
    assert {r.config["epochs"] for r in s.runs} == {5} and all("--epochs 5" in " ".join(r.command) for r in s.runs)


@pytest.mark.parametrize("body,message", [
    ('[tasks.img]\ntuned = "{r}"\nargs = {{ model = "resnet18" }}\n', "tasks.img.args: comes from the tuning result"),
    ('[tasks.img]\ntuned = "{r}"\nmax_time_min = 3\n', "tasks.img.max_time_min: comes from the tuning result"),
    ('[tasks.img]\ntuned = "{r}"\nextends = "results/x"\n', "tasks.img.extends: timm runs cannot continue"),
    ('[tasks.other]\ntuned = "{r}"\n', "has no task 'other' \\(it has: img\\)"),
    ('[tasks.img]\ntuned = "{r}"\n[tasks.img.optimizers.fngd]\nlr = 1\n',
     "tasks.img.optimizers.fngd: comes from the tuning result .* name a variant"),
    ('[tasks.img]\ntuned = "{r}.missing"\n', "tasks.img.tuned: .*not a readable tuning result"),
    ('[tasks.img]\ntuned = {{ result = "{r}", optimizers = ["lbfgs"] }}\n',
     "tasks.img.tuned.optimizers: 'lbfgs' is not tuned in .* \\(tuned: fngd, sgd\\)"),
    ('[tasks.img]\ntuned = {{ result = "{r}", optimizers = [] }}\n',
     "tasks.img.tuned.optimizers: \\[\\] runs only the variants .* names none"),
])
def test_tuned_tasks_refuse_settings_that_would_drift(tmp_path, body, message):
    result = tuned_result(tmp_path)
    path = write(tmp_path, body.format(r=result), name="report.toml")
    with pytest.raises(sw.SweepError, match=message):
        sw.load(path)


# ----------------------------------------------------------------------------------------- real runs
def test_tune_cli_runs_trials_chooses_on_validation_then_runs_the_seeds(tmp_path, digits):
    path = write(tmp_path, f"""
        name = "t"
        out = "{tmp_path / 'results'}"
        seeds = [0, 1]
        [executor]
        max_parallel = 2
        threads = 1
        [tune]
        trials = 2
        [tasks.digits]
        kind = "timm"
        data = "{digits}"
        epochs = 1
        args = {{ model = "test_resnet", img_size = 16, batch_size = 128 }}
        [tasks.digits.optimizers.sgd]
        lr = {{ log = [0.001, 1.0] }}
        """, name="t.toml")
    dry = cli(str(path), "--dry-run", cwd=tmp_path).stdout
    assert "2 trials for each of 1 optimizers" in dry and dry.count("-m timm_ext.train") == 2
    out = cli(str(path), cwd=tmp_path).stdout
    assert "2 runs finished, 0 failed" in out and "seeds: 1 runs to launch" in out
    result = tune.load_result(tmp_path / "results" / "t" / "tuning.json")
    sgd = result["tasks"]["digits"]["optimizers"]["sgd"]
    recs = {r["run"]: r for r in (json.loads(p.read_text())
                                  for p in (tmp_path / "results" / "t").glob("runs/*/record.json"))}
    assert len(recs) == 3
    # the choice is the trial whose record has the higher validation top1 (lr 0.0316 vs 0.00178)
    values = {t["run"]: max(e["val_metric"] for e in recs[t["run"]]["epochs"]) for t in sgd["trials"]}
    assert sgd["chosen"]["run"] == max(values, key=values.get)
    assert [s["status"] for s in sgd["seeds"]] == ["done", "done"]
    seed1 = recs[sgd["seeds"][1]["run"]]
    assert seed1["seed"] == 1 and seed1["config"]["hparams"] == sgd["chosen"]["hparams"]
    again = cli(str(path), cwd=tmp_path).stdout
    assert "trials: none left to launch" in again and again.count("nothing to launch") == 1
    status = cli(str(path), "--status", cwd=tmp_path).stdout
    assert "2 runs: 2 done" in status and "chosen configurations, every seed:" in status


# ----------------------------------------------------------------------------------------- presets
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sw.presets())
def test_every_preset_loads_from_the_repository_root(name, monkeypatch):
    """The presets' relative paths (data, tuning results) are the repository root's, where the
    README runs them; every one is checked against the real hosts' optimizer options."""
    pytest.importorskip("fairseq")
    monkeypatch.chdir(REPO)
    s = sw.load(name)
    assert s.runs and all(r.command for r in s.runs[:3])
    if s.tune is not None:
        assert {len(v) for v in s.trials.values()} == {s.tune.trials} and len(s.seeds) == 3


def test_the_paper_preset_dry_runs_on_slurm_with_the_tuning_protocol():
    pytest.importorskip("fairseq")
    out = cli("paper", "--dry-run", cwd=REPO).stdout
    assert "tuning sweep paper: 8 trials for each of 8 optimizers (64 trial runs at seed 0)" in out
    assert "then the chosen configurations at seeds 0, 1, 2" in out
    assert out.count("[not started; 1 GPU, 8 CPU, 32 GB, 240 min]") == 64
    assert out.count("-m fairseq_ext.translate") == 32 and out.count("-m timm_ext.train") == 32
