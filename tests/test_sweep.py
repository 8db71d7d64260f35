"""fngd_slurm sweeps with the local executor: checks before anything runs, the plan, real runs of
python -m timm_ext.train on real digits, skipping done runs, and resuming a killed run to the same
numbers as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("timm")
from fngd_slurm import sweep as sw  # noqa: E402

ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed project, as users run it


def cli(*args: str, cwd: Path, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "fngd_slurm", *args], capture_output=True, text=True, cwd=cwd,
                         env=ENV, timeout=timeout)
    if check:
        assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return res



def write(tmp_path: Path, body: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def timm_sweep(tmp_path: Path, digits: Path, name: str, optimizers: str, epochs: int = 2) -> Path:
    return write(tmp_path, f"""
        name = "{name}"
        out = "{tmp_path / 'results'}"
        seeds = [0]
        [executor]
        max_parallel = 2
        threads = 1
        [tasks.digits]
        kind = "timm"
        data = "{digits}"
        epochs = {epochs}
        args = {{ model = "test_resnet", img_size = 16, batch_size = 128, test_split = "test" }}
        {optimizers}
        """, name=f"{name}.toml")


# ----------------------------------------------------------------------------------------- checks
BAD = [
    ("colour = 1\n[tasks.a]\nkind='timm'\n", "colour: unknown key; allowed:"),
    ("[tasks.a]\nkind='jax'\ndata='.'\nepochs=1\n", "tasks.a.kind: 'jax': allowed timm, fairseq"),
    ("[tasks.a]\nkind='timm'\ndata='.'\nepochs=1\n[tasks.a.optimizers.lbfgsx]\nlr=1\n",
     "tasks.a.optimizers.lbfgsx: unknown timm optimizer; allowed:"),
    ("[tasks.a]\nkind='timm'\ndata='.'\nepochs=0\n[tasks.a.optimizers.fngd]\nlr=1\n",
     "tasks.a.epochs: 0: expected an integer >= 1"),
    ("[tasks.a]\nkind='timm'\ndata='.'\nepochs=1\n[tasks.a.resources]\ngpus=-1\n[tasks.a.optimizers.fngd]\nlr=1\n",
     "tasks.a.resources.gpus: -1: expected an integer from 0 to 64"),
    ("[executor]\nkind='cloud'\n[tasks.a]\nkind='timm'\n", "executor.kind: 'cloud': allowed local, slurm"),
    ("[tasks.a]\nkind='timm'\ndata='.'\nepochs=1\n[tasks.a.optimizers.fngd]\nlr=[]\n",
     "tasks.a.optimizers.fngd.lr: an empty list gives no runs"),
    ("[tasks.a]\nkind='timm'\ndata='.'\nepochs=1\n[tasks.a.resources]\nmemory=3\n[tasks.a.optimizers.fngd]\nlr=1\n",
     "tasks.a.resources.memory: unknown key; allowed: cpus, extra, gpus, mem_gb, partition, time_min"),
    ("seeds = 3\n[tasks.a]\nkind='timm'\n", "seeds: 3: expected a non-empty list of integers"),
    ("name = 'a'\n[tasks", "not valid TOML"),
    ("[tasks.a]\nkind='timm'\ndata='.'\nepochs=1\nextends='results/x'\n[tasks.a.optimizers.fngd]\nlr=1\n",
     "tasks.a.extends: timm runs cannot continue shorter runs (their lr schedules are laid out over the epoch budget)"),
]


@pytest.mark.parametrize("body,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_sweep_files_name_file_key_and_allowed_values(tmp_path, body, message):
    path = write(tmp_path, body)
    with pytest.raises(sw.SweepError) as e:
        sw.load(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_fairseq_optimizer_options_are_checked(tmp_path):
    pytest.importorskip("fairseq")
    path = write(tmp_path, "[tasks.t]\nkind='fairseq'\ndata='.'\nepochs=1\n[tasks.t.optimizers.fngd]\ndampng=1\n")
    with pytest.raises(sw.SweepError, match=r"tasks.t.optimizers.fngd.dampng: not an option of fairseq's fngd; "
                                            r"allowed: .*damping"):
        sw.load(path)


def test_grid_expansion_ids_and_launch_commands(tmp_path):
    path = write(tmp_path, """
        seeds = [0, 1, 2]
        [resources]
        gpus = 2
        [tasks.img]
        kind = "timm"
        data = "d"
        epochs = 3
        [tasks.img.optimizers.fngd]
        lr = [0.1, 0.2]
        damping = [1.0, 0.1]
        coefficients = "layer"
        [tasks.img.optimizers.sgd]
        lr = 0.1
        """)
    s = sw.load(path)
    assert len(s.runs) == (2 * 2 + 1) * 3 and len({r.id for r in s.runs}) == len(s.runs)
    fngd = [r for r in s.runs if r.optimizer == "fngd"]
    assert {(r.hparams["lr"], r.hparams["damping"], r.seed) for r in fngd} == {
        (lr, d, seed) for lr in (0.1, 0.2) for d in (1.0, 0.1) for seed in (0, 1, 2)}
    assert fngd[0].env == {}  # local, no [executor] threads: the libraries' defaults
    slurm = sw.load(path, executor="slurm").runs[0]
    assert slurm.env == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # sized to the run's cpus (1)
    cmd = fngd[0].command
    # two GPUs per run: one process per GPU through torchrun; FNGD's own options through --opt-kwargs
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert cmd[cmd.index("--opt-kwargs") + 1:] == ["damping=1.0", "coefficients=layer"]
    # a changed task setting gives new run directories: earlier results are never overwritten
    path.write_text(path.read_text().replace("epochs = 3", "epochs = 4"))
    assert not {r.id for r in s.runs} & {r.id for r in sw.load(path).runs}


def test_run_ids_do_not_depend_on_where_the_checkout_lies(tmp_path, monkeypatch):
    """A checkout moved (or mounted elsewhere on a cluster's nodes) keeps its run ids, so its finished
    runs are found and its unfinished ones resume; the runs still read the data where they are now."""
    body = """
        [tasks.img]
        kind = "timm"
        data = "data/d"
        epochs = 3
        [tasks.img.optimizers.fngd]
        lr = [0.1, 0.2]
        """
    loaded = {}
    for where in ("a", "b/c"):
        (tmp_path / where).mkdir(parents=True)
        monkeypatch.chdir(tmp_path / where)
        loaded[where] = sw.load(write(tmp_path / where, body))
    a, b = loaded["a"].runs, loaded["b/c"].runs
    assert [r.id for r in a] == [r.id for r in b]
    assert a[0].plan["data"] == str(tmp_path / "a" / "data" / "d") and b[0].plan["data"] == str(tmp_path / "b/c/data/d")
    # another data path as written is another run
    other = sw.load(write(tmp_path / "a", body.replace("data/d", "data/e"))).runs
    assert not {r.id for r in other} & {r.id for r in a}


def test_fairseq_launch_uses_fairseqs_own_distributed_spawn(tmp_path):
    pytest.importorskip("fairseq")
    path = write(tmp_path, """
        [tasks.mt]
        kind = "fairseq"
        data = "bin"
        epochs = 5
        max_time_min = 30
        args = { arch = "transformer", share_all_embeddings = true }
        resources = { gpus = 4 }
        [tasks.mt.optimizers.adamw]
        lr = 0.001
        """)
    (run,) = sw.load(path).runs
    cmd = run.command
    train = cmd[cmd.index("--") + 1:]
    assert cmd[1:3] == ["-m", "fairseq_ext.translate"] and "--optimizer-label" in cmd
    assert train[:4] == ["--optimizer", "adam", "--lr", "0.001"]  # adamw = fairseq's adam (decoupled decay)
    assert "--distributed-world-size" in train and train[train.index("--distributed-world-size") + 1] == "4"
    assert "--share-all-embeddings" in train and train[train.index("--stop-time-hours") + 1] == "0.5"


def test_missing_data_is_an_error_before_anything_runs(tmp_path):
    path = write(tmp_path, f"""
        out = "{tmp_path / 'results'}"
        [tasks.img]
        kind = "timm"
        data = "{tmp_path / 'nowhere'}"
        epochs = 1
        [tasks.img.optimizers.sgd]
        lr = 0.1
        """)
    res = cli(str(path), cwd=tmp_path, check=False)
    assert res.returncode == 2
    assert f"tasks.img.data: {tmp_path / 'nowhere'} does not exist, and the task has no prepare command" in res.stderr
    assert not (tmp_path / "results").exists()


# ----------------------------------------------------------------------------------------- real runs
def records(root: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in root.glob("runs/*/record.json")}


def test_local_sweep_runs_skips_done_and_relaunches_only_unfinished(tmp_path, digits):
    path = timm_sweep(tmp_path, digits, "a", """
        [tasks.digits.optimizers.fngd]
        lr = 0.1
        [tasks.digits.optimizers.sgd]
        lr = 0.1
        """)
    plan = cli(str(path), "--dry-run", cwd=tmp_path).stdout
    assert "2 runs" in plan and "2 to launch" in plan and plan.count("-m timm_ext.train") == 2
    assert not (tmp_path / "results").exists()  # a dry run launches and writes nothing

    out = cli(str(path), cwd=tmp_path).stdout
    assert "2 runs finished, 0 failed" in out and out.count(" start ") == 2
    recs = records(tmp_path / "results" / "a")
    assert len(recs) == 2 and all(r["status"] == "done" and len(r["epochs"]) == 2 for r in recs.values())
    fngd = next(r for r in recs.values() if r["optimizer"] == "fngd")
    assert [e["phase"] for e in fngd["epochs"]] == ["collect", "reuse"]
    assert fngd["config"]["sweep"] == "a" and fngd["env"]["packages"]["timm"]
    for rid in recs:
        assert (tmp_path / "results" / "a" / "runs" / rid / "logs" / "attempt-1.log").exists()

    again = cli(str(path), cwd=tmp_path).stdout
    assert "0 to launch" in again and "nothing to launch" in again

    # a run that died (record not done) is launched again, alone
    sgd_id = next(k for k, r in recs.items() if r["optimizer"] == "sgd")
    rec_path = tmp_path / "results" / "a" / "runs" / sgd_id / "record.json"
    rec = json.loads(rec_path.read_text())
    rec["status"] = "failed"
    rec_path.write_text(json.dumps(rec))
    status = cli(str(path), "--status", cwd=tmp_path).stdout
    assert f"{sgd_id}" in status and "1 done, 1 failed" in status
    # --status and the analysis only read records: neither imports a host, torch or the optimizer
    probe = ("import contextlib, io, sys\nfrom fngd_slurm.__main__ import main as status\n"
             "from fngd_analysis.__main__ import main as report\nwith contextlib.redirect_stdout(io.StringIO()):\n"
             f"    codes = status([{str(path)!r}, '--status']), report([{str(tmp_path / 'results' / 'a')!r}, "
             f"'--out', {str(tmp_path / 'report')!r}])\n"
             "print(codes, sorted(m for m in ('torch', 'timm', 'fairseq', 'fngd_plugin') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=ENV,
                         timeout=300)
    assert res.stdout.strip() == "(0, 0) []", res.stdout + res.stderr[-3000:]
    assert (tmp_path / "report" / "report.md").exists()
    third = cli(str(path), cwd=tmp_path).stdout
    assert "1 to launch" in third and f"start {sgd_id}" in third and "1 runs finished, 0 failed" in third
    assert json.loads(rec_path.read_text())["status"] == "done"


def test_killed_run_resumes_to_the_same_numbers(tmp_path, digits):
    opts = "[tasks.digits.optimizers.fngd]\nlr = 0.1\n"
    ref = timm_sweep(tmp_path, digits, "ref", opts, epochs=3)
    cli(str(ref), cwd=tmp_path)
    (expected,) = records(tmp_path / "results" / "ref").values()

    path = timm_sweep(tmp_path, digits, "killed", opts, epochs=3)
    proc = subprocess.Popen([sys.executable, "-m", "fngd_slurm", str(path)], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = tmp_path / "results" / "killed" / "runs"
    deadline = time.time() + 300
    killed = False
    while time.time() < deadline and proc.poll() is None:
        for rec_path in root.glob("*/record.json"):
            try:
                rec = json.loads(rec_path.read_text())
            except ValueError:
                continue
            if len(rec["epochs"]) == 1 and not killed:  # crash in the middle of epoch 2
                pid = json.loads((rec_path.parent / "submission.json").read_text())["pid"]
                os.kill(pid, signal.SIGKILL)
                killed = True
        time.sleep(0.05)
    out = proc.communicate(timeout=60)[0]
    assert killed and proc.returncode == 1 and "FAILED" in out and "0 runs finished, 1 failed" in out
    second = cli(str(path), cwd=tmp_path).stdout
    assert "1 to launch" in second and "1 runs finished, 0 failed" in second
    (got,) = records(tmp_path / "results" / "killed").values()
    assert [a["resumed_from_epoch"] for a in got["attempts"]] == [0, 1]
    keys = ("epoch", "step", "train_loss", "val_loss", "val_metric", "phase")
    assert [{k: e[k] for k in keys} for e in got["epochs"]] == [{k: e[k] for k in keys} for e in expected["epochs"]]
    assert got["final"]["val_metric"] == expected["final"]["val_metric"]
    # the best validation epoch, kept across the kill (best.pt), is the one tested, with the same result
    assert got["final"]["best_epoch"] == expected["final"]["best_epoch"]
    assert got["final"]["test_top1"] == expected["final"]["test_top1"]


def fairseq_sweep(tmp_path: Path, corpus: Path, name: str, epochs: int, extends: str | None = None) -> Path:
    return write(tmp_path, f"""
        name = "{name}"
        out = "results"
        seeds = [0]
        [executor]
        max_parallel = 1
        threads = 1
        [tasks.t]
        kind = "fairseq"
        data = "{corpus / 'bin'}"
        epochs = {epochs}
        {f'extends = "{extends}"' if extends else ''}
        [tasks.t.args]
        arch = "transformer"
        encoder_layers = 1
        decoder_layers = 1
        encoder_embed_dim = 32
        decoder_embed_dim = 32
        encoder_ffn_embed_dim = 64
        decoder_ffn_embed_dim = 64
        encoder_attention_heads = 2
        decoder_attention_heads = 2
        share_all_embeddings = true
        criterion = "label_smoothed_cross_entropy"
        label_smoothing = 0.1
        max_tokens = 2000
        num_workers = 0
        lr_scheduler = "inverse_sqrt"
        warmup_updates = 50
        clip_norm = 1.0
        update_epoch_batch_itr = "True"
        [tasks.t.optimizers.fngd]
        lr = 0.25
        damping = 0.5
        """, name=f"{name}.toml")


def test_a_longer_sweep_continues_the_shorter_runs_to_the_same_numbers(tmp_path, corpus):
    """``extends``: a 2-epoch run that continues a finished 1-epoch run of the same configuration
    (collect epoch done, reuse epoch from its stored coefficients) equals a 2-epoch run from scratch.
    ``update_epoch_batch_itr``: without it fairseq builds a resumed run's batches anew (ties between
    equally long sentences fall differently; see test_fairseq.test_resume_continues_identically), so
    a continued run, like any resumed fairseq run, follows another trajectory of the same training."""
    cli(str(fairseq_sweep(tmp_path, corpus, "short", 1)), cwd=tmp_path)
    (short_id, short), = records(tmp_path / "results" / "short").items()
    cli(str(fairseq_sweep(tmp_path, corpus, "fresh", 2)), cwd=tmp_path)
    (fresh,) = records(tmp_path / "results" / "fresh").values()

    path = fairseq_sweep(tmp_path, corpus, "long", 2, extends="results/short")
    plan = cli(str(path), "--dry-run", cwd=tmp_path).stdout
    assert f"continues {tmp_path / 'results' / 'short' / 'runs' / short_id}" in plan
    out = cli(str(path), cwd=tmp_path).stdout
    assert f"continues {tmp_path / 'results' / 'short' / 'runs' / short_id} after its epoch 1" in out
    (got,) = records(tmp_path / "results" / "long").values()
    assert got["status"] == "done"
    assert [a.get("resumed_from_epoch") for a in got["attempts"]] == [0, None, 1]
    assert got["attempts"][1]["extended_from"] == short_id
    keys = ("epoch", "step", "train_loss", "val_loss", "val_metric", "phase")
    assert [e["phase"] for e in got["epochs"]] == ["collect", "reuse"]
    assert [{k: e[k] for k in keys} for e in got["epochs"]] == [{k: e[k] for k in keys} for e in fresh["epochs"]]
    assert got["final"]["test_bleu"] == fresh["final"]["test_bleu"]
    # the shorter run is left as it was
    assert records(tmp_path / "results" / "short")[short_id] == short
    # a configuration that differs (here the damping) is not continued: it starts from scratch
    other = path.read_text().replace("damping = 0.5", "damping = 0.7")
    (tmp_path / "other.toml").write_text(other.replace('name = "long"', 'name = "other"'))
    plan = cli(str(tmp_path / "other.toml"), "--dry-run", cwd=tmp_path).stdout
    assert "    continues " not in plan and "1 to launch" in plan
