"""python -m fairseq_ext.translate: the real fairseq-train, then the real fairseq-generate with
sacrebleu, one record analysis/ reads; a second call resumes instead of starting over."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("fairseq")

ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
TINY = ["--arch", "transformer", "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32",
        "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
        "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--share-all-embeddings",
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--max-tokens", "2000",
        "--num-workers", "0", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "50", "--clip-norm", "1"]


def translate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fairseq_ext.translate", *args], capture_output=True, text=True,
                          env=ENV, cwd="/", timeout=900)


def test_train_then_score_writes_a_record_and_resumes(corpus, tmp_path):
    out = tmp_path / "run"
    res = translate(str(corpus / "bin"), "--out", str(out), "--seed", "3", "--beam", "2", "--",
                    *TINY, "--optimizer", "fngd", "--lr", "0.25", "--damping", "0.5", "--max-epoch", "2")
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    rec = json.loads((out / "record.json").read_text())
    n_test = len((corpus / "raw" / "test.en").read_text().splitlines())
    assert rec["status"] == "done" and rec["kind"] == "fairseq" and rec["metric"] == {"name": "bleu", "mode": "max"}
    assert rec["optimizer"] == "fngd" and rec["hparams"] == {"lr": 0.25, "damping": 0.5} and rec["seed"] == 3
    assert [e["epoch"] for e in rec["epochs"]] == [1, 2] and [e["phase"] for e in rec["epochs"]] == ["collect", "reuse"]
    assert all(e["val_metric"] is not None and e["val_loss"] > 0 and e["epoch_time"] > 0 for e in rec["epochs"])
    assert rec["epochs"][1]["time"] == pytest.approx(rec["epochs"][0]["time"] + rec["epochs"][1]["epoch_time"])
    assert rec["epochs"][1]["train_loss"] < rec["epochs"][0]["train_loss"]
    # every test sentence translated (--required-batch-size-multiple 1), BLEU from sacrebleu's own line
    gen = (out / "generate-test.txt").read_text()
    assert rec["final"]["test_sentences"] == n_test == sum(1 for ln in gen.splitlines() if ln.startswith("H-"))
    line = rec["final"]["sacrebleu"]
    assert line in gen and float(line.split()[2]) == rec["final"]["test_bleu"]

    # the same command again: fairseq resumes after epoch 2, trains nothing more, scores again
    again = translate(str(corpus / "bin"), "--out", str(out), "--seed", "3", "--beam", "2", "--",
                      *TINY, "--optimizer", "fngd", "--lr", "0.25", "--damping", "0.5", "--max-epoch", "2")
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    rec2 = json.loads((out / "record.json").read_text())
    assert [a["resumed_from_epoch"] for a in rec2["attempts"]] == [0, 2]
    assert rec2["epochs"] == rec["epochs"] and rec2["final"]["test_bleu"] == rec["final"]["test_bleu"]


def test_bad_invocations_fail_before_training(corpus, tmp_path):
    res = translate(str(tmp_path / "nope"), "--out", str(tmp_path / "r"), "--", "--optimizer", "fngd")
    assert res.returncode == 2 and "does not exist" in res.stderr
    res = translate(str(corpus / "bin"), "--out", str(tmp_path / "r"), "--", *TINY, "--optimizer", "fngd",
                    "--save-dir", "x")
    assert res.returncode == 2 and "--save-dir is set by this command" in res.stderr
    res = translate(str(corpus / "bin"), "--out", str(tmp_path / "r"), "--", *TINY)
    assert res.returncode == 2 and "no --optimizer" in res.stderr
    assert not (tmp_path / "r" / "record.json").exists()
