"""fairseq plugin: registration, and one collect step inside fairseq's real task/criterion/optimizer
code path against brute-force per-sentence damped NGD (float64)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("fairseq")
from fairseq import options  # noqa: E402
from fairseq.data import Dictionary  # noqa: E402
from fairseq.data.language_pair_dataset import collate  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402
from fairseq.optim import OPTIMIZER_REGISTRY, build_optimizer  # noqa: E402
from fairseq.tasks.translation import TranslationTask  # noqa: E402

import fairseq_ext  # noqa: E402,F401
from fngd_plugin import FNGD  # noqa: E402

ARCH = ["--arch", "transformer", "--encoder-layers", "1", "--decoder-layers", "2", "--encoder-embed-dim", "8",
        "--decoder-embed-dim", "8", "--encoder-ffn-embed-dim", "12", "--decoder-ffn-embed-dim", "12",
        "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--dropout", "0",
        "--share-decoder-input-output-embed", "--criterion", "label_smoothed_cross_entropy",
        "--label-smoothing", "0.1", "-s", "de", "-t", "en"]


def setup(extra: list[str]):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, ["/nonexistent", "--task", "translation", *ARCH, *extra])
    cfg = convert_namespace_to_omegaconf(args)
    d = Dictionary()
    for w in "abcdefghijkl":
        d.add_symbol(w)
    task = TranslationTask(cfg.task, d, d)
    torch.manual_seed(0)
    model = task.build_model(cfg.model).double()
    criterion = task.build_criterion(cfg.criterion)
    g = torch.Generator().manual_seed(3)
    samples = []
    for i, (ls, lt) in enumerate([(5, 4), (3, 6), (6, 2), (4, 4), (2, 5)]):  # ragged: padding on both sides
        src = torch.cat([torch.randint(4, len(d), (ls,), generator=g), torch.tensor([d.eos()])])
        tgt = torch.cat([torch.randint(4, len(d), (lt,), generator=g), torch.tensor([d.eos()])])
        samples.append({"id": i, "source": src, "target": tgt})
    batch = collate(samples, pad_idx=d.pad(), eos_idx=d.eos())
    return cfg, task, model, criterion, batch


def test_registered_with_config_and_bad_values_fail_before_training():
    assert {"fngd", "kfac"} <= set(OPTIMIZER_REGISTRY)
    parser = options.get_training_parser()
    with pytest.raises(SystemExit):  # argparse: invalid choice, names the allowed values
        options.parse_args_and_arch(parser, ["/x", "--task", "translation", *ARCH, "--optimizer", "fngd",
                                             "--reuse", "bogus"])


def test_collect_step_is_per_sentence_damped_ngd(f64):
    lam = 0.3
    cfg, task, model, criterion, batch = setup(["--optimizer", "fngd", "--lr", "1.0", "--momentum", "0",
                                                "--damping", str(lam), "--damping-mode", "absolute",
                                                "--normalize", "none", "--reuse", "off"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg.optimizer, params)  # switches attention to its module path (same math)
    # brute force: each sentence's own summed loss through the batched forward, autograd per sentence
    net_output = model(**batch["net_input"])
    tok_loss, _ = criterion.compute_loss(model, net_output, batch, reduce=False)
    per_sentence = tok_loss.view(batch["target"].shape).sum(1)
    n, ntok = per_sentence.numel(), batch["ntokens"]
    rows = []
    for i in range(n):
        gi = torch.autograd.grad(per_sentence[i], params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in gi]) * n / ntok)  # host gradient = mean of rows
    U = torch.stack(rows)
    F = U.T @ U / n
    expected = torch.linalg.solve(F + lam * torch.eye(U.shape[1]), U.mean(0))

    fngd = fairseq_ext.find_fngd(optimizer)
    assert isinstance(fngd, FNGD)
    assert not fngd.coverage["uncovered"], fngd.coverage["line"]
    before = torch.cat([p.detach().reshape(-1).clone() for p in params])
    optimizer.zero_grad()
    loss, sample_size, _ = task.train_step(batch, model, criterion, optimizer, update_num=0)  # sets the ids
    optimizer.multiply_grads(1.0 / sample_size)  # what fairseq's trainer does before the step
    optimizer.step()
    step = before - torch.cat([p.detach().reshape(-1) for p in params])
    assert float((step - expected).norm() / expected.norm()) < 1e-8
    assert fngd.stats()["tied_approximations"] == 0


# ------------------------------------------------------------------------------ corpus and real CLIs
PO = r'''msgid ""
msgstr ""
"Content-Type: text/plain; charset=UTF-8\n"

#: a.py:1
msgid "Save"
msgstr "Speichern"

#, fuzzy
msgid "Delete"
msgstr "Entfernen"

msgid "One item"
msgid_plural "%d items"
msgstr[0] "Ein Eintrag"
msgstr[1] "%d Einträge"

msgid ""
"A long sentence that "
"continues with a \"quote\"."
msgstr ""
"Ein langer Satz, der "
"mit einem \"Zitat\" weitergeht."

msgid "Untranslated"
msgstr ""

#~ msgid "Old"
#~ msgstr "Alt"
'''


def test_po_parser_takes_only_real_translations():
    from fairseq_ext.corpus import parse_po

    assert parse_po(PO) == [("Save", "Speichern"),
                            ('A long sentence that continues with a "quote".',
                             'Ein langer Satz, der mit einem "Zitat" weitergeht.')]


def cli(module: str, *args: str, timeout: int = 600) -> str:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed project, as users run it
    res = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                         env=env, cwd="/")
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return res.stdout + res.stderr


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    log = cli("fairseq_ext.corpus", str(out))
    assert "train" in log
    counts = [len((out / "raw" / f"{s}.en").read_text().splitlines()) for s in ("train", "valid", "test")]
    assert counts[0] > 5000 and counts[1] > 200 and counts[2] > 200  # real translator-written pairs
    return out


def test_real_fairseq_train_and_generate(corpus, tmp_path):
    arch = ["--task", "translation", "-s", "de", "-t", "en", "--arch", "transformer", "--encoder-layers", "1",
            "--decoder-layers", "1", "--encoder-embed-dim", "64", "--decoder-embed-dim", "64",
            "--encoder-ffn-embed-dim", "128", "--decoder-ffn-embed-dim", "128", "--encoder-attention-heads", "2",
            "--decoder-attention-heads", "2", "--share-all-embeddings", "--dropout", "0.1", "--cpu", "--seed", "1"]
    log = cli("fairseq_cli.train", str(corpus / "bin"), *arch, "--criterion", "label_smoothed_cross_entropy",
              "--label-smoothing", "0.1", "--optimizer", "fngd", "--lr", "0.25", "--lr-scheduler", "inverse_sqrt",
              "--warmup-updates", "100", "--warmup-init-lr", "0.01", "--clip-norm", "1.0", "--max-tokens", "2000",
              "--max-epoch", "10", "--save-dir", str(tmp_path), "--no-progress-bar", "--num-workers", "0",
              "--required-batch-size-multiple", "1", "--no-epoch-checkpoints")
    assert "uncovered: none" in log and "FNGD: collect epoch 0 done" in log
    losses = [float(line.split("| loss ")[1].split()[0]) for line in log.splitlines()
              if "| train | epoch" in line]
    assert len(losses) == 10 and all(b < a for a, b in zip(losses[1:], losses[2:]))  # reuse epochs keep improving
    out = cli("fairseq_cli.generate", str(corpus / "bin"), "-s", "de", "-t", "en", "--path",
              str(tmp_path / "checkpoint_best.pt"), "--gen-subset", "test", "--beam", "2", "--batch-size", "64",
              "--remove-bpe", "sentencepiece", "--scoring", "sacrebleu", "--required-batch-size-multiple", "1",
              "--cpu")
    n_test = len((corpus / "raw" / "test.en").read_text().splitlines())
    assert sum(1 for line in out.splitlines() if line.startswith("H-")) == n_test  # no sentence dropped
    bleu = float(out.split("BLEU = ")[1].split()[0])
    print(f"fngd: train losses {losses}; test BLEU {bleu}")
    assert bleu > 0


def test_fp16_copies_give_a_clear_error():
    import torch as t

    cfg, task, model, criterion, batch = setup(["--optimizer", "fngd", "--lr", "0.1"])
    copies = [t.nn.Parameter(p.detach().clone()) for p in model.parameters()]  # what --fp16 hands over
    with pytest.raises(ValueError, match="use --amp"):
        build_optimizer(cfg.optimizer, copies)


TINY = ["--task", "translation", "-s", "de", "-t", "en", "--arch", "transformer", "--encoder-layers", "1",
        "--decoder-layers", "1", "--encoder-embed-dim", "64", "--decoder-embed-dim", "64",
        "--encoder-ffn-embed-dim", "128", "--decoder-ffn-embed-dim", "128", "--encoder-attention-heads", "2",
        "--decoder-attention-heads", "2", "--share-all-embeddings", "--dropout", "0.1", "--cpu", "--seed", "1",
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--max-tokens", "2000",
        "--no-progress-bar", "--num-workers", "0", "--required-batch-size-multiple", "1", "--no-save"]


@pytest.mark.parametrize("opt_args", [
    ["--optimizer", "kfac", "--lr", "0.05", "--kfac-damping", "0.01", "--clip-norm", "1.0"],
    ["--optimizer", "adam", "--lr", "0.001", "--adam-betas", "(0.9, 0.98)"],
    ["--optimizer", "fngd", "--lr", "0.25", "--update-freq", "2", "--clip-norm", "1.0", "--reuse", "position"],
], ids=["kfac", "adam", "fngd-update-freq-2-position"])
def test_real_fairseq_train_other_optimizers(corpus, tmp_path, opt_args):
    log = cli("fairseq_cli.train", str(corpus / "bin"), *TINY, *opt_args, "--max-epoch", "2",
              "--save-dir", str(tmp_path))
    losses = [float(line.split("| loss ")[1].split()[0]) for line in log.splitlines() if "| train | epoch" in line]
    assert len(losses) == 2 and losses[1] < losses[0], losses
    if "fngd" in opt_args:
        # every micro-batch of epoch 1 solved on its own; the epoch's batches are counted by position
        solves = int(log.split("FNGD: collect epoch 0 done: ")[1].split()[0])
        updates = int([ln for ln in log.splitlines() if "| train | epoch 001" in ln][0]
                      .split("num_updates ")[1].split()[0])
        assert updates * 2 - 1 <= solves <= updates * 2
