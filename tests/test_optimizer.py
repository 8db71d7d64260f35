"""The torch.optim contract around FNGD: hooks, resume, AMP, bad input, non-finite values, coverage."""

import copy
import gc
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F
from models import MODELS, restore, snapshot
from oracle import per_sample_grads
from torch import nn
from torch.nn.modules import module as nn_module

import fngd_plugin.gram as smw
from fngd_plugin import FNGD


def hook_count():
    return len(nn_module._global_forward_hooks) + len(nn_module._global_forward_pre_hooks)


def train(model, opt, batches, ids=None):
    for i, (x, y) in enumerate(batches):
        if ids is not None:
            opt.set_sample_ids(ids[i])
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


# ------------------------------------------------------------------------------------------ hooks
def test_hooks_go_away_with_the_optimizer():
    gc.collect()
    before = hook_count()
    model = MODELS["mlp"]()
    opt = FNGD(model.parameters(), lr=0.1, reuse="off")
    assert hook_count() == before + 2
    del opt
    gc.collect()
    assert hook_count() == before


def test_other_modules_and_torch_func_are_undisturbed(f64):
    model = MODELS["cnn"]()
    other = MODELS["cnn"]()
    (x, y), loss_one = model.batch(5)
    ref = per_sample_grads(model, loss_one, x, y)
    other_grads = torch.autograd.grad(F.cross_entropy(other(x), y), list(other.parameters()))

    opt = FNGD(model.parameters(), lr=0.1, reuse="position", steps_per_epoch=1)
    train(model, opt, [(x, y)])  # collect epoch
    restore(model, snapshot(model))
    assert not opt.in_collect_phase
    # torch.func on the owned model: same per-sample gradients, nothing captured
    got = per_sample_grads(model, loss_one, x, y)
    ref_now = {k: v for k, v in got.items()}
    assert not opt._capture.pending
    # an unrelated model trained beside it gets its ordinary gradients, even in the reuse phase
    model.train()
    _ = model(x)  # a reuse-phase forward of the owned model (output reweighting armed)
    g2 = torch.autograd.grad(F.cross_entropy(other(x), y), list(other.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(other_grads, g2))
    assert set(ref_now) == set(ref)


def test_eval_and_no_grad_forwards_do_not_count():
    model = MODELS["mlp"]()
    opt = FNGD(model.parameters(), lr=0.1, steps_per_epoch=2)
    (x, y), _ = model.batch(4)
    with torch.no_grad():
        model(x)
    model.eval()
    model(x)
    model.train()
    assert opt.schedule.position == 0 and not opt._capture.pending


# ------------------------------------------------------------------------------------------ resume
def make_run(reuse="position"):
    torch.manual_seed(1)
    model = MODELS["embed_seq"]()
    opt = FNGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, reuse=reuse, steps_per_epoch=3,
               collect_epochs=1, damping=0.5)
    g = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(3):
        x = torch.randint(1, 11, (5, 7), generator=g)
        x[:, 5:] = 0
        batches.append((x, torch.randint(0, 3, (5,), generator=g)))
    ids = [torch.arange(5 * i, 5 * i + 5) for i in range(3)]
    return model, opt, batches * 3, ids * 3


@pytest.mark.parametrize("reuse", ["position", "sample"])
@pytest.mark.parametrize("stop", [2, 5])  # in the collect epoch, in the reuse phase
def test_resume_is_bitwise_identical(reuse, stop):
    model, opt, batches, ids = make_run(reuse)
    train(model, opt, batches, ids)
    final = snapshot(model)

    model, opt, batches, ids = make_run(reuse)
    train(model, opt, batches[:stop], ids[:stop])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    del opt
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, opt2, _, _ = make_run(reuse)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.epoch == (0 if stop < 3 else 1)
    train(model2, opt2, batches[stop:], ids[stop:])
    assert torch.equal(snapshot(model2), final)


def test_state_dict_round_trip_keeps_store():
    model, opt, batches, ids = make_run("sample")
    train(model, opt, batches[:3], ids[:3])
    sd = opt.state_dict()
    assert sd["fngd"]["store"]["keying"] == "sample"
    opt2 = FNGD(model.parameters(), lr=0.05, reuse="sample", steps_per_epoch=3)
    opt2.load_state_dict(copy.deepcopy(sd))
    assert opt2.stats()["stored"] == 15
    with pytest.raises(ValueError, match="keyed by"):
        FNGD(model.parameters(), lr=0.05, reuse="position", steps_per_epoch=3).load_state_dict(copy.deepcopy(sd))


def test_store_export_merge_gives_every_worker_the_same_store():
    # what distributed reuse="sample" does at each epoch start: workers solved disjoint sentences
    from fngd_plugin import CoefficientStore

    workers = [CoefficientStore("sample") for _ in range(3)]
    solved = [torch.tensor([0, 5, 9]), torch.tensor([1, 2, 30]), torch.tensor([7])]
    for w, (store, ids) in enumerate(zip(workers, solved)):
        for block in (0, 4):
            c = torch.arange(ids.numel(), dtype=torch.float64) + 10 * w + block
            if w == 1 and block == 4:
                c[0] = math.nan  # a non-finite coefficient is not shared (nor stored)
            store.put(block, c, ids=ids, position=0)
    parts = [store.export(ids) for store, ids in zip(workers, solved)]
    for store in workers:
        store.merge(parts)
    every = torch.arange(32)
    for block in (0, 4):
        want = {0: 0, 5: 1, 9: 2, 1: 10, 2: 11, 30: 12, 7: 20}
        got = [s.get(block, 32, ids=every, position=0, device=torch.device("cpu")) for s in workers]
        for g in got:
            assert torch.equal(g, got[0])
        for i, v in want.items():
            if not (block == 4 and i == 1):
                assert float(got[0][i]) == v + block
    sds = [s.state_dict()["samples"] for s in workers]
    assert all(torch.equal(sd[4]["filled"], sds[0][4]["filled"]) and torch.equal(sd[4]["values"], sds[0][4]["values"])
               for sd in sds)
    assert int(sds[0][4]["filled"].sum()) == 6 and int(sds[0][0]["filled"].sum()) == 7
    with pytest.raises(ValueError, match="reuse='sample'"):
        CoefficientStore("position").export(torch.tensor([0]))


def test_check_options_is_the_constructors_check_with_structured_errors():
    from fngd_plugin import KFAC, OptionError

    FNGD.check_options(lr=0.1, damping=0.5, reuse="sample")  # nothing wrong: returns
    for cls, kw, name, reason in [(FNGD, dict(damping=-1.0), "damping", "must be > 0.0"),
                                  (FNGD, dict(reuse="bogus"), "reuse", "is not supported; allowed: "),
                                  (FNGD, dict(momentum=1.0), "momentum", "must be < 1"),
                                  (KFAC, dict(factor_decay=1.5), "factor_decay", "must be < 1")]:
        with pytest.raises(OptionError) as e:
            cls.check_options(**kw)
        assert (e.value.name, e.value.value) == (name, kw[name]) and e.value.reason.startswith(reason)
        with pytest.raises(OptionError, match=f"^{name}="):  # the constructor raises the same
            cls(MODELS["mlp"]().parameters(), **kw)
    with pytest.raises(TypeError):
        FNGD.check_options(lr="0.1")
    with pytest.raises(TypeError, match="bogus"):
        FNGD.check_options(bogus=1)


# ------------------------------------------------------------------------------------------ AMP
def test_autocast_bf16_follows_fp32():
    def run(autocast):
        torch.manual_seed(0)
        model = MODELS["linear_ln"]()
        opt = FNGD(model.parameters(), lr=0.5, steps_per_epoch=4)
        (x, y), _ = model.batch(32)
        losses = []
        for _ in range(12):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        assert opt.stats()["collect_steps"] == 4
        return losses

    bf16, fp32 = run(True), run(False)
    assert all(math.isfinite(v) for v in bf16)
    assert bf16[-1] < bf16[0] * 0.8
    assert abs(bf16[-1] - fp32[-1]) < 0.05 * fp32[-1]


def test_grad_scaler_same_step_and_skipped_step_stores_nothing(f64):
    model = MODELS["mlp"]()
    (x, y), _ = model.batch(8)
    p0 = snapshot(model)
    kw = dict(lr=1.0, momentum=0.0, damping=0.3, damping_mode="absolute", normalize="none", steps_per_epoch=2)
    opt = FNGD(model.parameters(), **kw)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    plain = snapshot(model) - p0

    restore(model, p0)
    opt = FNGD(model.parameters(), **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.allclose(snapshot(model) - p0, plain, rtol=1e-10, atol=1e-14)

    # an overflowing batch: GradScaler skips the step; FNGD must not store its coefficients
    p1 = snapshot(model)
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y) * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(snapshot(model), p1)
    assert opt.stats()["stored"] == 8  # only the first batch's coefficients


# ------------------------------------------------------------------------------------------ non-finite
def test_nan_gradients_never_reach_parameters_or_store():
    model = MODELS["mlp"]()
    opt = FNGD(model.parameters(), lr=0.1, reuse="position", steps_per_epoch=3)
    (x, y), _ = model.batch(6)
    train(model, opt, [(x, y)])
    p1 = snapshot(model)
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    bad = x.clone()
    bad[2, 1] = float("nan")
    train(model, opt, [(bad, y)])
    assert torch.equal(snapshot(model), p1)
    assert all(torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(model.parameters(), bufs))
    assert opt.stats()["skipped_steps"] == 1
    train(model, opt, [(x, y)])  # epoch 1 starts: reuse; position 1 holds NaN coefficients -> fallback
    train(model, opt, [(x, y)] * 2)
    assert torch.isfinite(snapshot(model)).all()
    assert opt.stats()["store_misses"] >= 6


def test_failed_cholesky_falls_back_and_is_reported(monkeypatch):
    K = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # indefinite: no Cholesky even with jitter
    c, fell_back = smw.solve_coefficients(K, 0.1, "absolute")
    assert bool(fell_back) and torch.allclose(c, torch.full((2,), 1 / 1.2, dtype=torch.float64))

    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda A: (real(A)[0], torch.ones((), dtype=torch.int32)))
    model = MODELS["mlp"]()
    opt = FNGD(model.parameters(), lr=0.1, reuse="off")
    (x, y), _ = model.batch(6)
    train(model, opt, [(x, y)] * 2)
    assert opt.stats()["solve_fallbacks"] == 2
    assert torch.isfinite(snapshot(model)).all()
    with pytest.warns(RuntimeWarning, match="fell back"):
        opt.set_epoch(1)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(lr=-1.0), "lr=-1.0"),
        (dict(damping=0.0), "damping=0.0 must be > 0"),
        (dict(damping=float("nan")), "damping"),
        (dict(damping_mode="rel"), "damping_mode='rel' is not supported; allowed: 'relative', 'absolute'"),
        (dict(coefficients="block"), "allowed: 'network', 'layer'"),
        (dict(reuse="id"), "allowed: 'position', 'sample', 'off'"),
        (dict(normalize="mean"), "normalize='mean'"),
        (dict(collect_epochs=0), "collect_epochs=0"),
        (dict(steps_per_epoch=0), "steps_per_epoch=0"),
        (dict(momentum=1.0), "momentum=1.0 must be < 1"),
        (dict(nesterov=True, momentum=0.0), "nesterov"),
        (dict(max_update_norm=-1.0), "max_update_norm"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        FNGD(MODELS["mlp"]().parameters(), **{"lr": 0.1, **kw})


def test_bad_types_and_missing_schedule():
    with pytest.raises(TypeError, match="steps_per_epoch=2.5 must be an integer"):
        FNGD(MODELS["mlp"]().parameters(), lr=0.1, steps_per_epoch=2.5)
    model = MODELS["mlp"]()
    (x, y), _ = model.batch(4)
    opt = FNGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        model(x)
    del opt
    gc.collect()
    opt = FNGD(model.parameters(), lr=0.1, reuse="sample")
    with pytest.raises(ValueError, match="set_sample_ids"):
        model(x)
    with pytest.raises(TypeError, match="1-D integer"):
        opt.set_sample_ids(torch.rand(4))
    with pytest.raises(ValueError, match=">= 0"):
        opt.set_sample_ids([-1, 2])


def test_time_first_layout_mismatch_is_named():
    class TimeFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x):  # x: (B, T, C) -> inner runs time-first
            h = self.inner(x.transpose(0, 1)).transpose(0, 1)
            return self.head(h.mean(1))

    model = TimeFirst()
    x, y = torch.randn(4, 6, 3), torch.randint(0, 2, (4,))
    opt = FNGD(model.parameters(), lr=0.1, reuse="off")
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    # never an exception for a model that trains with SGD: the module is named, counted, plain gradient
    with pytest.warns(RuntimeWarning, match=r"Linear 'inner'.*set_batch_dim\(module, dim\)"):
        opt.step()
    assert opt.stats()["unpreconditioned"] == {"sample_mismatch": 1}
    assert opt.stats()["unpreconditioned_modules"] == {"sample_mismatch": ["Linear 'inner'"]}
    opt.set_batch_dim(model.inner, 1)
    train(model, opt, [(x, y)])
    assert opt.stats()["unpreconditioned"] == {"sample_mismatch": 1}  # declared: exact from then on
    assert torch.isfinite(snapshot(model)).all()


# ------------------------------------------------------------------------------------------ coverage
def test_coverage_report_and_uncovered_update(f64, caplog):
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 4, batch_first=True)
            self.head = nn.Linear(4, 2)
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1]) * self.scale

    model = Mixed()
    # the torch.func fallback covers the GRU by default; the model's own `scale` stays uncovered
    default = FNGD(model.parameters(), lr=1.0, reuse="off").coverage
    assert default["generic"] == {"GRU": 4} and default["uncovered"] == {"Mixed": 1}, default["line"]
    assert "the model's own parameters (scale), used outside any submodule" in default["line"]
    assert default["elements"] == (sum(p.numel() for p in model.parameters()) - 1,
                                   sum(p.numel() for p in model.parameters()))
    del default
    with caplog.at_level("INFO", logger="fngd_plugin"):
        opt = FNGD(model.parameters(), lr=1.0, momentum=0.0, reuse="off", normalize="none", damping=0.3,
                   damping_mode="absolute", generic_fallback=False)
    line = opt.coverage["line"]
    assert line in caplog.text
    assert "2/7 parameter tensors, 8.40% of parameter elements covered (Linear 2)" in line
    assert "GRU 4 (no sampler for GRU)" in line and "Mixed 1" in line
    x, y = torch.randn(6, 5, 3), torch.randint(0, 2, (6,))
    # uncovered parameters: host gradient times sum_i c_i, with c from the covered Gram
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    host = {n: p.grad.clone() for n, p in model.named_parameters()}
    h = model.rnn(x)[0][:, -1].detach() * model.scale.detach()
    a = torch.cat([h, torch.ones(6, 1)], 1)
    delta = (torch.softmax(model.head(h), 1) - F.one_hot(y, 2)) / 6  # mean-loss output gradient
    K = (a @ a.T) * (delta @ delta.T) * 36  # true units: g_i = n * raw
    c = torch.linalg.solve(K + 6 * 0.3 * torch.eye(6), torch.ones(6))
    opt.step()
    assert torch.allclose(model.rnn.weight_hh_l0.grad, host["rnn.weight_hh_l0"] * c.sum())
    assert torch.allclose(model.scale.grad, host["scale"] * c.sum())


def test_max_update_norm_clips_the_direction(f64):
    model = MODELS["mlp"]()
    (x, y), _ = model.batch(8)
    p0 = snapshot(model)
    steps = {}
    for clip in (None, 1e-3):
        restore(model, p0)
        opt = FNGD(model.parameters(), lr=1.0, momentum=0.0, reuse="off", max_update_norm=clip)
        train(model, opt, [(x, y)])
        steps[clip] = p0 - snapshot(model)
        del opt
    assert float(steps[None].norm()) > 1e-3
    assert float(steps[1e-3].norm()) == pytest.approx(1e-3, rel=1e-9)
    assert torch.allclose(steps[1e-3] / 1e-3, steps[None] / steps[None].norm())


def test_forwards_without_steps_do_not_hoard_activations():
    from fngd_plugin.capture import MAX_PENDING

    model = MODELS["mlp"]()
    opt = FNGD(model.parameters(), lr=0.1, reuse="off")
    (x, y), _ = model.batch(4)
    with pytest.warns(RuntimeWarning, match="without optimizer.step"):
        for _ in range(MAX_PENDING + 5):
            F.cross_entropy(model(x), y).backward()
    assert len(opt._capture.pending) == MAX_PENDING


def test_hooks_of_an_optimizer_collected_during_a_compile_wait_until_it_ends():
    """gc can collect an old optimizer while dynamo compiles (it allocates a lot); dynamo then builds
    guards on the global hook dict it traced, so the hooks must stay until the compile is over."""
    import torch._guards as guards

    from fngd_plugin import capture

    gc.collect()
    before = hook_count()
    opt = FNGD(MODELS["mlp"]().parameters(), lr=0.1, reuse="off")
    with guards.compile_context(guards.CompileContext(None)):
        del opt
        gc.collect()
        assert hook_count() == before + 2 and len(capture._deferred) == 2
    opt2 = FNGD(MODELS["mlp"]().parameters(), lr=0.1, reuse="off")  # the next capture clears them
    assert hook_count() == before + 2 and not capture._deferred
    del opt2
    gc.collect()
    assert hook_count() == before


def test_update_adamw_is_torch_adamw_fed_the_fngd_direction(f64):
    """update="adamw": at every step the parameters move as torch.optim.AdamW's would, given as its
    gradient the direction FNGD computes at those parameters (read off an update="sgd", lr 1,
    momentum 0 step of a copy; reuse="off", so the direction depends on the parameters and batch only)."""
    torch.manual_seed(0)
    model = MODELS["cnn"]()
    batches = [model.batch(6)[0] for _ in range(4)]
    probe, ref = copy.deepcopy(model), copy.deepcopy(model)
    start = snapshot(model)
    kw = dict(reuse="off", damping=0.5, weight_decay=0.1)
    opt = FNGD(model.parameters(), lr=0.01, momentum=0.8, beta2=0.99, eps=1e-6, update="adamw", **kw)
    adamw = torch.optim.AdamW(ref.parameters(), lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1,
                              foreach=False)
    for x, y in batches:
        # FNGD's direction at ref's parameters: one plain step of a copy
        restore(probe, snapshot(ref))
        plain = FNGD(probe.parameters(), lr=1.0, momentum=0.0, **{**kw, "weight_decay": 0.0})
        train(probe, plain, [(x, y)])
        direction = snapshot(ref) - snapshot(probe)
        del plain
        offset = 0
        for p in ref.parameters():
            p.grad = direction[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        adamw.step()
        train(model, opt, [(x, y)])
        assert torch.allclose(snapshot(model), snapshot(ref), rtol=1e-10, atol=1e-12)
    assert float((snapshot(model) - start).abs().max()) > 1e-3  # it moved


@pytest.mark.parametrize("kw,match", [
    (dict(update="adam"), "update='adam' is not supported; allowed: 'sgd', 'adamw'"),
    (dict(update="adamw", nesterov=True), "nesterov=True is for update='sgd'"),
    (dict(beta2=1.0), "beta2=1.0 must be < 1"),
    (dict(eps=0.0), "eps=0.0 must be > 0"),
])
def test_bad_update_options(kw, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        FNGD.check_options(lr=0.1, **kw)


# ------------------------------------------------------------------------------ what the direction does
def _brute_direction_stats(U: torch.Tensor, lam: float, normalize: str) -> dict:
    """From per-sample gradients U (n, d) and an explicit d x d solve: the applied step's
    first-order effect on each sample's loss, its cosine with gbar, its decrease vs SGD."""
    n, d = U.shape
    direction = torch.linalg.solve(U.T @ U / n + lam * torch.eye(d, dtype=U.dtype), U.mean(0))
    c = torch.linalg.lstsq(U.T, direction.unsqueeze(1)).solution.squeeze(1)  # direction = U^T c
    assert torch.allclose(U.T @ c, direction, atol=1e-8)
    step = direction / c.sum() if normalize == "sum" else direction
    gbar = U.mean(0)
    per_sample = U @ step  # first-order rate of fall of each sample's loss along the step
    return {"ascent_share": float((per_sample < 0).double().mean()),
            "direction_cosine": float(step @ gbar / (step.norm() * gbar.norm())),
            "decrease_vs_sgd": float(gbar @ step / (gbar @ gbar)),
            "coef_ess_share": float(c.sum() ** 2 / (n * (c * c).sum())),
            "negative": float((c < 0).double().mean()), "per_sample": per_sample, "c": c, "step": step}


@pytest.mark.parametrize("normalize", ["none", "sum"])
@pytest.mark.parametrize("damping", [1e-3, 10.0])
def test_direction_statistics_match_brute_force(f64, damping, normalize):
    """stats()'s ascent share, cosine with the mean gradient, decrease vs SGD and effective sample
    size equal what torch.func per-sample gradients and a d x d solve give for the step FNGD applied
    (measured as the parameter change), and g_j . d = 1 - n lambda c_j. A negative coefficient is
    not ascent: at small damping many coefficients are negative while no sample's loss rises."""
    model = MODELS["mlp"]()
    (x, y), loss_one = model.batch(12)
    gs = per_sample_grads(model, loss_one, x, y)
    names = [k for k, _ in model.named_parameters()]
    U = torch.cat([gs[k].reshape(12, -1) for k in names], dim=1)  # (n, d), d > n
    n = U.shape[0]
    want = _brute_direction_stats(U, damping, normalize)
    # the identity the diagnostic rests on, from the d x d side: g_j . d = 1 - n lambda c_j
    raw = U @ (U.T @ want["c"])
    assert torch.allclose(raw, 1 - n * damping * want["c"], atol=1e-8)

    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    opt = FNGD(model.parameters(), lr=1.0, momentum=0.0, damping=damping, damping_mode="absolute",
               normalize=normalize, reuse="off")
    train(model, opt, [(x, y)])
    moved = before - torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.allclose(moved, want["step"], rtol=1e-7, atol=1e-10)  # the step the statistics describe
    s = opt.stats()
    for k in ("ascent_share", "direction_cosine", "decrease_vs_sgd", "coef_ess_share"):
        assert s[k] == pytest.approx(want[k], rel=1e-6, abs=1e-9), k
    assert s["damping_relative"] == pytest.approx(n * n * damping / float((U * U).sum()), rel=1e-9)
    if damping < 1:
        assert want["negative"] > 0.1 and s["ascent_share"] == 0.0  # negative c, yet every loss falls
    else:
        assert s["direction_cosine"] > 0.99  # heavy damping: the mean gradient's direction


def test_ascent_share_counts_samples_whose_loss_rises(f64):
    """Labels that conflict (two copies of each input with different targets) make the damped step
    raise some samples' losses: the share stats() reports is the share whose loss rises to first
    order, and a tiny step (lr 1e-6) raises exactly those samples' losses in the model itself."""
    model = MODELS["mlp"]()
    (x, y), loss_one = model.batch(8)
    x = torch.cat([x, x])
    y = torch.cat([y, (y + 1) % int(y.max() + 1)])
    gs = per_sample_grads(model, loss_one, x, y)
    U = torch.cat([gs[k].reshape(16, -1) for k, _ in model.named_parameters()], dim=1)
    want = _brute_direction_stats(U, 10.0, "sum")
    assert 0 < want["ascent_share"] < 1
    per_loss = torch.func.vmap(lambda xi, yi: loss_one(model(xi.unsqueeze(0)), yi.unsqueeze(0)))
    with torch.no_grad():
        l0 = per_loss(x, y)
    opt = FNGD(model.parameters(), lr=1e-6, momentum=0.0, damping=10.0, damping_mode="absolute", reuse="off")
    train(model, opt, [(x, y)])
    with torch.no_grad():
        rose = per_loss(x, y) > l0
    assert opt.stats()["ascent_share"] == pytest.approx(float(rose.double().mean()))
    assert torch.equal(rose, want["per_sample"] < 0)


@pytest.mark.parametrize("mode,damping", [("top", 0.3), ("cosine", 0.7)])
def test_spectral_damping_modes_are_damped_ngd_at_the_shift_they_define(f64, mode, damping):
    """top: n lambda = damping * lambda_max(K); cosine: the smallest n lambda (within the grid's 2%)
    at which cos(d, gbar) >= damping. Both checked against the d x d solve at that lambda, from
    torch.func per-sample gradients; stats()['damping_by_epoch'] reports the choice per epoch."""
    model = MODELS["mlp"]()
    (x, y), loss_one = model.batch(12)
    gs = per_sample_grads(model, loss_one, x, y)
    U = torch.cat([gs[k].reshape(12, -1) for k, _ in model.named_parameters()], dim=1)
    n = U.shape[0]
    K = U @ U.T
    trace_K = float(K.trace())

    def cos_at(lam: float) -> float:
        return _brute_direction_stats(U, lam, "none")["direction_cosine"]

    if mode == "top":
        lam = damping * float(torch.linalg.eigvalsh(K)[-1]) / n
        r = (1 + damping) / damping
        assert cos_at(lam) >= 2 * r**0.5 / (1 + r) - 1e-12  # the size-free bound of the docstring
    else:
        lo, hi = 1e-12, 1e6 * trace_K / n**2  # bisection on the brute-force cosine
        for _ in range(200):
            mid = (lo * hi) ** 0.5
            lo, hi = (lo, mid) if cos_at(mid) >= damping else (mid, hi)
        lam = hi
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    opt = FNGD(model.parameters(), lr=1.0, momentum=0.0, damping=damping, damping_mode=mode, normalize="none",
               reuse="off", steps_per_epoch=1)
    train(model, opt, [(x, y)])
    moved = before - torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    chosen = opt.stats()["damping_relative"] * trace_K / n**2  # back to lambda
    if mode == "top":
        assert chosen == pytest.approx(lam, rel=1e-9)
        assert torch.allclose(moved, _brute_direction_stats(U, lam, "none")["step"], rtol=1e-7, atol=1e-10)
    else:
        assert lam <= chosen <= lam * 10**0.021  # the smallest grid point at or above the exact one
        assert opt.stats()["direction_cosine"] >= damping
        assert torch.allclose(moved, _brute_direction_stats(U, chosen, "none")["step"], rtol=1e-7, atol=1e-10)
    train(model, opt, [(x, y)])  # the second epoch starts: the first one's choice is recorded
    assert opt.stats()["damping_by_epoch"][0] == pytest.approx(opt.stats()["damping_relative"], rel=0.5)
    assert 0 in opt.stats()["damping_by_epoch"]


def test_cosine_damping_needs_a_cosine_below_one():
    model = MODELS["mlp"]()
    with pytest.raises(ValueError, match=r"damping=1.5 is a target cosine with damping_mode='cosine'"):
        FNGD(model.parameters(), damping=1.5, damping_mode="cosine")
    with pytest.raises(ValueError, match="damping_mode='spectral' is not supported; allowed: 'relative', "
                                         "'absolute', 'top', 'cosine'"):
        FNGD(model.parameters(), damping_mode="spectral")


def test_trace_writes_one_line_per_solve(f64, tmp_path):
    """trace=PATH: one JSON line per solve, whose numbers are stats()'s and whose module shares of
    |d|^2 sum to 1 and equal the brute-force split of the direction over the two Linear layers."""
    model = MODELS["mlp"]()
    (x, y), loss_one = model.batch(12)
    gs = per_sample_grads(model, loss_one, x, y)
    names = [k for k, _ in model.named_parameters()]
    U = torch.cat([gs[k].reshape(12, -1) for k in names], dim=1)
    step = _brute_direction_stats(U, 0.01, "none")["step"]
    path = tmp_path / "trace.jsonl"
    opt = FNGD(model.parameters(), lr=1.0, momentum=0.0, damping=0.01, damping_mode="absolute", normalize="none",
               reuse="off", trace=str(path))
    train(model, opt, [(x, y)])
    lines = [json.loads(t) for t in path.read_text().splitlines()]
    assert len(lines) == 1
    line = lines[0]
    assert line["cosine"] == pytest.approx(opt.stats()["direction_cosine"], rel=1e-12)
    assert sum(line["norm_share"].values()) == pytest.approx(1.0)
    offsets, i = {}, 0
    for k in names:
        offsets[k] = slice(i, i + gs[k][0].numel())
        i += gs[k][0].numel()
    modules = dict(model.named_modules())
    for name, share in line["norm_share"].items():
        mod = name.split("'")[1]
        part = torch.cat([step[offsets[k]] for k in names if k.rsplit(".", 1)[0] == mod])
        assert share == pytest.approx(float(part @ part / (step @ step)), rel=1e-6), name
        assert mod in modules
    assert 0 < line["top_share"] <= 1 and line["condition"] >= 1
    assert set(line["cosine_at_relative"]) == {"0.01", "0.1", "1.0", "10.0", "100.0"}


def test_checkpoint_without_a_newer_counter_still_loads():
    """A checkpoint written before a counter existed loads, the counter starting at zero."""
    model = MODELS["mlp"]()
    opt = FNGD(model.parameters(), lr=0.1, reuse="off")
    (x, y), _ = model.batch(4)
    train(model, opt, [(x, y)])
    sd = opt.state_dict()
    del sd["fngd"]["counters"]["cosine_sum"]
    again = FNGD(model.parameters(), lr=0.1, reuse="off")
    again.load_state_dict(sd)
    assert again.stats()["direction_cosine"] == 0.0
    train(model, again, [(x, y)])  # and counts on from there
    assert again.stats()["collect_steps"] == 2 and 0 < again.stats()["direction_cosine"] <= 0.5 + 1e-12


@pytest.mark.parametrize("reuse,coefficients", [("sample", "network"), ("sample", "layer")])
def test_wrong_number_of_sample_ids_is_named_in_a_collect_step(reuse, coefficients):
    """A collect step given 10 ids for a batch of 16 refuses with the counts, not a shape error."""
    model = MODELS["mlp"]()
    opt = FNGD(model.parameters(), lr=0.1, reuse=reuse, coefficients=coefficients)
    (x, y), _ = model.batch(16)
    opt.set_sample_ids(torch.arange(10))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="set_sample_ids got 10 ids but the model output has batch size 16"):
        opt.step()
