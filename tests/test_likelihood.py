"""Likelihood in any order, generative classification and refinement against direct computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from rar.inference.likelihood import classify, log_likelihood
from rar.model.orders import named_order
from rar.inference import generate
from rar.inference.refinement import context_scores, refine


def _data(model, B=3, seed=0):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, cfg.codebook_size, (B, cfg.num_tokens), generator=g),
            torch.tensor([1, 4, cfg.num_classes][:B]))


def _direct_nll(model, tokens, labels, orders):
    """(B,) nats per token straight from model(tokens, labels, orders)."""
    with torch.no_grad():
        logp = F.log_softmax(model(tokens, labels, orders), -1)
    return -logp.gather(-1, tokens.gather(1, orders)[..., None])[..., 0].mean(1)


def test_log_likelihood_equals_the_forward(tiny_official):
    tokens, labels = _data(tiny_official)
    T = tiny_official.config.num_tokens
    raster = torch.arange(T).expand(3, T)
    torch.testing.assert_close(log_likelihood(tiny_official, tokens, labels), _direct_nll(tiny_official, tokens, labels, raster))
    spiral = named_order("spiral_in", tiny_official.config.grid_size).expand(3, T)
    torch.testing.assert_close(log_likelihood(tiny_official, tokens, labels, orders="spiral_in"),
                               _direct_nll(tiny_official, tokens, labels, spiral))


def test_mixture_and_mean_over_orders(tiny_official):
    tokens, labels = _data(tiny_official)
    T, K = tiny_official.config.num_tokens, 5
    per = log_likelihood(tiny_official, tokens, labels, orders="random", num_orders=K, seed=3, reduction="none")
    orders = torch.rand(K, T, generator=torch.Generator().manual_seed(3)).argsort(1)  # as documented
    direct = torch.stack([_direct_nll(tiny_official, tokens, labels, o.expand(3, T)) for o in orders], 1)  # (B, K)
    torch.testing.assert_close(per, direct)
    torch.testing.assert_close(log_likelihood(tiny_official, tokens, labels, orders=orders, reduction="mean"),
                               direct.mean(1))
    mixture = torch.tensor([-math.log(sum(math.exp(-T * float(v)) for v in row) / K) / T for row in direct])
    got = log_likelihood(tiny_official, tokens, labels, orders="random", num_orders=K, seed=3)
    torch.testing.assert_close(got, mixture.float(), rtol=1e-5, atol=1e-5)
    assert (got <= direct.mean(1) + 1e-6).all()  # Jensen: the mixture's NLL is at most the mean
    one = log_likelihood(tiny_official, tokens[1:2], labels[1:2], orders="random", num_orders=K, seed=3)
    torch.testing.assert_close(one, got[1:2])  # independent of the batch
    small = log_likelihood(tiny_official, tokens, labels, orders="random", num_orders=K, seed=3, batch_size=2)
    torch.testing.assert_close(small, got)
    per_image = orders[None].expand(3, K, T)  # explicit (B, K, T)
    torch.testing.assert_close(log_likelihood(tiny_official, tokens, labels, orders=per_image), got)


def test_classify_equals_a_loop_over_classes_and_keeps_the_mode(tiny_official):
    tokens, _ = _data(tiny_official)
    C = tiny_official.config.num_classes
    tiny_official.train()
    try:
        post = classify(tiny_official, tokens, orders="random", num_orders=2, seed=1)
        assert tiny_official.training  # the caller's mode is restored
    finally:
        tiny_official.eval()
    assert post.shape == (3, C)
    torch.testing.assert_close(post.sum(1), torch.ones(3))
    logp = torch.stack([-tiny_official.config.num_tokens * log_likelihood(
        tiny_official, tokens, torch.full((3,), c), orders="random", num_orders=2, seed=1) for c in range(C)], 1)
    torch.testing.assert_close(post, logp.softmax(1), rtol=1e-5, atol=1e-6)
    prior = torch.zeros(C)
    prior[3] = 1.0
    assert (classify(tiny_official, tokens, prior=prior).argmax(1) == 3).all()


def test_context_scores_see_most_of_the_image(tiny_official):
    tokens, labels = _data(tiny_official)
    g = [torch.Generator().manual_seed(i) for i in range(3)]
    scores = context_scores(tiny_official, tokens, labels, g, groups=2)
    assert scores.shape == tokens.shape and (scores <= 0).all() and torch.isfinite(scores).all()
    g2 = [torch.Generator().manual_seed(i) for i in range(3)]
    torch.testing.assert_close(context_scores(tiny_official, tokens, labels, g2, groups=2), scores)


@pytest.mark.parametrize("select", ["likelihood", "random"])
def test_refine_changes_only_picked_tokens_reproducibly(tiny_official, select):
    cfg = tiny_official.config
    labels = torch.tensor([1, 4, 7, cfg.num_classes])
    tokens = generate(tiny_official, labels, seed=0)
    out = refine(tiny_official, tokens, labels, rounds=1, fraction=0.25, select=select, seed=5, guidance_scale=2.0)
    changed = (out != tokens).sum(1)
    assert (changed <= round(0.25 * cfg.num_tokens)).all() and changed.sum() > 0
    for i in (0, 3):
        alone = refine(tiny_official, tokens[i:i + 1], labels[i:i + 1], rounds=1, fraction=0.25, select=select,
                       seed=5, guidance_scale=2.0, indices=[i])
        assert torch.equal(alone, out[i:i + 1])
    two = refine(tiny_official, tokens, labels, rounds=2, fraction=0.25, select=select, seed=5, guidance_scale=2.0)
    assert not torch.equal(two, out)
    assert torch.equal(refine(tiny_official, tokens, labels, fraction=0.0, seed=5), tokens)
    assert torch.equal(refine(tiny_official, tokens, labels, rounds=0, seed=5), tokens)


def test_refine_picks_the_least_likely_tokens(tiny_official, monkeypatch):
    import rar.inference.refinement as rf
    cfg = tiny_official.config
    tokens, labels = _data(tiny_official, B=2)
    fake = torch.zeros(2, cfg.num_tokens)
    fake[0, [3, 9]] = -50.0
    fake[1, [0, 15]] = -50.0
    monkeypatch.setattr(rf, "context_scores", lambda *a, **k: fake)
    seen = {}
    real_edit = rf.edit

    def spy(backend, t, keep, *a, **k):
        seen["keep"] = keep
        return real_edit(backend, t, keep, *a, **k)
    monkeypatch.setattr(rf, "edit", spy)
    refine(tiny_official, tokens, labels, fraction=2 / cfg.num_tokens, seed=0)
    assert (~seen["keep"]).nonzero().tolist() == [[0, 3], [0, 9], [1, 0], [1, 15]]


@pytest.mark.parametrize("call,message", [
    (lambda m, t, l: log_likelihood(m, t[:, :5], l), "tokens must be a non-empty (B, T)"),
    (lambda m, t, l: log_likelihood(m, t + 1000, l), "is outside the codebook"),
    (lambda m, t, l: log_likelihood(m, t, l[:2]), "labels must be (3,)"),
    (lambda m, t, l: log_likelihood(m, t, l, orders=torch.zeros(1, 16, dtype=torch.long)), "must be a permutation"),
    (lambda m, t, l: log_likelihood(m, t, l, orders="random", num_orders=0), "num_orders must be a positive"),
    (lambda m, t, l: log_likelihood(m, t, l, reduction="max"), "reduction must be one of"),
    (lambda m, t, l: refine(m, t, l, fraction=1.5), "refine fraction must be in [0, 1]"),
    (lambda m, t, l: refine(m, t, l, select="best"), "refine select must be one of"),
    (lambda m, t, l: refine(m, t, l, rounds=-1), "refine rounds must be a non-negative"),
    (lambda m, t, l: refine(m, t + 1000, l), "is outside the codebook"),
])
def test_bad_inputs(tiny_official, call, message):
    tokens, labels = _data(tiny_official)
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        call(tiny_official, tokens, labels)
