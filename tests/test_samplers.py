"""Each layer's sampler against brute-force per-sample gradients (torch.func or per-sample autograd)."""

import pytest
import torch
import torch.nn.functional as F
from models import restore, snapshot
from oracle import flat, ngd_direction, per_sample_grads
from torch import nn
from torch.func import functional_call, grad, vmap

from fngd_plugin import FNGD
from fngd_plugin import samplers as S


def layer_case(layer, a, batch_dim=0):
    """(rep, U): the sampler's answer and torch.func's per-sample gradients for l_i = <R_i, out_i>."""
    out = layer(a)
    R = torch.randn_like(out)
    delta = torch.autograd.grad((out * R).sum(), out)[0]  # exact output gradient of sum_i l_i
    rep = S.find_sampler(layer)(layer, a.detach(), delta, batch_dim, S.sampler_meta(layer))
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss_one(p, ai, ri):
        return (functional_call(layer, p, (ai.unsqueeze(batch_dim),)) * ri.unsqueeze(batch_dim)).sum()

    gs = vmap(grad(loss_one), in_dims=(None, batch_dim, batch_dim))(params, a, R)
    names = [k for k, p in layer.named_parameters()]
    return rep, flat(gs, names), names


def check_rep(rep, U, names, layer):
    n = U.shape[0]
    K = rep.gram(keep=True)
    assert torch.allclose(K, U @ U.T, rtol=1e-10, atol=1e-12)
    w = torch.randn(n)
    for _ in range(2):  # from the per-sample gradients gram() kept (if its route made them), then without
        got = torch.cat([g.reshape(-1) for g in rep.weighted(w)])
        assert torch.allclose(got, U.T @ w, rtol=1e-10, atol=1e-12)
    mat = torch.cat([g.reshape(n, -1) for g in rep.materialize()], dim=1)
    assert torch.allclose(mat, U, rtol=1e-10, atol=1e-12)
    assert [id(p) for p in rep.params] == [id(dict(layer.named_parameters())[k]) for k in names]


@pytest.mark.parametrize("shape", [(7, 5), (7, 3, 5), (7, 2, 3, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear(f64, shape, bias):
    layer = nn.Linear(5, 4, bias=bias)
    check_rep(*layer_case(layer, torch.randn(*shape)), layer)


def test_linear_token_route_and_time_first(f64):
    # T=2 with wide layers: the token route is the cheaper one; batch at dim 1 (fairseq's layout)
    layer = nn.Linear(32, 32)
    A = torch.randn(9, 2, 32)
    D = torch.randn(9, 2, 32)
    assert S._use_token_route(9, 2, 32, 32)
    tok = S._token_gram(A, D, True)
    G = torch.cat([torch.einsum("ntq,ntp->nqp", D, A).reshape(9, -1), D.sum(1)], dim=1)
    assert torch.allclose(tok, G @ G.T)
    check_rep(*layer_case(layer, torch.randn(3, 6, 32), batch_dim=1), layer)


@pytest.mark.parametrize(
    "kw",
    [
        dict(stride=2, padding=1),
        dict(padding=2, dilation=2, bias=False),
        dict(padding="same"),
        dict(padding=1, padding_mode="reflect"),
        dict(groups=2, padding=1),
        dict(stride=(2, 1), padding=(0, 1), groups=4),
    ],
)
def test_conv2d(f64, kw):
    layer = nn.Conv2d(4, 8, 3, **kw)
    check_rep(*layer_case(layer, torch.randn(5, 4, 7, 6)), layer)


CONV_PATCH_CASES = [
    dict(stride=2, padding=1),
    dict(padding=2, dilation=2, bias=False),
    dict(padding="same"),
    dict(padding=1, padding_mode="reflect"),
    dict(stride=(2, 1), padding=(0, 1), dilation=(1, 2)),
    dict(kernel_size=(1, 3), padding=(0, 1), padding_mode="circular"),
]


@pytest.mark.parametrize("kw", CONV_PATCH_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv2d_patches_against_unfold(f64, kw, channels_last):
    """kron_factors' patches against torch's im2col (F.unfold): the weight's column order, and with
    any_order the order patch_order names (channels-last for 8+ input channels)."""
    kw = dict(kw)
    layer = nn.Conv2d(8, 5, kw.pop("kernel_size", 3), **kw)
    a = torch.randn(3, 8, 7, 6)
    if channels_last:
        a = a.to(memory_format=torch.channels_last)
    rep, U, names = layer_case(layer, a)
    m = layer
    x, padding = rep._padded(a)
    ref = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride).transpose(1, 2)
    A, D = rep.kron_factors()
    assert torch.equal(A, ref) and D.shape[:2] == A.shape[:2]
    order = rep.patch_order()
    assert order is not None and not torch.equal(order, torch.arange(order.numel()))
    A_any, _ = rep.kron_factors(any_order=True)
    assert torch.equal(A_any, ref[:, :, order])
    # both Gram routes on the reordered patches, against torch.func's per-sample gradients
    assert torch.allclose(S._token_gram(A_any, D, m.bias is not None), U @ U.T, rtol=1e-10, atol=1e-12)
    assert torch.allclose(S._chunked_gram(A_any, D, m.bias is not None), U @ U.T, rtol=1e-10, atol=1e-12)
    check_rep(rep, U, names, layer)


PIXEL_ROUTE_CASES = CONV_PATCH_CASES + [
    dict(padding=1, bias=False),
    dict(kernel_size=(5, 3), padding=(2, 0)),
    dict(stride=3, padding=3, dilation=2),
    dict(padding=0),
]


@pytest.mark.parametrize("kw", PIXEL_ROUTE_CASES)
@pytest.mark.parametrize("block", [None, 1])  # one block / a block per sample
def test_conv2d_pixel_route(f64, monkeypatch, kw, block):
    """The pixel route (patch products as k shifted pixel products) against torch.func's per-sample
    gradients: strides, dilation, implicit and explicit (string, reflect, circular) padding, kernels
    that are not square, and in blocks of one sample."""
    kw = dict(kw)
    layer = nn.Conv2d(5, 4, kw.pop("kernel_size", 3), **kw)
    rep, U, names = layer_case(layer, torch.randn(3, 5, 7, 6))
    if block is not None:
        pixels = rep._pixels()[0]
        monkeypatch.setitem(S.BLOCK_ELEMENTS, "cpu", block * pixels * 3 * pixels)
        assert len(S._sample_blocks(3, pixels, 3 * pixels, torch.device("cpu"))) == 3
    calls = []
    real = rep._pixel_gram
    monkeypatch.setattr(rep, "_pixel_gram", lambda: calls.append(1) or real())
    monkeypatch.setattr(rep, "_gram_route", lambda: "pixel")
    check_rep(rep, U, names, layer)
    assert calls == [1]


def test_gram_routes_picked_by_cost():
    """The cost model picks the pixel route where its k shifted additions are cheaper than the k times
    wider patch products (a ResNet's last stage), never for a 1x1 kernel or a module called twice
    (whose cross-call pairs it does not form); a layer whose per-sample gradients would not fit at
    once is no longer pushed to a 3x dearer token route (both routes work in blocks)."""
    conv = nn.Conv2d(512, 512, 3, padding=1)
    rep = S.ConvGrads(conv, torch.zeros(128, 512, 4, 4), torch.zeros(128, 512, 4, 4))
    assert rep._pixels() == (16, 512, 9) and rep._gram_route() == "pixel"
    one = nn.Conv2d(512, 512, 1)
    assert S.ConvGrads(one, torch.zeros(128, 512, 4, 4), torch.zeros(128, 512, 4, 4))._pixels() is None
    twice = S.ConvGrads.cat([S.ConvGrads(conv, torch.zeros(8, 512, 4, 4), torch.zeros(8, 512, 4, 4))
                             for _ in range(2)])
    assert twice._pixels() is None and twice._gram_route() != "pixel"
    n, T, p, q = 136, 30, 256, 8000  # an untied 8000-word output projection at 4080 tokens
    assert n * p * q > S._ROUTE_MEMORY_LIMIT
    costs = S._route_costs(n, T, p, q, "cpu")
    assert (n * T) ** 2 * (p + q) > 2.5 * (n * T * p * q + n * n * p * q)  # by flops alone
    assert costs["materialize"] < costs["token"] and not S._use_token_route(n, T, p, q)


@pytest.mark.parametrize("kw", [dict(padding=1), dict(padding=1, groups=2, bias=False)])
def test_conv2d_large_spatial_grouped_route(f64, kw):
    # T > 256: per-sample gradients by one grouped weight-gradient convolution (batch as groups)
    layer = nn.Conv2d(2, 4, 3, **kw)
    check_rep(*layer_case(layer, torch.randn(3, 2, 18, 17)), layer)


@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_token_route(f64, bias):
    # small spatial extent, wide channels: the token route on unfolded patches is the cheaper one
    layer = nn.Conv2d(32, 32, 3, padding=1, bias=bias)
    assert S._use_token_route(3, 4, 32 * 9, 32)
    check_rep(*layer_case(layer, torch.randn(3, 32, 2, 2)), layer)


def test_conv2d_channels_last(f64):
    layer = nn.Conv2d(3, 4, 3, padding=1).to(memory_format=torch.channels_last)
    a = torch.randn(4, 3, 6, 6).to(memory_format=torch.channels_last)
    check_rep(*layer_case(layer, a), layer)


@pytest.mark.parametrize("block", [1, 4])  # samples per block: 7 blocks of 1; blocks of 4 and 3
def test_token_routes_in_blocks_of_samples(f64, monkeypatch, block):
    """The token routes form their n T x n T products a block of samples at a time: the same Grams
    as torch.func's per-sample gradients whatever the block, including a last block that is short."""
    monkeypatch.setitem(S.BLOCK_ELEMENTS, "cpu", block * 3 * 7 * 3)  # n = 7 samples, T = 3 tokens
    assert len(S._sample_blocks(7, 3, 7 * 3, torch.device("cpu"))) == (7 if block == 1 else 2)
    for bias in (True, False):
        lin = nn.Linear(6, 4, bias=bias)
        rep, U, _ = layer_case(lin, torch.randn(7, 3, 6))
        assert torch.allclose(S._token_gram(rep.A, rep.D, bias), U @ U.T, rtol=1e-10, atol=1e-12)
    emb = nn.Embedding(50, 3)  # more distinct tokens (U) than T^2 = 9: the token route
    rep, U, _ = layer_case(emb, torch.arange(21).reshape(7, 3) * 2)
    monkeypatch.setattr(rep, "rows", None)  # (the rows route would call it)
    assert torch.allclose(rep.gram(), U @ U.T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("vocab,T", [(50, 4), (6, 9)])  # many distinct tokens / few (both Gram routes)
def test_embedding_with_padding(f64, vocab, T):
    layer = nn.Embedding(vocab, 3, padding_idx=1)
    x = torch.randint(0, vocab, (6, T))
    x[:, -1] = 1
    rep, U, names = layer_case(layer, x)
    assert torch.all(rep.materialize()[0][:, 1] == 0)  # the padding row never gets a gradient
    check_rep(rep, U, names, layer)
    # the other route gives the same Gram
    idx, D = rep.idx, rep.D
    same = (idx.reshape(-1, 1) == idx.reshape(1, -1)).double()
    n = idx.shape[0]
    tok = ((D.reshape(-1, 3) @ D.reshape(-1, 3).T) * same).view(n, T, n, T).sum((1, 3))
    assert torch.allclose(tok, rep.gram())


@pytest.mark.parametrize("shape,norm", [((5, 6), (6,)), ((5, 3, 6), (6,)), ((5, 2, 3, 4), (3, 4))])
def test_layernorm(f64, shape, norm):
    layer = nn.LayerNorm(norm)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    check_rep(*layer_case(layer, torch.randn(*shape)), layer)


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm2d_per_sample_autograd(f64, training):
    """Per-sample gradients of gamma/beta by autograd of each l_i through the real batched forward."""
    layer = nn.BatchNorm2d(3)
    with torch.no_grad():
        layer.weight.normal_()
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2)
    layer.train(training)
    a = torch.randn(6, 3, 4, 5)
    out = layer(a)
    R = torch.randn_like(out)
    delta = torch.autograd.grad((out * R).sum(), out, retain_graph=True)[0]
    rep = S.find_sampler(layer)(layer, a, delta, 0, S.sampler_meta(layer))
    rows = []
    for i in range(6):
        gw, gb = torch.autograd.grad((out[i] * R[i]).sum(), (layer.weight, layer.bias), retain_graph=True)
        rows.append(torch.cat([gw, gb]))
    U = torch.stack(rows)
    check_rep(rep, U, ["weight", "bias"], layer)


def test_batchnorm2d_float32_keeps_precision_where_mean_dwarfs_spread():
    """A channel whose mean is 1e5 times its spread (float32): gamma's per-sample gradients within
    0.5% of the float64 answer for the same inputs. The algebraically equal
    rstd (sum delta a - mean sum delta) cancels there (1% and worse); centring first does not."""
    torch.manual_seed(0)
    layer = nn.BatchNorm2d(3)
    a = 1000.0 + 0.01 * torch.randn(8, 3, 5, 5)
    delta = torch.randn_like(a)
    rep = S.find_sampler(layer)(layer, a, delta, 0, S.sampler_meta(layer))
    a64 = a.double()
    xhat = (a64 - a64.mean((0, 2, 3), keepdim=True)) / torch.sqrt(a64.var((0, 2, 3), unbiased=False, keepdim=True)
                                                                  + layer.eps)
    ref = torch.einsum("nchw,nchw->nc", delta.double(), xhat)
    got = rep.grads[0].double()
    assert float((got - ref).abs().max() / ref.abs().max()) < 5e-3


def test_subclass_with_own_forward_is_not_covered():
    class PaddedConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(F.pad(x, (1, 1, 1, 1)))

    class PlainSub(nn.Linear):
        pass

    assert S.find_sampler(PaddedConv(2, 2, 3)) is None
    assert "overrides forward" in S.unsupported_reason(PaddedConv(2, 2, 3))
    assert S.find_sampler(PlainSub(2, 2)) is S.find_sampler(nn.Linear(2, 2))
    assert "sparse" in S.unsupported_reason(nn.Embedding(5, 2, sparse=True))


class Shared(nn.Module):
    """One Linear applied twice, and an output projection tied to the input embedding."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 4)
        self.mix = nn.Linear(4, 4)
        self.proj = nn.Linear(4, 9, bias=False)
        self.proj.weight = self.emb.weight

    def forward(self, x):
        h = torch.tanh(self.mix(self.emb(x)))
        h = torch.tanh(self.mix(h)).mean(1)
        return self.proj(h)


@pytest.mark.parametrize("coefficients", ["network", "layer"])
def test_repeated_module_and_tied_weights_exact(f64, coefficients):
    model = Shared()
    x = torch.randint(0, 9, (7, 5))
    y = torch.randint(0, 9, (7,))
    gs = per_sample_grads(model, F.cross_entropy, x, y)
    names = [k for k, _ in model.named_parameters()]  # emb.weight (tied), mix.weight, mix.bias
    if coefficients == "network":
        expected = ngd_direction(flat(gs, names), 0.2)
    else:
        parts = {tuple(b): ngd_direction(flat(gs, b), 0.2) for b in (["emb.weight"], ["mix.weight", "mix.bias"])}
        expected = torch.cat([parts[("emb.weight",)], parts[("mix.weight", "mix.bias")]])
    opt = FNGD(model.parameters(), lr=1.0, momentum=0.0, damping=0.2, damping_mode="absolute", normalize="none",
               reuse="off", coefficients=coefficients)
    before = snapshot(model)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    step = before - snapshot(model)
    assert float((step - expected).norm() / expected.norm()) < 1e-8
    assert opt.stats()["tied_approximations"] == 0
    restore(model, before)


class TiedLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.l2.weight = self.l1.weight

    def forward(self, x):
        return self.head(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def test_tied_linears_exact_by_materialising_then_approximated_over_the_limit(f64):
    model = TiedLinears()
    x, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    gs = per_sample_grads(model, F.cross_entropy, x, y)
    expected = ngd_direction(flat(gs, [k for k, _ in model.named_parameters()]), 0.2)
    kw = dict(lr=1.0, momentum=0.0, damping=0.2, damping_mode="absolute", normalize="none", reuse="off")
    opt = FNGD(model.parameters(), **kw)
    before = snapshot(model)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert float(((before - snapshot(model)) - expected).norm() / expected.norm()) < 1e-8
    restore(model, before)
    del opt

    opt = FNGD(model.parameters(), **kw, dense_tied_limit=10)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match="cross terms are dropped"):
        opt.step()
    assert opt.stats()["tied_approximations"] == 1
    step = before - snapshot(model)
    assert torch.isfinite(step).all() and float((step - expected).norm() / expected.norm()) > 1e-6


@pytest.mark.parametrize("make", ["linear_tokens", "linear_rows", "conv", "conv_pixels", "embedding"])
def test_gram_of_tiny_gradients_keeps_its_precision(make, monkeypatch):
    """float32 output gradients of 2^-90 (deep networks' early layers after some steps; a tiny loss
    scale): their products lie below float32's range (under 2^-149), so a Gram taken of them as
    they are is lost (zero or a few bits). The samplers scale by a power of two and return K in
    float64: it equals 2^-180 times the Gram of the unscaled gradients, to float32 rounding."""
    torch.manual_seed(0)
    if make.startswith("linear"):
        p, q, T = (64, 64, 3) if make == "linear_tokens" else (6, 5, 20)
        A, D = torch.randn(7, T, p), torch.randn(7, T, q)
        if make == "linear_tokens":
            assert S._use_token_route(7, T, p, q)
        else:
            assert not S._use_token_route(7, T, p, q)
        layer = nn.Linear(p, q)
        build = lambda d: S.FactoredGrads(A, d, layer.weight, layer.bias)  # noqa: E731
    elif make.startswith("conv"):
        layer = nn.Conv2d(3, 4, 3, padding=1)
        a, delta = torch.randn(5, 3, 6, 6), torch.randn(5, 4, 6, 6)
        if make == "conv_pixels":
            monkeypatch.setattr(S.ConvGrads, "_gram_route", lambda self: "pixel")
        build = lambda d: S.ConvGrads(layer, a, d)  # noqa: E731
        D = delta
    else:
        layer = nn.Embedding(11, 3)
        idx = torch.randint(0, 11, (6, 5))
        D = torch.randn(6, 5, 3)
        build = lambda d: S.EmbeddingGrads(idx, d, layer.weight)  # noqa: E731
    tiny = 2.0 ** -90
    ref = build(D).gram().to(torch.float64) * tiny**2
    small = D * tiny
    before = small.clone()
    got = build(small).gram()
    assert torch.equal(small, before)  # scaled in place for the products, and restored exactly
    assert got.dtype == torch.float64
    assert float(ref.abs().max()) < 2.0 ** -149  # below float32's smallest number: unrepresentable there
    assert torch.allclose(got, ref, rtol=1e-5, atol=0), float(((got - ref).abs() / ref.abs().max()).max())
