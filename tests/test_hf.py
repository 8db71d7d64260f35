"""Hugging Face Transformers (issue 25): one FNGD collect step of each family against brute-force
damped NGD in float64 (per-sample gradients one sample at a time, the NGD direction from an SVD of
their matrix: neither shares code with FNGD's Gram, solve or samplers), the real Trainer with
gradient accumulation and max_grad_norm, KFAC there, and the shapes of the broadcast problem on
small hand-made models. Tiny random-init configs, no download."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
tf = pytest.importorskip("transformers")

from fngd_plugin import FNGD, KFAC  # noqa: E402
from fngd_plugin import hf as fngd_hf  # noqa: E402
from fngd_plugin.hf import FNGDCallback, prepare  # noqa: E402

LAM = 0.37
N, T, V = 4, 6, 40


# ----------------------------------------------------------------------------- the families
def gpt2():
    cfg = tf.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=V, n_positions=16, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel(cfg), "lm"


def bert():
    cfg = tf.BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                        vocab_size=V, max_position_embeddings=16, type_vocab_size=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=3)
    return tf.BertForSequenceClassification(cfg), "cls"


def t5():
    cfg = tf.T5Config(num_layers=2, num_decoder_layers=2, d_model=16, d_kv=4, num_heads=4, d_ff=32, vocab_size=V,
                      dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, relative_attention_num_buckets=8)
    return tf.T5ForConditionalGeneration(cfg), "lm"


def llama():
    cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=32, vocab_size=V, max_position_embeddings=16, bos_token_id=0,
                         eos_token_id=0, pad_token_id=0)
    return tf.LlamaForCausalLM(cfg), "lm"


def vit():
    cfg = tf.ViTConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                       image_size=8, patch_size=4, num_channels=3, num_labels=3, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    return tf.ViTForImageClassification(cfg), "img"


FAMILIES = {"gpt2": gpt2, "bert": bert, "t5": t5, "llama": llama, "vit": vit}


def batch(kind: str, n: int, g: torch.Generator) -> dict:
    if kind == "img":
        return {"pixel_values": torch.randn(n, 3, 8, 8, generator=g), "labels": torch.randint(0, 3, (n,), generator=g)}
    x = torch.randint(1, V, (n, T), generator=g)
    if kind == "cls":
        return {"input_ids": x, "token_type_ids": torch.randint(0, 2, (n, T), generator=g),
                "labels": torch.randint(0, 3, (n,), generator=g)}
    return {"input_ids": x, "labels": x.clone()}  # every label token valid: per-sample mean = batch mean


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model, kind = FAMILIES[name]()
    return model.train(), kind


# ----------------------------------------------------------------------------- the reference
def brute_force_direction(model: nn.Module, kw: dict, names: list[str]) -> torch.Tensor:
    """(F + LAM I)^-1 gbar over the parameters ``names``: per-sample gradients of each sample's own
    loss (one backward per sample; all samples have equally many tokens, so the batch loss is their
    mean), F = U^T U / n solved through U's SVD (exact, no n x n Gram)."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(next(iter(kw.values())).shape[0]):
        loss = model(**{k: v[i:i + 1] for k, v in kw.items()}).loss
        gs = torch.autograd.grad(loss, [params[k] for k in names], allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(params[k])).reshape(-1)
                               for g, k in zip(gs, names)]))
    U = torch.stack(rows)
    n = U.shape[0]
    gbar = U.mean(0)
    _, S, Qt = torch.linalg.svd(U, full_matrices=False)
    proj = Qt @ gbar
    return Qt.T @ (proj / (S**2 / n + LAM)) + (gbar - Qt.T @ proj) / LAM


def flat_params(model: nn.Module, names: list[str]) -> torch.Tensor:
    params = dict(model.named_parameters())
    return torch.cat([params[k].detach().reshape(-1).clone() for k in names])


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_collect_step_equals_brute_force(f64, name):
    model, kind = build(name)
    model.double()
    kw = batch(kind, N, torch.Generator().manual_seed(1))
    opt = FNGD(model.parameters(), lr=1.0, momentum=0.0, damping=LAM, damping_mode="absolute", normalize="none",
               reuse="off")
    tables = prepare(opt, model)
    assert tables == {"exact": [f"{s}.block.0.layer.0.SelfAttention.relative_attention_bias"
                                for s in ("encoder", "decoder")] if name == "t5" else [], "shared": []}
    opt.attach(model)
    assert opt.coverage["element_fraction"] == 1.0, opt.coverage["line"]
    assert "Conv1D" not in opt.coverage["generic"]  # GPT-2's Conv1D by its own sampler
    names = [k for k, _ in model.named_parameters()]
    expected = brute_force_direction(model, kw, names)
    before = flat_params(model, names)
    opt.zero_grad()
    model(**kw).loss.backward()
    opt.step()
    err = rel(before - flat_params(model, names), expected)
    print(f"{name}: brute-force relative error {err:.2e}")
    assert err < 1e-8
    s = opt.stats()
    assert s["steps"]["collect_solved"] == 1
    assert s["unpreconditioned"] == {}, s["unpreconditioned_modules"]


@pytest.mark.parametrize("how", ["shared", "no prepare"])
def test_t5_bias_left_to_the_plain_gradient_is_named_and_counted(f64, how):
    """prepare(exact=False) declares T5's relative bias tables shared ('broadcast'); without prepare
    their (q, k) bucket inputs do not carry the batch ('sample_mismatch'). Every other parameter is
    still exact, and nothing raises."""
    model, kind = build("t5")
    model.double()
    kw = batch(kind, N, torch.Generator().manual_seed(1))
    opt = FNGD(model.parameters(), lr=1.0, momentum=0.0, damping=LAM, damping_mode="absolute", normalize="none",
               reuse="off")
    if how == "shared":
        assert len(prepare(opt, model, exact=False)["shared"]) == 2
    names = [k for k, _ in model.named_parameters() if "relative_attention_bias" not in k]
    expected = brute_force_direction(model, kw, names)
    before = flat_params(model, names)
    with pytest.warns(RuntimeWarning, match="relative_attention_bias"):
        opt.zero_grad()
        model(**kw).loss.backward()
        opt.step()
    assert rel(before - flat_params(model, names), expected) < 1e-8
    s = opt.stats()
    cause = "broadcast" if how == "shared" else "sample_mismatch"
    assert s["unpreconditioned"] == {cause: 2}
    assert len(s["unpreconditioned_modules"][cause]) == 2
    assert all("relative_attention_bias" in m for m in s["unpreconditioned_modules"][cause])
    assert s["steps"]["collect_solved"] == 1


# ----------------------------------------------------------------------------- the real Trainer
class Samples(torch.utils.data.Dataset):
    def __init__(self, kind: str, n: int):
        self.data = batch(kind, n, torch.Generator().manual_seed(3))

    def __len__(self):
        return next(iter(self.data.values())).shape[0]

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.data.items()}


def train(tmp_path, model, kind, opt, epochs=2):
    args = tf.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                max_grad_norm=1.0, num_train_epochs=epochs, report_to=[], use_cpu=True, logging_steps=1,
                                save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = tf.Trainer(model=model, args=args, train_dataset=Samples(kind, 16), optimizers=(opt, None),
                         callbacks=[FNGDCallback(opt)])
    result = trainer.train()
    return trainer, result


@pytest.mark.parametrize("name", list(FAMILIES))
def test_trainer(tmp_path, monkeypatch, name):
    lines = []
    monkeypatch.setattr(fngd_hf.trainer_logger, "info", lines.append)  # the Trainer's logger
    model, kind = build(name)
    before = [p.detach().clone() for p in model.parameters()]
    opt = FNGD(model.parameters(), lr=0.05)
    prepare(opt, model)
    trainer, result = train(tmp_path, model, kind, opt)
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert opt.coverage["element_fraction"] >= 0.99, opt.coverage["line"]
    s = opt.stats()
    steps = s["steps"]
    # 16 samples, batches of 4, 2 accumulated: 2 optimizer steps (4 forwards) per epoch
    assert steps == {"collect": 2, "collect_solved": 2, "reuse": 2, "reuse_weighted": 2}, s
    assert s["collect_steps"] == 4  # one solve per micro-batch
    assert s["unpreconditioned"] == {}, s["unpreconditioned_modules"]
    tail = "reuse misses (samples) 0; not preconditioned (all epochs): none; batches discarded by the host: 0"
    fngd_lines = [x for x in lines if x.startswith("FNGD")]
    assert len(fngd_lines) == 2, fngd_lines
    # the collect epoch's line ends with what its 4 solves did (diagnostics.py), the reuse epoch's does not
    assert fngd_lines[0].startswith(f"FNGD epoch 0: 2/2 collect steps solved, 0/0 reuse steps reweighted; {tail}; "
                                    "solves 4: damping (relative units) 1, direction cosine with the mean gradient ")
    assert fngd_lines[1] == f"FNGD epoch 1: 0/0 collect steps solved, 2/2 reuse steps reweighted; {tail}"
    logged = [h for h in trainer.state.log_history if "fngd/coverage" in h]
    assert logged and logged[-1]["fngd/reuse_weighted_steps"] == 2
    assert 0 < logged[-1]["fngd/direction_cosine"] <= 1 + 1e-9
    print(f"{name}: {opt.coverage['line'][:160]} | {steps} | {s['unpreconditioned']}")


def test_kfac_in_trainer_covers_conv1d(tmp_path):
    model, kind = build("gpt2")
    opt = KFAC(model.parameters(), lr=0.01, factor_update_steps=1, inv_update_steps=1)
    assert opt.coverage["covered"].get("Conv1D") == 16, opt.coverage["line"]
    before = [p.detach().clone() for p in model.parameters()]
    _, result = train(tmp_path, model, kind, opt)
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    s = opt.stats()
    assert s["steps"] == 4 and s["inverse_updates"] == 4 and s["inverse_failures"] == 0
    assert s["layers"] == 9  # 8 Conv1D + the lm_head Linear
    assert s["unpreconditioned"] == {}


def test_kfac_conv1d_is_the_transposed_linear(f64):
    """KFAC on a Conv1D moves its weight exactly as on the same Linear (weight transposed)."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(5, 7)
    lin = nn.Linear(7, 5)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.T)
        lin.bias.copy_(conv.bias)
    x = torch.randn(6, 3, 7)
    for m in (conv, lin):
        opt = KFAC(m.parameters(), lr=0.1, momentum=0.0, factor_update_steps=1, inv_update_steps=1, kl_clip=None)
        opt.zero_grad()
        m(x).square().sum().backward()
        opt.step()
    assert torch.allclose(conv.weight.T, lin.weight, atol=1e-12) and torch.allclose(conv.bias, lin.bias, atol=1e-12)


# ----------------------------------------------------------------------------- the shapes, by hand
class Affine(nn.Module):
    """A per-feature scale and shift no sampler is registered for (the torch.func fallback's)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.bias = nn.Parameter(torch.linspace(-0.1, 0.1, d))

    def forward(self, a):
        return torch.tanh(a) * self.weight + self.bias


class Flattening(nn.Module):
    """Hidden states reshaped to (-1, d) before a norm and an FFN, as some models do; ``time_major``
    flattens (T, n, d) instead, whose rows cannot be attributed to samples by a reshape."""

    def __init__(self, time_major: bool = False, norm: str = "layernorm"):
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.norm = nn.LayerNorm(8) if norm == "layernorm" else Affine(8)
        self.ffn = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)
        self.time_major = time_major

    def forward(self, x):
        h = self.inp(x)
        n, t, d = h.shape
        if self.time_major:
            f = self.ffn(self.norm(h.transpose(0, 1).reshape(-1, d))).view(t, n, d).transpose(0, 1)
        else:
            f = self.ffn(self.norm(h.reshape(-1, d))).view(n, t, d)
        return self.out(torch.tanh(f + h)).mean(1)


class Loss(nn.Module):
    """brute_force_direction's interface, model(**kw).loss, for a hand-made classifier."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, x, y):
        return SimpleNamespace(loss=nn.functional.cross_entropy(self.m(x), y))


def _step(model, x, y, **kw):
    opt = FNGD(model.parameters(), lr=1.0, momentum=0.0, damping=LAM, damping_mode="absolute", normalize="none",
               reuse="off", **kw)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return opt


@pytest.mark.parametrize("norm", ["layernorm", "fallback"])
def test_flattened_rows_are_exact(f64, norm):
    """LayerNorm's sampler and the torch.func fallback on n*T rows reshaped from (n, T, d)."""
    torch.manual_seed(0)
    model = Flattening(norm=norm)
    x, y = torch.randn(5, 4, 3), torch.randint(0, 2, (5,))
    names = [k for k, _ in model.named_parameters()]
    expected = brute_force_direction(Loss(model), {"x": x, "y": y}, ["m." + k for k in names])
    before = flat_params(model, names)
    opt = _step(model, x, y)
    assert opt.stats()["unpreconditioned"] == {}
    assert opt.coverage["generic"] == ({} if norm == "layernorm" else {"Affine": 2})
    assert rel(before - flat_params(model, names), expected) < 1e-8


def test_untraceable_rows_are_counted_not_raised(f64):
    torch.manual_seed(0)
    model = Flattening(time_major=True)
    x, y = torch.randn(5, 4, 3), torch.randint(0, 2, (5,))
    with pytest.warns(RuntimeWarning, match="'norm'"):
        opt = _step(model, x, y)
    s = opt.stats()
    # LayerNorm and the FFN see 20 rows of a transposed copy: counted, named, plain gradient
    assert s["unpreconditioned"] == {"sample_mismatch": 2}
    assert s["unpreconditioned_modules"]["sample_mismatch"] == ["LayerNorm 'norm'", "Linear 'ffn'"]
    assert s["steps"]["collect_solved"] == 1


class SharedTable(nn.Module):
    """A table indexed by positions alone, with no batch dimension ((T,) indices), added to every sample."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(10, 6)
        self.pos = nn.Embedding(7, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.tok(x) + self.pos(torch.arange(x.shape[1]))
        return self.out(torch.tanh(h)).mean(1)


@pytest.mark.parametrize("declared", [True, False])
def test_no_batch_dim_module_is_counted(f64, declared):
    torch.manual_seed(0)
    model = SharedTable()
    x, y = torch.randint(0, 10, (4, 7)), torch.randint(0, 3, (4,))
    opt = FNGD(model.parameters(), lr=0.1, reuse="off")
    if declared:
        opt.set_batch_dim(model.pos, None)
    cause = "broadcast" if declared else "sample_mismatch"
    with pytest.warns(RuntimeWarning, match="'pos'"):
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    s = opt.stats()
    assert s["unpreconditioned"] == {cause: 3}
    assert s["unpreconditioned_modules"] == {cause: ["Embedding 'pos'"]}
    assert s["steps"]["collect_solved"] == 3


def test_set_batch_dim_refuses_bad_values():
    opt = FNGD(nn.Linear(2, 2).parameters())
    with pytest.raises(ValueError, match="got -1"):
        opt.set_batch_dim(nn.Linear(2, 2), -1)


def test_core_imports_without_transformers():
    code = ("import sys; import fngd_plugin, fngd_plugin.samplers, fngd_plugin.kfac; "
            "assert 'transformers' not in sys.modules, 'imported transformers'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


class PairBias(nn.Module):
    """A table indexed by (query, key) buckets with no batch dimension, its (T, T, H) output permuted
    to (1, H, T, T) and added to per-sample scores, as T5's relative attention bias is."""

    def __init__(self, pullback):
        super().__init__()
        self.inp = nn.Linear(3, 2 * 4)
        self.table = nn.Embedding(5, 2)
        self.out = nn.Linear(4, 2)
        self.pullback = pullback
        self.capture = None

    def forward(self, x):
        n, t, _ = x.shape
        q, k = self.inp(x).view(n, t, 2, 4).permute(0, 2, 1, 3).split(2, dim=-1)
        scores = q @ k.transpose(-1, -2)  # (n, H, t, t)
        buckets = (torch.arange(t)[None, :] - torch.arange(t)[:, None]).clamp(-2, 2) + 2
        bias = self.table(buckets).permute(2, 0, 1).unsqueeze(0)
        if self.capture is not None:
            bias = self.capture.broadcast_output(self.table, bias, self.pullback)
        h = torch.softmax(scores + bias, dim=-1).mean(1)  # (n, t, t)
        return self.out(h[:, :, :4]).mean(1)


@pytest.mark.parametrize("right", [True, False])
def test_broadcast_output_is_exact_and_checked(f64, right):
    """broadcast_output: exact per-sample gradients of a table whose permuted output is broadcast;
    a pullback that does not undo the permutation is refused (counted, never used)."""
    torch.manual_seed(0)
    model = PairBias((lambda g: g.permute(0, 2, 3, 1)) if right else (lambda g: g.permute(0, 3, 2, 1)))
    x, y = torch.randn(5, 6, 3), torch.randint(0, 2, (5,))
    names = [k for k, _ in model.named_parameters()]
    exact = names if right else [k for k in names if not k.startswith("table")]
    expected = brute_force_direction(Loss(model), {"x": x, "y": y}, ["m." + k for k in exact])
    before = flat_params(model, exact)
    opt = FNGD(model.parameters(), lr=1.0, momentum=0.0, damping=LAM, damping_mode="absolute", normalize="none",
               reuse="off")
    model.capture = opt._capture
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert rel(before - flat_params(model, exact), expected) < 1e-8
    assert opt.stats()["unpreconditioned"] == ({} if right else {"sample_mismatch": 1})
