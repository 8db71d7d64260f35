"""KFAC against an explicit Kronecker-product solve with factors built by hand (loops, no unfold)."""

import gc
import io

import pytest
import torch
import torch.nn.functional as F
from models import restore, snapshot
from torch import nn

from fngd_plugin import KFAC
from fngd_plugin import samplers as S

LAM = 0.05


class Net(nn.Module):
    """A 3x3 stride-2 convolution and a Linear head. ``c_in`` = 8 on 10x10 inputs takes KFAC's
    channels-last patch route (8+ input channels, fewer patch columns than patches); 2 on 6x6 the
    weight-ordered one."""

    def __init__(self, c_in: int = 2, side: int = 6):
        super().__init__()
        self.conv = nn.Conv2d(c_in, 3, 3, stride=2, padding=1)
        self.fc = nn.Linear(3 * ((side + 1) // 2) ** 2, 4)

    def forward(self, x):
        self.z1 = self.conv(x)
        self.h = torch.tanh(self.z1)
        self.z2 = self.fc(self.h.flatten(1))
        return self.z2


def patches(x, k=3, stride=2, pad=1):
    """(n, T, C k k) input patches by explicit slicing, in (C, kh, kw) order."""
    x = F.pad(x, (pad, pad, pad, pad))
    n, C, H, W = x.shape
    out = []
    for i in range(0, H - k + 1, stride):
        for j in range(0, W - k + 1, stride):
            out.append(x[:, :, i:i + k, j:j + k].reshape(n, -1))
    return torch.stack(out, dim=1)


def brute_factors(net, x, y):
    n = x.shape[0]
    out = net(x)
    z1, z2 = net.z1, net.z2
    loss = F.cross_entropy(out, y)
    d1, d2 = torch.autograd.grad(loss, (z1, z2))
    d1, d2 = d1 * n, d2 * n  # per-sample output gradients (true units)
    a1 = patches(x)
    a1 = torch.cat([a1, torch.ones(*a1.shape[:2], 1)], dim=2)
    T1 = a1.shape[1]
    A1 = torch.einsum("ntp,ntq->pq", a1, a1) / (n * T1)
    D1 = d1.flatten(2).transpose(1, 2)
    G1 = torch.einsum("ntp,ntq->pq", D1, D1) / n
    a2 = torch.cat([net.h.detach().flatten(1), torch.ones(n, 1)], dim=1)
    A2 = a2.T @ a2 / n
    G2 = d2.T @ d2 / n
    return [(A1, G1), (A2, G2)]


def grads_as_matrices(net):
    V1 = torch.cat([net.conv.weight.grad.reshape(3, -1), net.conv.bias.grad[:, None]], dim=1)
    V2 = torch.cat([net.fc.weight.grad, net.fc.bias.grad[:, None]], dim=1)
    return [V1, V2]


def kron_solve(A, G, V, method, pi_correction=True):
    """Row-major vec: (G (x) A) vec(V) = vec(G V A^T)."""
    if method == "eigen":
        M = torch.kron(G, A) + LAM * torch.eye(A.shape[0] * G.shape[0])
    else:
        pi = torch.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0])) if pi_correction else 1.0
        r = LAM**0.5
        M = torch.kron(G + r / pi * torch.eye(G.shape[0]), A + pi * r * torch.eye(A.shape[0]))
    return torch.linalg.solve(M, V.reshape(-1)).reshape(V.shape)


ROUTES = {"weight-order": (2, 6), "channels-last": (8, 10)}  # (c_in, side) of Net and its inputs


@pytest.fixture
def patch_routes(monkeypatch):
    """The any_order flags KFAC asked ConvGrads.kron_factors for, so a test can show which route ran."""
    seen = []
    original = S.ConvGrads.kron_factors

    def spy(self, any_order=False):
        seen.append(any_order)
        return original(self, any_order)

    monkeypatch.setattr(S.ConvGrads, "kron_factors", spy)
    return seen


@pytest.mark.parametrize("method", ["eigen", "cholesky"])
@pytest.mark.parametrize("loss_scale", [1.0, 64.0])
@pytest.mark.parametrize("route", list(ROUTES))
def test_one_step_matches_explicit_kronecker_solve(f64, method, loss_scale, route, patch_routes):
    c, side = ROUTES[route]
    net = Net(c, side)
    x, y = torch.randn(6, c, side, side), torch.randint(0, 4, (6,))
    factors = brute_factors(net, x, y)
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    expected = [kron_solve(A, G, V, method) for (A, G), V in zip(factors, grads_as_matrices(net))]
    expected = torch.cat([expected[0][:, :-1].reshape(-1), expected[0][:, -1], expected[1][:, :-1].reshape(-1),
                          expected[1][:, -1]])
    opt = KFAC(net.parameters(), lr=1.0, momentum=0.0, damping=LAM, factor_update_steps=1, inv_update_steps=1,
               inverse=method, kl_clip=None)
    before = snapshot(net)
    opt.zero_grad()
    (F.cross_entropy(net(x), y) * loss_scale).backward()
    for p in net.parameters():
        p.grad.div_(loss_scale)
    opt.step()
    step = before - snapshot(net)
    assert float((step - expected).norm() / expected.norm()) < 1e-8
    assert patch_routes == [route == "channels-last"]


@pytest.mark.parametrize("route", list(ROUTES))
def test_running_average_schedule_and_kl_clip(f64, route):
    c, side = ROUTES[route]
    net = Net(c, side)
    data = [(torch.randn(5, c, side, side), torch.randint(0, 4, (5,))) for _ in range(3)]
    opt = KFAC(net.parameters(), lr=0.5, momentum=0.0, damping=LAM, factor_decay=0.7, factor_update_steps=2,
               inv_update_steps=2, kl_clip=1e-6)
    p0 = snapshot(net)
    f0 = brute_factors(net, *data[0])
    for i, (x, y) in enumerate(data):
        if i == 2:
            f2 = brute_factors(net, x, y)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    for layer, (A0, G0), (A2, G2) in zip((net.conv, net.fc), f0, f2):
        st = opt.state[layer.weight]
        assert torch.allclose(st["kfac_A"], 0.7 * A0 + 0.3 * A2)
        assert torch.allclose(st["kfac_G"], 0.7 * G0 + 0.3 * G2)
    assert opt.stats()["factor_updates"] == 2 and opt.stats()["inverse_updates"] == 2
    # KL clipping: nu = sqrt(kl_clip / (lr^2 <P, V>)) with P the unclipped preconditioned gradient
    x, y = data[0]
    steps = {}
    for clip in (None, 1e-6):
        restore(net, p0)
        o = KFAC(net.parameters(), lr=0.5, momentum=0.0, damping=LAM, factor_update_steps=1, inv_update_steps=1,
                 kl_clip=clip)
        o.zero_grad()
        F.cross_entropy(net(x), y).backward()
        g = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
        o.step()
        steps[clip] = (p0 - snapshot(net)) / 0.5
        del o
    vg = float(steps[None] @ g) * 0.5**2
    nu = float(steps[1e-6].norm() / steps[None].norm())
    assert torch.allclose(steps[1e-6], nu * steps[None])
    assert nu < 1 and nu**2 * vg == pytest.approx(1e-6, rel=1e-8)


@pytest.mark.parametrize("route", list(ROUTES))
def test_accumulated_micro_batches_give_the_whole_batch_factors(f64, route, patch_routes):
    """Two backward passes of unequal micro-batches (losses weighted n_m / N), one step: the factors
    of the whole batch, each micro-batch's statistics weighted by its size."""
    c, side = ROUTES[route]
    net = Net(c, side)
    x, y = torch.randn(7, c, side, side), torch.randint(0, 4, (7,))
    whole = brute_factors(net, x, y)
    opt = KFAC(net.parameters(), lr=0.1, damping=LAM, factor_update_steps=1, inv_update_steps=1)
    opt.zero_grad()
    for sl in (slice(0, 3), slice(3, 7)):
        (F.cross_entropy(net(x[sl]), y[sl]) * (sl.stop - sl.start) / 7).backward()
    opt.step()
    for layer, (A, G) in zip((net.conv, net.fc), whole):
        st = opt.state[layer.weight]
        assert torch.allclose(st["kfac_A"], A, rtol=1e-10, atol=1e-12)
        assert torch.allclose(st["kfac_G"], G, rtol=1e-10, atol=1e-12)
    assert patch_routes == [route == "channels-last"] * 2


def test_state_dict_resume_identical():
    def run(n_steps, net=None, opt=None):
        torch.manual_seed(0)
        net = net or Net()
        opt = opt or KFAC(net.parameters(), lr=0.1, factor_update_steps=2, inv_update_steps=3)
        g = torch.Generator().manual_seed(1)
        data = [(torch.randn(4, 2, 6, 6, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(7)]
        return net, opt, data

    net, opt, data = run(7)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    final = snapshot(net)
    net, opt, data = run(7)
    for x, y in data[:4]:
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    buf = io.BytesIO()
    torch.save({"m": net.state_dict(), "o": opt.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    del opt
    gc.collect()
    torch.manual_seed(0)
    net2 = Net()
    opt2 = KFAC(net2.parameters(), lr=0.1, factor_update_steps=2, inv_update_steps=3)
    net2.load_state_dict(ck["m"])
    opt2.load_state_dict(ck["o"])
    assert opt2.epoch_line().startswith("KFAC epoch: 0 steps, 0 factor updates")  # counts from the resume
    for x, y in data[4:]:
        opt2.zero_grad()
        F.cross_entropy(net2(x), y).backward()
        opt2.step()
    assert torch.equal(snapshot(net2), final)
    assert opt2.epoch_line().startswith(f"KFAC epoch: {len(data) - 4} steps")


def test_failed_inverse_keeps_parameters_finite(monkeypatch):
    net = Net()
    x, y = torch.randn(4, 2, 6, 6), torch.randint(0, 4, (4,))
    opt = KFAC(net.parameters(), lr=0.1, factor_update_steps=1, inv_update_steps=1)

    def broken(*a, **k):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    with pytest.warns(RuntimeWarning, match="inverse update failed"):
        opt.step()
    assert opt.stats()["inverse_failures"] == 2
    # no inverse at all yet: both layers took their plain gradient, counted and warned with the cause
    assert opt.stats()["unpreconditioned"] == {"no_inverse": 1}
    assert "not preconditioned (all epochs): no_inverse 1" in opt.epoch_line()
    assert torch.isfinite(snapshot(net)).all()
    # NaN in the batch: factors are not updated with it, the step is skipped
    monkeypatch.undo()
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    p1 = snapshot(net)
    layers = (net.conv, net.fc)
    factors = [(m, k, opt.state[m.weight][k].clone()) for m in layers for k in ("kfac_A", "kfac_G")]
    opt.zero_grad()
    F.cross_entropy(net(bad), y).backward()
    with pytest.warns(RuntimeWarning, match="factor update was non-finite"):
        opt.step()
    assert torch.equal(snapshot(net), p1)
    assert opt.stats()["factor_failures"] == 2 and opt.stats()["skipped"] == 1
    line = opt.epoch_line()  # what a host logs at the epoch's end: both steps, the failures
    assert line.startswith("KFAC epoch: 2 steps, 2 factor updates (2 non-finite layer factors")
    assert "1 steps skipped" in line
    for m, k, before in factors:  # the previous factors, bit for bit
        assert torch.equal(opt.state[m.weight][k], before)


@pytest.mark.parametrize("method", ["eigen", "cholesky"])
def test_a_non_finite_inverse_is_detected_and_the_previous_one_kept(f64, method, monkeypatch):
    """An inverse that overflows (or an eigendecomposition that returns NaN) without LAPACK raising
    is counted, and the layer keeps its previous inverse."""
    net = Net()
    x, y = torch.randn(4, 2, 6, 6), torch.randint(0, 4, (4,))
    opt = KFAC(net.parameters(), lr=0.1, factor_update_steps=100, inv_update_steps=1, inverse=method)
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    opt.step()
    keys = [k for k in opt.state[net.conv.weight] if k.startswith("kfac_") and k not in ("kfac_A", "kfac_G")]
    before = {k: opt.state[net.conv.weight][k].clone() for k in keys}
    if method == "cholesky":
        real = torch.cholesky_inverse
        monkeypatch.setattr(torch, "cholesky_inverse", lambda L: real(L) * float("inf"))
    else:
        real = torch.linalg.eigh

        def eigh(M):
            d, Q = real(M)
            return d, Q.index_fill(0, torch.tensor([0]), float("nan"))
        monkeypatch.setattr(torch.linalg, "eigh", eigh)
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    with pytest.warns(RuntimeWarning, match="inverse update failed"):
        opt.step()
    assert opt.stats()["inverse_failures"] == 2  # both layers
    for k, v in before.items():
        assert torch.equal(opt.state[net.conv.weight][k], v)
    assert torch.isfinite(snapshot(net)).all()


def test_factors_stay_float32_when_some_steps_run_under_bf16_autocast():
    """bf16 captures (autocast) become float32 statistics (the samplers' compute dtype), so a run
    that switches autocast on and off keeps one factor dtype (the running average is one addmm into
    the old factor); the bf16 step's statistics match float32 ones of the same bf16 inputs."""
    net = Net()
    x, y = torch.randn(4, 2, 6, 6), torch.randint(0, 4, (4,))
    opt = KFAC(net.parameters(), lr=0.0, momentum=0.0, damping=LAM, factor_decay=0.0, factor_update_steps=1,
               inv_update_steps=1)
    for amp in (False, True):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = net(x)
        F.cross_entropy(out.float(), y).backward()
        opt.step()
    st = opt.state[net.fc.weight]
    assert st["kfac_A"].dtype == st["kfac_G"].dtype == torch.float32
    h = torch.tanh(net.conv(x)).flatten(1).to(torch.bfloat16).float()  # the bf16 input the fc saw
    a = torch.cat([h, torch.ones(4, 1)], dim=1)
    assert torch.allclose(st["kfac_A"], a.T @ a / 4, rtol=2e-2, atol=2e-3)
    assert torch.isfinite(snapshot(net)).all()


def test_coverage_and_bad_input():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    opt = KFAC(model.parameters(), lr=0.1)
    line = opt.coverage["line"]
    assert "4/6 parameter tensors, 97.13% of parameter elements covered (Conv2d 2, Linear 2)" in line
    assert "BatchNorm2d 2 (KFAC covers Linear and Conv2d" in opt.coverage["line"]
    for kw, match in [(dict(damping=0), "damping"), (dict(inverse="svd"), "'eigen', 'cholesky'"),
                      (dict(factor_decay=1.0), "factor_decay"), (dict(inv_update_steps=0), "inv_update_steps"),
                      (dict(kl_clip=0.0), "kl_clip")]:
        with pytest.raises(ValueError, match=match):
            KFAC(model.parameters(), lr=0.1, **kw)


def test_max_factor_dim_leaves_large_layers_to_sgd():
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 300))
    opt = KFAC(model.parameters(), lr=0.1, max_factor_dim=100)
    assert "factor dimension 300 > max_factor_dim=100" in opt.coverage["line"]
    assert opt.coverage["covered"] == {"Linear": 2}


def test_degenerate_factor_eigendecomposition():
    from fngd_plugin.kfac import _eigh

    d, Q = _eigh(torch.zeros(6, 6))  # LAPACK may fail to converge here; the retry must not
    assert torch.isfinite(d).all() and torch.allclose(Q @ Q.T, torch.eye(6), atol=1e-5)
    assert float(d.abs().max()) < 1e-20
