"""The sketched Gram (FNGD(sketch=k)): unbiased for the exact Gram, used only where it is cheaper,
seeded so that runs repeat, and off by default."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fngd_plugin import FNGD
from fngd_plugin import samplers as S
from fngd_plugin.gram import sketch_pays, sketched_gram
from fngd_plugin.samplers import ConvGrads, FactoredGrads


def linear_grads(n=6, T=5, p=40, q=50, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, T, p, generator=g, dtype=torch.float64)
    D = torch.randn(n, T, q, generator=g, dtype=torch.float64)
    weight = torch.zeros(q, p, dtype=torch.float64)
    return FactoredGrads(A, D, weight, torch.zeros(q, dtype=torch.float64) if bias else None)


@pytest.mark.parametrize("bias", [True, False])
def test_sketched_gram_is_unbiased(bias):
    r = linear_grads(bias=bias)
    exact = r.gram()
    draws = torch.stack([sketched_gram(r, 8, seed) for seed in range(4000)])
    one = float((draws[0] - exact).norm() / exact.norm())
    mean = float((draws.mean(0) - exact).norm() / exact.norm())
    # a single 8 x 8 sketch of a 50 x 40 gradient is rough; the mean of 4000 is within ~1/sqrt(4000)
    # of it (the draws are seeded: the same numbers on every machine)
    assert one > 0.1 and mean < 0.03, (one, mean)
    assert torch.allclose(draws[0], draws[0].T)  # symmetric
    assert torch.linalg.eigvalsh(draws[0]).min() > -1e-9 * float(exact.norm())  # positive semi-definite
    assert torch.equal(sketched_gram(r, 8, 7), sketched_gram(r, 8, 7))  # seeded


def test_sketched_conv_gram_is_unbiased_without_unfolding():
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1).double()
    a = torch.randn(5, 3, 9, 9, generator=g, dtype=torch.float64)
    delta = torch.randn(5, 8, 5, 5, generator=g, dtype=torch.float64)
    r = ConvGrads(conv, a, delta)
    exact = r.gram()
    draws = torch.stack([sketched_gram(r, 4, seed) for seed in range(4000)])
    one = float((draws[0] - exact).norm() / exact.norm())
    mean = float((draws.mean(0) - exact).norm() / exact.norm())
    assert one > 0.1 and mean < 0.03, (one, mean)


def test_sketch_only_where_it_pays():
    big = FactoredGrads(torch.zeros(64, 16, 128), torch.zeros(64, 16, 8000), torch.zeros(8000, 128), None)
    small = FactoredGrads(torch.zeros(64, 16, 16), torch.zeros(64, 16, 16), torch.zeros(16, 16), None)
    assert sketch_pays(big, 32) and not sketch_pays(small, 32) and not sketch_pays(big, 1024)


class TokenModel(nn.Module):
    """Embedding, a hidden Linear and a wide output projection over tokens (the translation shape)."""

    def __init__(self, vocab=300, d=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.hidden = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(self.emb(x))))


def run(sketch, steps=3, seed=0):
    torch.manual_seed(seed)
    model = TokenModel().double()
    opt = FNGD(model.parameters(), lr=0.1, momentum=0.0, reuse="off", sketch=sketch)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 300, (12, 20), generator=g)
    y = torch.randint(0, 300, (12, 20), generator=g)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x).reshape(-1, 300), y.reshape(-1)).backward()
        opt.step()
    return model, opt


def test_fngd_with_sketch_is_seeded_and_near_the_exact_step():
    exact, _ = run(None, steps=1)
    a, opt = run(8, steps=1)
    b, _ = run(8, steps=1)
    start, _ = run(None, steps=0)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)  # the same sketches: the same run
    step_exact = torch.cat([(p - s).detach().flatten() for p, s in zip(exact.parameters(), start.parameters())])
    step_sketch = torch.cat([(p - s).detach().flatten() for p, s in zip(a.parameters(), start.parameters())])
    cos = float(step_exact @ step_sketch / (step_exact.norm() * step_sketch.norm()))
    assert not torch.allclose(step_exact, step_sketch)  # the output projection was sketched
    assert cos > 0.9, cos  # and the step still points where the exact one does
    assert opt.stats()["collect_steps"] == 1


def test_sketch_option_checked_and_kept_in_state():
    with pytest.raises(ValueError, match="sketch=0"):
        FNGD(TokenModel().parameters(), sketch=0)
    _, opt = run(8, steps=2)
    model2, opt2 = run(8, steps=0)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.step_counts == opt.step_counts  # the sketches' seeds continue where they were


@pytest.mark.parametrize("with_projection", [True, False])
@pytest.mark.parametrize("one_sample_blocks", [False, True])
def test_tied_table_token_route_equals_rows_route(with_projection, one_sample_blocks, monkeypatch):
    # encoder and decoder embeddings sharing one table with the output projection (fairseq's
    # --share-all-embeddings): the token route is exact, like the rows route
    from fngd_plugin.gram import shared_table_gram
    from fngd_plugin.samplers import EmbeddingGrads

    g = torch.Generator().manual_seed(0)
    table = torch.zeros(50, 8, dtype=torch.float64)
    n = 4
    embs = [EmbeddingGrads(torch.randint(0, 50, (n, T), generator=g), torch.randn(n, T, 8, generator=g,
                                                                                   dtype=torch.float64), table)
            for T in (6, 5)]
    reps = list(embs)
    if with_projection:
        reps.append(FactoredGrads(torch.randn(n, 5, 8, generator=g, dtype=torch.float64),
                                  torch.randn(n, 5, 50, generator=g, dtype=torch.float64), table, None))
    if one_sample_blocks:  # the token route's products a sample's rows at a time
        monkeypatch.setitem(S.BLOCK_ELEMENTS, "cpu", 1)
    rows = shared_table_gram(reps, route="rows")
    tokens = shared_table_gram(reps, route="tokens")
    # brute force: per-sample gradients of the table, summed over the modules
    G = sum(r.materialize()[0].reshape(n, -1) for r in reps)
    assert torch.allclose(rows, G @ G.T, rtol=1e-10) and torch.allclose(tokens, G @ G.T, rtol=1e-10)


def test_tied_table_sketch_is_unbiased_cross_terms_included():
    from fngd_plugin.gram import shared_table_gram
    from fngd_plugin.samplers import EmbeddingGrads

    g = torch.Generator().manual_seed(1)
    table = torch.zeros(30, 8, dtype=torch.float64)
    n = 4
    reps = [EmbeddingGrads(torch.randint(0, 30, (n, 6), generator=g), torch.randn(n, 6, 8, generator=g,
                                                                                  dtype=torch.float64), table),
            FactoredGrads(torch.randn(n, 5, 8, generator=g, dtype=torch.float64),
                          torch.randn(n, 5, 30, generator=g, dtype=torch.float64), table, None)]
    exact = shared_table_gram(reps, route="rows")
    draws = torch.stack([shared_table_gram(reps, sketch=(4, seed), route="sketch") for seed in range(4000)])
    one = float((draws[0] - exact).norm() / exact.norm())
    mean = float((draws.mean(0) - exact).norm() / exact.norm())
    assert one > 0.1 and mean < 0.03, (one, mean)
