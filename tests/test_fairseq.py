"""fairseq plugin: registration, and one collect step inside fairseq's real task/criterion/optimizer
code path against brute-force per-sentence damped NGD (float64)."""

from __future__ import annotations

import re

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


def collect_step_vs_brute_force(extra: list[str], lam: float = 0.3, brute_force: bool = True):
    """One FNGD collect step through fairseq's task/criterion/optimizer code, and brute-force
    per-sentence damped NGD (float64) for the same batch. Returns (step, expected, model, fngd)."""
    cfg, task, model, criterion, batch = setup(["--optimizer", "fngd", "--lr", "1.0", "--momentum", "0",
                                                "--damping", str(lam), "--damping-mode", "absolute",
                                                "--normalize", "none", "--reuse", "off", *extra])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg.optimizer, params)  # switches attention to its module path (same math)
    expected = None
    if brute_force:
        expected = brute_force_direction(model, criterion, batch, params, lam)
    fngd = fairseq_ext.find_fngd(optimizer)
    assert isinstance(fngd, FNGD)
    before = torch.cat([p.detach().reshape(-1).clone() for p in params])
    optimizer.zero_grad()
    loss, sample_size, _ = task.train_step(batch, model, criterion, optimizer, update_num=0)  # sets the ids
    optimizer.multiply_grads(1.0 / sample_size)  # what fairseq's trainer does before the step
    optimizer.step()
    step = before - torch.cat([p.detach().reshape(-1) for p in params])
    return step, expected, model, fngd


def brute_force_direction(model, criterion, batch, params, lam):
    """Each sentence's own summed loss through the batched forward, autograd per sentence."""
    net_output = model(**batch["net_input"])
    tok_loss, _ = criterion.compute_loss(model, net_output, batch, reduce=False)
    per_sentence = tok_loss.view(batch["target"].shape).sum(1)
    n, ntok = per_sentence.numel(), batch["ntokens"]
    rows = []
    for i in range(n):
        gi = torch.autograd.grad(per_sentence[i], params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in gi]) * n / ntok)  # host gradient = mean of rows
    U = torch.stack(rows)
    if U.shape[1] <= 4000:  # (F + lam I)^-1 gbar as a d x d solve
        return torch.linalg.solve(U.T @ U / n + lam * torch.eye(U.shape[1]), U.mean(0))
    # larger d (learned position tables): the same solve in its n x n form
    return U.T @ torch.linalg.solve(U @ U.T + n * lam * torch.eye(n), torch.ones(n))


def test_collect_step_is_per_sentence_damped_ngd(f64):
    step, expected, _, fngd = collect_step_vs_brute_force([])
    assert not fngd.coverage["uncovered"], fngd.coverage["line"]
    assert float((step - expected).norm() / expected.norm()) < 1e-8
    assert fngd.stats()["tied_approximations"] == 0


def test_checkpoint_activations_collect_step_is_exact(f64):
    """fairseq-train --checkpoint-activations: each layer runs without gradients in the forward and
    again inside the backward (fairseq's checkpoint_wrapper, reentrant). The recomputation is
    neither a new batch nor recorded twice: the step is still per-sentence damped NGD."""
    _, expected, _, _ = collect_step_vs_brute_force([])  # autograd.grad refuses checkpointed graphs
    step, _, model, fngd = collect_step_vs_brute_force(["--checkpoint-activations"], brute_force=False)
    assert any("checkpoint" in type(m).__name__.lower() or hasattr(m, "precheckpoint_forward")
               for m in model.modules()), "fairseq did not wrap its layers"
    assert float((step - expected).norm() / expected.norm()) < 1e-8
    s = fngd.stats()
    assert s["collect_steps"] == 1 and s["unpreconditioned"] == {} and s["position"] == 1


def test_every_linear_embedding_layernorm_parameter_is_covered(f64):
    """Per parameter, not per count: each nn.Linear / nn.Embedding / nn.LayerNorm parameter of the
    transformer (here with every LayerNorm fairseq can add: pre-norm layers, the final encoder and
    decoder norms, the embedding norm) is one of FNGD's parameters and the coverage report leaves
    none out; and the step is exact, so "covered" means the captured per-sentence gradients of
    each of them are right (time-first layout declared where it applies)."""
    step, expected, model, fngd = collect_step_vs_brute_force(
        ["--encoder-normalize-before", "--decoder-normalize-before", "--layernorm-embedding"])
    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm)
    owned: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            for pname, p in module.named_parameters(recurse=False):
                owned.setdefault(id(p), f"{name}.{pname} ({type(module).__name__})")
    assert len(owned) == len(list(model.parameters()))  # the transformer has no other parameters
    assert any("layernorm_embedding" in n for n in owned.values())
    assert any(n.startswith("encoder.layer_norm.") for n in owned.values())
    assert any(n.startswith("decoder.layer_norm.") for n in owned.values())
    mine = {id(p) for g in fngd.param_groups for p in g["params"]}
    assert not [n for i, n in owned.items() if i not in mine]
    assert not fngd.coverage["uncovered"], fngd.coverage["line"]
    assert sum(fngd.coverage["covered"].values()) == len(mine) == len(owned), fngd.coverage["line"]
    assert {"Linear", "Embedding", "LayerNorm"} <= set(fngd.coverage["covered"]), fngd.coverage["line"]
    assert float((step - expected).norm() / expected.norm()) < 1e-8

    # learned positional embeddings (an nn.Embedding subclass that embeds positions, not its input)
    # are not the Embedding sampler's math: the torch.func fallback covers them, exactly
    step, expected, _, fngd = collect_step_vs_brute_force(["--encoder-learned-pos", "--decoder-learned-pos"])
    assert fngd.coverage["uncovered"] == {} and fngd.coverage["generic"] == {"LearnedPositionalEmbedding": 2}
    assert float((step - expected).norm() / expected.norm()) < 1e-8
    assert fngd.stats()["unpreconditioned"] == {}
    cfg, _, model, _, _ = setup(["--optimizer", "fngd", "--lr", "0.1", "--encoder-learned-pos",
                                 "--no-generic-fallback"])
    fngd = fairseq_ext.find_fngd(build_optimizer(cfg.optimizer, list(model.parameters())))
    assert fngd.coverage["uncovered"] == {"LearnedPositionalEmbedding": 1}, fngd.coverage["line"]
    assert "overrides forward()" in fngd.coverage["reasons"]["LearnedPositionalEmbedding"]


# ------------------------------------------------------------------------------ corpus and real CLIs
# (the catalog parser's own tests: tests/test_corpus.py)


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
    log = cli("fairseq_ext.corpus", str(out), "--packages", "pretix")
    assert "train" in log
    counts = [len((out / "raw" / f"{s}.en").read_text().splitlines()) for s in ("train", "valid", "test")]
    assert counts[0] > 5000 and counts[1] == N_SHORT and counts[2] > 200  # real translator-written pairs
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
    # the adapter's line per epoch (at each epoch's end): every collect step solved, every reuse step reweighted
    epochs = re.findall(r"FNGD epoch (\d+): (\d+)/(\d+) collect steps solved, (\d+)/(\d+) reuse steps reweighted; "
                        r"reuse misses \(samples\) (\d+); not preconditioned \(all epochs\): none", log)
    assert [int(e[0]) for e in epochs] == list(range(10)), epochs
    assert epochs[0][1] == epochs[0][2] != "0" and epochs[0][3:5] == ("0", "0")
    assert all(e[1:3] == ("0", "0") and e[3] == e[4] != "0" and e[5] == "0" for e in epochs[1:]), epochs
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
    if "kfac" in opt_args:  # KFAC's epoch line, once per epoch, with that epoch's updates
        kfac = re.findall(r"KFAC epoch: (\d+) steps, (\d+) factor updates \((\d+) non-finite", log)
        updates = [int(train_lines(log)[e]["num_updates"]) for e in (1, 2)]
        assert [int(k[0]) for k in kfac] == [updates[0], updates[1] - updates[0]], (kfac, updates)
        assert all(k[2] == "0" for k in kfac)
    if "fngd" in opt_args:
        # every micro-batch of epoch 1 solved on its own; the epoch's batches are counted by position
        solves = int(log.split("FNGD: collect epoch 0 done: ")[1].split()[0])
        updates = int([ln for ln in log.splitlines() if "| train | epoch 001" in ln][0]
                      .split("num_updates ")[1].split()[0])
        assert updates * 2 - 1 <= solves <= updates * 2


# ------------------------------------------------------------------------------ resume, AMP, bad options, distributed
# Short real runs: the 313-sentence valid split (pretix) as the training set, 5 batches an epoch
# (--max-tokens 1900: an odd number, so two workers meet a dummy batch), no validation.
SHORT = [("1900" if a == "2000" else a) for a in TINY if a != "--no-save"] + [
    "--train-subset", "valid", "--valid-subset", "test", "--disable-validation"]
N_SHORT = 313  # sentences in that training set (checked by the corpus fixture)
FNGD_ARGS = ["--optimizer", "fngd", "--lr", "0.25", "--clip-norm", "1.0"]


def train_lines(log: str) -> dict[int, dict[str, float]]:
    """{epoch: {"loss": .., "gnorm": .., ...}} from fairseq's end-of-epoch "| train | epoch NNN" lines."""
    out = {}
    for line in log.splitlines():
        if "| train | epoch" in line:
            fields = [f.strip() for f in line.split("| train | epoch ")[1].split("|")]
            out[int(fields[0])] = {f.split()[0]: float(f.split()[1]) for f in fields[1:] if len(f.split()) == 2}
    return out


def test_resume_continues_identically(corpus, tmp_path):
    """2 epochs in one run == 1 epoch, then a second invocation resuming from checkpoint_last.pt
    (model, momentum, FNGD schedule and coefficient store): the same epoch-2 loss and the same
    final parameters and optimizer state, bit for bit, dropout 0.1 included (fairseq reseeds with
    seed + num_updates before every update).

    ``--update-epoch-batch-itr True`` is for fairseq, not for FNGD: fairseq builds an epoch's
    batches under ``numpy_seed(seed + epoch)`` with the epoch at which the iterator is *created*
    (fairseq/tasks/fairseq_task.py, make_batches in get_batch_iterator) and caches it for later
    epochs; an uninterrupted run builds them at epoch 1, a resumed run at epoch 2, so ties between
    equally long sentences fall differently, batches differ, and so does the trajectory -- for
    fairseq's own optimizers too (nag, dropout 0: the 3rd update of epoch 2 gets another batch and
    the parameters differ by ~1e-3). With the flag both runs rebuild the batches every epoch."""
    args = [str(corpus / "bin"), *SHORT, *FNGD_ARGS, "--update-epoch-batch-itr", "True"]
    a = train_lines(cli("fairseq_cli.train", *args, "--max-epoch", "2", "--save-dir", str(tmp_path / "A")))
    first = train_lines(cli("fairseq_cli.train", *args, "--max-epoch", "1", "--save-dir", str(tmp_path / "B")))
    log = cli("fairseq_cli.train", *args, "--max-epoch", "2", "--save-dir", str(tmp_path / "B"))
    assert "Loaded checkpoint" in log and "(epoch 2 @ 5 updates)" in log
    b = train_lines(log)
    assert set(a) == {1, 2} and set(first) == {1} and set(b) == {2}, (a, first, b)
    for key in ("loss", "nll_loss", "gnorm", "num_updates"):  # not wps, wall: timings
        assert first[1][key] == a[1][key] and b[2][key] == a[2][key], (key, a, first, b)

    def load(run):
        return torch.load(tmp_path / run / "checkpoint_last.pt", weights_only=False, map_location="cpu")

    ca, cb = load("A"), load("B")
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    sa, sb = ca["last_optimizer_state"], cb["last_optimizer_state"]
    assert sa["fngd"]["store"]["samples"][-1]["filled"].sum() == N_SHORT  # every training sentence has its c
    # momentum buffers, schedule, counters, coefficient store (NaN == NaN: a one-sentence batch has no spread)
    assert_identical(sa, sb)


def assert_identical(a, b, where: str = "") -> None:
    """Nested dicts/lists of tensors and plain values, equal bit for bit (NaN equal to NaN)."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}/{i}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.isnan(), b.isnan()), where
        assert torch.equal(a.nan_to_num(), b.nan_to_num()), where
    else:
        assert a == b, (where, a, b)


def test_amp_in_process_bf16_autocast_and_loss_scaling():
    """fairseq's --amp is CUDA-only: AMPOptimizer makes a torch.cuda.amp.GradScaler (disabled, with
    a warning, without CUDA: fairseq/optim/amp_optimizer.py) and the task forwards under
    torch.cuda.amp.autocast (a no-op on CPU: fairseq/tasks/fairseq_task.py train_step). So here
    the AMP path runs in-process the way fairseq runs it on a GPU, with CPU stand-ins: the real
    AMPOptimizer wrapping ours, its scaler swapped for an enabled torch.amp.GradScaler("cpu")
    (loss scale 128), the forward under torch.autocast("cpu", bfloat16), then fairseq's trainer
    sequence multiply_grads -> clip_grad_norm (which unscales) -> step.

    The step must equal the fp32 step to bf16 accuracy. fairseq's AMPOptimizer.step() would
    unscale the gradients a second time (GradScaler.step on the wrapper after unscale_ on the inner
    optimizer), shrinking every update by the loss scale (fairseq's nag: exactly 1/128 here); our
    wrapper takes found_inf from GradScaler instead. An overflow skips the step and halves the scale."""
    import warnings

    from fairseq.optim import AMPOptimizer

    def one_step(amp: bool, init_scale: float = 128.0):
        cfg, task, model, criterion, batch = setup(["--optimizer", "fngd", "--lr", "0.5", "--momentum", "0",
                                                    "--amp", "--clip-norm", "0"])
        model = model.float()
        params = list(model.parameters())
        if amp:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "torch.cuda.amp.GradScaler is enabled, but CUDA is not available"
                optimizer = AMPOptimizer.build_optimizer(cfg, params)
            optimizer._grad_scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        else:
            optimizer = build_optimizer(cfg.optimizer, params)
        assert isinstance(fairseq_ext.find_fngd(optimizer), FNGD)
        before = torch.cat([p.detach().reshape(-1).clone() for p in params])
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            _, sample_size, _ = task.train_step(batch, model, criterion, optimizer, update_num=0)
        optimizer.multiply_grads(1.0 / sample_size)
        grad_norm = optimizer.clip_grad_norm(0.0)
        optimizer.step()
        step = before - torch.cat([p.detach().reshape(-1) for p in params])
        return step, grad_norm, optimizer

    ref, _, _ = one_step(amp=False)
    step, grad_norm, optimizer = one_step(amp=True)
    assert torch.isfinite(grad_norm) and optimizer.scaler.get_scale() == 128.0
    assert float((step - ref).norm() / ref.norm()) < 0.05  # bf16 activations; 1/128 would be ~0.99
    step, grad_norm, optimizer = one_step(amp=True, init_scale=2.0**127)  # the scaled loss overflows
    assert not torch.isfinite(grad_norm) and float(step.abs().max()) == 0.0
    assert optimizer.scaler.get_scale() == 2.0**126


def test_amp_cli_trains_on_cpu(corpus, tmp_path):
    """fairseq-train --amp --cpu runs (fairseq does not refuse) but its AMP is inert without CUDA:
    loss_scale stays 1 and the numbers are fp32's (see the in-process test for the real AMP path)."""
    log = cli("fairseq_cli.train", str(corpus / "bin"), *SHORT, *FNGD_ARGS, "--amp", "--max-epoch", "1",
              "--no-save", "--save-dir", str(tmp_path))
    assert "torch.cuda.amp.GradScaler is enabled, but CUDA is not available" in log
    assert "uncovered: none" in log
    epoch = train_lines(log)[1]
    assert epoch["loss_scale"] == 1 and epoch["num_updates"] == 5 and 0 < epoch["loss"] < 20


BAD_OPTIONS = {
    "damping": (["--damping", "-1"], "argument --damping: invalid value -1.0 (must be > 0.0)"),
    "reuse": (["--reuse", "bogus"],
              "argument --reuse: invalid choice: 'bogus' (choose from 'position', 'sample', 'off')"),
    "coefficients": (["--coefficients", "x"],
                     "argument --coefficients: invalid choice: 'x' (choose from 'network', 'layer')"),
    "kfac-damping": (["--optimizer", "kfac", "--kfac-damping", "0"],
                     "argument --kfac-damping: invalid value 0.0 (must be > 0.0)"),
    "momentum": (["--momentum", "1"], "argument --momentum: invalid value 1.0 (must be < 1)"),
    "fngd-beta2": (["--fngd-update", "adamw", "--fngd-beta2", "1.5"],
                   "argument --fngd-beta2: invalid value 1.5 (must be < 1)"),
}


def test_bad_option_values_stop_fairseq_train_before_training(corpus, tmp_path):
    """Through the real CLI (all at once, they only parse): argparse's usage error, exit code 2,
    the option, the value and what is allowed on the last line, before any data, model or save
    directory exists. Range checks are the core optimizer's own (FNGD/KFAC on no parameters)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    procs = {}
    for name, (bad, _) in BAD_OPTIONS.items():
        argv = [sys.executable, "-m", "fairseq_cli.train", str(corpus / "bin"), *SHORT, *FNGD_ARGS, *bad,
                "--max-epoch", "1", "--save-dir", str(tmp_path / name)]
        procs[name] = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                       cwd="/")
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, (out + err)[-3000:])
        assert err.strip().splitlines()[-1] == f"train.py: error: {BAD_OPTIONS[name][1]}", (name, err[-1500:])
        assert "| train | epoch" not in out + err and "loaded" not in out + err
        assert not (tmp_path / name).exists()

    # fairseq-hydra-train and in-process builds skip argparse: the optimizer says the same
    from omegaconf import open_dict

    cfg, _, model, _, _ = setup(["--optimizer", "fngd", "--lr", "0.1"])
    with open_dict(cfg.optimizer):
        cfg.optimizer.damping = -1.0
    with pytest.raises(ValueError, match=r"argument --damping: invalid value -1\.0 \(must be > 0\.0\)"):
        build_optimizer(cfg.optimizer, list(model.parameters()))


DIST_WORKER = """
import sys
import torch
import fairseq_cli.train as T
from fairseq_ext import find_fngd

out = sys.argv.pop(1)
held = []
train = T.train
def spy(cfg, trainer, task, epoch_itr):
    held.append(trainer)
    return train(cfg, trainer, task, epoch_itr)
T.train = spy
sys.argv[0] = "fairseq-train"
T.cli_main()
trainer = held[-1]
opt = find_fngd(trainer.optimizer)
torch.save({"model": {k: v.detach().clone() for k, v in trainer.get_model().state_dict().items()},
            "stats": opt.stats(), "store": opt.store.state_dict(),
            "world": trainer.data_parallel_world_size, "rank": trainer.data_parallel_rank}, out)
"""


def test_distributed_two_cpu_workers(corpus, tmp_path):
    """Two fairseq-train processes on CPU with gloo, loading the plugin through --user-dir (the
    package's own directory) besides the autoload. Epoch 1 collects, 2-3 reuse; 5 batches an epoch, so
    worker 1 gets a dummy batch every epoch (it must still join FNGD's all-reduces). Both
    replicas end with identical parameters and identical coefficient stores holding all 313
    sentences, and no reuse lookup missed (fairseq deals batches to workers anew every epoch).

    How fairseq allows CPU multi-process (fairseq/distributed/utils.py): spawning
    (--distributed-world-size 2 alone) asserts world size <= torch.cuda.device_count() in
    _infer_single_node_init; torchrun's environment divides by torch.cuda.device_count() in
    _infer_torch_distributed_launch_init (ZeroDivisionError); what works is one process per rank with
    --distributed-init-method, --distributed-rank and --distributed-no-spawn. --ddp-backend must be
    legacy_ddp (or no_c10d): pytorch_ddp passes device_ids=[device_id] to torch's
    DistributedDataParallel (fairseq/models/distributed_fairseq_model.py), which rejects CPU modules."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import fairseq_ext

    user_dir = os.path.dirname(fairseq_ext.__file__)  # the package as installed (editable: the working tree)
    args = [str(corpus / "bin"), *SHORT, *FNGD_ARGS, "--max-epoch", "3", "--no-save", "--save-dir", str(tmp_path),
            "--user-dir", user_dir, "--distributed-world-size", "2", "--distributed-backend", "gloo",
            "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-no-spawn",
            "--ddp-backend", "legacy_ddp"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    procs = [subprocess.Popen([sys.executable, "-c", DIST_WORKER, str(tmp_path / f"rank{r}.pt"), *args,
                               "--distributed-rank", str(r)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env, cwd="/") for r in (0, 1)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            proc.kill()
    for r, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, (r, log[-4000:])
    assert "has already been imported" in logs[0]  # --user-dir met the autoloaded plugin
    epochs = train_lines(logs[0])  # rank 1 logs warnings only (fairseq)
    assert sorted(epochs) == [1, 2, 3] and epochs[1]["num_updates"] == 3  # 3 updates: 3 + 2 batches + 1 dummy
    losses = [epochs[e]["loss"] for e in (1, 2, 3)]
    assert losses[0] > losses[1] > losses[2], losses
    assert "FNGD: collect epoch 0 done" in logs[0]

    w = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [x["world"] for x in w] == [2, 2] and [x["rank"] for x in w] == [0, 1]
    for k in w[0]["model"]:
        assert torch.equal(w[0]["model"][k], w[1]["model"][k]), k
    assert_identical(w[0]["store"]["samples"], w[1]["store"]["samples"])
    assert int(w[0]["store"]["samples"][-1]["filled"].sum()) == N_SHORT
    for x in w:
        assert x["stats"]["store_misses"] == 0 and x["stats"]["skipped_steps"] == 0, x["stats"]
        assert x["stats"]["collect_steps"] > 0


def test_dummy_batch_teaches_nothing(f64):
    """fairseq's dummy batches (ignore_grad: the short shard of an uneven epoch, OOM recovery) are
    captured only to keep the workers' all-reduces matched: no solve, nothing stored, no step."""
    cfg, task, model, criterion, batch = setup(["--optimizer", "fngd", "--lr", "0.1"])
    params = list(model.parameters())
    optimizer = build_optimizer(cfg.optimizer, params)
    fngd = fairseq_ext.find_fngd(optimizer)
    before = [p.detach().clone() for p in params]
    optimizer.zero_grad()
    task.train_step(batch, model, criterion, optimizer, update_num=0, ignore_grad=True)
    optimizer.step()
    stats = fngd.stats()
    assert (stats["collect_steps"], stats["stored"], stats["position"]) == (0, 0, 0), stats
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    optimizer.zero_grad()
    _, sample_size, _ = task.train_step(batch, model, criterion, optimizer, update_num=0)
    optimizer.multiply_grads(1.0 / sample_size)
    optimizer.step()
    stats = fngd.stats()
    assert (stats["collect_steps"], stats["stored"], stats["position"]) == (1, 5, 1), stats
    assert not all(torch.equal(a, p) for a, p in zip(before, params))


def test_kfac_refuses_distributed_training(monkeypatch):
    """KFAC's factors are per worker (no all-reduce in the core): two CPU workers ended 2 epochs with
    parameters 0.34 apart. Refused at build time, in every worker, before any step."""
    cfg, _, model, _, _ = setup(["--optimizer", "kfac", "--lr", "0.05"])
    monkeypatch.setattr(fairseq_ext, "world_size", lambda: 2)
    with pytest.raises(ValueError, match="kfac does not support distributed training"):
        build_optimizer(cfg.optimizer, list(model.parameters()))
