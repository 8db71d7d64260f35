"""FNGD steps against brute force: torch.func per-sample gradients and an explicit d x d solve.

The oracle runs on the CPU in float64; the optimizer runs where the ``target`` fixture says
(FNGD_TEST_DEVICE, FNGD_TEST_AUTOCAST; by default also the CPU in float64, to 1e-8)."""

import pytest
import torch
from models import MODELS, module_blocks, restore, snapshot
from oracle import blockwise_direction, flat, ngd_direction, per_sample_grads
from run_target import Target

from fngd_plugin import FNGD

LAM = 0.37


def exact_opt(model, **kw):
    args = dict(lr=1.0, momentum=0.0, damping=LAM, damping_mode="absolute", normalize="none", reuse="off")
    args.update(kw)
    return FNGD(model.parameters(), **args)


def oracle_step(model, loss_one, inputs, coefficients, lam=LAM):
    model = Target.reference(model)
    gs = per_sample_grads(model, loss_one, *(Target.host(t) if t.is_floating_point() else t.cpu() for t in inputs))
    names = [k for k, _ in model.named_parameters()]
    if coefficients == "network":
        return ngd_direction(flat(gs, names), lam)
    d = blockwise_direction(gs, module_blocks(model), lam)
    return torch.cat([d[k].reshape(-1) for k in names])


def rel(a, b):
    a, b = Target.host(a), Target.host(b)
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("coefficients", ["network", "layer"])
@pytest.mark.parametrize("name", list(MODELS))
def test_collect_step_is_damped_ngd(f64, target, name, coefficients):
    model = MODELS[name]()
    (x, y), loss_one = model.batch(10)
    expected = oracle_step(model, loss_one, (x, y), coefficients)
    model = target.model(model)
    x, y = target.put(x, y)
    opt = exact_opt(model, coefficients=coefficients)
    assert not opt.coverage["uncovered"], opt.coverage["line"]
    before = snapshot(model)
    opt.zero_grad()
    with target.run():  # autocast around forward and loss only, as AMP recipes do
        loss = loss_one(model(x), y)
    loss.backward()
    opt.step()
    assert rel(before - snapshot(model), expected) < target.tol


@pytest.mark.parametrize("scale", [1.0, 37.0])
def test_loss_scale_and_sum_reduction_mean_the_same(f64, target, scale):
    """A sum-reduced or scaled loss must give the same step as the mean loss (scale is measured)."""
    model = MODELS["mlp"]()
    (x, y), loss_one = model.batch(9)
    expected = oracle_step(model, loss_one, (x, y), "network")
    model = target.model(model)
    x, y = target.put(x, y)
    opt = exact_opt(model)
    before = snapshot(model)
    opt.zero_grad()
    with target.run():
        loss = torch.nn.functional.cross_entropy(model(x), y, reduction="sum") * scale
    loss.backward()
    for p in model.parameters():  # the host divides by the sample count afterwards (as fairseq does)
        p.grad.div_(9 * scale)
    opt.step()
    assert rel(before - snapshot(model), expected) < target.tol


def test_relative_damping_definition(f64, target):
    """relative: n lambda = damping * trace(K) / n, i.e. lambda_abs = damping * mean |g_i|^2 / n."""
    model = MODELS["mlp"]()
    (x, y), loss_one = model.batch(8)
    gs = per_sample_grads(model, loss_one, x, y)
    U = flat(gs, [k for k, _ in model.named_parameters()])
    lam_abs = 0.5 * (U * U).sum() / 8 / 8
    expected = ngd_direction(U, float(lam_abs))
    model = target.model(model)
    x, y = target.put(x, y)
    opt = exact_opt(model, damping=0.5, damping_mode="relative")
    before = snapshot(model)
    opt.zero_grad()
    with target.run():
        loss = loss_one(model(x), y)
    loss.backward()
    opt.step()
    assert rel(before - snapshot(model), expected) < target.tol


def test_normalize_sum_is_ngd_at_sgd_scale(f64, target):
    """normalize='sum': the direction is sum c_i g_i / sum c_i."""
    model = MODELS["mlp"]()
    (x, y), loss_one = model.batch(8)
    gs = per_sample_grads(model, loss_one, x, y)
    U = flat(gs, [k for k, _ in model.named_parameters()])
    c = torch.linalg.solve(U @ U.T + 8 * LAM * torch.eye(8), torch.ones(8))
    expected = U.T @ (c / c.sum())
    model = target.model(model)
    x, y = target.put(x, y)
    opt = exact_opt(model, normalize="sum")
    before = snapshot(model)
    opt.zero_grad()
    with target.run():
        loss = loss_one(model(x), y)
    loss.backward()
    opt.step()
    assert rel(before - snapshot(model), expected) < target.tol


def test_gradient_accumulation_per_micro_batch(f64, target):
    """Each micro-batch is solved alone; directions are averaged with weights n_m / N."""
    model = MODELS["linear_ln"]()
    (x1, y1), loss_one = model.batch(6)
    (x2, y2), _ = model.batch(4)
    d1 = oracle_step(model, loss_one, (x1, y1), "network")
    d2 = oracle_step(model, loss_one, (x2, y2), "network")
    expected = (6 * d1 + 4 * d2) / 10
    model = target.model(model)
    opt = exact_opt(model)
    before = snapshot(model)
    opt.zero_grad()
    for x, y in (target.put(x1, y1), target.put(x2, y2)):  # host loss: mean over all 10 samples
        with target.run():
            loss = loss_one(model(x), y) * x.shape[0] / 10
        loss.backward()
    opt.step()
    assert rel(before - snapshot(model), expected) < target.tol


@pytest.mark.parametrize("coefficients", ["network", "layer"])
def test_sample_reuse_applies_stored_coefficients(f64, target, coefficients):
    """Epoch 2 reuses epoch 1's c_i per sample id on the new per-sample gradients."""
    model = MODELS["embed_seq"]()
    (x, y), loss_one = model.batch(8)
    ids = torch.arange(100, 108)
    names = [k for k, _ in model.named_parameters()]
    blocks = [names] if coefficients == "network" else module_blocks(model)
    gs = per_sample_grads(model, loss_one, x, y)
    coefs = {}
    for b in blocks:
        U = flat(gs, b)
        coefs[tuple(b)] = torch.linalg.solve(U @ U.T + 8 * LAM * torch.eye(8), torch.ones(8))

    model = target.model(model)
    opt = exact_opt(model, reuse="sample", coefficients=coefficients)
    opt.set_sample_ids(target.put(ids))
    opt.zero_grad()
    with target.run():
        loss = loss_one(model(target.put(x)), target.put(y))
    loss.backward()
    opt.step()
    assert opt.in_collect_phase

    perm = torch.tensor([3, 0, 7, 5, 1, 2, 6, 4])  # same samples, new order, new parameters
    gs2 = per_sample_grads(target.reference(model), loss_one, x[perm], y[perm])
    expected = {}
    for b in blocks:
        d = flat(gs2, b).T @ coefs[tuple(b)][perm]
        i = 0
        for k in b:
            m = gs2[k][0].numel()
            expected[k] = d[i:i + m]
            i += m
    expected = torch.cat([expected[k] for k in names])
    before = snapshot(model)
    opt.set_sample_ids(target.put(ids[perm]))  # repeated ids: a new epoch, the reuse phase
    opt.zero_grad()
    with target.run():
        loss = loss_one(model(target.put(x[perm])), target.put(y[perm]))
    loss.backward()
    opt.step()
    assert not opt.in_collect_phase
    assert opt.stats()["collect_steps"] == 1
    assert rel(before - snapshot(model), expected) < target.tol


def test_position_reuse_network(f64, target):
    model = MODELS["cnn"]()
    (x1, y1), loss_one = model.batch(6)
    (x2, y2), _ = model.batch(6)
    gs = per_sample_grads(model, loss_one, x1, y1)
    names = [k for k, _ in model.named_parameters()]
    U = flat(gs, names)
    c = torch.linalg.solve(U @ U.T + 6 * LAM * torch.eye(6), torch.ones(6))
    model = target.model(model)
    opt = exact_opt(model, reuse="position", steps_per_epoch=1)
    opt.zero_grad()
    with target.run():
        loss = loss_one(model(target.put(x1)), target.put(y1))
    loss.backward()
    opt.step()
    expected = flat(per_sample_grads(target.reference(model), loss_one, x2, y2), names).T @ c
    before = snapshot(model)
    opt.zero_grad()
    with target.run():
        loss = loss_one(model(target.put(x2)), target.put(y2))
    loss.backward()
    opt.step()
    assert opt.stats()["collect_steps"] == 1 and not opt.in_collect_phase
    assert rel(before - snapshot(model), expected) < target.tol


def test_steps_with_momentum_and_weight_decay(f64, target):
    """Two collect steps through the momentum/weight-decay update, checked by hand."""
    model = MODELS["mlp"]()
    p0 = snapshot(model)
    batches = [model.batch(7) for _ in range(2)]
    loss_one = batches[0][1]
    lr, mom, wd = 0.3, 0.8, 0.01
    model = target.model(model)
    opt = exact_opt(model, lr=lr, momentum=mom, weight_decay=wd, nesterov=True)
    buf = torch.zeros_like(p0)
    theta = p0.clone()
    for (x, y), _ in batches:
        restore(model, theta)
        d = oracle_step(model, loss_one, (x, y), "network") + wd * theta
        buf = mom * buf + d
        theta = theta - lr * (d + mom * buf)
    restore(model, p0)
    for (x, y), _ in batches:
        opt.zero_grad()
        with target.run():
            loss = loss_one(model(target.put(x)), target.put(y))
        loss.backward()
        opt.step()
    assert rel(Target.host(snapshot(model)) - p0, theta - p0) < target.tol
