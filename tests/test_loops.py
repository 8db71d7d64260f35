"""FNGD and KFAC in the loop shapes users write, checked step by step against brute force.

Every shape runs two epochs of two batches (reuse="position"): the two collect steps must be
the damped NGD steps (F + lambda I)^-1 gbar of torch.func per-sample gradients, and the two
reuse steps the stored coefficients applied to the new batches' per-sample gradients, in
float64. And FNGD must count what it could not precondition, by cause, instead of falling
back to SGD silently.

The oracle runs on the CPU in float64; the loops run where the ``target`` fixture says
(FNGD_TEST_DEVICE, FNGD_TEST_AUTOCAST: autocast around each forward and loss, as AMP recipes do).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import warnings

import pytest
import torch
import torch.nn.functional as F
from models import snapshot
from oracle import flat, per_sample_grads
from run_target import Target
from torch import nn
from torch.utils.checkpoint import checkpoint

from fngd_plugin import FNGD, KFAC

LAM = 0.37
N = 6


class Net(nn.Module):
    """Linear-LayerNorm-Linear-Linear; ``ckpt`` checkpoints the middle segment (None: no checkpointing)."""

    def __init__(self, ckpt: bool | None = None):
        super().__init__()
        self.l1 = nn.Linear(5, 8)
        self.mid = nn.Sequential(nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 7), nn.Tanh())
        self.head = nn.Linear(7, 3)
        self.ckpt = ckpt

    def forward(self, x):
        h = self.l1(x)
        h = self.mid(h) if self.ckpt is None else checkpoint(self.mid, h, use_reentrant=self.ckpt)
        return self.head(h)


def ce(out, y):
    return F.cross_entropy(out, y)


_FORWARD = [contextlib.nullcontext]  # the target's autocast context, set for each test below


@pytest.fixture(autouse=True)
def _forward_on_target(target):
    _FORWARD[0] = target.run
    yield
    _FORWARD[0] = contextlib.nullcontext


def loss_of(model, x, y):
    """The host's forward and loss (under autocast where the target asks for it)."""
    with _FORWARD[0]():
        return ce(model(x), y)


def on(target, data):
    return [target.put(x, y) for x, y in data]


def batches(k: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(N, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (N,), generator=g))
            for _ in range(k)]


def fngd(params, **kw) -> FNGD:
    args = dict(lr=1.0, momentum=0.0, damping=LAM, damping_mode="absolute", normalize="none", reuse="position",
                steps_per_epoch=2)
    args.update(kw)
    return FNGD(params, **args)


# ------------------------------------------------------------------------------------- loop shapes
def step_plain(model, opt, x, y):
    opt.zero_grad()
    loss_of(model, x, y).backward()
    opt.step()


def step_zero_after_forward(model, opt, x, y):  # PyTorch's ImageNet example order
    loss = loss_of(model, x, y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def step_zero_after_forward_keep(model, opt, x, y):
    loss = loss_of(model, x, y)
    opt.zero_grad(set_to_none=False)
    loss.backward()
    opt.step()


def step_closure_lightning(model, opt, x, y):  # Lightning's automatic optimization: forward, zero, backward
    def closure():
        loss = loss_of(model, x, y)
        opt.zero_grad()
        loss.backward()
        return loss

    opt.step(closure)


def step_closure_zero_first(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    opt.step(closure)


def step_model_zero_grad(model, opt, x, y):
    model.zero_grad()
    loss_of(model, x, y).backward()
    opt.step()


def step_zero_after_step(model, opt, x, y):
    loss_of(model, x, y).backward()
    opt.step()
    opt.zero_grad()


def _whole(reentrant: bool):
    def step(model, opt, x, y):
        opt.zero_grad()
        x = x.clone().requires_grad_(reentrant)  # reentrant checkpointing needs an input that requires grad
        with _FORWARD[0]():
            loss = ce(checkpoint(model, x, use_reentrant=reentrant), y)
        loss.backward()
        opt.step()

    return step


SHAPES = {
    "plain": (step_plain, None),
    "zero_grad_after_forward": (step_zero_after_forward, None),
    "zero_grad_after_forward_set_to_none_false": (step_zero_after_forward_keep, None),
    "closure_forward_zero_backward": (step_closure_lightning, None),
    "closure_zero_forward_backward": (step_closure_zero_first, None),
    "model_zero_grad": (step_model_zero_grad, None),
    "zero_grad_after_step": (step_zero_after_step, None),
    "checkpoint_whole_non_reentrant": (_whole(False), None),
    "checkpoint_whole_reentrant": (_whole(True), None),
    "checkpoint_segment_non_reentrant": (step_plain, False),
    "checkpoint_segment_reentrant": (step_plain, True),
}


def expected_steps(model: nn.Module, data, names: list[str] | None = None, also=None) -> list[torch.Tensor]:
    """The oracle for 2 collect + 2 reuse steps (lr 1, no momentum): replays them on a copy;
    ``also(ref, x, y)`` runs at each step's parameters (another optimizer's step on the others)."""
    ref = Net()
    ref.load_state_dict(model.state_dict())
    ref.double()
    names = names or [k for k, _ in ref.named_parameters()]
    params = dict(ref.named_parameters())
    stored, out = [], []
    for step, (x, y) in enumerate(data):
        U = flat(per_sample_grads(ref, ce, x, y), names)
        if step < 2:
            c = torch.linalg.solve(U @ U.T + N * LAM * torch.eye(N, dtype=U.dtype), torch.ones(N, dtype=U.dtype))
            stored.append(c)
        else:
            c = stored[step - 2]
        d = U.T @ c
        out.append(d)
        if also is not None:  # at the same parameters as U
            also(ref, x, y)
        i = 0
        with torch.no_grad():
            for k in names:
                p = params[k]
                p -= d[i:i + p.numel()].view_as(p)
                i += p.numel()
    return out


def run(model, opt, step, data, params: list[torch.Tensor]) -> list[torch.Tensor]:
    got = []
    for x, y in data:
        before = torch.cat([p.detach().reshape(-1).clone() for p in params])
        step(model, opt, x, y)
        got.append(before - torch.cat([p.detach().reshape(-1) for p in params]))
    return got


def rel(a, b):
    a, b = Target.host(a), Target.host(b)
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("shape", list(SHAPES))
def test_fngd_steps_are_damped_ngd_in_every_loop_shape(f64, target, shape):
    step, ckpt = SHAPES[shape]
    torch.manual_seed(0)
    model = Net(ckpt).double()
    data = batches(4)
    expected = expected_steps(model, data)
    model = target.model(model)
    opt = fngd(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning in any of these shapes
        got = run(model, opt, step, on(target, data), list(model.parameters()))
    s = opt.stats()
    assert s["collect_steps"] == 2 and s["stored"] == 2 * N and s["phase"] == "reuse", s
    assert (s["epoch"], s["position"]) == (1, 2)
    assert s["steps"] == {"collect": 2, "collect_solved": 2, "reuse": 2, "reuse_weighted": 2}
    assert s["unpreconditioned"] == {} and s["store_misses"] == 0 and s["discarded_batches"] == 0
    for k, (a, b) in enumerate(zip(got, expected)):
        assert rel(a, b) < target.tol, (shape, k, rel(a, b))


@pytest.mark.parametrize("shape", ["zero_grad_after_forward", "closure_forward_zero_backward",
                                   "checkpoint_segment_reentrant", "checkpoint_whole_non_reentrant"])
def test_kfac_sees_the_same_batches_in_every_loop_shape(f64, target, shape):
    """KFAC shares the capture: its steps in a shape equal its steps in the plain loop."""
    step, ckpt = SHAPES[shape]
    results = []
    for st, ck in ((step_plain, None), (step, ckpt)):
        torch.manual_seed(0)
        model = target.model(Net(ck).double())
        opt = KFAC(model.parameters(), lr=0.5, momentum=0.0, damping=0.1, factor_update_steps=1, inv_update_steps=1)
        run(model, opt, st, on(target, batches(3)), list(model.parameters()))
        results.append((snapshot(model), opt.stats()))
    (a, sa), (b, sb) = results
    assert sb["factor_updates"] == 3 and sb["unpreconditioned"] == {}
    assert rel(b, a) <= max(target.same_tol, 1e-10) and rel(a, snapshot_init()) > 1e-3


def snapshot_init():
    torch.manual_seed(0)
    return snapshot(Net().double())


def test_compiled_model(f64, target):
    """torch.compile (timm --torchcompile): collect batches run eagerly (hooks fire), reuse batches
    compiled; both exact. aot_eager: the real dynamo + AOT autograd path without a C++ build."""
    torch.manual_seed(0)
    model = Net().double()
    data = batches(4)
    expected = expected_steps(model, data)
    model = target.model(model)
    gc.collect()  # earlier tests' optimizers: their hooks go before the compile (see capture._deferred)
    compiled = torch.compile(model, backend="aot_eager")
    opt = fngd(model.parameters())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*global hooks.*")  # torch's note about hooks + compile
        got = run(compiled, opt, step_plain, on(target, data), list(model.parameters()))
    s = opt.stats()
    assert s["steps"] == {"collect": 2, "collect_solved": 2, "reuse": 2, "reuse_weighted": 2}
    assert s["unpreconditioned"] == {}
    for a, b in zip(got, expected):
        assert rel(a, b) < target.tol


# ------------------------------------------------------------------------------------- more shapes
def test_frozen_parameters_fine_tuning(f64, target):
    """l1 frozen: the Fisher is over the trainable parameters only, whether or not the frozen ones
    are handed to the optimizer."""
    for hand_all in (False, True):
        torch.manual_seed(0)
        model = Net().double()
        model.l1.requires_grad_(False)
        trainable = [k for k, p in model.named_parameters() if p.requires_grad]
        data = batches(4)
        expected = expected_steps(model, data, trainable)
        model = target.model(model)
        params = list(model.parameters()) if hand_all else [p for p in model.parameters() if p.requires_grad]
        opt = fngd(params)
        got = run(model, opt, step_plain, on(target, data), [p for p in model.parameters() if p.requires_grad])
        assert opt.stats()["unpreconditioned"] == {}
        for a, b in zip(got, expected):
            assert rel(a, b) < target.tol, hand_all


def test_partly_frozen_module_is_counted_and_named(f64, target):
    torch.manual_seed(0)
    model = target.model(Net().double())
    model.head.weight.requires_grad_(False)  # BitFit-style: the head's bias still trains
    opt = fngd([p for p in model.parameters() if p.requires_grad])
    x, y = on(target, batches(1))[0]
    with pytest.warns(RuntimeWarning, match=r"both trainable and frozen.*\(Linear\)"):
        step_plain(model, opt, x, y)
    assert opt.stats()["unpreconditioned"] == {"partly_frozen": 1}


def test_two_optimizers_fngd_body_adamw_head(f64, target):
    """FNGD on the body, AdamW on the head: FNGD's steps are NGD over the body's parameters, and the
    head's gradient reaches AdamW untouched in collect and reuse steps alike."""
    torch.manual_seed(0)
    model = Net().double()
    body = [k for k, _ in model.named_parameters() if not k.startswith("head.")]
    data = batches(4)
    ref_adam = []

    def adam_on_head(ref, x, y):
        if not ref_adam:
            ref_adam.append(torch.optim.AdamW(ref.head.parameters(), lr=1e-2))
        ref_adam[0].zero_grad()
        ce(ref(x), y).backward()
        ref_adam[0].step()

    expected = expected_steps(model, data, body, also=adam_on_head)
    model = target.model(model)
    opt = fngd([p for k, p in model.named_parameters() if k in body])
    adam = torch.optim.AdamW(model.head.parameters(), lr=1e-2)
    head_grads = []
    got = []
    rtol = max(target.same_tol, 1e-10)
    for x, y in on(target, data):
        before = torch.cat([p.detach().reshape(-1).clone() for k, p in model.named_parameters() if k in body])
        # the head's plain gradient at these parameters, for comparison
        twin = copy.deepcopy(model)  # other parameter tensors: FNGD does not see its forward
        g = torch.autograd.grad(loss_of(twin, x, y), list(twin.head.parameters()))
        opt.zero_grad()
        adam.zero_grad()
        loss_of(model, x, y).backward()
        head_grads.append([torch.allclose(a, p.grad, rtol=rtol, atol=1e-12) for a, p in
                           zip(g, model.head.parameters())])
        opt.step()
        adam.step()
        got.append(before - torch.cat([p.detach().reshape(-1) for k, p in model.named_parameters() if k in body]))
    assert all(all(h) for h in head_grads)
    s = opt.stats()
    assert s["steps"] == {"collect": 2, "collect_solved": 2, "reuse": 2, "reuse_weighted": 2}
    assert [rel(a, b) < target.tol for a, b in zip(got, expected)] == [True] * 4, [rel(a, b) for a, b in
                                                                                    zip(got, expected)]


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(5, 8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.bn(self.l1(x))))


def test_frozen_batchnorm_in_eval_mode(f64, target):
    """A submodule kept in eval mode (frozen BatchNorm statistics; its affine parameters frozen too)
    treats samples independently: the step is exact."""
    torch.manual_seed(0)
    model = BNNet().double()
    model.bn.eval()
    model.bn.requires_grad_(False)
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    x, y = batches(1)[0]
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    U = flat(per_sample_grads(model, ce, x, y), names)
    expected = torch.linalg.solve(U.T @ U / N + LAM * torch.eye(U.shape[1], dtype=U.dtype), U.mean(0))
    model = target.model(model)
    opt = fngd([p for p in model.parameters() if p.requires_grad], reuse="off", steps_per_epoch=None)
    params = [p for p in model.parameters() if p.requires_grad]
    (got,) = run(model, opt, step_plain, on(target, [(x, y)]), params)
    assert rel(got, expected) < target.tol and opt.stats()["unpreconditioned"] == {}


def test_model_called_twice_per_step_two_views(f64, target):
    """Two augmented views, one loss: each forward is its own micro-batch with its own coefficients,
    and the step is their directions averaged with weights n_m / N (as gradient accumulation)."""
    torch.manual_seed(0)
    model = Net().double()
    x, y = batches(1)[0]
    x2 = x + 0.1 * torch.randn_like(x)
    names = [k for k, _ in model.named_parameters()]
    ds = []
    for v in (x, x2):
        U = flat(per_sample_grads(model, ce, v, y), names)
        ds.append(torch.linalg.solve(U.T @ U / N + LAM * torch.eye(U.shape[1], dtype=U.dtype), U.mean(0)))
    model = target.model(model)
    opt = fngd(model.parameters(), reuse="off", steps_per_epoch=None)

    def two_views(model, opt, x, y):
        opt.zero_grad()
        (0.5 * loss_of(model, x, y) + 0.5 * loss_of(model, target.put(x2), y)).backward()
        opt.step()

    (got,) = run(model, opt, two_views, on(target, [(x, y)]), list(model.parameters()))
    assert rel(got, (ds[0] + ds[1]) / 2) < target.tol
    assert opt.stats()["collect_steps"] == 2


def test_gradient_accumulation_with_zero_grad_where_users_put_it(f64, target):
    """zero_grad at the start of each accumulation cycle, or right after step(): the same steps."""
    results = []
    for where in ("start", "after_step"):
        torch.manual_seed(0)
        model = target.model(Net().double())
        opt = fngd(model.parameters(), steps_per_epoch=4)
        for i, (x, y) in enumerate(on(target, batches(8))):
            if where == "start" and i % 2 == 0:
                opt.zero_grad()
            (loss_of(model, x, y) / 2).backward()
            if i % 2 == 1:
                opt.step()
                if where == "after_step":
                    opt.zero_grad()
        results.append((snapshot(model), opt.stats()))
    (a, sa), (b, sb) = results
    assert rel(a, b) <= target.same_tol and sa["collect_steps"] == sb["collect_steps"] == 4
    assert sa["steps"] == {"collect": 2, "collect_solved": 2, "reuse": 2, "reuse_weighted": 2}


# ------------------------------------------------------------------------------------- the guard
def test_eval_mode_model_is_counted_with_what_to_change(f64, target):
    torch.manual_seed(0)
    model = target.model(Net().double()).eval()
    opt = fngd(model.parameters())
    x, y = on(target, batches(1))[0]
    with pytest.warns(RuntimeWarning, match=r"eval mode.*model\.train\(\)"):
        step_plain(model, opt, x, y)
    step_plain(model, opt, x, y)
    s = opt.stats()
    assert s["unpreconditioned"] == {"eval_mode": 2} and s["steps"]["collect"] == 2
    assert s["steps"]["collect_solved"] == 0
    assert "0/2 collect steps solved" in opt.epoch_line() and "eval_mode 2" in opt.epoch_line()


def test_forward_not_seen_is_counted(f64, target):
    """A forward the capture cannot see (functional_call with other tensors, as torch.func does)."""
    torch.manual_seed(0)
    model = target.model(Net().double())
    opt = fngd(model.parameters())
    x, y = on(target, batches(1))[0]
    params = {k: v * 1.0 for k, v in model.named_parameters()}  # differentiable copies of ours
    opt.zero_grad()
    with _FORWARD[0]():
        loss = ce(torch.func.functional_call(model, params, (x,)), y)
    grads = torch.autograd.grad(loss, list(params.values()))
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    with pytest.warns(RuntimeWarning, match="no captured training forward"):
        opt.step()
    assert opt.stats()["unpreconditioned"] == {"no_batch": 1}


def test_skipped_update_is_discarded_not_mixed_into_the_next(f64, target):
    """An update the host skips (GradScaler on overflow: backward, no step, zero_grad): its batch is
    dropped and counted, and the next step is exactly the next batch's NGD step."""
    torch.manual_seed(0)
    model = Net().double()
    (x0, y0), (x1, y1) = batches(2)
    names = [k for k, _ in model.named_parameters()]
    U = flat(per_sample_grads(model, ce, x1, y1), names)
    expected = torch.linalg.solve(U.T @ U / N + LAM * torch.eye(U.shape[1], dtype=U.dtype), U.mean(0))
    model = target.model(model)
    opt = fngd(model.parameters(), reuse="off", steps_per_epoch=None)
    opt.zero_grad()
    loss_of(model, *target.put(x0, y0)).backward()  # ... the host found inf and skipped step()
    (got,) = run(model, opt, step_plain, on(target, [(x1, y1)]), list(model.parameters()))
    assert rel(got, expected) < target.tol
    s = opt.stats()
    assert s["discarded_batches"] == 1 and s["collect_steps"] == 1 and s["unpreconditioned"] == {}


def test_reuse_root_output_without_the_batch_dimension_is_counted(f64, target):
    """An output whose sample dimension is not 0 (time-first) cannot be reweighted: each reuse step
    is counted and the first warns with the fix."""

    class TimeFirstOut(Net):
        def forward(self, x):
            return super().forward(x).T  # (classes, samples)

    torch.manual_seed(0)
    model = target.model(TimeFirstOut().double())
    opt = fngd(model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in on(target, batches(4)):
            opt.zero_grad()
            with _FORWARD[0]():
                loss = F.cross_entropy(model(x).T, y)
            loss.backward()
            opt.step()
    s = opt.stats()
    assert s["unpreconditioned"] == {"root_mismatch": 2} and s["steps"]["reuse_weighted"] == 0
    assert s["steps"]["collect_solved"] == 2
    assert sum("set_batch_dim(model, dim)" in str(w.message) for w in caught) == 1
